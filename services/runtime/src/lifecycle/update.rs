//! UpdateContainerResources: new cgroup limits for a created or running container,
//! applied by the OCI runtime and kept in the container's record, so that
//! ContainerStatus reports them and a restarted runtime service still knows them.

use k8s_cri::v1::{ContainerResources, LinuxContainerResources};

use super::Runtime;
use crate::error::RuntimeError;

impl Runtime {
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: Option<LinuxContainerResources>,
    ) -> Result<(), RuntimeError> {
        let resources = resources.ok_or_else(|| {
            RuntimeError::InvalidArgument("UpdateContainerResources needs linux resources".into())
        })?;
        let record = self.container(id)?;
        let _guard = self.lock(&record.id).await;
        let record = self.refresh(self.store.containers.resolve(&record.id)?)?;
        if !record.is_live() {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {} has exited: its resources can no longer change",
                record.id
            )));
        }
        // Devices are not the kubelet's to change here: the OCI runtime keeps its rules.
        let oci_resources = crate::spec::resources::linux_resources(&resources, Vec::new())?;
        let json = serde_json::to_vec(&oci_resources).map_err(|e| {
            RuntimeError::Oci(format!(
                "cannot encode the resources of container {}: {e}",
                record.id
            ))
        })?;
        self.oci
            .update(Self::runtime_binary(&record), &record.id, &json)
            .await?;
        self.store.containers.update(&record.id, |record| {
            let linux = record
                .config
                .get_or_insert_with(Default::default)
                .linux
                .get_or_insert_with(Default::default);
            // The oom_score_adj is fixed at creation; keep the one the container has.
            let oom_score_adj = linux
                .resources
                .as_ref()
                .map(|r| r.oom_score_adj)
                .unwrap_or_default();
            linux.resources = Some(LinuxContainerResources {
                oom_score_adj,
                ..resources
            });
            Ok(())
        })?;
        Ok(())
    }

    /// What ContainerStatus reports as the container's resources.
    pub fn reported_resources(config: &k8s_cri::v1::ContainerConfig) -> Option<ContainerResources> {
        config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|linux| ContainerResources {
                linux: Some(linux),
                ..Default::default()
            })
    }
}
