//! Running one CNI plugin binary as the spec says: the operation in environment
//! variables, the network configuration on stdin, a result or an error on stdout.
//!
//! A plugin runs in a process group of its own, so that one that hangs past its
//! timeout, or whose call is given up, is killed with whatever it started (a shell
//! script's `sleep`, a helper holding its stdout open), not just its first process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use trellis_common::text::excerpt_to;

use super::result::CniErrorReply;
use crate::cni_config;

/// How much of a plugin's own output a message quotes.
const PLUGIN_TEXT_CHARS: usize = 500;

/// Where plugins are found and how long one may run (`network.cni_plugin_dirs`,
/// `network.cni_plugin_timeout_seconds`).
#[derive(Debug, Clone)]
pub struct Plugins {
    pub dirs: Vec<PathBuf>,
    pub timeout: Duration,
    /// Where each plugin's run time goes.
    pub metrics: crate::metrics::NetworkMetrics,
}

/// Kills a plugin's process group unless the plugin finished: on a timeout, and when
/// the call running it is dropped.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn finished(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            // Gone already is fine: the group's last process may have just exited.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    /// The name of one plugin run's span in a trace.
    pub fn span_name(self) -> &'static str {
        match self {
            CniCommand::Add => "cni.add",
            CniCommand::Del => "cni.del",
            CniCommand::Check => "cni.check",
        }
    }

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
    pub plugins: &'a Plugins,
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
    let dirs = &invocation.plugins.dirs;
    let timeout = invocation.plugins.timeout;
    let path = cni_config::find_plugin(plugin, dirs).ok_or_else(|| CniExecError::NotFound {
        plugin: plugin.to_string(),
        dirs: cni_config::describe_dirs(dirs),
    })?;
    let cni_path = std::env::join_paths(dirs).unwrap_or_default();
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(&path)
        .env_remove(trellis_common::notify::ENV)
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", invocation.sandbox_id)
        .env("CNI_NETNS", invocation.netns)
        .env("CNI_IFNAME", invocation.interface)
        .env("CNI_ARGS", invocation.args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CniExecError::Spawn {
            plugin: plugin.to_string(),
            path: path.clone(),
            source,
        })?;
    // The group is the plugin's pid (`process_group(0)`).
    let mut group = GroupGuard(
        child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw),
    );
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
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => {
            group.finished();
            invocation
                .plugins
                .metrics
                .observe_plugin(command.as_str(), plugin, started.elapsed());
            output.map_err(io_error("cannot read its answer"))?
        }
        Err(_) => {
            drop(group);
            tracing::warn!(plugin, %command, sandbox_id, ?timeout, "CNI plugin timed out; killed with its process group");
            return Err(CniExecError::Timeout {
                plugin: plugin.to_string(),
                command,
                sandbox_id,
                after: timeout,
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
            output: excerpt_to(&text, PLUGIN_TEXT_CHARS),
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
            message: excerpt_to(
                &format!("{e}: {}", String::from_utf8_lossy(&output.stdout)),
                PLUGIN_TEXT_CHARS,
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A plugin that starts a helper and hangs: past its timeout the call fails naming
    /// the plugin and the time, and neither the plugin nor its helper lives on.
    #[tokio::test]
    async fn a_hung_plugin_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pids = dir.path().join("pids");
        let script = format!(
            "#!/bin/sh\nsleep 600 &\necho $$ $! > {}\nwait\n",
            pids.display()
        );
        let plugin = dir.path().join("hang");
        std::fs::write(&plugin, script).expect("write plugin");
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755))
            .expect("chmod plugin");
        let plugins = Plugins {
            dirs: vec![dir.path().to_path_buf()],
            timeout: Duration::from_millis(500),
            metrics: Default::default(),
        };
        let invocation = Invocation {
            command: CniCommand::Add,
            sandbox_id: "sandbox-1",
            netns: Path::new("/proc/self/ns/net"),
            interface: "eth0",
            args: "",
            plugins: &plugins,
        };
        let started = std::time::Instant::now();
        let error = run_plugin("hang", &invocation, b"{}")
            .await
            .expect_err("hangs");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(error, CniExecError::Timeout { .. }), "{error}");
        let message = error.to_string();
        assert!(
            message.contains("`hang`") && message.contains("500ms"),
            "{message}"
        );
        let recorded = std::fs::read_to_string(&pids).expect("the plugin ran");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for pid in recorded.split_whitespace() {
            let proc_dir = Path::new("/proc").join(pid);
            // Killed; a zombie until its parent (tokio's reaper, or init) collects it.
            while proc_dir.exists()
                && !std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|stat| {
                    stat.rsplit(')')
                        .next()
                        .is_some_and(|s| s.trim_start().starts_with('Z'))
                })
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "process {pid} of the hung plugin lives on"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
