//! CreateContainer, StartContainer, UpdateContainerResources, StopContainer,
//! RemoveContainer, ContainerStatus, ListContainers, ReopenContainerLog, ExecSync.

use k8s_cri::v1::*;
use tonic::Status;

use super::attributes;
use crate::lifecycle::Runtime;

pub async fn create(
    runtime: &Runtime,
    request: CreateContainerRequest,
) -> Result<CreateContainerResponse, Status> {
    let config = request
        .config
        .ok_or_else(|| Status::invalid_argument("CreateContainer needs a config"))?;
    attributes::recorded_pod(runtime, &request.pod_sandbox_id);
    attributes::container_config(&config);
    // `request.sandbox_config` is ignored: the pod's config is the one it was run
    // with, from its record (as containerd and CRI-O do), or any caller could ask
    // for the host's namespaces or privileges in someone else's pod.
    let container_id = runtime
        .create_container(&request.pod_sandbox_id, config)
        .await?;
    attributes::container(&container_id);
    Ok(CreateContainerResponse { container_id })
}

pub async fn start(
    runtime: &Runtime,
    request: StartContainerRequest,
) -> Result<StartContainerResponse, Status> {
    attributes::container(&request.container_id);
    runtime.start_container(&request.container_id).await?;
    Ok(StartContainerResponse {})
}

pub async fn update_resources(
    runtime: &Runtime,
    request: UpdateContainerResourcesRequest,
) -> Result<UpdateContainerResourcesResponse, Status> {
    attributes::container(&request.container_id);
    runtime
        .update_container_resources(&request.container_id, request.linux)
        .await?;
    Ok(UpdateContainerResourcesResponse {})
}

pub async fn stop(
    runtime: &Runtime,
    request: StopContainerRequest,
) -> Result<StopContainerResponse, Status> {
    attributes::container(&request.container_id);
    runtime
        .stop_container(&request.container_id, request.timeout)
        .await?;
    Ok(StopContainerResponse {})
}

pub async fn remove(
    runtime: &Runtime,
    request: RemoveContainerRequest,
) -> Result<RemoveContainerResponse, Status> {
    attributes::container(&request.container_id);
    runtime.remove_container(&request.container_id).await?;
    Ok(RemoveContainerResponse {})
}

pub fn status(
    runtime: &Runtime,
    request: ContainerStatusRequest,
) -> Result<ContainerStatusResponse, Status> {
    attributes::container(&request.container_id);
    Ok(runtime.container_status(&request.container_id, request.verbose)?)
}

pub fn list(
    runtime: &Runtime,
    request: ListContainersRequest,
) -> Result<ListContainersResponse, Status> {
    Ok(ListContainersResponse {
        containers: runtime.list_containers(request.filter)?,
    })
}

pub async fn reopen_log(
    runtime: &Runtime,
    request: ReopenContainerLogRequest,
) -> Result<ReopenContainerLogResponse, Status> {
    attributes::container(&request.container_id);
    runtime.reopen_container_log(&request.container_id).await?;
    Ok(ReopenContainerLogResponse {})
}

pub async fn exec_sync(
    runtime: &Runtime,
    request: ExecSyncRequest,
) -> Result<ExecSyncResponse, Status> {
    attributes::container(&request.container_id);
    Ok(runtime
        .exec_sync(&request.container_id, request.cmd, request.timeout)
        .await?)
}
