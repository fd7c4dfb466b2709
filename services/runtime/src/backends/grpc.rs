//! The backends as gRPC clients of the other services on their internal sockets.
//! Each call carries the trace context; a failed call names the service.

use tonic::Code;
use tonic::transport::Channel;
use trellis_common::config::{Config, ServiceKind};
use trellis_common::telemetry::traced_request;
use trellis_common::transport::unix_channel;
use trellis_proto::network::v1 as network;
use trellis_proto::network::v1::network_client::NetworkClient;
use trellis_proto::storage::v1 as storage;
use trellis_proto::storage::v1::storage_client::StorageClient;

use super::{Backends, ImageBackend, NetworkBackend, StorageBackend};
use crate::error::RuntimeError;

pub struct GrpcStorage(Channel);
pub struct GrpcImages(Channel);
pub struct GrpcNetwork(Channel);

/// Clients of the node's storage, image and network services.
pub fn connect(config: &Config) -> Backends {
    let channel = |kind| unix_channel(&config.endpoint(kind).socket);
    Backends {
        storage: std::sync::Arc::new(GrpcStorage(channel(ServiceKind::Storage))),
        images: std::sync::Arc::new(GrpcImages(channel(ServiceKind::Image))),
        network: std::sync::Arc::new(GrpcNetwork(channel(ServiceKind::Network))),
    }
}

fn absent_if_not_found<T>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> Result<Option<T>, RuntimeError> {
    match result {
        Ok(response) => Ok(Some(response.into_inner())),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(RuntimeError::storage(status)),
    }
}

#[tonic::async_trait]
impl StorageBackend for GrpcStorage {
    async fn image(&self, reference: &str) -> Result<Option<storage::Image>, RuntimeError> {
        let request = traced_request(storage::GetImageRequest {
            reference: reference.to_string(),
        });
        absent_if_not_found(StorageClient::new(self.0.clone()).get_image(request).await)
    }

    async fn prepare_rootfs(
        &self,
        container_id: &str,
        image: &str,
    ) -> Result<Option<storage::PrepareRootfsResponse>, RuntimeError> {
        let request = traced_request(storage::PrepareRootfsRequest {
            container_id: container_id.to_string(),
            image: image.to_string(),
        });
        absent_if_not_found(
            StorageClient::new(self.0.clone())
                .prepare_rootfs(request)
                .await,
        )
    }

    async fn release_rootfs(&self, container_id: &str) -> Result<(), RuntimeError> {
        let request = traced_request(storage::ReleaseRootfsRequest {
            container_id: container_id.to_string(),
        });
        StorageClient::new(self.0.clone())
            .release_rootfs(request)
            .await
            .map_err(RuntimeError::storage)?;
        Ok(())
    }

    async fn writable_layer_usage(
        &self,
        container_ids: Vec<String>,
    ) -> Result<storage::WritableLayerUsageResponse, RuntimeError> {
        let request = traced_request(storage::WritableLayerUsageRequest { container_ids });
        Ok(StorageClient::new(self.0.clone())
            .writable_layer_usage(request)
            .await
            .map_err(RuntimeError::storage)?
            .into_inner())
    }
}

#[tonic::async_trait]
impl ImageBackend for GrpcImages {
    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        use k8s_cri::v1::image_service_client::ImageServiceClient;
        use k8s_cri::v1::{ImageSpec, PullImageRequest};
        let request = traced_request(PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        });
        ImageServiceClient::new(self.0.clone())
            .pull_image(request)
            .await
            .map_err(|status| RuntimeError::Backend {
                service: "image",
                status,
            })?;
        Ok(())
    }
}

#[tonic::async_trait]
impl NetworkBackend for GrpcNetwork {
    async fn set_up_pod(
        &self,
        request: network::SetUpPodRequest,
    ) -> Result<network::PodNetwork, RuntimeError> {
        Ok(NetworkClient::new(self.0.clone())
            .set_up_pod(traced_request(request))
            .await
            .map_err(RuntimeError::network)?
            .into_inner())
    }

    async fn tear_down_pod(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        let request = traced_request(network::TearDownPodRequest {
            sandbox_id: sandbox_id.to_string(),
        });
        NetworkClient::new(self.0.clone())
            .tear_down_pod(request)
            .await
            .map_err(RuntimeError::network)?;
        Ok(())
    }
}
