//! Pods and containers through a node's CRI socket, for tests: a node with a
//! busybox image pulled, pod and container configs, create/start and ExecSync.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;

use crate::registry::{Registry, busybox_layer, image};
use crate::{Node, NodeOptions};

/// An image spec naming `image`.
pub fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// PullImage through the node's CRI socket; the pulled image's id.
pub async fn pull(node: &Node, image: &str) -> Result<String, tonic::Status> {
    node.images()
        .pull_image(PullImageRequest {
            image: image_spec(image),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

/// [`pull`] in a task of its own, for tests that interrupt it.
pub fn pull_in_background(
    node: &Node,
    image: &str,
) -> tokio::task::JoinHandle<Result<String, tonic::Status>> {
    let mut images = node.images();
    let request = PullImageRequest {
        image: image_spec(image),
        ..Default::default()
    };
    tokio::spawn(async move {
        images
            .pull_image(request)
            .await
            .map(|r| r.into_inner().image_ref)
    })
}

/// A node with a busybox image in a registry of its own.
pub struct BusyboxNode {
    pub node: Node,
    pub image: String,
    pub registry: Registry,
    pub dir: tempfile::TempDir,
}

impl BusyboxNode {
    pub async fn start() -> BusyboxNode {
        Self::start_with(NodeOptions {
            with_cni_config: true,
            ..Default::default()
        })
        .await
    }

    /// [`BusyboxNode::start`] with a node started with `options`.
    pub async fn start_with(options: NodeOptions) -> BusyboxNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::start(dir.path(), None);
        registry
            .push(
                "tests/busybox",
                "1",
                &image(vec![busybox_layer()], &["/bin/sh"], "amd64", false),
            )
            .await;
        let node = Node::start(options).await;
        let image = format!("{}/tests/busybox:1", registry.address);
        pull(&node, &image).await.expect("pull busybox");
        BusyboxNode {
            node,
            image,
            registry,
            dir,
        }
    }

    /// A node started with `options`, with a pod named `pod_name` (a network of its
    /// own) whose container `sleeper` sleeps; returns the pod and the container's id.
    pub async fn with_sleeper(options: NodeOptions, pod_name: &str) -> (BusyboxNode, Pod, String) {
        let busybox = Self::start_with(options).await;
        let pod = run_pod(&busybox.node, pod_config(pod_name, false)).await;
        let sleeper = start(
            &busybox.node,
            &pod,
            busybox.container("sleeper", &["/bin/sleep", "3600"]),
        )
        .await;
        (busybox, pod, sleeper)
    }

    /// A container of the busybox image running `command`.
    pub fn container(&self, name: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            labels: HashMap::from([("container".to_string(), name.to_string())]),
            ..Default::default()
        }
    }
}

/// A pod as created, with the config it was created from.
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
}

/// A host-network pod (so no CNI work), privileged or not.
pub fn host_network_pod(name: &str, privileged: bool) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "tests".into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod with its own network namespace, or the host's.
pub fn pod_config(name: &str, host_network: bool) -> PodSandboxConfig {
    let mut config = host_network_pod(name, false);
    if !host_network
        && let Some(options) = config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .and_then(|s| s.namespace_options.as_mut())
    {
        options.network = NamespaceMode::Pod as i32;
    }
    config
}

pub async fn run_pod(node: &Node, config: PodSandboxConfig) -> Pod {
    let request = RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    };
    let id = node
        .runtime()
        .run_pod_sandbox(request)
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    Pod { id, config }
}

/// RunPodSandbox of `config` under a deadline, as a kubelet sends it: the pod's id,
/// or the status it failed with.
pub async fn try_run_pod(
    node: &Node,
    config: PodSandboxConfig,
    timeout: Duration,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: String::new(),
    });
    request.set_timeout(timeout);
    node.runtime()
        .run_pod_sandbox(request)
        .await
        .map(|r| r.into_inner().pod_sandbox_id)
}

/// RemovePodSandbox of the pod `id`, which must succeed.
pub async fn remove_pod(node: &Node, id: &str) {
    node.runtime()
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .expect("RemovePodSandbox");
}

/// Stops and removes pods (and so their containers), which a node must have done
/// before `Node::stop`.
pub async fn remove_pods(node: &Node, pods: &[&Pod]) {
    for pod in pods {
        node.runtime()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .expect("RemovePodSandbox");
    }
}

pub async fn create(
    node: &Node,
    pod: &Pod,
    config: ContainerConfig,
) -> Result<String, tonic::Status> {
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.id.clone(),
        config: Some(config),
        sandbox_config: Some(pod.config.clone()),
    };
    node.runtime()
        .create_container(request)
        .await
        .map(|r| r.into_inner().container_id)
}

/// Creates and starts a container, which must succeed.
pub async fn start(node: &Node, pod: &Pod, config: ContainerConfig) -> String {
    let id = create(node, pod, config).await.expect("CreateContainer");
    node.runtime()
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
    id
}

/// What a command run in a container printed, and its exit code.
#[derive(Debug)]
pub struct Exec {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

pub async fn exec(node: &Node, container: &str, cmd: &[&str]) -> Exec {
    let request = ExecSyncRequest {
        container_id: container.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 20,
    };
    let out = node
        .runtime()
        .exec_sync(request)
        .await
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
        .into_inner();
    Exec {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.exit_code,
    }
}

/// `sh -c script` in a container.
pub async fn shell(node: &Node, container: &str, script: &str) -> Exec {
    exec(node, container, &["/bin/sh", "-c", script]).await
}

pub async fn container_status(node: &Node, id: &str) -> ContainerStatus {
    let request = ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    };
    node.runtime()
        .container_status(request)
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("status")
}

/// The container's status once it has exited, which it must within `within`.
pub async fn wait_exited(node: &Node, id: &str, within: Duration) -> ContainerStatus {
    let deadline = Instant::now() + within;
    loop {
        let status = container_status(node, id).await;
        if status.state == ContainerState::ContainerExited as i32 {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The image a reference names, if present.
pub async fn image_status(node: &Node, image: &str) -> Option<Image> {
    node.images()
        .image_status(ImageStatusRequest {
            image: image_spec(image),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
}

pub async fn list_images(node: &Node) -> Vec<Image> {
    node.images()
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images
}

pub async fn list_pods(node: &Node) -> Vec<PodSandbox> {
    node.runtime()
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
}

pub async fn list_containers(node: &Node) -> Vec<Container> {
    node.runtime()
        .list_containers(ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
}
