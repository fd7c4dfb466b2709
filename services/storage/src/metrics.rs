//! The storage service's Prometheus figures: what each store holds (layers, images,
//! containers' root filesystems, and their bytes), how fast layers unpack, and the
//! writes that failed. Counts are read from the records at each scrape; the bytes of
//! the containers' writable layers, which take a walk of their trees, every
//! [`WALK_INTERVAL`].

use std::collections::HashSet;
use std::fmt::{self, Debug};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use trellis_common::metrics::{encode_gauge, precreate};

use crate::error::StorageError;
use crate::storage::Stores;

const WALK_INTERVAL: Duration = Duration::from_secs(30);

/// The stores a write may fail in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Layers,
    Images,
    Containers,
}

impl StoreKind {
    const ALL: [StoreKind; 3] = [Self::Layers, Self::Images, Self::Containers];

    fn name(self) -> &'static str {
        match self {
            Self::Layers => "layers",
            Self::Images => "images",
            Self::Containers => "containers",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
}

#[derive(Clone)]
pub struct StorageMetrics {
    unpacked_bytes: Counter,
    unpack_duration: Histogram,
    write_errors: Family<StoreLabels, Counter>,
}

impl StorageMetrics {
    /// Registers the figures of `stores`; the containers' bytes are walked in the
    /// background from now on.
    pub fn register(registry: &mut Registry, stores: Stores) -> Self {
        let unpacked_bytes = Counter::default();
        let unpack_duration = Histogram::new([
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]);
        let write_errors = Family::<StoreLabels, Counter>::default();
        registry.register(
            "storage_unpacked_bytes",
            "Bytes of layers unpacked (divided by the unpack seconds: the unpack throughput)",
            unpacked_bytes.clone(),
        );
        registry.register(
            "storage_unpack_duration_seconds",
            "Time to unpack and record one layer, from its first byte (as the image service streams it) to its record",
            unpack_duration.clone(),
        );
        registry.register(
            "storage_write_errors",
            "Writes that failed for the file system or the record store (not for what was asked), by store",
            write_errors.clone(),
        );
        precreate(
            &write_errors,
            StoreKind::ALL.map(|kind| StoreLabels { store: kind.name() }),
        );
        let containers_bytes = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
        tokio::spawn(walk_containers(stores.clone(), containers_bytes.clone()));
        registry.register_collector(Box::new(StoreCollector {
            stores,
            containers_bytes,
        }));
        Self {
            unpacked_bytes,
            unpack_duration,
            write_errors,
        }
    }

    pub fn unpacked(&self, bytes: u64, elapsed: Duration) {
        self.unpacked_bytes.inc_by(bytes);
        self.unpack_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts `error` if it is a failure to write rather than a refusal.
    pub fn failed(&self, store: StoreKind, error: &StorageError) {
        if error.is_write_failure() {
            self.write_errors
                .get_or_create(&StoreLabels {
                    store: store.name(),
                })
                .inc();
        }
    }
}

async fn walk_containers(stores: Stores, bytes: Gauge<u64, std::sync::atomic::AtomicU64>) {
    let mut tick = tokio::time::interval(WALK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rootfs = stores.rootfs.clone();
        let walked = tokio::task::spawn_blocking(move || -> Result<u64, StorageError> {
            let mut total = 0;
            for id in rootfs.container_ids()? {
                let upper = rootfs.upper_dir(&id);
                // A container released meanwhile is simply gone.
                if let Ok(usage) = crate::usage::measure(&upper) {
                    total += usage.bytes;
                }
            }
            Ok(total)
        })
        .await;
        match walked {
            Ok(Ok(total)) => {
                bytes.set(total);
            }
            Ok(Err(error)) => tracing::debug!(%error, "cannot measure the writable layers"),
            Err(error) => tracing::debug!(%error, "the writable layers' walk stopped"),
        }
    }
}

struct StoreCollector {
    stores: Stores,
    containers_bytes: Gauge<u64, std::sync::atomic::AtomicU64>,
}

impl Debug for StoreCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreCollector")
    }
}

impl Collector for StoreCollector {
    /// A store whose records cannot be read is left out of the scrape (its health
    /// says why), rather than failing the whole scrape.
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let layers = self.stores.layers.records().ok();
        let images = self.stores.images.list().ok();
        let containers = self.stores.rootfs.container_ids().ok();
        if let Some(layers) = &layers {
            encode_gauge(
                &mut encoder,
                "storage_layers",
                "Layers stored",
                layers.len() as f64,
            )?;
        }
        if let Some(images) = &images {
            encode_gauge(
                &mut encoder,
                "storage_images",
                "Images recorded",
                images.len() as f64,
            )?;
        }
        if let Some(containers) = &containers {
            encode_gauge(
                &mut encoder,
                "storage_containers",
                "Containers' root filesystems prepared",
                containers.len() as f64,
            )?;
        }
        let mut bytes = Vec::new();
        if let Some(layers) = &layers {
            // Chains sharing a diff share its directory: counted once.
            let mut seen = HashSet::new();
            let unpacked: u64 = layers
                .iter()
                .filter(|layer| seen.insert(layer.diff_id.as_str()))
                .map(|layer| layer.unpacked_bytes)
                .sum();
            bytes.push(("layers", unpacked));
        }
        bytes.push(("containers", self.containers_bytes.get()));
        let used = Family::<StoreLabels, Gauge<u64, std::sync::atomic::AtomicU64>>::default();
        for (store, value) in bytes {
            used.get_or_create(&StoreLabels { store }).set(value);
        }
        used.encode(encoder.encode_descriptor(
            "storage_used_bytes",
            "Bytes each store holds: layers unpacked, containers' writable layers (walked every 30 s)",
            None,
            used.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    /// Every store's write errors exist at 0 from the start; a failed write counts, a
    /// refused request does not.
    #[tokio::test]
    async fn write_errors_exist_at_zero_and_count_failures_only() {
        let scene = crate::storage::tests::scene();
        let mut registry = Registry::with_prefix("trellis");
        let metrics = StorageMetrics::register(&mut registry, scene.storage.stores());
        let before = text(&registry);
        for store in ["layers", "images", "containers"] {
            let series = format!("trellis_storage_write_errors_total{{store=\"{store}\"}} 0");
            assert!(before.contains(&series), "{series} missing from\n{before}");
        }
        for series in [
            "trellis_storage_layers 0",
            "trellis_storage_images 0",
            "trellis_storage_used_bytes{store=\"layers\"} 0",
            "trellis_storage_unpacked_bytes_total 0",
        ] {
            assert!(before.contains(series), "{series} missing from\n{before}");
        }
        let full = std::io::Error::from_raw_os_error(28);
        metrics.failed(StoreKind::Images, &StorageError::io("cannot write", full));
        metrics.failed(
            StoreKind::Images,
            &StorageError::InvalidArgument("no image".into()),
        );
        assert!(text(&registry).contains("trellis_storage_write_errors_total{store=\"images\"} 1"));
    }
}
