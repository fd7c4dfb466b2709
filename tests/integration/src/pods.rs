//! Pods and containers for the pod tests: a node with a registry holding busybox,
//! pod and container configs, and the CRI calls the tests repeat.

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1::*;

pub use crate::cri::{Pod, run_pod, start};
use crate::registry::{Registry, busybox_layer, image};
use crate::{Node, NodeOptions};

/// A pod labelled `app=<name>`, logging under `log_directory`, on the host's
/// network or its own.
pub fn pod_config(name: &str, log_directory: &str, host_network: bool) -> PodSandboxConfig {
    let mut config = crate::cri::pod_config(name, host_network);
    config.log_directory = log_directory.into();
    config.labels = HashMap::from([("app".to_string(), name.to_string())]);
    config
}

pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

pub async fn setup() -> (tempfile::TempDir, Registry, Node, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &built).await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let name = format!("{}/tests/busybox:1", registry.address);
    node.images()
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull busybox");
    (dir, registry, node, name)
}

/// Creates a container, which must succeed.
pub async fn create(node: &Node, pod: &Pod, config: ContainerConfig) -> String {
    crate::cri::create(node, pod, config)
        .await
        .expect("CreateContainer")
}

pub async fn status(node: &Node, id: &str) -> ContainerStatus {
    crate::cri::container_status(node, id).await
}

pub async fn wait_exited(node: &Node, id: &str) -> ContainerStatus {
    crate::cri::wait_exited(node, id, Duration::from_secs(20)).await
}

/// One pod's whole life (run with a network of its own, stop, remove), every call of
/// which must succeed; returns the sandbox's id.
pub async fn pod_cycle(node: &Node, name: &str) -> String {
    let mut runtime = node.runtime();
    let id = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(crate::cri::pod_config(name, false)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"))
        .into_inner()
        .pod_sandbox_id;
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox {name}: {e}"));
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox {name}: {e}"));
    id
}

/// Runs a pod and checks that its first event is the next one each of `streams`
/// (GetContainerEvents subscriptions) receives, within 10 s; then removes the pod.
pub async fn next_pod_event_reaches(
    node: &Node,
    streams: &mut [tonic::Streaming<ContainerEventResponse>],
) {
    let logs = node.root().join("logs").display().to_string();
    let pod = run_pod(node, pod_config("after", &logs, true)).await;
    for stream in streams.iter_mut() {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .expect("stream")
            .expect("an event");
        assert_eq!(event.container_id, pod.id, "the new pod's event");
    }
    node.runtime()
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove pod");
}
