//! Calls that run to their end when their caller goes away.
//!
//! The HTTP/2 server drops a call's future when its client disconnects: a kubelet
//! that gave up, or a gateway killed with kill -9 while it forwarded the call. A
//! future dropped half-way through a creation leaves its work half done (a pod
//! record still `Creating`, a network set up for nobody), and the caller's retry
//! meets that instead of the finished result it could repeat (`lifecycle/repeat.rs`).
//! So every call runs as a task of its own, which a dropped caller does not cancel
//! (CRI-O keeps such creations for the retry too). The task is also where a panic of
//! a handler stops: it becomes an INTERNAL answer for the caller, not a dead server.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tracing::Instrument;

/// The tower layer: wraps a service so that each call runs detached (when `enabled`;
/// a service that acts on its callers leaving, as the image service stops a pull no
/// one waits for, keeps its calls attached).
#[derive(Debug, Clone, Copy)]
pub struct DetachLayer {
    pub enabled: bool,
}

impl<S> tower::Layer<S> for DetachLayer {
    type Service = Detached<S>;

    fn layer(&self, inner: S) -> Detached<S> {
        Detached {
            inner,
            enabled: self.enabled,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Detached<S> {
    inner: S,
    enabled: bool,
}

type Body = tonic::body::Body;

impl<S> tower::Service<http::Request<Body>> for Detached<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !self.enabled {
            return Box::pin(self.inner.call(request));
        }
        let method = request.uri().path().to_string();
        let call = self.inner.call(request);
        // Spawned at the first poll, which tonic makes inside the call's server span
        // (its `call` runs outside it), so that the handler's logs and calls belong
        // to the call's trace.
        Box::pin(async move {
            // Until the task runs: a busy service shows here.
            let dispatch = crate::step_span!("grpc.dispatch");
            let task = tokio::spawn(
                async move {
                    drop(dispatch);
                    call.await
                }
                .in_current_span(),
            );
            match task.await {
                Ok(answer) => answer,
                Err(failed) => {
                    let why = if failed.is_panic() {
                        "panicked"
                    } else {
                        "was cancelled"
                    };
                    tracing::error!(%method, "the handler of {method} {why}");
                    let status = tonic::Status::internal(format!("the handler of {method} {why}"));
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn request() -> http::Request<Body> {
        http::Request::builder()
            .uri("/runtime.v1.RuntimeService/RunPodSandbox")
            .body(Body::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn a_call_whose_caller_went_away_still_runs_to_its_end() {
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let slow = tower::service_fn(move |_: http::Request<Body>| {
            let done = done.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                done.store(true, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
            }
        });
        let mut service = DetachLayer { enabled: true }.layer(slow);
        let call = service.ready().await.expect("ready").call(request());
        // The caller gives up at once.
        drop(tokio::time::timeout(Duration::from_millis(10), call).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(finished.load(Ordering::SeqCst), "the call ran to its end");
    }

    #[tokio::test]
    async fn a_handler_that_panics_answers_internal() {
        let panicking = tower::service_fn(|_: http::Request<Body>| async move {
            if true {
                panic!("handler bug");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let mut service = DetachLayer { enabled: true }.layer(panicking);
        let answer = service
            .ready()
            .await
            .expect("ready")
            .call(request())
            .await
            .expect("an answer");
        let status = tonic::Status::from_header_map(answer.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().contains("RunPodSandbox panicked"),
            "{status:?}"
        );
    }
}
