//! What every service section shares: its socket, the socket's mode, and its metrics
//! listener, and how they become the [`Endpoint`] a service serves on.
//!
//! A socket mode is parsed once, when the configuration is loaded, into a
//! [`SocketMode`]: a bad one stops the process naming its key, instead of being
//! found (or silently replaced) when the socket is bound.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, Provenance, ServiceKind};
use crate::text::excerpt;

/// The file mode of a service's socket, `0o000..=0o777`; written as an octal string
/// (`"0660"`) in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SocketMode(u32);

impl SocketMode {
    /// The internal services' sockets: their owner (root) only.
    pub const PRIVATE: SocketMode = SocketMode(0o600);
    /// The CRI socket: its owner and group (the kubelet may run in the group).
    pub const GROUP: SocketMode = SocketMode(0o660);

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl TryFrom<String> for SocketMode {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        let digits = raw.strip_prefix("0o").unwrap_or(&raw);
        // from_str_radix takes a leading sign; a mode has none.
        let mode = (!digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            .then(|| u32::from_str_radix(digits, 8).ok())
            .flatten()
            .filter(|mode| *mode <= 0o777);
        mode.map(SocketMode).ok_or_else(|| {
            format!(
                "expected an octal file mode such as \"0600\" (at most 0777), got `{}`",
                excerpt(&raw)
            )
        })
    }
}

impl From<SocketMode> for String {
    fn from(mode: SocketMode) -> Self {
        mode.to_string()
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Where a service listens and how it is exposed.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub metrics_listen: Option<SocketAddr>,
}

/// One service section's listener keys, borrowed.
struct Listener<'a> {
    socket: &'a str,
    mode: SocketMode,
    metrics: &'a str,
}

impl Config {
    fn listener(&self, service: ServiceKind) -> Listener<'_> {
        let (socket, mode, metrics) = match service {
            ServiceKind::Gateway => (
                &self.gateway.socket,
                self.gateway.socket_mode,
                &self.gateway.metrics_listen,
            ),
            ServiceKind::Runtime => (
                &self.runtime.socket,
                self.runtime.socket_mode,
                &self.runtime.metrics_listen,
            ),
            ServiceKind::Image => (
                &self.image.socket,
                self.image.socket_mode,
                &self.image.metrics_listen,
            ),
            ServiceKind::Storage => (
                &self.storage.socket,
                self.storage.socket_mode,
                &self.storage.metrics_listen,
            ),
            ServiceKind::Network => (
                &self.network.socket,
                self.network.socket_mode,
                &self.network.metrics_listen,
            ),
        };
        Listener {
            socket,
            mode,
            metrics,
        }
    }

    pub fn endpoint(&self, service: ServiceKind) -> Endpoint {
        let listener = self.listener(service);
        let socket = if listener.socket.is_empty() {
            let file = if service == ServiceKind::Gateway {
                "trellis.sock".to_string()
            } else {
                format!("{}.sock", service.name())
            };
            self.node.run_dir.join(file)
        } else {
            PathBuf::from(listener.socket)
        };
        Endpoint {
            socket,
            socket_mode: listener.mode.bits(),
            // Checked by `validate_listeners`: an address that does not parse is none.
            metrics_listen: listener.metrics.parse().ok(),
        }
    }
}

/// The most processes of one service a node runs.
pub const MAX_REPLICAS: u32 = 8;
/// Which replica (1-based) of its service a process is, as `trellis up` (or a unit)
/// says; unset is replica 1.
pub const REPLICA_ENV: &str = "TRELLIS_REPLICA";

impl Config {
    /// How many processes of `service` serve the node: the gateway and the image
    /// service may run several; the others own node state no second process may touch.
    pub fn replicas(&self, service: ServiceKind) -> u32 {
        match service {
            ServiceKind::Gateway => self.gateway.replicas,
            ServiceKind::Image => self.image.replicas,
            _ => 1,
        }
    }

    /// The socket replica `replica` (1-based) of `service` serves on: the gateways
    /// share the CRI socket (the kubelet knows one); image replica k > 1 has
    /// `<stem>-k.sock` beside replica 1's socket, so each can be reached on its own.
    pub fn replica_socket(&self, service: ServiceKind, replica: u32) -> PathBuf {
        let socket = self.endpoint(service).socket;
        if replica <= 1 || service == ServiceKind::Gateway {
            return socket;
        }
        let stem = socket
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        socket.with_file_name(format!("{stem}-{replica}.sock"))
    }

    /// Every socket of `service`'s replicas, replica 1's first (the gateways: one).
    pub fn replica_sockets(&self, service: ServiceKind) -> Vec<PathBuf> {
        let count = if service == ServiceKind::Gateway {
            1
        } else {
            self.replicas(service)
        };
        (1..=count.max(1))
            .map(|replica| self.replica_socket(service, replica))
            .collect()
    }
}

/// How replica `replica` of `service` is named in logs, `trellis status` and
/// `trellis restart`: the service's name, then `-k` from the second on.
pub fn replica_name(service: ServiceKind, replica: u32) -> String {
    if replica <= 1 {
        service.name().to_string()
    } else {
        format!("{}-{replica}", service.name())
    }
}

/// The socket and metrics keys of every section.
pub(super) fn validate_listeners(
    config: &Config,
    provenance: &Provenance,
) -> Result<(), ConfigError> {
    for service in ServiceKind::START_ORDER {
        let section = service.name();
        let replicas = config.replicas(service);
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(provenance.bad_value(
                &format!("{section}.replicas"),
                &format!("1 to {MAX_REPLICAS}"),
                &replicas.to_string(),
            ));
        }
        let listener = config.listener(service);
        if !listener.socket.is_empty() && !Path::new(listener.socket).is_absolute() {
            return Err(provenance.bad_value(
                &format!("{section}.socket"),
                "empty (the default under node.run_dir) or an absolute path",
                listener.socket,
            ));
        }
        if !listener.metrics.is_empty() && listener.metrics.parse::<SocketAddr>().is_err() {
            return Err(provenance.bad_value(
                &format!("{section}.metrics_listen"),
                "empty (no metrics listener) or an address such as 127.0.0.1:9460",
                listener.metrics,
            ));
        }
    }
    let supervisor = &config.supervisor.metrics_listen;
    if !supervisor.is_empty() && supervisor.parse::<SocketAddr>().is_err() {
        return Err(provenance.bad_value(
            "supervisor.metrics_listen",
            "empty (no metrics listener) or an address such as 127.0.0.1:9465",
            supervisor,
        ));
    }
    Ok(())
}
