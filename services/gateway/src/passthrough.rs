//! Forwarded CRI calls pass through the gateway as bytes.
//!
//! The gateway neither decodes the kubelet's request nor re-encodes the backend's
//! answer: the backend decodes (and checks) every request anyway, and the answers
//! the kubelet asks for most often, the lists of a busy node, are tens of kilobytes
//! that a typed hop would decode and encode again for nothing. What the gateway
//! adds stays: the retry across a backend restart, the caller's deadline passed on,
//! the trace, and the per-method metrics (`Backends::forward`). The methods the
//! gateway answers itself (Status, GetContainerEvents) go to the typed service.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{NamedService, UnaryService};
use tonic::{Request, Response, Status};
use trellis_common::grpc::MAX_MESSAGE_BYTES;

use crate::backend::{Backend, Backends, Retry};

/// One method forwarded as bytes: its full gRPC path, its name for metrics and logs,
/// and whether it may be sent again.
#[derive(Debug)]
pub struct Forwarded {
    pub path: &'static str,
    pub name: &'static str,
    pub retry: Retry,
}

/// A service of the kubelet's socket: the methods in `methods` go to one backend as
/// bytes; any other goes to `typed`, the generated server of the same service.
#[derive(Clone)]
pub struct Passthrough<S> {
    typed: S,
    backends: Arc<Backends>,
    methods: &'static [Forwarded],
    backend: fn(&Backends) -> &Backend,
}

impl<S> Passthrough<S> {
    pub fn new(
        typed: S,
        backends: Arc<Backends>,
        methods: &'static [Forwarded],
        backend: fn(&Backends) -> &Backend,
    ) -> Self {
        Self {
            typed,
            backends,
            methods,
            backend,
        }
    }
}

impl<S: NamedService> NamedService for Passthrough<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for Passthrough<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    /// Always ready: forwarding needs nothing up front, and tonic's generated
    /// servers are always ready too (their `poll_ready` returns `Ready` at once).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let Some(method) = self.methods.iter().find(|method| method.path == path) else {
            let mut typed = self.typed.clone();
            return Box::pin(async move { typed.call(request).await });
        };
        let forward = Forward {
            backends: self.backends.clone(),
            backend: self.backend,
            method,
        };
        Box::pin(async move {
            let mut server = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(server.unary(forward, request).await)
        })
    }
}

/// One forwarded call: the kubelet's message, as it came, to the backend.
struct Forward {
    backends: Arc<Backends>,
    backend: fn(&Backends) -> &Backend,
    method: &'static Forwarded,
}

impl UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (backends, backend, method) = (self.backends.clone(), self.backend, self.method);
        Box::pin(async move {
            let path = http::uri::PathAndQuery::from_static(method.path);
            backends
                .forward(
                    method.name,
                    backend(&backends),
                    method.retry,
                    request,
                    |channel, request| {
                        let path = path.clone();
                        async move {
                            let mut client = tonic::client::Grpc::new(channel)
                                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                                .max_encoding_message_size(MAX_MESSAGE_BYTES);
                            // A channel that cannot be readied failed to reach the
                            // backend: kept as the status's source, so it is retried.
                            client
                                .ready()
                                .await
                                .map_err(|error| Status::from_error(Box::new(error)))?;
                            client.unary(request, path, RawCodec).await
                        }
                    },
                )
                .await
        })
    }
}

/// What a forwarded method's typed handler answers: the router sends every such
/// call on as bytes before the typed service, so reaching it is a bug of ours.
pub fn not_routed(name: &str) -> Status {
    Status::internal(format!(
        "gateway: {name} is forwarded as bytes and should not reach the typed service"
    ))
}

/// A gRPC message as bytes, neither decoded nor encoded.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, destination: &mut EncodeBuf<'_>) -> Result<(), Status> {
        destination.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, source: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(source.copy_to_bytes(source.remaining())))
    }
}

#[cfg(test)]
mod tests;
