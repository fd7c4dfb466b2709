//! kill -9 of each service at each step of RunPodSandbox, CreateContainer and
//! PullImage, through fail points (`1*kill`: a real SIGKILL of the service at that
//! point, once). For each step: the supervisor restarts the service; the call
//! succeeds, either at once (the killed service is the gateway's own backend, which
//! repeats these calls when the backend went away under them: the backend answers a
//! repeat with the earlier result) or retried as a kubelet would after the
//! service behind the backend answered the failure; and once everything is
//! removed, nothing is left:
//! no mount, netns, IP allocation, NAT rule, cgroup, conmon, runc state, attach
//! link, root filesystem, layer or record. The retried calls that failed are
//! counted and printed (the goal: none).
//!
//! One node per kind of call, its cases in a table, so the file runs in about a
//! minute: a service killed again within 10 s is restarted after a growing backoff.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::cri::{self, image_spec};
use trellis_integration::faults::{
    assert_nothing_left, cgroup_dirs, cgroup_leftovers, fired_and_restarted, records_left,
    remove_cgroup_parent,
};
use trellis_integration::netns::random_hex;
use trellis_integration::registry::{
    Compression, Entry, Registry, busybox_layer, image, layer, small_image,
};
use trellis_integration::{Node, NodeOptions};

/// How often a retried call is tried before the case fails.
const ATTEMPTS: u32 = 8;
const BETWEEN_ATTEMPTS: Duration = Duration::from_millis(500);

/// Arms `point` to kill its service once (after the fail points in `also`);
/// answers the service's pid before.
async fn arm_kill(node: &Node, point: &str, service: &str, also: &str) -> u32 {
    let pid = node.info(service).await.expect("service info").pid;
    node.set_failpoints(&format!("{also};{point}=1*kill"));
    pid
}

/// `call`, retried as a kubelet would until it succeeds; each failure is counted.
async fn retried<T, F, Fut>(what: &str, failed: &mut u32, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    for attempt in 1..=ATTEMPTS {
        match call().await {
            Ok(value) => return value,
            Err(status) => {
                *failed += 1;
                eprintln!("{what}: retried call {attempt} failed: {status:?}");
                assert!(attempt < ATTEMPTS, "{what}: never succeeded: {status:?}");
                tokio::time::sleep(BETWEEN_ATTEMPTS).await;
            }
        }
    }
    unreachable!("the last attempt returns or fails the test")
}

fn run_request(config: &PodSandboxConfig) -> RunPodSandboxRequest {
    RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    }
}

/// A pod on its own network, in the node's own cgroup parent; with `shared_pid`, a
/// pause process holds the PID namespace its containers share.
fn pod(name: &str, cgroup_parent: &str, shared_pid: bool) -> PodSandboxConfig {
    let mut config = cri::pod_config(name, false);
    if let Some(linux) = config.linux.as_mut() {
        linux.cgroup_parent = cgroup_parent.to_string();
        if shared_pid
            && let Some(options) = linux
                .security_context
                .as_mut()
                .and_then(|s| s.namespace_options.as_mut())
        {
            options.pid = NamespaceMode::Pod as i32;
        }
    }
    config
}

/// Removes the pod, then checks that the node holds nothing of it any more.
async fn remove_and_check(node: &Node, case: &str, pod_id: &str, cgroup_parent: &str) {
    node.runtime()
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("{case}: RemovePodSandbox: {e}"));
    assert!(cri::list_pods(node).await.is_empty(), "{case}: pods left");
    assert!(
        cri::list_containers(node).await.is_empty(),
        "{case}: containers left"
    );
    assert_nothing_left(node, case, cgroup_leftovers(cgroup_parent));
}

/// Tables that must be empty once every pod is removed (the images stay).
const POD_TABLES: [(&str, &str); 5] = [
    ("runtime", "sandboxes"),
    ("runtime", "containers"),
    ("network", "pods"),
    ("network", "in_flight"),
    ("storage", "rootfs"),
];

/// Tables that must be empty once every image is removed.
const PULL_TABLES: [(&str, &str); 4] = [
    ("storage", "layers"),
    ("storage", "images"),
    ("storage", "image-references"),
    ("storage", "rootfs"),
];

/// One kill during RunPodSandbox.
struct PodCase {
    point: &'static str,
    service: &'static str,
    /// The pod shares a PID namespace, so has a pause process.
    shared_pid: bool,
    /// Fail points armed with the kill (to kill a clean-up, fail the set-up first).
    also: &'static str,
    /// The pause image is removed first, so the call pulls it.
    pulls_pause: bool,
}

const fn kill(point: &'static str, service: &'static str, shared_pid: bool) -> PodCase {
    PodCase {
        point,
        service,
        shared_pid,
        also: "",
        pulls_pause: false,
    }
}

const POD_CASES: [PodCase; 11] = [
    kill("runtime.sandbox.before-network", "runtime", false),
    kill("network.setup.after-netns", "network", false),
    kill("runtime.sandbox.after-network", "runtime", false),
    kill("network.setup.after-add", "network", false),
    kill("runtime.sandbox.after-files", "runtime", false),
    kill("storage.rootfs.after-mount", "storage", true),
    kill("runtime.sandbox.after-pause", "runtime", true),
    kill("runtime.sandbox.before-record", "runtime", true),
    // The runtime killed while it rolls a failed set-up back.
    PodCase {
        also: "runtime.sandbox.after-files=1*error",
        ..kill("runtime.rollback.start", "runtime", false)
    },
    // The image service killed while the pod's start pulls the pause image.
    PodCase {
        pulls_pause: true,
        ..kill("image.pull.after-layer", "image", true)
    },
    PodCase {
        pulls_pause: true,
        ..kill("storage.image.before-record", "storage", true)
    },
];

const CONTAINER_CASES: [(&str, &str); 5] = [
    ("runtime.container.after-rootfs", "runtime"),
    ("storage.rootfs.after-mount", "storage"),
    ("runtime.container.after-bundle", "runtime"),
    ("runtime.container.after-create", "runtime"),
    ("runtime.container.before-record", "runtime"),
];

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_every_step_of_pod_and_container_set_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let busybox = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &busybox).await;
    // A layer of its own, so that pulling it again imports a layer.
    let pause = image(
        vec![
            busybox_layer(),
            layer(
                &[Entry::File("pause", b"pause".to_vec())],
                Compression::Gzip,
            ),
        ],
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done",
        ],
        "amd64",
        false,
    );
    registry.push("tests/pause", "1", &pause).await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        extra_config: format!(
            "[runtime]\npause_image = \"{}/tests/pause:1\"\n",
            registry.address
        ),
        failpoints: Some(String::new()),
        ..Default::default()
    })
    .await;
    let busybox = format!("{}/tests/busybox:1", registry.address);
    cri::pull(&node, &busybox).await.expect("pull busybox");
    // Pulled before: only the cases that remove it pull it under a kill.
    let pause_image = format!("{}/tests/pause:1", registry.address);
    cri::pull(&node, &pause_image).await.expect("pull pause");
    let cgroup_parent = format!("/trellis-it-{}", random_hex(8));
    let mut failed = 0u32;

    for (i, step) in POD_CASES.iter().enumerate() {
        let (point, service) = (step.point, step.service);
        let case = format!("RunPodSandbox, {service} killed at {point}");
        let config = pod(&format!("kill-pod-{i}"), &cgroup_parent, step.shared_pid);
        if step.pulls_pause {
            node.images()
                .remove_image(RemoveImageRequest {
                    image: image_spec(&pause_image),
                })
                .await
                .unwrap_or_else(|e| panic!("{case}: RemoveImage: {e}"));
        }
        let old_pid = arm_kill(&node, point, service, step.also).await;
        let first = node.runtime().run_pod_sandbox(run_request(&config)).await;
        fired_and_restarted(&node, point, service, old_pid).await;
        let id = match first {
            Ok(answer) => answer.into_inner().pod_sandbox_id,
            Err(status) => {
                eprintln!("{case}: the first call failed: {status:?}");
                retried(&case, &mut failed, || {
                    let mut client = node.runtime();
                    let request = run_request(&config);
                    async move { client.run_pod_sandbox(request).await }
                })
                .await
                .into_inner()
                .pod_sandbox_id
            }
        };
        let pods = cri::list_pods(&node).await;
        assert_eq!(pods.len(), 1, "{case}: the failed pod is gone: {pods:?}");
        assert_eq!(
            (pods[0].id.as_str(), pods[0].state),
            (id.as_str(), PodSandboxState::SandboxReady as i32),
            "{case}"
        );
        remove_and_check(&node, &case, &id, &cgroup_parent).await;
    }

    for (i, (point, service)) in CONTAINER_CASES.into_iter().enumerate() {
        let case = format!("CreateContainer, {service} killed at {point}");
        let config = pod(&format!("kill-ctr-{i}"), &cgroup_parent, false);
        let pod = cri::run_pod(&node, config).await;
        let container = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: image_spec(&busybox),
            command: vec!["/bin/sleep".into(), "1000".into()],
            ..Default::default()
        };
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(container),
            sandbox_config: Some(pod.config.clone()),
        };
        let old_pid = arm_kill(&node, point, service, "").await;
        let first = node.runtime().create_container(request.clone()).await;
        fired_and_restarted(&node, point, service, old_pid).await;
        let id = match first {
            Ok(answer) => answer.into_inner().container_id,
            Err(status) => {
                eprintln!("{case}: the first call failed: {status:?}");
                retried(&case, &mut failed, || {
                    let mut client = node.runtime();
                    let request = request.clone();
                    async move { client.create_container(request).await }
                })
                .await
                .into_inner()
                .container_id
            }
        };
        node.runtime()
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{case}: StartContainer: {e}"));
        let containers = cri::list_containers(&node).await;
        assert_eq!(
            containers.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            [id.as_str()],
            "{case}: the failed container is gone"
        );
        remove_and_check(&node, &case, &pod.id, &cgroup_parent).await;
    }

    assert!(
        !cgroup_dirs(&cgroup_parent).is_empty(),
        "the containers' cgroups were under {cgroup_parent}, where leftovers were looked for"
    );
    println!("kill -9 during RunPodSandbox and CreateContainer: {failed} retried calls failed");
    let records = node.stop_and_inspect(|root| records_left(root, &POD_TABLES));
    remove_cgroup_parent(&cgroup_parent);
    assert!(records.is_empty(), "records left: {records:?}");
    assert_eq!(failed, 0, "retried calls failed (see above)");
}

const PULL_CASES: [(&str, &str, &str); 5] = [
    ("image.pull.after-layer", "image", "kill-pull-0"),
    ("storage.layer.after-unpack", "storage", "kill-pull-1"),
    ("storage.layer.before-record", "storage", "kill-pull-2"),
    ("image.pull.before-record", "image", "kill-pull-3"),
    ("storage.image.before-record", "storage", "kill-pull-4"),
];

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_every_step_of_a_pull() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let node = Node::start(NodeOptions {
        failpoints: Some(String::new()),
        ..Default::default()
    })
    .await;
    let mut failed = 0u32;
    for (point, service, marker) in PULL_CASES {
        let case = format!("PullImage, {service} killed at {point}");
        let repository = format!("tests/{marker}");
        registry.push(&repository, "1", &small_image(marker)).await;
        let name = format!("{}/{repository}:1", registry.address);
        let old_pid = arm_kill(&node, point, service, "").await;
        let first = cri::pull(&node, &name).await;
        fired_and_restarted(&node, point, service, old_pid).await;
        let id = match first {
            Ok(id) => id,
            Err(status) => {
                eprintln!("{case}: the first call failed: {status:?}");
                retried(&case, &mut failed, || cri::pull(&node, &name)).await
            }
        };
        let listed: Vec<String> = cri::list_images(&node)
            .await
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(listed, [id], "{case}");
        node.images()
            .remove_image(RemoveImageRequest {
                image: image_spec(&name),
            })
            .await
            .unwrap_or_else(|e| panic!("{case}: RemoveImage: {e}"));
        assert!(cri::list_images(&node).await.is_empty(), "{case}");
        // Layers of the killed attempt that no image uses are pruned in the background.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.layer_dirs().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{case}: layers left: {:?}\n{}",
                node.layer_dirs(),
                node.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("kill -9 during PullImage: {failed} retried calls failed");
    let records = node.stop_and_inspect(|root| records_left(root, &PULL_TABLES));
    assert!(records.is_empty(), "records left: {records:?}");
    assert_eq!(failed, 0, "retried calls failed (see above)");
}
