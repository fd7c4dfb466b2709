//! trellis-runtime: pod sandboxes and containers, serving the CRI RuntimeService on
//! its internal socket for the gateway.
#![deny(unsafe_code)]

mod cri;

use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use trellis_common::ServiceKind;
use trellis_common::grpc::MAX_MESSAGE_BYTES;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Runtime, async |context| {
        let service = cri::RuntimeService::new(&context.config.runtime);
        Ok(tonic::service::Routes::new(
            RuntimeServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    })?;
    Ok(())
}
