//! An operator at work on a busy node: `trellis restart` and `trellis upgrade` of
//! every service, and kill -9 of each, while four clients cycle pods and containers
//! (`trellis bench churn`, the command an operator measures with). A restart or an
//! upgrade fails no call; a kill -9 fails only calls in flight at the kill, each with
//! UNAVAILABLE, and each succeeds when tried again; nothing is left behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_cri::v1::*;
use trellis_integration::faults::assert_nothing_left;
use trellis_integration::pods::*;
use trellis_integration::{Node, bin_dir, binary, count_refusals};

const SERVICES: [&str; 5] = ["storage", "network", "image", "runtime", "gateway"];

/// `trellis bench churn` against `node` with four clients, `during` the actions given
/// every `every` seconds; its JSON report.
fn churn(
    node: &Node,
    image: &str,
    during: &[String],
    every: u64,
    binary_dir: Option<&Path>,
) -> serde_json::Value {
    // One period of steady churn before the first action and after the last.
    let seconds = every * (during.len() as u64 + 1);
    let mut command = std::process::Command::new(binary("trellis"));
    command
        .arg("--config")
        .arg(&node.config_path)
        .args([
            "bench",
            "--image",
            image,
            "churn",
            "--clients",
            "4",
            "--json",
        ])
        .args([
            "--seconds",
            &seconds.to_string(),
            "--every",
            &every.to_string(),
        ])
        .arg("--during")
        .arg(during.join(","));
    if let Some(dir) = binary_dir {
        command.arg("--binary-dir").arg(dir);
    }
    let output = command.output().expect("run trellis bench churn");
    assert!(
        output.status.success(),
        "trellis bench churn: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        node.log_tail()
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the churn report is JSON");
    eprintln!(
        "churn during {during:?}: {} cycles, {} calls, {} failed tries, {} lost, {} resent; phases {}",
        report["cycles"],
        report["calls"],
        report["failures"].as_array().map_or(0, Vec::len),
        report["lost"],
        report["resent"],
        report["phases"]
    );
    for action in report["actions"].as_array().into_iter().flatten() {
        eprintln!("  {action}");
    }
    report
}

/// Copies of the service binaries, root's and 0755, as an upgrade would install.
fn new_binaries(root: &Path) -> PathBuf {
    let dir = root.join("upgrade");
    std::fs::create_dir_all(&dir).expect("upgrade dir");
    for service in SERVICES {
        let name = format!("trellis-{service}");
        let target = dir.join(&name);
        std::fs::copy(bin_dir().join(&name), &target).expect("copy binary");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

fn actions_all_ok(report: &serde_json::Value, expected: usize, node: &Node) {
    let actions = report["actions"].as_array().expect("actions");
    assert!(actions.len() >= expected, "every action ran: {actions:#?}");
    for action in actions {
        assert_eq!(action["ok"], true, "{action}\n{}", node.log_tail());
    }
}

/// The CRI pods still on the node (the churn's clients remove theirs).
async fn pods_left(node: &Node) -> Vec<String> {
    let pods = node
        .runtime()
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list pods")
        .into_inner()
        .items;
    pods.into_iter()
        .map(|pod| format!("pod {:?} {}", pod.metadata.map(|m| m.name), pod.id))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_and_upgrades_of_every_service_under_churn_fail_no_call() {
    let (_dir, _registry, node, image) = setup().await;
    let upgrade = new_binaries(node.root());
    let during: Vec<String> = SERVICES
        .iter()
        .flat_map(|service| [format!("restart:{service}"), format!("upgrade:{service}")])
        .collect();
    let report = churn(&node, &image, &during, 3, Some(&upgrade));
    actions_all_ok(&report, during.len(), &node);
    let failures = report["failures"].as_array().expect("failures");
    assert!(
        failures.is_empty(),
        "failed calls: {failures:#?}\n{}",
        node.log_tail()
    );
    assert!(report["cycles"].as_u64() > Some(0), "the churn ran");
    for service in SERVICES {
        let pid = node.info(service).await.expect("info").pid;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert!(
            exe.starts_with(&upgrade),
            "{service} runs the upgraded binary: {}",
            exe.display()
        );
    }
    let left = pods_left(&node).await;
    assert_nothing_left(&node, "restarts and upgrades", left);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_of_every_service_under_churn_fails_only_unavailable_calls_that_then_succeed() {
    let (_dir, _registry, node, image) = setup().await;
    let during: Vec<String> = SERVICES
        .iter()
        .map(|service| format!("kill:{service}"))
        .collect();
    let report = churn(&node, &image, &during, 4, None);
    actions_all_ok(&report, during.len(), &node);
    let failures = report["failures"].as_array().expect("failures");
    for failure in failures {
        eprintln!("  failed: {failure}");
    }
    for failure in failures {
        assert_eq!(
            failure["code"],
            "Unavailable",
            "{failure}\n{}",
            node.log_tail()
        );
        assert_eq!(failure["recovered"], true, "{failure}");
    }
    assert_eq!(
        report["lost"], 0,
        "every failed call succeeded when tried again"
    );
    assert!(report["cycles"].as_u64() > Some(0), "the churn ran");
    let left = pods_left(&node).await;
    assert_nothing_left(&node, "kill -9 of each service", left);
    node.stop();
}

/// Runs `trellis restart SERVICE` (or `upgrade` with `binary`) for `node`.
fn trellis_restart(node: &Node, service: &str) -> String {
    let output = std::process::Command::new(binary("trellis"))
        .arg("--config")
        .arg(&node.config_path)
        .args(["restart", service])
        .output()
        .expect("run trellis restart");
    assert!(
        output.status.success(),
        "trellis restart {service}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `trellis restart gateway` with two GetContainerEvents subscribers, as two kubelet
/// clients with evented PLEG keep: no connect is refused, both streams end with
/// UNAVAILABLE (come back), and both subscribe again and see the next pod's event.
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_restart_ends_both_event_streams_cleanly_and_they_subscribe_again() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    let node = Node::start(trellis_integration::NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    node.wait_bus_connected(Duration::from_secs(10)).await;
    let subscribe = || async {
        node.runtime()
            .get_container_events(GetEventsRequest::default())
            .await
            .expect("subscribe")
            .into_inner()
    };
    let mut streams = vec![subscribe().await, subscribe().await];
    let stop = Arc::new(AtomicBool::new(false));
    let refusals = count_refusals(&node.socket("gateway"), stop.clone());
    let said = trellis_restart(&node, "gateway");
    for stream in &mut streams {
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the stream ends well before the grace");
        let status = ended.expect_err("the stream ends with a status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    stop.store(true, Ordering::SeqCst);
    let (tries, refused) = refusals.await.expect("refusal counter");
    eprintln!("{said}: both streams ended, {refused} of {tries} connects refused");
    assert_eq!(
        refused, 0,
        "connects refused while the gateway was replaced"
    );

    let mut streams = vec![subscribe().await, subscribe().await];
    next_pod_event_reaches(&node, &mut streams).await;
    node.stop();
}
