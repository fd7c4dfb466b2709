//! The lifecycle layer: pod sandboxes and containers, from creation to removal.
//!
//! [`Runtime`] owns the records (through [`RecordStore`]) and is the only writer of
//! them; it asks the OCI runtime, the other services and the host for the rest
//! through traits ([`OciRuntime`], [`Backends`], [`PodNamespaces`], [`Events`]),
//! so every path, failures and rollbacks included, is unit-tested with fakes and
//! without root (`lifecycle/tests`). Operations on one pod or container are
//! serialised by a lock per id; state changes go through the store's update, which
//! checks the state it changes from.

mod container;
mod recover;
mod repeat;
mod rollback;
mod sandbox;
mod stats;
mod update;
mod views;

#[cfg(test)]
mod repeat_tests;
#[cfg(test)]
mod rollback_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use trellis_common::bus::EventBus;
use trellis_common::config::RuntimeConfig;
use trellis_common::grpc::find_executable;
use trellis_common::locks::{KeyGuard, KeyedLocks};
use trellis_common::text::excerpt;
use trellis_proto::events::v1::event::Payload;

use crate::backends::Backends;
use crate::error::RuntimeError;
use crate::metrics::{RuntimeMetrics, StateCounts};
use crate::namespaces::PodNamespaces;
use crate::oci::OciRuntime;
use crate::store::{ContainerRecord, ContainerState, RecordStore, SandboxRecord, SandboxState};

/// Where the lifecycle announces changes (the node's event bus).
pub trait Events: Send + Sync {
    fn publish(&self, payload: Payload);
}

impl Events for EventBus {
    fn publish(&self, payload: Payload) {
        if let Err(error) = EventBus::publish(self, payload) {
            tracing::error!(%error, "cannot record an event");
        }
    }
}

/// Everything the lifecycle works through.
pub struct Parts {
    pub store: RecordStore,
    pub oci: Arc<dyn OciRuntime>,
    pub backends: Backends,
    pub namespaces: Arc<dyn PodNamespaces>,
    pub events: Arc<dyn Events>,
    /// Exits and stops are counted here (the OCI steps by `oci::Timed`).
    pub metrics: RuntimeMetrics,
}

pub struct Runtime {
    config: RuntimeConfig,
    /// `<run_dir>/runtime`: pods, containers (bundles), runc state, exit files.
    dir: PathBuf,
    store: RecordStore,
    oci: Arc<dyn OciRuntime>,
    backends: Backends,
    namespaces: Arc<dyn PodNamespaces>,
    events: Arc<dyn Events>,
    /// This process's oom_score_adj: containers cannot be given less (no CAP_SYS_RESOURCE).
    oom_score_floor: i32,
    locks: KeyedLocks,
    /// The last CPU reading per container, (usage ns, at ns), for usage rates.
    cpu_samples: Mutex<HashMap<String, (u64, i64)>>,
    /// Turns for `runc create`, the costliest step of a pod start (see
    /// `runtime.max_parallel_creates`).
    create_slots: tokio::sync::Semaphore,
    /// Clean-ups of failed set-ups still owed, for the background retries.
    rollbacks: Arc<rollback::Rollbacks>,
    metrics: RuntimeMetrics,
}

/// The node's hostname as it is now (an operator may change it while the runtime
/// runs): a host-network pod's.
pub(super) fn node_hostname() -> Result<String, RuntimeError> {
    nix::unistd::gethostname()
        .map(|name| name.to_string_lossy().into_owned())
        .map_err(|error| RuntimeError::system("cannot read the node's hostname", error))
}

impl Runtime {
    /// `dir` is the runtime's own directory (made private, 0700, here).
    pub fn new(config: RuntimeConfig, dir: PathBuf, parts: Parts) -> Result<Self, RuntimeError> {
        // Bundles hold each container's environment (its secrets) in config.json, and
        // the pods' files, runc's state and the exit codes live beside them: root only,
        // made so again at every start for nodes that made the directory before.
        trellis_common::dirs::ensure_private_dir(&dir).map_err(|source| {
            RuntimeError::io(
                format!("cannot make {} private (0700)", dir.display()),
                source,
            )
        })?;
        for sub in ["pods", "containers"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| {
                RuntimeError::io(format!("cannot create {}", path.display()), source)
            })?;
        }
        let create_turns = trellis_common::config::parallelism(config.max_parallel_creates, 1);
        let oom_score_floor = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self {
            config,
            dir,
            store: parts.store,
            oci: parts.oci,
            backends: parts.backends,
            namespaces: parts.namespaces,
            events: parts.events,
            oom_score_floor,
            locks: KeyedLocks::new(),
            cpu_samples: Mutex::new(HashMap::new()),
            create_slots: tokio::sync::Semaphore::new(create_turns),
            rollbacks: Arc::default(),
            metrics: parts.metrics,
        })
    }

    pub fn metrics(&self) -> &RuntimeMetrics {
        &self.metrics
    }

    pub fn pod_dir(&self, sandbox_id: &str) -> PathBuf {
        self.dir.join("pods").join(sandbox_id)
    }

    pub fn bundle_dir(&self, container_id: &str) -> PathBuf {
        self.dir.join("containers").join(container_id)
    }

    /// Serialises operations on one pod or container.
    async fn lock(&self, id: &str) -> KeyGuard {
        // Another call on the same pod or container goes first: time spent waiting.
        self.locks
            .lock(id)
            .instrument(trellis_common::step_span!("lock.wait"))
            .await
    }

    /// The OCI runtime binary for a CRI runtime handler ("" is the default).
    fn oci_runtime(&self, handler: &str) -> Result<PathBuf, RuntimeError> {
        let runtime = &self.config;
        let binary = &runtime
            .handler(handler)
            .ok_or_else(|| {
                let configured: Vec<&str> = runtime.handlers.keys().map(String::as_str).collect();
                RuntimeError::InvalidArgument(format!(
                    "unknown runtime handler `{}`; configured: {}",
                    excerpt(handler),
                    configured.join(", ")
                ))
            })?
            .binary;
        find_executable(binary).ok_or_else(|| {
            RuntimeError::FailedPrecondition(format!(
                "OCI runtime `{binary}` for handler `{}` is not installed",
                excerpt(handler)
            ))
        })
    }

    fn publish(&self, payload: Payload) {
        self.events.publish(payload);
    }

    /// A pod by full id or unique prefix.
    pub fn sandbox(&self, id: &str) -> Result<Arc<SandboxRecord>, RuntimeError> {
        self.store.sandboxes.resolve(id)
    }

    /// A container the kubelet sees (not a pod's pause process), by full id or unique
    /// prefix, with any exit since it was last looked at recorded.
    pub fn container(&self, id: &str) -> Result<Arc<ContainerRecord>, RuntimeError> {
        let record = self.store.containers.resolve(id)?;
        if record.infra {
            return Err(RuntimeError::NotFound(format!(
                "container {} not found",
                excerpt(id)
            )));
        }
        self.refresh(record)
    }

    fn runtime_binary(record: &ContainerRecord) -> &Path {
        Path::new(&record.oci_runtime)
    }
}

impl StateCounts for Runtime {
    fn pods_by_state(&self) -> Vec<(&'static str, u64)> {
        let mut counts = [
            (SandboxState::Creating, "creating", 0),
            (SandboxState::Ready, "ready", 0),
            (SandboxState::NotReady, "notready", 0),
            (SandboxState::RollingBack, "rolling_back", 0),
        ];
        for pod in self.store.sandboxes.all() {
            if let Some(count) = counts.iter_mut().find(|(state, ..)| *state == pod.state()) {
                count.2 += 1;
            }
        }
        counts.map(|(_, name, count)| (name, count)).to_vec()
    }

    fn containers_by_state(&self) -> Vec<(&'static str, u64)> {
        let mut counts = [
            (ContainerState::Creating, "creating", 0),
            (ContainerState::Created, "created", 0),
            (ContainerState::Running, "running", 0),
            (ContainerState::Exited, "exited", 0),
            (ContainerState::RollingBack, "rolling_back", 0),
        ];
        for container in self.store.containers.all() {
            if container.infra {
                continue;
            }
            if let Some(count) = counts
                .iter_mut()
                .find(|(state, ..)| *state == container.state())
            {
                count.2 += 1;
            }
        }
        counts.map(|(_, name, count)| (name, count)).to_vec()
    }
}
