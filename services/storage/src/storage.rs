//! What each storage call does, over the layer, image and root filesystem stores: the
//! service's domain, apart from gRPC. The tonic handlers (`service`) only decode and
//! check a request, call one method here, and map its answer or error.
//!
//! Calls that touch several stores keep their rules here: an import and a prune of one
//! chain never run at once, an image is recorded only over imported layers, and a
//! removed image takes the layers no other image uses with it.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use trellis_common::locks::KeyedLocks;
use trellis_common::text::excerpt;
use trellis_proto::storage::v1::{FsUsageResponse, Image, LayerHeader, WritableLayerUsage};

use crate::error::StorageError;
use crate::images::{ImageStore, Removal};
use crate::layers::{LayerRecord, LayerStore};
use crate::rootfs::RootfsStore;

pub struct Storage {
    layers: Arc<LayerStore>,
    images: Arc<ImageStore>,
    rootfs: Arc<RootfsStore>,
    /// One import per chain at a time; a second waits and then finds it present.
    importing: KeyedLocks,
    /// Layers that pulls under way need and have not recorded an image with.
    holds: crate::holds::Holds,
    /// The mount point holding the writable layers, found once: reading mountinfo,
    /// long with a hundred overlays in it, cost more than the layers' own walk.
    writable_mountpoint: Arc<OnceLock<String>>,
}

/// The stores themselves, for the figures the metrics read.
#[derive(Clone)]
pub struct Stores {
    pub layers: Arc<LayerStore>,
    pub images: Arc<ImageStore>,
    pub rootfs: Arc<RootfsStore>,
}

/// A layer after `import_layer`.
pub struct Imported {
    pub record: LayerRecord,
    /// Recorded before this call, which unpacked nothing.
    pub already_present: bool,
}

/// A container's root filesystem after `prepare_rootfs`.
pub struct Prepared {
    pub mount_path: PathBuf,
    pub image_id: String,
}

impl Storage {
    pub fn new(layers: LayerStore, images: ImageStore, rootfs: RootfsStore) -> Self {
        Self {
            layers: Arc::new(layers),
            images: Arc::new(images),
            rootfs: Arc::new(rootfs),
            importing: KeyedLocks::new(),
            holds: crate::holds::Holds::default(),
            writable_mountpoint: Arc::default(),
        }
    }

    pub fn stores(&self) -> Stores {
        Stores {
            layers: self.layers.clone(),
            images: self.images.clone(),
            rootfs: self.rootfs.clone(),
        }
    }

    pub async fn fs_usage(&self) -> Result<FsUsageResponse, StorageError> {
        crate::usage::fs_usage(self.layers.root().to_path_buf()).await
    }

    /// Whether the layer is here; `holder`, a pull, holds it from now on either way.
    pub fn has_layer(&self, chain_id: &str, holder: &str) -> Result<bool, StorageError> {
        self.holds.hold(holder, chain_id);
        Ok(self.layers.get(chain_id)?.is_some())
    }

    /// Unpacks and records a layer from its compressed bytes, unless it is there. The
    /// unpack holds the chain's lock until it ends, even when this call is dropped (its
    /// client gone): a prune or another import of the chain waits for it.
    pub async fn import_layer(
        &self,
        header: LayerHeader,
        mut body: impl Stream<Item = io::Result<Bytes>> + Unpin,
    ) -> Result<Imported, StorageError> {
        self.holds.hold(&header.holder, &header.chain_id);
        let present = |layers: &LayerStore| -> Result<Option<Imported>, StorageError> {
            Ok(layers.get(&header.chain_id)?.map(|record| Imported {
                record,
                already_present: true,
            }))
        };
        if let Some(done) = present(&self.layers)? {
            return Ok(done);
        }
        let importing = self.importing.lock(&header.chain_id).await;
        if let Some(done) = present(&self.layers)? {
            return Ok(done);
        }

        let (chunks, receiver) = mpsc::channel(32);
        let layers = self.layers.clone();
        let unpack_header = header.clone();
        // A blocking thread is in no span: its steps (the unpack, the record) are
        // this call's once it enters it.
        let call = tracing::Span::current();
        let unpack = crate::layers::unpack_step(&header);
        let unpacking = tokio::task::spawn_blocking(move || {
            let _importing = importing;
            call.in_scope(|| {
                let reader = ChannelReader {
                    chunks: receiver,
                    current: Bytes::new(),
                };
                layers.import(&unpack_header, reader, unpack)
            })
        });
        while let Some(chunk) = body.next().await {
            let failed = chunk.is_err();
            // The unpacker stopped early (bad content): its error says why.
            if chunks.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(chunks);
        let record = unpacking.await.map_err(worker_stopped)??;
        tracing::info!(chain = %record.chain_id, blob = %record.blob_digest, image = %header.image, bytes = record.unpacked_bytes, "layer unpacked");
        Ok(Imported {
            record,
            already_present: false,
        })
    }

    /// Removes the named chains (all when none are named) that no image uses; the
    /// chains it removed.
    /// `holder`'s own holds end first, and those of holders named `released_prefix…`
    /// (an image replica's earlier process, gone); a chain another pull holds is kept.
    pub async fn prune_layers(
        &self,
        named: Vec<String>,
        holder: &str,
        released_prefix: &str,
    ) -> Result<Vec<String>, StorageError> {
        self.holds.release(holder);
        self.holds.release_prefix(released_prefix);
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
            importing.push(self.importing.lock(chain).await);
        }
        let in_use = self.images.chains_in_use()?;
        let mut unused = Vec::new();
        for chain in candidates {
            if !in_use.contains(&chain)
                && !self.holds.held_by_another(&chain, holder)
                && self.layers.get(&chain)?.is_some()
            {
                unused.push(chain);
            }
        }
        if !unused.is_empty() {
            tracing::info!(
                layers = unused.len(),
                "removing layers no image uses (a pull that failed or was abandoned)"
            );
            self.remove_chains(unused.clone()).await?;
        }
        Ok(unused)
    }

    /// Records an image whose layers are all imported.
    /// Stores an image whose layers are all present; answers it with the generation
    /// of the image records after the change.
    /// The holds of `holder`, the pull that recorded it, end: the image keeps its
    /// layers now.
    pub fn put_image(&self, image: Image, holder: &str) -> Result<(Image, u64), StorageError> {
        for chain in &image.chain_ids {
            if self.layers.get(chain)?.is_none() {
                return Err(StorageError::FailedPrecondition(format!(
                    "image {}: layer {} has not been imported",
                    excerpt(&image.id),
                    excerpt(chain)
                )));
            }
        }
        trellis_common::failpoint::hit("storage.image.before-record")?;
        let stored = self.images.put(image)?;
        self.holds.release(holder);
        Ok(stored)
    }

    pub fn get_image(&self, reference: &str) -> Result<Image, StorageError> {
        self.images.resolve(reference)?.ok_or_else(|| {
            StorageError::NotFound(format!("image {} is not in the store", excerpt(reference)))
        })
    }

    /// Every image, without its config: that is for ImageStatus, and a listing of
    /// hundreds need not carry it.
    /// Every image without its config (a listing of hundreds need not carry it),
    /// with the generation of the records listed.
    pub fn list_images(&self) -> Result<(Vec<Image>, u64), StorageError> {
        let (images, generation) = self.images.list_with_generation()?;
        Ok((images.into_iter().map(without_config).collect(), generation))
    }

    /// The generation of the image records, each time it changes.
    pub fn watch_images(&self) -> tokio::sync::watch::Receiver<u64> {
        self.images.watch()
    }

    /// Removes what `reference` names; an image deleted takes the layers no other
    /// image uses with it.
    pub async fn remove_image(&self, reference: &str) -> Result<Removal, StorageError> {
        let removal = self.images.remove(reference, |id| self.user_of(id))?;
        if let Some(image) = &removal.deleted {
            // Records that cannot be read: every layer counts as in use and stays.
            let in_use = self.images.chains_in_use().unwrap_or_else(|error| {
                tracing::error!(%error, "cannot read image records; keeping the removed image's layers");
                image.chain_ids.iter().cloned().collect::<HashSet<_>>()
            });
            let unused: Vec<String> = image
                .chain_ids
                .iter()
                .filter(|chain| !in_use.contains(*chain))
                .cloned()
                .collect();
            self.remove_chains(unused).await?;
        }
        Ok(removal)
    }

    /// Mounts (or finds mounted) a container's root filesystem over an image's layers.
    pub async fn prepare_rootfs(
        &self,
        image_reference: &str,
        container_id: String,
    ) -> Result<Prepared, StorageError> {
        let image = self.get_image(image_reference)?;
        let lower_dirs = self.layers.lower_dirs(&image.chain_ids)?;
        let rootfs = self.rootfs.clone();
        let image_id = image.id.clone();
        let call = tracing::Span::current();
        let mount_path = tokio::task::spawn_blocking(move || {
            call.in_scope(|| rootfs.prepare(&container_id, &image_id, lower_dirs))
        })
        .await
        .map_err(worker_stopped)??;
        Ok(Prepared {
            mount_path,
            image_id: image.id,
        })
    }

    /// Usage of the writable layers of the containers named; ids that are not
    /// containers here are left out.
    pub async fn writable_layer_usage(
        &self,
        container_ids: Vec<String>,
    ) -> Result<Vec<WritableLayerUsage>, StorageError> {
        let rootfs = self.rootfs.clone();
        let known_mountpoint = self.writable_mountpoint.clone();
        tokio::task::spawn_blocking(move || {
            let mut usages = Vec::new();
            for id in container_ids {
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
            Ok(usages)
        })
        .await
        .map_err(worker_stopped)?
    }

    pub async fn release_rootfs(&self, container_id: String) -> Result<(), StorageError> {
        let rootfs = self.rootfs.clone();
        let call = tracing::Span::current();
        tokio::task::spawn_blocking(move || call.in_scope(|| rootfs.release(&container_id)))
            .await
            .map_err(worker_stopped)?
    }

    async fn remove_chains(&self, chains: Vec<String>) -> Result<(), StorageError> {
        let layers = self.layers.clone();
        let call = tracing::Span::current();
        tokio::task::spawn_blocking(move || call.in_scope(|| layers.remove_chains(&chains)))
            .await
            .map_err(worker_stopped)?
    }

    fn user_of(&self, image_id: &str) -> Option<String> {
        self.rootfs.user_of(image_id).unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read root filesystem records; treating the image as in use");
            Some("(unknown: records unreadable)".into())
        })
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

fn worker_stopped(error: tokio::task::JoinError) -> StorageError {
    StorageError::Worker(error.to_string())
}

#[cfg(test)]
pub(crate) mod tests;

/// The config as pulled is for ImageStatus; lists and removals need not carry it.
pub fn without_config(image: Image) -> Image {
    Image {
        config_json: String::new(),
        ..image
    }
}
