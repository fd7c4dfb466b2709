//! The OCI runtime layer's real implementation: containers under conmon and an OCI
//! runtime (runc by default).
//!
//! conmon runs `<runtime> create`, reports the container's pid on a sync pipe, then
//! stays as the container's parent: it writes the CRI log and, when the container
//! exits, its exit code to `<exits>/<id>`. It outlives a restart of this service.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tracing::Instrument;

use tokio::process::Command;
use trellis_common::text::excerpt;

use super::runtime_log::failure_message;
use super::{ExecOutput, Exit, Launch, MAX_EXEC_OUTPUT, OciRuntime};
use crate::error::RuntimeError;

const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a start waiting on the exec fifo checks that the init process lives.
const INIT_CHECK: Duration = Duration::from_millis(100);
#[derive(Debug, Clone)]
pub struct ConmonRunc {
    conmon: PathBuf,
    root: PathBuf,
}

/// The part of runc's `state.json` read here.
#[derive(serde::Deserialize)]
struct RuncState {
    #[serde(default)]
    init_process_pid: u32,
}

#[derive(serde::Deserialize)]
struct SyncMessage {
    data: i64,
    #[serde(default)]
    message: String,
}

impl ConmonRunc {
    pub fn new(conmon: PathBuf, root: PathBuf) -> Self {
        Self { conmon, root }
    }

    fn runc_root(&self) -> PathBuf {
        self.root.join("runc")
    }

    pub fn exits_dir(&self) -> PathBuf {
        self.root.join("exits")
    }

    /// conmon's `--socket-dir-path`: a link per container to its bundle, where the
    /// attach socket is. conmon leaves it behind; the container's removal takes it.
    fn attach_dir(&self) -> PathBuf {
        self.root.join("attach")
    }

    fn exit_file(&self, id: &str) -> PathBuf {
        self.exits_dir().join(id)
    }

    /// The runtime's record of a container; runc removes it at `delete`.
    fn state_file(&self, id: &str) -> PathBuf {
        self.runc_root().join(id).join("state.json")
    }

    /// The container's init process has ended (or the runtime no longer knows it).
    fn has_ended(&self, id: &str) -> bool {
        let pid = std::fs::read(self.state_file(id))
            .ok()
            .and_then(|raw| serde_json::from_slice::<RuncState>(&raw).ok())
            .map(|state| state.init_process_pid);
        match pid {
            Some(pid) if pid > 0 => !process_is_alive(pid),
            _ => true,
        }
    }

    async fn runtime_command(&self, runtime: &Path, args: &[&str]) -> Result<(), RuntimeError> {
        self.runtime_command_with_input(runtime, args, None).await
    }

    /// Runs the OCI runtime with `--root`, handing it `input` on stdin when given.
    async fn runtime_command_with_input(
        &self,
        runtime: &Path,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<(), RuntimeError> {
        use tokio::io::AsyncWriteExt;
        let mut child = Command::new(runtime)
            .env_remove(trellis_common::notify::ENV)
            .arg("--root")
            .arg(self.runc_root())
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| {
                RuntimeError::io(format!("cannot run {}", runtime.display()), source)
            })?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input).await.map_err(|source| {
                RuntimeError::io(
                    format!("cannot write to {} {}", runtime.display(), args.join(" ")),
                    source,
                )
            })?;
        }
        let output = child.wait_with_output().await.map_err(|source| {
            RuntimeError::io(format!("cannot wait for {}", runtime.display()), source)
        })?;
        if output.status.success() {
            return Ok(());
        }
        Err(RuntimeError::Oci(format!(
            "{} {}: {}",
            runtime.display(),
            args.join(" "),
            failure_message(&String::from_utf8_lossy(&output.stderr))
        )))
    }

    /// Starts `cmd` in container `id` with `<runtime> exec`; `flags` go before the id
    /// (`--tty`), `stdio` sets the child's stdio.
    pub fn spawn_exec(
        &self,
        runtime: &Path,
        id: &str,
        cmd: &[String],
        flags: &[&str],
        stdio: impl FnOnce(&mut Command) -> Result<(), RuntimeError>,
    ) -> Result<ExecProcess, RuntimeError> {
        let pid_file = self
            .exits_dir()
            .join(format!("exec-{}", crate::ids::new_id()?));
        let mut command = Command::new(runtime);
        command
            .env_remove(trellis_common::notify::ENV)
            .arg("--root")
            .arg(self.runc_root())
            .arg("exec")
            .arg("--pid-file")
            .arg(&pid_file)
            .args(flags)
            .arg(id)
            .args(cmd)
            .kill_on_drop(true);
        stdio(&mut command)?;
        let child = command.spawn().map_err(|source| {
            RuntimeError::io(format!("cannot run {}", runtime.display()), source)
        })?;
        Ok(ExecProcess { child, pid_file })
    }
}

#[tonic::async_trait]
impl OciRuntime for ConmonRunc {
    /// Creates the container (not started) and returns its pid.
    async fn create(&self, launch: &Launch<'_>) -> Result<u32, RuntimeError> {
        for dir in [self.exits_dir(), self.runc_root(), self.attach_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| {
                RuntimeError::io(format!("cannot create {}", dir.display()), source)
            })?;
        }
        let (sync_read, sync_write): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| RuntimeError::system("cannot create conmon's sync pipe", e))?;
        let conmon_log = std::fs::File::create(launch.bundle.join("conmon.log"))
            .map_err(|source| RuntimeError::io("cannot create conmon.log", source))?;
        let mut command = Command::new(&self.conmon);
        command
            // Our starter's readiness socket is not the container's (see `notify`).
            .env_remove(trellis_common::notify::ENV)
            .args([
                "--api-version",
                "1",
                "--cid",
                launch.id,
                "--cuuid",
                launch.id,
                "--name",
                launch.name,
            ])
            .arg("--runtime")
            .arg(launch.runtime)
            .arg("--bundle")
            .arg(launch.bundle)
            .arg("--container-pidfile")
            .arg(launch.bundle.join("pidfile"))
            .arg("--conmon-pidfile")
            .arg(launch.bundle.join("conmon.pid"))
            .arg("--log-path")
            .arg(format!("k8s-file:{}", launch.log_path.display()))
            .arg("--exit-dir")
            .arg(self.exits_dir())
            .arg("--socket-dir-path")
            .arg(self.attach_dir())
            .arg("--persist-dir")
            .arg(launch.bundle)
            .arg("--runtime-arg")
            .arg(format!("--root={}", self.runc_root().display()))
            .args(["--log-level", "error", "--syslog"])
            .args(launch.tty.then_some("--terminal"))
            .args(launch.stdin.then_some("--stdin"))
            .args((launch.stdin && !launch.stdin_once).then_some("--leave-stdin-open"))
            .env("_OCI_SYNCPIPE", sync_write.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(conmon_log)
            // conmon writes some files (the `oom` marker) relative to where it runs.
            .current_dir(launch.bundle)
            .process_group(0);
        crate::inherit_fd::keep_open_in_child(&mut command, sync_write.as_raw_fd());
        let spawn = trellis_common::step_span!("conmon.spawn");
        let mut child = spawn.in_scope(|| command.spawn()).map_err(|source| {
            RuntimeError::io(format!("cannot start {}", self.conmon.display()), source)
        })?;
        drop(sync_write);
        // conmon forks its monitor and the first process exits: reap it.
        let _ = child.wait().instrument(spawn).await;

        // conmon keeps the pipe open after reporting, so read its first message only.
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let mut lines = std::io::BufReader::new(std::fs::File::from(sync_read));
            let mut text = String::new();
            while text.trim().is_empty() {
                if std::io::BufRead::read_line(&mut lines, &mut text)? == 0 {
                    break;
                }
            }
            Ok(text)
        });
        // conmon runs `runc create` and reports the container's pid, or why not.
        let text = tokio::time::timeout(CREATE_TIMEOUT, reader)
            .instrument(trellis_common::step_span!("conmon.report"))
            .await
            .map_err(|_| RuntimeError::Timeout {
                what: format!("creating container {}", launch.id),
                seconds: CREATE_TIMEOUT.as_secs(),
            })?
            .map_err(|e| RuntimeError::Oci(format!("conmon reader stopped: {e}")))?
            .map_err(|source| RuntimeError::io("cannot read conmon's sync pipe", source))?;
        let message = text
            .lines()
            .filter_map(|line| serde_json::from_str::<SyncMessage>(line).ok())
            .next()
            .ok_or_else(|| {
                RuntimeError::Oci(format!(
                    "conmon said nothing about container {} ({})",
                    launch.id,
                    conmon_diagnostics(launch.bundle)
                ))
            })?;
        if message.data <= 0 {
            let reason = failure_message(&message.message);
            let error = format!("creating container {}: {reason}", launch.id);
            // A command the image cannot run (missing, not executable) is the
            // caller's to fix, not a fault of this service: not Internal.
            return Err(
                if reason.contains("unable to start container process: exec: ") {
                    RuntimeError::FailedPrecondition(error)
                } else {
                    RuntimeError::Oci(error)
                },
            );
        }
        Ok(message.data as u32)
    }

    /// Starts a created container. runc's `start` only opens the container's exec fifo,
    /// on which the waiting init process then writes one byte and execs the workload,
    /// and removes the fifo; doing that here spares starting the runtime's binary
    /// (about 8 ms). Without a fifo (another runtime, or a container that is not in
    /// the created state) the runtime's own `start` runs and says what is wrong.
    async fn start(&self, runtime: &Path, id: &str, pid: u32) -> Result<(), RuntimeError> {
        let fifo = self.runc_root().join(id).join("exec.fifo");
        match start_through_exec_fifo(&fifo, pid).await {
            Ok(true) => Ok(()),
            Ok(false) => match self.runtime_command(runtime, &["start", id]).await {
                // runc's words for a container started before (the fifo is gone). One
                // that "has stopped" may never have started (its process died first):
                // that stays an error.
                Err(RuntimeError::Oci(message))
                    if message.contains("cannot start an already running container") =>
                {
                    Err(RuntimeError::AlreadyStarted(id.to_string()))
                }
                other => other,
            },
            Err(source) => Err(RuntimeError::io(
                format!("cannot start container {id} through {}", fifo.display()),
                source,
            )),
        }
    }

    /// Applies new cgroup limits (OCI `LinuxResources` as JSON) to a container.
    async fn update(
        &self,
        runtime: &Path,
        id: &str,
        resources_json: &[u8],
    ) -> Result<(), RuntimeError> {
        self.runtime_command_with_input(
            runtime,
            &["update", "--resources", "-", id],
            Some(resources_json),
        )
        .await
    }

    /// Sends a signal; a container whose process has ended, or that the runtime no
    /// longer knows, is not an error: that is decided from the runtime's state after
    /// a failure, never from the wording of its message.
    async fn kill(&self, runtime: &Path, id: &str, signal: &str) -> Result<(), RuntimeError> {
        match self.runtime_command(runtime, &["kill", id, signal]).await {
            Err(_) if self.has_ended(id) => Ok(()),
            other => other,
        }
    }

    /// Deletes the runtime's state (and cgroup) of a container, and conmon's attach
    /// link; absent is fine.
    async fn delete(&self, runtime: &Path, id: &str) -> Result<(), RuntimeError> {
        match self
            .runtime_command(runtime, &["delete", "--force", id])
            .await
        {
            Err(_) if !self.state_file(id).exists() => {}
            other => other?,
        }
        let link = self.attach_dir().join(id);
        match std::fs::remove_file(&link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RuntimeError::io(
                format!("cannot remove {}", link.display()),
                source,
            )),
        }
    }

    /// The exit conmon recorded in its exit file (written when the container's
    /// process ended), with the file's time and conmon's `oom` marker in the bundle.
    fn exit(&self, id: &str, bundle: &Path) -> Option<Exit> {
        // One open: the code from the file, the time from the same descriptor.
        let mut file = std::fs::File::open(self.exit_file(id)).ok()?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).ok()?;
        let code = text.trim().parse().ok()?;
        let finished_at = file
            .metadata()
            .ok()?
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos() as i64;
        Some(Exit {
            code,
            finished_at,
            oom_killed: bundle.join("oom").exists(),
        })
    }

    fn exited(&self) -> std::collections::HashSet<String> {
        std::fs::read_dir(self.exits_dir())
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect()
    }

    fn forget_exit(&self, id: &str) {
        let _ = std::fs::remove_file(self.exit_file(id));
    }

    fn forget_others(&self, known: &std::collections::HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.attach_dir()) else {
            return;
        };
        let mut removed = 0usize;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            if name.to_str().is_some_and(|id| known.contains(id)) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(error) => {
                    tracing::warn!(path = %entry.path().display(), %error, "cannot remove a stale attach link")
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "stale attach links of removed containers swept");
        }
    }

    /// Runs a command in the container and collects its output and exit code. On
    /// timeout the command is killed inside the container first, so that `runc exec`,
    /// its parent, reaps it (killing `runc exec` first would leave a zombie behind).
    async fn exec_sync(
        &self,
        runtime: &Path,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, RuntimeError> {
        let mut exec = self.spawn_exec(runtime, id, cmd, &[], |command| {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            Ok(())
        })?;
        let (stdout, stderr) = (exec.child.stdout.take(), exec.child.stderr.take());
        let output = tokio::spawn(async move {
            tokio::join!(
                read_capped(stdout, MAX_EXEC_OUTPUT),
                read_capped(stderr, MAX_EXEC_OUTPUT)
            )
        });
        let limit = timeout.filter(|t| !t.is_zero()).unwrap_or(Duration::MAX);
        tokio::select! {
            status = exec.child.wait() => {
                let status = status.map_err(|source| RuntimeError::io("cannot wait for exec", source))?;
                let (out, err) = output.await.map_err(|e| RuntimeError::Oci(format!("exec output reader stopped: {e}")))?;
                let (stdout, mut stderr) = (out.kept, err.kept);
                if let Some(note) = cut_note(out.total, err.total) {
                    stderr.extend_from_slice(note.as_bytes());
                }
                Ok(ExecOutput { stdout, stderr, exit_code: status.code().unwrap_or(-1) })
            }
            _ = tokio::time::sleep(limit) => {
                exec.kill_command().await;
                Err(RuntimeError::Timeout { what: format!("ExecSync `{}` in container {id}", excerpt(&cmd.join(" "))), seconds: limit.as_secs() })
            }
        }
    }

    /// Asks conmon to reopen the log file (after the kubelet rotated it), through the
    /// control fifo conmon keeps in the bundle ("2" is its reopen-logs event).
    async fn reopen_log(&self, id: &str, bundle: &Path) -> Result<(), RuntimeError> {
        let control = bundle.join("ctl");
        let write = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut fifo = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&control)?;
            fifo.write_all(b"2 0 0\n")
        });
        write
            .await
            .map_err(|e| RuntimeError::Oci(format!("log reopen stopped: {e}")))?
            .map_err(|source| {
                RuntimeError::io(
                    format!("cannot ask conmon of container {id} to reopen its log"),
                    source,
                )
            })
    }
}

/// Reads the init process's byte from `fifo`; false when there is no fifo to read or
/// the init process ended before it wrote. Opening the read end without blocking lets
/// the wait watch the init process: a writer that never comes would block a plain open.
async fn start_through_exec_fifo(fifo: &Path, pid: u32) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut receiver = match tokio::net::unix::pipe::OpenOptions::new().open_receiver(fifo) {
        Ok(receiver) => receiver,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(INIT_CHECK, receiver.readable()).await {
            Ok(ready) => {
                ready?;
                match receiver.try_read(&mut byte) {
                    Ok(0) => return Ok(false),
                    Ok(_) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(error) => return Err(error),
                }
            }
            Err(_) if !process_is_alive(pid) => return Ok(false),
            Err(_) => {}
        }
    }
    // The init process closes its end when it execs the workload.
    let _ = tokio::time::timeout(INIT_CHECK, receiver.read(&mut byte)).await;
    // runc reports a container whose fifo is gone as running.
    match std::fs::remove_file(fifo) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(true),
    }
}

/// Alive and not a zombie.
fn process_is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|state| state != "Z"))
        })
        .unwrap_or(false)
}

fn conmon_diagnostics(bundle: &Path) -> String {
    std::fs::read_to_string(bundle.join("conmon.log"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

mod exec;
#[cfg(test)]
mod tests;

pub use exec::ExecProcess;
use exec::{cut_note, read_capped};
