//! trellis-network: pod network namespaces and CNI plugins.
#![deny(unsafe_code)]

mod cni_config;
mod service;

use trellis_common::ServiceKind;
use trellis_proto::network::v1::network_server::NetworkServer;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Network, async |context| {
        let service = service::NetworkService::new(&context.config.network);
        Ok(tonic::service::Routes::new(NetworkServer::new(service)))
    })?;
    Ok(())
}
