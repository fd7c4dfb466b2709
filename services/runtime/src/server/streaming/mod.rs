//! The CRI streaming server: Exec, Attach and PortForward.
//!
//! The RPCs only check the request and answer a URL `http://<addr>/<kind>/<token>`;
//! the client (the kubelet's proxy, crictl, critest) then opens that URL, upgrades the
//! HTTP/1.1 connection to SPDY/3.1 (`Upgrade: SPDY/3.1`, protocol chosen from its
//! `X-Stream-Protocol-Version` list) and the session runs over SPDY streams. A token
//! is good once, for [`TOKEN_LIFETIME`].
//!
//! The listener (`runtime.streaming_address`, loopback with a free port unless
//! configured) is bound lazily, on the first Exec/Attach/PortForward request: a node
//! that never streams opens no TCP port at all, and a bad address fails those RPCs
//! (with the reason) instead of the whole service. Tokens live in memory: a URL does
//! not outlive the runtime service, which the kubelet copes with by asking again.
//!
//! The wire protocols (SPDY, remotecommand, port-forward's stream pairing) are the
//! `trellis-streaming` crate; what is here is the HTTP upgrade, the tokens, and the
//! glue from those sessions to runc, conmon and the pod's network namespace.

mod attach;
mod exec;
mod portforward;
mod pty;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_common::telemetry::{SpanContext, current_span_context, link_to};

use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;
use trellis_common::text::excerpt;
use trellis_streaming::remotecommand::{self, Options};
use trellis_streaming::spdy;

use self::attach::AttachSession;
use self::exec::ExecSession;
use self::portforward::PortForwardSession;
use crate::error::RuntimeError;
use crate::lifecycle::Runtime;
use crate::metrics::RuntimeMetrics;
use crate::oci::ConmonRunc;
use crate::store::{ContainerRecord, SandboxState};

/// How long a URL handed out by Exec/Attach/PortForward stays good.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The upgrade request must arrive within this, and be no larger than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// The protocol crate's errors in the runtime's terms: an I/O failure keeps its
/// source, the rest is a failed session.
#[derive(Debug, Clone)]
enum Session {
    Exec(ExecSession),
    Attach(AttachSession),
    PortForward(PortForwardSession),
}

impl Session {
    fn kind(&self) -> &'static str {
        match self {
            Session::Exec(_) => "exec",
            Session::Attach(_) => "attach",
            Session::PortForward(_) => "portforward",
        }
    }
}

/// A session waiting for its client: until when, and the span of the call that made
/// it (Exec, Attach, PortForward), which the session's own span links to.
struct PendingSession {
    session: Session,
    expires: Instant,
    made_by: Option<SpanContext>,
}

type Pending = Arc<Mutex<HashMap<String, PendingSession>>>;

pub struct StreamingServer {
    address: String,
    bound: tokio::sync::OnceCell<SocketAddr>,
    pending: Pending,
    runtime: Arc<Runtime>,
    /// Exec sessions run `runc exec` themselves, so they need the real runtime.
    oci: Arc<ConmonRunc>,
}

impl StreamingServer {
    pub fn new(address: String, runtime: Arc<Runtime>, oci: Arc<ConmonRunc>) -> Self {
        Self {
            address,
            bound: tokio::sync::OnceCell::new(),
            pending: Pending::default(),
            runtime,
            oci,
        }
    }

    pub async fn exec(&self, request: ExecRequest) -> Result<String, RuntimeError> {
        let options = Options {
            stdin: request.stdin,
            stdout: request.stdout,
            stderr: request.stderr,
            tty: request.tty,
        };
        validate(&options)?;
        if request.cmd.is_empty() {
            return Err(RuntimeError::InvalidArgument("Exec needs a command".into()));
        }
        let record = self.running_container(&request.container_id)?;
        let session = ExecSession {
            runtime: record.oci_runtime.clone().into(),
            container_id: record.id.clone(),
            cmd: request.cmd,
            options,
            oci: self.oci.clone(),
        };
        self.url(Session::Exec(session)).await
    }

    pub async fn attach(&self, request: AttachRequest) -> Result<String, RuntimeError> {
        let mut options = Options {
            stdin: request.stdin,
            stdout: request.stdout,
            stderr: request.stderr,
            tty: request.tty,
        };
        validate(&options)?;
        let record = self.running_container(&request.container_id)?;
        let config = record.config();
        if request.tty != config.tty {
            return Err(RuntimeError::InvalidArgument(format!(
                "attach tty={} does not match container {} created with tty={}",
                request.tty, record.id, config.tty
            )));
        }
        // Stdin of a container created without one goes nowhere: not asked for.
        options.stdin &= config.stdin;
        let session = AttachSession {
            bundle: self.runtime.bundle_dir(&record.id),
            container_id: record.id.clone(),
            options,
        };
        self.url(Session::Attach(session)).await
    }

    pub async fn port_forward(&self, request: PortForwardRequest) -> Result<String, RuntimeError> {
        let sandbox = self.runtime.sandbox(&request.pod_sandbox_id)?;
        if sandbox.state() != SandboxState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let netns = (!sandbox.netns_path.is_empty()).then(|| sandbox.netns_path.clone().into());
        self.url(Session::PortForward(PortForwardSession {
            sandbox_id: sandbox.id.clone(),
            netns,
        }))
        .await
    }

    fn running_container(&self, id: &str) -> Result<Arc<ContainerRecord>, RuntimeError> {
        self.runtime.running(id)
    }

    /// Stores the session under a new token and answers its URL.
    async fn url(&self, session: Session) -> Result<String, RuntimeError> {
        let address = self.bound.get_or_try_init(|| self.listen()).await?;
        let token = crate::ids::new_id()?;
        let kind = session.kind();
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        pending.retain(|_, waiting| waiting.expires > now);
        pending.insert(
            token.clone(),
            PendingSession {
                session,
                expires: now + TOKEN_LIFETIME,
                made_by: current_span_context(),
            },
        );
        Ok(format!("http://{address}/{kind}/{token}"))
    }

    async fn listen(&self) -> Result<SocketAddr, RuntimeError> {
        let listener = TcpListener::bind(&self.address).await.map_err(|source| {
            RuntimeError::io(
                format!(
                    "cannot listen on runtime.streaming_address {}",
                    self.address
                ),
                source,
            )
        })?;
        let address = listener
            .local_addr()
            .map_err(|source| RuntimeError::io("streaming listener", source))?;
        tracing::info!(%address, "streaming server listening");
        tokio::spawn(accept(
            listener,
            self.pending.clone(),
            self.runtime.metrics().clone(),
        ));
        Ok(address)
    }
}

/// Exec and attach need some output or input, and a TTY merges stderr into stdout.
fn validate(options: &Options) -> Result<(), RuntimeError> {
    if options.tty && options.stderr {
        return Err(RuntimeError::InvalidArgument(
            "tty and stderr cannot both be true".into(),
        ));
    }
    if !options.stdin && !options.stdout && !options.stderr {
        return Err(RuntimeError::InvalidArgument(
            "one of stdin, stdout and stderr must be set".into(),
        ));
    }
    Ok(())
}

async fn accept(listener: TcpListener, pending: Pending, metrics: RuntimeMetrics) {
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                let pending = pending.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_connection(socket, pending, metrics).await {
                        tracing::info!(%peer, %error, "streaming request refused");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "streaming server cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The upgrade request, as far as it matters here.
struct Upgrade {
    path: String,
    spdy: bool,
    protocols: Vec<String>,
}

async fn serve_connection(
    mut socket: TcpStream,
    pending: Pending,
    metrics: RuntimeMetrics,
) -> Result<(), RuntimeError> {
    let (request, rest) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut socket))
        .await
        .map_err(|_| RuntimeError::Timeout {
            what: "the streaming request".into(),
            seconds: REQUEST_TIMEOUT.as_secs(),
        })??;
    let mut parts = request.path.trim_start_matches('/').split(['/', '?']);
    let (kind, token) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let session = {
        let mut pending = pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending
            .remove(token)
            .filter(|waiting| waiting.session.kind() == kind && waiting.expires > Instant::now())
    };
    let Some(PendingSession {
        session, made_by, ..
    }) = session
    else {
        respond(
            &mut socket,
            "404 Not Found",
            &[],
            "unknown or expired streaming token",
        )
        .await;
        return Err(RuntimeError::NotFound(format!(
            "streaming token for `{}` unknown or expired",
            excerpt(kind)
        )));
    };
    if !request.spdy {
        respond(
            &mut socket,
            "400 Bad Request",
            &[],
            "this endpoint only speaks SPDY/3.1 (Upgrade: SPDY/3.1)",
        )
        .await;
        return Err(RuntimeError::InvalidArgument(
            "the client did not ask for SPDY/3.1".into(),
        ));
    }
    let supported: &[&'static str] = if let Session::PortForward(_) = session {
        &[trellis_streaming::portforward::PROTOCOL]
    } else {
        &remotecommand::PROTOCOLS
    };
    let Some(protocol) = request
        .protocols
        .iter()
        .find_map(|p| supported.iter().find(|s| **s == p.as_str()).copied())
    else {
        let accepted = supported.join(", ");
        respond(
            &mut socket,
            "403 Forbidden",
            &[("X-Accepted-Stream-Protocol-Versions", &accepted)],
            "no supported stream protocol version",
        )
        .await;
        return Err(RuntimeError::InvalidArgument(format!(
            "the client offers `{}`; supported: {accepted}",
            excerpt(&request.protocols.join(", "))
        )));
    };
    let switching = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
    );
    socket
        .write_all(switching.as_bytes())
        .await
        .map_err(|source| RuntimeError::io("cannot answer the upgrade", source))?;
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let connection = spdy::Connection::start(read, write, rest)?;
    let _open = metrics.session(session.kind());
    match session {
        Session::Exec(session) => {
            let span = tracing::info_span!("exec", container.id = %session.container_id, tty = session.options.tty, protocol);
            link_to(&span, made_by);
            exec::serve(session, connection, protocol)
                .instrument(span)
                .await;
        }
        Session::Attach(session) => {
            let span = tracing::info_span!("attach", container.id = %session.container_id, tty = session.options.tty, protocol);
            link_to(&span, made_by);
            attach::serve(session, connection, protocol)
                .instrument(span)
                .await;
        }
        Session::PortForward(session) => {
            let span =
                tracing::info_span!("port_forward", k8s.pod.sandbox_id = %session.sandbox_id);
            link_to(&span, made_by);
            portforward::serve(session, connection)
                .instrument(span)
                .await;
        }
    }
    Ok(())
}

/// Reads the HTTP request head; returns it with whatever came after it.
async fn read_request(socket: &mut TcpStream) -> Result<(Upgrade, Vec<u8>), RuntimeError> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket
            .read(&mut chunk)
            .await
            .map_err(|source| RuntimeError::io("cannot read the streaming request", source))?;
        if n == 0 {
            return Err(RuntimeError::InvalidArgument(
                "the client closed before sending a request".into(),
            ));
        }
        buffer.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer) {
            Ok(httparse::Status::Complete(used)) => {
                let values = |name: &str| -> Vec<String> {
                    request
                        .headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .flat_map(|h| {
                            String::from_utf8_lossy(h.value)
                                .split(',')
                                .map(|v| v.trim().to_string())
                                .collect::<Vec<_>>()
                        })
                        .filter(|v| !v.is_empty())
                        .collect()
                };
                let spdy = values("Connection")
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case("upgrade"))
                    && values("Upgrade")
                        .iter()
                        .any(|v| v.eq_ignore_ascii_case("SPDY/3.1"));
                let upgrade = Upgrade {
                    path: request.path.unwrap_or_default().to_string(),
                    spdy,
                    protocols: values("X-Stream-Protocol-Version"),
                };
                return Ok((upgrade, buffer[used..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buffer.len() < MAX_REQUEST_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(RuntimeError::InvalidArgument(
                    "streaming request head too large".into(),
                ));
            }
            Err(error) => {
                return Err(RuntimeError::InvalidArgument(format!(
                    "bad streaming request: {error}"
                )));
            }
        }
    }
}

async fn respond(socket: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &str) {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len() + 1
    );
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str(&format!("\r\n{body}\n"));
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_with_stderr_and_no_stream_at_all_are_refused() {
        let options = |stdin, stdout, stderr, tty| Options {
            stdin,
            stdout,
            stderr,
            tty,
        };
        assert!(matches!(
            validate(&options(false, true, true, true)),
            Err(RuntimeError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate(&options(false, false, false, false)),
            Err(RuntimeError::InvalidArgument(_))
        ));
        assert!(validate(&options(true, true, false, true)).is_ok());
        assert!(validate(&options(false, true, true, false)).is_ok());
    }
}
