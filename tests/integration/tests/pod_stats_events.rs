//! Stats (memory and CPU, pods summing their containers) and container events.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::pods::*;

#[tokio::test(flavor = "multi_thread")]
async fn stats_show_memory_and_cpu_and_pods_sum_their_containers() {
    let (dir, _registry, node, image) = setup().await;
    let logs = dir.path().join("logs");
    let pod = run_pod(
        &node,
        pod_config("stats", logs.to_str().expect("utf-8"), true),
    )
    .await;
    // tmpfs pages are charged to the writer's memory cgroup and are not reclaimable
    // file cache, so they count in the working set; dd writes them at kernel speed.
    let hog = start(
        &node,
        &pod,
        container_config(
            "hog",
            &image,
            &[
                "/bin/sh",
                "-c",
                "dd if=/dev/zero of=/dev/shm/fill bs=1M count=50; sleep 1000",
            ],
        ),
    )
    .await;
    let mut runtime = node.runtime();
    let stats_of = |id: String| {
        let mut runtime = node.runtime();
        async move {
            runtime
                .container_stats(ContainerStatsRequest { container_id: id })
                .await
                .expect("ContainerStats")
                .into_inner()
                .stats
                .expect("stats")
        }
    };
    let value = |v: &Option<UInt64Value>| v.as_ref().map_or(0, |v| v.value);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let memory = stats_of(hog.clone()).await.memory.expect("memory");
        if value(&memory.working_set_bytes) >= 50 * 1024 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "working set never reached 50 MiB: {memory:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spin = start(
        &node,
        &pod,
        container_config("spin", &image, &["/bin/sh", "-c", "while true; do :; done"]),
    )
    .await;
    let before = value(
        &stats_of(spin.clone())
            .await
            .cpu
            .expect("cpu")
            .usage_core_nano_seconds,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = stats_of(spin.clone()).await;
    let cpu = after.cpu.expect("cpu");
    assert!(
        value(&cpu.usage_core_nano_seconds) > before + 100_000_000,
        "a spinning container uses CPU: {before} → {cpu:?}"
    );
    assert!(
        value(&cpu.usage_nano_cores) > 100_000_000,
        "a rate of at least a tenth of a core: {cpu:?}"
    );
    assert!(after.writable_layer.is_some(), "writable layer reported");

    let pod_stats = runtime
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .expect("stats");
    let linux = pod_stats.linux.expect("linux");
    assert_eq!(linux.containers.len(), 2);
    let summed: u64 = linux
        .containers
        .iter()
        .map(|c| value(&c.memory.as_ref().expect("memory").working_set_bytes))
        .sum();
    assert_eq!(
        value(&linux.memory.expect("memory").working_set_bytes),
        summed,
        "pod memory is the sum of its containers'"
    );
    let listed = runtime
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod.id.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 2);
    let layer = listed[0].writable_layer.as_ref().expect("writable layer");
    assert!(
        layer
            .fs_id
            .as_ref()
            .is_some_and(|fs| !fs.mountpoint.is_empty()),
        "the layer's filesystem is named: {layer:?}"
    );
    let all_pods = runtime
        .list_pod_sandbox_stats(ListPodSandboxStatsRequest::default())
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    let listed_pod = all_pods
        .iter()
        .find(|p| p.attributes.as_ref().is_some_and(|a| a.id == pod.id))
        .expect("our pod listed");
    assert_eq!(
        listed_pod.linux.as_ref().expect("linux").containers.len(),
        2,
        "each pod lists its own containers"
    );
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove");
    node.stop();
}

async fn next_events(
    stream: &mut tonic::Streaming<ContainerEventResponse>,
    count: usize,
) -> Vec<ContainerEventResponse> {
    let mut events = Vec::new();
    while events.len() < count {
        match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            other => panic!("event stream ended or stalled after {events:?}: {other:?}"),
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn container_events_reach_every_subscriber_in_order() {
    let (dir, _registry, node, image) = setup().await;
    let mut runtime = node.runtime();
    let mut first = runtime
        .get_container_events(GetEventsRequest {})
        .await
        .expect("subscribe")
        .into_inner();
    let mut second = node
        .runtime()
        .get_container_events(GetEventsRequest {})
        .await
        .expect("subscribe")
        .into_inner();

    let pod = run_pod(
        &node,
        pod_config(
            "events",
            dir.path().join("logs").to_str().expect("utf-8"),
            true,
        ),
    )
    .await;
    let container = start(
        &node,
        &pod,
        container_config("once", &image, &["/bin/sleep", "1000"]),
    )
    .await;
    use ContainerEventType::*;
    let expected = [
        (pod.id.clone(), ContainerCreatedEvent),
        (pod.id.clone(), ContainerStartedEvent),
        (container.clone(), ContainerCreatedEvent),
        (container.clone(), ContainerStartedEvent),
        (container.clone(), ContainerStoppedEvent),
        (container.clone(), ContainerDeletedEvent),
        (pod.id.clone(), ContainerStoppedEvent),
        (pod.id.clone(), ContainerDeletedEvent),
    ];
    let seen = |events: &[ContainerEventResponse]| {
        events
            .iter()
            .map(|e| (e.container_id.clone(), e.container_event_type()))
            .collect::<Vec<_>>()
    };
    // Statuses are read when an event is delivered: take the first four while the
    // container still runs.
    for stream in [&mut first, &mut second] {
        let events = next_events(stream, 4).await;
        assert_eq!(
            seen(&events),
            expected[..4].to_vec(),
            "every event, in order"
        );
        let started = &events[3];
        assert_eq!(
            started.pod_sandbox_status.as_ref().map(|s| s.id.clone()),
            Some(pod.id.clone()),
            "with the pod's status"
        );
        assert!(
            started
                .containers_statuses
                .iter()
                .any(|s| s.id == container),
            "and its containers' statuses"
        );
    }
    runtime
        .stop_container(StopContainerRequest {
            container_id: container.clone(),
            timeout: 0,
        })
        .await
        .expect("stop");
    runtime
        .remove_container(RemoveContainerRequest {
            container_id: container.clone(),
        })
        .await
        .expect("remove");
    for stream in [&mut first, &mut second] {
        assert_eq!(
            seen(&next_events(stream, 2).await),
            expected[4..6].to_vec(),
            "every event, in order"
        );
    }
    let mut late = node
        .runtime()
        .get_container_events(GetEventsRequest {})
        .await
        .expect("subscribe late")
        .into_inner();
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
    for stream in [&mut first, &mut second] {
        assert_eq!(
            seen(&next_events(stream, 2).await),
            expected[6..].to_vec(),
            "every event, in order"
        );
    }
    let after = next_events(&mut late, 2).await;
    assert_eq!(
        seen(&after),
        expected[6..].to_vec(),
        "a later subscriber gets only what follows"
    );
    node.stop();
}
