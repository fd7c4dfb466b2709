//! In-memory backends for unit tests of the lifecycle: images are entries in a map,
//! root filesystems are directories under a test's temporary root, pod networks
//! hand out addresses from a counter, and any call can be made to fail.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use trellis_proto::network::v1 as network;
use trellis_proto::storage::v1 as storage;

use super::{Backends, ImageBackend, NetworkBackend, StorageBackend};
use crate::error::RuntimeError;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Calls that fail until healed, by name (`prepare_rootfs`, `set_up_pod` …).
#[derive(Default)]
pub struct Failures(Mutex<HashSet<&'static str>>);

impl Failures {
    pub fn fail(&self, call: &'static str) {
        lock(&self.0).insert(call);
    }

    pub fn heal(&self, call: &'static str) {
        lock(&self.0).remove(call);
    }

    fn check(&self, service: &'static str, call: &'static str) -> Result<(), RuntimeError> {
        if lock(&self.0).contains(call) {
            return Err(RuntimeError::Backend {
                service,
                status: tonic::Status::unavailable(format!(
                    "fake {service}: {call} failed as told"
                )),
            });
        }
        Ok(())
    }
}

pub struct FakeStorage {
    images: Mutex<HashMap<String, storage::Image>>,
    rootfs_root: PathBuf,
    /// Containers with a root filesystem.
    pub mounted: Mutex<BTreeSet<String>>,
    pub failures: Failures,
}

impl FakeStorage {
    pub fn new(rootfs_root: PathBuf) -> Self {
        Self {
            images: Mutex::default(),
            rootfs_root,
            mounted: Mutex::default(),
            failures: Failures::default(),
        }
    }

    /// Makes an image present under `reference`.
    pub fn add_image(&self, reference: &str, config: storage::ImageConfig) {
        let image = storage::Image {
            id: format!("sha256:{:064x}", reference.len()),
            repo_tags: vec![reference.to_string()],
            config: Some(config),
            ..Default::default()
        };
        lock(&self.images).insert(reference.to_string(), image);
    }

    pub fn mounted(&self) -> Vec<String> {
        lock(&self.mounted).iter().cloned().collect()
    }
}

#[tonic::async_trait]
impl StorageBackend for FakeStorage {
    async fn image(&self, reference: &str) -> Result<Option<storage::Image>, RuntimeError> {
        self.failures.check("storage", "image")?;
        Ok(lock(&self.images).get(reference).cloned())
    }

    async fn prepare_rootfs(
        &self,
        container_id: &str,
        image: &str,
    ) -> Result<Option<storage::PrepareRootfsResponse>, RuntimeError> {
        self.failures.check("storage", "prepare_rootfs")?;
        let Some(image) = lock(&self.images).get(image).cloned() else {
            return Ok(None);
        };
        let mount_path = self.rootfs_root.join(container_id);
        std::fs::create_dir_all(&mount_path)
            .map_err(|source| RuntimeError::io("fake storage: rootfs", source))?;
        lock(&self.mounted).insert(container_id.to_string());
        Ok(Some(storage::PrepareRootfsResponse {
            mount_path: mount_path.display().to_string(),
            image_id: image.id,
        }))
    }

    async fn release_rootfs(&self, container_id: &str) -> Result<(), RuntimeError> {
        self.failures.check("storage", "release_rootfs")?;
        lock(&self.mounted).remove(container_id);
        Ok(())
    }

    async fn writable_layer_usage(
        &self,
        container_ids: Vec<String>,
    ) -> Result<storage::WritableLayerUsageResponse, RuntimeError> {
        self.failures.check("storage", "writable_layer_usage")?;
        Ok(storage::WritableLayerUsageResponse {
            usages: container_ids
                .into_iter()
                .map(|container_id| storage::WritableLayerUsage {
                    container_id,
                    used_bytes: 4096,
                    inodes_used: 1,
                    mountpoint: "/fake".into(),
                })
                .collect(),
            ..Default::default()
        })
    }
}

/// Pulls make the image present in the fake storage.
pub struct FakeImages {
    storage: Arc<FakeStorage>,
    pub pulled: Mutex<Vec<String>>,
    pub failures: Failures,
}

#[tonic::async_trait]
impl ImageBackend for FakeImages {
    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        self.failures.check("image", "pull")?;
        let config = storage::ImageConfig {
            entrypoint: vec!["/pause".into()],
            ..Default::default()
        };
        self.storage.add_image(image, config);
        lock(&self.pulled).push(image.to_string());
        Ok(())
    }
}

#[derive(Default)]
pub struct FakeNetwork {
    /// Pods with a network.
    pub pods: Mutex<BTreeSet<String>>,
    next: Mutex<u8>,
    pub failures: Failures,
}

impl FakeNetwork {
    pub fn pods(&self) -> Vec<String> {
        lock(&self.pods).iter().cloned().collect()
    }
}

#[tonic::async_trait]
impl NetworkBackend for FakeNetwork {
    async fn set_up_pod(
        &self,
        request: network::SetUpPodRequest,
    ) -> Result<network::PodNetwork, RuntimeError> {
        self.failures.check("network", "set_up_pod")?;
        lock(&self.pods).insert(request.sandbox_id.clone());
        let mut next = lock(&self.next);
        *next = next.wrapping_add(1);
        Ok(network::PodNetwork {
            sandbox_id: request.sandbox_id,
            ips: vec![network::PodIp {
                ip: format!("10.99.0.{next}"),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn tear_down_pod(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        self.failures.check("network", "tear_down_pod")?;
        lock(&self.pods).remove(sandbox_id);
        Ok(())
    }
}

/// The three fakes, and the [`Backends`] that hands them to the lifecycle.
pub struct Fakes {
    pub storage: Arc<FakeStorage>,
    pub images: Arc<FakeImages>,
    pub network: Arc<FakeNetwork>,
}

impl Fakes {
    pub fn new(rootfs_root: PathBuf) -> Self {
        let storage = Arc::new(FakeStorage::new(rootfs_root));
        Self {
            images: Arc::new(FakeImages {
                storage: storage.clone(),
                pulled: Mutex::default(),
                failures: Failures::default(),
            }),
            storage,
            network: Arc::new(FakeNetwork::default()),
        }
    }

    pub fn backends(&self) -> Backends {
        Backends {
            storage: self.storage.clone(),
            images: self.images.clone(),
            network: self.network.clone(),
        }
    }
}
