//! OpenTelemetry: one CRI call is one trace across the services; the steps inside
//! each service are spans of their own, so a slow pod start shows where its time went.

use std::time::Duration;

use k8s_cri::v1::*;
use trellis_integration::cri::{self, Pod};
use trellis_integration::otlp::{self, Receiver, gateway_span, served_span};
use trellis_integration::spdy_client::SpdyClient;
use trellis_integration::{Node, NodeOptions};

const WAIT: Duration = Duration::from_secs(20);

async fn traced_node(receiver_endpoint: &str, with_cni_config: bool) -> Node {
    Node::start(NodeOptions {
        env: Receiver::node_env(receiver_endpoint),
        with_cni_config,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_cri_call_is_one_trace_across_gateway_and_runtime() {
    let (receiver, endpoint) = Receiver::start().await;
    let node = traced_node(&endpoint, false).await;
    node.runtime()
        .version(VersionRequest::default())
        .await
        .expect("Version");
    let (gateway, runtime) = receiver
        .wait_for("Version at the gateway and the runtime", WAIT, |spans| {
            let gateway = gateway_span(spans, "Version")?;
            let runtime = served_span(spans, gateway)?;
            Some((gateway.clone(), runtime.clone()))
        })
        .await;
    assert_eq!(gateway.trace_id.len(), 16);
    assert_ne!(gateway.trace_id, vec![0u8; 16]);
    assert_eq!(runtime.service, "trellis-runtime");
    assert_eq!(gateway.attribute("rpc.grpc.status_code"), Some("0"));
    assert_eq!(runtime.attribute("rpc.grpc.status_code"), Some("0"));
    node.stop();
}

/// A failed call's spans say so, with the code and the message, at the gateway and
/// at the service that failed it.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_call_ends_its_spans_with_an_error_status() {
    let (receiver, endpoint) = Receiver::start().await;
    let node = traced_node(&endpoint, false).await;
    let error = node
        .runtime()
        .container_status(ContainerStatusRequest {
            container_id: "f00dfeedf00dfeed".into(),
            verbose: false,
        })
        .await
        .expect_err("ContainerStatus of no container");
    assert_eq!(error.code(), tonic::Code::NotFound);
    let (gateway, runtime) = receiver
        .wait_for(
            "ContainerStatus at the gateway and the runtime",
            WAIT,
            |spans| {
                let gateway = gateway_span(spans, "ContainerStatus")?;
                let runtime = served_span(spans, gateway)?;
                Some((gateway.clone(), runtime.clone()))
            },
        )
        .await;
    for span in [&gateway, &runtime] {
        assert_eq!(span.status_code, otlp::STATUS_ERROR, "{span:#?}");
        assert_eq!(
            span.attribute("rpc.grpc.status_code"),
            Some("5"),
            "{span:#?}"
        );
        assert!(
            span.status_message.contains("NotFound") && span.status_message.contains("f00dfeed"),
            "the status says what failed: {span:#?}"
        );
    }
    assert_eq!(runtime.attribute("container.id"), Some("f00dfeedf00dfeed"));
    node.stop();
}

/// A node of busybox whose services export their spans to `endpoint`, with a pod
/// whose container sleeps.
async fn traced_busybox(endpoint: &str) -> (cri::BusyboxNode, Pod, String) {
    let options = NodeOptions {
        env: Receiver::node_env(endpoint),
        with_cni_config: true,
        ..Default::default()
    };
    cri::BusyboxNode::with_sleeper(options, "linked").await
}

/// The span of an exec session (served later, on its own connection) links to the
/// Exec call that made its URL.
#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_session_links_to_the_call_that_made_it() {
    let (receiver, endpoint) = Receiver::start().await;
    let (busybox, pod, sleeper) = traced_busybox(&endpoint).await;
    let node = &busybox.node;
    let url = node
        .runtime()
        .exec(ExecRequest {
            container_id: sleeper.clone(),
            cmd: vec!["true".into()],
            stdin: false,
            stdout: true,
            stderr: true,
            tty: false,
        })
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let mut client = SpdyClient::connect(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    let error = client.open(&[("streamtype", "error")]).await;
    client.open(&[("streamtype", "stdout")]).await;
    client.open(&[("streamtype", "stderr")]).await;
    client
        .read_until(WAIT, |_, finished| finished.contains(&error))
        .await;

    let (call, session) = receiver
        .wait_for("the Exec call and its session", WAIT, |spans| {
            let gateway = gateway_span(spans, "Exec")?;
            let call = served_span(spans, gateway)?;
            let session = spans
                .iter()
                .find(|s| s.service == "trellis-runtime" && s.name == "exec")?;
            Some((call.clone(), session.clone()))
        })
        .await;
    assert!(session.links_to(&call), "{session:#?}\nlinks to\n{call:#?}");
    assert_eq!(session.attribute("container.id"), Some(sleeper.as_str()));
    assert_eq!(call.attribute("container.id"), Some(sleeper.as_str()));

    cri::remove_pod(node, &pod.id).await;
    busybox.node.stop();
}

/// An event's delivery to a GetContainerEvents subscriber is a span linked to the
/// call that raised the event: the event carries its trace context over the bus.
#[tokio::test(flavor = "multi_thread")]
async fn an_events_delivery_links_to_the_call_that_raised_it() {
    let (receiver, endpoint) = Receiver::start().await;
    let busybox = cri::BusyboxNode::start_with(NodeOptions {
        env: Receiver::node_env(&endpoint),
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let node = &busybox.node;
    let mut events = node
        .runtime()
        .get_container_events(GetEventsRequest::default())
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let pod = cri::run_pod(node, cri::pod_config("evented", false)).await;
    let first = tokio::time::timeout(WAIT, events.message())
        .await
        .expect("an event within the limit")
        .expect("the stream stays open")
        .expect("an event");
    assert_eq!(first.container_id, pod.id);

    let (delivery, raised_in) = receiver
        .wait_for(
            "the event's delivery and the RunPodSandbox trace",
            WAIT,
            |spans| {
                let run = gateway_span(spans, "RunPodSandbox")?;
                let delivery = spans.iter().find(|s| {
                    s.service == "trellis-gateway"
                        && s.name == "event.deliver"
                        && s.attribute("container.id") == Some(pod.id.as_str())
                })?;
                Some((delivery.clone(), run.trace_id.clone()))
            },
        )
        .await;
    assert!(
        delivery.links.iter().any(|(trace, _)| *trace == raised_in),
        "the delivery links into RunPodSandbox's trace: {delivery:#?}"
    );
    assert_ne!(
        delivery.trace_id, raised_in,
        "a delivery is a trace of its own"
    );

    cri::remove_pod(node, &pod.id).await;
    busybox.node.stop();
}
