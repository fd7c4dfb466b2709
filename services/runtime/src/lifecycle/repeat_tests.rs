//! Repeated RunPodSandbox and CreateContainer: the same call answers the earlier
//! result, another config under the name is AlreadyExists, a failed earlier attempt
//! is replaced by a fresh creation.

use k8s_cri::v1::{LinuxContainerResources, PodSandboxConfig};

use super::tests::{Node, container_config, pod_config};
use crate::error::RuntimeError;
use crate::store::{ContainerState, SandboxState};

/// A pod config with enough labels and annotations that two builds of it hold
/// their maps in different orders.
fn labelled_pod(name: &str) -> PodSandboxConfig {
    let mut config = pod_config(name);
    for i in 0..32 {
        config.labels.insert(format!("label-{i}"), format!("{i}"));
        config
            .annotations
            .insert(format!("annotation-{i}"), format!("{i}"));
    }
    config
}

async fn run(node: &Node, config: PodSandboxConfig) -> Result<String, RuntimeError> {
    node.runtime().run_pod_sandbox(config, String::new()).await
}

#[tokio::test]
async fn a_repeated_run_pod_sandbox_answers_the_pod_it_made() {
    let node = Node::new();
    let pod = run(&node, labelled_pod("web")).await.expect("first");
    node.events.taken();
    for _ in 0..3 {
        let again = run(&node, labelled_pod("web")).await.expect("repeat");
        assert_eq!(again, pod, "the same pod");
    }
    let runtime = node.runtime();
    assert_eq!(runtime.store.sandboxes.all().len(), 1);
    assert_eq!(node.fakes.network.pods(), vec![pod.clone()]);
    assert!(node.events.taken().is_empty(), "a repeat announces nothing");

    let mut other = labelled_pod("web");
    other.labels.insert("label-0".into(), "changed".into());
    let error = run(&node, other).await.expect_err("another config");
    let message = error.to_string();
    assert!(
        matches!(error, RuntimeError::AlreadyExists(_)) && message.contains(&pod),
        "names the holder: {message}"
    );

    // A stopped pod is not what RunPodSandbox answers: the kubelet runs a new attempt.
    runtime.stop_pod_sandbox(&pod).await.expect("stop");
    let stopped = run(&node, labelled_pod("web")).await;
    assert!(
        matches!(&stopped, Err(RuntimeError::AlreadyExists(m)) if m.contains(&pod) && m.contains("NotReady")),
        "{stopped:?}"
    );
    runtime.remove_pod_sandbox(&pod).await.expect("remove");
    let fresh = run(&node, labelled_pod("web")).await.expect("fresh");
    assert_ne!(fresh, pod, "a new pod once the old is removed");
}

#[tokio::test]
async fn a_repeat_while_the_first_run_is_under_way_waits_and_answers_its_pod() {
    let node = Node::new();
    let (first, second) = tokio::join!(
        run(&node, labelled_pod("web")),
        run(&node, labelled_pod("web"))
    );
    let (first, second) = (first.expect("first"), second.expect("second"));
    assert_eq!(first, second);
    assert_eq!(node.runtime().store.sandboxes.all().len(), 1);
    assert_eq!(node.fakes.network.pods(), vec![first]);
}

#[tokio::test]
async fn a_repeat_after_a_failed_run_creates_the_pod_afresh() {
    let node = Node::new();
    node.fakes.network.failures.fail("set_up_pod");
    node.fakes.network.failures.fail("tear_down_pod");
    let failed = run(&node, pod_config("web")).await;
    assert!(failed.is_err(), "{failed:?}");
    let runtime = node.runtime();
    let stuck = runtime.store.sandboxes.all()[0].id.clone();
    assert_eq!(
        runtime.store.sandboxes.get(&stuck).map(|r| r.state()),
        Some(SandboxState::RollingBack)
    );
    node.fakes.network.failures.heal("set_up_pod");
    node.fakes.network.failures.heal("tear_down_pod");
    let pod = run(&node, pod_config("web")).await.expect("fresh");
    assert_ne!(pod, stuck, "the failed attempt is not a result");
    assert!(runtime.store.sandboxes.get(&stuck).is_none());
    assert_eq!(node.fakes.network.pods(), vec![pod]);
}

#[tokio::test]
async fn a_repeat_after_a_restart_answers_the_recorded_pod_and_container() {
    let mut node = Node::new();
    let pod = run(&node, labelled_pod("web")).await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    // Killed after recording both, before answering: the retries come to a new process.
    node.restart().await;
    assert_eq!(
        run(&node, labelled_pod("web")).await.expect("pod again"),
        pod
    );
    assert_eq!(node.create(&pod, "app").await.expect("app again"), app);
    assert_eq!(node.state_of(&app), ContainerState::Created);
}

#[tokio::test]
async fn a_repeated_create_container_answers_the_container_it_made() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let app = node.create(&pod, "app").await.expect("first");
    node.events.taken();
    assert_eq!(node.create(&pod, "app").await.expect("repeat"), app);
    assert!(node.events.taken().is_empty(), "a repeat announces nothing");
    let runtime = node.runtime();
    assert_eq!(runtime.list_containers(None).expect("list").len(), 1);

    // Whatever happened to it since, the creation's result is its id; resources
    // updated since do not make the same call another one.
    runtime.start_container(&app).await.expect("start");
    runtime
        .update_container_resources(
            &app,
            Some(LinuxContainerResources {
                cpu_shares: 512,
                ..Default::default()
            }),
        )
        .await
        .expect("update");
    assert_eq!(node.create(&pod, "app").await.expect("after start"), app);

    let mut other = container_config("app");
    other.envs.push(k8s_cri::v1::KeyValue {
        key: "A".into(),
        value: "1".into(),
    });
    let error = runtime
        .create_container(&pod, other)
        .await
        .expect_err("another config");
    let message = error.to_string();
    assert!(
        matches!(error, RuntimeError::AlreadyExists(_)) && message.contains(&app),
        "names the holder: {message}"
    );
    // Another attempt is another container.
    let mut next = container_config("app");
    next.metadata.get_or_insert_with(Default::default).attempt = 1;
    let second = runtime
        .create_container(&pod, next)
        .await
        .expect("attempt 1");
    assert_ne!(second, app);

    runtime.remove_container(&app).await.expect("remove");
    let fresh = node.create(&pod, "app").await.expect("fresh");
    assert_ne!(fresh, app, "a new container once the old is removed");
}

#[tokio::test]
async fn a_repeat_after_a_failed_creation_creates_the_container_afresh() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    node.create_failing_with_an_unfinished_clean_up(&pod, "app")
        .await;
    let runtime = node.runtime();
    let stuck = runtime.list_containers(None).expect("list")[0].id.clone();
    assert_eq!(node.state_of(&stuck), ContainerState::RollingBack);
    node.oci.heal("create");
    node.fakes.storage.failures.heal("release_rootfs");
    let app = node.create(&pod, "app").await.expect("fresh");
    assert_ne!(app, stuck, "the failed attempt is not a result");
    assert!(runtime.store.containers.get(&stuck).is_none());
    assert_eq!(node.state_of(&app), ContainerState::Created);
}

#[tokio::test]
async fn records_written_before_digests_repeat_pods_but_not_containers() {
    let node = Node::new();
    let pod = run(&node, labelled_pod("web")).await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    let runtime = node.runtime();
    runtime
        .store
        .sandboxes
        .update(&pod, |record| {
            record.config_digest.clear();
            Ok(())
        })
        .expect("as written before");
    runtime
        .store
        .containers
        .update(&app, |record| {
            record.config_digest.clear();
            Ok(())
        })
        .expect("as written before");
    // A pod's config never changes: its digest is computed from the record.
    assert_eq!(run(&node, labelled_pod("web")).await.expect("repeat"), pod);
    // A container's may have (its resources): no repeat can be proven.
    let again = node.create(&pod, "app").await;
    assert!(
        matches!(&again, Err(RuntimeError::AlreadyExists(m)) if m.contains(&app)),
        "{again:?}"
    );
}

/// A runtime killed between `runc start` and recording it: the container runs, its
/// record still says Created. The kubelet's retry of StartContainer finds the start
/// done and records it, instead of failing on the OCI runtime's "already running".
#[tokio::test]
async fn a_start_whose_record_was_lost_is_recorded_when_repeated() {
    use crate::oci::OciRuntime;
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    node.oci
        .start(std::path::Path::new("runc"), &app, 0)
        .await
        .expect("the earlier process's start");
    assert_eq!(node.state_of(&app), ContainerState::Created);
    node.runtime()
        .start_container(&app)
        .await
        .expect("the repeated start");
    assert_eq!(node.state_of(&app), ContainerState::Running);
}
