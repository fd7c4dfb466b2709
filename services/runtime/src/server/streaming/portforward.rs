//! PortForward's glue: each forward the client asks for (paired by
//! `trellis_streaming::portforward`) is joined to a TCP connection to the port on the
//! pod's loopback.
//!
//! The socket has to be made inside the pod's network namespace: a dedicated thread
//! enters it (`setns`, which only affects that thread), connects, and hands the socket
//! over; a socket stays in the namespace it was made in. Host-network pods have no
//! namespace of their own and are reached from ours.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use trellis_common::text::excerpt;
use trellis_streaming::portforward::{Forward, Forwards};
use trellis_streaming::spdy::Connection;

use crate::error::RuntimeError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A port-forward the kubelet asked for, waiting for its client.
#[derive(Debug, Clone)]
pub struct PortForwardSession {
    pub sandbox_id: String,
    /// The pod's network namespace; `None` for a host-network pod.
    pub netns: Option<PathBuf>,
}

pub async fn serve(session: PortForwardSession, connection: Connection) {
    let mut forwards = Forwards::new(connection);
    while let Some(forward) = forwards.next().await {
        tokio::spawn(forward_one(session.netns.clone(), forward));
    }
    forwards.close().await;
}

async fn forward_one(netns: Option<PathBuf>, mut forward: Forward) {
    let result = match forward.port() {
        None => Err(RuntimeError::InvalidArgument(format!(
            "port-forward: bad port header `{}`",
            excerpt(forward.port_header())
        ))),
        Some(port) => match connect(netns, port).await {
            Err(error) => Err(error),
            Ok(socket) => {
                let (from_pod, to_pod) = socket.into_split();
                forward
                    .copy(from_pod, to_pod)
                    .await
                    .map_err(RuntimeError::from)
            }
        },
    };
    let failure = result.err().map(|error| {
        tracing::debug!(%error, "port-forward connection ended with an error");
        error.to_string()
    });
    forward.finish(failure.as_deref()).await;
}

/// A TCP connection to `port` on the pod's loopback (IPv4, else IPv6).
async fn connect(netns: Option<PathBuf>, port: u16) -> Result<tokio::net::TcpStream, RuntimeError> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("port-forward".into())
        .spawn(move || {
            let _ = sender.send(connect_in(netns, port));
        })
        .map_err(|source| RuntimeError::io("cannot start a port-forward thread", source))?;
    let socket = receiver
        .await
        .map_err(|_| RuntimeError::Streaming("the port-forward thread stopped".into()))??;
    socket
        .set_nonblocking(true)
        .map_err(|source| RuntimeError::io("port-forward socket", source))?;
    tokio::net::TcpStream::from_std(socket)
        .map_err(|source| RuntimeError::io("port-forward socket", source))
}

/// Runs on its own thread, which may enter the pod's network namespace and then ends.
fn connect_in(netns: Option<PathBuf>, port: u16) -> Result<std::net::TcpStream, RuntimeError> {
    if let Some(path) = &netns {
        let namespace = std::fs::File::open(path).map_err(|source| {
            RuntimeError::io(
                format!("cannot open the pod's network namespace {}", path.display()),
                source,
            )
        })?;
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            RuntimeError::system(
                format!(
                    "cannot enter the pod's network namespace {}",
                    path.display()
                ),
                e,
            )
        })?;
    }
    let mut last = None;
    for address in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ] {
        match std::net::TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(socket) => return Ok(socket),
            Err(error) => last = Some(error),
        }
    }
    let source = last.unwrap_or_else(|| std::io::Error::other("no address"));
    Err(RuntimeError::io(
        format!("cannot connect to port {port} in the pod"),
        source,
    ))
}
