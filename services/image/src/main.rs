//! trellis-image: registry access, pull policy, auth and mirrors, serving the CRI
//! ImageService on its internal socket for the gateway.
#![deny(unsafe_code)]

mod cri;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use trellis_common::ServiceKind;
use trellis_common::grpc::MAX_MESSAGE_BYTES;
use trellis_common::transport::unix_channel;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Image, async |context| {
        let storage = unix_channel(&context.config.endpoint(ServiceKind::Storage).socket);
        Ok(tonic::service::Routes::new(
            ImageServiceServer::new(cri::ImageService::new(storage))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    })?;
    Ok(())
}
