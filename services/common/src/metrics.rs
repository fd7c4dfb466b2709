//! Prometheus metrics: a registry per process and a small HTTP listener for it. What
//! every service exports is here too: its gRPC calls (`grpc`), and its process, build
//! and bus (`process`). Names follow Prometheus's conventions: the registry adds the
//! `trellis_` prefix and a counter's `_total`; units are seconds and bytes; labels
//! take a bounded set of values, never an id.

pub mod grpc;
pub mod process;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Writes a gauge read at scrape time (in a `Collector`).
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// Writes a counter read at scrape time (in a `Collector`).
pub fn encode_counter<N: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

/// Creates the series of `labels` in `family` (at 0), so that a scrape shows them
/// before anything happened and `rate()` sees the first increase.
pub fn precreate<S, M, C>(family: &Family<S, M, C>, labels: impl IntoIterator<Item = S>)
where
    S: Clone + std::hash::Hash + Eq,
    C: MetricConstructor<M>,
{
    for set in labels {
        drop(family.get_or_create(&set));
    }
}
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
