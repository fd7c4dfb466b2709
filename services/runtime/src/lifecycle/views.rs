//! What the kubelet reads: PodSandboxStatus, ListPodSandbox, ContainerStatus,
//! ListContainers, answered from the in-memory index with no disk access (a live
//! container's exit is read from the OCI runtime as it is looked at).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::ContainerState as CriContainerState;
use k8s_cri::v1::*;

use super::Runtime;
use super::sandbox::namespace_options;
use crate::error::RuntimeError;
use crate::store::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};

fn sandbox_cri_state(record: &SandboxRecord) -> PodSandboxState {
    match record.state() {
        SandboxState::Ready => PodSandboxState::SandboxReady,
        SandboxState::Creating | SandboxState::NotReady | SandboxState::RollingBack => {
            PodSandboxState::SandboxNotready
        }
    }
}

fn container_cri_state(record: &ContainerRecord) -> CriContainerState {
    match record.state() {
        ContainerState::Created => CriContainerState::ContainerCreated,
        ContainerState::Running => CriContainerState::ContainerRunning,
        ContainerState::Exited => CriContainerState::ContainerExited,
        ContainerState::Creating | ContainerState::RollingBack => {
            CriContainerState::ContainerUnknown
        }
    }
}

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Runtime {
    pub fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<PodSandboxStatusResponse, RuntimeError> {
        let record = self.sandbox(id)?;
        let config = record.config();
        let network = record.ips.first().map(|ip| PodSandboxNetworkStatus {
            ip: ip.clone(),
            additional_ips: record
                .ips
                .iter()
                .skip(1)
                .map(|ip| PodIp { ip: ip.clone() })
                .collect(),
        });
        let status = PodSandboxStatus {
            id: record.id.clone(),
            metadata: config.metadata.clone(),
            state: sandbox_cri_state(&record) as i32,
            created_at: record.created_at,
            network,
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: Some(namespace_options(config)),
                }),
            }),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            runtime_handler: record.runtime_handler.clone(),
        };
        let mut info = HashMap::new();
        if verbose {
            let details = serde_json::json!({ "netnsPath": record.netns_path, "podDir": self.pod_dir(&record.id).display().to_string() });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(PodSandboxStatusResponse {
            status: Some(status),
            info,
            ..Default::default()
        })
    }

    pub fn list_pod_sandbox(&self, filter: Option<PodSandboxFilter>) -> Vec<PodSandbox> {
        let filter = filter.unwrap_or_default();
        let candidates = self.store.sandboxes.with_prefix(&filter.id);
        candidates
            .iter()
            .filter(|record| record.state() != SandboxState::Creating)
            .filter(|record| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == sandbox_cri_state(record) as i32)
                    && labels_match(&record.config().labels, &filter.label_selector)
            })
            .map(|record| {
                let config = record.config();
                PodSandbox {
                    id: record.id.clone(),
                    metadata: config.metadata.clone(),
                    state: sandbox_cri_state(record) as i32,
                    created_at: record.created_at,
                    labels: config.labels.clone(),
                    annotations: config.annotations.clone(),
                    runtime_handler: record.runtime_handler.clone(),
                }
            })
            .collect()
    }

    pub fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<ContainerStatusResponse, RuntimeError> {
        let record = self.container(id)?;
        let config = record.config();
        let status = ContainerStatus {
            id: record.id.clone(),
            metadata: config.metadata.clone(),
            state: container_cri_state(&record) as i32,
            created_at: record.created_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            exit_code: record.exit_code,
            image: config.image.clone(),
            image_ref: record.image_id.clone(),
            reason: record.reason.clone(),
            message: record.message.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            mounts: config.mounts.clone(),
            log_path: record.log_path.clone(),
            resources: Self::reported_resources(config),
            ..Default::default()
        };
        let mut info = HashMap::new();
        if verbose {
            info.insert("info".into(), serde_json::json!({ "pid": record.pid, "sandboxId": record.sandbox_id, "runtime": record.oci_runtime }).to_string());
        }
        Ok(ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    /// The containers the kubelet sees (pause processes and creations under way
    /// left out), each with any exit recorded. The OCI runtime is asked once which
    /// containers have exited, not once per container.
    pub(super) fn visible_containers(
        &self,
        candidates: Vec<Arc<ContainerRecord>>,
    ) -> Result<Vec<Arc<ContainerRecord>>, RuntimeError> {
        let exited = self.oci.exited();
        candidates
            .into_iter()
            .filter(|c| !c.infra && c.state() != ContainerState::Creating)
            .map(|c| {
                if exited.contains(&c.id) {
                    self.refresh(c)
                } else {
                    Ok(c)
                }
            })
            .collect()
    }

    pub fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<Container>, RuntimeError> {
        let filter = filter.unwrap_or_default();
        let candidates = match (filter.id.as_str(), filter.pod_sandbox_id.as_str()) {
            ("", pod) if !pod.is_empty() => self
                .store
                .sandboxes
                .with_prefix(pod)
                .iter()
                .flat_map(|pod| self.store.containers_of(&pod.id))
                .collect(),
            (id, _) => self.store.containers.with_prefix(id),
        };
        let list = self
            .visible_containers(candidates)?
            .iter()
            .filter(|record| {
                record.sandbox_id.starts_with(&filter.pod_sandbox_id)
                    && filter
                        .state
                        .as_ref()
                        .is_none_or(|s| s.state == container_cri_state(record) as i32)
                    && labels_match(&record.config().labels, &filter.label_selector)
            })
            .map(|record| {
                let config = record.config();
                Container {
                    id: record.id.clone(),
                    pod_sandbox_id: record.sandbox_id.clone(),
                    metadata: config.metadata.clone(),
                    image: config.image.clone(),
                    image_ref: record.image_id.clone(),
                    state: container_cri_state(record) as i32,
                    created_at: record.created_at,
                    labels: config.labels.clone(),
                    annotations: config.annotations.clone(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(list)
    }
}
