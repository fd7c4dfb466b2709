//! The connection of a service to the bus, with its identity and TLS.
//!
//! The files were checked when the configuration was loaded; they are read again here
//! because a service reconnects for as long as it lives. A service reaches the bus as
//! one NATS user of its own (nkey or JWT credentials), and its replies come back on an
//! inbox named after its node and service, so that its user needs no permission on
//! other clients' inboxes.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{ConnectOptions, Event};

use super::{BusError, permissions::inbox_prefix};
use crate::config::BusConfig;

pub(super) async fn connect(
    config: &BusConfig,
    node: &str,
    service: &'static str,
) -> Result<async_nats::Client, BusError> {
    let mut options = ConnectOptions::new()
        .name(format!("trellis-{service}"))
        .custom_inbox_prefix(inbox_prefix(node, service))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).min(1_000))
        })
        .event_callback(move |event| async move {
            match event {
                // Permission violations and refused credentials: the service keeps
                // running and retrying, so the log is where an operator finds out.
                Event::ServerError(_) | Event::ClientError(_) => {
                    tracing::warn!(%event, "event bus connection")
                }
                _ => tracing::info!(%event, "event bus connection"),
            }
        });
    let credential_error = |key: &'static str, path: &str| {
        let path = PathBuf::from(path);
        move |source: std::io::Error| BusError::Credentials { key, path, source }
    };
    if !config.credentials_file.is_empty() {
        options = options
            .credentials_file(&config.credentials_file)
            .await
            .map_err(credential_error(
                "bus.credentials_file",
                &config.credentials_file,
            ))?;
    } else if !config.nkey_seed_file.is_empty() {
        let seed = std::fs::read_to_string(&config.nkey_seed_file).map_err(credential_error(
            "bus.nkey_seed_file",
            &config.nkey_seed_file,
        ))?;
        options = options.nkey(seed.trim().to_string());
    } else {
        tracing::warn!(url = %config.url, "the event bus is reached without credentials: whoever can reach it can read and forge this node's events (set bus.nkey_seed_file or bus.credentials_file)");
    }
    if !config.tls_ca_file.is_empty() {
        options = options.add_root_certificates(PathBuf::from(&config.tls_ca_file));
    }
    if !config.tls_cert_file.is_empty() {
        options = options.add_client_certificate(
            PathBuf::from(&config.tls_cert_file),
            PathBuf::from(&config.tls_key_file),
        );
    }
    // Files for TLS mean TLS: a server (or someone in its place) that does not offer
    // it must not get the credentials in the clear.
    if [&config.tls_ca_file, &config.tls_cert_file]
        .iter()
        .any(|file| !file.is_empty())
    {
        options = options.require_tls(true);
    }
    // async-nats reads a string as one server: a cluster's list is handed over as a
    // list, and the client moves to another of its servers when one goes away.
    let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
    options
        .connect(servers.as_slice())
        .await
        .map_err(|source| BusError::Connect {
            url: config.url.clone(),
            source,
        })
}
