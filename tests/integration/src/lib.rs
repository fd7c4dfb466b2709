//! Boots real Trellis nodes from the built binaries and tests them from the outside,
//! through the CRI socket, as the kubelet would.
//!
//! Every node lives in its own temporary root (config, state, sockets, CNI config)
//! with its own NATS port, so tests run in parallel. A node is torn down when it is
//! dropped, even when the test failed; `Node::stop` also checks that nothing (process,
//! socket, mount) was left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ListPodSandboxRequest, RemovePodSandboxRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;
use trellis_proto::service::v1::InfoResponse;
use trellis_proto::service::v1::service_info_client::ServiceInfoClient;

pub mod cri;
pub mod differential;
pub mod faults;
pub mod hostile;
pub mod memory;
pub mod metrics;
pub mod nats;
pub mod nats_cluster;
pub mod netns;
pub mod otlp;
pub mod peer;
pub mod pki;
pub mod pods;
pub mod registry;
pub mod spdy_client;

pub const SERVICES: [&str; 5] = ["storage", "network", "image", "runtime", "gateway"];

/// Where the built binaries are: `$TRELLIS_BIN_DIR`, or the cargo target directory
/// this executable was built into (`target/<profile>` for a bench binary,
/// `target/<profile>/deps` for a test).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TRELLIS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("executable path");
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(Path::to_path_buf)
        .collect();
    candidates.iter().find(|dir| dir.join("trellis").is_file()).cloned().unwrap_or_else(|| {
        panic!("no trellis binary beside {}: build the binaries first (`cargo build --bins`) or set TRELLIS_BIN_DIR", exe.display())
    })
}

pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The services' own client transport: tests dial the sockets as the services do.
pub use trellis_common::transport::unix_channel;

/// oci-client's rustls needs a crypto provider chosen once per process.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// What a node is started with.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// An external NATS URL; none means `trellis up` starts its own.
    pub bus_url: Option<String>,
    /// Extra environment for `trellis up` and so every service.
    pub env: Vec<(String, String)>,
    /// Extra TOML appended to the generated configuration.
    pub extra_config: String,
    /// Give the node a CNI network of its own (bridge, /24, allocations under its root).
    pub with_cni_config: bool,
    /// The node's name (in its bus subjects); none makes a unique one (`new_node_name`).
    pub node_name: Option<String>,
    /// Fail points (`point=action;…`, see `trellis_common::failpoint`): the services
    /// read them from a file of the node's, which `Node::set_failpoints` changes.
    pub failpoints: Option<String>,
    /// Every service serves Prometheus metrics on a free loopback port (its Info says
    /// which; `metrics::scrape` reads them).
    pub with_metrics: bool,
    /// Put the state directory on a tmpfs of this many bytes, so a test can fill it.
    /// It is unmounted when the node stops or is dropped.
    pub state_tmpfs_bytes: Option<u64>,
}

/// A node name no other test uses at the same time.
pub fn new_node_name() -> String {
    format!(
        "it{}",
        std::process::id() as u64 * 1000 + u64::from(rand_suffix())
    )
}

pub struct Node {
    pub config_path: PathBuf,
    pub node_name: String,
    up: Option<Child>,
    /// The pod network of `with_cni_config`: its bridge goes when the node does (fields
    /// drop after `Drop::drop`, so after the node has stopped).
    _network: Option<netns::TestNetwork>,
    /// Whether `state` is a tmpfs of the node's own (`NodeOptions::state_tmpfs_bytes`).
    state_tmpfs: bool,
    root: tempfile::TempDir,
}

impl Node {
    pub async fn start(options: NodeOptions) -> Node {
        let root = tempfile::Builder::new()
            .prefix("trellis-it-")
            .tempdir()
            .expect("temp root");
        let path = root.path();
        let node_name = options.node_name.clone().unwrap_or_else(new_node_name);
        for dir in ["run", "state", "cni"] {
            std::fs::create_dir_all(path.join(dir)).expect("node dirs");
        }
        if let Some(bytes) = options.state_tmpfs_bytes {
            // Unmounted by `release_containers_and_mounts` when the node is dropped,
            // like every other mount under the root.
            nix::mount::mount(
                Some("tmpfs"),
                &path.join("state"),
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(format!("size={bytes},mode=0700").as_str()),
            )
            .expect("mount the state tmpfs");
        }
        // A network of this node's own (bridge, subnet, address allocations under its
        // root), not the default one, so that parallel tests share nothing on the host.
        let network = options.with_cni_config.then(|| {
            let network = netns::TestNetwork::new(path);
            network.write(&path.join("cni"));
            network
        });
        let bus = options
            .bus_url
            .as_deref()
            .map(|url| format!("[bus]\nurl = \"{url}\"\n"))
            .unwrap_or_default();
        let config = format!(
            "[node]\nname = \"{node_name}\"\nstate_dir = \"{state}\"\nrun_dir = \"{run}\"\n[network]\ncni_config_dir = \"{cni}\"\n[telemetry]\nlog_level = \"info\"\n{bus}{extra}",
            state = path.join("state").display(),
            run = path.join("run").display(),
            cni = path.join("cni").display(),
            extra = options.extra_config,
        );
        let config_path = path.join("trellis.toml");
        std::fs::write(&config_path, config).expect("write config");
        let config_arg = config_path.to_str().expect("utf-8 temp path");
        let mut env = options.env.clone();
        if options.with_metrics {
            env.extend(metrics::listeners_env());
        }
        if let Some(failpoints) = &options.failpoints {
            let file = faults::failpoints_file(path);
            std::fs::write(&file, failpoints).expect("write fail points");
            // `trellis up` hands its environment to every service it starts.
            env.push((
                trellis_common::failpoint::ENV_FILE.to_string(),
                file.display().to_string(),
            ));
        }
        let up = spawn_logged(
            "trellis",
            &["--config", config_arg, "up"],
            &env,
            &path.join("node.log"),
        );
        let mut node = Node {
            root,
            config_path,
            node_name,
            up: Some(up),
            _network: network,
            state_tmpfs: options.state_tmpfs_bytes.is_some(),
        };
        node.wait_ready(Duration::from_secs(30)).await;
        node
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn socket(&self, service: &str) -> PathBuf {
        let file = if service == "gateway" {
            "trellis.sock".to_string()
        } else {
            format!("{service}.sock")
        };
        self.root().join("run").join(file)
    }

    /// The node's own CNI network (`with_cni_config`).
    pub fn network(&self) -> Option<&netns::TestNetwork> {
        self._network.as_ref()
    }

    pub fn cni_dir(&self) -> PathBuf {
        self.root().join("cni")
    }

    /// What the layer store holds, sorted: one directory per layer (named by its diff
    /// id's hex), and `tmp-…` ones while layers are unpacked; not `l`, the layers'
    /// short links.
    pub fn layer_dirs(&self) -> Vec<String> {
        let dir = self.root().join("state/storage/layers");
        let names = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned());
        let mut names: Vec<String> = names.filter(|name| name != "l").collect();
        names.sort();
        names
    }

    /// The node's log (all services), for assertions.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("node.log")).unwrap_or_default()
    }

    /// The last lines of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(unix_channel(&self.socket("gateway")))
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(unix_channel(&self.socket("gateway")))
    }

    pub async fn info(&self, service: &str) -> Result<InfoResponse, tonic::Status> {
        let mut client = ServiceInfoClient::new(unix_channel(&self.socket(service)));
        client
            .info(trellis_proto::service::v1::InfoRequest {})
            .await
            .map(|r| r.into_inner())
    }

    /// Waits until the gateway is healthy (so, under `trellis up`, every service is).
    async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(up) = self.up.as_mut()
                && let Ok(Some(status)) = up.try_wait()
            {
                panic!(
                    "trellis up exited during start-up ({status}):\n{}",
                    self.log_tail()
                );
            }
            if self.info("gateway").await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node not ready within {timeout:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every service reports a live bus connection (they connect in the
    /// background and serve before the bus is up).
    pub async fn wait_bus_connected(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for service in SERVICES {
            loop {
                let bus = self.info(service).await.ok().and_then(|info| info.bus);
                if bus.as_ref().is_some_and(|bus| bus.connected) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{service} not connected to the bus within {timeout:?}: {bus:?}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// Waits until `service` answers with a pid other than `old_pid`.
    pub async fn wait_restarted(&self, service: &str, old_pid: u32, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(info) = self.info(service).await
                && info.pid != old_pid
            {
                return info.pid;
            }
            assert!(
                Instant::now() < deadline,
                "{service} not restarted within {timeout:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM to `trellis up`, then checks that it stopped every child and left no
    /// process, socket or mount behind, nor anything of a pod (`Node::state_leftovers`).
    pub fn stop(mut self) {
        self.stop_checked();
    }

    fn stop_checked(&mut self) {
        self.remove_every_pod();
        let status = self.terminate_up(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "trellis up did not exit cleanly ({status:?}):\n{}",
            self.log_tail()
        );
        // Every pod was removed: nothing of one may remain (`faults`). Looked at
        // before the node's own tmpfs goes, which would hide what is under it.
        let state_leftovers = self.state_leftovers();
        // The node's own tmpfs is no leftover; a mount still under it keeps it busy,
        // and is reported below.
        if self.state_tmpfs {
            let _ = nix::mount::umount(&self.root().join("state"));
        }
        let mut leftovers = leftovers(self.root());
        leftovers.extend(state_leftovers);
        assert!(
            leftovers.is_empty(),
            "left behind after stop: {leftovers:#?}\n{}",
            self.log_tail()
        );
    }

    /// [`Node::stop`], then `inspect` on the node's root (its services gone, so
    /// their record stores can be opened) before the root is removed.
    pub fn stop_and_inspect<T>(mut self, inspect: impl FnOnce(&Path) -> T) -> T {
        self.stop_checked();
        inspect(self.root())
    }

    /// The pid of the `trellis up` process.
    pub fn up_pid(&self) -> Option<u32> {
        self.up.as_ref().map(Child::id)
    }

    /// Removes whatever pods a test left, through the CRI, so that their networks are
    /// torn down by CNI DEL: the plugins keep address allocations and NAT rules outside
    /// the node's root, which killing the node would leave behind.
    fn remove_every_pod(&self) {
        let socket = self.socket("gateway");
        if self.up.is_none() || !socket.exists() {
            return;
        }
        // A runtime of its own, on a thread of its own: this also runs in Drop, inside
        // or outside a test's runtime.
        let removal = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let mut client = RuntimeServiceClient::new(unix_channel(&socket));
                let listing = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.list_pod_sandbox(ListPodSandboxRequest::default()),
                )
                .await;
                let Ok(Ok(pods)) = listing else { return };
                for pod in pods.into_inner().items {
                    let removal = client.remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: pod.id.clone(),
                    });
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(15), removal).await,
                        Ok(Ok(_))
                    ) {
                        eprintln!("could not remove pod {} left by the test", pod.id);
                    }
                }
            });
        });
        let _ = removal.join();
    }

    fn terminate_up(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        terminate(&mut self.up.take()?, grace)
    }
}

/// Starts a built binary with its output in `log`.
fn spawn_logged(binary_name: &str, args: &[&str], env: &[(String, String)], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(binary(binary_name))
        .args(args)
        // Before the test's own environment, so that a test can unset it.
        .env("NO_COLOR", "1")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {binary_name}: {e}"))
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
fn terminate(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for Node {
    fn drop(&mut self) {
        self.remove_every_pod();
        self.terminate_up(Duration::from_secs(20));
        // Whatever a failed test left running under this root: end it, by pid.
        for pid in processes_mentioning(self.root()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        release_containers_and_mounts(self.root());
    }
}

/// After a failed test: containers runc still knows under this root are deleted
/// (their processes killed, their cgroups removed), then every mount under the root
/// is detached, deepest first.
fn release_containers_and_mounts(root: &Path) {
    let runc_root = root.join("run/runtime/runc");
    for container in std::fs::read_dir(&runc_root)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["delete", "--force"])
            .arg(container.file_name())
            .output();
    }
    let root_text = root.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|p| p.starts_with(&root_text))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// What a stopped node must not leave: processes, sockets, mounts under its root.
pub fn leftovers(root: &Path) -> Vec<String> {
    let mut found: Vec<String> = processes_mentioning(root)
        .into_iter()
        .map(|pid| format!("process {pid}: {}", cmdline(pid)))
        .collect();
    if let Ok(entries) = std::fs::read_dir(root.join("run")) {
        found.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                .map(|p| format!("socket {}", p.display())),
        );
    }
    let root_text = root.display().to_string();
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        found.extend(
            mounts
                .lines()
                .filter(|line| line.contains(&root_text))
                .map(|line| format!("mount {line}")),
        );
    }
    found
}

/// Pids of live processes whose command line mentions `root` (every process a node
/// starts is given its config path or state directory), other than this one.
pub fn processes_mentioning(root: &Path) -> Vec<i32> {
    let needle = root.display().to_string();
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me && cmdline(pid).contains(&needle) && !is_zombie(pid))
        .collect()
}

pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The project's default conflist (bridge, portmap), as `deploy/` ships it.
pub fn install_cni_config(dir: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/cni/10-trellis.conflist");
    std::fs::copy(&source, dir.join("10-trellis.conflist"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
}

fn rand_suffix() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(Instant::now().elapsed().as_nanos() as u64);
    (hasher.finish() % 1000) as u16
}

/// Sends SIGKILL to a pid.
pub fn kill9(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
}

/// A service binary run on its own (not under `trellis up`), for tests of one process.
pub struct ServiceProcess {
    pub child: Child,
}

impl ServiceProcess {
    pub fn spawn(binary_name: &str, args: &[&str], log: &Path) -> ServiceProcess {
        Self::spawn_with_env(binary_name, args, &[], log)
    }

    /// [`ServiceProcess::spawn`] with extra environment, as a systemd unit gives it.
    pub fn spawn_with_env(
        binary_name: &str,
        args: &[&str],
        env: &[(String, String)],
        log: &Path,
    ) -> ServiceProcess {
        ServiceProcess {
            child: spawn_logged(binary_name, args, env, log),
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// Polls `condition` every 20 ms for up to `within`; whether it came true.
pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Connects to `socket` every few milliseconds until `stop`, counting the connects
/// refused (no listener, or no socket file): what a kubelet dialling then would see.
pub fn count_refusals(
    socket: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    let socket = socket.to_path_buf();
    tokio::spawn(async move {
        let (mut tries, mut refused) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            tries += 1;
            if tokio::net::UnixStream::connect(&socket).await.is_err() {
                refused += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (tries, refused)
    })
}
