//! trellis-storage: the one owner of the layer store, image records and container
//! root filesystems.
#![deny(unsafe_code)]

mod error;
mod extract;
mod holds;
mod images;
mod layers;
mod links;
mod metrics;
mod rootfs;
mod service;
mod storage;
mod usage;

use trellis_common::ServiceKind;
use trellis_common::grpc::MAX_MESSAGE_BYTES;
use trellis_proto::storage::v1::storage_server::StorageServer;

pub use trellis_common::clock::now_nanos;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Storage, async |context| {
        let state = context.config.state_dir(ServiceKind::Storage);
        let store = context
            .store
            .clone()
            .ok_or("the storage service needs its record store")?;
        let storage_config = context.config.storage.clone();
        let stopping = context.stopping.clone();
        // Probed in the service's own directory, on the layers' file system.
        let space = trellis_common::space::SpaceWatch::new(&state);
        context.add_readiness_probe(space.readiness_probe());
        let storage = tokio::task::spawn_blocking(move || -> Result<_, error::StorageError> {
            let mut layers = layers::LayerStore::open(
                state.join("layers"),
                store.as_ref(),
                layers::Limits::from(&storage_config),
            )?;
            layers.watch_space(space);
            let images = images::ImageStore::open(store.as_ref())?;
            let rootfs = rootfs::RootfsStore::open(state.join("containers"), store.as_ref())?;
            Ok(storage::Storage::new(layers, images, rootfs))
        })
        .await??;
        let metrics = metrics::StorageMetrics::register(&mut context.registry, storage.stores());
        Ok(tonic::service::Routes::new(
            StorageServer::new(service::StorageService::new(storage, metrics, stopping))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    })?;
    Ok(())
}
