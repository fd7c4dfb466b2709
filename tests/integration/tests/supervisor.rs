//! `trellis up` and `trellis status`: the node supervisor.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::{Node, NodeOptions, SERVICES, kill9, leftovers};

/// kill -9 the runtime: the supervisor restarts it, and a Status sent right after
/// the kill is answered RuntimeReady (the gateway waited) well within 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn killed_runtime_is_restarted_and_the_gateway_waits_for_it() {
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let mut runtime = node.runtime();
    for _ in 0..3 {
        let old = node.info("runtime").await.expect("runtime info").pid;
        kill9(old);
        let started = Instant::now();
        let mut request = tonic::Request::new(StatusRequest::default());
        request.set_timeout(Duration::from_secs(5));
        let status = runtime
            .status(request)
            .await
            .expect("Status during the restart")
            .into_inner();
        let elapsed = started.elapsed();
        let ready = status
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == "RuntimeReady"))
            .expect("RuntimeReady");
        assert!(ready.status, "{ready:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        let new = node
            .wait_restarted("runtime", old, Duration::from_secs(5))
            .await;
        assert_ne!(new, old);
    }
    assert!(
        node.log().contains("killed by SIGKILL"),
        "the supervisor logs why a child died"
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn status_command_shows_every_service() {
    let node = Node::start(NodeOptions::default()).await;
    node.wait_bus_connected(Duration::from_secs(10)).await;
    let output = std::process::Command::new(trellis_integration::binary("trellis"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("status")
        .output()
        .expect("trellis status");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for service in SERVICES {
        let info = node.info(service).await.expect("info");
        let line = text
            .lines()
            .find(|l| l.starts_with(service))
            .unwrap_or_else(|| panic!("no {service} line in\n{text}"));
        assert!(line.contains("SERVING"), "{line}");
        assert!(
            line.contains(&info.pid.to_string()),
            "pid of {service}: {line}"
        );
        assert!(line.contains(&info.socket), "{line}");
        assert!(
            line.contains("nats://127.0.0.1:") && line.contains("connected"),
            "{line}"
        );
    }
    node.stop();
}

/// A child stopped cleanly by someone else (SIGTERM, exit status 0) is restarted, and
/// the supervisor says so without calling it a death.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_that_exits_cleanly_is_restarted_without_an_error() {
    let node = Node::start(NodeOptions::default()).await;
    let old = node.info("image").await.expect("image info").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    node.wait_restarted("image", old, Duration::from_secs(10))
        .await;
    let log = node.log();
    let said = log
        .lines()
        .find(|line| line.contains("child exited cleanly"))
        .unwrap_or_else(|| panic!("no word of the clean exit:\n{}", node.log_tail()));
    assert!(said.contains("INFO") && said.contains("image"), "{said}");
    assert!(
        !log.contains("child died"),
        "a clean exit is no death:\n{}",
        node.log_tail()
    );
    node.stop();
}

/// A supervisor killed with SIGKILL cannot stop its children itself; they are told
/// by the kernel (parent-death signal) and shut down cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn children_stop_when_the_supervisor_is_killed() {
    let node = Node::start(NodeOptions::default()).await;
    kill9(node.up_pid().expect("up pid"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers(node.root());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there 15 s after the supervisor died: {left:#?}\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Services refuse to start over a live instance, and exit non-zero.
#[tokio::test(flavor = "multi_thread")]
async fn second_instance_refuses_to_start() {
    let node = Node::start(NodeOptions::default()).await;
    let output = std::process::Command::new(trellis_integration::binary("trellis-runtime"))
        .arg("--config")
        .arg(&node.config_path)
        .output()
        .expect("second runtime");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("another live instance owns") && stderr.contains("runtime.sock"),
        "{stderr}"
    );
    // The first instance is unharmed.
    node.info("runtime")
        .await
        .expect("first runtime still serving");
    node.stop();
}
