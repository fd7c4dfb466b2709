//! trellis-image: registry access, pull policy, auth and mirrors, serving the CRI
//! ImageService on its internal socket for the gateway. Stateless: image records live
//! in the storage service, so several replicas can run.
#![deny(unsafe_code)]

mod cri;
mod error;
mod failure;
mod image_config;
mod index;
mod inflight;
mod metrics;
mod pull;
mod registry;
mod watch;

use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use trellis_common::ServiceKind;
use trellis_common::grpc::MAX_MESSAGE_BYTES;
use trellis_common::transport::unix_channel;
use trellis_common::upstream::WithDeadlines;

fn main() -> anyhow::Result<()> {
    // oci-client's TLS is rustls without a chosen crypto provider; ring it is.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        anyhow::bail!("a TLS crypto provider was already installed");
    }
    trellis_common::service::run(ServiceKind::Image, async |context| {
        let storage_socket = context.config.endpoint(ServiceKind::Storage).socket;
        let storage = unix_channel(&storage_socket);
        let index = Arc::new(index::ImageIndex::default());
        tokio::spawn(watch::follow(storage.clone(), index.clone()));
        let puller = Arc::new(pull::Puller::new(
            context.config.image.clone(),
            storage.clone(),
            storage_socket.clone(),
            index.clone(),
            &mut context.registry,
            &context.replica,
            context.predecessor_serving,
        )?);
        puller.prune_at_start();
        let service =
            cri::ImageService::new(storage, storage_socket, puller, context.bus.clone(), index);
        // Calls to storage give up before the CRI caller's deadline, naming it.
        Ok(tonic::service::Routes::new(WithDeadlines(
            ImageServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )))
    })?;
    Ok(())
}
