//! Containers: CreateContainer, StartContainer, StopContainer, RemoveContainer,
//! ExecSync, ReopenContainerLog, and the reading of exits.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use k8s_cri::v1::*;
use trellis_common::failpoint;
use trellis_common::text::{excerpt, excerpt_path};
use trellis_proto::events::v1::{ContainerEvent, container_event, event::Payload};

use super::Runtime;
use crate::error::RuntimeError;
use crate::oci::{ExecOutput, Launch};
use crate::spec::{SpecInput, build};
use crate::store::{
    ContainerRecord, ContainerState, SandboxRecord, SandboxState, container_config_digest, new_id,
    now_nanos,
};

const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often a stop looks for conmon's exit file: a stat, so cheap; it bounds stop latency.
const EXIT_POLL: Duration = Duration::from_millis(2);

fn container_event(kind: container_event::Kind, record: &ContainerRecord) -> Payload {
    Payload::Container(ContainerEvent {
        kind: kind.into(),
        container_id: record.id.clone(),
        sandbox_id: record.sandbox_id.clone(),
        exit_code: record.exit_code,
    })
}

/// The log file: the pod's log directory joined with the container's relative path,
/// which may not climb out of it.
fn log_path(log_directory: &str, relative: &str, bundle: &Path) -> Result<PathBuf, RuntimeError> {
    if log_directory.is_empty() || relative.is_empty() {
        return Ok(bundle.join("container.log"));
    }
    let relative_path = Path::new(relative);
    if relative_path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(RuntimeError::InvalidArgument(format!(
            "ContainerConfig.log_path `{}` must be relative to the pod's log directory, without `..`",
            excerpt(relative)
        )));
    }
    Ok(Path::new(log_directory).join(relative_path))
}

impl Runtime {
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, RuntimeError> {
        let sandbox = self.sandbox(sandbox_id)?;
        let _pod = self.lock(&sandbox.id).await;
        // Read again under the pod's lock: a stop may have come first.
        let sandbox = self.sandbox(&sandbox.id)?;
        if sandbox.state() != SandboxState::Ready {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {} is not ready (stopped, being set up, or its failed set-up being rolled back): no new containers",
                sandbox.id
            )));
        }
        self.create_in_pod(&sandbox, config, false).await
    }

    /// Creates a container in a pod the caller holds the lock of; `infra` marks the
    /// pod's own pause process. Everything that is the pod's (namespaces, cgroup
    /// parent, privileges, sysctls, log directory, hostname) comes from the pod's own
    /// record: CreateContainer's copy of the pod config is the caller's word only.
    pub async fn create_in_pod(
        &self,
        sandbox: &SandboxRecord,
        config: ContainerConfig,
        infra: bool,
    ) -> Result<String, RuntimeError> {
        let sandbox_config = sandbox.config();
        let metadata = config.metadata.clone().ok_or_else(|| {
            RuntimeError::InvalidArgument("ContainerConfig.metadata is missing".into())
        })?;
        crate::validate::container_name(&metadata.name)?;
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                RuntimeError::InvalidArgument("ContainerConfig.image is empty".into())
            })?;
        let id = new_id()?;
        let bundle = self.bundle_dir(&id);
        let log = log_path(&sandbox_config.log_directory, &config.log_path, &bundle)?;
        let oci_runtime = self.oci_runtime(&sandbox.runtime_handler)?;
        let config_digest = container_config_digest(&config);
        // Creations in a pod hold its lock, so a repeat sees the first one's outcome.
        if let Some(earlier) = self.earlier_container(
            &sandbox.id,
            &metadata.name,
            metadata.attempt,
            &config_digest,
        )? {
            return Ok(earlier);
        }
        self.free_container_name(&sandbox.id, &metadata.name, metadata.attempt)
            .await?;
        // The store claims the name (and attempt) in the pod with the record.
        let record = self.store.insert_container(ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            state: ContainerState::Creating as i32,
            config: Some(config.clone()),
            image_ref: image.clone(),
            log_path: log.display().to_string(),
            created_at: now_nanos(),
            oci_runtime: oci_runtime.display().to_string(),
            infra,
            config_digest,
            ..Default::default()
        })?;
        let place = Placement {
            sandbox_config,
            netns_path: &sandbox.netns_path,
            image: &image,
            bundle: &bundle,
            log: &log,
        };
        let create = async {
            let created = self.create_in_runtime(&record, &config, &place).await?;
            failpoint::hit_async("runtime.container.before-record").await?;
            self.store.containers.update(&id, |record| {
                record.image_id = created.image_id;
                record.stop_signal = created.stop_signal;
                record.cgroup_path = created.cgroup_path;
                record.pid = created.pid;
                record.set_state(ContainerState::Created);
                Ok(())
            })
        };
        match create.await {
            Ok((record, ())) => {
                self.publish(container_event(container_event::Kind::Created, &record));
                // Done but not answered: a kill here leaves a caller to retry.
                failpoint::hit_async("runtime.container.after-record").await?;
                Ok(id)
            }
            Err(error) => {
                tracing::debug!(container = %id, %error, "CreateContainer failed; rolling back");
                self.mark_container_rolling_back(&id, &error.to_string());
                // A clean-up that cannot finish now is retried in the background.
                let _ = self.roll_back_container(&id).await;
                Err(error)
            }
        }
    }

    async fn create_in_runtime(
        &self,
        record: &ContainerRecord,
        config: &ContainerConfig,
        place: &Placement<'_>,
    ) -> Result<Created, RuntimeError> {
        let Placement {
            sandbox_config,
            netns_path,
            image,
            bundle,
            log,
        } = *place;
        let not_present = || {
            RuntimeError::NotFound(format!(
                "image {} is not present: pull it first",
                excerpt(image)
            ))
        };
        // Storage resolves the reference for both calls, so they go out together.
        let storage = &self.backends.storage;
        let (stored, prepared) = tokio::join!(
            storage.image(image),
            storage.prepare_rootfs(&record.id, image)
        );
        let prepared = prepared?.ok_or_else(not_present)?;
        let mut stored = stored?.ok_or_else(not_present)?;
        if stored.id != prepared.image_id {
            // The tag moved between the two answers: the root filesystem's image wins.
            stored = storage
                .image(&prepared.image_id)
                .await?
                .ok_or_else(not_present)?;
        }
        let image_config = stored.config.clone().unwrap_or_default();
        let rootfs = PathBuf::from(prepared.mount_path);
        failpoint::hit_async("runtime.container.after-rootfs").await?;
        let spec_step = trellis_common::step_span!("spec.build");
        let spec_entered = spec_step.enter();
        let security = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        let user = crate::spec::user::resolve(&rootfs, &image_config.user, security)?;
        let pid_namespace = self.pod_pid_namespace(&record.sandbox_id, record.infra)?;
        let node_hostname = super::node_hostname()?;
        let spec = build(&SpecInput {
            container_id: &record.id,
            container: config,
            sandbox: sandbox_config,
            pod_dir: &self.pod_dir(&record.sandbox_id),
            netns_path,
            image: &image_config,
            rootfs: &rootfs,
            user,
            oom_score_floor: self.oom_score_floor,
            pid_namespace,
            node_hostname: &node_hostname,
        })?;
        let cgroup_path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        std::fs::create_dir_all(bundle).map_err(|source| {
            RuntimeError::io(format!("cannot create {}", bundle.display()), source)
        })?;
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent).map_err(|source| {
                RuntimeError::io(
                    format!("cannot create log directory {}", excerpt_path(parent)),
                    source,
                )
            })?;
        }
        spec.save(bundle.join("config.json")).map_err(|e| {
            RuntimeError::Oci(format!(
                "cannot write {}/config.json: {e}",
                bundle.display()
            ))
        })?;
        drop(spec_entered);
        failpoint::hit_async("runtime.container.after-bundle").await?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default();
        let runtime = PathBuf::from(&record.oci_runtime);
        let launch = Launch {
            id: &record.id,
            name,
            bundle,
            runtime: &runtime,
            log_path: log,
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
        };
        // Creations beyond the slots wait here (`runtime.max_parallel_creates`).
        let _turn = self
            .create_slots
            .acquire()
            .instrument(trellis_common::step_span!("create.queue"))
            .await
            .map_err(|_| RuntimeError::Oci("the runtime service is stopping".into()))?;
        let pid = self.oci.create(&launch).await?;
        failpoint::hit_async("runtime.container.after-create").await?;
        Ok(Created {
            image_id: stored.id,
            stop_signal: image_config.stop_signal,
            cgroup_path,
            pid,
        })
    }

    /// Everything a container holds, released; each step tolerates what is gone.
    pub(super) async fn destroy(&self, record: &ContainerRecord) -> Result<(), RuntimeError> {
        let runtime = PathBuf::from(&record.oci_runtime);
        self.oci.kill(&runtime, &record.id, "KILL").await?;
        self.oci.delete(&runtime, &record.id).await?;
        self.backends.storage.release_rootfs(&record.id).await?;
        let bundle = self.bundle_dir(&record.id);
        match std::fs::remove_dir_all(&bundle) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RuntimeError::io(
                    format!("cannot remove {}", bundle.display()),
                    source,
                ));
            }
        }
        self.oci.forget_exit(&record.id);
        Ok(())
    }

    /// The record, with an exit the OCI runtime reported since it was last written.
    /// Callers race (status polls, event statuses, lists): the store's update sees
    /// the latest version, so an exit is recorded, and announced, once.
    pub(super) fn refresh(
        &self,
        record: Arc<ContainerRecord>,
    ) -> Result<Arc<ContainerRecord>, RuntimeError> {
        if !record.is_live() {
            return Ok(record);
        }
        let Some(exit) = self.oci.exit(&record.id, &self.bundle_dir(&record.id)) else {
            return Ok(record);
        };
        let updated = self.store.containers.update(&record.id, |record| {
            if !record.is_live() {
                return Ok(false);
            }
            record.set_state(ContainerState::Exited);
            record.exit_code = exit.code;
            record.finished_at = exit.finished_at;
            record.reason = exit_reason(&exit).into();
            Ok(true)
        });
        match updated {
            Ok((record, exited_now)) => {
                if exited_now {
                    self.metrics.exited(exit_reason(&exit));
                    self.publish(container_event(container_event::Kind::Stopped, &record));
                }
                Ok(record)
            }
            // Removed meanwhile: what the caller had is all there is.
            Err(RuntimeError::NotFound(_)) => Ok(record),
            Err(error) => Err(error),
        }
    }

    /// The pause process's PID namespace, for the containers of a pod that shares one.
    fn pod_pid_namespace(
        &self,
        sandbox_id: &str,
        is_pause: bool,
    ) -> Result<Option<PathBuf>, RuntimeError> {
        if is_pause {
            return Ok(None);
        }
        let Some(sandbox) = self.store.sandboxes.get(sandbox_id) else {
            return Ok(None);
        };
        if sandbox.pause_container_id.is_empty() {
            return Ok(None);
        }
        let pause = self
            .store
            .containers
            .get(&sandbox.pause_container_id)
            .ok_or_else(|| {
                RuntimeError::FailedPrecondition(format!(
                    "the pause process of pod {sandbox_id} is gone"
                ))
            })?;
        Ok(Some(PathBuf::from(format!("/proc/{}/ns/pid", pause.pid))))
    }

    pub async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let record = self.container(id)?;
        self.start_record(&record.id).await
    }

    pub(super) async fn start_record(&self, id: &str) -> Result<(), RuntimeError> {
        let _guard = self.lock(id).await;
        let record = self.store.containers.resolve(id)?;
        let not_created = || {
            RuntimeError::FailedPrecondition(format!("container {id} is not in the created state"))
        };
        match record.state() {
            ContainerState::Created => {}
            // A repeat of a start that completed (its caller lost the answer to a
            // kill of the gateway): answered as the start was, like a repeated
            // creation (`repeat.rs`). containerd and CRI-O refuse it.
            ContainerState::Running if record.started_at > 0 => {
                tracing::info!(container = %id, "StartContainer repeated: the container runs");
                return Ok(());
            }
            _ => return Err(not_created()),
        }
        match self
            .oci
            .start(Self::runtime_binary(&record), &record.id, record.pid)
            .await
        {
            Ok(()) => {}
            // An earlier process of this service started it and was killed before it
            // could record that: the start is done, only the record is behind.
            Err(RuntimeError::AlreadyStarted(_)) => {
                tracing::info!(container = %id, "started already by an earlier process of this service; recording it");
            }
            Err(error) => return Err(error),
        }
        let (record, ()) = self.store.containers.update(id, |record| {
            // An exit seen meanwhile (a command that ends at once) stays recorded.
            if record.state() == ContainerState::Created {
                record.set_state(ContainerState::Running);
                record.started_at = now_nanos();
            }
            Ok(())
        })?;
        self.publish(container_event(container_event::Kind::Started, &record));
        Ok(())
    }

    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), RuntimeError> {
        let record = self.container(id)?;
        self.stop_container_now(&record.id, timeout).await
    }

    /// The stop signal, then SIGKILL once `timeout` seconds have passed.
    pub(super) async fn stop_container_now(
        &self,
        id: &str,
        timeout: i64,
    ) -> Result<(), RuntimeError> {
        let _guard = self.lock(id).await;
        let Some(record) = self.store.containers.get(id) else {
            return Ok(());
        };
        let record = self.refresh(record)?;
        if record.state() != ContainerState::Running {
            return Ok(());
        }
        let runtime = Self::runtime_binary(&record);
        let stopping = Instant::now();
        if timeout > 0 {
            let signal = if record.stop_signal.is_empty() {
                "TERM".to_string()
            } else {
                record.stop_signal.trim_start_matches("SIG").to_string()
            };
            self.oci.kill(runtime, id, &signal).await?;
            if self
                .wait_exit(id, Duration::from_secs(timeout as u64))
                .await
            {
                self.metrics.stopped(stopping.elapsed());
                self.refresh(record)?;
                return Ok(());
            }
        }
        self.oci.kill(runtime, id, "KILL").await?;
        if !self.wait_exit(id, KILL_WAIT).await {
            return Err(RuntimeError::Timeout {
                what: format!("container {id} to exit after SIGKILL"),
                seconds: KILL_WAIT.as_secs(),
            });
        }
        self.metrics.stopped(stopping.elapsed());
        self.refresh(record)?;
        Ok(())
    }

    async fn wait_exit(&self, id: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.oci.exit(id, &self.bundle_dir(id)).is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        match self.store.containers.resolve(id) {
            Ok(record) => self.remove_container_now(&record.id).await,
            Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    pub(super) async fn remove_container_now(&self, id: &str) -> Result<(), RuntimeError> {
        self.stop_container_now(id, 0).await?;
        let _guard = self.lock(id).await;
        let Some(record) = self.store.containers.get(id) else {
            return Ok(());
        };
        if record.state() == ContainerState::RollingBack {
            // Never announced: its removal finishes the clean-up, and says why not yet.
            let outcome = async {
                self.destroy(&record).await?;
                self.store.remove_container(id)
            };
            let outcome = outcome.await;
            return self.count_attempt(id, "container", outcome).map_err(|source| {
                RuntimeError::Unfinished {
                    what: format!(
                        "container {id}: the clean-up of its failed creation is not finished (retried in the background)"
                    ),
                    source: Box::new(source),
                }
            });
        }
        self.destroy(&record).await?;
        self.store.remove_container(id)?;
        self.publish(container_event(container_event::Kind::Deleted, &record));
        Ok(())
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<ExecSyncResponse, RuntimeError> {
        let record = self.running(id)?;
        if cmd.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "ExecSync needs a command".into(),
            ));
        }
        let limit = (timeout > 0).then(|| Duration::from_secs(timeout as u64));
        let ExecOutput {
            stdout,
            stderr,
            exit_code,
        } = self
            .oci
            .exec_sync(Self::runtime_binary(&record), &record.id, &cmd, limit)
            .await?;
        Ok(ExecSyncResponse {
            stdout,
            stderr,
            exit_code,
        })
    }

    /// A container the kubelet sees, which must be running.
    pub fn running(&self, id: &str) -> Result<Arc<ContainerRecord>, RuntimeError> {
        let record = self.container(id)?;
        if record.state() != ContainerState::Running {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        Ok(record)
    }

    /// Asks the container's log writer to reopen the log file (after the kubelet
    /// rotated it), and answers once the new file exists.
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), RuntimeError> {
        let record = self.running(id)?;
        self.oci
            .reopen_log(&record.id, &self.bundle_dir(&record.id))
            .await?;
        let log = PathBuf::from(&record.log_path);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log.exists() && Instant::now() < deadline {
            tokio::time::sleep(EXIT_POLL).await;
        }
        Ok(())
    }
}

/// Where a new container goes: its pod's config and network, its image, bundle and log.
#[derive(Clone, Copy)]
struct Placement<'a> {
    sandbox_config: &'a PodSandboxConfig,
    netns_path: &'a str,
    image: &'a str,
    bundle: &'a Path,
    log: &'a Path,
}

/// What creating the container in the OCI runtime found out.
struct Created {
    image_id: String,
    stop_signal: String,
    cgroup_path: String,
    pid: u32,
}

/// The CRI's reason for an exit (one of `metrics::EXIT_REASONS`).
fn exit_reason(exit: &crate::oci::Exit) -> &'static str {
    if exit.oom_killed {
        "OOMKilled"
    } else if exit.code == 0 {
        "Completed"
    } else {
        "Error"
    }
}
