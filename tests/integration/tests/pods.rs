//! Pods and containers through the CRI socket, run by runc under conmon: the whole
//! lifecycle, bad input, and a container whose process died before its start.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::pods::*;

#[tokio::test(flavor = "multi_thread")]
async fn host_network_pod_runs_logs_execs_stops_and_is_removed() {
    let (dir, _registry, node, image) = setup().await;
    let logs = dir.path().join("pod-logs");
    let pod = run_pod(
        &node,
        pod_config("hostnet", logs.to_str().expect("utf-8"), true),
    )
    .await;

    let echo = start(
        &node,
        &pod,
        container_config(
            "echo",
            &image,
            &["/bin/sh", "-c", "echo hello from trellis; echo oops >&2"],
        ),
    )
    .await;
    let done = wait_exited(&node, &echo).await;
    assert_eq!((done.exit_code, done.reason.as_str()), (0, "Completed"));
    let log = std::fs::read_to_string(logs.join("echo.log")).expect("container log");
    let stdout_line = log
        .lines()
        .find(|l| l.ends_with("hello from trellis"))
        .unwrap_or_else(|| panic!("no echo line in {log:?}"));
    let fields: Vec<&str> = stdout_line.splitn(4, ' ').collect();
    assert_eq!(
        (fields[1], fields[2]),
        ("stdout", "F"),
        "CRI log format: {stdout_line}"
    );
    assert!(fields[0].contains('T'), "RFC 3339 timestamp: {stdout_line}");
    assert!(log.lines().any(|l| l.contains(" stderr F oops")), "{log}");

    let failing = start(
        &node,
        &pod,
        container_config("three", &image, &["/bin/sh", "-c", "exit 3"]),
    )
    .await;
    let failed = wait_exited(&node, &failing).await;
    assert_eq!((failed.exit_code, failed.reason.as_str()), (3, "Error"));

    let sleeper = start(
        &node,
        &pod,
        container_config(
            "sleeper",
            &image,
            &[
                "/bin/sh",
                "-c",
                "trap '' TERM; while true; do sleep 1; done",
            ],
        ),
    )
    .await;
    let mut runtime = node.runtime();
    let exec = runtime
        .exec_sync(ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "hostname; echo err >&2; exit 7".into(),
            ],
            timeout: 10,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(exec.exit_code, 7);
    assert_eq!(String::from_utf8_lossy(&exec.stderr), "err\n");
    assert!(!exec.stdout.is_empty(), "hostname printed");

    // A host-network pod sees the host's interfaces.
    let interfaces = runtime
        .exec_sync(ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec!["/bin/cat".into(), "/proc/net/dev".into()],
            timeout: 10,
        })
        .await
        .expect("ExecSync cat")
        .into_inner();
    let seen = String::from_utf8_lossy(&interfaces.stdout).into_owned();
    for host_link in std::fs::read_dir("/sys/class/net")
        .expect("host links")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .take(5)
    {
        assert!(
            seen.contains(&format!("{host_link}:")),
            "host interface {host_link} not visible: {seen}"
        );
    }

    // A command that outlives its timeout is killed inside the container too.
    let error = runtime
        .exec_sync(ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec!["/bin/sleep".into(), "4321".into()],
            timeout: 1,
        })
        .await
        .expect_err("timed out");
    assert_eq!(error.code(), Code::DeadlineExceeded);
    let left = runtime
        .exec_sync(ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec![
                "/bin/sh".into(),
                "-c".into(),
                "cat /proc/[0-9]*/stat".into(),
            ],
            timeout: 10,
        })
        .await
        .expect("exec")
        .into_inner();
    let processes = String::from_utf8_lossy(&left.stdout).into_owned();
    assert!(
        !processes.contains(") Z "),
        "the timed-out process is gone, not even a zombie: {processes}"
    );

    let running = runtime
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert_eq!(
        running.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![sleeper.clone()]
    );
    let by_label = runtime
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                label_selector: HashMap::from([("container".into(), "three".into())]),
                ..Default::default()
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .containers;
    assert_eq!(by_label.len(), 1);

    let started = Instant::now();
    runtime
        .stop_container(StopContainerRequest {
            container_id: sleeper.clone(),
            timeout: 1,
        })
        .await
        .expect("StopContainer");
    assert!(
        started.elapsed() >= Duration::from_secs(1) && started.elapsed() < Duration::from_secs(8),
        "SIGKILL after the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(
        status(&node, &sleeper).await.state,
        ContainerState::ContainerExited as i32
    );

    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("StopPodSandbox is idempotent");
    let error = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(container_config("late", &image, &["true"])),
            sandbox_config: None,
        })
        .await
        .expect_err("stopped pod");
    assert_eq!(error.code(), Code::FailedPrecondition);
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    assert!(
        runtime
            .list_containers(ListContainersRequest::default())
            .await
            .expect("list")
            .into_inner()
            .containers
            .is_empty()
    );
    assert!(
        runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .expect("list")
            .into_inner()
            .items
            .is_empty()
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_status() {
    let (dir, _registry, node, image) = setup().await;
    let mut runtime = node.runtime();
    let error = runtime
        .container_status(ContainerStatusRequest {
            container_id: "0123456789ab".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(error.code(), Code::NotFound);
    let error = runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: "feedbeef".into(),
            verbose: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(error.code(), Code::NotFound);
    let error = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("rel", "relative/logs", true)),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("relative log dir");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("relative/logs"),
        "{}",
        error.message()
    );

    let logs = dir.path().join("logs");
    let pod = run_pod(
        &node,
        pod_config("dup", logs.to_str().expect("utf-8"), true),
    )
    .await;
    // The same call again is answered with the same pod (`repeated_calls.rs`);
    // another config under the same name is not.
    let mut other = pod.config.clone();
    other.hostname = "other".into();
    let error = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(other),
            runtime_handler: String::new(),
        })
        .await
        .expect_err("duplicate");
    assert_eq!(error.code(), Code::AlreadyExists);
    assert!(
        error.message().contains(&pod.id),
        "names the existing pod: {}",
        error.message()
    );

    let mut config = container_config("mount", &image, &["true"]);
    config.mounts = vec![Mount {
        container_path: "/data".into(),
        host_path: "/does/not/exist".into(),
        ..Default::default()
    }];
    let error = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: None,
        })
        .await
        .expect_err("missing mount source");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("/does/not/exist"),
        "{}",
        error.message()
    );
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove");
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove is idempotent");
    node.stop();
}

/// StartContainer opens the exec fifo itself; when the created container's process is
/// gone it must not wait for a writer that never comes, and must say so.
#[tokio::test(flavor = "multi_thread")]
async fn starting_a_container_whose_process_died_fails_promptly() {
    let (dir, _registry, node, image) = setup().await;
    let logs = dir.path().join("logs");
    let pod = run_pod(
        &node,
        pod_config("dead-init", logs.to_str().expect("utf-8"), true),
    )
    .await;
    let mut runtime = node.runtime();
    let id = create(
        &node,
        &pod,
        container_config("dead", &image, &["sleep", "60"]),
    )
    .await;
    let state = std::process::Command::new("runc")
        .arg("--root")
        .arg(node.root().join("run/runtime/runc"))
        .args(["state", &id])
        .output()
        .expect("runc state");
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).expect("runc state JSON");
    let pid = state["pid"].as_u64().expect("pid") as u32;
    // conmon, held still, can neither reap the process nor record its exit: the start
    // itself must notice that the process it waits for is gone.
    let conmon_pid_file = node
        .root()
        .join("run/runtime/containers")
        .join(&id)
        .join("conmon.pid");
    let conmon = nix::unistd::Pid::from_raw(
        std::fs::read_to_string(&conmon_pid_file)
            .expect("conmon.pid")
            .trim()
            .parse()
            .expect("a pid"),
    );
    nix::sys::signal::kill(conmon, nix::sys::signal::Signal::SIGSTOP).expect("stop conmon");
    struct Resume(nix::unistd::Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let resume = Resume(conmon);
    trellis_integration::kill9(pid);

    let started = Instant::now();
    let error = runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect_err("its process is gone");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.message().contains("stopped"), "{}", error.message());
    drop(resume);
    assert_eq!(
        wait_exited(&node, &id).await.state,
        ContainerState::ContainerExited as i32
    );
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .expect("remove");
    node.stop();
}
