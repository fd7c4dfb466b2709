//! Container resources through the CRI socket: limits at creation, UpdateContainerResources
//! on a running container, and a container killed for exceeding its memory limit.

use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::cri::{
    BusyboxNode, container_status, create, host_network_pod, remove_pods, run_pod, shell, start,
    wait_exited,
};

const MIB: i64 = 1024 * 1024;

fn limited(mut config: ContainerConfig, memory: i64) -> ContainerConfig {
    config.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: memory,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// The memory limit as the container itself sees it in its cgroup (v1 or v2).
async fn memory_limit_inside(node: &trellis_integration::Node, id: &str) -> i64 {
    let out = shell(node, id, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max").await;
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a memory limit, not {out:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_apply_at_creation_and_change_while_running() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("resize", false)).await;
    let id = start(
        node,
        &pod,
        limited(busybox.container("app", &["sleep", "600"]), 64 * MIB),
    )
    .await;
    assert_eq!(memory_limit_inside(node, &id).await, 64 * MIB);
    let quota = shell(node, &id, "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max").await;
    assert_eq!(quota.stdout.trim(), "50000");

    let mut runtime = node.runtime();
    let resized = LinuxContainerResources {
        memory_limit_in_bytes: 96 * MIB,
        cpu_period: 100_000,
        cpu_quota: 150_000,
        cpu_shares: 256,
        ..Default::default()
    };
    runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(resized),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    assert_eq!(memory_limit_inside(node, &id).await, 96 * MIB);
    let reported = container_status(node, &id)
        .await
        .resources
        .and_then(|r| r.linux)
        .expect("ContainerStatus reports resources");
    assert_eq!(
        (
            reported.memory_limit_in_bytes,
            reported.cpu_quota,
            reported.cpu_shares
        ),
        (96 * MIB, 150_000, 256)
    );

    let negative = LinuxContainerResources {
        memory_limit_in_bytes: -5,
        ..Default::default()
    };
    let error = runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(negative),
            ..Default::default()
        })
        .await
        .expect_err("negative");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("memory_limit_in_bytes"),
        "{}",
        error.message()
    );
    assert_eq!(
        memory_limit_inside(node, &id).await,
        96 * MIB,
        "a refused update changes nothing"
    );

    let error = runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: "0123456789abcdef".into(),
            linux: Some(Default::default()),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(error.code(), Code::NotFound);
    runtime
        .stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .expect("stop");
    let error = runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(Default::default()),
            ..Default::default()
        })
        .await
        .expect_err("exited");
    assert_eq!(error.code(), Code::FailedPrecondition);
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_over_its_memory_limit_is_reported_oom_killed() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("oom", false)).await;
    // dd's one 128 MiB buffer is anonymous memory, and this host has no swap to put it in.
    let hog = busybox.container(
        "hog",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
    );
    let id = create(node, &pod, limited(hog, 32 * MIB))
        .await
        .expect("CreateContainer");
    node.runtime()
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
    let exited = wait_exited(node, &id, Duration::from_secs(30)).await;
    assert_eq!(exited.reason, "OOMKilled", "{exited:?}");
    assert_eq!(exited.exit_code, 137, "{exited:?}");
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}
