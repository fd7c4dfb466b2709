//! Pods under churn and crashes: a runtime killed mid-creation loses nothing, and
//! two hundred cycles leave nothing behind.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::pods::*;

#[tokio::test(flavor = "multi_thread")]
async fn runtime_killed_with_containers_running_and_being_created_loses_none() {
    let (dir, _registry, node, image) = setup().await;
    let logs = dir.path().join("logs");
    let pod = run_pod(
        &node,
        pod_config("survivor", logs.to_str().expect("utf-8"), true),
    )
    .await;
    let mut sleepers = Vec::new();
    for i in 0..20 {
        sleepers.push(
            start(
                &node,
                &pod,
                container_config(&format!("sleep{i}"), &image, &["/bin/sleep", "1000"]),
            )
            .await,
        );
    }
    let exits = start(
        &node,
        &pod,
        container_config("exits", &image, &["/bin/sh", "-c", "sleep 1; exit 4"]),
    )
    .await;
    let ticker = start(
        &node,
        &pod,
        container_config(
            "ticker",
            &image,
            &["/bin/sh", "-c", "while true; do echo tick; sleep 0.1; done"],
        ),
    )
    .await;

    // Freeze the runtime so the container exits while it is down, then kill it with
    // five creations in flight.
    let runtime_pid = node.info("runtime").await.expect("info").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runtime_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    let creations: Vec<_> = (0..5)
        .map(|i| {
            let mut runtime = node.runtime();
            let request = CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(container_config(
                    &format!("late{i}"),
                    &image,
                    &["/bin/sleep", "1000"],
                )),
                sandbox_config: None,
            };
            tokio::spawn(async move {
                runtime
                    .create_container(request)
                    .await
                    .map(|r| r.into_inner().container_id)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    trellis_integration::kill9(runtime_pid);
    let mut created = Vec::new();
    for creation in creations {
        if let Ok(Ok(id)) = creation.await {
            created.push(id);
        }
    }
    node.wait_restarted("runtime", runtime_pid, Duration::from_secs(10))
        .await;

    for id in &sleepers {
        assert_eq!(
            status(&node, id).await.state,
            ContainerState::ContainerRunning as i32,
            "{id} still running"
        );
    }
    let exited = status(&node, &exits).await;
    assert_eq!(
        (exited.state, exited.exit_code, exited.reason.as_str()),
        (ContainerState::ContainerExited as i32, 4, "Error"),
        "the exit during the outage is read back"
    );
    let mut runtime = node.runtime();
    let listed = runtime
        .list_containers(ListContainersRequest::default())
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert_eq!(
        listed.len(),
        22 + created.len(),
        "every container accounted for; creations cut short are gone, finished ones kept"
    );
    let bundles = std::fs::read_dir(node.root().join("run/runtime/containers"))
        .expect("bundles")
        .count();
    assert_eq!(bundles, listed.len(), "no bundle without a container");

    // The kubelet rotates a log: rename, then ReopenContainerLog.
    let log = logs.join("ticker.log");
    std::fs::rename(&log, logs.join("ticker.log.1")).expect("rotate");
    runtime
        .reopen_container_log(ReopenContainerLogRequest {
            container_id: ticker.clone(),
        })
        .await
        .expect("ReopenContainerLog");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        std::fs::read_to_string(&log)
            .expect("new log")
            .contains("stdout F tick"),
        "conmon writes to the reopened file"
    );

    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove pod");
    node.stop();
}

/// Container cgroup directories runc made under /trellis, in any hierarchy.
fn trellis_cgroups() -> Vec<String> {
    let mut found = Vec::new();
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        for entry in std::fs::read_dir(hierarchy.path().join("trellis"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            if entry.path().is_dir() {
                found.push(entry.path().display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_cycles_leave_nothing_behind() {
    let (dir, _registry, node, image) = setup().await;
    let logs = dir.path().join("logs");
    let mut runtime = node.runtime();
    let started = Instant::now();
    let mut ids = Vec::new();
    for cycle in 0..200 {
        let pod = run_pod(
            &node,
            pod_config(
                &format!("cycle{cycle}"),
                logs.to_str().expect("utf-8"),
                true,
            ),
        )
        .await;
        let container = start(
            &node,
            &pod,
            container_config("work", &image, &["/bin/sleep", "1000"]),
        )
        .await;
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
            .expect("remove container");
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .expect("stop pod");
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .expect("remove pod");
        ids.push(container);
    }
    eprintln!("200 cycles in {:?}", started.elapsed());
    assert!(
        runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .expect("list")
            .into_inner()
            .items
            .is_empty()
    );
    assert!(
        runtime
            .list_containers(ListContainersRequest::default())
            .await
            .expect("list")
            .into_inner()
            .containers
            .is_empty()
    );
    let runtime_dir = node.root().join("run/runtime");
    for sub in ["pods", "containers", "exits"] {
        let left: Vec<_> = std::fs::read_dir(runtime_dir.join(sub))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {sub}: {left:?}");
    }
    let cgroups: Vec<String> = trellis_cgroups()
        .into_iter()
        .filter(|path| ids.iter().any(|id| path.ends_with(id.as_str())))
        .collect();
    assert!(cgroups.is_empty(), "container cgroups left: {cgroups:?}");
    let storage_left: Vec<_> = std::fs::read_dir(node.root().join("state/storage/containers"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        storage_left.is_empty(),
        "root filesystems left: {storage_left:?}"
    );
    node.stop();
}
