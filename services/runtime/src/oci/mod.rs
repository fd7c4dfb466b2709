//! The OCI runtime layer: what the lifecycle asks of the program that runs
//! containers, behind a trait so the lifecycle can be tested without root.
//! [`ConmonRunc`] is the real one (conmon supervising runc); [`fake::FakeOci`]
//! stands in for it in unit tests.

mod conmon;
#[cfg(test)]
pub mod fake;
mod runtime_log;
mod timed;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use trellis_common::grpc::MAX_MESSAGE_BYTES;

pub use conmon::{ConmonRunc, ExecProcess};
pub use timed::Timed;

use crate::error::RuntimeError;

/// ExecSync output kept per stream; more is read and dropped, and a note at the end
/// of stderr says how much. Both streams and the note fit one CRI message
/// ([`MAX_MESSAGE_BYTES`], which the gateway and the kubelet take at most), with
/// room to spare for its framing.
pub const MAX_EXEC_OUTPUT: usize = MAX_MESSAGE_BYTES / 2 - 64 * 1024;

/// What the runtime needs to create one container.
pub struct Launch<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub bundle: &'a Path,
    pub runtime: &'a Path,
    pub log_path: &'a Path,
    /// CRI `stdin`: conmon keeps a pipe to the container's stdin for Attach.
    pub stdin: bool,
    /// CRI `stdin_once`: the first attach that ends closes that stdin.
    pub stdin_once: bool,
    /// CRI `tty`: conmon allocates the terminal (the spec sets process.terminal).
    pub tty: bool,
}

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    /// Nanoseconds since the epoch.
    pub finished_at: i64,
    pub oom_killed: bool,
}

/// What ExecSync collected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

#[tonic::async_trait]
pub trait OciRuntime: Send + Sync {
    /// Creates the container (not started) and returns its init process's pid.
    async fn create(&self, launch: &Launch<'_>) -> Result<u32, RuntimeError>;
    /// Lets the created container's process run its command.
    async fn start(&self, runtime: &Path, id: &str, pid: u32) -> Result<(), RuntimeError>;
    /// Applies new cgroup limits (OCI `LinuxResources` as JSON).
    async fn update(
        &self,
        runtime: &Path,
        id: &str,
        resources_json: &[u8],
    ) -> Result<(), RuntimeError>;
    /// Sends a signal (`TERM`, `KILL`); a container already gone is not an error.
    async fn kill(&self, runtime: &Path, id: &str, signal: &str) -> Result<(), RuntimeError>;
    /// Forgets the container (its runtime state and cgroup); absent is fine.
    async fn delete(&self, runtime: &Path, id: &str) -> Result<(), RuntimeError>;
    /// How the container's process ended, once it has.
    fn exit(&self, id: &str, bundle: &Path) -> Option<Exit>;
    /// The containers whose process has ended, in one look (lists ask this once
    /// instead of asking [`OciRuntime::exit`] for every container).
    fn exited(&self) -> HashSet<String>;
    /// Drops the record of the exit, with the container.
    fn forget_exit(&self, id: &str);
    /// At start: drops what this layer keeps for containers no record knows (conmon's
    /// attach links of containers removed while, or before, it was down).
    fn forget_others(&self, known: &HashSet<String>);
    /// Runs a command in the container and collects its output (see [`MAX_EXEC_OUTPUT`]).
    async fn exec_sync(
        &self,
        runtime: &Path,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, RuntimeError>;
    /// Makes the container's log writer reopen its file (the kubelet rotated it).
    async fn reopen_log(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError>;
}
