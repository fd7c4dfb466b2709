//! At start: what a crash or kill -9 of the runtime service cut short is finished.
//! Creations under way are undone (a container in `Creating`, a pod in `Creating`
//! with everything it holds); exits during the outage are read from the OCI runtime
//! as each container is next looked at, and at once here.

use super::Runtime;
use crate::error::RuntimeError;
use crate::store::{ContainerState, SandboxState};

impl Runtime {
    pub async fn recover(&self) -> Result<(), RuntimeError> {
        for record in self.store.containers.all() {
            if record.state() == ContainerState::Creating {
                tracing::info!(container = %record.id, "removing a container whose creation was cut short");
                self.destroy(&record).await?;
                self.store.remove_container(&record.id)?;
            } else {
                self.refresh(record)?;
            }
        }
        for record in self.store.sandboxes.all() {
            if record.state() == SandboxState::Creating {
                tracing::info!(sandbox = %record.id, "removing a pod whose set-up was cut short");
                for container in self.store.containers_of(&record.id) {
                    self.destroy(&container).await?;
                    self.store.remove_container(&container.id)?;
                }
                self.remove_pod_sandbox(&record.id).await?;
            }
        }
        Ok(())
    }
}
