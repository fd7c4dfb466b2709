//! The `[gateway]` section: the kubelet's CRI socket and how the gateway forwards.

use serde::{Deserialize, Serialize};

use super::SocketMode;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The kubelet's CRI socket; empty means `<run_dir>/trellis.sock`.
    pub socket: String,
    pub socket_mode: SocketMode,
    /// Prometheus listener, e.g. `127.0.0.1:9460`; empty means none.
    pub metrics_listen: String,
    /// How long an idempotent read waits for a restarting backend.
    pub backend_retry_ms: u64,
    /// Gateway processes accepting on the one CRI socket (1 to 8).
    pub replicas: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: SocketMode::GROUP,
            metrics_listen: String::new(),
            backend_retry_ms: 10_000,
            replicas: 1,
        }
    }
}
