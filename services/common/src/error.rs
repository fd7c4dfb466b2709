use crate::bus::BusError;
use crate::config::ConfigError;
use crate::metrics::MetricsError;
use crate::store::StoreError;
use crate::telemetry::TelemetryError;
use crate::transport::TransportError;

/// Everything the shared service machinery can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the service: {0}")]
    Build(Box<dyn std::error::Error + Send + Sync>),
    #[error("gRPC server failed: {0}")]
    Serve(String),
}
