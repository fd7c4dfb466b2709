//! PortForward through the streaming server, with a SPDY client speaking as
//! client-go does (portforward.k8s.io).

use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::cri::{BusyboxNode, exec, pod_config, run_pod, start};
use trellis_integration::spdy_client::SpdyClient;
use trellis_integration::{Node, free_port};

const LIMIT: Duration = Duration::from_secs(30);

/// Port-forwards one connection to `port` of the pod and returns what the server said.
async fn forward_once(url: &str, port: u16, request_id: &str) -> (String, String) {
    let mut client = SpdyClient::connect(url, &["portforward.k8s.io"])
        .await
        .expect("upgrade");
    assert_eq!(client.protocol, "portforward.k8s.io");
    let port = port.to_string();
    let error = client
        .open(&[
            ("streamtype", "error"),
            ("port", &port),
            ("requestid", request_id),
        ])
        .await;
    client.send(error, b"", true).await;
    let data = client
        .open(&[
            ("streamtype", "data"),
            ("port", &port),
            ("requestid", request_id),
        ])
        .await;
    client.send(data, b"ping\n", false).await;
    let received = client
        .read_until(LIMIT, |_, finished| finished.contains(&error))
        .await;
    (received.text(data), received.text(error))
}

async fn wait_listening(node: &Node, container_id: &str, port: u16) {
    let hex = format!(":{port:04X} ");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let output = exec(
            node,
            container_id,
            &["cat", "/proc/net/tcp", "/proc/net/tcp6"],
        )
        .await
        .stdout;
        if output.lines().any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|local| format!("{local} ").ends_with(&hex))
                && l.split_whitespace().nth(3) == Some("0A")
        }) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn port_forward_reaches_the_pods_loopback() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let mut runtime = node.runtime();

    // A pod with its own network namespace: port 8080 there is not the host's.
    let pod = run_pod(node, pod_config("forward", false)).await;
    let server = start(
        node,
        &pod,
        busybox.container(
            "server",
            &["nc", "-ll", "-p", "8080", "-e", "echo", "hi from the pod"],
        ),
    )
    .await;
    wait_listening(node, &server, 8080).await;
    let url = runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.id.clone(),
            port: vec![8080],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url;
    assert!(url.contains("/portforward/"), "{url}");
    let (said, error) = forward_once(&url, 8080, "0").await;
    assert_eq!((said.as_str(), error.as_str()), ("hi from the pod\n", ""));

    // Nothing listens on another port: the error stream says so.
    let url = runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.id.clone(),
            port: vec![],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url;
    let (said, error) = forward_once(&url, 8081, "1").await;
    assert_eq!(said, "");
    assert!(error.contains("8081"), "{error}");

    // A host-network pod is reached on the host's loopback.
    let port = free_port();
    let host_pod = run_pod(node, pod_config("forward-host", true)).await;
    let port_text = port.to_string();
    let host_server = start(
        node,
        &host_pod,
        busybox.container(
            "server",
            &[
                "nc",
                "-ll",
                "-p",
                &port_text,
                "-e",
                "echo",
                "hi from the host",
            ],
        ),
    )
    .await;
    wait_listening(node, &host_server, port).await;
    let url = runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: host_pod.id.clone(),
            port: vec![],
        })
        .await
        .expect("PortForward")
        .into_inner()
        .url;
    let (said, error) = forward_once(&url, port, "0").await;
    assert_eq!((said.as_str(), error.as_str()), ("hi from the host\n", ""));

    let unknown = runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: "0123456789abcdef".into(),
            port: vec![],
        })
        .await
        .expect_err("unknown pod");
    assert_eq!(unknown.code(), Code::NotFound);
}
