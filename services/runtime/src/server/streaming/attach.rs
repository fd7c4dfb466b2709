//! Attach: the client joins the container's own stdio through conmon.
//!
//! conmon (given `--socket-dir-path`) listens on `attach` in the bundle, a
//! SOCK_SEQPACKET unix socket: each packet it sends is one read of the container's
//! output prefixed by a byte naming the pipe (2 stdout, 3 stderr; conmon's
//! `stdpipe_t`), and what a client sends goes to the container's stdin (conmon `-i`).
//! A client closing its sending side ends stdin when the container was created with
//! `stdin_once` (conmon without `--leave-stdin-open`). Terminal resizes go through
//! conmon's control fifo `ctl` as `1 <height> <width>\n`. The socket path can exceed
//! the 108 bytes of `sun_path`, so it is reached through `/proc/self/fd/<dir>/attach`.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use trellis_streaming::remotecommand::{self, Options, Outcome, Streams, TerminalSize};
use trellis_streaming::spdy::{Connection, Gone, StreamWriter};

use crate::error::RuntimeError;

const STDOUT_PIPE: u8 = 2;
const STDERR_PIPE: u8 = 3;
/// Stdin is passed in packets no larger than conmon reads at once.
const STDIN_PACKET: usize = 8192;
/// conmon's control message for a terminal resize.
const WIN_RESIZE_EVENT: u8 = 1;

/// An attach the kubelet asked for, waiting for its client.
#[derive(Debug, Clone)]
pub struct AttachSession {
    pub container_id: String,
    /// The container's bundle: conmon's `attach` socket and `ctl` fifo are there.
    pub bundle: PathBuf,
    pub options: Options,
}

pub async fn serve(session: AttachSession, connection: Connection, protocol: &'static str) {
    let Some((connection, mut streams)) =
        remotecommand::open(connection, protocol, &session.options).await
    else {
        return;
    };
    let outcome = match pass_through(&session, &mut streams, connection.gone()).await {
        Ok(()) => Outcome::Exited(0),
        Err(error) => Outcome::Failed(error.to_string()),
    };
    remotecommand::close(connection, streams, outcome).await;
}

/// Joins the client's streams to conmon's until the container or the client is gone.
async fn pass_through(
    session: &AttachSession,
    streams: &mut Streams,
    gone: Gone,
) -> Result<(), RuntimeError> {
    let (from_conmon, to_conmon) = connect(&session.bundle)?.into_split();
    // Without stdin our sending side stays open: closing it would end the
    // container's stdin for everyone (stdin_once).
    let (input, _keep_open) = match streams.stdin.take() {
        Some(from) => (Some(tokio::spawn(send_input(from, to_conmon))), None),
        None => (None, Some(to_conmon)),
    };
    let resizes = streams.resize.take().map(|data| {
        tokio::spawn(apply_resizes(
            remotecommand::resize_events(data),
            session.bundle.join("ctl"),
        ))
    });
    let result = tokio::select! {
        result = pass_output(from_conmon, streams.stdout.clone(), streams.stderr.clone()) => result,
        () = gone => Ok(()),
    };
    for task in [input, resizes].into_iter().flatten() {
        task.abort();
    }
    result
}

/// A connected SOCK_SEQPACKET socket: tokio's stream type serves it, each read
/// taking one packet and each write sending one.
fn connect(bundle: &Path) -> Result<UnixStream, RuntimeError> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_DIRECTORY)
        .open(bundle)
        .map_err(|source| RuntimeError::io(format!("cannot open {}", bundle.display()), source))?;
    let path = format!("/proc/self/fd/{}/attach", dir.as_raw_fd());
    let not_attachable = |error: rustix::io::Errno| {
        RuntimeError::io(
            format!(
                "cannot connect to conmon's attach socket in {}",
                bundle.display()
            ),
            error.into(),
        )
    };
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(not_attachable)?;
    let address = SocketAddrUnix::new(path.as_str()).map_err(not_attachable)?;
    rustix::net::connect(&socket, &address).map_err(not_attachable)?;
    let socket = std::os::unix::net::UnixStream::from(socket);
    socket
        .set_nonblocking(true)
        .map_err(|source| RuntimeError::io("attach socket", source))?;
    UnixStream::from_std(socket)
        .map_err(|source| RuntimeError::io("cannot poll the attach socket", source))
}

/// Passes the container's output to the client until conmon closes the socket (the
/// container is gone).
async fn pass_output(
    mut socket: OwnedReadHalf,
    stdout: Option<StreamWriter>,
    stderr: Option<StreamWriter>,
) -> Result<(), RuntimeError> {
    let mut packet = vec![0u8; 64 * 1024];
    loop {
        let n = match socket.read(&mut packet).await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(error) => return Err(RuntimeError::io("cannot read the attach socket", error)),
        };
        let writer = match packet[0] {
            STDOUT_PIPE => stdout.as_ref(),
            STDERR_PIPE => stderr.as_ref(),
            _ => None,
        };
        if let Some(writer) = writer {
            writer.write(&packet[1..n]).await?;
        }
    }
}

/// Passes the client's input to conmon; at its end, shuts our sending side so conmon
/// closes the container's stdin (for `stdin_once`).
async fn send_input(
    mut from: mpsc::Receiver<Vec<u8>>,
    mut socket: OwnedWriteHalf,
) -> Result<(), RuntimeError> {
    let broken = |error: io::Error| RuntimeError::io("cannot write to the attach socket", error);
    while let Some(chunk) = from.recv().await {
        for piece in chunk.chunks(STDIN_PACKET) {
            socket.write_all(piece).await.map_err(broken)?;
        }
    }
    socket.shutdown().await.map_err(broken)
}

async fn apply_resizes(
    mut sizes: mpsc::Receiver<TerminalSize>,
    control: PathBuf,
) -> Result<(), RuntimeError> {
    while let Some(size) = sizes.recv().await {
        let message = format!("{WIN_RESIZE_EVENT} {} {}\n", size.height, size.width);
        let control = control.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&control)?
                .write_all(message.as_bytes())
        })
        .await
        .map_err(|e| RuntimeError::Streaming(format!("resize stopped: {e}")))?
        .map_err(|source| RuntimeError::io("cannot ask conmon to resize the terminal", source))?;
    }
    Ok(())
}
