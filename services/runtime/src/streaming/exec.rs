//! Exec: `runc exec` in the container, its stdio wired to the client's streams.
//! Without a TTY through pipes; with one through a pty of ours (see `pty`). The exit
//! code of `runc exec` is the command's, and goes back on the error stream.
//!
//! A client that goes away (its connection closed or broken, or GOAWAY) takes the
//! command with it, as with containerd: SIGKILL to the command inside the container
//! (its pid from `runc exec --pid-file`; killing runc would leave it running), which
//! `runc exec` reaps before it exits itself, and every task of the session ends.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::pty::{self, PtyMaster};
use super::remotecommand::{self, Options, Outcome, Streams};
use super::spdy::{Connection, Gone, copy_from_stream, copy_to_stream};
use crate::error::RuntimeError;

/// After the client left: how long runc may take to start the command (write its pid)
/// and then to exit once it is killed, before runc itself is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often the pid file is looked for meanwhile.
const PID_POLL: Duration = Duration::from_millis(50);

/// An exec the kubelet asked for, waiting for its client.
#[derive(Debug, Clone)]
pub struct ExecSession {
    pub container_id: String,
    /// The OCI runtime binary and its `--root`.
    pub runtime: PathBuf,
    pub runtime_root: PathBuf,
    pub cmd: Vec<String>,
    pub options: Options,
    /// Where `runc exec --pid-file` writes the command's pid.
    pub pid_dir: PathBuf,
}

pub async fn serve(session: ExecSession, connection: Connection, protocol: &'static str) {
    let Some((connection, mut streams)) = remotecommand::open(connection, protocol, &session.options).await else { return };
    let gone = connection.gone();
    let result = if session.options.tty { run_with_tty(&session, &mut streams, gone).await } else { run_with_pipes(&session, &mut streams, gone).await };
    remotecommand::close(connection, streams, result.unwrap_or_else(|error| Outcome::Failed(error.to_string()))).await;
}

/// A running `runc exec` and the file it writes the command's pid to.
struct Running {
    child: Child,
    pid_file: PathBuf,
}

/// How `runc exec` ended.
enum Ended {
    Exited(i32),
    /// The client went away first and the command was killed.
    Abandoned(i32),
}

impl Ended {
    fn outcome(self) -> Outcome {
        match self {
            Ended::Exited(code) | Ended::Abandoned(code) => Outcome::Exited(code),
        }
    }
}

fn runc_exec(session: &ExecSession) -> Result<(Command, PathBuf), RuntimeError> {
    let pid_file = session.pid_dir.join(format!("exec-{}", crate::records::new_id()?));
    let mut command = Command::new(&session.runtime);
    command.arg("--root").arg(&session.runtime_root).arg("exec").arg("--pid-file").arg(&pid_file);
    command.kill_on_drop(true);
    Ok((command, pid_file))
}

fn spawn(mut command: Command, pid_file: PathBuf, session: &ExecSession) -> Result<Running, RuntimeError> {
    command.arg(&session.container_id).args(&session.cmd);
    let child = command.spawn().map_err(|source| RuntimeError::io(format!("cannot run {}", session.runtime.display()), source))?;
    Ok(Running { child, pid_file })
}

impl Running {
    /// Waits for `runc exec` to exit, or for the client to go away, then kills the
    /// command and waits for runc to reap it.
    async fn wait(&mut self, gone: Gone) -> Result<Ended, RuntimeError> {
        tokio::select! {
            status = self.child.wait() => {
                let status = status.map_err(|source| RuntimeError::io("cannot wait for runc exec", source))?;
                Ok(Ended::Exited(status.code().unwrap_or(-1)))
            }
            () = gone => {
                tracing::info!("the client went away: killing the command");
                Ok(Ended::Abandoned(self.kill().await))
            }
        }
    }

    /// SIGKILL to the command in the container, once runc has said its pid; runc
    /// itself when that does not end it within [`KILL_GRACE`].
    async fn kill(&mut self) -> i32 {
        let deadline = tokio::time::Instant::now() + KILL_GRACE;
        let mut killed = false;
        loop {
            if !killed && let Some(pid) = self.command_pid() {
                if let Err(error) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL) {
                    tracing::debug!(pid, %error, "cannot kill the exec'd command");
                }
                killed = true;
            }
            let wait = if killed { deadline.saturating_duration_since(tokio::time::Instant::now()) } else { PID_POLL };
            if let Ok(status) = tokio::time::timeout(wait, self.child.wait()).await {
                return status.ok().and_then(|s| s.code()).unwrap_or(-1);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        tracing::warn!("runc exec did not end with its command: killing it");
        let _ = self.child.start_kill();
        match tokio::time::timeout(KILL_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => status.code().unwrap_or(-1),
            _ => -1,
        }
    }

    fn command_pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok().filter(|pid| *pid > 0)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

async fn run_with_pipes(session: &ExecSession, streams: &mut Streams, gone: Gone) -> Result<Outcome, RuntimeError> {
    let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    let (mut command, pid_file) = runc_exec(session)?;
    command.stdin(piped(streams.stdin.is_some())).stdout(piped(streams.stdout.is_some())).stderr(piped(streams.stderr.is_some()));
    let mut running = spawn(command, pid_file, session)?;
    let child = &mut running.child;
    let input = match (streams.stdin.take(), child.stdin.take()) {
        (Some(mut from), Some(to)) => Some(tokio::spawn(async move { copy_from_stream(&mut from, to).await })),
        _ => None,
    };
    let mut outputs = Vec::new();
    for (pipe, writer) in [(child.stdout.take().map(as_reader), streams.stdout.clone()), (child.stderr.take().map(as_reader), streams.stderr.clone())] {
        if let (Some(pipe), Some(writer)) = (pipe, writer) {
            outputs.push(tokio::spawn(async move { copy_to_stream(pipe, &writer).await }));
        }
    }
    let ended = running.wait(gone).await?;
    for output in outputs {
        // Nobody reads what is left once the client is gone (and a child of the
        // command may still hold the pipes).
        if let Ended::Abandoned(_) = ended {
            output.abort();
        } else if let Ok(Err(error)) = output.await {
            tracing::debug!(%error, "exec output was cut short");
        }
    }
    if let Some(input) = input {
        input.abort();
    }
    Ok(ended.outcome())
}

/// Both pipes as one reader type.
fn as_reader<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: R) -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    Box::new(pipe)
}

async fn run_with_tty(session: &ExecSession, streams: &mut Streams, gone: Gone) -> Result<Outcome, RuntimeError> {
    let (master, slave) = pty::open()?;
    let as_stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(|source| RuntimeError::io("cannot share the terminal", source));
    let (mut command, pid_file) = runc_exec(session)?;
    command.arg("--tty").stdin(as_stdio(&slave)?).stdout(as_stdio(&slave)?).stderr(as_stdio(&slave)?);
    let mut running = spawn(command, pid_file, session)?;
    // runc holds the slave now: the master reads EIO once runc is done with it.
    drop(slave);
    let input = match streams.stdin.take() {
        Some(mut from) => {
            let to = master.writer()?;
            Some(tokio::spawn(async move { copy_from_stream(&mut from, to).await }))
        }
        None => None,
    };
    let output = match streams.stdout.clone() {
        Some(writer) => {
            let from = master.reader()?;
            Some(tokio::spawn(async move { copy_to_stream(from, &writer).await }))
        }
        None => None,
    };
    let runc = running.child.id();
    let resizes = streams.resize.take().map(|data| tokio::spawn(apply_resizes(remotecommand::resize_events(data), master, runc)));
    let ended = running.wait(gone).await?;
    // runc has exited and closed the slave: the master's blocking read ends (EIO).
    if let Some(output) = output {
        if let Ended::Abandoned(_) = ended {
            output.abort();
        } else if let Ok(Err(error)) = output.await {
            tracing::debug!(%error, "exec output was cut short");
        }
    }
    for task in [input, resizes].into_iter().flatten() {
        task.abort();
    }
    Ok(ended.outcome())
}

/// Sets the size on our terminal, then has runc (SIGWINCH) copy it to the container's.
async fn apply_resizes(mut sizes: tokio::sync::mpsc::Receiver<remotecommand::TerminalSize>, master: PtyMaster, runc: Option<u32>) -> Result<(), RuntimeError> {
    while let Some(size) = sizes.recv().await {
        master.resize(size)?;
        if let Some(pid) = runc.and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGWINCH);
        }
    }
    Ok(())
}
