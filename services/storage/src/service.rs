//! The storage service's gRPC surface.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use trellis_common::text::excerpt;
use trellis_proto::storage::v1::import_layer_chunk::Part;
use trellis_proto::storage::v1::storage_server::Storage;
use trellis_proto::storage::v1::*;

use crate::images::ImageStore;
use crate::layers::LayerStore;
use crate::rootfs::RootfsStore;

pub struct StorageService {
    pub layers: Arc<LayerStore>,
    pub images: Arc<ImageStore>,
    pub rootfs: Arc<RootfsStore>,
    /// One import per chain at a time; a second waits and then finds it present.
    importing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The mount point holding the writable layers, found once: reading mountinfo,
    /// long with a hundred overlays in it, cost more than the layers' own walk.
    writable_mountpoint: Arc<std::sync::OnceLock<String>>,
    /// Turns true when the service begins to stop.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl StorageService {
    pub fn new(
        layers: LayerStore,
        images: ImageStore,
        rootfs: RootfsStore,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            stopping,
            layers: Arc::new(layers),
            images: Arc::new(images),
            rootfs: Arc::new(rootfs),
            importing: Mutex::new(HashMap::new()),
            writable_mountpoint: Arc::default(),
        }
    }

    fn import_lock(&self, chain_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut importing = self
            .importing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        importing.retain(|_, lock| Arc::strong_count(lock) > 1);
        importing.entry(chain_id.to_string()).or_default().clone()
    }

    fn store_path(&self) -> PathBuf {
        self.layers.root().to_path_buf()
    }

    fn user_of(&self, image_id: &str) -> Option<String> {
        self.rootfs.user_of(image_id).unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read root filesystem records; treating the image as in use");
            Some("(unknown: records unreadable)".into())
        })
    }
}

/// What WatchImages answers: generations until the service stops.
pub type ImagesGenerations =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ImagesGeneration, Status>> + Send>>;

/// The config as pulled is for ImageStatus; lists and removals need not carry it.
fn without_config(image: Image) -> Image {
    Image {
        config_json: String::new(),
        ..image
    }
}

/// Blocking `Read` over chunks sent from the async side.
struct ChannelReader {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

fn blocking_failed(error: tokio::task::JoinError) -> Status {
    Status::internal(format!("storage worker stopped: {error}"))
}

#[tonic::async_trait]
impl Storage for StorageService {
    async fn fs_usage(
        &self,
        _request: Request<FsUsageRequest>,
    ) -> Result<Response<FsUsageResponse>, Status> {
        Ok(Response::new(
            crate::usage::fs_usage(self.store_path()).await?,
        ))
    }

    async fn has_layer(
        &self,
        request: Request<HasLayerRequest>,
    ) -> Result<Response<HasLayerResponse>, Status> {
        let present = self.layers.get(&request.get_ref().chain_id)?.is_some();
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
        let present = |layers: &LayerStore| -> Result<Option<ImportLayerResponse>, Status> {
            Ok(layers
                .get(&header.chain_id)?
                .map(|record| ImportLayerResponse {
                    chain_id: record.chain_id,
                    unpacked_bytes: record.unpacked_bytes,
                    already_present: true,
                }))
        };
        if let Some(done) = present(&self.layers)? {
            return Ok(Response::new(done));
        }
        let importing = self.import_lock(&header.chain_id).lock_owned().await;
        if let Some(done) = present(&self.layers)? {
            return Ok(Response::new(done));
        }

        let (chunks, receiver) = mpsc::channel(32);
        let layers = self.layers.clone();
        let unpack_header = header.clone();
        // The unpack holds the chain's lock until it ends, even when this call is dropped
        // (its client gone): a prune or another import of the chain waits for it.
        let unpacking = tokio::task::spawn_blocking(move || {
            let _importing = importing;
            layers.import(
                &unpack_header,
                ChannelReader {
                    chunks: receiver,
                    current: Bytes::new(),
                },
            )
        });
        loop {
            let chunk = match stream.message().await {
                Ok(Some(ImportLayerChunk {
                    part: Some(Part::Data(data)),
                })) => Ok(data),
                Ok(None) => break,
                Ok(Some(_)) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a second header in one layer stream",
                )),
                Err(status) => Err(io::Error::other(format!(
                    "layer stream from the image service broke: {}",
                    status.message()
                ))),
            };
            let failed = chunk.is_err();
            // The unpacker stopped early (bad content): its error says why.
            if chunks.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(chunks);
        let record = unpacking.await.map_err(blocking_failed)??;
        tracing::info!(chain = %record.chain_id, blob = %record.blob_digest, image = %header.image, bytes = record.unpacked_bytes, "layer unpacked");
        Ok(Response::new(ImportLayerResponse {
            chain_id: record.chain_id,
            unpacked_bytes: record.unpacked_bytes,
            already_present: false,
        }))
    }

    async fn prune_layers(
        &self,
        request: Request<PruneLayersRequest>,
    ) -> Result<Response<PruneLayersResponse>, Status> {
        let named = request.into_inner().chain_ids;
        let mut candidates = if named.is_empty() {
            self.layers.chain_ids()?
        } else {
            named
        };
        // Locks are taken in one order, so that two prunes cannot wait on each other.
        candidates.sort();
        candidates.dedup();
        // An import of a candidate still under way (its puller gone, its unpack not yet
        // noticed) finishes first: else it would record its layer after this prune.
        let mut importing = Vec::new();
        for chain in &candidates {
            let lock = self.import_lock(chain);
            importing.push(lock.lock_owned().await);
        }
        let in_use = self.images.chains_in_use()?;
        let mut unused = Vec::new();
        for chain in candidates {
            if !in_use.contains(&chain) && self.layers.get(&chain)?.is_some() {
                unused.push(chain);
            }
        }
        if !unused.is_empty() {
            tracing::info!(
                layers = unused.len(),
                "removing layers no image uses (a pull that failed or was abandoned)"
            );
            let layers = self.layers.clone();
            let chains = unused.clone();
            tokio::task::spawn_blocking(move || layers.remove_chains(&chains))
                .await
                .map_err(blocking_failed)??;
        }
        Ok(Response::new(PruneLayersResponse { removed: unused }))
    }

    async fn put_image(
        &self,
        request: Request<PutImageRequest>,
    ) -> Result<Response<PutImageResponse>, Status> {
        let image = request
            .into_inner()
            .image
            .ok_or_else(|| Status::invalid_argument("PutImage needs an image"))?;
        for chain in &image.chain_ids {
            if self.layers.get(chain)?.is_none() {
                return Err(Status::failed_precondition(format!(
                    "image {}: layer {} has not been imported",
                    excerpt(&image.id),
                    excerpt(chain)
                )));
            }
        }
        let (image, generation) = self.images.put(image)?;
        Ok(Response::new(PutImageResponse {
            image: Some(image),
            generation,
        }))
    }

    async fn get_image(
        &self,
        request: Request<GetImageRequest>,
    ) -> Result<Response<Image>, Status> {
        let reference = &request.get_ref().reference;
        let image = self.images.resolve(reference)?.ok_or_else(|| {
            Status::not_found(format!("image {} is not in the store", excerpt(reference)))
        })?;
        Ok(Response::new(image))
    }

    async fn list_images(
        &self,
        _request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        // The full config is for ImageStatus; a listing of hundreds need not carry it.
        let (images, generation) = self.images.list_with_generation()?;
        let images = images.into_iter().map(without_config).collect();
        Ok(Response::new(ListImagesResponse { images, generation }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let removal = self
            .images
            .remove(&request.get_ref().reference, |id| self.user_of(id))?;
        if let Some(image) = &removal.deleted {
            // Records that cannot be read: every layer counts as in use and stays.
            let in_use = self.images.chains_in_use().unwrap_or_else(|error| {
                tracing::error!(%error, "cannot read image records; keeping the removed image's layers");
                image.chain_ids.iter().cloned().collect()
            });
            let unused: Vec<String> = image
                .chain_ids
                .iter()
                .filter(|chain| !in_use.contains(*chain))
                .cloned()
                .collect();
            let layers = self.layers.clone();
            tokio::task::spawn_blocking(move || layers.remove_chains(&unused))
                .await
                .map_err(blocking_failed)??;
        }
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
        let generations = tokio_stream::wrappers::WatchStream::new(self.images.watch());
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
        let image = self.images.resolve(&request.image)?.ok_or_else(|| {
            Status::not_found(format!(
                "image {} is not in the store",
                excerpt(&request.image)
            ))
        })?;
        let lower_dirs = self.layers.lower_dirs(&image.chain_ids)?;
        let rootfs = self.rootfs.clone();
        let (container, image_id) = (request.container_id.clone(), image.id.clone());
        let path =
            tokio::task::spawn_blocking(move || rootfs.prepare(&container, &image_id, lower_dirs))
                .await
                .map_err(blocking_failed)??;
        Ok(Response::new(PrepareRootfsResponse {
            mount_path: path.display().to_string(),
            image_id: image.id,
        }))
    }

    async fn writable_layer_usage(
        &self,
        request: Request<WritableLayerUsageRequest>,
    ) -> Result<Response<WritableLayerUsageResponse>, Status> {
        let rootfs = self.rootfs.clone();
        let ids = request.into_inner().container_ids;
        let known_mountpoint = self.writable_mountpoint.clone();
        let usages = tokio::task::spawn_blocking(move || {
            let mut usages = Vec::new();
            for id in ids {
                if crate::rootfs::validate_container_id(&id).is_err() {
                    continue;
                }
                let upper = rootfs.upper_dir(&id);
                if !upper.is_dir() {
                    continue;
                }
                let usage = crate::usage::measure(&upper)?;
                let mountpoint = match known_mountpoint.get() {
                    Some(known) => known.clone(),
                    None => {
                        let found = crate::usage::mountpoint_of(&upper)?.display().to_string();
                        let _ = known_mountpoint.set(found.clone());
                        found
                    }
                };
                usages.push(WritableLayerUsage {
                    container_id: id,
                    used_bytes: usage.bytes,
                    inodes_used: usage.inodes,
                    mountpoint,
                });
            }
            Ok::<_, crate::error::StorageError>(usages)
        })
        .await
        .map_err(blocking_failed)??;
        Ok(Response::new(WritableLayerUsageResponse {
            usages,
            timestamp_unix_nano: crate::now_nanos(),
        }))
    }

    async fn release_rootfs(
        &self,
        request: Request<ReleaseRootfsRequest>,
    ) -> Result<Response<ReleaseRootfsResponse>, Status> {
        let rootfs = self.rootfs.clone();
        let container = request.into_inner().container_id;
        tokio::task::spawn_blocking(move || rootfs.release(&container))
            .await
            .map_err(blocking_failed)??;
        Ok(Response::new(ReleaseRootfsResponse {}))
    }
}
