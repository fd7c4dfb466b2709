//! An OCI runtime in memory, for unit tests of the lifecycle: containers are entries
//! in a map, a signal ends them at once (unless told to ignore SIGTERM), and any
//! operation can be made to fail to exercise the rollbacks.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::{ExecOutput, Exit, Launch, OciRuntime};
use crate::error::RuntimeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeState {
    Created,
    Running,
    Stopped,
}

#[derive(Default)]
struct Inner {
    containers: HashMap<String, FakeState>,
    exits: HashMap<String, Exit>,
    failing: HashSet<&'static str>,
    ignore_term: bool,
    next_pid: u32,
    calls: Vec<String>,
}

#[derive(Default)]
pub struct FakeOci {
    inner: Mutex<Inner>,
}

impl FakeOci {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes every later call of `operation` (`create`, `start`, `kill`, `delete` …) fail.
    pub fn fail(&self, operation: &'static str) {
        self.inner().failing.insert(operation);
    }

    pub fn heal(&self, operation: &'static str) {
        self.inner().failing.remove(operation);
    }

    /// Containers keep running after SIGTERM, so a stop has to escalate.
    pub fn ignore_term(&self) {
        self.inner().ignore_term = true;
    }

    /// The container's process ends by itself.
    pub fn exit_by_itself(&self, id: &str, code: i32, oom_killed: bool) {
        let mut inner = self.inner();
        inner.containers.insert(id.to_string(), FakeState::Stopped);
        inner.exits.insert(
            id.to_string(),
            Exit {
                code,
                finished_at: crate::ids::now_nanos(),
                oom_killed,
            },
        );
    }

    pub fn state(&self, id: &str) -> Option<FakeState> {
        self.inner().containers.get(id).copied()
    }

    /// Every container the runtime still knows.
    pub fn known(&self) -> Vec<String> {
        self.inner().containers.keys().cloned().collect()
    }

    /// `operation id` for each call, in order.
    pub fn calls(&self) -> Vec<String> {
        self.inner().calls.clone()
    }

    fn call(&self, operation: &'static str, id: &str) -> Result<(), RuntimeError> {
        let mut inner = self.inner();
        inner.calls.push(format!("{operation} {id}"));
        if inner.failing.contains(operation) {
            return Err(RuntimeError::Oci(format!(
                "fake runtime: {operation} {id} failed as told"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl OciRuntime for FakeOci {
    async fn create(&self, launch: &Launch<'_>) -> Result<u32, RuntimeError> {
        self.call("create", launch.id)?;
        let mut inner = self.inner();
        inner
            .containers
            .insert(launch.id.to_string(), FakeState::Created);
        inner.next_pid += 1;
        Ok(1000 + inner.next_pid)
    }

    async fn start(&self, _runtime: &Path, id: &str, _pid: u32) -> Result<(), RuntimeError> {
        self.call("start", id)?;
        let mut inner = self.inner();
        match inner.containers.get_mut(id) {
            Some(state @ FakeState::Created) => {
                *state = FakeState::Running;
                Ok(())
            }
            Some(FakeState::Running) => Err(RuntimeError::AlreadyStarted(id.to_string())),
            other => Err(RuntimeError::Oci(format!(
                "fake runtime: cannot start {id} in state {other:?}"
            ))),
        }
    }

    async fn update(&self, _runtime: &Path, id: &str, _json: &[u8]) -> Result<(), RuntimeError> {
        self.call("update", id)
    }

    async fn kill(&self, _runtime: &Path, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.call("kill", id)?;
        let mut inner = self.inner();
        let ignored = signal == "TERM" && inner.ignore_term;
        if !ignored
            && inner
                .containers
                .get(id)
                .is_some_and(|s| *s != FakeState::Stopped)
        {
            inner.containers.insert(id.to_string(), FakeState::Stopped);
            let code = if signal == "KILL" { 137 } else { 143 };
            inner.exits.insert(
                id.to_string(),
                Exit {
                    code,
                    finished_at: crate::ids::now_nanos(),
                    oom_killed: false,
                },
            );
        }
        Ok(())
    }

    async fn delete(&self, _runtime: &Path, id: &str) -> Result<(), RuntimeError> {
        self.call("delete", id)?;
        self.inner().containers.remove(id);
        Ok(())
    }

    fn exit(&self, id: &str, _bundle: &Path) -> Option<Exit> {
        self.inner().exits.get(id).copied()
    }

    fn exited(&self) -> HashSet<String> {
        self.inner().exits.keys().cloned().collect()
    }

    fn forget_exit(&self, id: &str) {
        self.inner().exits.remove(id);
    }

    fn forget_others(&self, known: &HashSet<String>) {
        self.inner()
            .calls
            .push(format!("forget_others {}", known.len()));
    }

    async fn exec_sync(
        &self,
        _runtime: &Path,
        id: &str,
        cmd: &[String],
        _timeout: Option<Duration>,
    ) -> Result<ExecOutput, RuntimeError> {
        self.call("exec", id)?;
        Ok(ExecOutput {
            stdout: cmd.join(" ").into_bytes(),
            stderr: Vec::new(),
            exit_code: 0,
        })
    }

    async fn reopen_log(&self, id: &str, _bundle: &Path) -> Result<(), RuntimeError> {
        self.call("reopen_log", id)
    }
}
