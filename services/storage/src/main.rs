//! trellis-storage: the one owner of the layer store, image records and container
//! root filesystems.
#![deny(unsafe_code)]

mod usage;

use trellis_common::ServiceKind;
use trellis_proto::storage::v1::storage_server::StorageServer;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Storage, async |context| {
        let store_path = context.config.state_dir(ServiceKind::Storage).join("layers");
        std::fs::create_dir_all(&store_path)
            .map_err(|source| usage::StorageError::Io { what: format!("cannot create the layer store {}", store_path.display()), source })?;
        Ok(tonic::service::Routes::new(StorageServer::new(usage::StorageService::new(store_path))))
    })?;
    Ok(())
}
