//! Rolling back failed set-ups until they are gone.
//!
//! When RunPodSandbox or CreateContainer fails part-way, what it took (network,
//! namespaces, mounts, the pause process, runc state, the record and its name) is
//! released at once; but the release itself can fail (the network service is being
//! restarted, the disk is full). Such a pod or container is recorded `RollingBack`
//! and nothing is left to a restart: a background task retries every one within
//! seconds (with a backoff, logging only the first failures of each), `recover`
//! hands it what a restart cut short, and until it is gone the kubelet sees it (pods
//! NotReady, containers unknown), can remove it (RemovePodSandbox, RemoveContainer
//! finish the clean-up or say why not yet), and a new creation of the same name
//! finishes the old one's clean-up first instead of answering AlreadyExists.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use trellis_common::failpoint;
use trellis_common::text::excerpt;

use super::Runtime;
use crate::error::RuntimeError;
use crate::store::{ContainerState, SandboxState};

/// The first retry comes this soon after a clean-up fails, then twice as late
/// each time, up to [`LATEST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LATEST_RETRY: Duration = Duration::from_secs(5);

/// Clean-ups owed, and how often each has failed (for quieter logs).
#[derive(Default)]
pub(super) struct Rollbacks {
    due: tokio::sync::Notify,
    failures: Mutex<HashMap<String, u32>>,
    /// Owed although the record could not say so (its store refused the write, a
    /// full disk): kept here so that the retries still find them.
    unrecorded: Mutex<HashSet<String>>,
}

impl Rollbacks {
    fn unrecorded(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.unrecorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a failed attempt; true when it is worth a log line (the 1st, 2nd,
    /// 4th, 8th … failure of one clean-up).
    fn failed(&self, id: &str) -> (u32, bool) {
        let mut failures = self.failures();
        let count = failures.entry(id.to_string()).or_insert(0);
        *count += 1;
        (*count, count.is_power_of_two())
    }

    fn finished(&self, id: &str) -> u32 {
        self.unrecorded().remove(id);
        self.failures().remove(id).unwrap_or(0)
    }
}

impl Runtime {
    /// Starts retrying owed clean-ups in the background, for as long as the runtime
    /// lives (the task holds it weakly).
    pub fn retry_rollbacks_in_background(self: &Arc<Self>) {
        let runtime: Weak<Runtime> = Arc::downgrade(self);
        let rollbacks = self.rollbacks.clone();
        tokio::spawn(async move {
            let mut wait = FIRST_RETRY;
            loop {
                let left = match runtime.upgrade() {
                    Some(runtime) => runtime.retry_rollbacks().await,
                    None => return,
                };
                if left == 0 {
                    rollbacks.due.notified().await;
                    wait = FIRST_RETRY;
                }
                // A failure just now is retried after a pause, not at once.
                tokio::time::sleep(wait).await;
                if left > 0 {
                    wait = (wait * 2).min(LATEST_RETRY);
                }
            }
        });
    }

    /// Tries every owed clean-up once; answers how many are still owed.
    pub async fn retry_rollbacks(&self) -> usize {
        let mut left = 0;
        for container in self.store.containers.all() {
            if self.container_owed(&container.id, container.state())
                && self.roll_back_container(&container.id).await.is_err()
            {
                left += 1;
            }
        }
        for pod in self.store.sandboxes.all() {
            if self.pod_owed(&pod.id, pod.state()) {
                let _guard = self.lock(&pod.id).await;
                if self.roll_back_pod_locked(&pod.id).await.is_err() {
                    left += 1;
                }
            }
        }
        left
    }

    pub(super) fn pod_owed(&self, id: &str, state: SandboxState) -> bool {
        state == SandboxState::RollingBack || self.rollbacks.unrecorded().contains(id)
    }

    pub(super) fn container_owed(&self, id: &str, state: ContainerState) -> bool {
        state == ContainerState::RollingBack || self.rollbacks.unrecorded().contains(id)
    }

    /// Records that a pod's set-up failed and is being undone (its lock is held).
    pub(super) fn mark_pod_rolling_back(&self, id: &str) {
        let marked = self.store.sandboxes.update(id, |record| {
            record.set_state(SandboxState::RollingBack);
            Ok(())
        });
        if let Err(error) = marked {
            tracing::error!(sandbox = %id, %error, "cannot record that a failed pod is being rolled back");
            self.rollbacks.unrecorded().insert(id.to_string());
        }
    }

    /// Records that a container's creation failed and is being undone.
    pub(super) fn mark_container_rolling_back(&self, id: &str, cause: &str) {
        let marked = self.store.containers.update(id, |record| {
            record.set_state(ContainerState::RollingBack);
            record.reason = "CreateContainerError".into();
            record.message = excerpt(cause);
            Ok(())
        });
        if let Err(error) = marked {
            tracing::error!(container = %id, %error, "cannot record that a failed container is being rolled back");
            self.rollbacks.unrecorded().insert(id.to_string());
        }
    }

    /// Releases everything of a pod whose set-up failed and removes its record;
    /// the caller holds the pod's lock. A failure leaves it owed to the background.
    pub(super) async fn roll_back_pod_locked(&self, id: &str) -> Result<(), RuntimeError> {
        match self.store.sandboxes.get(id) {
            Some(record) if self.pod_owed(id, record.state()) => {}
            // Gone, or no longer owed (removed meanwhile).
            _ => return Ok(()),
        }
        let attempt = async {
            failpoint::hit_async("runtime.rollback.start").await?;
            self.remove_pod_now(id).await
        };
        self.count_attempt(id, "pod", attempt.await)
    }

    /// Releases everything of a container whose creation failed and removes its record.
    pub(super) async fn roll_back_container(&self, id: &str) -> Result<(), RuntimeError> {
        let _guard = self.lock(id).await;
        let record = match self.store.containers.get(id) {
            Some(record) if self.container_owed(id, record.state()) => record,
            _ => return Ok(()),
        };
        let attempt = async {
            failpoint::hit_async("runtime.rollback.start").await?;
            self.destroy(&record).await?;
            self.store.remove_container(id)
        };
        self.count_attempt(id, "container", attempt.await)
    }

    /// Counts the outcome of one clean-up attempt, for the logs and the retries.
    pub(super) fn count_attempt(
        &self,
        id: &str,
        kind: &str,
        outcome: Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        match outcome {
            Ok(()) => {
                let failed_before = self.rollbacks.finished(id);
                if failed_before > 0 {
                    tracing::info!(
                        id,
                        kind,
                        failed_before,
                        "rolling back a failed set-up finished"
                    );
                }
                Ok(())
            }
            Err(error) => {
                let (failures, worth_a_line) = self.rollbacks.failed(id);
                if worth_a_line {
                    tracing::warn!(id, kind, failures, %error, "rolling back a failed set-up did not finish; retried in the background");
                } else {
                    tracing::debug!(id, kind, failures, %error, "rolling back a failed set-up did not finish");
                }
                self.rollbacks.due.notify_one();
                Err(error)
            }
        }
    }

    /// Before a pod name is claimed: a failed pod still holding it is finished first.
    pub(super) async fn free_pod_name(&self, key: &str) -> Result<(), RuntimeError> {
        let Some(holder) = self.store.sandbox_named(key) else {
            return Ok(());
        };
        if self
            .store
            .sandboxes
            .get(&holder)
            .is_none_or(|record| !self.pod_owed(&holder, record.state()))
        {
            return Ok(());
        }
        let _guard = self.lock(&holder).await;
        self.roll_back_pod_locked(&holder)
            .await
            .map_err(|source| RuntimeError::Unfinished {
                what: format!(
                    "pod {} is still held by sandbox {holder}, whose failed set-up is being rolled back",
                    excerpt(key)
                ),
                source: Box::new(source),
            })
    }

    /// Before a container name is claimed: a failed container still holding it is
    /// finished first.
    pub(super) async fn free_container_name(
        &self,
        sandbox_id: &str,
        name: &str,
        attempt: u32,
    ) -> Result<(), RuntimeError> {
        let Some(holder) = self.store.container_named(sandbox_id, name, attempt) else {
            return Ok(());
        };
        if self
            .store
            .containers
            .get(&holder)
            .is_none_or(|record| !self.container_owed(&holder, record.state()))
        {
            return Ok(());
        }
        self.roll_back_container(&holder)
            .await
            .map_err(|source| RuntimeError::Unfinished {
                what: format!(
                    "container {} (attempt {attempt}) is still held by {holder}, whose failed creation is being rolled back",
                    excerpt(name)
                ),
                source: Box::new(source),
            })
    }
}
