//! What the runtime service remembers about pods and containers.
//!
//! The CRI configs are kept as messages, not bytes: an embedded message and a
//! `bytes` field holding its encoding are the same on the wire, so records written
//! before are read unchanged, and each config is decoded once, when loaded.

use std::sync::LazyLock;

use k8s_cri::v1::{ContainerConfig, PodSandboxConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum SandboxState {
    /// Set-up under way (or cut short: repaired at start).
    Creating = 0,
    Ready = 1,
    NotReady = 2,
    /// Set-up failed (or was cut short by a restart) and what it took is still being
    /// released: shown NotReady, retried in the background, removable by the kubelet.
    RollingBack = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SandboxRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(enumeration = "SandboxState", tag = "2")]
    pub state: i32,
    /// The CRI PodSandboxConfig as the kubelet sent it.
    #[prost(message, optional, tag = "3")]
    pub config: Option<PodSandboxConfig>,
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(string, tag = "5")]
    pub netns_path: String,
    #[prost(string, repeated, tag = "6")]
    pub ips: Vec<String>,
    #[prost(string, tag = "7")]
    pub runtime_handler: String,
    /// The pause container, for pods whose containers share one PID namespace.
    #[prost(string, tag = "8")]
    pub pause_container_id: String,
    /// `store::pod_config_digest` of the config as sent, to tell a repeated
    /// RunPodSandbox from a different pod under the same name (empty in records
    /// written before: computed from `config`, which a pod never changes).
    #[prost(bytes = "vec", tag = "9")]
    pub config_digest: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum ContainerState {
    /// Being created (or cut short: removed at start).
    Creating = 0,
    Created = 1,
    Running = 2,
    Exited = 3,
    /// Creation failed (or was cut short by a restart) and what it took is still
    /// being released: shown as unknown, retried in the background, removable.
    RollingBack = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub sandbox_id: String,
    #[prost(enumeration = "ContainerState", tag = "3")]
    pub state: i32,
    /// The CRI ContainerConfig as the kubelet sent it (resources as last updated).
    #[prost(message, optional, tag = "4")]
    pub config: Option<ContainerConfig>,
    #[prost(string, tag = "5")]
    pub image_id: String,
    #[prost(string, tag = "6")]
    pub image_ref: String,
    #[prost(string, tag = "7")]
    pub log_path: String,
    #[prost(int64, tag = "8")]
    pub created_at: i64,
    #[prost(int64, tag = "9")]
    pub started_at: i64,
    #[prost(int64, tag = "10")]
    pub finished_at: i64,
    #[prost(int32, tag = "11")]
    pub exit_code: i32,
    #[prost(string, tag = "12")]
    pub reason: String,
    #[prost(string, tag = "13")]
    pub message: String,
    #[prost(uint32, tag = "14")]
    pub pid: u32,
    #[prost(string, tag = "15")]
    pub oci_runtime: String,
    #[prost(string, tag = "16")]
    pub stop_signal: String,
    /// The pod's pause process: not shown to the kubelet as a container.
    #[prost(bool, tag = "17")]
    pub infra: bool,
    /// The container's cgroup, relative to each hierarchy's root.
    #[prost(string, tag = "18")]
    pub cgroup_path: String,
    /// `store::container_config_digest` of the config as sent to CreateContainer
    /// (before any update of its resources), to tell a repeated CreateContainer
    /// from a different one under the same name; empty in records written before,
    /// which no repeat matches.
    #[prost(bytes = "vec", tag = "19")]
    pub config_digest: Vec<u8>,
}

impl SandboxRecord {
    pub fn config(&self) -> &PodSandboxConfig {
        static EMPTY: LazyLock<PodSandboxConfig> = LazyLock::new(Default::default);
        self.config.as_ref().unwrap_or(&EMPTY)
    }

    /// The pod's identity: namespace, name, uid and attempt, as one string.
    pub fn name_key(&self) -> String {
        let metadata = self.config().metadata.clone().unwrap_or_default();
        format!(
            "{}/{}/{}/{}",
            metadata.namespace, metadata.name, metadata.uid, metadata.attempt
        )
    }
}

impl ContainerRecord {
    pub fn config(&self) -> &ContainerConfig {
        static EMPTY: LazyLock<ContainerConfig> = LazyLock::new(Default::default);
        self.config.as_ref().unwrap_or(&EMPTY)
    }

    /// The container's name and attempt, unique within its pod.
    pub fn name_key(&self) -> (String, u32) {
        let metadata = self.config().metadata.clone().unwrap_or_default();
        (metadata.name, metadata.attempt)
    }

    /// Created or running: a process may exit under it.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state(),
            ContainerState::Created | ContainerState::Running
        )
    }
}
