//! One configuration for every Trellis process.
//!
//! Layers, later ones winning: built-in defaults, `/etc/trellis/trellis.toml` (or
//! `--config`), the drop-ins `trellis.d/*.toml` beside it in lexical order, environment
//! variables `TRELLIS_<SECTION>_<KEY>`, then `--set section.key=value` flags. Every
//! error names where the bad value came from (file, variable or flag), the key, and
//! what is expected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use bus::BusConfig;

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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name in NATS subjects; empty means the host name.
    pub name: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Where `trellis up` finds the service binaries; empty means beside `trellis`.
    pub bin_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// A tracing filter directive, for example `info` or `info,trellis_gateway=debug`.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// The kubelet's CRI socket; empty means `<run_dir>/trellis.sock`.
    pub socket: String,
    pub socket_mode: String,
    /// Prometheus listener, e.g. `127.0.0.1:9460`; empty means none.
    pub metrics_listen: String,
    /// How long an idempotent read waits for a restarting backend.
    pub backend_retry_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub socket: String,
    pub socket_mode: String,
    pub metrics_listen: String,
    /// OCI runtime binary (name looked up in PATH, or a path) for the default handler.
    pub oci_runtime: String,
    /// More runtime handlers, as `name=binary` (e.g. `crun=/usr/bin/crun`), chosen by
    /// the CRI request's runtime handler.
    pub runtime_handlers: Vec<String>,
    pub conmon: String,
    /// Stop timeout (seconds) when the kubelet gives none.
    pub default_stop_timeout_seconds: u64,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    pub socket: String,
    pub socket_mode: String,
    pub metrics_listen: String,
    /// `registry=url` pairs: mirrors tried in order before the registry itself, e.g.
    /// `docker.io=http://127.0.0.1:5000`. A path in the URL prefixes the repository.
    pub mirrors: Vec<String>,
    /// Registries reached over plain HTTP (`host` or `host:port`). Loopback always is.
    pub insecure_registries: Vec<String>,
    /// A docker-style `config.json` with per-registry credentials; empty means none.
    pub credentials_file: String,
    /// A pull that receives nothing for this long is cancelled.
    pub pull_progress_timeout_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub socket: String,
    pub socket_mode: String,
    pub metrics_listen: String,
    /// A layer whose uncompressed tar stream is larger is refused (ResourceExhausted);
    /// 0 = no limit.
    pub max_layer_bytes: u64,
    /// A layer that grows more than this many times its compressed size is refused as a
    /// decompression bomb, once past `COMPRESSION_RATIO_GRACE_BYTES`; 0 = no limit.
    pub max_compression_ratio: u64,
}

/// Uncompressed bytes any layer may reach before `storage.max_compression_ratio`
/// applies: small layers of zeros or text compress far beyond any sane ratio.
pub const COMPRESSION_RATIO_GRACE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    pub socket: String,
    pub socket_mode: String,
    pub metrics_listen: String,
    pub cni_config_dir: PathBuf,
    pub cni_plugin_dirs: Vec<PathBuf>,
    /// CNI plugin chains (ADD or DEL) run at once at most; more wait their turn, first
    /// come first served. 0 = two per CPU (plugins also wait on the network and locks).
    pub max_parallel_cni: u64,
}

const INTERNAL_SOCKET_MODE: &str = "0600";

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: INTERNAL_SOCKET_MODE.into(),
            metrics_listen: String::new(),
            mirrors: Vec::new(),
            insecure_registries: Vec::new(),
            credentials_file: String::new(),
            pull_progress_timeout_seconds: 60,
        }
    }
}

impl ImageConfig {
    /// The mirrors configured for `registry`, in order, as `(scheme, host, path prefix)`.
    pub fn mirrors_of(&self, registry: &str) -> Vec<MirrorEndpoint> {
        self.mirrors
            .iter()
            .filter_map(|entry| parse_mirror(entry))
            .filter(|(name, _)| name == registry)
            .map(|(_, mirror)| mirror)
            .collect()
    }
}

/// One mirror of a registry.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorEndpoint {
    pub plain_http: bool,
    /// `host` or `host:port`.
    pub host: String,
    /// Repository prefix (no leading or trailing `/`), often empty.
    pub prefix: String,
}

fn parse_mirror(entry: &str) -> Option<(String, MirrorEndpoint)> {
    let (registry, url) = entry.split_once('=')?;
    let (plain_http, rest) = match url.trim().split_once("://")? {
        ("http", rest) => (true, rest),
        ("https", rest) => (false, rest),
        _ => return None,
    };
    let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if registry.trim().is_empty() || host.is_empty() {
        return None;
    }
    Some((
        registry.trim().to_string(),
        MirrorEndpoint {
            plain_http,
            host: host.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        },
    ))
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: INTERNAL_SOCKET_MODE.into(),
            metrics_listen: String::new(),
            // Larger than any layer seen in practice (CUDA images stay under 10 GiB).
            max_layer_bytes: 32 * 1024 * 1024 * 1024,
            // gzip of real file trees stays under 10:1; zeros reach 1000:1.
            max_compression_ratio: 100,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            state_dir: PathBuf::from("/var/lib/trellis"),
            run_dir: PathBuf::from("/run/trellis"),
            bin_dir: String::new(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: "text".into(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: "0660".into(),
            metrics_listen: String::new(),
            backend_retry_ms: 10_000,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: INTERNAL_SOCKET_MODE.into(),
            metrics_listen: String::new(),
            oci_runtime: "runc".into(),
            runtime_handlers: vec!["runc=runc".into(), "crun=crun".into()],
            conmon: "conmon".into(),
            default_stop_timeout_seconds: 10,
            pause_image: "registry.k8s.io/pause:3.9".into(),
            streaming_address: "127.0.0.1:0".into(),
            max_parallel_creates: 0,
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            socket: String::new(),
            socket_mode: INTERNAL_SOCKET_MODE.into(),
            metrics_listen: String::new(),
            cni_config_dir: PathBuf::from("/etc/cni/net.d"),
            cni_plugin_dirs: vec![PathBuf::from("/usr/lib/cni"), PathBuf::from("/opt/cni/bin")],
            max_parallel_cni: 0,
        }
    }
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

    /// Whether the service keeps records (and so an event outbox) under the state dir.
    pub fn is_stateful(self) -> bool {
        !matches!(self, Self::Gateway)
    }
}

/// Where a service listens and how it is exposed.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub metrics_listen: Option<SocketAddr>,
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

    /// A service's own state directory, `<state_dir>/<service>`.
    pub fn state_dir(&self, service: ServiceKind) -> PathBuf {
        self.node.state_dir.join(service.name())
    }

    pub fn endpoint(&self, service: ServiceKind) -> Endpoint {
        let (socket, mode, metrics) = match service {
            ServiceKind::Gateway => (
                &self.gateway.socket,
                &self.gateway.socket_mode,
                &self.gateway.metrics_listen,
            ),
            ServiceKind::Runtime => (
                &self.runtime.socket,
                &self.runtime.socket_mode,
                &self.runtime.metrics_listen,
            ),
            ServiceKind::Image => (
                &self.image.socket,
                &self.image.socket_mode,
                &self.image.metrics_listen,
            ),
            ServiceKind::Storage => (
                &self.storage.socket,
                &self.storage.socket_mode,
                &self.storage.metrics_listen,
            ),
            ServiceKind::Network => (
                &self.network.socket,
                &self.network.socket_mode,
                &self.network.metrics_listen,
            ),
        };
        let socket = if socket.is_empty() {
            let file = if service == ServiceKind::Gateway {
                "trellis.sock".to_string()
            } else {
                format!("{}.sock", service.name())
            };
            self.node.run_dir.join(file)
        } else {
            PathBuf::from(socket)
        };
        Endpoint {
            socket,
            // Both were checked by `validate`; the fallbacks are never used.
            socket_mode: parse_mode(mode).unwrap_or(0o600),
            metrics_listen: metrics.parse().ok(),
        }
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

fn parse_mode(raw: &str) -> Option<u32> {
    u32::from_str_radix(raw.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
}

/// How the configuration is to be found and overridden.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// An explicit file (from `--config` or `TRELLIS_CONFIG`); it must exist.
    pub file: Option<PathBuf>,
    /// `section.key=value` overrides from flags.
    pub overrides: Vec<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        self.load_with_env(&env)
    }

    pub fn load_with_env(&self, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let defaults = toml::Value::try_from(Config::default())
            .map_err(|e| ConfigError::Merge(e.to_string()))?;
        let mut merged = defaults.clone();
        let mut provenance = Provenance::default();

        let explicit = self.file.clone().or_else(|| {
            env.iter()
                .find(|(k, _)| k == CONFIG_FILE_ENV)
                .map(|(_, v)| PathBuf::from(v))
        });
        let file = explicit
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
        if explicit.is_some() || file.exists() {
            merge_file(&file, &mut merged, &mut provenance)?;
        }
        for dropin in dropins(&file)? {
            merge_file(&dropin, &mut merged, &mut provenance)?;
        }

        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Only variables naming one of our sections are configuration; a typo in
            // a key of a known section is an error, other TRELLIS_ variables are not ours.
            let names_a_section = rest
                .split_once('_')
                .is_some_and(|(section, _)| defaults.get(section.to_ascii_lowercase()).is_some());
            if name == CONFIG_FILE_ENV || !names_a_section {
                continue;
            }
            let key = env_key(rest, &defaults).ok_or_else(|| ConfigError::UnknownKey {
                source_name: format!("environment variable {name}"),
                key: rest.to_ascii_lowercase(),
                known: known_keys(&defaults).join(", "),
            })?;
            apply_override(
                &mut merged,
                &defaults,
                &key,
                value,
                &format!("environment variable {name}"),
                &mut provenance,
            )?;
        }
        for flag in &self.overrides {
            let (key, value) = flag
                .split_once('=')
                .ok_or_else(|| ConfigError::BadFlag(format!("--set {flag}")))?;
            apply_override(
                &mut merged,
                &defaults,
                key.trim(),
                value,
                &format!("flag --set {flag}"),
                &mut provenance,
            )?;
        }

        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Merge(e.to_string()))?;
        validate(&config, &provenance)?;
        Ok(config)
    }
}

fn dropins(file: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = file
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join("trellis.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::ReadDir { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| ConfigError::ReadDir {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Which layer set each key, so that a bad value can be traced to its origin.
#[derive(Debug, Default)]
struct Provenance(BTreeMap<String, String>);

impl Provenance {
    fn source_of(&self, key: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| "built-in default".into())
    }
}

fn merge_file(
    path: &Path,
    merged: &mut toml::Value,
    provenance: &mut Provenance,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // Parsing the file alone as a whole configuration checks its keys and types and
    // gives serde's message (line, column, key, expected type) for this one file.
    let file_error = |e: toml::de::Error| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    };
    toml::from_str::<Config>(&text).map_err(file_error)?;
    let table: toml::Table = toml::from_str(&text).map_err(file_error)?;
    let source = format!("configuration file {}", path.display());
    for (section, values) in table {
        let Some(values) = values.as_table() else {
            continue;
        };
        for (key, value) in values {
            let path = format!("{section}.{key}");
            set_path(merged, &path, value.clone());
            provenance.0.insert(path, source.clone());
        }
    }
    Ok(())
}

/// `GATEWAY_BACKEND_RETRY_MS` → `gateway.backend_retry_ms`: section names hold no `_`.
fn env_key(rest: &str, defaults: &toml::Value) -> Option<String> {
    let lower = rest.to_ascii_lowercase();
    let (section, key) = lower.split_once('_')?;
    defaults.get(section)?.get(key)?;
    Some(format!("{section}.{key}"))
}

fn known_keys(defaults: &toml::Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(sections) = defaults.as_table() {
        for (section, values) in sections {
            if let Some(values) = values.as_table() {
                keys.extend(values.keys().map(|key| format!("{section}.{key}")));
            }
        }
    }
    keys
}

fn apply_override(
    merged: &mut toml::Value,
    defaults: &toml::Value,
    key: &str,
    raw: &str,
    source_name: &str,
    provenance: &mut Provenance,
) -> Result<(), ConfigError> {
    let default = key
        .split_once('.')
        .and_then(|(section, field)| defaults.get(section)?.get(field))
        .ok_or_else(|| ConfigError::UnknownKey {
            source_name: source_name.to_string(),
            key: key.to_string(),
            known: known_keys(defaults).join(", "),
        })?;
    let bad = |expected: &str| ConfigError::BadValue {
        source_name: source_name.to_string(),
        key: key.to_string(),
        expected: expected.to_string(),
        value: raw.to_string(),
    };
    let value = match default {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim()
                .parse::<u64>()
                .ok()
                .and_then(|v| i64::try_from(v).ok())
                .ok_or_else(|| bad("a non-negative integer"))?,
        ),
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?)
        }
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        _ => return Err(bad("a value that can be given as text")),
    };
    set_path(merged, key, value);
    provenance
        .0
        .insert(key.to_string(), source_name.to_string());
    Ok(())
}

fn set_path(root: &mut toml::Value, key: &str, value: toml::Value) {
    let Some((section, field)) = key.split_once('.') else {
        return;
    };
    if let Some(table) = root.get_mut(section).and_then(toml::Value::as_table_mut) {
        table.insert(field.to_string(), value);
    }
}

fn validate(config: &Config, provenance: &Provenance) -> Result<(), ConfigError> {
    let bad = |key: &str, expected: &str, value: &str| ConfigError::BadValue {
        source_name: provenance.source_of(key),
        key: key.to_string(),
        expected: expected.to_string(),
        value: value.to_string(),
    };
    if !config.node.name.is_empty() && sanitize_subject_token(&config.node.name) != config.node.name
    {
        return Err(bad(
            "node.name",
            "letters, digits, '-' and '_' only (it is a NATS subject token)",
            &config.node.name,
        ));
    }
    for (key, path) in [
        ("node.state_dir", &config.node.state_dir),
        ("node.run_dir", &config.node.run_dir),
        ("network.cni_config_dir", &config.network.cni_config_dir),
    ] {
        if !path.is_absolute() {
            return Err(bad(key, "an absolute path", &path.display().to_string()));
        }
    }
    bus::validate(&config.bus, provenance)?;
    if tracing_subscriber::EnvFilter::try_new(&config.telemetry.log_level).is_err() {
        return Err(bad(
            "telemetry.log_level",
            "a tracing filter such as `info` or `warn,trellis_gateway=debug`",
            &config.telemetry.log_level,
        ));
    }
    if !["text", "json"].contains(&config.telemetry.log_format.as_str()) {
        return Err(bad(
            "telemetry.log_format",
            "`text` or `json`",
            &config.telemetry.log_format,
        ));
    }
    for handler in &config.runtime.runtime_handlers {
        if !handler
            .split_once('=')
            .is_some_and(|(name, binary)| !name.trim().is_empty() && !binary.trim().is_empty())
        {
            return Err(bad(
                "runtime.runtime_handlers",
                "entries `name=binary`, e.g. `crun=/usr/bin/crun`",
                handler,
            ));
        }
    }
    for mirror in &config.image.mirrors {
        if parse_mirror(mirror).is_none() {
            return Err(bad(
                "image.mirrors",
                "entries `registry=http://host[:port][/prefix]` (or https://)",
                mirror,
            ));
        }
    }
    if config.image.pull_progress_timeout_seconds == 0 {
        return Err(bad(
            "image.pull_progress_timeout_seconds",
            "at least 1",
            "0",
        ));
    }
    let sections = [
        (
            "gateway",
            &config.gateway.socket,
            &config.gateway.socket_mode,
            &config.gateway.metrics_listen,
        ),
        (
            "runtime",
            &config.runtime.socket,
            &config.runtime.socket_mode,
            &config.runtime.metrics_listen,
        ),
        (
            "image",
            &config.image.socket,
            &config.image.socket_mode,
            &config.image.metrics_listen,
        ),
        (
            "storage",
            &config.storage.socket,
            &config.storage.socket_mode,
            &config.storage.metrics_listen,
        ),
        (
            "network",
            &config.network.socket,
            &config.network.socket_mode,
            &config.network.metrics_listen,
        ),
    ];
    for (section, socket, mode, metrics) in sections {
        if !socket.is_empty() && !Path::new(socket).is_absolute() {
            return Err(bad(
                &format!("{section}.socket"),
                "empty (the default under node.run_dir) or an absolute path",
                socket,
            ));
        }
        if parse_mode(mode).is_none() {
            return Err(bad(
                &format!("{section}.socket_mode"),
                "an octal file mode such as \"0600\"",
                mode,
            ));
        }
        if !metrics.is_empty() && metrics.parse::<SocketAddr>().is_err() {
            return Err(bad(
                &format!("{section}.metrics_listen"),
                "empty (no metrics listener) or an address such as 127.0.0.1:9460",
                metrics,
            ));
        }
    }
    Ok(())
}

mod bus;

#[cfg(test)]
mod tests;
