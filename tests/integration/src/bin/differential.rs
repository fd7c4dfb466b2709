//! Differential check against containerd: the same CRI scenarios on a Trellis node and
//! on containerd (Debian's, runc, its own socket, same registry and CNI network), and
//! what a container and a CRI client observe on each side, printed side by side with
//! the differences marked. Asserts nothing: differences are for a person to judge
//! (fix, or document as deliberate in docs/architecture.md, which `DELIBERATE` below
//! lists so that the check tells documented differences from new ones).
//!
//!     cargo build --bins && cargo run -p trellis-integration --bin differential [-- --all]
//!
//! `--all` prints both sides' observations where they agree too. The scenarios are in
//! `trellis_integration::differential`.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_cri::v1::*;
use trellis_integration::differential::{Images, Observed, Side, observe};
use trellis_integration::peer::SideBySide;

/// Observations (by a part of their name) where Trellis differs from containerd on
/// purpose, each with the reason documented in docs/architecture.md ("Where Trellis
/// differs from containerd on purpose").
const DELIBERATE: &[(&str, &str)] = &[
    (
        "pod-network-no-hostname/",
        "a pod's own UTS namespace is named after the pod",
    ),
    (
        "pod-network/",
        "a pod with its own network has its own /etc/hosts",
    ),
    (
        "logs/split-line/",
        "a line written in two writes is logged P then F",
    ),
    (
        "logs/long-line/entries",
        "a long line is logged in the pieces conmon reads",
    ),
    (
        "exits/missing-",
        "a command that cannot run fails CreateContainer",
    ),
    (
        "mounts/no-paths/",
        "no masked or read-only paths in the request: the runtime's defaults",
    ),
    (
        "/overlay-uuid",
        "the kernel's uuid=auto resolves by the upper directory's first mount",
    ),
    (
        "mounts/proc-self-cgroup",
        "without a cgroup parent, each runtime's own (trellis, k8s.io)",
    ),
    (
        "(shared prefix)/code",
        "explicit codes: an ambiguous prefix is InvalidArgument",
    ),
    (
        "(no metadata)",
        "explicit codes: a config missing a field is InvalidArgument",
    ),
    (
        "(no image)",
        "explicit codes: a config missing a field is InvalidArgument",
    ),
    (
        "(no command anywhere)",
        "explicit codes: nothing to run is InvalidArgument",
    ),
    (
        "(malformed",
        "explicit codes: a malformed image name is InvalidArgument",
    ),
    (
        "another config)",
        "explicit codes: a name held by another config is AlreadyExists",
    ),
    (
        "same config)",
        "a repeated creation answers the earlier result (lifecycle/repeat.rs)",
    ),
];

/// Removes every pod the scenarios made on one side.
async fn remove_all(side: &Side) {
    let pods = side
        .runtime
        .clone()
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .map(|r| r.into_inner().items)
        .unwrap_or_default();
    for pod in pods {
        let mut runtime = side.runtime.clone();
        let _ = runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await;
        if let Err(status) = runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
        {
            eprintln!("{}: cannot remove pod {}: {status}", side.name, pod.id);
        }
    }
}

fn indent(text: &str) -> String {
    text.trim_end().replace('\n', "\n      ")
}

/// The reason a difference in `key` is deliberate, if it is documented as such.
fn deliberate(key: &str) -> Option<&'static str> {
    DELIBERATE
        .iter()
        .find(|(part, _)| key.contains(part))
        .map(|(_, reason)| *reason)
}

/// Prints every observation, marked; the counts of differences, undocumented first.
fn compare(trellis: &Observed, peer: &Observed, all: bool) -> (usize, usize, usize) {
    let keys: BTreeSet<&String> = trellis.keys().chain(peer.keys()).collect();
    let (mut new, mut documented) = (0, 0);
    let missing = String::from("(not observed)");
    for key in &keys {
        let (ours, theirs) = (trellis.get(*key), peer.get(*key));
        let mark = match (ours == theirs, deliberate(key)) {
            (true, _) => "  same",
            (false, Some(_)) => {
                documented += 1;
                "  DELIBERATE"
            }
            (false, None) => {
                new += 1;
                "DIFFER"
            }
        };
        println!("{mark} {key}");
        if ours != theirs {
            if let Some(reason) = deliberate(key) {
                println!("    (documented: {reason})");
            }
            println!("    trellis:    {}", indent(ours.unwrap_or(&missing)));
            println!("    containerd: {}", indent(theirs.unwrap_or(&missing)));
        } else if all {
            println!("    both:       {}", indent(ours.unwrap_or(&missing)));
        }
    }
    (keys.len(), new, documented)
}

/// Network namespaces by name.
fn netns_names() -> BTreeSet<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the check left behind: shims of its containerd (their command line names
/// its socket), network namespaces that were not there before, and containerd's
/// `k8s.io` cgroups that were not there before either.
fn leftovers(socket: &Path, netns_before: &BTreeSet<String>, cgroups_before: bool) -> Vec<String> {
    let socket = socket.display().to_string();
    let mut left: Vec<String> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    (cmdline.contains("containerd-shim") && cmdline.contains(&socket))
                        .then(|| format!("shim {}", e.file_name().to_string_lossy()))
                })
                .collect()
        })
        .unwrap_or_default();
    left.extend(
        netns_names()
            .difference(netns_before)
            .map(|name| format!("netns {name}")),
    );
    if !cgroups_before && Path::new("/sys/fs/cgroup/memory/k8s.io").exists() {
        left.push("cgroup /sys/fs/cgroup/memory/k8s.io".into());
    }
    // Any container's cgroup under k8s.io (one from before this run counts too).
    let containers = std::fs::read_dir("/sys/fs/cgroup/memory/k8s.io")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().is_dir())
                .count()
        })
        .unwrap_or(0);
    if containers > 0 {
        left.push(format!(
            "{containers} cgroups under /sys/fs/cgroup/memory/k8s.io"
        ));
    }
    left
}

#[tokio::main]
async fn main() {
    let all = std::env::args().any(|arg| arg == "--all");
    let netns_before = netns_names();
    let cgroups_before = Path::new("/sys/fs/cgroup/memory/k8s.io").exists();
    let dir = tempfile::Builder::new()
        .prefix("trellis-differential-")
        .tempdir()
        .expect("temp dir");
    let SideBySide {
        containerd,
        network,
        node,
        image: image_name,
        registry,
    } = SideBySide::start(dir.path(), "diff").await;
    let extra = Images::push(&registry, "diff").await;
    let sides = [
        Side {
            name: "trellis",
            runtime: node.runtime(),
            images: node.images(),
            logs: dir.path().join("logs-trellis"),
            image: image_name.clone(),
            extra: extra.clone(),
        },
        Side {
            name: "containerd",
            runtime: containerd.runtime(),
            images: containerd.images(),
            logs: dir.path().join("logs-containerd"),
            image: image_name.clone(),
            extra: extra.clone(),
        },
    ];
    let mut observations = Vec::new();
    for side in &sides {
        let wanted = [
            &image_name,
            &extra.without_command,
            &extra.twins[0],
            &extra.twins[1],
        ];
        for image in wanted {
            side.pull(image)
                .await
                .unwrap_or_else(|e| panic!("{}: pull {image}: {e}", side.name));
        }
        observations.push(observe(side).await);
        remove_all(side).await;
    }
    let (count, new, documented) = compare(&observations[0], &observations[1], all);
    println!(
        "\n{count} observations, {} different: {new} not documented, {documented} deliberate",
        new + documented
    );
    let socket = containerd.socket.clone();
    drop(sides);
    drop(containerd);
    node.stop();
    drop(network);
    drop(registry);
    let left = leftovers(&socket, &netns_before, cgroups_before);
    if left.is_empty() {
        println!("left behind: nothing (no shim, netns or k8s.io cgroup)");
    } else {
        println!("left behind: {left:?}");
    }
}
