//! The `[bus]` section, and its checks at load time.
//!
//! A service connects to the bus in the background and retries for ever: a missing,
//! unreadable or malformed credentials file would only show as a bus that never
//! connects and an outbox that grows. Checking the files when the configuration is
//! loaded stops the process at once, naming the key, where it was set, and what is
//! wrong. Secrets (seeds, private keys) must be readable by their owner only, and are
//! never quoted: neither are passwords in a URL, which is refused (the URL is shown by
//! `trellis status` and in logs).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Provenance, sanitize_subject_token};
use crate::text::excerpt;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// NATS URL. Empty: `trellis up` starts a private nats-server and hands its URL
    /// to the services; a service started alone then runs without a bus and keeps
    /// its events in the outbox.
    pub url: String,
    /// JetStream stream holding recent events.
    pub stream: String,
    pub stream_max_age_seconds: u64,
    /// Copies of the stream JetStream keeps, on as many servers of a cluster (1 to 5;
    /// 3 for a three-server cluster, so that one server may fail). Used when the
    /// stream is created; an existing stream keeps its own and a difference is logged.
    pub stream_replicas: usize,
    /// Events kept on disk while the bus is unreachable; beyond it the oldest go.
    pub outbox_max_events: u64,
    pub publish_timeout_ms: u64,
    /// `nats-server` binary for the private bus of `trellis up`.
    pub nats_server: String,
    /// A NATS credentials file (user JWT and seed, `.creds`) for an external bus.
    pub credentials_file: String,
    /// A file holding an nkey user seed (`SU...`) for an external bus; `trellis up`
    /// hands each service of its private bus one of its own through this key.
    pub nkey_seed_file: String,
    /// PEM CA certificates the bus's server certificate must chain to; setting any
    /// `tls_*` key makes TLS mandatory.
    pub tls_ca_file: String,
    /// PEM client certificate for servers that verify clients (with `tls_key_file`).
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            stream: "TRELLIS_EVENTS".into(),
            stream_max_age_seconds: 24 * 3600,
            stream_replicas: 1,
            outbox_max_events: 100_000,
            publish_timeout_ms: 5_000,
            nats_server: "nats-server".into(),
            credentials_file: String::new(),
            nkey_seed_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

const SCHEMES: [&str; 4] = ["nats://", "tls://", "ws://", "wss://"];

/// What a file named by a bus key holds, and so how it is checked.
#[derive(Clone, Copy, PartialEq)]
enum Content {
    Creds,
    NkeySeed,
    Certificates,
    PrivateKey,
}

impl Content {
    fn is_secret(self) -> bool {
        matches!(self, Self::Creds | Self::NkeySeed | Self::PrivateKey)
    }
}

pub(super) fn validate(bus: &BusConfig, provenance: &Provenance) -> Result<(), ConfigError> {
    let bad = |key: &str, expected: &str, value: &str| ConfigError::BadValue {
        source_name: provenance.source_of(key),
        key: key.to_string(),
        expected: expected.to_string(),
        value: excerpt(value),
    };
    // async-nats takes a comma-separated list of servers.
    let urls: Vec<&str> = if bus.url.is_empty() {
        Vec::new()
    } else {
        bus.url.split(',').map(str::trim).collect()
    };
    for url in &urls {
        // Whatever the scheme, a user or password in the URL is a secret not to quote.
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let authority = rest.split('/').next().unwrap_or_default();
        if let Some((_, host)) = authority.rsplit_once('@') {
            let shown = format!("{scheme}://***@{host}");
            return Err(bad(
                "bus.url",
                "a URL without user or password (put credentials in bus.credentials_file or bus.nkey_seed_file: the URL is shown by `trellis status` and in logs)",
                &shown,
            ));
        }
        if !SCHEMES.iter().any(|known| url.starts_with(known)) {
            return Err(bad(
                "bus.url",
                "empty (private bus) or nats://, tls://, ws:// or wss:// URLs, comma-separated",
                url,
            ));
        }
    }
    // The stream name goes into JetStream API subjects and the generated server
    // configuration: no token separators, wildcards or quotes.
    if bus.stream.is_empty() || sanitize_subject_token(&bus.stream) != bus.stream {
        return Err(bad(
            "bus.stream",
            "a JetStream stream name of letters, digits, '-' and '_'",
            &bus.stream,
        ));
    }
    // JetStream's own bounds: one copy at least, five at most.
    if !(1..=5).contains(&bus.stream_replicas) {
        return Err(bad(
            "bus.stream_replicas",
            "1 to 5 (3 for a three-server NATS cluster)",
            &bus.stream_replicas.to_string(),
        ));
    }
    if bus.outbox_max_events == 0 {
        return Err(bad("bus.outbox_max_events", "at least 1", "0"));
    }
    let files = [
        (
            "bus.credentials_file",
            &bus.credentials_file,
            Content::Creds,
        ),
        ("bus.nkey_seed_file", &bus.nkey_seed_file, Content::NkeySeed),
        ("bus.tls_ca_file", &bus.tls_ca_file, Content::Certificates),
        (
            "bus.tls_cert_file",
            &bus.tls_cert_file,
            Content::Certificates,
        ),
        ("bus.tls_key_file", &bus.tls_key_file, Content::PrivateKey),
    ];
    for (key, path, _) in files.iter().filter(|(_, path, _)| !path.is_empty()) {
        if bus.url.is_empty() {
            return Err(bad(
                key,
                "empty while bus.url is empty (the private bus of `trellis up` makes its own credentials)",
                path,
            ));
        }
        if !Path::new(path.as_str()).is_absolute() {
            return Err(bad(key, "empty or an absolute path", path));
        }
    }
    if !bus.credentials_file.is_empty() && !bus.nkey_seed_file.is_empty() {
        return Err(bad(
            "bus.nkey_seed_file",
            "empty when bus.credentials_file is set (a service has one identity on the bus)",
            &bus.nkey_seed_file,
        ));
    }
    if bus.tls_cert_file.is_empty() != bus.tls_key_file.is_empty() {
        let (key, value) = if bus.tls_key_file.is_empty() {
            ("bus.tls_cert_file", &bus.tls_cert_file)
        } else {
            ("bus.tls_key_file", &bus.tls_key_file)
        };
        return Err(bad(
            key,
            "to be set together with the other of bus.tls_cert_file and bus.tls_key_file (a client certificate and its key)",
            value,
        ));
    }
    let tls = [&bus.tls_ca_file, &bus.tls_cert_file, &bus.tls_key_file]
        .iter()
        .any(|file| !file.is_empty());
    if tls && urls.iter().any(|url| url.starts_with("ws://")) {
        return Err(bad(
            "bus.url",
            "wss:// (not ws://) when bus.tls_* files are set",
            &bus.url,
        ));
    }
    for (key, path, content) in files {
        if !path.is_empty() {
            check_file(key, path, content, provenance)?;
        }
    }
    Ok(())
}

fn check_file(
    key: &str,
    path: &str,
    content: Content,
    provenance: &Provenance,
) -> Result<(), ConfigError> {
    let fail = |problem: String| ConfigError::BadFile {
        source_name: provenance.source_of(key),
        key: key.to_string(),
        path: excerpt(path),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
    if !meta.is_file() {
        return Err(fail("is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if content.is_secret() && mode & 0o077 != 0 {
        return Err(fail(format!(
            "other users may read or change (mode {mode:04o}); it holds a secret: make it 0600 and owned by the service's user"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
    let problem = match content {
        Content::NkeySeed => match nkeys::KeyPair::from_seed(text.trim()) {
            Ok(pair) if pair.key_pair_type() == nkeys::KeyPairType::User => None,
            Ok(_) => Some("holds an nkey seed that is not a user's (a user seed starts with SU)"),
            Err(_) => Some("does not hold an nkey user seed (one line starting with SU, as `nk -gen user` writes)"),
        },
        Content::Creds => async_nats::ConnectOptions::new().credentials(&text).err().map(|_| "is not a NATS credentials file (a user JWT and an nkey seed, as `nsc generate creds` writes)"),
        Content::Certificates => {
            use rustls_pki_types::pem::PemObject;
            let certificates = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes()).collect::<Result<Vec<_>, _>>();
            (!certificates.is_ok_and(|c| !c.is_empty())).then_some("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        }
        Content::PrivateKey => {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::PrivateKeyDer::from_pem_slice(text.as_bytes()).err().map(|_| "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")
        }
    };
    match problem {
        Some(problem) => Err(fail(problem.to_string())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
