//! The CRI RuntimeService as the runtime service answers it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use trellis_common::config::RuntimeConfig;
use trellis_common::grpc::find_executable;
use trellis_common::grpc_service_impl;
use trellis_common::service::VERSION;

use crate::runtime::Runtime;
use crate::streaming::StreamingServer;

/// The CRI names this runtime to the kubelet.
pub const RUNTIME_NAME: &str = "trellis";
const CRI_API_VERSION: &str = "v1";
/// The `version` field of VersionResponse is the kubelet-facing API version.
const KUBELET_API_VERSION: &str = "0.1.0";

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
    pub fn new(config: &RuntimeConfig, runtime: Arc<Runtime>) -> Self {
        Self {
            oci_runtime: config.oci_runtime.binary.clone(),
            conmon: config.conmon.clone(),
            streaming: Some(StreamingServer::new(runtime.clone())),
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

    /// Ready when the programs every container needs are installed.
    fn runtime_condition(&self) -> RuntimeCondition {
        let missing: Vec<String> = [("OCI runtime", &self.oci_runtime), ("conmon", &self.conmon)]
            .into_iter()
            .filter(|(_, program)| find_executable(program).is_none())
            .map(|(what, program)| format!("{what} `{program}` not found"))
            .collect();
        RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: missing.is_empty(),
            reason: if missing.is_empty() {
                String::new()
            } else {
                "RuntimeBinaryMissing".into()
            },
            message: missing.join("; "),
        }
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
        Err(trellis_common::grpc::unimplemented_rpc("runtime", "get_container_events"))
    }

    async fn run_pod_sandbox(&self, request: Request<RunPodSandboxRequest>) -> Result<Response<RunPodSandboxResponse>, Status> {
        let request = request.into_inner();
        let config = request.config.ok_or_else(|| Status::invalid_argument("RunPodSandbox needs a config"))?;
        let pod_sandbox_id = self.runtime()?.run_pod_sandbox(config, request.runtime_handler).await?;
        Ok(Response::new(RunPodSandboxResponse { pod_sandbox_id }))
    }

    async fn stop_pod_sandbox(&self, request: Request<StopPodSandboxRequest>) -> Result<Response<StopPodSandboxResponse>, Status> {
        self.runtime()?.stop_pod_sandbox(&request.get_ref().pod_sandbox_id).await?;
        Ok(Response::new(StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(&self, request: Request<RemovePodSandboxRequest>) -> Result<Response<RemovePodSandboxResponse>, Status> {
        self.runtime()?.remove_pod_sandbox(&request.get_ref().pod_sandbox_id).await?;
        Ok(Response::new(RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(&self, request: Request<PodSandboxStatusRequest>) -> Result<Response<PodSandboxStatusResponse>, Status> {
        let request = request.get_ref();
        Ok(Response::new(self.runtime()?.pod_sandbox_status(&request.pod_sandbox_id, request.verbose)?))
    }

    async fn list_pod_sandbox(&self, request: Request<ListPodSandboxRequest>) -> Result<Response<ListPodSandboxResponse>, Status> {
        let items = self.runtime()?.list_pod_sandbox(request.into_inner().filter)?;
        Ok(Response::new(ListPodSandboxResponse { items }))
    }

    async fn create_container(&self, request: Request<CreateContainerRequest>) -> Result<Response<CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let config = request.config.ok_or_else(|| Status::invalid_argument("CreateContainer needs a config"))?;
        // `request.sandbox_config` is ignored: the pod's config is the one it was run
        // with, from its record (as containerd and CRI-O do), or any caller could ask
        // for the host's namespaces or privileges in someone else's pod.
        let container_id = self.runtime()?.create_container(&request.pod_sandbox_id, config).await?;
        Ok(Response::new(CreateContainerResponse { container_id }))
    }

    async fn start_container(&self, request: Request<StartContainerRequest>) -> Result<Response<StartContainerResponse>, Status> {
        self.runtime()?.start_container(&request.get_ref().container_id).await?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn update_container_resources(&self, request: Request<UpdateContainerResourcesRequest>) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        self.runtime()?.update_container_resources(&request.container_id, request.linux).await?;
        Ok(Response::new(UpdateContainerResourcesResponse {}))
    }

    async fn stop_container(&self, request: Request<StopContainerRequest>) -> Result<Response<StopContainerResponse>, Status> {
        let request = request.get_ref();
        self.runtime()?.stop_container(&request.container_id, request.timeout).await?;
        Ok(Response::new(StopContainerResponse {}))
    }

    async fn remove_container(&self, request: Request<RemoveContainerRequest>) -> Result<Response<RemoveContainerResponse>, Status> {
        self.runtime()?.remove_container(&request.get_ref().container_id).await?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn container_status(&self, request: Request<ContainerStatusRequest>) -> Result<Response<ContainerStatusResponse>, Status> {
        let request = request.get_ref();
        Ok(Response::new(self.runtime()?.container_status(&request.container_id, request.verbose)?))
    }

    async fn list_containers(&self, request: Request<ListContainersRequest>) -> Result<Response<ListContainersResponse>, Status> {
        let containers = self.runtime()?.list_containers(request.into_inner().filter)?;
        Ok(Response::new(ListContainersResponse { containers }))
    }

    async fn reopen_container_log(&self, request: Request<ReopenContainerLogRequest>) -> Result<Response<ReopenContainerLogResponse>, Status> {
        self.runtime()?.reopen_container_log(&request.get_ref().container_id).await?;
        Ok(Response::new(ReopenContainerLogResponse {}))
    }

    async fn container_stats(&self, request: Request<ContainerStatsRequest>) -> Result<Response<ContainerStatsResponse>, Status> {
        let stats = self.runtime()?.container_stats(&request.get_ref().container_id).await?;
        Ok(Response::new(ContainerStatsResponse { stats: Some(stats) }))
    }

    async fn list_container_stats(&self, request: Request<ListContainerStatsRequest>) -> Result<Response<ListContainerStatsResponse>, Status> {
        let stats = self.runtime()?.list_container_stats(request.into_inner().filter).await?;
        Ok(Response::new(ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(&self, request: Request<PodSandboxStatsRequest>) -> Result<Response<PodSandboxStatsResponse>, Status> {
        let stats = self.runtime()?.pod_sandbox_stats(&request.get_ref().pod_sandbox_id).await?;
        Ok(Response::new(PodSandboxStatsResponse { stats: Some(stats) }))
    }

    async fn list_pod_sandbox_stats(&self, request: Request<ListPodSandboxStatsRequest>) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        let stats = self.runtime()?.list_pod_sandbox_stats(request.into_inner().filter).await?;
        Ok(Response::new(ListPodSandboxStatsResponse { stats }))
    }

    async fn exec_sync(&self, request: Request<ExecSyncRequest>) -> Result<Response<ExecSyncResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(self.runtime()?.exec_sync(&request.container_id, request.cmd, request.timeout).await?))
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let url = self.streaming()?.exec(request.into_inner()).await?;
        Ok(Response::new(ExecResponse { url }))
    }

    async fn attach(&self, request: Request<AttachRequest>) -> Result<Response<AttachResponse>, Status> {
        let url = self.streaming()?.attach(request.into_inner()).await?;
        Ok(Response::new(AttachResponse { url }))
    }

    async fn port_forward(&self, request: Request<PortForwardRequest>) -> Result<Response<PortForwardResponse>, Status> {
        let url = self.streaming()?.port_forward(request.into_inner()).await?;
        Ok(Response::new(PortForwardResponse { url }))
    }

    async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: VERSION.into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    /// The kubelet (KubeletCgroupDriverFromCRI) takes its cgroup driver from here:
    /// containers' cgroups are made by the OCI runtime through cgroupfs.
    async fn runtime_config(&self, _request: Request<RuntimeConfigRequest>) -> Result<Response<RuntimeConfigResponse>, Status> {
        Ok(Response::new(RuntimeConfigResponse { linux: Some(LinuxRuntimeConfiguration { cgroup_driver: CgroupDriver::Cgroupfs as i32 }) }))
    }

    async fn update_runtime_config(&self, request: Request<UpdateRuntimeConfigRequest>) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        let cidr = request.into_inner().runtime_config.and_then(|c| c.network_config).map(|n| n.pod_cidr).unwrap_or_default();
        if !cidr.is_empty() && !is_cidr(&cidr) {
            return Err(Status::invalid_argument(format!("pod CIDR `{}` is not an address range like 10.88.0.0/16", trellis_common::text::excerpt(&cidr))));
        }
        tracing::info!(pod_cidr = %cidr, "the kubelet set the node's pod CIDR");
        if let Ok(mut current) = self.pod_cidr.lock() {
            *current = cidr;
        }
        Ok(Response::new(UpdateRuntimeConfigResponse {}))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let condition = self.runtime_condition();
        let mut info = HashMap::new();
        if request.get_ref().verbose {
            let pod_cidr = self.pod_cidr.lock().map(|c| c.clone()).unwrap_or_default();
            let config = serde_json::json!({ "ociRuntime": self.oci_runtime, "conmon": self.conmon, "podCIDR": pod_cidr, "cgroupDriver": "cgroupfs" });
            info.insert("config".to_string(), config.to_string());
        }
        // NetworkReady is the network service's to say; the gateway adds it.
        Ok(Response::new(StatusResponse {
            status: Some(RuntimeStatus { conditions: vec![condition] }),
            info,
            ..Default::default()
        }))
    }
}

fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
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
