//! What an operator reads: the node's log (no colour codes in a file, each line naming
//! its service, failed CRI calls at WARN in their trace, clean exits said), and
//! `trellis status` for scripts (`--json`, a closed pipe).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::ContainerStatusRequest;
use trellis_integration::otlp::{ReceivedSpan, Receiver};
use trellis_integration::{Node, NodeOptions, SERVICES};

/// nats-server (the node's private bus) writes to the same file in its own format:
/// `[pid] date time [INF] …`.
fn is_nats_line(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

async fn wait_for_span(receiver: &Receiver, service: &str, name: &str) -> ReceivedSpan {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.spans();
        if let Some(span) = spans
            .iter()
            .find(|s| s.service == service && s.name == name)
        {
            return span.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {service} span {name}; received: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_log_names_services_and_traces_and_logs_failed_calls_at_warn() {
    let (receiver, endpoint) = Receiver::start().await;
    let node = Node::start(NodeOptions {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
            // The harness sets NO_COLOR for every node; a log file must be free of
            // colour codes without it.
            ("NO_COLOR".to_string(), String::new()),
        ],
        ..Default::default()
    })
    .await;
    let missing = format!("no-such-container-{}", std::process::id());
    let error = node
        .runtime()
        .container_status(ContainerStatusRequest {
            container_id: missing.clone(),
            verbose: false,
        })
        .await
        .expect_err("ContainerStatus of a missing id");
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");
    let span = wait_for_span(
        &receiver,
        "trellis-gateway",
        "runtime.v1.RuntimeService/ContainerStatus",
    )
    .await;

    let log =
        node.stop_and_inspect(|root| std::fs::read(root.join("node.log")).expect("the node's log"));
    assert!(
        !log.contains(&0x1b),
        "no ANSI escape in a log file:\n{}",
        String::from_utf8_lossy(&log)
    );
    let log = String::from_utf8(log).expect("a UTF-8 log");
    let unnamed: Vec<&str> = log
        .lines()
        .filter(|line| !is_nats_line(line) && !line.contains(" service="))
        .collect();
    assert!(
        unnamed.is_empty(),
        "lines that name no service: {unnamed:#?}"
    );

    let failed: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("CRI call failed") && line.contains(&missing))
        .collect();
    assert_eq!(failed.len(), 1, "one line per failed call: {failed:#?}");
    let line = failed[0];
    assert!(line.contains(" WARN service=gateway "), "{line}");
    assert!(line.contains("method=\"ContainerStatus\""), "{line}");
    assert!(line.contains("code=NotFound"), "{line}");
    assert!(
        line.contains(&format!(
            " trace_id={} span_id={} ",
            hex::encode(&span.trace_id),
            hex::encode(&span.span_id)
        )),
        "the gateway's ContainerStatus span {}/{}: {line}",
        hex::encode(&span.trace_id),
        hex::encode(&span.span_id)
    );

    for service in SERVICES {
        let process = format!("trellis-{service}");
        assert!(
            log.lines().any(|line| line.contains(" INFO ")
                && line.contains(&format!("service={service} "))
                && line.contains(&format!("{process} stopped cleanly"))),
            "{process} says it stopped cleanly:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|line| line.contains(" INFO service=up ") && line.contains("node stopped cleanly")),
        "trellis up says the node stopped cleanly:\n{log}"
    );
}

fn status(node: &Node, args: &[&str], stdout: impl Into<Stdio>) -> Output {
    Command::new(trellis_integration::binary("trellis"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("status")
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("trellis status")
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_lists_every_service_and_a_closed_output_ends_it_quietly() {
    let node = Node::start(NodeOptions {
        extra_config: "[gateway]\nmetrics_listen = \"127.0.0.1:0\"\n".into(),
        ..Default::default()
    })
    .await;
    node.wait_bus_connected(Duration::from_secs(10)).await;

    let output = status(&node, &["--json"], Stdio::piped());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(document["all_serving"], true, "{document:#}");
    let services = document["services"].as_array().expect("services");
    assert_eq!(services.len(), 5, "{document:#}");
    for service in SERVICES {
        let info = node.info(service).await.expect("info");
        let entry = services
            .iter()
            .find(|s| s["service"] == service)
            .unwrap_or_else(|| panic!("no {service} in {document:#}"));
        assert_eq!(entry["health"], "SERVING", "{entry:#}");
        assert_eq!(entry["pid"], info.pid, "{entry:#}");
        assert_eq!(entry["socket"], info.socket.as_str(), "{entry:#}");
        assert_eq!(entry["version"], info.version.as_str(), "{entry:#}");
        assert!(entry["uptime_seconds"].is_u64(), "{entry:#}");
        assert_eq!(entry["bus"]["connected"], true, "{entry:#}");
        assert_eq!(entry["restarts"], 0, "{entry:#}");
        let metrics = (!info.metrics_address.is_empty()).then_some(info.metrics_address);
        assert_eq!(
            entry["metrics_address"].as_str(),
            metrics.as_deref(),
            "{entry:#}"
        );
    }
    let gateway = services.iter().find(|s| s["service"] == "gateway");
    let metrics = gateway
        .and_then(|g| g["metrics_address"].as_str())
        .expect("the gateway exports metrics here");

    let output = status(&node, &[], Stdio::piped());
    let text = String::from_utf8_lossy(&output.stdout);
    let header = text.lines().next().unwrap_or_default();
    assert!(
        header.contains("UPTIME") && header.contains("METRICS"),
        "{text}"
    );
    let gateway = text
        .lines()
        .find(|line| line.starts_with("gateway"))
        .unwrap_or_else(|| panic!("no gateway line in\n{text}"));
    assert!(gateway.contains(metrics), "{gateway}");

    let old = node.info("image").await.expect("image info").pid;
    trellis_integration::kill9(old);
    node.wait_restarted("image", old, Duration::from_secs(10))
        .await;
    let output = status(&node, &["--json"], Stdio::piped());
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON document");
    let image = document["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == "image"))
        .expect("image");
    assert_eq!(image["restarts"], 1, "{document:#}");

    // The reader is gone before anything is written: every write meets EPIPE.
    for args in [&[][..], &["--json"][..]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = status(&node, args, writer);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "status {args:?} into a closed pipe: {:?}\n{stderr}",
            output.status
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }

    // And as an operator types it.
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' --config '{}' status | head -1",
            trellis_integration::binary("trellis").display(),
            node.config_path.display()
        ))
        .output()
        .expect("sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("SERVICE"),
        "{output:?}"
    );
    node.stop();
}
