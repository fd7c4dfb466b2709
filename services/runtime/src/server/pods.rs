//! RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox.

use k8s_cri::v1::*;
use tonic::Status;

use super::attributes;
use crate::lifecycle::Runtime;

pub async fn run(
    runtime: &Runtime,
    request: RunPodSandboxRequest,
) -> Result<RunPodSandboxResponse, Status> {
    let config = request
        .config
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox needs a config"))?;
    attributes::pod_metadata(config.metadata.as_ref());
    let pod_sandbox_id = runtime
        .run_pod_sandbox(config, request.runtime_handler)
        .await?;
    attributes::pod(&pod_sandbox_id);
    Ok(RunPodSandboxResponse { pod_sandbox_id })
}

pub async fn stop(
    runtime: &Runtime,
    request: StopPodSandboxRequest,
) -> Result<StopPodSandboxResponse, Status> {
    attributes::recorded_pod(runtime, &request.pod_sandbox_id);
    runtime.stop_pod_sandbox(&request.pod_sandbox_id).await?;
    Ok(StopPodSandboxResponse {})
}

pub async fn remove(
    runtime: &Runtime,
    request: RemovePodSandboxRequest,
) -> Result<RemovePodSandboxResponse, Status> {
    attributes::recorded_pod(runtime, &request.pod_sandbox_id);
    runtime.remove_pod_sandbox(&request.pod_sandbox_id).await?;
    Ok(RemovePodSandboxResponse {})
}

pub fn status(
    runtime: &Runtime,
    request: PodSandboxStatusRequest,
) -> Result<PodSandboxStatusResponse, Status> {
    attributes::pod(&request.pod_sandbox_id);
    Ok(runtime.pod_sandbox_status(&request.pod_sandbox_id, request.verbose)?)
}

pub fn list(
    runtime: &Runtime,
    request: ListPodSandboxRequest,
) -> Result<ListPodSandboxResponse, Status> {
    Ok(ListPodSandboxResponse {
        items: runtime.list_pod_sandbox(request.filter),
    })
}
