//! ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats.

use k8s_cri::v1::*;
use tonic::Status;

use crate::lifecycle::Runtime;

pub async fn container(
    runtime: &Runtime,
    request: ContainerStatsRequest,
) -> Result<ContainerStatsResponse, Status> {
    let stats = runtime.container_stats(&request.container_id).await?;
    Ok(ContainerStatsResponse { stats: Some(stats) })
}

pub async fn list_containers(
    runtime: &Runtime,
    request: ListContainerStatsRequest,
) -> Result<ListContainerStatsResponse, Status> {
    let stats = runtime.list_container_stats(request.filter).await?;
    Ok(ListContainerStatsResponse { stats })
}

pub async fn pod(
    runtime: &Runtime,
    request: PodSandboxStatsRequest,
) -> Result<PodSandboxStatsResponse, Status> {
    let stats = runtime.pod_sandbox_stats(&request.pod_sandbox_id).await?;
    Ok(PodSandboxStatsResponse { stats: Some(stats) })
}

pub async fn list_pods(
    runtime: &Runtime,
    request: ListPodSandboxStatsRequest,
) -> Result<ListPodSandboxStatsResponse, Status> {
    let stats = runtime.list_pod_sandbox_stats(request.filter).await?;
    Ok(ListPodSandboxStatsResponse { stats })
}
