//! OpenTelemetry: one CRI call is one trace across the gateway and the runtime.

use std::time::{Duration, Instant};

use k8s_cri::v1::VersionRequest;
use trellis_integration::otlp::Receiver;
use trellis_integration::{Node, NodeOptions};

#[tokio::test(flavor = "multi_thread")]
async fn one_cri_call_is_one_trace_across_gateway_and_runtime() {
    let (receiver, endpoint) = Receiver::start().await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ];
    let node = Node::start(NodeOptions {
        env,
        ..Default::default()
    })
    .await;
    node.runtime()
        .version(VersionRequest::default())
        .await
        .expect("Version");

    let method = "runtime.v1.RuntimeService/Version";
    let deadline = Instant::now() + Duration::from_secs(20);
    let (gateway, runtime) = loop {
        let spans = receiver.spans();
        let pair = spans
            .iter()
            .filter(|s| s.service == "trellis-gateway" && s.name == method)
            .find_map(|gateway| {
                spans
                    .iter()
                    .find(|s| {
                        s.service == "trellis-runtime"
                            && s.name == method
                            && s.trace_id == gateway.trace_id
                    })
                    .map(|runtime| (gateway.clone(), runtime.clone()))
            });
        if let Some(pair) = pair {
            break pair;
        }
        assert!(
            Instant::now() < deadline,
            "no gateway+runtime spans sharing a trace; received: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(gateway.trace_id.len(), 16);
    assert_ne!(gateway.trace_id, vec![0u8; 16]);
    assert_eq!(
        runtime.parent_span_id, gateway.span_id,
        "the runtime's span is a child of the gateway's"
    );
    node.stop();
}
