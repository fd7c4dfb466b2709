//! Calls to the services behind the gateway.
//!
//! A backend that is down fails a call at once (its socket refuses the connection).
//! Idempotent reads are retried with backoff for a bounded time, so a kubelet sees no
//! error while a service restarts; the caller's own deadline (`grpc-timeout`) always
//! wins and is passed on to the backend.
//!
//! Only a backend that did not answer is said to be "not answering". One that
//! answered `Unavailable` is up and says that something further down is not (storage
//! restarting, a registry down): a read is retried for the same budget, since that
//! too may pass, but the caller gets the backend's own answer, which names the part
//! that failed.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use trellis_common::config::{Config, ServiceKind};
use trellis_common::metrics::RpcMetrics;
use trellis_common::telemetry::inject_grpc_context;
use trellis_common::transport::unix_channel;
use trellis_common::upstream::{never_sent, not_reached, parse_grpc_timeout};

/// Whether a call may be sent again after a failure to reach its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads: retried across a backend restart.
    Idempotent,
    /// Anything that changes state: one attempt, so it is never applied twice.
    Once,
}

pub struct Backend {
    pub kind: ServiceKind,
    pub socket: PathBuf,
    channel: Channel,
}

pub struct Backends {
    pub runtime: Backend,
    pub image: Backend,
    pub network: Backend,
    retry_budget: Duration,
    metrics: RpcMetrics,
}

/// How often a call is tried that never left the gateway (see `never_sent`): each
/// attempt goes to a new connection, so a second one hitting the same race is rare.
const NEVER_SENT_ATTEMPTS: u32 = 3;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);
const MAX_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Left of the caller's deadline to send our own answer back in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

impl Backends {
    pub fn new(config: &Config, retry_budget: Duration, metrics: RpcMetrics) -> Self {
        let backend = |kind| {
            let socket = config.endpoint(kind).socket;
            Backend {
                kind,
                channel: unix_channel(&socket),
                socket,
            }
        };
        Self {
            runtime: backend(ServiceKind::Runtime),
            image: backend(ServiceKind::Image),
            network: backend(ServiceKind::Network),
            retry_budget,
            metrics,
        }
    }

    /// Forwards one CRI call and records its latency and outcome.
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
        self.observe(method, started, result.as_ref().err().map(Status::code));
        result
    }

    pub fn observe(&self, method: &'static str, started: Instant, error: Option<Code>) {
        self.metrics.observe(method, started.elapsed(), error);
        if let Some(code) = error {
            tracing::debug!(method, ?code, "CRI call failed");
        }
    }

    /// One backend call, retried while the backend cannot be reached or answers
    /// `Unavailable`, if `retry` allows.
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
        if retry == Retry::Once {
            // Applied once at most: sent again only if it was never sent at all (it
            // raced the GOAWAY of a backend that is draining to restart).
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let sent = call(backend.channel.clone(), outgoing(message.clone(), deadline));
                return match sent.await {
                    Err(status) if never_sent(&status) && attempts < NEVER_SENT_ATTEMPTS => {
                        continue;
                    }
                    Err(status) if not_reached(&status) => {
                        Err(unreachable(backend, attempts, started, &status))
                    }
                    answer => answer,
                };
            }
        }
        let mut give_up = started + self.retry_budget;
        if let Some(deadline) = deadline {
            give_up = give_up.min(deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline));
        }
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let request = outgoing(message.clone(), deadline);
            let error = match call(backend.channel.clone(), request).await {
                Ok(response) => return Ok(response),
                Err(status) if worth_retrying(&status) => status,
                Err(status) => return Err(status),
            };
            if Instant::now() + delay >= give_up {
                return Err(if not_reached(&error) {
                    unreachable(backend, attempts, started, &error)
                } else {
                    error
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }
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

fn unreachable(backend: &Backend, attempts: u32, started: Instant, error: &Status) -> Status {
    Status::unavailable(format!(
        "trellis-{} is not answering on {} ({} attempt{} over {:?}): {}",
        backend.kind.name(),
        backend.socket.display(),
        attempts,
        if attempts == 1 { "" } else { "s" },
        started.elapsed(),
        error.message()
    ))
}

/// Whether an idempotent call may be sent again after `status`: the backend was not
/// reached (see [`not_reached`]: the call did not run to completion there), or it
/// answered `Unavailable` (a service it needs is restarting). Other answers of the
/// backend and our own deadline are final.
fn worth_retrying(status: &Status) -> bool {
    not_reached(status) || status.code() == Code::Unavailable
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
        for answer in [
            Status::cancelled("cancelled by the backend"),
            Status::unknown("transport error, said the backend"),
            Status::not_found("no such pod"),
        ] {
            assert!(!worth_retrying(&answer), "{answer:?}");
        }
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timeout.code(), Code::Cancelled);
        assert!(!worth_retrying(&timeout));
    }

    fn backends(dir: &std::path::Path, retry_budget: Duration) -> Backends {
        let backend = |kind: ServiceKind| {
            let socket = dir.join(format!("{}.sock", kind.name()));
            Backend {
                kind,
                channel: unix_channel(&socket),
                socket,
            }
        };
        let mut registry = prometheus_client::registry::Registry::default();
        Backends {
            runtime: backend(ServiceKind::Runtime),
            image: backend(ServiceKind::Image),
            network: backend(ServiceKind::Network),
            retry_budget,
            metrics: RpcMetrics::register(&mut registry, "test"),
        }
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
        for retry in [Retry::Once, Retry::Idempotent] {
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
                Retry::Once => assert_eq!(sent, 1),
                Retry::Idempotent => assert!(
                    sent > 1 && started.elapsed() >= Duration::from_millis(100),
                    "retried for the budget: {sent} attempts in {:?}",
                    started.elapsed()
                ),
            }
        }
    }

    /// Nobody listens on the runtime's socket: that, and only that, is "not answering".
    #[tokio::test]
    async fn a_backend_nobody_listens_for_is_not_answering() {
        use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
        let dir = tempfile::tempdir().expect("tempdir");
        let backends = backends(dir.path(), Duration::from_millis(100));
        for retry in [Retry::Once, Retry::Idempotent] {
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
