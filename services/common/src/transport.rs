//! Unix-socket transport for every Trellis gRPC server and client.
//!
//! A server takes an exclusive `flock` on `<socket>.lock` before touching the socket:
//! a live owner keeps the lock, so a second instance refuses to start, while a socket
//! left by a crashed owner (kill -9) is stale and replaced. The owner is the service
//! itself when it runs alone, or `trellis up`, which holds every socket of the node and
//! hands each to its service (see `activation`), so the socket outlives the service.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use nix::fcntl::Flock;
use std::os::unix::net::UnixListener;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create socket directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open lock file {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another live instance owns {socket} (lock {lock} is held); stop it first")]
    InUse { socket: PathBuf, lock: PathBuf },
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket and the lock that proves this process owns it. Dropping it removes
/// the socket file, so a clean shutdown leaves nothing behind. The listener is a
/// blocking std one: `trellis up` holds it without ever accepting, and a service makes
/// it asynchronous when it serves.
pub struct OwnedSocket {
    pub listener: Option<UnixListener>,
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl OwnedSocket {
    pub fn bind(path: &Path, mode: u32) -> Result<Self, TransportError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| TransportError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let lock_path = lock_path_of(path);
        let lock = crate::dirs::try_lock_file(&lock_path)
            .map_err(|source| TransportError::Lock {
                path: lock_path.clone(),
                source,
            })?
            .ok_or_else(|| TransportError::InUse {
                socket: path.to_path_buf(),
                lock: lock_path.clone(),
            })?;
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(socket = %path.display(), "replaced a stale socket left by an earlier instance")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TransportError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| TransportError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| TransportError::Chmod {
                path: path.to_path_buf(),
                mode,
                source,
            },
        )?;
        Ok(Self {
            listener: Some(listener),
            path: path.to_path_buf(),
            lock_path,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Makes a listener (bound here or handed down) ready for the async runtime.
pub fn into_async(listener: UnixListener) -> std::io::Result<tokio::net::UnixListener> {
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        // Still holding the lock here, so no newer instance can own these files yet.
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// For a service whose socket was handed down: removes the socket and its lock file if
/// the owner that made them (`trellis up`) is gone, which the free lock proves (it died
/// with SIGKILL and its children stop after it). A socket with no lock file is not one
/// of ours to remove (systemd's), and a held lock means the owner lives on. An owner
/// known to be dying is waited for up to `dying_owner`: the kernel signals its children
/// when its first thread exits and frees its files with the last.
pub fn remove_if_orphaned(socket: &Path, dying_owner: Duration) {
    let lock_path = lock_path_of(socket);
    if !lock_path.exists() {
        return;
    }
    let deadline = std::time::Instant::now() + dying_owner;
    loop {
        match crate::dirs::try_lock_file(&lock_path) {
            Ok(Some(_lock)) => {
                tracing::info!(socket = %socket.display(), "the socket's owner is gone: removing it");
                let _ = std::fs::remove_file(socket);
                let _ = std::fs::remove_file(&lock_path);
                return;
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return,
        }
    }
}

pub fn lock_path_of(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// HTTP/2 flow-control windows of Trellis's own connections, both ends. The
/// protocol's default (64 KiB) makes an answer larger than that (a list of a hundred
/// containers, a layer streamed to storage) wait for window updates; over a local
/// socket the memory a larger window lets the peer send ahead is the only cost.
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 2 << 20;

/// A lazily connecting gRPC channel to a Unix socket. It never blocks: a call made
/// while the peer is down fails at once with `Unavailable`, and the next call dials
/// again.
pub fn unix_channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    // The URI is required by the endpoint type but never dialled: the connector is.
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(2))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(&socket).await.map(TokioIo::new) }
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_instance_is_refused_and_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sub/dir/svc.sock");
        let first = OwnedSocket::bind(&socket, 0o600).expect("first bind");
        let mode = std::fs::metadata(&socket)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        match OwnedSocket::bind(&socket, 0o600) {
            Err(TransportError::InUse { .. }) => {}
            other => panic!(
                "second bind must be refused, got {:?}",
                other.map(|s| s.path().to_path_buf())
            ),
        }
        drop(first);
        assert!(!socket.exists(), "clean drop removes the socket");

        // A stale socket file (owner gone, lock free) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&socket).expect("stale bind");
        drop(stale);
        assert!(socket.exists());
        let again = OwnedSocket::bind(&socket, 0o660).expect("replace stale");
        let mode = std::fs::metadata(&socket)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660);
        drop(again);
    }
}
