//! trellis-gateway: the kubelet's CRI socket. Stateless: it times and traces each
//! call and forwards its bytes unchanged to the runtime or image service (which
//! check them), retrying reads across a backend restart; it fans in Status from the
//! runtime and network services and serves container events from the bus.
#![deny(unsafe_code)]

mod backend;
mod events;
mod image_service;
mod passthrough;
mod runtime_service;
mod status;

use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use trellis_common::ServiceKind;
use trellis_common::grpc::MAX_MESSAGE_BYTES;

use crate::backend::Backends;
use crate::passthrough::Passthrough;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Gateway, async |context| {
        let backends = Arc::new(Backends::new(
            &context.config,
            Duration::from_millis(context.config.gateway.backend_retry_ms),
        ));
        let gateway = runtime_service::Gateway {
            backends: backends.clone(),
            bus: context.bus.client().cloned(),
            node: context.node.clone(),
            stopping: context.stopping.clone(),
        };
        let runtime = RuntimeServiceServer::new(gateway)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let runtime = Passthrough::new(
            runtime,
            backends.clone(),
            runtime_service::FORWARDED,
            |backends| &backends.runtime,
        );
        let image = Passthrough::new(
            ImageServiceServer::new(image_service::Gateway),
            backends,
            image_service::FORWARDED,
            |backends| &backends.image,
        );
        Ok(tonic::service::Routes::new(runtime).add_service(image))
    })?;
    Ok(())
}
