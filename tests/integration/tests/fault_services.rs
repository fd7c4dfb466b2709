//! The node's own storage or network service down (killed) or stuck (stopped) while
//! a CRI call needs it: the call fails naming that service, never the runtime or the
//! image service it went through, killed at once and stuck before the caller's
//! deadline; and the same calls succeed once the service is back.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;
use trellis_integration::cri::{
    image_spec, pod_config, pull, remove_pod, run_pod, start, try_run_pod,
};
use trellis_integration::registry::{Registry, busybox_layer, image, small_image};
use trellis_integration::{Node, NodeOptions, kill9};

async fn run_pod_sandbox(node: &Node, name: &str) -> Result<String, tonic::Status> {
    try_run_pod(node, pod_config(name, false), Duration::from_secs(60)).await
}

/// A container of `image` that sleeps.
fn sleeper(image: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: image_spec(image),
        command: vec!["sleep".into(), "60".into()],
        ..Default::default()
    }
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

/// A node with CNI whose pulls give up on storage after 2 s, so a stopped storage
/// is named quickly.
fn short_pull_timeout() -> NodeOptions {
    NodeOptions {
        with_cni_config: true,
        env: vec![(
            "TRELLIS_IMAGE_PULL_PROGRESS_TIMEOUT_SECONDS".into(),
            "2".into(),
        )],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_or_network_down_is_named_by_the_calls_that_need_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/down", "1", &built).await;
    let node = Node::start(short_pull_timeout()).await;
    let name = format!("{}/tests/down:1", registry.address);
    let pod = run_pod(&node, pod_config("down", false)).await;
    let container = sleeper(&name);

    // Storage down: a pull (image → storage) and a container (runtime → storage).
    // Its socket is held by `trellis up`, so the calls wait for a storage that does
    // not come back (the supervisor is stopped), and fail before the caller's
    // deadline naming it, as with a stuck one.
    let deadline = Duration::from_secs(4);
    let storage = node.info("storage").await.expect("storage").pid;
    {
        let _held = SupervisorHeld::hold(&node);
        kill9(storage);
        let error = pull(&node, &name).await.expect_err("storage is down");
        assert_names_the_service_stuck(&node, &error, "storage");
        let mut request = tonic::Request::new(CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(container.clone()),
            sandbox_config: Some(pod.config.clone()),
        });
        request.set_timeout(deadline);
        let error = node
            .runtime()
            .create_container(request)
            .await
            .expect_err("storage is down");
        assert_names_the_service_stuck(&node, &error, "storage");
    }
    node.wait_restarted("storage", storage, Duration::from_secs(10))
        .await;

    // Network down: a pod (runtime → network).
    let network = node.info("network").await.expect("network").pid;
    {
        let _held = SupervisorHeld::hold(&node);
        kill9(network);
        let mut request = tonic::Request::new(RunPodSandboxRequest {
            config: Some(pod_config("no-network", false)),
            runtime_handler: String::new(),
        });
        request.set_timeout(deadline);
        let error = node
            .runtime()
            .run_pod_sandbox(request)
            .await
            .expect_err("network is down");
        // A connection the runtime had to the killed process breaks at once
        // (Unavailable); a new one waits in the held socket's backlog (deadline).
        if error.code() == Code::Unavailable {
            assert!(
                error.message().contains(&format!(
                    "network service unavailable: not answering on {}",
                    node.socket("network").display()
                )),
                "names network: {}",
                error.message()
            );
        } else {
            assert_names_the_service_stuck(&node, &error, "network");
        }
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
    start(&node, &pod, container).await;
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
    registry
        .push("tests/stuck", "2", &small_image("stuck"))
        .await;
    let node = Node::start(short_pull_timeout()).await;
    let name = format!("{}/tests/stuck:1", registry.address);
    pull(&node, &name).await.expect("pull");
    let pod = run_pod(&node, pod_config("stuck", false)).await;
    let container = sleeper(&name);
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
        // A pull is bounded by its progress timeout, not by its callers' deadlines.
        let started = Instant::now();
        let error = pull(&node, &format!("{}/tests/stuck:2", registry.address))
            .await
            .expect_err("storage is stopped");
        assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
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

    start(&node, &pod, container).await;
    let id = run_pod_sandbox(&node, "stuck-network")
        .await
        .expect("a pod once network answers");
    remove_pod(&node, &id).await;
    remove_pod(&node, &pod.id).await;
    node.stop();
}
