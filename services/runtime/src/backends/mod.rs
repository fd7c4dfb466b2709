//! What the runtime asks of the other services, as traits: storage (images and root
//! filesystems), the image service (pulling the pause image) and the network service
//! (a pod's network). [`grpc`] holds the real ones, clients over the services'
//! internal sockets; [`fake`] holds in-memory ones for unit tests of the lifecycle.

#[cfg(test)]
pub mod fake;
pub mod grpc;

use std::sync::Arc;

use trellis_proto::network::v1 as network;
use trellis_proto::storage::v1 as storage;

use crate::error::RuntimeError;

#[tonic::async_trait]
pub trait StorageBackend: Send + Sync {
    /// The image a reference (name, digest or id) names; `None` when not present.
    async fn image(&self, reference: &str) -> Result<Option<storage::Image>, RuntimeError>;
    /// Mounts a container's root filesystem from an image; `None` when the image is
    /// not present.
    async fn prepare_rootfs(
        &self,
        container_id: &str,
        image: &str,
    ) -> Result<Option<storage::PrepareRootfsResponse>, RuntimeError>;
    /// Unmounts and deletes a container's root filesystem; gone already is fine.
    async fn release_rootfs(&self, container_id: &str) -> Result<(), RuntimeError>;
    async fn writable_layer_usage(
        &self,
        container_ids: Vec<String>,
    ) -> Result<storage::WritableLayerUsageResponse, RuntimeError>;
}

#[tonic::async_trait]
pub trait ImageBackend: Send + Sync {
    async fn pull(&self, image: &str) -> Result<(), RuntimeError>;
}

#[tonic::async_trait]
pub trait NetworkBackend: Send + Sync {
    async fn set_up_pod(
        &self,
        request: network::SetUpPodRequest,
    ) -> Result<network::PodNetwork, RuntimeError>;
    /// Releases the pod's network; gone already is fine.
    async fn tear_down_pod(&self, sandbox_id: &str) -> Result<(), RuntimeError>;
}

/// The three, as the lifecycle holds them.
#[derive(Clone)]
pub struct Backends {
    pub storage: Arc<dyn StorageBackend>,
    pub images: Arc<dyn ImageBackend>,
    pub network: Arc<dyn NetworkBackend>,
}
