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

use tokio::process::Command;
use trellis_streaming::remotecommand::{self, Options, Outcome, Streams};
use trellis_streaming::spdy::{Connection, Gone, copy_from_stream, copy_to_stream};

use super::pty::{self, PtyMaster};
use crate::error::RuntimeError;
use crate::oci::{ConmonRunc, ExecProcess};

/// An exec the kubelet asked for, waiting for its client.
#[derive(Debug, Clone)]
pub struct ExecSession {
    pub container_id: String,
    /// The OCI runtime binary.
    pub runtime: PathBuf,
    pub cmd: Vec<String>,
    pub options: Options,
    pub oci: std::sync::Arc<ConmonRunc>,
}

pub async fn serve(session: ExecSession, connection: Connection, protocol: &'static str) {
    let Some((connection, mut streams)) =
        remotecommand::open(connection, protocol, &session.options).await
    else {
        return;
    };
    let gone = connection.gone();
    let result = if session.options.tty {
        run_with_tty(&session, &mut streams, gone).await
    } else {
        run_with_pipes(&session, &mut streams, gone).await
    };
    remotecommand::close(
        connection,
        streams,
        result.unwrap_or_else(|error| Outcome::Failed(error.to_string())),
    )
    .await;
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

fn spawn(
    session: &ExecSession,
    flags: &[&str],
    stdio: impl FnOnce(&mut Command) -> Result<(), RuntimeError>,
) -> Result<ExecProcess, RuntimeError> {
    session.oci.spawn_exec(
        &session.runtime,
        &session.container_id,
        &session.cmd,
        flags,
        stdio,
    )
}

/// Waits for `runc exec` to exit, or for the client to go away, then kills the
/// command and waits for runc to reap it.
async fn wait(running: &mut ExecProcess, gone: Gone) -> Result<Ended, RuntimeError> {
    tokio::select! {
        status = running.child.wait() => {
            let status = status.map_err(|source| RuntimeError::io("cannot wait for runc exec", source))?;
            Ok(Ended::Exited(status.code().unwrap_or(-1)))
        }
        () = gone => {
            tracing::info!("the client went away: killing the command");
            Ok(Ended::Abandoned(running.kill_command().await))
        }
    }
}

async fn run_with_pipes(
    session: &ExecSession,
    streams: &mut Streams,
    gone: Gone,
) -> Result<Outcome, RuntimeError> {
    let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    let mut running = spawn(session, &[], |command| {
        command
            .stdin(piped(streams.stdin.is_some()))
            .stdout(piped(streams.stdout.is_some()))
            .stderr(piped(streams.stderr.is_some()));
        Ok(())
    })?;
    let child = &mut running.child;
    let input = match (streams.stdin.take(), child.stdin.take()) {
        (Some(mut from), Some(to)) => Some(tokio::spawn(async move {
            copy_from_stream(&mut from, to).await
        })),
        _ => None,
    };
    let mut outputs = Vec::new();
    for (pipe, writer) in [
        (child.stdout.take().map(as_reader), streams.stdout.clone()),
        (child.stderr.take().map(as_reader), streams.stderr.clone()),
    ] {
        if let (Some(pipe), Some(writer)) = (pipe, writer) {
            outputs.push(tokio::spawn(
                async move { copy_to_stream(pipe, &writer).await },
            ));
        }
    }
    let ended = wait(&mut running, gone).await?;
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
fn as_reader<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    pipe: R,
) -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    Box::new(pipe)
}

async fn run_with_tty(
    session: &ExecSession,
    streams: &mut Streams,
    gone: Gone,
) -> Result<Outcome, RuntimeError> {
    let (master, slave) = pty::open()?;
    let as_stdio = |fd: &OwnedFd| {
        fd.try_clone()
            .map(Stdio::from)
            .map_err(|source| RuntimeError::io("cannot share the terminal", source))
    };
    let mut running = spawn(session, &["--tty"], |command| {
        command
            .stdin(as_stdio(&slave)?)
            .stdout(as_stdio(&slave)?)
            .stderr(as_stdio(&slave)?);
        Ok(())
    })?;
    // runc holds the slave now: the master reads EIO once runc is done with it.
    drop(slave);
    let input = match streams.stdin.take() {
        Some(mut from) => {
            let to = master.writer()?;
            Some(tokio::spawn(async move {
                copy_from_stream(&mut from, to)
                    .await
                    .map_err(RuntimeError::from)
            }))
        }
        None => None,
    };
    let output = match streams.stdout.clone() {
        Some(writer) => {
            let from = master.reader()?;
            Some(tokio::spawn(
                async move { copy_to_stream(from, &writer).await },
            ))
        }
        None => None,
    };
    let runc = running.child.id();
    let resizes = streams.resize.take().map(|data| {
        tokio::spawn(apply_resizes(
            remotecommand::resize_events(data),
            master,
            runc,
        ))
    });
    let ended = wait(&mut running, gone).await?;
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
async fn apply_resizes(
    mut sizes: tokio::sync::mpsc::Receiver<remotecommand::TerminalSize>,
    master: PtyMaster,
    runc: Option<u32>,
) -> Result<(), RuntimeError> {
    while let Some(size) = sizes.recv().await {
        master.resize(size)?;
        if let Some(pid) = runc.and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGWINCH,
            );
        }
    }
    Ok(())
}
