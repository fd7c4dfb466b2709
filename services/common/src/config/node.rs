//! The `[node]` and `[telemetry]` sections: what every process of a node shares.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Provenance, sanitize_subject_token};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name in NATS subjects; empty means the host name.
    pub name: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Where `trellis up` finds the service binaries; empty means beside `trellis`.
    pub bin_dir: String,
    /// How long a stopping service lets the calls it accepted finish before it cuts
    /// them (watch streams end at once, asked to come back).
    pub shutdown_grace_seconds: u64,
}

/// A stop that waits longer than this is a stuck service, not a drain.
pub const MAX_SHUTDOWN_GRACE_SECONDS: u64 = 600;

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            state_dir: PathBuf::from("/var/lib/trellis"),
            run_dir: PathBuf::from("/run/trellis"),
            bin_dir: String::new(),
            shutdown_grace_seconds: 10,
        }
    }
}

impl NodeConfig {
    pub(super) fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        if self.shutdown_grace_seconds > MAX_SHUTDOWN_GRACE_SECONDS {
            return Err(provenance.bad_value(
                "node.shutdown_grace_seconds",
                "at most 600 (seconds)",
                &self.shutdown_grace_seconds.to_string(),
            ));
        }
        if !self.name.is_empty() && sanitize_subject_token(&self.name) != self.name {
            return Err(provenance.bad_value(
                "node.name",
                "letters, digits, '-' and '_' only (it is a NATS subject token)",
                &self.name,
            ));
        }
        for (key, path) in [
            ("node.state_dir", &self.state_dir),
            ("node.run_dir", &self.run_dir),
        ] {
            if !path.is_absolute() {
                return Err(provenance.bad_value(
                    key,
                    "an absolute path",
                    &path.display().to_string(),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// A tracing filter directive, for example `info` or `info,trellis_gateway=debug`.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: "text".into(),
        }
    }
}

impl TelemetryConfig {
    pub(super) fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(provenance.bad_value(
                "telemetry.log_level",
                "a tracing filter such as `info` or `warn,trellis_gateway=debug`",
                &self.log_level,
            ));
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return Err(provenance.bad_value(
                "telemetry.log_format",
                "`text` or `json`",
                &self.log_format,
            ));
        }
        Ok(())
    }
}
