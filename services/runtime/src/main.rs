//! trellis-runtime: pod sandboxes and containers, serving the CRI RuntimeService on
//! its internal socket for the gateway. The work is in the library; this wires the
//! real parts together.
#![deny(unsafe_code)]

use std::sync::Arc;

use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use trellis_common::ServiceKind;
use trellis_common::grpc::{MAX_MESSAGE_BYTES, find_executable};
use trellis_common::upstream::WithDeadlines;
use trellis_runtime::lifecycle::{Parts, Runtime};
use trellis_runtime::metrics::RuntimeMetrics;
use trellis_runtime::namespaces::HostNamespaces;
use trellis_runtime::oci::{ConmonRunc, Timed};
use trellis_runtime::server::RuntimeService;
use trellis_runtime::server::streaming::StreamingServer;
use trellis_runtime::store::RecordStore;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Runtime, async |context| {
        let store = context
            .store
            .clone()
            .ok_or("the runtime service needs its record store")?;
        let config = &context.config;
        let dir = config.node.run_dir.join("runtime");
        let conmon = find_executable(&config.runtime.conmon)
            .unwrap_or_else(|| config.runtime.conmon.clone().into());
        let oci = Arc::new(ConmonRunc::new(conmon, dir.clone()));
        let metrics = RuntimeMetrics::default();
        let parts = Parts {
            store: RecordStore::open(store.as_ref())?,
            oci: Arc::new(Timed::new(oci.clone(), metrics.clone())),
            backends: trellis_runtime::backends::grpc::connect(config),
            namespaces: Arc::new(HostNamespaces),
            events: Arc::new(context.bus.clone()),
            metrics: metrics.clone(),
        };
        let runtime = Arc::new(Runtime::new(config.runtime.clone(), dir, parts)?);
        metrics.register(&mut context.registry, runtime.clone());
        runtime.recover().await?;
        runtime.retry_rollbacks_in_background();
        let streaming = StreamingServer::new(
            config.runtime.streaming_address.clone(),
            runtime.clone(),
            oci,
        );
        let service = RuntimeService::new(&config.runtime, runtime, streaming);
        // Calls to storage, image and network give up before the CRI caller's deadline
        // and name the service that kept them waiting.
        Ok(tonic::service::Routes::new(WithDeadlines(
            RuntimeServiceServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )))
    })?;
    Ok(())
}
