//! The CRI gateway, through the kubelet's socket.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::{Node, NodeOptions, ServiceProcess};

fn condition<'a>(status: &'a StatusResponse, kind: &str) -> &'a RuntimeCondition {
    status
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == kind))
        .unwrap_or_else(|| panic!("no {kind} in {status:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn version_and_status_fan_in() {
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let mut runtime = node.runtime();

    let version = runtime
        .version(VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(version.runtime_name, "trellis");
    assert_eq!(version.runtime_api_version, "v1");

    let status = runtime
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    assert!(condition(&status, "RuntimeReady").status, "{status:?}");
    let network = condition(&status, "NetworkReady");
    assert!(network.status, "{network:?}");
    assert!(
        status.info.contains_key("config"),
        "verbose info from the runtime service: {status:?}"
    );

    // No CNI configuration: NetworkReady turns false, with the reason and the directory.
    for conflist in std::fs::read_dir(node.cni_dir()).expect("CNI dir") {
        std::fs::remove_file(conflist.expect("entry").path()).expect("remove conflist");
    }
    let status = runtime
        .status(StatusRequest::default())
        .await
        .expect("Status")
        .into_inner();
    let network = condition(&status, "NetworkReady");
    assert!(!network.status);
    assert_eq!(network.reason, "NoCNIConfiguration");
    assert_eq!(
        network.message,
        format!("no CNI configuration in {}", node.cni_dir().display())
    );
    assert!(
        condition(&status, "RuntimeReady").status,
        "the runtime stays ready"
    );

    // ... and true again as soon as a configuration appears.
    trellis_integration::install_cni_config(&node.cni_dir());
    let status = runtime
        .status(StatusRequest::default())
        .await
        .expect("Status")
        .into_inner();
    assert!(condition(&status, "NetworkReady").status);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn rpcs_not_built_yet_are_unimplemented_by_name() {
    let node = Node::start(NodeOptions::default()).await;
    let error = node
        .runtime()
        .checkpoint_container(CheckpointContainerRequest::default())
        .await
        .expect_err("not built yet");
    assert_eq!(error.code(), tonic::Code::Unimplemented);
    assert!(
        error.message().contains("CheckpointContainer"),
        "{}",
        error.message()
    );
    let error = node
        .runtime()
        .list_metric_descriptors(ListMetricDescriptorsRequest::default())
        .await
        .expect_err("not built yet");
    assert_eq!(error.code(), tonic::Code::Unimplemented);
    assert!(
        error.message().contains("ListMetricDescriptors"),
        "{}",
        error.message()
    );

    // ImageFsInfo is served end to end: gateway → image → storage.
    let info = node
        .images()
        .image_fs_info(ImageFsInfoRequest::default())
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let fs = &info.image_filesystems[0];
    assert!(fs.inodes_used.as_ref().is_some_and(|i| i.value >= 1));
    assert!(!fs.fs_id.as_ref().expect("fs id").mountpoint.is_empty());
    node.stop();
}

/// A gateway whose backends are not there at all: every call, nothing of which was
/// sent, gives up after the retry budget, and nothing outlives the caller's deadline.
#[tokio::test(flavor = "multi_thread")]
async fn backend_down_is_unavailable_after_the_budget_and_deadlines_hold() {
    let root = tempfile::tempdir().expect("tempdir");
    let config = root.path().join("trellis.toml");
    std::fs::write(
        &config,
        format!("[node]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[gateway]\nbackend_retry_ms = 600\n", root.path().display()),
    )
    .expect("config");
    let _gateway = ServiceProcess::spawn(
        "trellis-gateway",
        &["--config", config.to_str().expect("utf-8")],
        &root.path().join("gateway.log"),
    );
    let socket = root.path().join("run/trellis.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Accepting, not only there: the file exists a moment before the listener does.
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(
        trellis_integration::unix_channel(&socket),
    );

    // No socket: nothing of a call was sent, so every call, a write included, is
    // sent again until the budget is spent, then named as not answering.
    let started = Instant::now();
    let error = client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: "0123456789ab".into(),
        })
        .await
        .expect_err("no runtime");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(
        error.message().contains("trellis-runtime") && error.message().contains("runtime.sock"),
        "{}",
        error.message()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "a write never sent is retried for the budget: {waited:?}"
    );
    let started = Instant::now();
    let error = client
        .run_pod_sandbox(RunPodSandboxRequest::default())
        .await
        .expect_err("no runtime");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(
        error.message().contains("runtime.sock"),
        "{}",
        error.message()
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "a creation never sent is retried for the budget: {waited:?}"
    );

    let started = Instant::now();
    let error = client
        .version(VersionRequest::default())
        .await
        .expect_err("no runtime");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
        "a read retries for the budget: {waited:?}"
    );

    let mut request = tonic::Request::new(VersionRequest::default());
    request.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let error = client.version(request).await.expect_err("no runtime");
    assert!(
        matches!(
            error.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "the caller's deadline wins: {:?}",
        started.elapsed()
    );

    // Status still answers, with both conditions false and why.
    let status = client
        .status(StatusRequest::default())
        .await
        .expect("Status answers")
        .into_inner();
    let runtime = condition(&status, "RuntimeReady");
    assert!(!runtime.status);
    assert_eq!(runtime.reason, "RuntimeServiceUnavailable");
    assert_eq!(
        condition(&status, "NetworkReady").reason,
        "NetworkServiceUnavailable"
    );
}
