//! Helpers for pod network tests: a CNI network of a test's own (conflist, bridge,
//! subnet, IP allocations under the node's root), running code inside a pod's network
//! namespace, and what the host shows of interfaces, addresses and NAT rules.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;
use serde_json::{Value, json};

/// A network only one test uses: its own name, bridge and /24, with host-local
/// keeping its allocations in `ipam_dir`. The bridge plugin leaves the bridge behind
/// by design; dropping this deletes it.
pub struct TestNetwork {
    pub name: String,
    pub bridge: String,
    /// The x.y.z.0/24 subnet.
    pub subnet: Ipv4Addr,
    pub ipam_dir: PathBuf,
    /// Plugins after bridge (and portmap), as given to `write`.
    extra_plugins: Vec<Value>,
}

impl TestNetwork {
    /// A fresh random network for a node rooted at `node_root`.
    pub fn new(node_root: &Path) -> TestNetwork {
        let suffix = random_hex(6);
        let random = u32::from_str_radix(&random_hex(6), 16).unwrap_or_default();
        let subnet = Ipv4Addr::new(10, 200 + (random % 51) as u8, (random >> 8) as u8, 0);
        TestNetwork {
            name: format!("trellis-it-{suffix}"),
            bridge: format!("trb{suffix}"),
            subnet,
            ipam_dir: node_root.join("cni-ipam"),
            extra_plugins: Vec::new(),
        }
    }

    /// Chains `plugin` after bridge and portmap.
    pub fn with_plugin(mut self, plugin: Value) -> TestNetwork {
        self.extra_plugins.push(plugin);
        self
    }

    pub fn conflist(&self) -> Value {
        let mut plugins = vec![
            json!({
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.ipam_dir,
                    "ranges": [[{ "subnet": format!("{}/24", self.subnet) }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            }),
            json!({ "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }),
        ];
        plugins.extend(self.extra_plugins.iter().cloned());
        json!({ "cniVersion": "1.0.0", "name": self.name, "plugins": plugins })
    }

    /// Writes the conflist as `<dir>/10-<name>.conflist`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let file = dir.join(format!("10-{}.conflist", self.name));
        std::fs::write(&file, self.conflist().to_string())
            .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        file
    }

    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn contains(&self, ip: &str) -> bool {
        ip.parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.octets()[..3] == self.subnet.octets()[..3])
    }

    /// Addresses host-local holds for this network.
    pub fn allocations(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.ipam_dir.join(&self.name)) else {
            return Vec::new();
        };
        let mut found: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
            .collect();
        found.sort();
        found
    }

    /// Interfaces plugged into the bridge (the veths' host ends).
    pub fn bridge_ports(&self) -> Vec<String> {
        list_dir(&Path::new("/sys/class/net").join(&self.bridge).join("brif"))
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .status();
        }
    }
}

/// Runs `f` on a new thread that has entered the network namespace pinned at `pin`;
/// the thread ends with `f`, so no other code runs in that namespace by mistake.
/// Sockets made inside stay in that namespace after the thread ends.
pub fn in_netns<T: Send + 'static>(pin: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let thread_pin = pin.to_path_buf();
    std::thread::spawn(move || {
        let namespace = std::fs::File::open(&thread_pin)
            .unwrap_or_else(|e| panic!("open {}: {e}", thread_pin.display()));
        nix::sched::setns(namespace.as_fd(), CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", thread_pin.display()));
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("the thread in {} panicked", pin.display()))
}

/// Creates a network namespace pinned at `pin` (for the benchmark's floor, which
/// does by hand what the network service does).
pub fn create_netns(pin: &Path) -> Result<(), String> {
    std::fs::File::create(pin).map_err(|e| format!("create {}: {e}", pin.display()))?;
    let target = pin.to_path_buf();
    std::thread::spawn(move || -> Result<(), String> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind-mount {}: {e}", target.display()))
    })
    .join()
    .map_err(|_| "netns thread panicked".to_string())?
}

pub fn delete_netns(pin: &Path) -> Result<(), String> {
    nix::mount::umount2(pin, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| format!("umount {}: {e}", pin.display()))?;
    std::fs::remove_file(pin).map_err(|e| format!("remove {}: {e}", pin.display()))
}

/// `iptables -t nat -S`: every NAT rule and chain.
pub fn nat_rules() -> String {
    let output = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .expect("run iptables");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// NAT rules that mention `text` (a container id, an address).
pub fn nat_rules_mentioning(text: &str) -> Vec<String> {
    nat_rules()
        .lines()
        .filter(|line| line.contains(text))
        .map(str::to_string)
        .collect()
}

/// Host interfaces, by name.
pub fn host_links() -> Vec<String> {
    list_dir(Path::new("/sys/class/net"))
}

/// Entries of the node's netns pin directory.
pub fn pins(run_dir: &Path) -> Vec<String> {
    list_dir(&run_dir.join("netns"))
}

fn list_dir(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// `digits` random lowercase hex digits.
pub fn random_hex(digits: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut text = String::new();
    while text.len() < digits {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_usize(text.len());
        text.push_str(&format!("{:016x}", hasher.finish()));
    }
    text.truncate(digits);
    text
}
