//! trellis-runtime: pod sandboxes and containers, serving the CRI RuntimeService on
//! its internal socket for the gateway.
#![deny(unsafe_code)]
// Only `inherit_fd` may use unsafe (a pre_exec hook); it says why.

mod container;
mod container_update;
mod cri;
mod error;
mod inherit_fd;
mod namespaces;
mod oci;
mod records;
mod runtime;
mod sandbox;
mod spec;
mod stats;
mod streaming;
mod validate;

use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use trellis_common::ServiceKind;
use trellis_common::grpc::MAX_MESSAGE_BYTES;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Runtime, async |context| {
        let store = context
            .store
            .clone()
            .ok_or("the runtime service needs its record store")?;
        let runtime = std::sync::Arc::new(runtime::Runtime::new(
            context.config.clone(),
            store.as_ref(),
            context.bus.clone(),
        )?);
        runtime.recover().await?;
        let service = cri::RuntimeService::new(&context.config.runtime, runtime);
        Ok(tonic::service::Routes::new(
            RuntimeServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    })?;
    Ok(())
}
