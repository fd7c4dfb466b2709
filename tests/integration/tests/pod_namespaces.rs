//! What the containers of one pod share: its network namespace, and its PID
//! namespace with the pause process.

use k8s_cri::v1::*;
use trellis_integration::pods::*;
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions};

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_with_two_containers_shares_its_network_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let network = trellis_integration::netns::TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let image = format!("{}/tests/busybox:1", registry.address);
    node.images()
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull");

    let logs = dir.path().join("logs");
    let pod = run_pod(
        &node,
        pod_config("twins", logs.to_str().expect("utf-8"), false),
    )
    .await;
    let status = node
        .runtime()
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("status");
    let pod_ip = status.network.expect("pod network").ip;
    assert!(
        network.contains(&pod_ip),
        "{pod_ip} from the configured range"
    );
    let first = start(
        &node,
        &pod,
        container_config("first", &image, &["/bin/sleep", "1000"]),
    )
    .await;
    let second = start(
        &node,
        &pod,
        container_config("second", &image, &["/bin/sleep", "1000"]),
    )
    .await;
    let mut runtime = node.runtime();
    for id in [&first, &second] {
        assert_eq!(
            self::status(&node, id).await.state,
            ContainerState::ContainerRunning as i32
        );
        let out = runtime
            .exec_sync(ExecSyncRequest {
                container_id: id.clone(),
                cmd: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "hostname; cat /proc/net/dev; cat /etc/hosts".into(),
                ],
                timeout: 10,
            })
            .await
            .expect("exec")
            .into_inner();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.starts_with("twins\n"), "the pod's hostname: {text}");
        assert!(text.contains("eth0:"), "the pod's interface: {text}");
        assert!(
            text.contains(&format!("{pod_ip}\ttwins")),
            "/etc/hosts names the pod: {text}"
        );
    }
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("stop");
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove");
    assert!(
        network.allocations().is_empty(),
        "the address is released: {:?}",
        network.allocations()
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_of_a_pod_sharing_one_pid_namespace_see_its_pause_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let busybox = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &busybox).await;
    let pause = image(
        vec![busybox_layer()],
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done # pause",
        ],
        "amd64",
        false,
    );
    registry.push("tests/pause", "1", &pause).await;
    let extra_config = format!(
        "[runtime]\npause_image = \"{}/tests/pause:1\"\n",
        registry.address
    );
    let node = Node::start(NodeOptions {
        extra_config,
        ..Default::default()
    })
    .await;
    let image = format!("{}/tests/busybox:1", registry.address);
    node.images()
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull");

    let mut config = pod_config(
        "sharedpid",
        dir.path().join("logs").to_str().expect("utf-8"),
        true,
    );
    if let Some(options) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        options.pid = NamespaceMode::Pod as i32;
    }
    let pod = run_pod(&node, config).await;
    let first = start(
        &node,
        &pod,
        container_config("first", &image, &["/bin/sleep", "1000"]),
    )
    .await;
    let second = start(
        &node,
        &pod,
        container_config("second", &image, &["/bin/sleep", "1001"]),
    )
    .await;
    let mut runtime = node.runtime();
    let exec = |id: String| {
        let mut runtime = node.runtime();
        async move {
            let out = runtime
                .exec_sync(ExecSyncRequest {
                    container_id: id,
                    cmd: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "cat /proc/1/cmdline; echo; cat /proc/[0-9]*/cmdline".into(),
                    ],
                    timeout: 10,
                })
                .await
                .expect("exec")
                .into_inner();
            String::from_utf8_lossy(&out.stdout).replace('\0', " ")
        }
    };
    for id in [first.clone(), second.clone()] {
        let text = exec(id).await;
        assert!(
            text.lines().next().is_some_and(|l| l.contains("# pause")),
            "PID 1 is the pod's pause process: {text}"
        );
        assert!(
            text.contains("sleep 1000") && text.contains("sleep 1001"),
            "each sees the other's process: {text}"
        );
    }
    let listed = runtime
        .list_containers(ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert_eq!(
        listed.len(),
        2,
        "the pause process is not a container of the kubelet's"
    );
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("stop");
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove");
    node.stop();
}
