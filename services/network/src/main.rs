//! trellis-network: pod network namespaces and CNI plugins.
#![deny(unsafe_code)]

mod cni;
mod cni_config;
mod error;
mod metrics;
mod netns;
mod pods;
mod records;
mod request;
mod service;

use std::sync::Arc;

use trellis_common::ServiceKind;
use trellis_proto::network::v1::network_server::NetworkServer;

use crate::metrics::NetworkMetrics;
use crate::pods::Pods;

fn main() -> anyhow::Result<()> {
    trellis_common::service::run(ServiceKind::Network, async |context| {
        let store = context
            .store
            .clone()
            .ok_or("the network service needs its record store")?;
        // A network configured later has its plugins' series from their first run.
        let network = &context.config.network;
        let plugins = cni_config::load_network(&network.cni_config_dir, &network.cni_plugin_dirs)
            .map(|network| network.plugins)
            .unwrap_or_default();
        let metrics = NetworkMetrics::register(&mut context.registry, &plugins);
        let pods = Arc::new(Pods::new(
            &context.config,
            store.as_ref(),
            context.bus.clone(),
            metrics,
        )?);
        // Before serving: a half-done pod must be repaired before anyone asks about it.
        pods.recover().await?;
        metrics::register_addresses(&mut context.registry, pods.clone());
        Ok(tonic::service::Routes::new(NetworkServer::new(
            service::NetworkService::new(pods),
        )))
    })?;
    Ok(())
}
