//! Starting and stopping the node's child processes.
//!
//! Children get their own process group, so a Ctrl-C at the terminal reaches only
//! `trellis up`, which then stops them in order; and they are asked (SIGTERM) to
//! stop if `trellis up` itself dies, so a killed supervisor leaves no orphans.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to start one child process.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ChildSpec {
    pub fn spawn(&self) -> Result<Child, ChildError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        parent_death::stop_with_parent(&mut command);
        command.spawn().map_err(|source| ChildError::Spawn {
            program: self.program.clone(),
            source,
        })
    }
}

#[allow(unsafe_code)]
mod parent_death {
    use nix::sys::signal::Signal;

    pub fn stop_with_parent(command: &mut tokio::process::Command) {
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe prctl(2) system call.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILLs. Returns how it ended.
pub async fn terminate(name: &str, child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(
                child = name,
                ?grace,
                "did not stop after SIGTERM; killing it"
            );
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    }
}

/// "exit status 1" or "killed by SIGKILL", for logs.
pub fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(signal) => format!("killed by {signal}"),
                Err(_) => format!("killed by signal {signal}"),
            },
            _ => "ended".to_string(),
        },
        Err(error) => format!("cannot be waited for: {error}"),
    }
}
