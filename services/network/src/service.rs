//! The `trellis.network.v1.Network` gRPC service: checks requests, hands them to
//! `Pods`, and answers in the proto's terms.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use trellis_common::telemetry::annotate;
use trellis_proto::network::v1::network_server::Network;
use trellis_proto::network::v1::{
    PodIp, PodNetwork, PodNetworkStatusRequest, SetUpPodRequest, StatusRequest, StatusResponse,
    TearDownPodRequest, TearDownPodResponse, pod_network,
};

use crate::cni::POD_INTERFACE;
use crate::cni::result::PodAddress;
use crate::pods::{PodIdentity, Pods};
use crate::records::{PodRecord, PodState};
use crate::request;

pub struct NetworkService {
    pods: Arc<Pods>,
}

impl NetworkService {
    pub fn new(pods: Arc<Pods>) -> Self {
        Self { pods }
    }
}

#[tonic::async_trait]
impl Network for NetworkService {
    /// Read afresh on every call (a directory listing and a small file): a config
    /// that appears or breaks shows at the kubelet's next Status poll.
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let response = match self.pods.network_status() {
            Ok(network) => StatusResponse {
                ready: true,
                config_file: network.file.display().to_string(),
                network_name: network.name,
                ..Default::default()
            },
            Err(error) => StatusResponse {
                ready: false,
                reason: error.reason().into(),
                message: error.to_string(),
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }

    async fn set_up_pod(
        &self,
        request: Request<SetUpPodRequest>,
    ) -> Result<Response<PodNetwork>, Status> {
        let request = request.into_inner();
        let runtime_config = request::runtime_config(&request)?;
        // After the checks: only names fit for CNI_ARGS go into the trace.
        annotate(&[
            ("k8s.pod.name", &request.pod_name),
            ("k8s.namespace.name", &request.pod_namespace),
            ("k8s.pod.uid", &request.pod_uid),
            ("k8s.pod.sandbox_id", &request.sandbox_id),
        ]);
        let pod = PodIdentity {
            sandbox_id: request.sandbox_id,
            name: request.pod_name,
            namespace: request.pod_namespace,
            uid: request.pod_uid,
        };
        // The work goes on even if the caller gives up: stopping half-way through the
        // plugin chain would leave more to repair than finishing.
        let pods = self.pods.clone();
        // The task runs inside this call's span, so that its steps are in its trace.
        let set_up = async move { pods.set_up(pod, request.host_network, runtime_config).await };
        let record = tokio::spawn(set_up.in_current_span())
            .await
            .map_err(|e| Status::internal(format!("set-up task failed: {e}")))??;
        let addresses = crate::pods::addresses(&record)?;
        Ok(Response::new(pod_network(&record, &addresses)))
    }

    async fn tear_down_pod(
        &self,
        request: Request<TearDownPodRequest>,
    ) -> Result<Response<TearDownPodResponse>, Status> {
        let sandbox_id = request.into_inner().sandbox_id;
        request::validate_sandbox_id(&sandbox_id)?;
        annotate(&[("k8s.pod.sandbox_id", &sandbox_id)]);
        let pods = self.pods.clone();
        tokio::spawn(async move { pods.tear_down(&sandbox_id).await }.in_current_span())
            .await
            .map_err(|e| Status::internal(format!("tear-down task failed: {e}")))??;
        Ok(Response::new(TearDownPodResponse {}))
    }

    async fn pod_network_status(
        &self,
        request: Request<PodNetworkStatusRequest>,
    ) -> Result<Response<PodNetwork>, Status> {
        let request = request.into_inner();
        request::validate_sandbox_id(&request.sandbox_id)?;
        annotate(&[("k8s.pod.sandbox_id", &request.sandbox_id)]);
        let (record, addresses) = self.pods.status(&request.sandbox_id, request.check).await?;
        Ok(Response::new(pod_network(&record, &addresses)))
    }
}

fn pod_network(record: &PodRecord, addresses: &[PodAddress]) -> PodNetwork {
    let state = match record.state {
        PodState::Adding => pod_network::State::Adding,
        PodState::Ready => pod_network::State::Ready,
        PodState::Removing => pod_network::State::Removing,
    };
    PodNetwork {
        sandbox_id: record.sandbox_id.clone(),
        state: state.into(),
        netns_path: record
            .attachment
            .as_ref()
            .map(|a| a.netns.display().to_string())
            .unwrap_or_default(),
        ips: addresses
            .iter()
            .map(|a| PodIp {
                ip: a.ip.to_string(),
                prefix_length: a.prefix_length.into(),
                gateway: a.gateway.map(|g| g.to_string()).unwrap_or_default(),
            })
            .collect(),
        host_network: record.host_network,
        network_name: record.network_name.clone(),
        config_file: record.config_file.display().to_string(),
        interface: if record.host_network {
            String::new()
        } else {
            POD_INTERFACE.to_string()
        },
    }
}
