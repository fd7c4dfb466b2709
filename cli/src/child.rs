//! Starting and stopping the node's child processes.
//!
//! Children get their own process group, so a Ctrl-C at the terminal reaches only
//! `trellis up`, which then stops them in order; and they are told (SIGHUP, their
//! parent-death signal) when `trellis up` itself dies, so a killed supervisor leaves
//! no orphans. SIGHUP rather than SIGTERM tells a service that the socket its starter
//! held is now its to remove; nats-server gets SIGTERM.
//!
//! A service child gets its listening socket, held by `trellis up`, with the
//! socket-activation protocol (see `trellis_common::activation`): as fd 3, with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`. The pid is known only in the child,
//! and setting a variable between fork and exec is not async-signal-safe, so a shell
//! sets it to its own pid (`$$`) and `exec`s the service, which keeps that pid.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
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
    /// The listening socket handed to the child (a copy of the one `trellis up`
    /// holds), under the name the service looks for.
    pub listen: Option<(Arc<OwnedFd>, String)>,
}

/// Where a shell finds the program it `exec`s with `LISTEN_PID` set.
const SHELL: &str = "/bin/sh";
const EXEC_WITH_LISTEN_PID: &str = r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#;

impl ChildSpec {
    pub fn spawn(&self) -> Result<Child, ChildError> {
        let mut command = match &self.listen {
            Some((socket, name)) => {
                let mut command = Command::new(SHELL);
                command
                    .arg("-c")
                    .arg(EXEC_WITH_LISTEN_PID)
                    .arg(&self.program)
                    .env("LISTEN_FDS", "1")
                    .env("LISTEN_FDNAMES", name);
                inherit::socket_as_fd3(&mut command, socket.clone());
                command
            }
            None => {
                let mut command = Command::new(&self.program);
                // Our own activation (trellis up under systemd) is not the child's.
                for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                    command.env_remove(key);
                }
                command
            }
        };
        command
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        // A service on a handed-down socket learns of the death as SIGHUP (see the
        // header); nats-server would take SIGHUP for "reload".
        let parent_death = if self.listen.is_some() {
            Signal::SIGHUP
        } else {
            Signal::SIGTERM
        };
        inherit::stop_with_parent(&mut command, parent_death);
        command.spawn().map_err(|source| ChildError::Spawn {
            program: self.program.clone(),
            source,
        })
    }
}

/// The one place `trellis` needs `unsafe`: hooks that run in the child between fork
/// and exec.
#[allow(unsafe_code)]
mod inherit {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::Arc;

    use nix::sys::signal::Signal;

    /// Puts `socket` at fd 3 of the child, open across exec. The parent's copy stays
    /// close-on-exec, so no other child gets it.
    pub fn socket_as_fd3(command: &mut tokio::process::Command, socket: Arc<OwnedFd>) {
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe dup2(2) and fcntl(2) calls; `socket` is kept open by the
        // parent (the Arc lives in the command) and only its number is read.
        unsafe {
            command.pre_exec(move || {
                let fd = socket.as_raw_fd();
                let target = crate::child::LISTEN_FD;
                if fd == target {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                    if flags < 0
                        || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC)
                            < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if nix::libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    pub fn stop_with_parent(command: &mut tokio::process::Command, signal: Signal) {
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe prctl(2) system call.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from)
            });
        }
    }
}

/// The first fd of the socket-activation protocol.
pub const LISTEN_FD: std::os::fd::RawFd = trellis_common::activation::FIRST_FD;

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
