//! The runtime service's state and the services it calls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use tonic::transport::Channel;
use trellis_common::bus::EventBus;
use trellis_common::config::{Config, ServiceKind};
use trellis_common::grpc::find_executable;
use trellis_common::locks::{KeyGuard, KeyedLocks};
use trellis_common::store::Store;
use trellis_common::text::excerpt;
use trellis_common::transport::unix_channel;
use trellis_proto::events::v1::event::Payload;

use crate::error::RuntimeError;
use crate::oci::Oci;
use crate::records::{ContainerRecord, Records, SandboxRecord};

pub struct Runtime {
    pub config: Config,
    /// `<run_dir>/runtime`: pods, containers (bundles), runc state, exit files.
    pub dir: PathBuf,
    pub sandboxes: Records<SandboxRecord>,
    pub containers: Records<ContainerRecord>,
    pub oci: Oci,
    pub storage: Channel,
    pub network: Channel,
    pub images: Channel,
    pub bus: EventBus,
    /// This process's oom_score_adj: containers cannot be given less (no CAP_SYS_RESOURCE).
    pub oom_score_floor: i32,
    locks: KeyedLocks,
    /// The last CPU reading per container, (usage ns, at ns), for usage rates.
    pub cpu_samples: Mutex<HashMap<String, (u64, i64)>>,
    /// Held while an exit found in conmon's exit file is recorded.
    pub exit_detection: Mutex<()>,
    /// Turns for `runc create`, the costliest step of a pod start (see
    /// `runtime.max_parallel_creates`).
    pub create_slots: tokio::sync::Semaphore,
}

impl Runtime {
    pub fn new(config: Config, store: &dyn Store, bus: EventBus) -> Result<Self, RuntimeError> {
        let dir = config.node.run_dir.join("runtime");
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
        let conmon = find_executable(&config.runtime.conmon)
            .unwrap_or_else(|| PathBuf::from(&config.runtime.conmon));
        let create_turns =
            trellis_common::config::parallelism(config.runtime.max_parallel_creates, 1);
        let oom_score_floor = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self {
            oci: Oci::new(conmon, dir.clone()),
            sandboxes: Records::open(store, "sandboxes")?,
            containers: Records::open(store, "containers")?,
            storage: unix_channel(&config.endpoint(ServiceKind::Storage).socket),
            network: unix_channel(&config.endpoint(ServiceKind::Network).socket),
            images: unix_channel(&config.endpoint(ServiceKind::Image).socket),
            dir,
            config,
            bus,
            oom_score_floor,
            locks: KeyedLocks::new(),
            cpu_samples: Mutex::new(HashMap::new()),
            exit_detection: Mutex::new(()),
            create_slots: tokio::sync::Semaphore::new(create_turns),
        })
    }

    pub fn pod_dir(&self, sandbox_id: &str) -> PathBuf {
        self.dir.join("pods").join(sandbox_id)
    }

    pub fn bundle_dir(&self, container_id: &str) -> PathBuf {
        self.dir.join("containers").join(container_id)
    }

    /// Serialises operations on one pod or container.
    pub async fn lock(&self, id: &str) -> KeyGuard {
        self.locks.lock(id).await
    }

    /// The OCI runtime binary for a CRI runtime handler ("" is the default).
    pub fn oci_runtime(&self, handler: &str) -> Result<PathBuf, RuntimeError> {
        let runtime = &self.config.runtime;
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

    pub fn publish(&self, payload: Payload) {
        if let Err(error) = self.bus.publish(payload) {
            tracing::error!(%error, "cannot record an event");
        }
    }

    /// Finds a record by full id or unique prefix (as crictl users type them).
    pub fn resolve<T: prost::Message + Default>(
        &self,
        records: &Records<T>,
        id: &str,
        what: &str,
        id_of: impl Fn(&T) -> &str,
    ) -> Result<T, RuntimeError> {
        crate::validate::lookup_id(what, id)?;
        if let Some(record) = records.get(id)? {
            return Ok(record);
        }
        let mut matches: Vec<T> = records
            .all()?
            .into_iter()
            .filter(|r| id_of(r).starts_with(id))
            .collect();
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(RuntimeError::NotFound(format!(
                "{what} {} not found",
                excerpt(id)
            ))),
            n => Err(RuntimeError::InvalidArgument(format!(
                "{what} id prefix {} matches {n} {what} ids",
                excerpt(id)
            ))),
        }
    }
}
