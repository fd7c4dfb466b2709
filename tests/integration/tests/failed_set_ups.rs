//! Failed set-ups on a real node never stay half-alive: a pod or container whose
//! clean-up cannot finish at once (fail points make the set-up and then the first
//! clean-ups fail) is listed, retried in the background within seconds, removable,
//! and its name is free again once it is gone. And conmon's attach links go with
//! their containers, stale ones swept at start.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::cri::{self, BusyboxNode};
use trellis_integration::{Node, NodeOptions, kill9};

fn run_request(config: &PodSandboxConfig) -> RunPodSandboxRequest {
    RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    }
}

async fn wait_until<F, Fut>(what: &str, within: Duration, node: &Node, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what} not within {within:?}:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn started_with_failpoints() -> NodeOptions {
    NodeOptions {
        with_cni_config: true,
        failpoints: Some(String::new()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_clean_up_fails_is_listed_then_retried_in_the_background() {
    let node = Node::start(started_with_failpoints()).await;
    let config = cri::pod_config("half", false);
    node.set_failpoints("runtime.sandbox.after-network=1*error;runtime.rollback.start=2*error");
    let failed = node
        .runtime()
        .run_pod_sandbox(run_request(&config))
        .await
        .expect_err("the set-up fails");
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    assert!(
        failed
            .message()
            .contains("fail point runtime.sandbox.after-network"),
        "{failed:?}"
    );
    // Its network is still held: the kubelet sees the pod, not ready.
    let pods = cri::list_pods(&node).await;
    assert_eq!(pods.len(), 1, "listed until its clean-up finishes");
    assert_eq!(pods[0].state, PodSandboxState::SandboxNotready as i32);
    let status = node
        .runtime()
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pods[0].id.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(status.state, PodSandboxState::SandboxNotready as i32);
    assert_eq!(
        node.state_leftovers()
            .iter()
            .filter(|l| l.starts_with("netns pin"))
            .count(),
        1,
        "the first clean-up failed"
    );

    let started = Instant::now();
    wait_until(
        "the background clean-up",
        Duration::from_secs(10),
        &node,
        || async { cri::list_pods(&node).await.is_empty() },
    )
    .await;
    println!(
        "a failed pod's clean-up finished {:?} after its set-up failed",
        started.elapsed()
    );
    assert!(
        node.failpoints().is_empty(),
        "both clean-up failures were used"
    );
    assert_eq!(node.state_leftovers(), Vec::<String>::new());
    let id = node
        .runtime()
        .run_pod_sandbox(run_request(&config))
        .await
        .expect("the same pod runs again")
        .into_inner()
        .pod_sandbox_id;
    assert_ne!(id, pods[0].id);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_whose_clean_up_keeps_failing_is_removed_by_the_kubelet() {
    let node = Node::start(started_with_failpoints()).await;
    let config = cri::pod_config("stuck", false);
    node.set_failpoints("runtime.sandbox.after-files=1*error;runtime.rollback.start=error");
    node.runtime()
        .run_pod_sandbox(run_request(&config))
        .await
        .expect_err("the set-up fails");
    let pods = cri::list_pods(&node).await;
    assert_eq!(pods.len(), 1);
    // A kubelet retrying the same pod is told why not yet, not AlreadyExists.
    let again = node
        .runtime()
        .run_pod_sandbox(run_request(&config))
        .await
        .expect_err("the old pod still holds the name");
    assert_ne!(again.code(), tonic::Code::AlreadyExists, "{again:?}");
    assert!(
        again.message().contains(&pods[0].id) && again.message().contains("rolled back"),
        "{again:?}"
    );
    // StopPodSandbox then RemovePodSandbox, as the kubelet does, finish the clean-up.
    let mut runtime = node.runtime();
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pods[0].id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pods[0].id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    assert!(cri::list_pods(&node).await.is_empty());
    assert_eq!(node.state_leftovers(), Vec::<String>::new());
    node.set_failpoints("");
    runtime
        .run_pod_sandbox(run_request(&config))
        .await
        .expect("the same pod runs once the old one is gone");
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_whose_clean_up_fails_is_shown_then_removed_in_the_background() {
    let busybox = BusyboxNode::start_with(started_with_failpoints()).await;
    let node = &busybox.node;
    let pod = cri::run_pod(node, cri::pod_config("web", false)).await;
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.id.clone(),
        config: Some(busybox.container("app", &["/bin/sleep", "1000"])),
        sandbox_config: Some(pod.config.clone()),
    };
    node.set_failpoints("runtime.container.after-create=1*error;runtime.rollback.start=1*error");
    let failed = node
        .runtime()
        .create_container(request.clone())
        .await
        .expect_err("the creation fails");
    assert!(failed.message().contains("fail point"), "{failed:?}");
    let containers = cri::list_containers(node).await;
    assert_eq!(containers.len(), 1, "shown until its clean-up finishes");
    assert_eq!(containers[0].state, ContainerState::ContainerUnknown as i32);
    let status = cri::container_status(node, &containers[0].id).await;
    assert_eq!(status.reason, "CreateContainerError");
    wait_until(
        "the background clean-up",
        Duration::from_secs(10),
        node,
        || async { cri::list_containers(node).await.is_empty() },
    )
    .await;
    let id = cri::create(
        node,
        &pod,
        busybox.container("app", &["/bin/sleep", "1000"]),
    )
    .await
    .expect("the same name is free again");
    assert_ne!(id, containers[0].id);
    cri::remove_pods(node, &[&pod]).await;
    assert_eq!(node.state_leftovers(), Vec::<String>::new());
    busybox.node.stop();
}

/// conmon leaves a link per container in `run/runtime/attach`; the container's
/// removal takes it, and a restart sweeps those of containers no record knows.
#[tokio::test(flavor = "multi_thread")]
async fn attach_links_go_with_their_containers_and_stale_ones_at_start() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let attach = node.root().join("run/runtime/attach");
    let links = || {
        std::fs::read_dir(&attach)
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    let pod = cri::run_pod(node, cri::pod_config("churn", false)).await;
    for round in 0..6 {
        let name = format!("c{round}");
        let id = cri::start(node, &pod, busybox.container(&name, &["/bin/sleep", "100"])).await;
        assert_eq!(links(), 1, "one link per live container");
        let mut runtime = node.runtime();
        runtime
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await
            .expect("StopContainer");
        runtime
            .remove_container(RemoveContainerRequest { container_id: id })
            .await
            .expect("RemoveContainer");
        assert_eq!(
            links(),
            0,
            "round {round}: the link went with its container"
        );
    }
    // A link left by a runtime that died before removing it (or by older versions).
    std::os::unix::fs::symlink("/nonexistent/bundle", attach.join("0".repeat(64)))
        .expect("stale link");
    let pid = node.info("runtime").await.expect("info").pid;
    kill9(pid);
    node.wait_restarted("runtime", pid, Duration::from_secs(10))
        .await;
    assert_eq!(links(), 0, "swept at start");
    cri::remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}
