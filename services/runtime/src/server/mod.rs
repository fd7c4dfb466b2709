//! The server layer: the CRI RuntimeService as the runtime service answers it on its
//! internal socket. Handlers are thin (take the request apart, call the lifecycle,
//! build the response), one file per group: pods, containers, exec (streaming URLs), stats
//! and status; `streaming/` is the HTTP server the URLs point at. The trait impl below only routes, because `#[async_trait]` must see
//! every method of the trait in one impl.

mod attributes;
mod containers;
mod exec;
mod pods;
mod stats;
mod status;
pub mod streaming;

use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use trellis_common::config::RuntimeConfig;
use trellis_common::grpc_service_impl;

use crate::lifecycle::Runtime;
use streaming::StreamingServer;

pub struct RuntimeService {
    oci_runtime: String,
    conmon: String,
    runtime: Option<Arc<Runtime>>,
    streaming: Option<StreamingServer>,
    /// The node's pod CIDR as the kubelet last gave it (UpdateRuntimeConfig); the CNI
    /// configuration allocates addresses, so it is kept for Status to report.
    pod_cidr: std::sync::Mutex<String>,
}

impl RuntimeService {
    pub fn new(config: &RuntimeConfig, runtime: Arc<Runtime>, streaming: StreamingServer) -> Self {
        Self {
            oci_runtime: config.oci_runtime.binary.clone(),
            conmon: config.conmon.clone(),
            streaming: Some(streaming),
            runtime: Some(runtime),
            pod_cidr: Default::default(),
        }
    }

    fn runtime(&self) -> Result<&Runtime, Status> {
        self.runtime
            .as_deref()
            .ok_or_else(|| Status::unavailable("the runtime service is starting"))
    }

    fn streaming(&self) -> Result<&StreamingServer, Status> {
        self.streaming
            .as_ref()
            .ok_or_else(|| Status::unavailable("the runtime service is starting"))
    }
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

grpc_service_impl! {
    impl runtime_service_server::RuntimeService, for RuntimeService, service "runtime";
    unimplemented {
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse,
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse,
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse,
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(&self, _request: Request<GetEventsRequest>) -> Result<Response<EventStream>, Status> {
        // The gateway serves the events, from the bus.
        Err(trellis_common::grpc::unimplemented_rpc("runtime", "get_container_events"))
    }

    async fn run_pod_sandbox(&self, request: Request<RunPodSandboxRequest>) -> Result<Response<RunPodSandboxResponse>, Status> {
        pods::run(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn stop_pod_sandbox(&self, request: Request<StopPodSandboxRequest>) -> Result<Response<StopPodSandboxResponse>, Status> {
        pods::stop(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn remove_pod_sandbox(&self, request: Request<RemovePodSandboxRequest>) -> Result<Response<RemovePodSandboxResponse>, Status> {
        pods::remove(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn pod_sandbox_status(&self, request: Request<PodSandboxStatusRequest>) -> Result<Response<PodSandboxStatusResponse>, Status> {
        pods::status(self.runtime()?, request.into_inner()).map(Response::new)
    }

    async fn list_pod_sandbox(&self, request: Request<ListPodSandboxRequest>) -> Result<Response<ListPodSandboxResponse>, Status> {
        pods::list(self.runtime()?, request.into_inner()).map(Response::new)
    }

    async fn create_container(&self, request: Request<CreateContainerRequest>) -> Result<Response<CreateContainerResponse>, Status> {
        containers::create(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn start_container(&self, request: Request<StartContainerRequest>) -> Result<Response<StartContainerResponse>, Status> {
        containers::start(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn update_container_resources(&self, request: Request<UpdateContainerResourcesRequest>) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        containers::update_resources(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn stop_container(&self, request: Request<StopContainerRequest>) -> Result<Response<StopContainerResponse>, Status> {
        containers::stop(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn remove_container(&self, request: Request<RemoveContainerRequest>) -> Result<Response<RemoveContainerResponse>, Status> {
        containers::remove(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn container_status(&self, request: Request<ContainerStatusRequest>) -> Result<Response<ContainerStatusResponse>, Status> {
        containers::status(self.runtime()?, request.into_inner()).map(Response::new)
    }

    async fn list_containers(&self, request: Request<ListContainersRequest>) -> Result<Response<ListContainersResponse>, Status> {
        containers::list(self.runtime()?, request.into_inner()).map(Response::new)
    }

    async fn reopen_container_log(&self, request: Request<ReopenContainerLogRequest>) -> Result<Response<ReopenContainerLogResponse>, Status> {
        containers::reopen_log(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn exec_sync(&self, request: Request<ExecSyncRequest>) -> Result<Response<ExecSyncResponse>, Status> {
        containers::exec_sync(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn container_stats(&self, request: Request<ContainerStatsRequest>) -> Result<Response<ContainerStatsResponse>, Status> {
        stats::container(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn list_container_stats(&self, request: Request<ListContainerStatsRequest>) -> Result<Response<ListContainerStatsResponse>, Status> {
        stats::list_containers(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn pod_sandbox_stats(&self, request: Request<PodSandboxStatsRequest>) -> Result<Response<PodSandboxStatsResponse>, Status> {
        stats::pod(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn list_pod_sandbox_stats(&self, request: Request<ListPodSandboxStatsRequest>) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        stats::list_pods(self.runtime()?, request.into_inner()).await.map(Response::new)
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        exec::exec(self.streaming()?, request.into_inner()).await.map(Response::new)
    }

    async fn attach(&self, request: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        exec::attach(self.streaming()?, request.into_inner()).await.map(Response::new)
    }

    async fn port_forward(&self, request: Request<PortForwardRequest>) -> Result<Response<PortForwardResponse>, Status> {
        exec::port_forward(self.streaming()?, request.into_inner()).await.map(Response::new)
    }

    async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(status::version()))
    }

    async fn runtime_config(&self, _request: Request<RuntimeConfigRequest>) -> Result<Response<RuntimeConfigResponse>, Status> {
        Ok(Response::new(status::runtime_config()))
    }

    async fn update_runtime_config(&self, request: Request<UpdateRuntimeConfigRequest>) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        status::update_runtime_config(self, request.into_inner()).map(Response::new)
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(status::status(self, request.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::runtime_service_server::RuntimeService as _;

    fn service(oci_runtime: &str, conmon: &str) -> RuntimeService {
        RuntimeService {
            oci_runtime: oci_runtime.into(),
            conmon: conmon.into(),
            runtime: None,
            streaming: None,
            pod_cidr: Default::default(),
        }
    }

    #[tokio::test]
    async fn version_names_trellis() {
        let version = service("sh", "sh")
            .version(Request::new(VersionRequest::default()))
            .await
            .expect("version")
            .into_inner();
        assert_eq!(version.runtime_name, "trellis");
        assert_eq!(version.runtime_api_version, "v1");
    }

    #[tokio::test]
    async fn runtime_not_ready_names_the_missing_program() {
        let status = service("/nonexistent/runc", "sh")
            .status(Request::new(StatusRequest::default()))
            .await
            .expect("status")
            .into_inner();
        let condition = &status.status.expect("status").conditions[0];
        assert!(!condition.status);
        assert_eq!(condition.reason, "RuntimeBinaryMissing");
        assert!(
            condition.message.contains("/nonexistent/runc"),
            "{}",
            condition.message
        );
    }

    #[tokio::test]
    async fn runtime_config_names_the_cgroup_driver_and_pod_cidrs_are_checked() {
        let service = service("sh", "sh");
        let config = service
            .runtime_config(Request::new(RuntimeConfigRequest {}))
            .await
            .expect("RuntimeConfig")
            .into_inner();
        assert_eq!(
            config.linux.expect("linux").cgroup_driver,
            CgroupDriver::Cgroupfs as i32
        );
        let update = |cidr: &str| UpdateRuntimeConfigRequest {
            runtime_config: Some(k8s_cri::v1::RuntimeConfig {
                network_config: Some(NetworkConfig {
                    pod_cidr: cidr.into(),
                }),
            }),
        };
        service
            .update_runtime_config(Request::new(update("10.244.1.0/24")))
            .await
            .expect("a CIDR");
        let error = service
            .update_runtime_config(Request::new(update("10.244.1.0/99")))
            .await
            .expect_err("no such prefix");
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        let status = service
            .status(Request::new(StatusRequest { verbose: true }))
            .await
            .expect("status")
            .into_inner();
        assert!(
            status.info["config"].contains("10.244.1.0/24"),
            "{:?}",
            status.info
        );
    }

    #[tokio::test]
    async fn rpcs_not_built_yet_answer_unimplemented_by_name() {
        let error = service("sh", "sh")
            .checkpoint_container(Request::new(CheckpointContainerRequest::default()))
            .await
            .expect_err("unimplemented");
        assert_eq!(error.code(), tonic::Code::Unimplemented);
        assert!(
            error.message().contains("CheckpointContainer"),
            "{}",
            error.message()
        );
    }

    #[tokio::test]
    async fn streaming_rpcs_wait_for_the_runtime() {
        let error = service("sh", "sh")
            .port_forward(Request::new(PortForwardRequest::default()))
            .await
            .expect_err("no runtime yet");
        assert_eq!(error.code(), tonic::Code::Unavailable);
    }
}
