//! The storage service's gRPC surface: each handler decodes and checks its request,
//! calls `Storage`, and maps the answer; the work is done there.

use std::io;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trellis_common::telemetry::annotate;
use trellis_proto::storage::v1::import_layer_chunk::Part;
use trellis_proto::storage::v1::storage_server;
use trellis_proto::storage::v1::*;

use crate::error::StorageError;
use crate::metrics::{StorageMetrics, StoreKind};
use crate::storage::{Storage, without_config};

/// What WatchImages answers: generations until the service stops.
pub type ImagesGenerations =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ImagesGeneration, Status>> + Send>>;

pub struct StorageService {
    storage: Storage,
    metrics: StorageMetrics,
    /// Turns true when the service begins to stop.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl StorageService {
    pub fn new(
        storage: Storage,
        metrics: StorageMetrics,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            storage,
            metrics,
            stopping,
        }
    }

    /// Counts a failed write to `store` (see [`StorageMetrics::failed`]) on its way
    /// to the caller.
    fn failed(&self, store: StoreKind) -> impl Fn(StorageError) -> Status + '_ {
        move |error| {
            self.metrics.failed(store, &error);
            Status::from(error)
        }
    }
}

#[tonic::async_trait]
impl storage_server::Storage for StorageService {
    async fn fs_usage(
        &self,
        _request: Request<FsUsageRequest>,
    ) -> Result<Response<FsUsageResponse>, Status> {
        Ok(Response::new(self.storage.fs_usage().await?))
    }

    async fn has_layer(
        &self,
        request: Request<HasLayerRequest>,
    ) -> Result<Response<HasLayerResponse>, Status> {
        let request = request.get_ref();
        let present = self.storage.has_layer(&request.chain_id, &request.holder)?;
        Ok(Response::new(HasLayerResponse { present }))
    }

    async fn import_layer(
        &self,
        request: Request<Streaming<ImportLayerChunk>>,
    ) -> Result<Response<ImportLayerResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(ImportLayerChunk {
                part: Some(Part::Header(header)),
            }) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "ImportLayer must start with a layer header",
                ));
            }
        };
        annotate(&[
            ("container.image.name", &header.image),
            ("layer.digest", &header.digest),
        ]);
        let body = stream.map(|message| match message {
            Ok(ImportLayerChunk {
                part: Some(Part::Data(data)),
            }) => Ok(data),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a second header in one layer stream",
            )),
            Err(status) => Err(io::Error::other(format!(
                "layer stream from the image service broke: {}",
                status.message()
            ))),
        });
        let started = std::time::Instant::now();
        let imported = self
            .storage
            .import_layer(header, body)
            .await
            .map_err(self.failed(StoreKind::Layers))?;
        if !imported.already_present {
            self.metrics
                .unpacked(imported.record.unpacked_bytes, started.elapsed());
        }
        Ok(Response::new(ImportLayerResponse {
            chain_id: imported.record.chain_id,
            unpacked_bytes: imported.record.unpacked_bytes,
            already_present: imported.already_present,
        }))
    }

    async fn prune_layers(
        &self,
        request: Request<PruneLayersRequest>,
    ) -> Result<Response<PruneLayersResponse>, Status> {
        let request = request.into_inner();
        let removed = self
            .storage
            .prune_layers(request.chain_ids, &request.holder, &request.released_prefix)
            .await
            .map_err(self.failed(StoreKind::Layers))?;
        Ok(Response::new(PruneLayersResponse { removed }))
    }

    async fn put_image(
        &self,
        request: Request<PutImageRequest>,
    ) -> Result<Response<PutImageResponse>, Status> {
        let request = request.into_inner();
        let image = request
            .image
            .ok_or_else(|| Status::invalid_argument("PutImage needs an image"))?;
        annotate(&[("container.image.id", &image.id)]);
        let (image, generation) = self
            .storage
            .put_image(image, &request.holder)
            .map_err(self.failed(StoreKind::Images))?;
        Ok(Response::new(PutImageResponse {
            image: Some(image),
            generation,
        }))
    }

    async fn get_image(
        &self,
        request: Request<GetImageRequest>,
    ) -> Result<Response<Image>, Status> {
        annotate(&[("container.image.name", &request.get_ref().reference)]);
        Ok(Response::new(
            self.storage.get_image(&request.get_ref().reference)?,
        ))
    }

    async fn list_images(
        &self,
        _request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let (images, generation) = self.storage.list_images()?;
        Ok(Response::new(ListImagesResponse { images, generation }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        annotate(&[("container.image.name", &request.get_ref().reference)]);
        let removal = self
            .storage
            .remove_image(&request.get_ref().reference)
            .await
            .map_err(self.failed(StoreKind::Images))?;
        let deleted = removal.deleted.is_some();
        Ok(Response::new(RemoveImageResponse {
            image_id: removal.image_id,
            deleted,
            generation: removal.generation,
            image: removal.deleted.or(removal.remaining).map(without_config),
        }))
    }

    type WatchImagesStream = ImagesGenerations;

    async fn watch_images(
        &self,
        _request: Request<WatchImagesRequest>,
    ) -> Result<Response<ImagesGenerations>, Status> {
        let generations = tokio_stream::wrappers::WatchStream::new(self.storage.watch_images());
        let mut stopping = self.stopping.clone();
        // A watcher would hold the stop for its grace period otherwise: it ends with us.
        let stop = async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        };
        let stream = futures::StreamExt::map(
            futures::StreamExt::take_until(generations, stop),
            |generation| Ok(ImagesGeneration { generation }),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn prepare_rootfs(
        &self,
        request: Request<PrepareRootfsRequest>,
    ) -> Result<Response<PrepareRootfsResponse>, Status> {
        let request = request.into_inner();
        annotate(&[
            ("container.id", &request.container_id),
            ("container.image.name", &request.image),
        ]);
        let prepared = self
            .storage
            .prepare_rootfs(&request.image, request.container_id)
            .await
            .map_err(self.failed(StoreKind::Containers))?;
        Ok(Response::new(PrepareRootfsResponse {
            mount_path: prepared.mount_path.display().to_string(),
            image_id: prepared.image_id,
        }))
    }

    async fn writable_layer_usage(
        &self,
        request: Request<WritableLayerUsageRequest>,
    ) -> Result<Response<WritableLayerUsageResponse>, Status> {
        let usages = self
            .storage
            .writable_layer_usage(request.into_inner().container_ids)
            .await?;
        Ok(Response::new(WritableLayerUsageResponse {
            usages,
            timestamp_unix_nano: crate::now_nanos(),
        }))
    }

    async fn release_rootfs(
        &self,
        request: Request<ReleaseRootfsRequest>,
    ) -> Result<Response<ReleaseRootfsResponse>, Status> {
        let container_id = request.into_inner().container_id;
        annotate(&[("container.id", &container_id)]);
        self.storage
            .release_rootfs(container_id)
            .await
            .map_err(self.failed(StoreKind::Containers))?;
        Ok(Response::new(ReleaseRootfsResponse {}))
    }
}
