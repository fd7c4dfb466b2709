//! At start: what a crash or kill -9 of the runtime service cut short is finished.
//! Creations under way are undone (a container in `Creating`, a pod in `Creating`
//! with everything it holds): recorded as rolling back, tried once here, and left
//! to the background retries if another service is not back yet, so the runtime
//! serves (and the kubelet sees those pods) meanwhile. Exits during the outage are
//! read from the OCI runtime as each container is next looked at, and at once here.

use std::collections::HashSet;
use std::time::Duration;

use super::Runtime;
use crate::error::RuntimeError;
use crate::store::{ContainerState, SandboxState};

/// How long the start waits for clean-ups before serving.
const FIRST_PASS: Duration = Duration::from_secs(10);

impl Runtime {
    pub async fn recover(&self) -> Result<(), RuntimeError> {
        for record in self.store.containers.all() {
            if record.state() == ContainerState::Creating {
                tracing::info!(container = %record.id, "rolling back a container whose creation was cut short");
                self.mark_container_rolling_back(&record.id, "creation cut short by a restart");
            } else {
                self.refresh(record)?;
            }
        }
        for record in self.store.sandboxes.all() {
            if record.state() == SandboxState::Creating {
                tracing::info!(sandbox = %record.id, "rolling back a pod whose set-up was cut short");
                self.mark_pod_rolling_back(&record.id);
            }
        }
        let known: HashSet<String> = self
            .store
            .containers
            .all()
            .iter()
            .map(|record| record.id.clone())
            .collect();
        self.oci.forget_others(&known);
        // Bounded: a backend that hangs must not keep the runtime from serving; every
        // step of a clean-up can be cut and done again, so the background takes over.
        match tokio::time::timeout(FIRST_PASS, self.retry_rollbacks()).await {
            Ok(0) => {}
            Ok(left) => tracing::warn!(
                left,
                "clean-ups of failed set-ups are not finished; retried in the background"
            ),
            Err(_) => tracing::warn!(
                seconds = FIRST_PASS.as_secs(),
                "clean-ups of failed set-ups take long; the background goes on with them"
            ),
        }
        Ok(())
    }
}
