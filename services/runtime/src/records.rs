//! What the runtime service remembers about pods and containers, in its store.
//! Every state change is written (and flushed) before it is acted on or answered.

use crate::error::RuntimeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum SandboxState {
    /// Set-up under way (or cut short: repaired at start).
    Creating = 0,
    Ready = 1,
    NotReady = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SandboxRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(enumeration = "SandboxState", tag = "2")]
    pub state: i32,
    /// The CRI PodSandboxConfig as the kubelet sent it.
    #[prost(bytes = "vec", tag = "3")]
    pub config: Vec<u8>,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum ContainerState {
    /// Being created (or cut short: removed at start).
    Creating = 0,
    Created = 1,
    Running = 2,
    Exited = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub sandbox_id: String,
    #[prost(enumeration = "ContainerState", tag = "3")]
    pub state: i32,
    /// The CRI ContainerConfig as the kubelet sent it.
    #[prost(bytes = "vec", tag = "4")]
    pub config: Vec<u8>,
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
}

/// A table of the runtime's records (sandboxes, containers).
pub type Records<T> = trellis_common::store::Records<T, RuntimeError>;

pub use trellis_common::clock::now_nanos;

/// 64 hex characters from the kernel's random source.
pub fn new_id() -> Result<String, RuntimeError> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|source| RuntimeError::io("cannot read /dev/urandom for an id", source))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
