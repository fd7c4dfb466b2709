//! Fault injection for tests: a node's fail points (`trellis_common::failpoint`, read
//! by every service from a file of the node's, so a test arms them on a running
//! node), and what a node must not hold once every pod and image is removed, looked
//! for everywhere a kill -9 could leave it: network namespaces, IP allocations, NAT
//! rules, runc state, bundles, pod directories, attach links, exit files, root
//! filesystems, conmon and runc processes, cgroups.

use std::path::{Path, PathBuf};

use crate::Node;

/// Where a node started with `NodeOptions::failpoints` keeps them.
pub fn failpoints_file(root: &Path) -> PathBuf {
    root.join("failpoints")
}

impl Node {
    /// Arms `spec` (`point=[N*]action;…`) on the running node, replacing what was set.
    pub fn set_failpoints(&self, spec: &str) {
        let file = failpoints_file(self.root());
        let temp = file.with_extension("new");
        std::fs::write(&temp, spec).expect("write fail points");
        // Replaced whole: a service reading it meanwhile sees the old or the new.
        std::fs::rename(&temp, &file).expect("install fail points");
    }

    /// The fail points still armed (a counted one is gone once it has fired).
    pub fn failpoints(&self) -> String {
        std::fs::read_to_string(failpoints_file(self.root())).unwrap_or_default()
    }

    /// What is left of pods, containers and their networks on this node, which must
    /// be nothing once they are all removed.
    pub fn state_leftovers(&self) -> Vec<String> {
        let run = self.root().join("run");
        let mut found = Vec::new();
        for (what, dir) in [
            ("netns pin", run.join("netns")),
            ("pod directory", run.join("runtime/pods")),
            ("bundle", run.join("runtime/containers")),
            ("runc state", run.join("runtime/runc")),
            ("attach link", run.join("runtime/attach")),
            ("exit file", run.join("runtime/exits")),
            (
                "root filesystem",
                self.root().join("state/storage/containers"),
            ),
        ] {
            found.extend(
                entries(&dir)
                    .into_iter()
                    .map(|name| format!("{what} {name}")),
            );
        }
        for pid in crate::processes_mentioning(self.root()) {
            let command = crate::cmdline(pid);
            let program = command.split_whitespace().next().unwrap_or_default();
            if program.ends_with("conmon") || program.ends_with("runc") {
                found.push(format!("process {pid}: {command}"));
            }
        }
        if let Some(network) = self.network() {
            found.extend(
                network
                    .allocations()
                    .into_iter()
                    .map(|ip| format!("IP allocation {ip}")),
            );
            found.extend(
                crate::netns::nat_rules_mentioning(&network.name)
                    .into_iter()
                    .map(|rule| format!("NAT rule {rule}")),
            );
        }
        found
    }
}

/// Records left in a stopped node's stores (`<state>/<service>/db`), for each
/// `(service, table)` asked about.
pub fn records_left(root: &Path, tables: &[(&str, &str)]) -> Vec<String> {
    use trellis_common::store::{SledStore, Store};
    let mut found = Vec::new();
    for (service, table) in tables {
        let path = root.join("state").join(service).join("db");
        // Opening creates: a store that is not there would look empty.
        assert!(path.is_dir(), "no record store at {}", path.display());
        let store =
            SledStore::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let count = store
            .table(table)
            .unwrap_or_else(|e| panic!("{service} table {table}: {e}"))
            .len();
        if count > 0 {
            found.push(format!("{count} records in {service} table {table}"));
        }
    }
    found
}

/// Container cgroups left under `parent` (a pod's cgroupfs `cgroup_parent`) in any
/// hierarchy (cgroup v1 or v2).
pub fn cgroup_leftovers(parent: &str) -> Vec<String> {
    cgroup_dirs(parent)
        .iter()
        .flat_map(|dir| {
            let children: Vec<String> = std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| format!("cgroup {}", e.path().display()))
                .collect();
            children
        })
        .collect()
}

/// Removes the (empty) `parent` cgroups a test's pods were put under.
pub fn remove_cgroup_parent(parent: &str) {
    for dir in cgroup_dirs(parent) {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The directories of `parent` in every cgroup hierarchy that has it.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let relative = parent.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join(relative))
        .filter(|dir| dir.is_dir())
        .collect();
    // cgroup v2: the parent sits at the top of the one hierarchy.
    if root.join(relative).is_dir() {
        dirs.push(root.join(relative));
    }
    dirs
}

/// The names in `dir`, sorted (none if it cannot be read).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts that a running node whose pods are all removed holds nothing of them
/// (`Node::state_leftovers`, and the node root's mounts), `more` included; its
/// sockets and service processes are the node's own.
pub fn assert_nothing_left(node: &Node, case: &str, more: Vec<String>) {
    let mut left = node.state_leftovers();
    left.extend(more);
    left.extend(
        crate::leftovers(node.root())
            .into_iter()
            .filter(|l| !l.starts_with("socket") && !l.starts_with("process")),
    );
    assert!(
        left.is_empty(),
        "{case}: left behind: {left:#?}\n{}",
        node.log_tail()
    );
}

/// Waits until fail point `point` fired (the file counted it down) and the supervisor
/// started `service` again in place of `old_pid`.
pub async fn fired_and_restarted(node: &Node, point: &str, service: &str, old_pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while node.failpoints().contains(point) {
        assert!(
            std::time::Instant::now() < deadline,
            "fail point {point} never fired:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    node.wait_restarted(service, old_pid, std::time::Duration::from_secs(20))
        .await;
}
