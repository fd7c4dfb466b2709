//! A burst of pod starts: `runc create` and CNI plugin chains beyond the configured
//! parallelism wait their turn instead of all sharing the cores. The real runc and the
//! real plugins run, behind wrappers that note when each turn starts and ends.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::*;
use trellis_integration::netns::TestNetwork;
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions};

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// The turns noted in `log`: true when no two of them overlapped.
fn turns_taken_one_at_a_time(log: &Path, expected: usize) -> bool {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        expected * 2,
        "every turn started and ended: {text}"
    );
    lines.chunks(2).all(|pair| pair == ["start", "end"])
}

async fn burst_of_pods(node: &Node, image: &str, handler: &str, count: usize) {
    let starts = (0..count).map(|i| {
        let mut runtime = node.runtime();
        let image = image.to_string();
        let handler = handler.to_string();
        async move {
            let name = format!("burst-{i}");
            let config = PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: name.clone(),
                    namespace: "tests".into(),
                    uid: name.clone(),
                    attempt: 0,
                }),
                linux: Some(LinuxPodSandboxConfig {
                    security_context: Some(LinuxSandboxSecurityContext {
                        namespace_options: Some(NamespaceOption {
                            pid: NamespaceMode::Container as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let pod = runtime
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler,
                })
                .await
                .expect("RunPodSandbox")
                .into_inner()
                .pod_sandbox_id;
            let container = ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "work".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image,
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "60".into()],
                ..Default::default()
            };
            let request = CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container),
                sandbox_config: Some(config),
            };
            let id = runtime
                .create_container(request)
                .await
                .expect("CreateContainer")
                .into_inner()
                .container_id;
            runtime
                .start_container(StartContainerRequest { container_id: id })
                .await
                .expect("StartContainer");
            pod
        }
    });
    let pods = futures::future::join_all(starts).await;
    for pod in pods {
        node.runtime()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .expect("RemovePodSandbox");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_and_cni_chains_beyond_the_limit_wait_their_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (runc_log, cni_log) = (dir.path().join("runc-turns"), dir.path().join("cni-turns"));
    let runc_wrapper = dir.path().join("turn-noting-runc");
    write_script(
        &runc_wrapper,
        &format!(
            "case \" $* \" in *\" create \"*) echo start >> {log}; sleep 0.2; echo end >> {log};; esac\nexec runc \"$@\"",
            log = runc_log.display()
        ),
    );
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    // A second portmap (no mappings: it hands the result on) that notes its turns.
    write_script(
        &plugins.join("trellis-test-turns"),
        &format!(
            "if [ \"$CNI_COMMAND\" = ADD ]; then echo start >> {log}; sleep 0.2; echo end >> {log}; fi\nexec /usr/lib/cni/portmap",
            log = cni_log.display()
        ),
    );

    let registry = Registry::start(dir.path(), None);
    registry
        .push(
            "tests/busybox",
            "1",
            &image(vec![busybox_layer()], &["/bin/sh"], "amd64", false),
        )
        .await;
    let env = vec![
        (
            "TRELLIS_RUNTIME_MAX_PARALLEL_CREATES".to_string(),
            "1".to_string(),
        ),
        (
            "TRELLIS_NETWORK_MAX_PARALLEL_CNI".to_string(),
            "1".to_string(),
        ),
        (
            "TRELLIS_RUNTIME_HANDLERS".to_string(),
            format!(
                "{{ noted = {{ binary = {:?} }} }}",
                runc_wrapper.display().to_string()
            ),
        ),
        (
            "TRELLIS_NETWORK_CNI_PLUGIN_DIRS".to_string(),
            format!("{},/usr/lib/cni", plugins.display()),
        ),
    ];
    let node = Node::start(NodeOptions {
        env,
        ..Default::default()
    })
    .await;
    let network = TestNetwork::new(node.root()).with_plugin(serde_json::json!({ "type": "trellis-test-turns", "capabilities": { "portMappings": true } }));
    network.write(&node.cni_dir());
    let busybox = format!("{}/tests/busybox:1", registry.address);
    node.images()
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: busybox.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull");

    tokio::time::timeout(
        Duration::from_secs(60),
        burst_of_pods(&node, &busybox, "noted", 4),
    )
    .await
    .expect("the burst finishes");
    assert!(
        turns_taken_one_at_a_time(&runc_log, 4),
        "runc creates overlapped: {}",
        std::fs::read_to_string(&runc_log).unwrap_or_default()
    );
    assert!(
        turns_taken_one_at_a_time(&cni_log, 4),
        "CNI chains overlapped: {}",
        std::fs::read_to_string(&cni_log).unwrap_or_default()
    );
    node.stop();
}
