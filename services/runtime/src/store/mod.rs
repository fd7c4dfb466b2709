//! The runtime's records: pods and containers, durable in the service's record store
//! and indexed in memory by id (and id prefix), by name, and by pod membership.
//!
//! The lists and status calls answer from here without touching the disk; the index
//! is loaded at start and kept current by the only writers, the lifecycle managers,
//! through the functions below. Names are unique (a pod per namespace, name, uid and
//! attempt; a container per pod, name and attempt), checked and claimed atomically
//! with the insert, so two creations of the same name cannot both succeed.

mod digest;
mod records;
mod table;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use trellis_common::store::Store;
use trellis_common::text::excerpt;

use crate::error::RuntimeError;
pub use crate::ids::{new_id, now_nanos};
pub use digest::{container_config_digest, pod_config_digest};
pub use records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
pub use table::{Record, Table};

impl Record for SandboxRecord {
    const KIND: &'static str = "pod sandbox";
    fn id(&self) -> &str {
        &self.id
    }
}

impl Record for ContainerRecord {
    const KIND: &'static str = "container";
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Default)]
struct Names {
    /// Pod name key (namespace/name/uid/attempt) → sandbox id.
    pods: HashMap<String, String>,
    /// (sandbox id, container name, attempt) → container id.
    containers: HashMap<(String, String, u32), String>,
    /// Sandbox id → its containers' ids (the pause process's too).
    members: HashMap<String, BTreeSet<String>>,
}

pub struct RecordStore {
    pub sandboxes: Table<SandboxRecord>,
    pub containers: Table<ContainerRecord>,
    names: Mutex<Names>,
}

fn container_name_key(record: &ContainerRecord) -> (String, String, u32) {
    let (name, attempt) = record.name_key();
    (record.sandbox_id.clone(), name, attempt)
}

impl RecordStore {
    pub fn open(store: &dyn Store) -> Result<Self, RuntimeError> {
        let sandboxes = Table::<SandboxRecord>::open(store, "sandboxes")?;
        let containers = Table::<ContainerRecord>::open(store, "containers")?;
        let mut names = Names::default();
        for pod in sandboxes.all() {
            names.pods.insert(pod.name_key(), pod.id.clone());
        }
        for container in containers.all() {
            names
                .containers
                .insert(container_name_key(&container), container.id.clone());
            names
                .members
                .entry(container.sandbox_id.clone())
                .or_default()
                .insert(container.id.clone());
        }
        Ok(Self {
            sandboxes,
            containers,
            names: Mutex::new(names),
        })
    }

    fn names(&self) -> MutexGuard<'_, Names> {
        self.names
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a new pod; AlreadyExists names the sandbox holding the same pod name.
    pub fn insert_sandbox(
        &self,
        record: SandboxRecord,
    ) -> Result<Arc<SandboxRecord>, RuntimeError> {
        let key = record.name_key();
        let mut names = self.names();
        if let Some(existing) = names.pods.get(&key) {
            return Err(RuntimeError::AlreadyExists(format!(
                "pod {} already exists as sandbox {existing}",
                excerpt(&key)
            )));
        }
        let record = self.sandboxes.insert(record)?;
        names.pods.insert(key, record.id.clone());
        Ok(record)
    }

    /// The sandbox holding a pod name key (namespace/name/uid/attempt), if any.
    pub fn sandbox_named(&self, key: &str) -> Option<String> {
        self.names().pods.get(key).cloned()
    }

    /// The container holding a name and attempt in a pod, if any.
    pub fn container_named(&self, sandbox_id: &str, name: &str, attempt: u32) -> Option<String> {
        self.names()
            .containers
            .get(&(sandbox_id.to_string(), name.to_string(), attempt))
            .cloned()
    }

    pub fn remove_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut names = self.names();
        if let Some(record) = self.sandboxes.remove(id)? {
            names.pods.remove(&record.name_key());
        }
        Ok(())
    }

    /// Adds a new container; AlreadyExists names the one with the same name and attempt.
    pub fn insert_container(
        &self,
        record: ContainerRecord,
    ) -> Result<Arc<ContainerRecord>, RuntimeError> {
        let key = container_name_key(&record);
        let mut names = self.names();
        if let Some(existing) = names.containers.get(&key) {
            return Err(RuntimeError::AlreadyExists(format!(
                "container {} (attempt {}) already exists in pod {} as {existing}",
                excerpt(&key.1),
                key.2,
                key.0
            )));
        }
        let record = self.containers.insert(record)?;
        names
            .members
            .entry(record.sandbox_id.clone())
            .or_default()
            .insert(record.id.clone());
        names.containers.insert(key, record.id.clone());
        Ok(record)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut names = self.names();
        if let Some(record) = self.containers.remove(id)? {
            names.containers.remove(&container_name_key(&record));
            if let Some(members) = names.members.get_mut(&record.sandbox_id) {
                members.remove(id);
                if members.is_empty() {
                    names.members.remove(&record.sandbox_id);
                }
            }
        }
        Ok(())
    }

    /// The containers of one pod (its pause process included), in id order.
    pub fn containers_of(&self, sandbox_id: &str) -> Vec<Arc<ContainerRecord>> {
        let ids: Vec<String> = self
            .names()
            .members
            .get(sandbox_id)
            .map(|members| members.iter().cloned().collect())
            .unwrap_or_default();
        ids.iter()
            .filter_map(|id| self.containers.get(id))
            .collect()
    }
}

#[cfg(test)]
mod tests;
