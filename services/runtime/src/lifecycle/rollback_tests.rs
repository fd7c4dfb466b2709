//! Failed set-ups whose clean-up cannot finish at once (a backend is down): they stay
//! visible and removable, are retried in the background, and free their names.

use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerState as CriState, PodSandboxState};

use super::tests::Node;
use crate::error::RuntimeError;
use crate::store::{ContainerState, SandboxState};

/// A pod whose network set-up fails, and whose network cannot be torn down either.
async fn pod_stuck_rolling_back(node: &Node) -> String {
    node.fakes.network.failures.fail("set_up_pod");
    node.fakes.network.failures.fail("tear_down_pod");
    let failed = node.run_pod("web").await;
    assert!(
        matches!(
            failed,
            Err(RuntimeError::Backend {
                service: "network",
                ..
            })
        ),
        "the set-up's own error is answered: {failed:?}"
    );
    node.fakes.network.failures.heal("set_up_pod");
    let pods = node.runtime().store.sandboxes.all();
    assert_eq!(pods.len(), 1, "the pod is kept until its clean-up finishes");
    assert_eq!(pods[0].state(), SandboxState::RollingBack);
    pods[0].id.clone()
}

#[tokio::test]
async fn a_pod_whose_rollback_cannot_finish_is_visible_and_removable() {
    let node = Node::new();
    let pod = pod_stuck_rolling_back(&node).await;
    let runtime = node.runtime();
    let listed = runtime.list_pod_sandbox(None);
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.as_str(), listed[0].state),
        (pod.as_str(), PodSandboxState::SandboxNotready as i32)
    );
    let status = runtime.pod_sandbox_status(&pod, false).expect("status");
    assert_eq!(
        status.status.expect("status").state,
        PodSandboxState::SandboxNotready as i32
    );
    let in_it = node.create(&pod, "app").await;
    assert!(
        matches!(&in_it, Err(RuntimeError::FailedPrecondition(m)) if m.contains("rolled back")),
        "{in_it:?}"
    );
    // Stopping it (the kubelet does before removing) keeps the clean-up owed.
    let stop = runtime.stop_pod_sandbox(&pod).await;
    assert!(stop.is_err(), "the network is still down: {stop:?}");
    // Removal says why not yet, with the code of what stopped it.
    let removal = runtime.remove_pod_sandbox(&pod).await;
    let Err(error) = removal else {
        panic!("removed although the network is down")
    };
    let message = error.to_string();
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{message}");
    assert!(
        message.contains(&pod) && message.contains("not finished"),
        "{message}"
    );
    assert_eq!(runtime.list_pod_sandbox(None).len(), 1);

    node.fakes.network.failures.heal("tear_down_pod");
    runtime.remove_pod_sandbox(&pod).await.expect("removed");
    assert!(runtime.store.sandboxes.all().is_empty());
    assert!(node.fakes.network.pods().is_empty());
    assert!(!runtime.pod_dir(&pod).exists());
    let events = node.events.taken();
    assert!(
        events.is_empty(),
        "a pod never announced is not announced gone: {events:?}"
    );
    node.run_pod("web").await.expect("the name is free again");
}

#[tokio::test]
async fn a_new_run_of_the_same_pod_finishes_the_old_ones_clean_up_first() {
    let node = Node::new();
    let old = pod_stuck_rolling_back(&node).await;
    let again = node.run_pod("web").await;
    let Err(error) = again else {
        panic!("ran while the old pod holds its network")
    };
    let message = error.to_string();
    assert!(
        matches!(error, RuntimeError::Unfinished { .. }) && message.contains(&old),
        "not AlreadyExists, but why: {message}"
    );
    node.fakes.network.failures.heal("tear_down_pod");
    let new = node
        .run_pod("web")
        .await
        .expect("runs once the old is gone");
    assert_ne!(new, old);
    let runtime = node.runtime();
    assert!(runtime.store.sandboxes.get(&old).is_none());
    assert_eq!(node.fakes.network.pods(), vec![new]);
}

#[tokio::test]
async fn unfinished_rollbacks_are_retried_in_the_background_within_seconds() {
    let node = Node::new();
    node.shared().retry_rollbacks_in_background();
    let pod = pod_stuck_rolling_back(&node).await;
    // Retries fail meanwhile: nothing is lost, the pod stays owed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(node.runtime().store.sandboxes.get(&pod).is_some());
    node.fakes.network.failures.heal("tear_down_pod");
    let deadline = Instant::now() + Duration::from_secs(8);
    while node.runtime().store.sandboxes.get(&pod).is_some() {
        assert!(Instant::now() < deadline, "not retried within seconds");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.fakes.network.pods().is_empty());
    assert!(!node.runtime().pod_dir(&pod).exists());
    node.run_pod("web").await.expect("the name is free");
}

#[tokio::test]
async fn a_container_whose_rollback_cannot_finish_is_shown_and_its_name_freed_later() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    node.create_failing_with_an_unfinished_clean_up(&pod, "app")
        .await;
    node.oci.heal("create");
    let runtime = node.runtime();
    let listed = runtime.list_containers(None).expect("list");
    assert_eq!(listed.len(), 1, "shown until its clean-up finishes");
    let stuck = listed[0].id.clone();
    assert_eq!(listed[0].state, CriState::ContainerUnknown as i32);
    assert_eq!(node.state_of(&stuck), ContainerState::RollingBack);
    let status = runtime.container_status(&stuck, false).expect("status");
    let status = status.status.expect("status");
    assert_eq!(status.reason, "CreateContainerError");
    assert!(status.message.contains("create"), "{}", status.message);
    let stats = runtime.list_container_stats(None).await.expect("stats");
    assert!(stats.is_empty(), "nothing to measure: {stats:?}");
    // Stopping it is fine (nothing runs); a retried creation says why not yet.
    runtime.stop_container(&stuck, 0).await.expect("stop");
    let again = node.create(&pod, "app").await;
    assert!(
        matches!(&again, Err(RuntimeError::Unfinished { .. })),
        "{again:?}"
    );
    node.fakes.storage.failures.heal("release_rootfs");
    let app = node.create(&pod, "app").await.expect("created once freed");
    assert!(runtime.store.containers.get(&stuck).is_none());
    assert!(!node.fakes.storage.mounted().contains(&stuck));
    assert!(!runtime.bundle_dir(&stuck).exists());
    assert_eq!(node.state_of(&app), ContainerState::Created);
}

#[tokio::test]
async fn a_restart_hands_unfinished_clean_ups_to_the_retries_and_still_serves() {
    let mut node = Node::new();
    let half = node.run_pod("half").await.expect("half");
    node.cut_pod_set_up_short(&half);
    // The network service is not back yet when the runtime starts again.
    node.fakes.network.failures.fail("tear_down_pod");
    node.restart().await;
    let runtime = node.runtime();
    assert_eq!(
        runtime.store.sandboxes.get(&half).map(|r| r.state()),
        Some(SandboxState::RollingBack),
        "kept, and shown"
    );
    assert_eq!(runtime.list_pod_sandbox(None).len(), 1);
    assert_eq!(runtime.retry_rollbacks().await, 1, "still owed");
    node.fakes.network.failures.heal("tear_down_pod");
    assert_eq!(runtime.retry_rollbacks().await, 0);
    assert!(runtime.store.sandboxes.all().is_empty());
    assert!(node.fakes.network.pods().is_empty());
    assert!(
        node.oci
            .calls()
            .iter()
            .any(|c| c.starts_with("forget_others")),
        "stale OCI leftovers are swept at start"
    );
}
