//! Prometheus metrics on a loopback port, per CRI method.

use std::io::{Read, Write};

use k8s_cri::v1::{RunPodSandboxRequest, VersionRequest};
use trellis_integration::{Node, NodeOptions};

fn scrape(address: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_reports_latency_and_errors_per_method() {
    let node = Node::start(NodeOptions {
        extra_config: "[gateway]\nmetrics_listen = \"127.0.0.1:0\"\n".into(),
        ..Default::default()
    })
    .await;
    let mut runtime = node.runtime();
    runtime
        .version(VersionRequest::default())
        .await
        .expect("Version");
    runtime
        .version(VersionRequest::default())
        .await
        .expect("Version");
    runtime
        .run_pod_sandbox(RunPodSandboxRequest::default())
        .await
        .expect_err("no config");

    let address = node.info("gateway").await.expect("info").metrics_address;
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    let body = scrape(&address);
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("trellis_gateway_request_duration_seconds_count{method=\"Version\"} 2"),
        "{body}"
    );
    assert!(body.contains("trellis_gateway_request_errors_total{method=\"RunPodSandbox\",code=\"InvalidArgument\"} 1"), "{body}");
    assert!(body.contains("trellis_bus_connected"), "{body}");
    // The other services were not asked for a metrics listener, so have none.
    assert!(
        node.info("runtime")
            .await
            .expect("info")
            .metrics_address
            .is_empty()
    );
    node.stop();
}
