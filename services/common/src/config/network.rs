//! The `[network]` section: the CNI configuration and plugins pods are set up with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Provenance, SocketMode};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub socket: String,
    pub socket_mode: SocketMode,
    pub metrics_listen: String,
    pub cni_config_dir: PathBuf,
    pub cni_plugin_dirs: Vec<PathBuf>,
    /// CNI plugin chains (ADD or DEL) run at once at most; more wait their turn, first
    /// come first served. 0 = two per CPU (plugins also wait on the network and locks).
    pub max_parallel_cni: u64,
    /// A CNI plugin that has not answered after this long is killed and its pod's
    /// set-up or tear-down fails naming it: a hung plugin must not hold a pod (and
    /// its per-sandbox lock) forever.
    pub cni_plugin_timeout_seconds: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: SocketMode::PRIVATE,
            metrics_listen: String::new(),
            cni_config_dir: PathBuf::from("/etc/cni/net.d"),
            cni_plugin_dirs: vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")],
            max_parallel_cni: 0,
            cni_plugin_timeout_seconds: 120,
        }
    }
}

impl NetworkConfig {
    pub(super) fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        if !self.cni_config_dir.is_absolute() {
            return Err(provenance.bad_value(
                "network.cni_config_dir",
                "an absolute path",
                &self.cni_config_dir.display().to_string(),
            ));
        }
        if self.cni_plugin_timeout_seconds == 0 {
            return Err(provenance.bad_value(
                "network.cni_plugin_timeout_seconds",
                "at least 1",
                "0",
            ));
        }
        Ok(())
    }
}
