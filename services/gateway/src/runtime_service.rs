//! The CRI RuntimeService on the kubelet's socket: calls go to the runtime service
//! as bytes (see `passthrough`), except Status, which also asks the network service
//! (see `status`), and GetContainerEvents, which the gateway serves from the bus.

use std::sync::Arc;

use k8s_cri::v1::*;
use tonic::{Request, Response, Status};

use crate::backend::{Backends, forwarding_impl};
use crate::events::EventStream;

pub struct Gateway {
    pub backends: Arc<Backends>,
    pub bus: Option<async_nats::Client>,
    pub node: String,
    /// Turns true when the gateway begins to stop; event streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

forwarding_impl! {
    impl runtime_service_server::RuntimeService, for Gateway, service "runtime.v1.RuntimeService";
    forward {
        version(VersionRequest) -> VersionResponse = "Version", Idempotent;
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse = "PodSandboxStatus", Idempotent;
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse = "ListPodSandbox", Idempotent;
        container_status(ContainerStatusRequest) -> ContainerStatusResponse = "ContainerStatus", Idempotent;
        list_containers(ListContainersRequest) -> ListContainersResponse = "ListContainers", Idempotent;
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse = "ContainerStats", Idempotent;
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse = "ListContainerStats", Idempotent;
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse = "PodSandboxStats", Idempotent;
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse = "ListPodSandboxStats", Idempotent;
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse = "ListMetricDescriptors", Idempotent;
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse = "ListPodSandboxMetrics", Idempotent;
        runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse = "RuntimeConfig", Idempotent;
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse = "RunPodSandbox", Repeatable;
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse = "StopPodSandbox", Once;
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse = "RemovePodSandbox", Once;
        create_container(CreateContainerRequest) -> CreateContainerResponse = "CreateContainer", Repeatable;
        start_container(StartContainerRequest) -> StartContainerResponse = "StartContainer", Once;
        stop_container(StopContainerRequest) -> StopContainerResponse = "StopContainer", Once;
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse = "RemoveContainer", Once;
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse = "UpdateContainerResources", Once;
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse = "ReopenContainerLog", Once;
        exec_sync(ExecSyncRequest) -> ExecSyncResponse = "ExecSync", Once;
        exec(ExecRequest) -> ExecResponse = "Exec", Once;
        attach(AttachRequest) -> AttachResponse = "Attach", Once;
        port_forward(PortForwardRequest) -> PortForwardResponse = "PortForward", Once;
        update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse = "UpdateRuntimeConfig", Once;
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse = "CheckpointContainer", Once;
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(&self, _request: Request<GetEventsRequest>) -> Result<Response<EventStream>, Status> {
        let events = crate::events::subscribe(self.backends.clone(), self.bus.clone(), &self.node, self.stopping.clone())
            .await
            .inspect_err(|status| crate::backend::log_failed("GetContainerEvents", status))?;
        Ok(Response::new(events))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        crate::status::fan_in(&self.backends, request).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use trellis_common::metrics::grpc::{CRI_IMAGE, CRI_RUNTIME};

    /// The call metrics pre-create the series of every CRI method: the gateway's
    /// methods (forwarded, and written out here) are the whole CRI, since the
    /// compiler holds the gateway to the CRI's traits.
    #[test]
    fn the_metrics_know_every_cri_method() {
        let runtime: BTreeSet<&str> = super::FORWARDED
            .iter()
            .map(|forwarded| forwarded.name)
            .chain(["Status", "GetContainerEvents"])
            .collect();
        assert_eq!(runtime, CRI_RUNTIME.methods.iter().copied().collect());
        let image: BTreeSet<&str> = crate::image_service::FORWARDED
            .iter()
            .map(|forwarded| forwarded.name)
            .collect();
        assert_eq!(image, CRI_IMAGE.methods.iter().copied().collect());
    }
}
