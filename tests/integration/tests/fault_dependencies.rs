//! Faults of what a node depends on, seen through the CRI socket as a kubelet sees
//! them: a CNI plugin that fails or hangs, a registry that goes away mid-pull or
//! serves a truncated blob, and the storage or network service down while a call
//! needs it. Each call fails naming the part that failed, with the code that says
//! how, leaves nothing behind, and succeeds once the part is whole again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;
use trellis_integration::cri::{list_images, pod_config, pull};
use trellis_integration::hostile::TrickleProxy;
use trellis_integration::netns::{self, TestNetwork};
use trellis_integration::registry::{
    BuiltImage, Compression, Entry, Registry, busybox_layer, image, layer, small_image,
};
use trellis_integration::{Node, NodeOptions, kill9};

/// Polls `condition` every 20 ms for up to `within`.
async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A CNI plugin chained after bridge and portmap that does what `<dir>/mode` says on
/// ADD: `fail` (a CNI error), `hang` (starts a helper, records both pids in
/// `<dir>/pids`, waits forever), or, without the file, what the real `tuning`
/// plugin does with no settings: pass the result on.
struct FlakyPlugin {
    dir: tempfile::TempDir,
}

const FLAKY: &str = "trellis-test-flaky";

impl FlakyPlugin {
    fn install() -> FlakyPlugin {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("plugin dir");
        let mode = dir.path().join("mode");
        let pids = dir.path().join("pids");
        let script = format!(
            r#"#!/bin/sh
if [ "$CNI_COMMAND" = "ADD" ] && [ -e {mode} ]; then
  case "$(cat {mode})" in
    fail)
      cat >/dev/null
      echo '{{"cniVersion":"1.0.0","code":100,"msg":"refused by the test","details":"on purpose"}}'
      exit 1;;
    hang)
      sleep 600 &
      echo $$ $! > {pids}
      wait
      exit 0;;
  esac
fi
exec /usr/lib/cni/tuning
"#,
            mode = mode.display(),
            pids = pids.display(),
        );
        let path = dir.path().join(FLAKY);
        std::fs::write(&path, script).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod plugin");
        FlakyPlugin { dir }
    }

    fn set(&self, mode: Option<&str>) {
        let file = self.dir.path().join("mode");
        match mode {
            Some(mode) => std::fs::write(&file, mode).expect("write mode"),
            None => std::fs::remove_file(&file).expect("remove mode"),
        }
    }

    /// The hung plugin's pid and its helper's.
    fn hung_pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.path().join("pids"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }

    /// A node that finds this plugin, with `env` added, and its network.
    async fn node(&self, env: &[(&str, &str)]) -> (Node, TestNetwork) {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push((
            "TRELLIS_NETWORK_CNI_PLUGIN_DIRS".into(),
            format!("{},/usr/lib/cni", self.dir.path().display()),
        ));
        let node = Node::start(NodeOptions {
            env,
            ..Default::default()
        })
        .await;
        let network =
            TestNetwork::new(node.root()).with_plugin(serde_json::json!({ "type": FLAKY }));
        network.write(&node.cni_dir());
        (node, network)
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// No pod of the node holds anything: no pod listed, no pod directory, no netns pin,
/// no veth on the bridge, no address allocated, no NAT rule of the network.
async fn assert_no_pod_left(node: &Node, network: &TestNetwork) {
    let pods = node
        .runtime()
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(pods.is_empty(), "pods left: {pods:?}");
    let run = node.root().join("run");
    assert_eq!(entries(&run.join("runtime/pods")), Vec::<String>::new());
    assert_eq!(netns::pins(&run), Vec::<String>::new(), "netns pins left");
    assert_eq!(network.bridge_ports(), Vec::<String>::new(), "veths left");
    assert_eq!(
        network.allocations(),
        Vec::<String>::new(),
        "addresses left"
    );
    assert_eq!(
        netns::nat_rules_mentioning(&network.name),
        Vec::<String>::new(),
        "NAT rules left"
    );
}

async fn run_pod_sandbox(node: &Node, name: &str) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(RunPodSandboxRequest {
        config: Some(pod_config(name, false)),
        runtime_handler: String::new(),
    });
    request.set_timeout(Duration::from_secs(60));
    node.runtime()
        .run_pod_sandbox(request)
        .await
        .map(|r| r.into_inner().pod_sandbox_id)
}

async fn remove_pod(node: &Node, id: &str) {
    node.runtime()
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .expect("RemovePodSandbox");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_cni_plugin_fails_the_pod_by_name_and_the_pod_runs_once_it_is_fixed() {
    let plugin = FlakyPlugin::install();
    plugin.set(Some("fail"));
    let (node, network) = plugin.node(&[]).await;

    let error = run_pod_sandbox(&node, "flaky")
        .await
        .expect_err("the plugin fails ADD");
    let message = error.message();
    assert_eq!(error.code(), Code::Internal, "{message}");
    assert!(
        message.starts_with("network service: ")
            && message.contains(&format!("CNI plugin `{FLAKY}` ADD failed"))
            && message.contains("refused by the test")
            && !message.contains("not answering"),
        "{message}"
    );
    assert_no_pod_left(&node, &network).await;

    plugin.set(None);
    let id = run_pod_sandbox(&node, "flaky")
        .await
        .expect("the same pod runs once the plugin is fixed");
    assert_eq!(network.allocations().len(), 1);
    remove_pod(&node, &id).await;
    assert_no_pod_left(&node, &network).await;
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_cni_plugin_is_killed_at_its_timeout_and_the_pod_runs_once_it_answers() {
    let plugin = FlakyPlugin::install();
    plugin.set(Some("hang"));
    let (node, network) = plugin
        .node(&[("TRELLIS_NETWORK_CNI_PLUGIN_TIMEOUT_SECONDS", "2")])
        .await;

    let started = Instant::now();
    let error = run_pod_sandbox(&node, "hung")
        .await
        .expect_err("the plugin hangs");
    let waited = started.elapsed();
    let message = error.message();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "bounded by the plugin's timeout: {waited:?} ({message})"
    );
    assert!(
        message.starts_with("network service: ")
            && message.contains(&format!("CNI plugin `{FLAKY}` ADD"))
            && message.contains("did not finish within 2s"),
        "{message}"
    );
    let pids = plugin.hung_pids();
    assert_eq!(pids.len(), 2, "the plugin and its helper ran");
    assert!(
        eventually(Duration::from_secs(5), || !pids
            .iter()
            .any(|&pid| alive(pid)))
        .await,
        "the hung plugin or its helper lives on: {pids:?}"
    );
    assert_no_pod_left(&node, &network).await;

    plugin.set(None);
    let id = run_pod_sandbox(&node, "hung")
        .await
        .expect("the same pod runs once the plugin answers");
    remove_pod(&node, &id).await;
    assert_no_pod_left(&node, &network).await;
    node.stop();
}

/// A small layer, then 3 MB that a trickling proxy takes seconds to pass.
fn slow_image() -> BuiltImage {
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    image(
        vec![
            layer(
                &[Entry::File("small", b"small".to_vec())],
                Compression::Gzip,
            ),
            layer(&[Entry::File("big", big)], Compression::None),
        ],
        &["/x"],
        "amd64",
        false,
    )
}

/// Nothing of a failed pull is left: no image, and (once storage has seen the
/// stream end and the pull pruned what it imported) no layer, whole or half.
async fn assert_nothing_pulled(node: &Node, what: &str) {
    assert!(list_images(node).await.is_empty(), "{what}: no image");
    assert!(
        eventually(Duration::from_secs(10), || node.layer_dirs().is_empty()).await,
        "{what}: layers left: {:?}\n{}",
        node.layer_dirs(),
        node.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_goes_away_mid_pull_fails_it_by_name_and_the_pull_succeeds_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = slow_image();
    registry.push("tests/away", "1", &built).await;
    let proxy = TrickleProxy::start(&registry.address, 16 * 1024, Duration::from_millis(10)).await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/away:1", proxy.address);

    // A tag the registry does not have: NotFound, from the registry.
    let error = pull(&node, &format!("{}/tests/away:missing", proxy.address))
        .await
        .expect_err("no such tag");
    assert_eq!(error.code(), Code::NotFound, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("registry {}: manifest unknown", proxy.address)),
        "{}",
        error.message()
    );

    let pulling = trellis_integration::cri::pull_in_background(&node, &name);
    assert!(
        eventually(Duration::from_secs(30), || proxy.forwarded() > 1_000_000).await,
        "the big layer never got going: {} bytes\n{}",
        proxy.forwarded(),
        node.log_tail()
    );
    proxy.cut();
    let error = tokio::time::timeout(Duration::from_secs(30), pulling)
        .await
        .expect("the pull ends")
        .expect("pull task")
        .expect_err("the registry went away");
    let big = built.layers[1].digest();
    assert_eq!(error.code(), Code::Unavailable, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("registry {}: ", proxy.address))
            && error.message().contains(&format!("downloading {big}")),
        "names the registry and the blob: {}",
        error.message()
    );
    assert_nothing_pulled(&node, "cut mid-blob").await;

    proxy.mend();
    proxy.full_speed();
    pull(&node, &name)
        .await
        .expect("the same pull once the registry is back");
    assert_eq!(list_images(&node).await.len(), 1);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_blob_fails_the_pull_as_data_loss_and_the_pull_succeeds_once_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = small_image("truncated");
    registry.push("tests/truncated", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/truncated:1", registry.address);
    let busybox = built.layers[0].digest();
    let blob = registry.blob_file(&busybox);
    let whole = std::fs::read(&blob).expect("blob");
    std::fs::write(&blob, &whole[..whole.len() / 2]).expect("truncate blob");

    let error = pull(&node, &name).await.expect_err("truncated blob");
    assert_eq!(error.code(), Code::DataLoss, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("registry {}: ", registry.address))
            && error.message().contains(&busybox),
        "names the registry and the blob: {}",
        error.message()
    );
    assert_nothing_pulled(&node, "truncated blob").await;

    std::fs::write(&blob, &whole).expect("mend blob");
    pull(&node, &name)
        .await
        .expect("the same pull once the blob is whole");
    assert_eq!(list_images(&node).await.len(), 1);
    node.stop();
}

/// `trellis up` held stopped, so that a child killed now stays down (and its socket
/// refuses connections) until this is dropped.
struct SupervisorHeld(Pid);

impl SupervisorHeld {
    fn hold(node: &Node) -> SupervisorHeld {
        let pid = Pid::from_raw(node.up_pid().expect("trellis up") as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP trellis up");
        SupervisorHeld(pid)
    }
}

impl Drop for SupervisorHeld {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The words of a call that needed `service` while it was down.
fn assert_names_the_service_down(node: &Node, error: &tonic::Status, service: &str) {
    let socket: PathBuf = node.socket(service);
    assert_eq!(error.code(), Code::Unavailable, "{}", error.message());
    assert!(
        error.message().contains(&format!(
            "{service} service unavailable: not answering on {}",
            socket.display()
        )),
        "names {service}: {}",
        error.message()
    );
    for other in ["trellis-runtime", "trellis-image", "trellis-gateway"] {
        assert!(
            !error.message().contains(other),
            "does not blame {other}: {}",
            error.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_or_network_down_is_named_by_the_calls_that_need_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/down", "1", &built).await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let name = format!("{}/tests/down:1", registry.address);
    let pod = trellis_integration::cri::run_pod(&node, pod_config("down", false)).await;
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: trellis_integration::cri::image_spec(&name),
        command: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };

    // Storage down: a pull (image → storage) and a container (runtime → storage).
    let storage = node.info("storage").await.expect("storage").pid;
    {
        let _held = SupervisorHeld::hold(&node);
        kill9(storage);
        let error = pull(&node, &name).await.expect_err("storage is down");
        assert_names_the_service_down(&node, &error, "storage");
        let error = trellis_integration::cri::create(&node, &pod, container.clone())
            .await
            .expect_err("storage is down");
        assert_names_the_service_down(&node, &error, "storage");
    }
    node.wait_restarted("storage", storage, Duration::from_secs(10))
        .await;

    // Network down: a pod (runtime → network).
    let network = node.info("network").await.expect("network").pid;
    {
        let _held = SupervisorHeld::hold(&node);
        kill9(network);
        let error = run_pod_sandbox(&node, "no-network")
            .await
            .expect_err("network is down");
        assert_names_the_service_down(&node, &error, "network");
    }
    node.wait_restarted("network", network, Duration::from_secs(10))
        .await;
    // A rollback the dead services cut short is finished by a runtime's start.
    let runtime = node.info("runtime").await.expect("runtime").pid;
    kill9(runtime);
    node.wait_restarted("runtime", runtime, Duration::from_secs(10))
        .await;

    // Whole again: the same calls succeed.
    pull(&node, &name).await.expect("pull once storage is back");
    trellis_integration::cri::start(&node, &pod, container).await;
    let id = run_pod_sandbox(&node, "no-network")
        .await
        .expect("a pod once network is back");
    remove_pod(&node, &id).await;
    remove_pod(&node, &pod.id).await;
    node.stop();
}

/// A process stopped (SIGSTOP) until this is dropped: it keeps its socket and takes
/// connections, but answers nothing.
struct Stopped(Pid);

impl Stopped {
    fn stop(pid: u32) -> Stopped {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The words of a call that waited on `service` until the caller's deadline neared.
fn assert_names_the_service_stuck(node: &Node, error: &tonic::Status, service: &str) {
    assert_eq!(error.code(), Code::DeadlineExceeded, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("{service} service did not answer within "))
            && error
                .message()
                .contains(&node.socket(service).display().to_string()),
        "names {service}: {}",
        error.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_storage_or_network_is_named_before_the_callers_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/stuck", "1", &built).await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let name = format!("{}/tests/stuck:1", registry.address);
    pull(&node, &name).await.expect("pull");
    let pod = trellis_integration::cri::run_pod(&node, pod_config("stuck", false)).await;
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: trellis_integration::cri::image_spec(&name),
        command: vec!["sleep".into(), "60".into()],
        ..Default::default()
    };
    let deadline = Duration::from_secs(4);
    {
        // Nothing restarts a child that stops answering while this runs.
        let _held = SupervisorHeld::hold(&node);

        let _stopped = Stopped::stop(node.info("storage").await.expect("storage").pid);
        let mut request = tonic::Request::new(CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(container.clone()),
            sandbox_config: Some(pod.config.clone()),
        });
        request.set_timeout(deadline);
        let started = Instant::now();
        let error = node
            .runtime()
            .create_container(request)
            .await
            .expect_err("storage is stopped");
        assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
        assert_names_the_service_stuck(&node, &error, "storage");
        let mut request = tonic::Request::new(ImageFsInfoRequest::default());
        request.set_timeout(deadline);
        let error = node
            .images()
            .image_fs_info(request)
            .await
            .expect_err("storage is stopped");
        assert_names_the_service_stuck(&node, &error, "storage");
        drop(_stopped);

        let _stopped = Stopped::stop(node.info("network").await.expect("network").pid);
        let mut request = tonic::Request::new(RunPodSandboxRequest {
            config: Some(pod_config("stuck-network", false)),
            runtime_handler: String::new(),
        });
        request.set_timeout(deadline);
        let started = Instant::now();
        let error = node
            .runtime()
            .run_pod_sandbox(request)
            .await
            .expect_err("network is stopped");
        assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
        assert_names_the_service_stuck(&node, &error, "network");
    }
    // A rollback the stuck services cut short is finished by a runtime's start.
    let runtime = node.info("runtime").await.expect("runtime").pid;
    kill9(runtime);
    node.wait_restarted("runtime", runtime, Duration::from_secs(10))
        .await;

    trellis_integration::cri::start(&node, &pod, container).await;
    let id = run_pod_sandbox(&node, "stuck-network")
        .await
        .expect("a pod once network answers");
    remove_pod(&node, &id).await;
    remove_pod(&node, &pod.id).await;
    node.stop();
}
