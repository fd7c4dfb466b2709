//! Pods and containers through the CRI socket, run by runc under conmon.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions};

struct Pod {
    id: String,
    config: PodSandboxConfig,
}

fn pod_config(name: &str, log_directory: &str, host_network: bool) -> PodSandboxConfig {
    let mode = if host_network {
        NamespaceMode::Node
    } else {
        NamespaceMode::Pod
    };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "tests".into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_directory.into(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: mode as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        ..Default::default()
    }
}

async fn setup() -> (tempfile::TempDir, Registry, Node, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/busybox", "1", &built).await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let name = format!("{}/tests/busybox:1", registry.address);
    node.images()
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull busybox");
    (dir, registry, node, name)
}

async fn run_pod(node: &Node, config: PodSandboxConfig) -> Pod {
    let id = node
        .runtime()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    Pod { id, config }
}

async fn create(node: &Node, pod: &Pod, config: ContainerConfig) -> String {
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.id.clone(),
        config: Some(config),
        sandbox_config: Some(pod.config.clone()),
    };
    node.runtime()
        .create_container(request)
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id
}

async fn start(node: &Node, pod: &Pod, config: ContainerConfig) -> String {
    let id = create(node, pod, config).await;
    node.runtime()
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
    id
}

async fn status(node: &Node, id: &str) -> ContainerStatus {
    trellis_integration::cri::container_status(node, id).await
}

async fn wait_exited(node: &Node, id: &str) -> ContainerStatus {
    trellis_integration::cri::wait_exited(node, id, Duration::from_secs(20)).await
}

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
    let error = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.config.clone()),
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
