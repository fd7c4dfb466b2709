//! Prometheus metrics: a registry per process and a small HTTP listener for it.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Labels borrow their names (methods are `'static` strings), so that a call observed
/// allocates nothing for its labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcErrorLabels {
    pub method: Cow<'static, str>,
    pub code: Cow<'static, str>,
}

/// Latency and errors per RPC, as an operator's dashboard shows them.
#[derive(Clone)]
pub struct RpcMetrics {
    latency: Family<RpcLabels, Histogram>,
    errors: Family<RpcErrorLabels, Counter>,
}

impl RpcMetrics {
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let latency = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ])
        });
        let errors = Family::<RpcErrorLabels, Counter>::default();
        registry.register(
            format!("{prefix}_request_duration_seconds"),
            "Time to answer a request, by method",
            latency.clone(),
        );
        registry.register(
            format!("{prefix}_request_errors"),
            "Requests answered with an error, by method and gRPC code",
            errors.clone(),
        );
        Self { latency, errors }
    }

    pub fn observe(&self, method: &'static str, elapsed: Duration, error: Option<tonic::Code>) {
        self.latency
            .get_or_create(&RpcLabels {
                method: Cow::Borrowed(method),
            })
            .observe(elapsed.as_secs_f64());
        if let Some(code) = error {
            self.errors
                .get_or_create(&RpcErrorLabels {
                    method: Cow::Borrowed(method),
                    code: Cow::Owned(format!("{code:?}")),
                })
                .inc();
        }
    }
}

/// Serves `GET /metrics` in the Prometheus text format until the process ends.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve(
    address: SocketAddr,
    registry: Arc<Registry>,
) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { address, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut request)).await;
                let Ok(Ok(n)) = read else { return };
                let head = String::from_utf8_lossy(&request[..n]);
                let response = if head.starts_with("GET /metrics") {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => http_response(
                            "200 OK",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            &body,
                        ),
                        Err(_) => http_response(
                            "500 Internal Server Error",
                            "text/plain",
                            "cannot encode metrics\n",
                        ),
                    }
                } else {
                    http_response("404 Not Found", "text/plain", "metrics are at /metrics\n")
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(bound)
}

fn http_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
