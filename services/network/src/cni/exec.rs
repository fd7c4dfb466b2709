//! Running one CNI plugin binary as the spec says: the operation in environment
//! variables, the network configuration on stdin, a result or an error on stdout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::result::CniErrorReply;
use crate::cni_config;

/// A plugin that has not answered after this long is killed: a hung plugin must not
/// hold a pod (and its per-sandbox lock) forever.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
        }
    }
}

impl std::fmt::Display for CniCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniExecError {
    #[error("CNI plugin `{plugin}` is not in {dirs}")]
    NotFound { plugin: String, dirs: String },
    #[error("cannot run CNI plugin `{plugin}` ({path}): {source}")]
    Spawn {
        plugin: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin `{plugin}` {command} for sandbox {sandbox_id}: {what}: {source}")]
    Io {
        plugin: String,
        command: CniCommand,
        sandbox_id: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin `{plugin}` {command} failed for sandbox {sandbox_id}: {reply}")]
    Failed {
        plugin: String,
        command: CniCommand,
        sandbox_id: String,
        reply: CniErrorReply,
    },
    #[error("CNI plugin `{plugin}` {command} failed for sandbox {sandbox_id} ({status}): {output}")]
    Crashed {
        plugin: String,
        command: CniCommand,
        sandbox_id: String,
        status: String,
        output: String,
    },
    #[error(
        "CNI plugin `{plugin}` {command} for sandbox {sandbox_id} answered an unreadable result: {message}"
    )]
    BadOutput {
        plugin: String,
        command: CniCommand,
        sandbox_id: String,
        message: String,
    },
    #[error(
        "CNI plugin `{plugin}` {command} for sandbox {sandbox_id} did not finish within {after:?}"
    )]
    Timeout {
        plugin: String,
        command: CniCommand,
        sandbox_id: String,
        after: Duration,
    },
}

impl CniExecError {
    /// The plugin's own error code, when it printed one.
    pub fn cni_code(&self) -> Option<u32> {
        match self {
            Self::Failed { reply, .. } => Some(reply.code),
            _ => None,
        }
    }

    pub fn plugin(&self) -> &str {
        match self {
            Self::NotFound { plugin, .. }
            | Self::Spawn { plugin, .. }
            | Self::Io { plugin, .. }
            | Self::Failed { plugin, .. }
            | Self::Crashed { plugin, .. }
            | Self::BadOutput { plugin, .. }
            | Self::Timeout { plugin, .. } => plugin,
        }
    }
}

/// What stays the same for every plugin of one operation on one pod.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub command: CniCommand,
    pub sandbox_id: &'a str,
    /// The namespace path; empty on DEL when the namespace is already gone.
    pub netns: &'a Path,
    pub interface: &'a str,
    /// `CNI_ARGS`: `key=value` pairs joined by `;`.
    pub args: &'a str,
    pub plugin_dirs: &'a [PathBuf],
}

/// Runs plugin `plugin` with `stdin`; the parsed stdout after ADD (a result), `None`
/// after DEL and CHECK, which print nothing on success.
pub async fn run_plugin(
    plugin: &str,
    invocation: &Invocation<'_>,
    stdin: &[u8],
) -> Result<Option<serde_json::Value>, CniExecError> {
    let command = invocation.command;
    let sandbox_id = invocation.sandbox_id.to_string();
    let path = cni_config::find_plugin(plugin, invocation.plugin_dirs).ok_or_else(|| {
        CniExecError::NotFound {
            plugin: plugin.to_string(),
            dirs: cni_config::describe_dirs(invocation.plugin_dirs),
        }
    })?;
    let cni_path = std::env::join_paths(invocation.plugin_dirs).unwrap_or_default();
    let mut child = tokio::process::Command::new(&path)
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", invocation.sandbox_id)
        .env("CNI_NETNS", invocation.netns)
        .env("CNI_IFNAME", invocation.interface)
        .env("CNI_ARGS", invocation.args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CniExecError::Spawn {
            plugin: plugin.to_string(),
            path: path.clone(),
            source,
        })?;
    let io_error = |what: &'static str| {
        let sandbox_id = sandbox_id.clone();
        move |source| CniExecError::Io {
            plugin: plugin.to_string(),
            command,
            sandbox_id,
            what,
            source,
        }
    };
    if let Some(mut pipe) = child.stdin.take() {
        match pipe.write_all(stdin).await {
            // A plugin may exit without reading its configuration (a DEL with nothing
            // to do); its exit status tells what happened.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => other.map_err(io_error("cannot write its configuration"))?,
        }
    }
    let output = match tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => output.map_err(io_error("cannot read its answer"))?,
        Err(_) => {
            return Err(CniExecError::Timeout {
                plugin: plugin.to_string(),
                command,
                sandbox_id,
                after: PLUGIN_TIMEOUT,
            });
        }
    };
    if !output.status.success() {
        if let Some(reply) = CniErrorReply::parse(&output.stdout) {
            return Err(CniExecError::Failed {
                plugin: plugin.to_string(),
                command,
                sandbox_id,
                reply,
            });
        }
        let text = [
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim(),
        ]
        .into_iter()
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
        return Err(CniExecError::Crashed {
            plugin: plugin.to_string(),
            command,
            sandbox_id,
            status: output.status.to_string(),
            output: text,
        });
    }
    if command != CniCommand::Add {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|e| CniExecError::BadOutput {
            plugin: plugin.to_string(),
            command,
            sandbox_id,
            message: format!("{e}: {}", String::from_utf8_lossy(&output.stdout)),
        })
}
