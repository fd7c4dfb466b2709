//! Logs, spans and trace propagation.
//!
//! Every process logs through `tracing`. When the standard `OTEL_EXPORTER_OTLP_*`
//! variables name an endpoint, spans are also exported over OTLP/gRPC, and the W3C
//! trace context travels in gRPC metadata and NATS headers, so one CRI call is one
//! trace across the gateway and the services behind it. Log lines name their service
//! and, inside an exported trace, its trace and span ids (see `format`).

mod format;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP span exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("invalid telemetry.log_level `{0}`")]
    Filter(String),
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Whether spans leave the process. Without an exporter there is no trace to join or
/// pass on, so the per-call work for one (a span at info level with its fields
/// formatted, the W3C context read and written) is skipped: every call paid for it.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans over OTLP.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the span exporter alive; `shutdown` flushes what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber for a process named `process` (for example
    /// `trellis-gateway`). Must run inside the tokio runtime: the exporter's channel
    /// is bound to it.
    pub fn init(process: &str, config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let filter = EnvFilter::try_new(&config.log_level)
            .map_err(|_| TelemetryError::Filter(config.log_level.clone()))?;
        // Colours only for a person at a terminal, who has not asked for none
        // (https://no-color.org): in a file or a journal they are escape codes in the
        // way of grep.
        let ansi = std::io::stderr().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let ids = format::TraceIds::default();
        let service = process.strip_prefix("trellis-").unwrap_or(process);
        let json = config.log_format == "json";
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .event_format(format::LineFormat::new(service, json, ansi, ids.clone()));
        let fmt = if json {
            fmt.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .boxed()
        } else {
            fmt.boxed()
        };

        let endpoint = ENDPOINT_VARS
            .iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()));
        let provider = match &endpoint {
            Some(endpoint) => {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(|source| TelemetryError::Exporter {
                        endpoint: endpoint.clone(),
                        source,
                    })?;
                let resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(process.to_string())
                    .build();
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            }
            None => None,
        };
        let otel = provider.as_ref().map(|provider| {
            opentelemetry::global::set_tracer_provider(provider.clone());
            tracing_opentelemetry::layer().with_tracer(provider.tracer("trellis"))
        });
        let exporting = otel.is_some();
        let dispatch: tracing::Dispatch = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(otel)
            .into();
        if exporting {
            ids.enable(&dispatch);
        }
        dispatch
            .try_init()
            .map_err(|e| TelemetryError::Install(e.to_string()))?;
        if let Some(endpoint) = endpoint {
            EXPORTING.store(true, Ordering::Relaxed);
            tracing::info!(%endpoint, "exporting spans over OTLP");
        }
        Ok(Self { provider })
    }

    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "span exporter did not flush cleanly");
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The server span of one gRPC call, child of the caller's trace when the request
/// carries a `traceparent`. Given to tonic's `Server::trace_fn`. Without an exporter
/// it is a debug span with the path alone (nothing when the log level is above debug),
/// so log lines at debug still say which call they belong to.
pub fn grpc_server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    if !exporting() {
        return tracing::debug_span!("grpc", rpc.path = %path);
    }
    let span = tracing::info_span!("grpc", otel.name = %path.trim_start_matches('/'), otel.kind = "server", rpc.path = %path);
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    // Fails only when no OpenTelemetry layer is installed, where there is no trace to join.
    let _ = span.set_parent(parent);
    span
}

/// Puts the current span's trace context into an outgoing gRPC request.
pub fn inject_grpc_context(metadata: &mut tonic::metadata::MetadataMap) {
    if !exporting() {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

/// A request carrying the current span's trace context, for a call to another service.
pub fn traced_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject_grpc_context(request.metadata_mut());
    request
}

/// The current span's trace context as header pairs (for NATS messages).
pub fn current_trace_headers() -> HashMap<String, String> {
    if !exporting() {
        return HashMap::new();
    }
    let context = tracing::Span::current().context();
    let mut headers = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut headers)
    });
    headers
}

/// A span for one step inside a call (`runc create`, a CNI plugin run, a layer's
/// unpack): a child of the current span when spans are exported, nothing otherwise,
/// so a node that exports none pays nothing for its steps. Fields as in
/// `tracing::info_span!`; `otel.name = %name` names a step whose name is known only
/// at run time.
#[macro_export]
macro_rules! step_span {
    ($name:literal $(, $($fields:tt)*)?) => {
        if $crate::telemetry::exporting() {
            ::tracing::info_span!($name $(, $($fields)*)?)
        } else {
            ::tracing::Span::none()
        }
    };
}

/// The client span of a call to another Trellis service (`peer`: `storage`, ...): it
/// covers the whole exchange, the socket's and the peer's HTTP/2 included, so the
/// caller's trace has no gap around the peer's server span. Requests made inside it
/// (`traced_request`) carry it as their parent.
pub fn client_span(peer: &str) -> tracing::Span {
    crate::step_span!("grpc.client", otel.name = %format!("call trellis-{peer}"), otel.kind = "client", peer.service = %format!("trellis-{peer}"))
}

/// Attributes of the current span (inside a handler: the call's server span) under
/// OpenTelemetry's names (`k8s.pod.uid`, `container.id`, ...). Empty values are left
/// out; nothing happens when spans are not exported.
pub fn annotate(pairs: &[(&'static str, &str)]) {
    if !exporting() {
        return;
    }
    let span = tracing::Span::current();
    for (key, value) in pairs {
        if !value.is_empty() {
            span.set_attribute(*key, value.to_string());
        }
    }
}

/// The current span's context, to link a later span to (a streaming session to the
/// Exec call that made it); none when spans are not exported.
pub fn current_span_context() -> Option<SpanContext> {
    if !exporting() {
        return None;
    }
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

pub use opentelemetry::trace::SpanContext;

/// Links `span` to an earlier one (a streaming session to the call that made it).
pub fn link_to(span: &tracing::Span, earlier: Option<SpanContext>) {
    if let Some(earlier) = earlier {
        span.add_link(earlier);
    }
}

/// Links `span` to the span whose context `headers` carry (a bus event's
/// `traceparent`), so a consumer's work is found from the publisher's trace.
pub fn link_to_headers<'a>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    if !exporting() {
        return;
    }
    use opentelemetry::trace::TraceContextExt;
    let headers: HashMap<String, String> = headers
        .into_iter()
        .map(|(key, value)| (key.to_ascii_lowercase(), value.to_string()))
        .collect();
    let context =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&headers));
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// Ends the current call's server span with its gRPC code: the
/// `rpc.grpc.status_code` attribute, and an error status with the message for any
/// code but OK.
pub fn record_grpc_outcome(span: &tracing::Span, code: tonic::Code, message: &str) {
    span.set_attribute("rpc.grpc.status_code", code as i64);
    if code != tonic::Code::Ok {
        span.set_status(opentelemetry::trace::Status::error(format!(
            "{}: {message}",
            crate::metrics::grpc::code_name(code)
        )));
    }
}

/// Marks a step's span as failed, with the error's words.
pub fn record_error(span: &tracing::Span, error: &dyn std::fmt::Display) {
    if exporting() {
        span.set_status(opentelemetry::trace::Status::error(error.to_string()));
    }
}
