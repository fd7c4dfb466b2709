//! Server-side gRPC metrics for every service, from one tower layer on the skeleton's
//! server: each call counted by method and code and timed, internal services (storage,
//! network, health, info) as much as the CRI. The label sets of every method the
//! process serves × every code are created at start, so the first error of a kind moves
//! a series that already exists at 0, which `rate()` sees, instead of creating one.
//! Every code is pre-created, not a list per service: each service hands on the codes
//! of the services it calls, and tonic itself answers several (Unimplemented, Internal,
//! Cancelled, ResourceExhausted, DeadlineExceeded).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

/// Every gRPC code, in the order of their numbers.
pub const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// A code's name as every gRPC implementation prints it (grpc-go's, which the
/// dashboards of other runtimes use too).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// One gRPC service a process serves: its full name and its methods.
#[derive(Clone, Copy, Debug)]
pub struct GrpcService {
    pub name: &'static str,
    pub methods: &'static [&'static str],
}

pub const CRI_RUNTIME: GrpcService = GrpcService {
    name: "runtime.v1.RuntimeService",
    methods: &[
        "Version",
        "RunPodSandbox",
        "StopPodSandbox",
        "RemovePodSandbox",
        "PodSandboxStatus",
        "ListPodSandbox",
        "CreateContainer",
        "StartContainer",
        "StopContainer",
        "RemoveContainer",
        "ListContainers",
        "ContainerStatus",
        "UpdateContainerResources",
        "ReopenContainerLog",
        "ExecSync",
        "Exec",
        "Attach",
        "PortForward",
        "ContainerStats",
        "ListContainerStats",
        "PodSandboxStats",
        "ListPodSandboxStats",
        "UpdateRuntimeConfig",
        "Status",
        "CheckpointContainer",
        "GetContainerEvents",
        "ListMetricDescriptors",
        "ListPodSandboxMetrics",
        "RuntimeConfig",
    ],
};

pub const CRI_IMAGE: GrpcService = GrpcService {
    name: "runtime.v1.ImageService",
    methods: &[
        "ListImages",
        "ImageStatus",
        "PullImage",
        "RemoveImage",
        "ImageFsInfo",
    ],
};

pub const STORAGE: GrpcService = GrpcService {
    name: "trellis.storage.v1.Storage",
    methods: &[
        "FsUsage",
        "HasLayer",
        "ImportLayer",
        "PruneLayers",
        "PutImage",
        "GetImage",
        "ListImages",
        "RemoveImage",
        "WatchImages",
        "PrepareRootfs",
        "ReleaseRootfs",
        "WritableLayerUsage",
    ],
};

pub const NETWORK: GrpcService = GrpcService {
    name: "trellis.network.v1.Network",
    methods: &["Status", "SetUpPod", "TearDownPod", "PodNetworkStatus"],
};

pub const HEALTH: GrpcService = GrpcService {
    name: "grpc.health.v1.Health",
    methods: &["Check", "Watch"],
};

pub const SERVICE_INFO: GrpcService = GrpcService {
    name: "trellis.service.v1.ServiceInfo",
    methods: &["Info"],
};

/// A path no served method has: one series for all of them, whatever a client sends.
const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// Latency buckets from a list answered from memory to a pull of a large image.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// The calls a process answered; cloned into the layer.
#[derive(Clone)]
pub struct GrpcMetrics {
    /// `/<service>/<method>` → its labels.
    paths: Arc<HashMap<String, MethodLabels>>,
    handled: Family<CodeLabels, Counter>,
    handling: Family<MethodLabels, Histogram>,
}

impl GrpcMetrics {
    /// Registers the two families and creates the series of every method of
    /// `services` (each with every code).
    pub fn register(registry: &mut Registry, services: &[GrpcService]) -> Self {
        let handled = Family::<CodeLabels, Counter>::default();
        let handling =
            Family::<MethodLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            "grpc_server_handled",
            "gRPC calls answered, by service, method and code",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from a call's arrival to the end of its answer, by service and method",
            handling.clone(),
        );
        let mut paths = HashMap::new();
        for service in services {
            for &method in service.methods {
                let labels = MethodLabels {
                    grpc_service: service.name,
                    grpc_method: method,
                };
                super::precreate(&handling, [labels.clone()]);
                super::precreate(&handled, CODES.map(|code| labels.with_code(code)));
                paths.insert(format!("/{}/{method}", service.name), labels);
            }
        }
        Self {
            paths: Arc::new(paths),
            handled,
            handling,
        }
    }

    /// The tower layer for `tonic::transport::Server::layer`.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer(self.clone())
    }

    fn labels(&self, path: &str) -> MethodLabels {
        self.paths.get(path).cloned().unwrap_or(MethodLabels {
            grpc_service: UNKNOWN,
            grpc_method: UNKNOWN,
        })
    }

    fn record(&self, labels: &MethodLabels, code: Code, seconds: f64) {
        self.handled.get_or_create(&labels.with_code(code)).inc();
        self.handling.get_or_create(labels).observe(seconds);
    }
}

impl MethodLabels {
    fn with_code(&self, code: Code) -> CodeLabels {
        CodeLabels {
            grpc_service: self.grpc_service,
            grpc_method: self.grpc_method,
            grpc_code: code_name(code),
        }
    }
}

/// One call under way: recorded once, when its answer ends or when it is dropped
/// (the caller went away: `Canceled`, unless a code was already known). The code
/// that ends its count ends its server span too (kept open until then), when spans
/// are exported.
struct Call {
    metrics: GrpcMetrics,
    labels: MethodLabels,
    started: Instant,
    code: Option<Code>,
    message: String,
    span: Option<tracing::Span>,
    /// From the handler's answer to the answer's end (the message and trailers written
    /// out to the caller): a step of the call's span of its own.
    responding: Option<tracing::Span>,
}

impl Call {
    fn answered(&mut self, status: tonic::Status) {
        self.code = Some(status.code());
        self.message = status.message().to_string();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.responding.take();
        let code = self.code.unwrap_or(Code::Cancelled);
        self.metrics
            .record(&self.labels, code, self.started.elapsed().as_secs_f64());
        if let Some(span) = &self.span {
            let message = match self.code {
                None => "the caller went away before the answer",
                Some(_) => &self.message,
            };
            crate::telemetry::record_grpc_outcome(span, code, message);
        }
    }
}

/// The code and message in `headers` (a trailers-only answer's, or trailers).
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Status> {
    headers.get("grpc-status")?;
    tonic::Status::from_header_map(headers)
}

#[derive(Clone)]
pub struct GrpcMetricsLayer(GrpcMetrics);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut call = Call {
            labels: self.metrics.labels(request.uri().path()),
            metrics: self.metrics.clone(),
            started: Instant::now(),
            code: None,
            message: String::new(),
            span: None,
            responding: None,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            // Polled inside the server span (`Server::trace_fn`).
            if crate::telemetry::exporting() {
                call.span = Some(tracing::Span::current());
            }
            let response = answer.await?;
            call.responding = Some(crate::step_span!("grpc.respond"));
            let (parts, body) = response.into_parts();
            // A failed call is usually "trailers only": its code is in the headers.
            if let Some(status) = grpc_status(&parts.headers) {
                call.answered(status);
            }
            let body = MeteredBody {
                inner: body,
                call: Some(call),
            };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// An answer's body that records its call when its trailers (with the code) have
/// passed, so a streamed answer counts its whole length and its final code.
struct MeteredBody {
    inner: tonic::body::Body,
    call: Option<Call>,
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let status = frame.trailers_ref().and_then(grpc_status);
                if let (Some(status), Some(call)) = (status, self.call.as_mut()) {
                    call.answered(status);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(call) = self.call.as_mut() {
                    call.answered(status.clone());
                }
            }
            Poll::Ready(None) => {
                // An answer that ended with no code at all is not a gRPC answer.
                if let Some(mut call) = self.call.take() {
                    call.code.get_or_insert(Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
