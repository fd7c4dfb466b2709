//! RunPodSandbox, CreateContainer and PullImage are safe to repeat. The runtime is
//! killed (a real SIGKILL, fail points `runtime.sandbox.after-record` and
//! `runtime.container.after-record`) after it completed the call and recorded it,
//! before answering: a kubelet talking to the runtime's socket sees the call fail,
//! and its retry is answered with the same pod or container, not AlreadyExists;
//! through the gateway, which repeats these calls when its backend went away under
//! them, the first call itself succeeds. A repeated pull answers the same image
//! without downloading it again. Nothing is left once the pods are removed.

use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;
use trellis_integration::cri::{self, image_spec};
use trellis_integration::faults::{assert_nothing_left, fired_and_restarted, records_left};
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions, unix_channel};

/// The runtime service's own socket: a client with no gateway to repeat for it.
fn runtime_direct(node: &Node) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(unix_channel(&node.socket("runtime")))
}

/// Arms `point` to kill the runtime once; answers its pid before.
async fn arm_kill(node: &Node, point: &str) -> u32 {
    let pid = node.info("runtime").await.expect("runtime info").pid;
    node.set_failpoints(&format!("{point}=1*kill"));
    pid
}

/// A call as a kubelet retries it once the runtime is back: until it is answered.
async fn until_answered<T, F, Fut>(what: &str, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: never answered: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

fn run_request(config: &PodSandboxConfig) -> RunPodSandboxRequest {
    RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    }
}

fn create_request(pod: &str, image: &str) -> CreateContainerRequest {
    CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: image_spec(image),
            command: vec!["/bin/sleep".into(), "1000".into()],
            ..Default::default()
        }),
        sandbox_config: None,
    }
}

/// One pod, Ready, with the id answered; one container, Created, likewise.
async fn one_pod_and_container(node: &Node, case: &str, pod: &str, container: &str) {
    let listed = cri::list_pods(node).await;
    assert_eq!(
        listed
            .iter()
            .map(|p| (p.id.as_str(), p.state))
            .collect::<Vec<_>>(),
        [(pod, PodSandboxState::SandboxReady as i32)],
        "{case}"
    );
    let listed = cri::list_containers(node).await;
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.id.as_str(), c.state))
            .collect::<Vec<_>>(),
        [(container, ContainerState::ContainerCreated as i32)],
        "{case}"
    );
}

async fn remove_and_check(node: &Node, case: &str, pod: &str) {
    cri::remove_pod(node, pod).await;
    assert!(cri::list_pods(node).await.is_empty(), "{case}: pods left");
    assert_nothing_left(node, case, Vec::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_creation_whose_answer_a_kill_lost_is_answered_again_when_repeated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &built).await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        failpoints: Some(String::new()),
        ..Default::default()
    })
    .await;
    let busybox = format!("{}/tests/busybox:1", registry.address);
    let id = cri::pull(&node, &busybox).await.expect("pull");

    // PullImage repeated: the same image, nothing downloaded again.
    assert_eq!(cri::pull(&node, &busybox).await.expect("pull again"), id);
    for layer in &built.layers {
        assert_eq!(
            registry.blob_downloads(&layer.digest()),
            1,
            "layer fetched once"
        );
    }

    // A client of the runtime's own socket (no gateway to repeat for it).
    let case = "kubelet's retry after a kill before the answer";
    let config = cri::pod_config("repeat-direct", false);
    let point = "runtime.sandbox.after-record";
    let old_pid = arm_kill(&node, point).await;
    let first = runtime_direct(&node)
        .run_pod_sandbox(run_request(&config))
        .await;
    assert!(
        first.is_err(),
        "{case}: answered through the kill: {first:?}"
    );
    fired_and_restarted(&node, point, "runtime", old_pid).await;
    let pod = until_answered(case, || {
        let mut client = runtime_direct(&node);
        let request = run_request(&config);
        async move { client.run_pod_sandbox(request).await }
    })
    .await
    .unwrap_or_else(|status| panic!("{case}: RunPodSandbox retried: {status:?}"))
    .into_inner()
    .pod_sandbox_id;
    assert_eq!(cri::list_pods(&node).await.len(), 1, "{case}: one pod");

    let point = "runtime.container.after-record";
    let old_pid = arm_kill(&node, point).await;
    let first = runtime_direct(&node)
        .create_container(create_request(&pod, &busybox))
        .await;
    assert!(
        first.is_err(),
        "{case}: answered through the kill: {first:?}"
    );
    fired_and_restarted(&node, point, "runtime", old_pid).await;
    let container = until_answered(case, || {
        let mut client = runtime_direct(&node);
        let request = create_request(&pod, &busybox);
        async move { client.create_container(request).await }
    })
    .await
    .unwrap_or_else(|status| panic!("{case}: CreateContainer retried: {status:?}"))
    .into_inner()
    .container_id;
    one_pod_and_container(&node, case, &pod, &container).await;
    // The container answered is the one made, and works.
    node.runtime()
        .start_container(StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .unwrap_or_else(|status| panic!("{case}: StartContainer: {status:?}"));

    // Another config under the pod's name is still AlreadyExists, naming it.
    let mut other = config.clone();
    other.hostname = "other".into();
    let error = node
        .runtime()
        .run_pod_sandbox(run_request(&other))
        .await
        .expect_err("another config");
    assert_eq!(error.code(), tonic::Code::AlreadyExists, "{error:?}");
    assert!(error.message().contains(&pod), "{}", error.message());
    remove_and_check(&node, case, &pod).await;

    // Through the gateway: it repeats the call itself, the first call succeeds.
    let case = "through the gateway, a kill before the answer";
    let config = cri::pod_config("repeat-gateway", false);
    let point = "runtime.sandbox.after-record";
    let old_pid = arm_kill(&node, point).await;
    let pod = node
        .runtime()
        .run_pod_sandbox(run_request(&config))
        .await
        .unwrap_or_else(|status| panic!("{case}: RunPodSandbox: {status:?}"))
        .into_inner()
        .pod_sandbox_id;
    fired_and_restarted(&node, point, "runtime", old_pid).await;
    let point = "runtime.container.after-record";
    let old_pid = arm_kill(&node, point).await;
    let container = node
        .runtime()
        .create_container(create_request(&pod, &busybox))
        .await
        .unwrap_or_else(|status| panic!("{case}: CreateContainer: {status:?}"))
        .into_inner()
        .container_id;
    fired_and_restarted(&node, point, "runtime", old_pid).await;
    one_pod_and_container(&node, case, &pod, &container).await;
    remove_and_check(&node, case, &pod).await;

    let records = node.stop_and_inspect(|root| {
        records_left(
            root,
            &[
                ("runtime", "sandboxes"),
                ("runtime", "containers"),
                ("network", "pods"),
                ("storage", "rootfs"),
            ],
        )
    });
    assert!(records.is_empty(), "records left: {records:?}");
}
