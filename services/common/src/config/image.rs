//! The `[image]` section: registries, their mirrors, and how long a pull may stall.
//!
//! Mirrors are written as `registry=url` strings (one list is easy to set from an
//! environment variable) and parsed once, when the configuration is loaded, into
//! [`Mirror`]s: a mirror the image service could not use stops the process naming
//! `image.mirrors`, where it used to be skipped at every pull without a word.

use serde::{Deserialize, Serialize};

use super::{ConfigError, Provenance, SocketMode};
use crate::text::excerpt;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub socket: String,
    pub socket_mode: SocketMode,
    pub metrics_listen: String,
    /// `registry=url` pairs: mirrors tried in order before the registry itself, e.g.
    /// `docker.io=http://127.0.0.1:5000`. A path in the URL prefixes the repository.
    pub mirrors: Vec<Mirror>,
    /// Registries reached over plain HTTP (`host` or `host:port`). Loopback always is.
    pub insecure_registries: Vec<String>,
    /// A docker-style `config.json` with per-registry credentials; empty means none.
    pub credentials_file: String,
    /// A pull that receives nothing for this long is cancelled.
    pub pull_progress_timeout_seconds: u64,
    /// Image service processes serving the node (1 to 8): replica 1 on `socket`,
    /// replica k on `image-k.sock` beside it. The gateway balances calls across them
    /// and fails over when one is down; image records are in storage, which all see.
    pub replicas: u32,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: SocketMode::PRIVATE,
            metrics_listen: String::new(),
            mirrors: Vec::new(),
            insecure_registries: Vec::new(),
            credentials_file: String::new(),
            pull_progress_timeout_seconds: 60,
            replicas: 1,
        }
    }
}

impl ImageConfig {
    /// The mirrors configured for `registry`, in order.
    pub fn mirrors_of(&self, registry: &str) -> Vec<MirrorEndpoint> {
        self.mirrors
            .iter()
            .filter(|mirror| mirror.registry == registry)
            .map(|mirror| mirror.endpoint.clone())
            .collect()
    }

    pub(super) fn validate(&self, provenance: &Provenance) -> Result<(), ConfigError> {
        if self.pull_progress_timeout_seconds == 0 {
            return Err(provenance.bad_value(
                "image.pull_progress_timeout_seconds",
                "at least 1",
                "0",
            ));
        }
        Ok(())
    }
}

/// One entry of `image.mirrors`: a mirror of one registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mirror {
    /// The registry mirrored, as image names spell it (`docker.io`, `host:port`).
    pub registry: String,
    pub endpoint: MirrorEndpoint,
}

/// Where a mirror is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorEndpoint {
    pub plain_http: bool,
    /// `host` or `host:port`.
    pub host: String,
    /// Repository prefix (no leading or trailing `/`), often empty.
    pub prefix: String,
}

impl std::str::FromStr for Mirror {
    type Err = String;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        parse_mirror(entry).ok_or_else(|| {
            format!(
                "expected entries `registry=http://host[:port][/prefix]` (or https://), got `{}`",
                excerpt(entry)
            )
        })
    }
}

impl TryFrom<String> for Mirror {
    type Error = String;

    fn try_from(entry: String) -> Result<Self, Self::Error> {
        entry.parse()
    }
}

fn parse_mirror(entry: &str) -> Option<Mirror> {
    let (registry, url) = entry.split_once('=')?;
    let (registry, url) = (registry.trim(), url.trim());
    // Both end up in URLs and log lines: no room for spaces or control characters.
    let unfit = |c: char| c.is_whitespace() || c.is_control();
    if registry.is_empty() || url.chars().chain(registry.chars()).any(unfit) {
        return None;
    }
    let (plain_http, rest) = match url.split_once("://")? {
        ("http", rest) => (true, rest),
        ("https", rest) => (false, rest),
        _ => return None,
    };
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return None;
    }
    Some(Mirror {
        registry: registry.to_string(),
        endpoint: MirrorEndpoint {
            plain_http,
            host: host.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        },
    })
}

impl From<Mirror> for String {
    fn from(mirror: Mirror) -> Self {
        let endpoint = &mirror.endpoint;
        let scheme = if endpoint.plain_http { "http" } else { "https" };
        let mut url = format!("{}={scheme}://{}", mirror.registry, endpoint.host);
        if !endpoint.prefix.is_empty() {
            url.push('/');
            url.push_str(&endpoint.prefix);
        }
        url
    }
}
