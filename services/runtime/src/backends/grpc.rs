//! The backends as gRPC clients of the other services on their internal sockets.
//! Each call carries the trace context; a failed call names the service, and whether
//! that service answered with an error (passed on with its code) or could not be
//! reached (see `trellis_common::upstream`). A call gives up a little before the
//! deadline of the CRI call it serves, so that a service that took it and never
//! answered (stopped, stuck) is named rather than the caller reading only that its
//! time ran out.

use std::future::Future;
use std::path::PathBuf;

use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_common::config::{Config, ServiceKind};
use trellis_common::transport::unix_channel;
use trellis_common::upstream::{
    no_answer_message, not_reached, time_left, traced_call, unreached_message,
};
use trellis_proto::network::v1 as network;
use trellis_proto::network::v1::network_client::NetworkClient;
use trellis_proto::storage::v1 as storage;
use trellis_proto::storage::v1::storage_client::StorageClient;

use super::{Backends, ImageBackend, NetworkBackend, StorageBackend};
use crate::error::RuntimeError;

/// A channel to one service, and what a failure of it is told as.
struct Peer {
    service: &'static str,
    socket: PathBuf,
    channel: Channel,
}

impl Peer {
    fn new(config: &Config, kind: ServiceKind, service: &'static str) -> Self {
        let socket = config.endpoint(kind).socket;
        Self {
            service,
            channel: unix_channel(&socket),
            socket,
        }
    }

    fn failed(&self, status: Status) -> RuntimeError {
        if not_reached(&status) {
            RuntimeError::Unreachable {
                service: self.service,
                message: unreached_message(self.service, &self.socket, &status),
            }
        } else {
            RuntimeError::Backend {
                service: self.service,
                status,
            }
        }
    }

    /// Makes the call `send` makes (again if it was never sent: the service was
    /// draining for a restart) within what the deadline of the call being served
    /// leaves. `send` gets the channel and a request carrying the trace context.
    async fn bounded<M, T, Fut>(
        &self,
        message: M,
        send: impl Fn(Channel, tonic::Request<M>) -> Fut,
    ) -> Result<T, RuntimeError>
    where
        M: Clone,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let call = traced_call(self.service, &message, |request| {
            send(self.channel.clone(), request)
        });
        let answer = match time_left() {
            None => call.await,
            Some(left) => match tokio::time::timeout(left, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    return Err(RuntimeError::NoAnswer {
                        service: self.service,
                        message: no_answer_message(self.service, &self.socket, left),
                    });
                }
            },
        };
        answer
            .map(tonic::Response::into_inner)
            .map_err(|status| self.failed(status))
    }

    /// [`Peer::bounded`], with a `NotFound` answer as `None`.
    async fn absent_if_not_found<M, T, Fut>(
        &self,
        message: M,
        send: impl Fn(Channel, tonic::Request<M>) -> Fut,
    ) -> Result<Option<T>, RuntimeError>
    where
        M: Clone,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match self.bounded(message, send).await {
            Ok(answer) => Ok(Some(answer)),
            Err(RuntimeError::Backend { status, .. }) if status.code() == Code::NotFound => {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

pub struct GrpcStorage(Peer);
pub struct GrpcImages(Peer);
pub struct GrpcNetwork(Peer);

/// Clients of the node's storage, image and network services.
pub fn connect(config: &Config) -> Backends {
    Backends {
        storage: std::sync::Arc::new(GrpcStorage(Peer::new(
            config,
            ServiceKind::Storage,
            "storage",
        ))),
        images: std::sync::Arc::new(GrpcImages(Peer::new(config, ServiceKind::Image, "image"))),
        network: std::sync::Arc::new(GrpcNetwork(Peer::new(
            config,
            ServiceKind::Network,
            "network",
        ))),
    }
}

#[tonic::async_trait]
impl StorageBackend for GrpcStorage {
    async fn image(&self, reference: &str) -> Result<Option<storage::Image>, RuntimeError> {
        let message = storage::GetImageRequest {
            reference: reference.to_string(),
        };
        self.0
            .absent_if_not_found(message, |channel, request| async move {
                StorageClient::new(channel).get_image(request).await
            })
            .await
    }

    async fn prepare_rootfs(
        &self,
        container_id: &str,
        image: &str,
    ) -> Result<Option<storage::PrepareRootfsResponse>, RuntimeError> {
        let message = storage::PrepareRootfsRequest {
            container_id: container_id.to_string(),
            image: image.to_string(),
        };
        self.0
            .absent_if_not_found(message, |channel, request| async move {
                StorageClient::new(channel).prepare_rootfs(request).await
            })
            .await
    }

    async fn release_rootfs(&self, container_id: &str) -> Result<(), RuntimeError> {
        let message = storage::ReleaseRootfsRequest {
            container_id: container_id.to_string(),
        };
        self.0
            .bounded(message, |channel, request| async move {
                StorageClient::new(channel).release_rootfs(request).await
            })
            .await?;
        Ok(())
    }

    async fn writable_layer_usage(
        &self,
        container_ids: Vec<String>,
    ) -> Result<storage::WritableLayerUsageResponse, RuntimeError> {
        let message = storage::WritableLayerUsageRequest { container_ids };
        self.0
            .bounded(message, |channel, request| async move {
                StorageClient::new(channel)
                    .writable_layer_usage(request)
                    .await
            })
            .await
    }
}

#[tonic::async_trait]
impl ImageBackend for GrpcImages {
    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        use k8s_cri::v1::image_service_client::ImageServiceClient;
        use k8s_cri::v1::{ImageSpec, PullImageRequest};
        let message = PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.0
            .bounded(message, |channel, request| async move {
                ImageServiceClient::new(channel).pull_image(request).await
            })
            .await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl NetworkBackend for GrpcNetwork {
    async fn set_up_pod(
        &self,
        request: network::SetUpPodRequest,
    ) -> Result<network::PodNetwork, RuntimeError> {
        self.0
            .bounded(request, |channel, request| async move {
                NetworkClient::new(channel).set_up_pod(request).await
            })
            .await
    }

    async fn tear_down_pod(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        let message = network::TearDownPodRequest {
            sandbox_id: sandbox_id.to_string(),
        };
        self.0
            .bounded(message, |channel, request| async move {
                NetworkClient::new(channel).tear_down_pod(request).await
            })
            .await?;
        Ok(())
    }
}
