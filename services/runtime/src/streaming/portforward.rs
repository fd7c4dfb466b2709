//! PortForward (`portforward.k8s.io`): for every connection the client accepts
//! locally it opens two streams, `streamType: error` and `streamType: data`, with the
//! same `requestID` and the pod's `port`. We connect to that port on the pod's
//! loopback and copy both ways; a failure is told as text on the error stream.
//!
//! The socket has to be made inside the pod's network namespace: a dedicated thread
//! enters it (`setns`, which only affects that thread), connects, and hands the socket
//! over; a socket stays in the namespace it was made in. Host-network pods have no
//! namespace of their own and are reached from ours.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use trellis_common::text::excerpt;
use trellis_streaming::StreamingError;
use trellis_streaming::spdy::{Connection, Stream, copy_from_stream, copy_to_stream};

use crate::error::RuntimeError;

pub const PROTOCOL: &str = "portforward.k8s.io";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A port-forward the kubelet asked for, waiting for its client.
#[derive(Debug, Clone)]
pub struct PortForwardSession {
    pub sandbox_id: String,
    /// The pod's network namespace; `None` for a host-network pod.
    pub netns: Option<PathBuf>,
}

#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
}

pub async fn serve(session: PortForwardSession, mut connection: Connection) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    while let Some(stream) = connection.next_stream().await {
        let request = stream.header("requestid").unwrap_or_default().to_string();
        let pair = pairs.entry(request.clone()).or_default();
        match stream.header("streamtype") {
            Some("error") => pair.error = Some(stream),
            Some("data") => pair.data = Some(stream),
            other => {
                tracing::debug!(stream_type = ?other, "port-forward: ignoring a stream that is neither data nor error");
                let _ = stream.writer.close().await;
                continue;
            }
        }
        if pair.error.is_some()
            && pair.data.is_some()
            && let Some(Pair {
                error: Some(error),
                data: Some(data),
            }) = pairs.remove(&request)
        {
            tokio::spawn(forward(session.netns.clone(), error, data));
        }
    }
    connection.close().await;
}

async fn forward(netns: Option<PathBuf>, error: Stream, mut data: Stream) {
    let Stream {
        writer: error_writer,
        ..
    } = error;
    let port = data
        .header("port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0);
    let result = match port {
        None => Err(RuntimeError::InvalidArgument(format!(
            "port-forward: bad port header `{}`",
            excerpt(data.header("port").unwrap_or_default())
        ))),
        Some(port) => match connect(netns, port).await {
            Err(error) => Err(error),
            Ok(socket) => {
                let (from_pod, to_pod) = socket.into_split();
                let mut upload = std::mem::replace(&mut data.data, tokio::sync::mpsc::channel(1).1);
                tokio::spawn(async move { copy_from_stream(&mut upload, to_pod).await });
                match copy_to_stream(from_pod, &data.writer).await {
                    // A server that closes with input unread resets: still an end.
                    Err(StreamingError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::ConnectionReset =>
                    {
                        Ok(())
                    }
                    other => other.map_err(RuntimeError::from),
                }
            }
        },
    };
    let _ = data.writer.close().await;
    if let Err(error) = result {
        tracing::debug!(%error, "port-forward connection ended with an error");
        let _ = error_writer.write(error.to_string().as_bytes()).await;
    }
    let _ = error_writer.close().await;
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
