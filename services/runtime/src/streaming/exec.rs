//! Exec: `runc exec` in the container, its stdio wired to the client's streams.
//! Without a TTY through pipes; with one through a pty of ours (see `pty`). The exit
//! code of `runc exec` is the command's, and goes back on the error stream.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::{Child, Command};

use super::pty::{self, PtyMaster};
use super::remotecommand::{self, Options, Outcome, Streams};
use super::spdy::{Connection, copy_from_stream, copy_to_stream};
use crate::error::RuntimeError;

/// An exec the kubelet asked for, waiting for its client.
#[derive(Debug, Clone)]
pub struct ExecSession {
    pub container_id: String,
    /// The OCI runtime binary and its `--root`.
    pub runtime: PathBuf,
    pub runtime_root: PathBuf,
    pub cmd: Vec<String>,
    pub options: Options,
}

pub async fn serve(session: ExecSession, connection: Connection, protocol: &'static str) {
    let Some((connection, mut streams)) = remotecommand::open(connection, protocol, &session.options).await else { return };
    let result = if session.options.tty { run_with_tty(&session, &mut streams).await } else { run_with_pipes(&session, &mut streams).await };
    remotecommand::close(connection, streams, result.unwrap_or_else(|error| Outcome::Failed(error.to_string()))).await;
}

fn runc_exec(session: &ExecSession) -> Command {
    let mut command = Command::new(&session.runtime);
    command.arg("--root").arg(&session.runtime_root).arg("exec");
    command.kill_on_drop(true);
    command
}

fn spawn(mut command: Command, session: &ExecSession) -> Result<Child, RuntimeError> {
    command.arg(&session.container_id).args(&session.cmd);
    command.spawn().map_err(|source| RuntimeError::io(format!("cannot run {}", session.runtime.display()), source))
}

async fn wait(child: &mut Child) -> Result<i32, RuntimeError> {
    let status = child.wait().await.map_err(|source| RuntimeError::io("cannot wait for runc exec", source))?;
    Ok(status.code().unwrap_or(-1))
}

async fn run_with_pipes(session: &ExecSession, streams: &mut Streams) -> Result<Outcome, RuntimeError> {
    let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    let mut command = runc_exec(session);
    command.stdin(piped(streams.stdin.is_some())).stdout(piped(streams.stdout.is_some())).stderr(piped(streams.stderr.is_some()));
    let mut child = spawn(command, session)?;
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
    let code = wait(&mut child).await?;
    for output in outputs {
        if let Ok(Err(error)) = output.await {
            tracing::debug!(%error, "exec output was cut short");
        }
    }
    if let Some(input) = input {
        input.abort();
    }
    Ok(Outcome::Exited(code))
}

/// Both pipes as one reader type.
fn as_reader<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: R) -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    Box::new(pipe)
}

async fn run_with_tty(session: &ExecSession, streams: &mut Streams) -> Result<Outcome, RuntimeError> {
    let (master, slave) = pty::open()?;
    let as_stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(|source| RuntimeError::io("cannot share the terminal", source));
    let mut command = runc_exec(session);
    command.arg("--tty").stdin(as_stdio(&slave)?).stdout(as_stdio(&slave)?).stderr(as_stdio(&slave)?);
    let mut child = spawn(command, session)?;
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
    let runc = child.id();
    let resizes = streams.resize.take().map(|data| tokio::spawn(apply_resizes(remotecommand::resize_events(data), master, runc)));
    let code = wait(&mut child).await?;
    if let Some(output) = output
        && let Ok(Err(error)) = output.await
    {
        tracing::debug!(%error, "exec output was cut short");
    }
    for task in [input, resizes].into_iter().flatten() {
        task.abort();
    }
    Ok(Outcome::Exited(code))
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
