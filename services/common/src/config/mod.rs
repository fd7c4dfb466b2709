//! One configuration for every Trellis process.
//!
//! Layers, later ones winning: built-in defaults, `/etc/trellis/trellis.toml` (or
//! `--config`), the drop-ins `trellis.d/*.toml` beside it in lexical order, environment
//! variables `TRELLIS_<SECTION>_<KEY>`, then `--set section.key=value` flags. Every
//! error names where the bad value came from (file, variable or flag), the key, and
//! what is expected.
//!
//! Each section has a module of its own (its settings, defaults and checks); `load`
//! puts the layers together, and `legacy` reads the keys of older releases. Values
//! with a shape of their own (socket modes, mirrors, runtime handlers) are types,
//! parsed once when the configuration is loaded: a service never parses a setting.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use bus::BusConfig;
pub use endpoint::{Endpoint, MAX_REPLICAS, REPLICA_ENV, SocketMode, replica_name};
pub use gateway::GatewayConfig;
pub use image::{ImageConfig, Mirror, MirrorEndpoint};
pub use load::ConfigSource;
pub use network::NetworkConfig;
pub use node::{NodeConfig, TelemetryConfig};
pub use runtime::{RuntimeConfig, RuntimeHandler};
pub use storage::{COMPRESSION_RATIO_GRACE_BYTES, StorageConfig};
pub use supervisor::SupervisorConfig;

use load::Provenance;

mod bus;
mod endpoint;
mod gateway;
mod image;
mod legacy;
mod load;
mod network;
mod node;
mod runtime;
mod storage;
mod supervisor;

/// The default configuration file; a missing default file is not an error.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/trellis/trellis.toml";
/// Environment variable naming the configuration file (like `--config`).
pub const CONFIG_FILE_ENV: &str = "TRELLIS_CONFIG";
const ENV_PREFIX: &str = "TRELLIS_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list configuration drop-ins in {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{source_name}: unknown configuration key `{key}`; known keys are: {known}")]
    UnknownKey {
        source_name: String,
        key: String,
        known: String,
    },
    #[error("{source_name}: key `{key}` expects {expected}, got `{value}`")]
    BadValue {
        source_name: String,
        key: String,
        expected: String,
        value: String,
    },
    #[error("{source_name}: key `{key}`: {message}")]
    Invalid {
        source_name: String,
        key: String,
        message: String,
    },
    #[error("{source_name}: key `{key}` names {path}, which {problem}")]
    BadFile {
        source_name: String,
        key: String,
        path: String,
        problem: String,
    },
    #[error("{0}: expected `section.key=value`")]
    BadFlag(String),
    #[error("configuration does not form a valid whole: {0}")]
    Merge(String),
}

#[derive(Default, Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    pub gateway: GatewayConfig,
    pub runtime: RuntimeConfig,
    pub image: ImageConfig,
    pub storage: StorageConfig,
    pub network: NetworkConfig,
    pub supervisor: SupervisorConfig,
    /// What loading found that the operator should hear about (keys of older
    /// releases), logged as warnings once logging is up.
    #[serde(skip)]
    pub notices: Vec<String>,
}

/// How many of a heavy operation run at once: `configured`, or `per_cpu` per CPU for 0.
/// Bounding them near the cores finishes most of a burst early instead of all of it late.
pub fn parallelism(configured: u64, per_cpu: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism()
            .map_or(2, usize::from)
            .saturating_mul(per_cpu.max(1)),
        n => usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    }
}

/// The five services, in the order `trellis up` starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKind {
    Storage,
    Network,
    Image,
    Runtime,
    Gateway,
}

impl ServiceKind {
    pub const START_ORDER: [ServiceKind; 5] = [
        Self::Storage,
        Self::Network,
        Self::Image,
        Self::Runtime,
        Self::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Storage => "storage",
            Self::Network => "network",
            Self::Image => "image",
            Self::Runtime => "runtime",
            Self::Gateway => "gateway",
        }
    }

    pub fn binary(self) -> &'static str {
        match self {
            Self::Storage => "trellis-storage",
            Self::Network => "trellis-network",
            Self::Image => "trellis-image",
            Self::Runtime => "trellis-runtime",
            Self::Gateway => "trellis-gateway",
        }
    }

    /// Whether the only records the service keeps are its event outbox (the image
    /// service: image records are storage's). Such a service may overlap with its
    /// successor, which takes a second outbox while the first is held.
    pub fn keeps_only_an_outbox(self) -> bool {
        matches!(self, Self::Image)
    }

    /// Whether a call runs to its end when its caller goes away (`detach`): the
    /// services that change node state a half-done call would leave behind. Not the
    /// gateway, which passes a caller's leaving on to the service behind it, nor the
    /// image service, which stops a pull every caller left (and cleans up after it).
    pub fn runs_calls_to_their_end(self) -> bool {
        matches!(self, Self::Runtime | Self::Network | Self::Storage)
    }

    /// Whether the service keeps records (and so an event outbox) under the state dir.
    pub fn is_stateful(self) -> bool {
        !matches!(self, Self::Gateway)
    }
}

impl Config {
    pub fn node_name(&self) -> String {
        if !self.node.name.is_empty() {
            return self.node.name.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .map(|name: String| sanitize_subject_token(&name))
            .unwrap_or_else(|| "localhost".into())
    }

    /// Logs what loading found worth a warning; called once logging is up.
    pub fn log_notices(&self) {
        for notice in &self.notices {
            tracing::warn!("{notice}");
        }
    }

    /// A service's own state directory, `<state_dir>/<service>`.
    pub fn state_dir(&self, service: ServiceKind) -> PathBuf {
        self.node.state_dir.join(service.name())
    }
}

/// NATS subject tokens may not hold `.`, `*`, `>` or whitespace.
fn sanitize_subject_token(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Checks across keys and of values whose type alone does not say enough.
fn validate(config: &Config, provenance: &Provenance) -> Result<(), ConfigError> {
    config.node.validate(provenance)?;
    bus::validate(&config.bus, provenance)?;
    config.telemetry.validate(provenance)?;
    config.image.validate(provenance)?;
    config.network.validate(provenance)?;
    endpoint::validate_listeners(config, provenance)
}

#[cfg(test)]
mod tests;
