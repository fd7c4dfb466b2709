//! A nats-server configuration holding a node's users, their permissions, and
//! optionally TLS.
//!
//! It holds public keys only: the seeds stay in their own files, read by the service
//! they belong to. `trellis up` writes one for its private bus at every start; the
//! integration tests use it for the external buses they run.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::BusError;
use super::permissions::Permissions;

/// One user, known by the public key of its nkey.
#[derive(Debug, Clone)]
pub struct NatsUser {
    pub public_key: String,
    pub permissions: Permissions,
}

/// The server's certificate, and a CA to verify client certificates by (none: clients
/// are not asked for one).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// JetStream's store; the same layout as `nats-server -sd`.
    pub store_dir: PathBuf,
    pub users: Vec<NatsUser>,
    pub tls: Option<ServerTls>,
}

impl ServerConfig {
    pub fn render(&self) -> Result<String, BusError> {
        let mut text = String::from("# Written by Trellis; rewritten at every start.\n");
        let _ = writeln!(text, "listen: {}", quote(&self.listen.to_string())?);
        let _ = writeln!(
            text,
            "jetstream {{\n  store_dir: {}\n}}",
            quote_path(&self.store_dir)?
        );
        if let Some(tls) = &self.tls {
            let _ = writeln!(
                text,
                "tls {{\n  cert_file: {}\n  key_file: {}",
                quote_path(&tls.cert_file)?,
                quote_path(&tls.key_file)?
            );
            if let Some(ca) = &tls.client_ca_file {
                let _ = writeln!(text, "  ca_file: {}\n  verify: true", quote_path(ca)?);
            }
            text.push_str("}\n");
        }
        text.push_str("authorization {\n  users = [\n");
        for user in &self.users {
            let _ = writeln!(
                text,
                "    {{nkey: {}, permissions: {{publish: {}, subscribe: {}}}}}",
                quote(&user.public_key)?,
                subjects(&user.permissions.publish)?,
                subjects(&user.permissions.subscribe)?
            );
        }
        text.push_str("  ]\n}\n");
        Ok(text)
    }
}

/// An empty allow list means "anything" to nats-server, so nothing is said as a deny.
fn subjects(list: &[String]) -> Result<String, BusError> {
    if list.is_empty() {
        return Ok("{deny: [\">\"]}".into());
    }
    let quoted = list
        .iter()
        .map(|subject| quote(subject))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("{{allow: [{}]}}", quoted.join(", ")))
}

/// A double-quoted string of the nats-server configuration language: quoted so that
/// `$` (variables) and `#` (comments) are literal. Control characters cannot be said.
fn quote(value: &str) -> Result<String, BusError> {
    if value.chars().any(char::is_control) {
        return Err(BusError::ServerConfig(format!(
            "{} holds control characters",
            crate::text::excerpt(value)
        )));
    }
    Ok(format!(
        "\"{}\"",
        value.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

fn quote_path(path: &std::path::Path) -> Result<String, BusError> {
    let text = path
        .to_str()
        .ok_or_else(|| BusError::ServerConfig(format!("{} is not UTF-8", path.display())))?;
    quote(text)
}

#[cfg(test)]
mod tests;
