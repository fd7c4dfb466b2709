//! Saying which service failed.
//!
//! A client of another Trellis service gets a failed call's status in one of two
//! ways: the service answered it (its message says what failed, maybe further down: a
//! registry, a CNI plugin, a disk), or the client made it itself because the service
//! could not be reached or dropped the connection under the call. Only the second may
//! be reported as that service "not answering"; the first keeps its code and its
//! words, so that a kubelet reads the part that failed, not the first service on the
//! way to it.
//!
//! A service that is there but does not answer (stopped, or stuck) is the third
//! case: the caller's deadline passes and it reads only that time ran out. A server
//! wrapped in [`WithDeadlines`] lets the calls it makes to other services know the
//! deadline of the call it serves ([`time_left`]), so that they give up a little
//! before it and the answer names the service that kept it waiting.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;
use tonic::server::NamedService;

tokio::task_local! {
    /// The deadline of the call being served, from its `grpc-timeout`.
    static DEADLINE: Instant;
}

/// Serves `S`, each call under its caller's deadline for [`time_left`].
#[derive(Clone)]
pub struct WithDeadlines<S>(pub S);

impl<S: NamedService> NamedService for WithDeadlines<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for WithDeadlines<S>
where
    S: tower::Service<http::Request<B>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|timeout| Instant::now() + timeout);
        let call = self.0.call(request);
        Box::pin(async move {
            match deadline {
                Some(deadline) => DEADLINE.scope(deadline, call).await,
                None => call.await,
            }
        })
    }
}

/// A `grpc-timeout` header's value, e.g. `1999m` or `5S`: at most 8 digits and a unit.
pub fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// Longest time kept back from the caller's deadline for our own answer to reach it.
const MAX_ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// How long a call to another service may take within the deadline of the call being
/// served: what is left of it, less a tenth (at most a second) for the answer to get
/// back; `None` when the call being served has no deadline (or this is not under
/// [`WithDeadlines`]).
pub fn time_left() -> Option<Duration> {
    let deadline = DEADLINE.try_with(|deadline| *deadline).ok()?;
    let left = deadline.saturating_duration_since(Instant::now());
    Some(left.saturating_sub((left / 10).min(MAX_ANSWER_MARGIN)))
}

/// Words for a call to `service` on `socket` that got no answer within `waited`.
pub fn no_answer_message(service: &str, socket: &Path, waited: Duration) -> String {
    format!(
        "{service} service did not answer within {waited:.1?} on {}",
        socket.display()
    )
}

/// Whether the client made `status` because the call got no answer: no connection,
/// or the connection lost under the call.
///
/// A status the server sent carries no source; one the client made from a transport
/// failure keeps the failure as its source (tonic's `ConnectError`, hyper's or h2's
/// error). A connection that closes under a call in flight (the server was killed
/// after accepting it) comes back as `Cancelled` or `Unknown` with such a source,
/// which is a transport failure too. The client's own deadline (`TimeoutExpired`) is
/// not the server's fault: it says nothing of whether the server was there.
pub fn not_reached(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    let transport = source.is_some();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return false;
        }
        source = error.source();
    }
    transport
}

/// Whether the client gave the call up before writing any of it: hyper cancels the
/// calls queued for a connection that closes first, which is what a draining server's
/// HTTP/2 GOAWAY does to calls racing it. Such a call never reached the server, so it
/// may be sent again whatever it does (as grpc-go's transparent retry does).
pub fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// How often a call that was never sent is sent again: each try meets a new
/// connection, so more than a couple means something else is wrong.
const MAX_RESENDS: usize = 3;

/// Makes a call with `send`, and again while it was never sent ([`never_sent`]: it
/// raced a draining server's GOAWAY), which is safe whatever the call does. A client
/// of a service that an operator restarts needs it: the restart drains, and the
/// calls racing the drain go to the next process instead of failing.
pub async fn resending<T, F, Fut>(mut send: F) -> Result<tonic::Response<T>, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let mut resent = 0;
    loop {
        match send().await {
            Err(status) if resent < MAX_RESENDS && never_sent(&status) => {
                resent += 1;
                tracing::debug!(
                    resent,
                    "call never sent (its connection was closing); sending it again"
                );
            }
            answer => return answer,
        }
    }
}

/// A call to another Trellis service, `peer` (`storage`, ...): in a client span of its
/// own, with a request carrying the trace context, sent again while never sent
/// ([`resending`]). `send` gets the request made of `message`.
pub async fn traced_call<M, T, Fut>(
    peer: &str,
    message: &M,
    mut send: impl FnMut(tonic::Request<M>) -> Fut,
) -> Result<tonic::Response<T>, Status>
where
    M: Clone,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    use tracing::Instrument;
    resending(|| send(crate::telemetry::traced_request(message.clone())))
        .instrument(crate::telemetry::client_span(peer))
        .await
}

/// Words for a call to `service` on `socket` that got no answer (see
/// [`not_reached`]): `<service> service unavailable: not answering on <socket>: <why>`.
pub fn unreached_message(service: &str, socket: &Path, status: &Status) -> String {
    format!(
        "{service} service unavailable: not answering on {}: {}",
        socket.display(),
        reason(status)
    )
}

/// What went wrong with the connection, for a message: the status's own words, or
/// the innermost cause when tonic's words are only "transport error".
pub fn reason(status: &Status) -> String {
    let mut innermost = None;
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        innermost = Some(error.to_string());
        source = error.source();
    }
    match innermost {
        Some(cause) if !status.message().contains(&cause) => {
            format!("{} ({cause})", status.message())
        }
        _ => status.message().to_string(),
    }
}

/// A failed call to `service` as the status to pass on: one that got no answer is
/// `Unavailable` with [`unreached_message`]'s words; one the service answered keeps
/// its code, its words prefixed with `<service> service: `.
pub fn pass_on(service: &str, socket: &Path, status: &Status) -> Status {
    if not_reached(status) {
        Status::unavailable(unreached_message(service, socket, status))
    } else {
        Status::new(
            status.code(),
            format!("{service} service: {}", status.message()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::unix_channel;
    use tonic::Code;

    /// A socket nobody listens on: the status is the client's own, and says so.
    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_not_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("storage.sock");
        let mut client = tonic_health::pb::health_client::HealthClient::new(unix_channel(&socket));
        let status = client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect_err("nobody listens");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(not_reached(&status), "{status:?}");
        let passed = pass_on("storage", &socket, &status);
        assert_eq!(passed.code(), Code::Unavailable);
        assert!(
            passed.message().starts_with(&format!(
                "storage service unavailable: not answering on {}: ",
                socket.display()
            )) && passed.message().contains("No such file or directory"),
            "{}",
            passed.message()
        );
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            parse_grpc_timeout("1999m"),
            Some(Duration::from_millis(1999))
        );
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None, "at most 8 digits");
    }

    /// A call served under `WithDeadlines` sees its caller's deadline, less the
    /// margin for its answer; outside one, there is none.
    #[tokio::test]
    async fn the_deadline_of_the_call_served_bounds_the_calls_it_makes() {
        use tower::{Service, ServiceExt};
        assert_eq!(time_left(), None);
        let inner =
            tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(time_left()) });
        let mut service = WithDeadlines(inner);
        let request = http::Request::builder()
            .header("grpc-timeout", "5S")
            .body(())
            .expect("request");
        let left = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("answer")
            .expect("a deadline");
        assert!(
            left > Duration::from_millis(4000) && left <= Duration::from_millis(4500),
            "{left:?}"
        );
        let request = http::Request::builder().body(()).expect("request");
        let left = service.call(request).await.expect("answer");
        assert_eq!(left, None, "no grpc-timeout, no deadline");
    }

    #[test]
    fn an_answer_keeps_its_code_and_words() {
        for status in [
            Status::unavailable("registry 127.0.0.1:5000: 503 Service Unavailable"),
            Status::not_found("registry 127.0.0.1:5000: manifest unknown"),
            Status::resource_exhausted("no space left on /var/lib/trellis"),
        ] {
            assert!(!not_reached(&status), "{status:?}");
            let passed = pass_on("image", Path::new("/run/trellis/image.sock"), &status);
            assert_eq!(passed.code(), status.code());
            assert_eq!(
                passed.message(),
                format!("image service: {}", status.message())
            );
        }
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(!not_reached(&timeout), "our own deadline: {timeout:?}");
    }
}
