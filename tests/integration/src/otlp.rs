//! An OTLP/gRPC trace receiver inside the test, to see the spans the node exports,
//! and the arithmetic the tracing tests do on them (trees, time outside child spans).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;

use crate::registry::{BuiltImage, Registry};
use crate::{Node, NodeOptions};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A node with a CNI network whose services export their spans to a receiver of the
/// test's own, and a registry holding an image for it to pull (`reference`).
pub struct TracedNode {
    pub node: Node,
    pub receiver: Receiver,
    pub reference: String,
    _registry: Registry,
    _dir: tempfile::TempDir,
}

impl TracedNode {
    /// The registry holds `built` as `<repository>:1`.
    pub async fn start(repository: &str, built: &BuiltImage) -> TracedNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::start(dir.path(), None);
        registry.push(repository, "1", built).await;
        let reference = format!("{}/{repository}:1", registry.address);
        let (receiver, endpoint) = Receiver::start().await;
        let node = Node::start(NodeOptions {
            env: Receiver::node_env(&endpoint),
            with_cni_config: true,
            ..Default::default()
        })
        .await;
        TracedNode {
            node,
            receiver,
            reference,
            _registry: registry,
            _dir: dir,
        }
    }

    pub fn stop(self) {
        self.node.stop();
    }
}

/// OTLP's span status code for an error (`STATUS_CODE_ERROR`).
pub const STATUS_ERROR: i32 = 2;

/// One received span, reduced to what the tests look at.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Attribute values as text (numbers and booleans printed).
    pub attributes: BTreeMap<String, String>,
    pub status_code: i32,
    pub status_message: String,
    /// (trace id, span id) of each linked span.
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ReceivedSpan {
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }

    pub fn links_to(&self, other: &ReceivedSpan) -> bool {
        self.links
            .iter()
            .any(|(trace, span)| *trace == other.trace_id && *span == other.span_id)
    }
}

#[derive(Clone, Default)]
pub struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Receiver {
    /// Serves on a free loopback port until the test ends; returns the endpoint URL.
    pub async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind otlp");
        let address = listener.local_addr().expect("otlp address");
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (receiver, format!("http://{address}"))
    }

    /// The environment that makes a node's services export here, without delay.
    pub fn node_env(endpoint: &str) -> Vec<(String, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                endpoint.to_string(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
        ]
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .map(|spans| spans.clone())
            .unwrap_or_default()
    }

    /// Waits up to `limit` until `found` picks something out of the spans received.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        found: impl Fn(&[ReceivedSpan]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let spans = self.spans();
            if let Some(value) = found(&spans) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not among the {} spans received in {limit:?}:\n{}",
                spans.len(),
                spans
                    .iter()
                    .map(|s| format!("{} {}", s.service, s.name))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn text_of(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes_of(pairs: &[KeyValue]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|kv| {
            let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
            (kv.key.clone(), text_of(value))
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .map(|r| attributes_of(&r.attributes))
                .and_then(|attributes| attributes.get("service.name").cloned())
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let status = span.status.unwrap_or_default();
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                        attributes: attributes_of(&span.attributes),
                        status_code: status.code,
                        status_message: status.message,
                        links: span
                            .links
                            .into_iter()
                            .map(|link| (link.trace_id, link.span_id))
                            .collect(),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The gateway's span of the one call to `method` (`RunPodSandbox`, ...).
pub fn gateway_span<'a>(spans: &'a [ReceivedSpan], method: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == "trellis-gateway" && s.name.ends_with(&format!("/{method}")))
}

/// The span of the service that served the call the gateway forwarded as `gateway`
/// (a grandchild: the gateway's client span lies between).
pub fn served_span<'a>(
    spans: &'a [ReceivedSpan],
    gateway: &ReceivedSpan,
) -> Option<&'a ReceivedSpan> {
    children(spans, gateway)
        .into_iter()
        .flat_map(|client| children(spans, client))
        .find(|s| s.name == gateway.name)
}

/// Every span of `root`'s trace.
pub fn trace_of<'a>(spans: &'a [ReceivedSpan], root: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect()
}

/// The spans whose parent is `parent`, earliest first.
pub fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    let mut found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect();
    found.sort_by_key(|s| s.start_ns);
    found
}

/// The share (0 to 1) of `span`'s time that no child span covers: the time the
/// trace cannot explain below it.
pub fn share_outside_children(spans: &[ReceivedSpan], span: &ReceivedSpan) -> f64 {
    let total = span.end_ns.saturating_sub(span.start_ns);
    if total == 0 {
        return 0.0;
    }
    let mut covered = 0u64;
    let mut reached = span.start_ns;
    for child in children(spans, span) {
        let start = child.start_ns.max(reached);
        let end = child.end_ns.min(span.end_ns);
        if end > start {
            covered += end - start;
            reached = end;
        }
    }
    total.saturating_sub(covered) as f64 / total as f64
}

/// The tree under `root`, one span a line: name, service, start after the root's
/// start and duration (ms), and the share of its time outside its children (for
/// spans that have children).
pub fn render_tree(spans: &[ReceivedSpan], root: &ReceivedSpan) -> String {
    let mut out = String::new();
    render_into(&mut out, spans, root, 0, root.start_ns);
    out
}

fn render_into(
    out: &mut String,
    spans: &[ReceivedSpan],
    span: &ReceivedSpan,
    depth: usize,
    root_start: u64,
) {
    let below = children(spans, span);
    let outside = if below.is_empty() {
        String::new()
    } else {
        format!(
            ", {:.1} % outside children",
            100.0 * share_outside_children(spans, span)
        )
    };
    let _ = writeln!(
        out,
        "{:indent$}{} [{}] +{:.2} {:.2} ms{outside}",
        "",
        span.name,
        span.service.trim_start_matches("trellis-"),
        span.start_ns.saturating_sub(root_start) as f64 / 1e6,
        span.duration().as_secs_f64() * 1000.0,
        indent = depth * 2
    );
    for child in below {
        render_into(out, spans, child, depth + 1, root_start);
    }
}
