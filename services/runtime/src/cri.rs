//! The CRI RuntimeService as the runtime service answers it.

use std::collections::HashMap;
use std::pin::Pin;

use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use trellis_common::config::RuntimeConfig;
use trellis_common::grpc::find_executable;
use trellis_common::grpc_service_impl;
use trellis_common::service::VERSION;

/// The CRI names this runtime to the kubelet.
pub const RUNTIME_NAME: &str = "trellis";
const CRI_API_VERSION: &str = "v1";
/// The `version` field of VersionResponse is the kubelet-facing API version.
const KUBELET_API_VERSION: &str = "0.1.0";

pub struct RuntimeService {
    oci_runtime: String,
    conmon: String,
}

impl RuntimeService {
    pub fn new(config: &RuntimeConfig) -> Self {
        Self { oci_runtime: config.oci_runtime.clone(), conmon: config.conmon.clone() }
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
            reason: if missing.is_empty() { String::new() } else { "RuntimeBinaryMissing".into() },
            message: missing.join("; "),
        }
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

grpc_service_impl! {
    impl runtime_service_server::RuntimeService, for RuntimeService, service "runtime";
    unimplemented {
        run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse,
        stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse,
        remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse,
        pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse,
        list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse,
        create_container(CreateContainerRequest) -> CreateContainerResponse,
        start_container(StartContainerRequest) -> StartContainerResponse,
        stop_container(StopContainerRequest) -> StopContainerResponse,
        remove_container(RemoveContainerRequest) -> RemoveContainerResponse,
        list_containers(ListContainersRequest) -> ListContainersResponse,
        container_status(ContainerStatusRequest) -> ContainerStatusResponse,
        update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse,
        reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse,
        exec_sync(ExecSyncRequest) -> ExecSyncResponse,
        exec(ExecRequest) -> ExecResponse,
        attach(AttachRequest) -> AttachResponse,
        port_forward(PortForwardRequest) -> PortForwardResponse,
        container_stats(ContainerStatsRequest) -> ContainerStatsResponse,
        list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse,
        pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse,
        list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse,
        update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse,
        checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse,
        list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse,
        list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse,
        runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse,
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(&self, _request: Request<GetEventsRequest>) -> Result<Response<EventStream>, Status> {
        Err(trellis_common::grpc::unimplemented_rpc("runtime", "get_container_events"))
    }

    async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: VERSION.into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let condition = self.runtime_condition();
        let mut info = HashMap::new();
        if request.get_ref().verbose {
            let config = serde_json::json!({ "ociRuntime": self.oci_runtime, "conmon": self.conmon });
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::runtime_service_server::RuntimeService as _;

    fn service(oci_runtime: &str, conmon: &str) -> RuntimeService {
        RuntimeService { oci_runtime: oci_runtime.into(), conmon: conmon.into() }
    }

    #[tokio::test]
    async fn version_names_trellis() {
        let version = service("sh", "sh").version(Request::new(VersionRequest::default())).await.expect("version").into_inner();
        assert_eq!(version.runtime_name, "trellis");
        assert_eq!(version.runtime_api_version, "v1");
    }

    #[tokio::test]
    async fn runtime_not_ready_names_the_missing_program() {
        let status = service("/nonexistent/runc", "sh").status(Request::new(StatusRequest::default())).await.expect("status").into_inner();
        let condition = &status.status.expect("status").conditions[0];
        assert!(!condition.status);
        assert_eq!(condition.reason, "RuntimeBinaryMissing");
        assert!(condition.message.contains("/nonexistent/runc"), "{}", condition.message);
    }

    #[tokio::test]
    async fn rpcs_not_built_yet_answer_unimplemented_by_name() {
        let error = service("sh", "sh").run_pod_sandbox(Request::new(RunPodSandboxRequest::default())).await.expect_err("unimplemented");
        assert_eq!(error.code(), tonic::Code::Unimplemented);
        assert!(error.message().contains("RunPodSandbox"));
    }
}
