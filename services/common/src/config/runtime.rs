//! The `[runtime]` section: the OCI runtimes pods run under, conmon, and the pause image.
//!
//! Runtime handlers (the CRI's `runtime_handler`, a RuntimeClass's `handler`) are
//! tables `[runtime.handlers.<name>]`, checked and parsed once when the configuration
//! is loaded; the runtime service looks a handler up by name, it never parses one.
//! Older files gave them as a list of `name=binary` strings (`runtime.runtime_handlers`):
//! `legacy` turns that into the tables.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::SocketMode;
use crate::text::excerpt;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub socket: String,
    pub socket_mode: SocketMode,
    pub metrics_listen: String,
    /// The default handler (the CRI's runtime handler ""), written as its binary alone:
    /// a name looked up in PATH, or a path.
    #[serde(
        serialize_with = "binary_only::serialize",
        deserialize_with = "binary_only::deserialize"
    )]
    pub oci_runtime: RuntimeHandler,
    /// More handlers by name, chosen by the CRI request's runtime handler.
    #[serde(deserialize_with = "named_handlers")]
    pub handlers: BTreeMap<String, RuntimeHandler>,
    pub conmon: String,
    /// Image of the pause process a pod gets when its containers share one PID
    /// namespace (pulled through the image service when missing).
    pub pause_image: String,
    /// Where the streaming server (Exec, Attach, PortForward URLs) listens, `host:port`;
    /// port 0 picks a free one. Bound on the first streaming request.
    pub streaming_address: String,
    /// OCI runtime creates run at once at most; more wait their turn, first come first
    /// served. 0 = one per CPU.
    pub max_parallel_creates: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let handler = |binary: &str| RuntimeHandler {
            binary: binary.into(),
        };
        Self {
            socket: String::new(),
            socket_mode: SocketMode::PRIVATE,
            metrics_listen: String::new(),
            oci_runtime: handler("runc"),
            handlers: BTreeMap::from([
                ("runc".to_string(), handler("runc")),
                ("crun".to_string(), handler("crun")),
            ]),
            conmon: "conmon".into(),
            pause_image: "registry.k8s.io/pause:3.9".into(),
            streaming_address: "127.0.0.1:0".into(),
            max_parallel_creates: 0,
        }
    }
}

impl RuntimeConfig {
    /// The handler a CRI request names: "" is the default (`oci_runtime`).
    pub fn handler(&self, name: &str) -> Option<&RuntimeHandler> {
        if name.is_empty() {
            Some(&self.oci_runtime)
        } else {
            self.handlers.get(name)
        }
    }
}

/// How the runtime service runs the containers of pods that name this handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "HandlerTable")]
pub struct RuntimeHandler {
    /// The OCI runtime binary (runc, crun or another with runc's command line): a name
    /// looked up in PATH, or a path.
    pub binary: String,
}

impl RuntimeHandler {
    pub fn new(binary: &str) -> Result<Self, String> {
        let binary = binary.trim();
        if binary.is_empty() || binary.chars().any(char::is_control) {
            return Err(format!(
                "expected an OCI runtime binary (a name in PATH or a path), got `{}`",
                excerpt(binary)
            ));
        }
        Ok(Self {
            binary: binary.to_string(),
        })
    }
}

/// A handler as written in the file, before its checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandlerTable {
    binary: String,
}

impl TryFrom<HandlerTable> for RuntimeHandler {
    type Error = String;

    fn try_from(table: HandlerTable) -> Result<Self, Self::Error> {
        RuntimeHandler::new(&table.binary)
    }
}

/// Kubernetes holds RuntimeClass handlers to DNS labels; the kubelet sends no other.
pub fn is_handler_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

fn named_handlers<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, RuntimeHandler>, D::Error> {
    let handlers = BTreeMap::<String, RuntimeHandler>::deserialize(deserializer)?;
    match handlers.keys().find(|name| !is_handler_name(name)) {
        Some(name) => Err(D::Error::custom(format!(
            "expected handler names of lowercase letters, digits and '-' (a DNS label, as Kubernetes RuntimeClass handlers are), got `{}`",
            excerpt(name)
        ))),
        None => Ok(handlers),
    }
}

/// `oci_runtime` is written as the default handler's binary alone.
mod binary_only {
    use super::*;

    pub fn serialize<S: Serializer>(
        handler: &RuntimeHandler,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&handler.binary)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<RuntimeHandler, D::Error> {
        let binary = String::deserialize(deserializer)?;
        RuntimeHandler::new(&binary).map_err(D::Error::custom)
    }
}
