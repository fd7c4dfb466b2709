//! containerd (Debian's package) on its own socket and root, as the peer the
//! benchmarks measure Trellis against, through the same CRI client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

pub struct Containerd {
    root: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    /// The directories containerd makes outside its root (cgroups of pods without a
    /// cgroup parent, runc's state, shim sockets) that were not there before it
    /// started: removed, once empty, when it stops.
    made_outside: Vec<PathBuf>,
}

/// Where containerd leaves directories outside its root: one `k8s.io` cgroup per v1
/// hierarchy (and the unified one), runc's state and the shims' sockets under
/// /run/containerd; children before their parents.
fn namespace_directories() -> Vec<PathBuf> {
    let mut directories: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|hierarchies| {
            hierarchies
                .filter_map(Result::ok)
                .map(|hierarchy| hierarchy.path().join("k8s.io"))
                .collect()
        })
        .unwrap_or_default();
    for run in ["runc/k8s.io", "runc", "s", ""] {
        directories.push(Path::new("/run/containerd").join(run));
    }
    directories
}

impl Containerd {
    /// Starts containerd under `dir`, with plain-HTTP mirrors for the given loopback
    /// registries, the CNI configuration in `cni_conf_dir` and the given pause image.
    pub async fn start(
        dir: &Path,
        registries: &[&str],
        cni_conf_dir: &Path,
        sandbox_image: &str,
    ) -> Containerd {
        let root = dir.join("containerd");
        std::fs::create_dir_all(&root).expect("containerd dir");
        let socket = root.join("containerd.sock");
        let mut config = format!(
            "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\n[grpc]\n  address = \"{socket}\"\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n  restrict_oom_score_adj = true\n  stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  sandbox_image = \"{sandbox_image}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"runc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{cni}\"\n",
            root = root.display(),
            socket = socket.display(),
            cni = cni_conf_dir.display(),
            sandbox_image = sandbox_image,
        );
        for registry in registries {
            config.push_str(&format!("[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{registry}\"]\n  endpoint = [\"http://{registry}\"]\n"));
        }
        std::fs::write(root.join("config.toml"), config).expect("containerd config");
        let made_outside = namespace_directories()
            .into_iter()
            .filter(|directory| !directory.exists())
            .collect();
        let log = std::fs::File::create(root.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(root.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd is not installed (apt-get install containerd)");
        let containerd = Containerd {
            root,
            socket,
            child: Some(child),
            made_outside,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut client = containerd.runtime();
            if client
                .version(k8s_cri::v1::VersionRequest::default())
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(containerd.root.join("containerd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        containerd
    }

    /// The containerd daemon's pid (its shims are processes of their own).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|child| child.id() as i32)
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(crate::unix_channel(&self.socket))
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(crate::unix_channel(&self.socket))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
        // rmdir removes only what is empty: what another containerd still uses stays.
        for directory in &self.made_outside {
            let _ = std::fs::remove_dir(directory);
        }
        // Unmount whatever containerd left mounted under its root before removal.
        let root = self.root.display().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|line| line.split_whitespace().nth(4))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for point in points {
                let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Median, p95 and p99 of a sample, in milliseconds.
pub fn summary(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (at(0.5), at(0.95), at(0.99))
}

/// A Trellis node and containerd side by side, for the benchmarks and the
/// differential check: one registry with a busybox image (and the pause image
/// containerd's sandboxes need: a shell that exits on SIGTERM), one CNI network.
/// Fields are dropped in order: containerd first, the registry last.
pub struct SideBySide {
    pub containerd: Containerd,
    pub network: crate::netns::TestNetwork,
    pub node: crate::Node,
    /// The busybox image's name.
    pub image: String,
    pub registry: crate::registry::Registry,
}

impl SideBySide {
    /// Starts both under `dir`, the images pushed under `repository/`.
    pub async fn start(dir: &Path, repository: &str) -> SideBySide {
        use crate::registry::{Registry, busybox_layer, image};
        let registry = Registry::start(dir, None);
        let shell = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
        registry
            .push(&format!("{repository}/busybox"), "latest", &shell)
            .await;
        let pause = image(
            vec![busybox_layer()],
            &[
                "/bin/sh",
                "-c",
                "trap 'exit 0' TERM; while true; do sleep 1; done",
            ],
            "amd64",
            false,
        );
        registry
            .push(&format!("{repository}/pause"), "3.9", &pause)
            .await;
        let image = format!("{}/{repository}/busybox:latest", registry.address);
        let node = crate::Node::start(crate::NodeOptions::default()).await;
        let network = crate::netns::TestNetwork::new(node.root());
        network.write(&node.cni_dir());
        let containerd = Containerd::start(
            dir,
            &[&registry.address],
            &node.cni_dir(),
            &format!("{}/{repository}/pause:3.9", registry.address),
        )
        .await;
        SideBySide {
            containerd,
            network,
            node,
            image,
            registry,
        }
    }
}
