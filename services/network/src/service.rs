use std::path::PathBuf;

use tonic::{Request, Response, Status};
use trellis_common::config::NetworkConfig;
use trellis_proto::network::v1::network_server::Network;
use trellis_proto::network::v1::{StatusRequest, StatusResponse};

use crate::cni_config::{self, CniError};

pub struct NetworkService {
    config_dir: PathBuf,
    plugin_dirs: Vec<PathBuf>,
}

impl NetworkService {
    pub fn new(config: &NetworkConfig) -> Self {
        Self { config_dir: config.cni_config_dir.clone(), plugin_dirs: config.cni_plugin_dirs.clone() }
    }
}

#[tonic::async_trait]
impl Network for NetworkService {
    /// Read afresh on every call (a directory listing and a small file): a config
    /// that appears or breaks shows at the kubelet's next Status poll.
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let response = match cni_config::load_network(&self.config_dir, &self.plugin_dirs) {
            Ok(network) => StatusResponse {
                ready: true,
                config_file: network.file.display().to_string(),
                network_name: network.name,
                ..Default::default()
            },
            Err(error) => {
                let reason = match error {
                    CniError::NoConfig { .. } | CniError::ReadDir { .. } => "NoCNIConfiguration",
                    CniError::PluginMissing { .. } => "CNIPluginMissing",
                    CniError::Invalid { .. } => "InvalidCNIConfiguration",
                };
                StatusResponse { ready: false, reason: reason.into(), message: error.to_string(), ..Default::default() }
            }
        };
        Ok(Response::new(response))
    }
}
