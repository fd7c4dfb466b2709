//! Calls to the services behind the gateway.
//!
//! A backend that is down fails a call at once (its socket refuses the connection).
//! Idempotent reads are retried with backoff for a bounded time, so a kubelet sees no
//! error while a service restarts; the caller's own deadline (`grpc-timeout`) always
//! wins and is passed on to the backend.
//!
//! A call whose connection was refused (or whose socket is not there: the backend
//! is restarting) was provably never sent: any call, a change included, is sent
//! again then, within the same budget and deadline.
//!
//! Three creations are safe to repeat (RunPodSandbox, CreateContainer, PullImage:
//! the backend answers a repeat of a call it completed with the earlier result, and
//! a pull joins the one under way): they are sent again, within the same budget and
//! deadline, when the backend gave no answer, whether the connection was refused
//! (never reached) or closed under the call (the backend killed, perhaps after it
//! finished: the repeat finds the result). An answer of the backend, `Unavailable`
//! included, is final for them: it knows what it did and undid, and the kubelet
//! retries such a failure on its own schedule. Other changes are sent once.
//!
//! Only a backend that did not answer is said to be "not answering". One that
//! answered `Unavailable` is up and says that something further down is not (storage
//! restarting, a registry down): a read is retried for the same budget, since that
//! too may pass, but the caller gets the backend's own answer, which names the part
//! that failed.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;
use trellis_common::config::{Config, ServiceKind};
use trellis_common::telemetry::inject_grpc_context;
use trellis_common::transport::unix_channel;
use trellis_common::upstream::{never_sent, not_reached, parse_grpc_timeout};

/// Whether a call may be sent again after a failure to reach its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads: retried across a backend restart.
    Idempotent,
    /// Creations the backend answers a repeat of with the earlier result: retried
    /// while the backend gives no answer, never after it answered.
    Repeatable,
    /// Anything else that changes state: never applied twice, so sent again only
    /// when it was never sent (the connection was refused).
    Once,
}

impl Retry {
    /// Whether a call may be sent again after `status`. For idempotent calls: the
    /// backend was not reached (see [`not_reached`]: the call did not run to
    /// completion there, or ran without answering), or it answered `Unavailable` (a
    /// service it needs is restarting). For repeatable ones: only no answer. Other
    /// answers of the backend and our own deadline are final.
    fn worth_retrying(self, status: &Status) -> bool {
        match self {
            Retry::Idempotent => not_reached(status) || status.code() == Code::Unavailable,
            Retry::Repeatable => not_reached(status),
            Retry::Once => never_connected(status) || never_sent(status),
        }
    }
}

/// Whether a call failed before its connection existed: the backend's socket
/// refused it or is not there (a restart), so no byte of the call was sent. A
/// connection that broke under the call is not this: the call may have run. (A call
/// hyper gave up before writing it, racing a draining backend's GOAWAY, is the other
/// case of a call never sent: `upstream::never_sent`.)
fn never_connected(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            );
        }
        source = error.source();
    }
    false
}

/// One service behind the gateway: its processes, one socket each (several only for
/// the image service's replicas). Calls go round the replicas in turn, and a call
/// sent again after a failure goes to the next one, so a dead replica costs a retry
/// rather than the call.
pub struct Backend {
    pub kind: ServiceKind,
    replicas: Vec<Replica>,
    next: AtomicUsize,
}

struct Replica {
    socket: PathBuf,
    channel: Channel,
}

impl Backend {
    pub fn new(kind: ServiceKind, sockets: Vec<PathBuf>) -> Self {
        let replicas: Vec<Replica> = sockets
            .into_iter()
            .map(|socket| Replica {
                channel: unix_channel(&socket),
                socket,
            })
            .collect();
        Self {
            kind,
            replicas,
            next: AtomicUsize::new(0),
        }
    }

    /// Replica 1's socket, for messages about the service as a whole.
    pub fn socket(&self) -> &Path {
        self.replicas
            .first()
            .map_or(Path::new(""), |replica| replica.socket.as_path())
    }

    /// The replica for a call's first attempt; later attempts take the next ones.
    fn first_replica(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn replica(&self, first: usize, attempt: u32) -> Option<&Replica> {
        let count = self.replicas.len();
        (count > 0).then(|| &self.replicas[(first + attempt as usize) % count])
    }
}

pub struct Backends {
    pub runtime: Backend,
    pub image: Backend,
    pub network: Backend,
    retry_budget: Duration,
}

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);
const MAX_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Left of the caller's deadline to send our own answer back in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

impl Backends {
    pub fn new(config: &Config, retry_budget: Duration) -> Self {
        let backend = |kind| Backend::new(kind, config.replica_sockets(kind));
        Self {
            runtime: backend(ServiceKind::Runtime),
            image: backend(ServiceKind::Image),
            network: backend(ServiceKind::Network),
            retry_budget,
        }
    }

    /// Forwards one CRI call (the skeleton's layer records its latency and code).
    pub async fn forward<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        backend: &Backend,
        retry: Retry,
        request: Request<Req>,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let started = Instant::now();
        let deadline = caller_deadline(&request, started);
        let result = self
            .call(backend, retry, deadline, request.into_inner(), call)
            .await;
        if let Err(status) = &result {
            log_failed(method, status);
        }
        result
    }

    /// One backend call, sent again after a failure `retry` allows (see
    /// [`Retry::worth_retrying`]) until the budget or the caller's deadline is spent.
    /// The message is cloned for each attempt: forwarded calls carry `Bytes`, so that
    /// is a reference count.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        backend: &Backend,
        retry: Retry,
        deadline: Option<Instant>,
        message: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let started = Instant::now();
        let mut give_up = started + self.retry_budget;
        if let Some(deadline) = deadline {
            give_up = give_up.min(deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline));
        }
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempts = 0u32;
        let first = backend.first_replica();
        loop {
            let Some(replica) = backend.replica(first, attempts) else {
                return Err(Status::unavailable(format!(
                    "trellis-{} has no socket configured",
                    backend.kind.name()
                )));
            };
            attempts += 1;
            let attempt =
                async { call(replica.channel.clone(), outgoing(message.clone(), deadline)).await }
                    .instrument(trellis_common::telemetry::client_span(backend.kind.name()));
            let error = match attempt.await {
                Ok(response) => return Ok(response),
                Err(status) if retry.worth_retrying(&status) => status,
                Err(status) if not_reached(&status) => {
                    return Err(unreachable(backend, replica, attempts, started, &status));
                }
                Err(status) => return Err(status),
            };
            if Instant::now() + delay >= give_up {
                return Err(if not_reached(&error) {
                    unreachable(backend, replica, attempts, started, &error)
                } else {
                    error
                });
            }
            if !(attempts as usize).is_multiple_of(backend.replicas.len().max(1)) {
                // A replica not tried in this round takes it at once.
                continue;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }
}

/// The one line of a failed CRI call: at warn, where an operator's alerts look.
pub fn log_failed(method: &'static str, status: &Status) {
    // The message may quote the caller's input (an id, a name).
    tracing::warn!(
        method,
        code = ?status.code(),
        error = %trellis_common::text::excerpt_to(status.message(), 400),
        "CRI call failed"
    );
}

/// The request sent to a backend: the caller's deadline passed on, and the trace.
fn outgoing<Req>(message: Req, deadline: Option<Instant>) -> Request<Req> {
    let mut request = Request::new(message);
    if let Some(deadline) = deadline {
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    }
    inject_grpc_context(request.metadata_mut());
    request
}

fn unreachable(
    backend: &Backend,
    replica: &Replica,
    attempts: u32,
    started: Instant,
    error: &Status,
) -> Status {
    Status::unavailable(format!(
        "trellis-{} is not answering on {} ({} attempt{} over {:?}): {}",
        backend.kind.name(),
        replica.socket.display(),
        attempts,
        if attempts == 1 { "" } else { "s" },
        started.elapsed(),
        error.message()
    ))
}

/// The caller's deadline from its `grpc-timeout` header, e.g. `1999m` or `5S`.
pub fn caller_deadline<T>(request: &Request<T>, now: Instant) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(raw).map(|timeout| now + timeout)
}

/// Declares the RPCs of a CRI service that go to one backend as bytes
/// (`FORWARDED`, for [`crate::passthrough::Passthrough`]) and implements the
/// service's trait on a gateway type: the methods that need more are written out
/// after the list, the forwarded ones never reach it. One macro emits both, so the
/// table and the trait cannot disagree, and the whole impl because `#[async_trait]`
/// must see every method.
macro_rules! forwarding_impl {
    (
        impl $trait:path, for $ty:ident, service $service:literal;
        forward { $( $method:ident ( $req:ty ) -> $resp:ty = $name:literal, $retry:ident; )* }
        $($custom:tt)*
    ) => {
        pub const FORWARDED: &[$crate::passthrough::Forwarded] = &[
            $(
                $crate::passthrough::Forwarded {
                    path: concat!("/", $service, "/", $name),
                    name: $name,
                    retry: $crate::backend::Retry::$retry,
                },
            )*
        ];

        #[tonic::async_trait]
        impl $trait for $ty {
            $(
                async fn $method(&self, _request: tonic::Request<$req>) -> Result<tonic::Response<$resp>, tonic::Status> {
                    Err($crate::passthrough::not_routed($name))
                }
            )*
            $($custom)*
        }
    };
}
pub(crate) use forwarding_impl;

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend killed with the call in flight: it accepted the connection, read
    /// the request and closed without answering. Whatever status the client makes of
    /// that, it is a transport failure, retried for idempotent calls.
    #[tokio::test]
    async fn a_connection_closed_under_a_call_is_unreachable() {
        use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("backend.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let dying_backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buffer = vec![0u8; 4096];
            // The client preface, settings and the request's frames arrive together.
            let _ = stream.read(&mut buffer).await;
            drop(stream);
        });
        let status = RuntimeServiceClient::new(unix_channel(&socket))
            .version(k8s_cri::v1::VersionRequest::default())
            .await
            .expect_err("nobody answered");
        dying_backend.await.expect("backend task");
        assert!(not_reached(&status), "{status:?}");
    }

    #[test]
    fn answers_of_the_backend_and_our_own_deadline_are_not_retried() {
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timeout.code(), Code::Cancelled);
        for retry in [Retry::Idempotent, Retry::Repeatable, Retry::Once] {
            for answer in [
                Status::cancelled("cancelled by the backend"),
                Status::unknown("transport error, said the backend"),
                Status::not_found("no such pod"),
                Status::already_exists("pod web already exists as sandbox 1234"),
            ] {
                assert!(!retry.worth_retrying(&answer), "{retry:?}: {answer:?}");
            }
            assert!(!retry.worth_retrying(&timeout), "{retry:?}");
        }
        // A creation the backend answered Unavailable for was undone there: final.
        let answered = Status::unavailable("network service unavailable");
        assert!(Retry::Idempotent.worth_retrying(&answered));
        assert!(!Retry::Repeatable.worth_retrying(&answered));
    }

    fn backends(dir: &std::path::Path, retry_budget: Duration) -> Backends {
        let backend =
            |kind: ServiceKind| Backend::new(kind, vec![dir.join(format!("{}.sock", kind.name()))]);
        Backends {
            runtime: backend(ServiceKind::Runtime),
            image: backend(ServiceKind::Image),
            network: backend(ServiceKind::Network),
            retry_budget,
        }
    }

    #[tokio::test]
    async fn calls_go_round_the_replicas_and_a_retry_takes_the_next_one() {
        let sockets: Vec<_> = ["image.sock", "image-2.sock", "image-3.sock"]
            .iter()
            .map(std::path::PathBuf::from)
            .collect();
        let backend = Backend::new(ServiceKind::Image, sockets.clone());
        let socket = |first, attempt| {
            backend
                .replica(first, attempt)
                .map(|replica| replica.socket.clone())
        };
        let (a, b) = (backend.first_replica(), backend.first_replica());
        assert_ne!(socket(a, 0), socket(b, 0), "two calls, two replicas");
        assert_eq!(
            socket(a, 1),
            socket(b, 0),
            "a retry goes to the next replica"
        );
        assert_eq!(socket(a, 3), socket(a, 0), "and round again");
        assert_eq!(backend.socket(), sockets[0]);
        assert!(
            Backend::new(ServiceKind::Image, Vec::new())
                .replica(0, 0)
                .is_none()
        );
    }

    /// The runtime answered `Unavailable` because storage is down: the caller reads
    /// the runtime's words, never that the runtime is not answering, whether the call
    /// is sent once or retried for the budget.
    #[tokio::test]
    async fn an_answered_unavailable_is_passed_on_not_called_not_answering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backends = backends(dir.path(), Duration::from_millis(200));
        let words = "storage service unavailable: not answering on /run/trellis/storage.sock";
        let attempts = std::sync::atomic::AtomicU32::new(0);
        for retry in [Retry::Once, Retry::Repeatable, Retry::Idempotent] {
            attempts.store(0, std::sync::atomic::Ordering::SeqCst);
            let started = Instant::now();
            let status = backends
                .call(&backends.runtime, retry, None, (), |_, _| async {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Err::<Response<()>, _>(Status::unavailable(words))
                })
                .await
                .expect_err("the backend failed");
            assert_eq!(status.code(), Code::Unavailable, "{retry:?}");
            assert_eq!(status.message(), words, "{retry:?}");
            let sent = attempts.load(std::sync::atomic::Ordering::SeqCst);
            match retry {
                Retry::Once | Retry::Repeatable => assert_eq!(sent, 1, "{retry:?}"),
                Retry::Idempotent => assert!(
                    sent > 1 && started.elapsed() >= Duration::from_millis(100),
                    "retried for the budget: {sent} attempts in {:?}",
                    started.elapsed()
                ),
            }
        }
    }

    /// The backend went away under the call (killed after it may have finished): a
    /// repeatable creation is sent again and its answer passed on; one sent once
    /// fails as not answering.
    #[tokio::test]
    async fn a_repeatable_call_is_sent_again_when_the_backend_gave_no_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backends = backends(dir.path(), Duration::from_secs(2));
        let attempts = std::sync::atomic::AtomicU32::new(0);
        for retry in [Retry::Once, Retry::Repeatable] {
            attempts.store(0, std::sync::atomic::Ordering::SeqCst);
            let answer = backends
                .call(&backends.runtime, retry, None, (), |_, _| async {
                    if attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        let closed = std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "connection closed under the call",
                        );
                        return Err(Status::from_error(Box::new(closed)));
                    }
                    Ok(Response::new("pod-1"))
                })
                .await;
            let sent = attempts.load(std::sync::atomic::Ordering::SeqCst);
            match retry {
                Retry::Repeatable => {
                    assert_eq!(answer.expect("the repeat's answer").into_inner(), "pod-1");
                    assert_eq!(sent, 2);
                }
                _ => {
                    let status = answer.expect_err("sent once");
                    assert_eq!(status.code(), Code::Unavailable);
                    assert!(status.message().contains("not answering"), "{status:?}");
                    assert_eq!(sent, 1);
                }
            }
        }
    }

    /// A socket that refuses connections (its service restarting): even a call sent
    /// once is sent again until the budget is spent, since none of it was sent; a
    /// connection closed under the call is not retried for it.
    #[tokio::test]
    async fn a_refused_connection_is_retried_for_every_call() {
        use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
        let dir = tempfile::tempdir().expect("tempdir");
        let backends = backends(dir.path(), Duration::from_millis(300));
        // Bound and closed: the file stays, connections are refused.
        drop(std::os::unix::net::UnixListener::bind(backends.runtime.socket()).expect("bind"));
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let status = backends
            .call(
                &backends.runtime,
                Retry::Once,
                None,
                k8s_cri::v1::StopPodSandboxRequest::default(),
                |channel, request| {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move {
                        RuntimeServiceClient::new(channel)
                            .stop_pod_sandbox(request)
                            .await
                    }
                },
            )
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("not answering"), "{status:?}");
        assert!(
            attempts.load(std::sync::atomic::Ordering::SeqCst) > 1,
            "sent again: {status:?}"
        );
        let closed = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "closed under the call",
        )));
        assert!(!Retry::Once.worth_retrying(&closed));
        let refused = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert!(Retry::Once.worth_retrying(&refused));
    }

    /// Nobody listens on the runtime's socket: that, and only that, is "not answering".
    #[tokio::test]
    async fn a_backend_nobody_listens_for_is_not_answering() {
        use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
        let dir = tempfile::tempdir().expect("tempdir");
        let backends = backends(dir.path(), Duration::from_millis(100));
        for retry in [Retry::Once, Retry::Repeatable, Retry::Idempotent] {
            let status = backends
                .call(
                    &backends.runtime,
                    retry,
                    None,
                    k8s_cri::v1::VersionRequest::default(),
                    |channel, request| async move {
                        RuntimeServiceClient::new(channel).version(request).await
                    },
                )
                .await
                .expect_err("nobody listens");
            assert_eq!(status.code(), Code::Unavailable);
            assert!(
                status
                    .message()
                    .starts_with("trellis-runtime is not answering on ")
                    && status.message().contains("runtime.sock"),
                "{retry:?}: {}",
                status.message()
            );
        }
    }
}
