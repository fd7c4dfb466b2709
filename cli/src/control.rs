//! The supervisor's control socket: how `trellis restart` and `trellis upgrade` reach
//! the running `trellis up`.
//!
//! It replaces processes that run as root, so it is root's alone: it lives in a 0700
//! directory under the run directory, and a peer whose uid is not root's (or this
//! process's) is refused all the same. A request is one JSON line and so is the
//! answer; a binary to upgrade to must be a root-owned executable no one else can
//! write, or anyone who can write it would run code as root.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use trellis_common::transport::OwnedSocket;

use crate::supervise::{Order, Replaced, START_TIMEOUT};

/// Far longer than any request; a longer line is not ours.
const MAX_REQUEST_BYTES: u64 = 4096;
/// How long a connected client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for an answer: a drain, a start and a fallback start.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3 * START_TIMEOUT.as_secs() + 60);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: trellis_common::transport::TransportError,
    },
    #[error(
        "no `trellis up` is running with this configuration (nothing answers at {path}: {source})"
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("only root may order `trellis up` ({path}: {source})")]
    NotAllowed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to `trellis up` at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`trellis up` at {path} gave no answer within {ANSWER_TIMEOUT:?}")]
    NoAnswer { path: PathBuf },
    #[error("`trellis up` answered something that is not an answer: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Refused(String),
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Request {
    Restart { service: String },
    Upgrade { service: String, binary: PathBuf },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Answer {
    Replaced(Replaced),
    Refused { error: String },
}

/// The directory of the supervisor's own sockets (control, readiness): root only.
pub fn private_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("up")
}

pub fn socket_path(run_dir: &Path) -> PathBuf {
    private_dir(run_dir).join("control.sock")
}

/// The control socket while `trellis up` serves it; dropped, it is closed and removed.
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    _socket: OwnedSocket,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the control socket, handing each order to the child it names.
pub fn serve(
    run_dir: &Path,
    children: HashMap<String, mpsc::Sender<Order>>,
) -> Result<ControlSocket, ControlError> {
    let path = socket_path(run_dir);
    let bind_error = |source| ControlError::Bind {
        path: path.clone(),
        source,
    };
    trellis_common::dirs::ensure_private_dir(&private_dir(run_dir)).map_err(|source| {
        ControlError::Io {
            path: private_dir(run_dir),
            source,
        }
    })?;
    let mut socket = OwnedSocket::bind(&path, 0o600).map_err(bind_error)?;
    let io_error = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let listener = socket
        .listener
        .take()
        .ok_or_else(|| io_error(std::io::Error::other("listener already taken")))?;
    let listener = trellis_common::transport::into_async(listener).map_err(io_error)?;
    let children = std::sync::Arc::new(children);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(answer(stream, children.clone()));
        }
    });
    Ok(ControlSocket {
        path,
        task,
        _socket: socket,
    })
}

async fn answer(
    stream: UnixStream,
    children: std::sync::Arc<HashMap<String, mpsc::Sender<Order>>>,
) {
    let (read, mut write) = stream.into_split();
    let answer = match peer_is_root(&write) {
        Err(why) => Answer::Refused { error: why },
        Ok(()) => match read_request(read).await {
            Err(why) => Answer::Refused { error: why },
            Ok(request) => carry_out(request, &children).await,
        },
    };
    if let Answer::Refused { error } = &answer {
        tracing::warn!(%error, "control request refused");
    }
    let mut line = serde_json::to_string(&answer).unwrap_or_default();
    line.push('\n');
    let _ = write.write_all(line.as_bytes()).await;
}

fn peer_is_root(stream: &tokio::net::unix::OwnedWriteHalf) -> Result<(), String> {
    let credentials = stream
        .as_ref()
        .peer_cred()
        .map_err(|error| format!("cannot tell who is asking: {error}"))?;
    let uid = credentials.uid();
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} may not order the supervisor; only root may"
        ))
    }
}

async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    use tokio::io::AsyncReadExt;
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return Err(format!("no request within {REQUEST_TIMEOUT:?}")),
        Ok(Err(error)) => return Err(format!("cannot read the request: {error}")),
        Ok(Ok(_)) => {}
    }
    serde_json::from_str(line.trim()).map_err(|error| {
        format!(
            "not a request ({error}): {}",
            trellis_common::text::excerpt(&line)
        )
    })
}

async fn carry_out(request: Request, children: &HashMap<String, mpsc::Sender<Order>>) -> Answer {
    let (service, program) = match request {
        Request::Restart { service } => (service, None),
        Request::Upgrade { service, binary } => match fit_to_run_as_root(&binary) {
            Ok(()) => (service, Some(binary)),
            Err(why) => return Answer::Refused { error: why },
        },
    };
    let Some(orders) = children.get(&service) else {
        let mut known: Vec<_> = children.keys().map(String::as_str).collect();
        known.sort_unstable();
        let error = format!(
            "no service `{}` on this node (one of: {})",
            trellis_common::text::excerpt(&service),
            known.join(", ")
        );
        return Answer::Refused { error };
    };
    let (reply, replied) = oneshot::channel();
    let gone = || Answer::Refused {
        error: format!("the supervisor of {service} is stopping"),
    };
    if orders
        .send(Order::Replace { program, reply })
        .await
        .is_err()
    {
        return gone();
    }
    match replied.await {
        Ok(Ok(replaced)) => Answer::Replaced(replaced),
        Ok(Err(error)) => Answer::Refused { error },
        Err(_) => gone(),
    }
}

/// A binary `trellis up` may run as root: an absolute path to a root-owned regular
/// executable file that neither group nor others can write.
fn fit_to_run_as_root(binary: &Path) -> Result<(), String> {
    let shown = binary.display();
    if !binary.is_absolute() {
        return Err(format!("binary {shown} is not an absolute path"));
    }
    let metadata = std::fs::metadata(binary).map_err(|error| format!("binary {shown}: {error}"))?;
    let mode = metadata.permissions().mode();
    if !metadata.is_file() {
        Err(format!("binary {shown} is not a regular file"))
    } else if mode & 0o111 == 0 {
        Err(format!("binary {shown} is not executable"))
    } else if metadata.uid() != 0 {
        Err(format!(
            "binary {shown} is owned by uid {}, not root",
            metadata.uid()
        ))
    } else if mode & 0o022 != 0 {
        Err(format!(
            "binary {shown} is writable by group or others (mode {:o}): anyone who can write it would run as root",
            mode & 0o7777
        ))
    } else {
        Ok(())
    }
}

/// Sends `request` to the `trellis up` of `run_dir` and waits for its answer.
pub async fn order(run_dir: &Path, request: &Request) -> Result<Replaced, ControlError> {
    let path = socket_path(run_dir);
    let mut stream = UnixStream::connect(&path).await.map_err(|source| {
        let path = path.clone();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::NotAllowed { path, source }
        } else {
            ControlError::NotRunning { path, source }
        }
    })?;
    let io_error = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    let mut line =
        serde_json::to_string(request).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await.map_err(io_error)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(stream);
    match tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut answer)).await {
        Err(_) => return Err(ControlError::NoAnswer { path }),
        Ok(Err(source)) => return Err(io_error(source)),
        Ok(Ok(_)) => {}
    }
    match serde_json::from_str(answer.trim()) {
        Ok(Answer::Replaced(replaced)) => Ok(replaced),
        Ok(Answer::Refused { error }) => Err(ControlError::Refused(error)),
        Err(error) => Err(ControlError::BadAnswer(format!(
            "{error}: {}",
            trellis_common::text::excerpt(&answer)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_the_operator_wrote_them() {
        let restart: Request =
            serde_json::from_str(r#"{"action":"restart","service":"runtime"}"#).expect("parse");
        assert_eq!(
            restart,
            Request::Restart {
                service: "runtime".into()
            }
        );
        let bad = serde_json::from_str::<Request>(r#"{"action":"reboot","service":"runtime"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn only_a_root_owned_executable_nobody_else_can_write_may_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("trellis-runtime");
        std::fs::write(&binary, b"#!/bin/sh\n").expect("write");
        let set = |mode| {
            std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(0o755);
        assert_eq!(fit_to_run_as_root(&binary), Ok(()));
        set(0o644);
        assert!(
            fit_to_run_as_root(&binary)
                .unwrap_err()
                .contains("not executable")
        );
        set(0o775);
        assert!(
            fit_to_run_as_root(&binary)
                .unwrap_err()
                .contains("writable by group")
        );
        set(0o755);
        std::os::unix::fs::chown(&binary, Some(65534), None).expect("chown");
        assert!(
            fit_to_run_as_root(&binary)
                .unwrap_err()
                .contains("owned by uid 65534")
        );
        assert!(
            fit_to_run_as_root(Path::new("relative/bin"))
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            fit_to_run_as_root(dir.path())
                .unwrap_err()
                .contains("regular file")
        );
    }

    #[tokio::test]
    async fn an_order_reaches_its_child_and_the_answer_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (orders, mut ordered) = mpsc::channel(1);
        let children = HashMap::from([("gateway".to_string(), orders)]);
        let control = serve(dir.path(), children).expect("serve");
        let child = tokio::spawn(async move {
            let Some(Order::Replace { program, reply }) = ordered.recv().await else {
                panic!("no order");
            };
            assert_eq!(program, None);
            let _ = reply.send(Ok(Replaced {
                service: "gateway".into(),
                old_pid: 1,
                new_pid: 2,
                program: "/bin/trellis-gateway".into(),
                takeover: "overlap".into(),
                millis: 3,
            }));
        });
        let replaced = order(
            dir.path(),
            &Request::Restart {
                service: "gateway".into(),
            },
        )
        .await
        .expect("replaced");
        assert_eq!((replaced.old_pid, replaced.new_pid), (1, 2));
        child.await.expect("child");
        let unknown = order(
            dir.path(),
            &Request::Restart {
                service: "kernel".into(),
            },
        )
        .await
        .expect_err("refused");
        assert!(unknown.to_string().contains("one of: gateway"), "{unknown}");
        let mode = std::fs::metadata(control.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(control);
        assert!(matches!(
            order(
                dir.path(),
                &Request::Restart {
                    service: "gateway".into()
                }
            )
            .await,
            Err(ControlError::NotRunning { .. })
        ));
    }
}
