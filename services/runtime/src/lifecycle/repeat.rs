//! Repeated creations: RunPodSandbox and CreateContainer are safe to repeat.
//!
//! A kubelet (or the gateway) that lost the answer to a creation, because the
//! runtime service was killed after recording it or the connection broke, asks
//! again with the same name. Answering AlreadyExists would leave the pod or
//! container orphaned until the kubelet's garbage collection and fail the pod's
//! start; so a repeat of a call that completed answers the earlier result: the
//! same pod (namespace, name, uid, attempt) with the same config and runtime
//! handler, or the same container (name, attempt) in the same pod with the same
//! config. A different config under the name is still AlreadyExists, naming the
//! holder. A repeat while the first call is still under way waits for it (its
//! lock) and answers its outcome. A holder whose set-up failed (`RollingBack`) is
//! not a result: its clean-up is finished and the call creates afresh
//! (`rollback.rs`).
//!
//! Which states count as "the earlier result": a pod only while Ready (a stopped
//! pod cannot host the containers the caller is about to create; the kubelet runs
//! a new attempt); a container in any state it reached after its creation
//! completed, because CreateContainer's result is only its id and the kubelet
//! learns the rest from ContainerStatus (it never repeats an attempt it has seen,
//! so such a repeat is a retry whose answer was lost). CRI-O keeps creations
//! finished after their caller gave up for the caller's retry, in memory; here the
//! record is the memory, so a retry after a kill -9 finds it too.

use trellis_common::text::excerpt;

use super::Runtime;
use crate::error::RuntimeError;
use crate::store::{ContainerState, SandboxState, pod_config_digest};

impl Runtime {
    /// The pod a repeated RunPodSandbox created before, if the pod holding `key` is
    /// that; `None` when the name is free or held by a failed set-up.
    pub(super) async fn earlier_pod(
        &self,
        key: &str,
        handler: &str,
        digest: &[u8],
    ) -> Result<Option<String>, RuntimeError> {
        let Some(holder) = self.store.sandbox_named(key) else {
            return Ok(None);
        };
        // A set-up under way holds the pod's lock from before its name is claimed.
        let _guard = self.lock(&holder).await;
        let Some(record) = self.store.sandboxes.get(&holder) else {
            return Ok(None);
        };
        if self.pod_owed(&holder, record.state()) {
            return Ok(None);
        }
        let recorded = if record.config_digest.is_empty() {
            pod_config_digest(record.config())
        } else {
            record.config_digest.clone()
        };
        let what = format!("pod {} already exists as sandbox {holder}", excerpt(key));
        if recorded != digest || record.runtime_handler != handler {
            return Err(RuntimeError::AlreadyExists(format!(
                "{what}, with another config or runtime handler"
            )));
        }
        match record.state() {
            SandboxState::Ready => {
                tracing::info!(sandbox = %holder, "RunPodSandbox repeated: answering the pod it made");
                Ok(Some(holder))
            }
            state => Err(RuntimeError::AlreadyExists(format!(
                "{what}, which is {state:?}: run a new attempt"
            ))),
        }
    }

    /// The container a repeated CreateContainer created before in this pod (whose
    /// lock the caller holds), if the one holding the name and attempt is that.
    pub(super) fn earlier_container(
        &self,
        sandbox_id: &str,
        name: &str,
        attempt: u32,
        digest: &[u8],
    ) -> Result<Option<String>, RuntimeError> {
        let Some(holder) = self.store.container_named(sandbox_id, name, attempt) else {
            return Ok(None);
        };
        let Some(record) = self.store.containers.get(&holder) else {
            return Ok(None);
        };
        if self.container_owed(&holder, record.state()) {
            return Ok(None);
        }
        let what = format!(
            "container {} (attempt {attempt}) already exists in pod {sandbox_id} as {holder}",
            excerpt(name)
        );
        if record.config_digest.is_empty() || record.config_digest != digest {
            return Err(RuntimeError::AlreadyExists(format!(
                "{what}, with another config"
            )));
        }
        if record.state() == ContainerState::Creating {
            // Creations in a pod hold the pod's lock, which the caller has: this one
            // was cut short (recovery rolls it back), not under way.
            return Err(RuntimeError::AlreadyExists(format!(
                "{what}, whose creation did not finish"
            )));
        }
        tracing::info!(container = %holder, "CreateContainer repeated: answering the container it made");
        Ok(Some(holder))
    }
}
