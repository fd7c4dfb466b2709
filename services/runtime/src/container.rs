//! Containers: CreateContainer, StartContainer, StopContainer, RemoveContainer,
//! ContainerStatus, ListContainers, ExecSync.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use prost::Message;
use trellis_common::telemetry::traced_request;
use trellis_common::text::{excerpt, excerpt_path};
use trellis_proto::events::v1::{ContainerEvent, container_event, event::Payload};
use trellis_proto::storage::v1 as storage;
use trellis_proto::storage::v1::storage_client::StorageClient;

use crate::error::RuntimeError;
use crate::oci::Launch;
use crate::records::{ContainerRecord, ContainerState, SandboxState, new_id, now_nanos};
use crate::runtime::Runtime;
use crate::sandbox::decode_config;
use crate::spec::{SpecInput, build};

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

pub fn decode(record: &ContainerRecord) -> Result<ContainerConfig, RuntimeError> {
    ContainerConfig::decode(record.config.as_slice()).map_err(RuntimeError::from)
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
    fn storage_client(&self) -> StorageClient<tonic::transport::Channel> {
        StorageClient::new(self.storage.clone())
    }

    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, RuntimeError> {
        let sandbox = self.resolve(&self.sandboxes, sandbox_id, "pod sandbox", |r| &r.id)?;
        let _pod = self.lock(&sandbox.id).await;
        if sandbox.state != SandboxState::Ready as i32 {
            return Err(RuntimeError::FailedPrecondition(format!(
                "pod sandbox {} is not ready (stopped or being set up): no new containers",
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
        sandbox: &crate::records::SandboxRecord,
        config: ContainerConfig,
        infra: bool,
    ) -> Result<String, RuntimeError> {
        let sandbox_config = decode_config(sandbox)?;
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
        for existing in self
            .containers
            .all()?
            .into_iter()
            .filter(|c| c.sandbox_id == sandbox.id)
        {
            let other = decode(&existing)?.metadata.unwrap_or_default();
            if other.name == metadata.name && other.attempt == metadata.attempt {
                return Err(RuntimeError::AlreadyExists(format!(
                    "container {} (attempt {}) already exists in pod {} as {}",
                    metadata.name, metadata.attempt, sandbox.id, existing.id
                )));
            }
        }
        let id = new_id()?;
        let bundle = self.bundle_dir(&id);
        let log = log_path(&sandbox_config.log_directory, &config.log_path, &bundle)?;
        let mut record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            state: ContainerState::Creating as i32,
            config: config.encode_to_vec(),
            image_ref: image.clone(),
            log_path: log.display().to_string(),
            created_at: now_nanos(),
            oci_runtime: self
                .oci_runtime(&sandbox.runtime_handler)?
                .display()
                .to_string(),
            infra,
            ..Default::default()
        };
        self.containers.put(&id, &record)?;
        match self
            .create_in_runtime(
                &mut record,
                &config,
                &sandbox_config,
                &sandbox.netns_path,
                &image,
                &bundle,
                &log,
            )
            .await
        {
            Ok(()) => {
                record.state = ContainerState::Created as i32;
                self.containers.put(&id, &record)?;
                self.publish(container_event(container_event::Kind::Created, &record));
                Ok(id)
            }
            Err(error) => {
                if let Err(cleanup) = self.destroy(&record).await {
                    tracing::error!(container = %id, %cleanup, "rolling back a failed CreateContainer did not finish");
                    return Err(error);
                }
                self.containers.delete(&id)?;
                Err(error)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in_runtime(
        &self,
        record: &mut ContainerRecord,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
        netns_path: &str,
        image: &str,
        bundle: &Path,
        log: &Path,
    ) -> Result<(), RuntimeError> {
        // Storage resolves the reference for both calls, so they go out together.
        let (mut images_client, mut rootfs_client) = (self.storage_client(), self.storage_client());
        let (stored, prepared) = tokio::join!(
            images_client.get_image(traced_request(storage::GetImageRequest {
                reference: image.to_string()
            })),
            rootfs_client.prepare_rootfs(traced_request(storage::PrepareRootfsRequest {
                container_id: record.id.clone(),
                image: image.to_string()
            })),
        );
        let not_present = |status: tonic::Status| {
            if status.code() == tonic::Code::NotFound {
                RuntimeError::NotFound(format!(
                    "image {} is not present: pull it first",
                    excerpt(image)
                ))
            } else {
                RuntimeError::storage(status)
            }
        };
        let prepared = prepared.map_err(not_present)?.into_inner();
        let mut stored = stored.map_err(not_present)?.into_inner();
        if stored.id != prepared.image_id {
            // The tag moved between the two answers: the root filesystem's image wins.
            stored = self
                .storage_client()
                .get_image(traced_request(storage::GetImageRequest {
                    reference: prepared.image_id.clone(),
                }))
                .await
                .map_err(not_present)?
                .into_inner();
        }
        let image_config = stored.config.clone().unwrap_or_default();
        record.image_id = stored.id.clone();
        record.stop_signal = image_config.stop_signal.clone();
        let rootfs = PathBuf::from(prepared.mount_path);
        let security = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref());
        let user = crate::spec::user::resolve(&rootfs, &image_config.user, security)?;
        let pid_namespace = self.pod_pid_namespace(&record.sandbox_id, record.infra)?;
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
        })?;
        record.cgroup_path = spec
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
        let _turn = self
            .create_slots
            .acquire()
            .await
            .map_err(|_| RuntimeError::Oci("the runtime service is stopping".into()))?;
        record.pid = self.oci.create(&launch).await?;
        Ok(())
    }

    /// Everything a container holds, released; each step tolerates what is gone.
    async fn destroy(&self, record: &ContainerRecord) -> Result<(), RuntimeError> {
        let runtime = PathBuf::from(&record.oci_runtime);
        self.oci.kill(&runtime, &record.id, "KILL").await?;
        self.oci.delete(&runtime, &record.id).await?;
        self.storage_client()
            .release_rootfs(traced_request(storage::ReleaseRootfsRequest {
                container_id: record.id.clone(),
            }))
            .await
            .map_err(RuntimeError::storage)?;
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

    /// The record, with an exit conmon reported since it was last written. Callers
    /// race (status polls, event statuses, list): the record is read again under one
    /// lock, so an exit is recorded, and announced, once.
    pub fn refresh(&self, record: ContainerRecord) -> Result<ContainerRecord, RuntimeError> {
        let is_live = |r: &ContainerRecord| {
            r.state == ContainerState::Running as i32 || r.state == ContainerState::Created as i32
        };
        if !is_live(&record) || self.oci.exit_status(&record.id).is_none() {
            return Ok(record);
        }
        let _exits = self
            .exit_detection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut record) = self.containers.get(&record.id)? else {
            return Ok(record);
        };
        if is_live(&record)
            && let Some((code, finished)) = self.oci.exit_status(&record.id)
        {
            record.state = ContainerState::Exited as i32;
            record.exit_code = code;
            record.finished_at = finished;
            record.reason = if self.bundle_dir(&record.id).join("oom").exists() {
                "OOMKilled".into()
            } else if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            };
            self.containers.put(&record.id, &record)?;
            self.publish(container_event(container_event::Kind::Stopped, &record));
        }
        Ok(record)
    }

    pub(crate) fn container(&self, id: &str) -> Result<ContainerRecord, RuntimeError> {
        let record = self.resolve(&self.containers, id, "container", |r| &r.id)?;
        if record.infra {
            return Err(RuntimeError::NotFound(format!(
                "container {} not found",
                excerpt(id)
            )));
        }
        self.refresh(record)
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
        let Some(sandbox) = self.sandboxes.get(sandbox_id)? else {
            return Ok(None);
        };
        if sandbox.pause_container_id.is_empty() {
            return Ok(None);
        }
        let pause = self
            .containers
            .get(&sandbox.pause_container_id)?
            .ok_or_else(|| {
                RuntimeError::FailedPrecondition(format!(
                    "the pause process of pod {sandbox_id} is gone"
                ))
            })?;
        Ok(Some(PathBuf::from(format!("/proc/{}/ns/pid", pause.pid))))
    }

    pub async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let record = self.container(id)?;
        self.start_record(record).await
    }

    pub async fn start_record(&self, mut record: ContainerRecord) -> Result<(), RuntimeError> {
        let _guard = self.lock(&record.id).await;
        if record.state != ContainerState::Created as i32 {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {} is not in the created state",
                record.id
            )));
        }
        self.oci
            .start(Path::new(&record.oci_runtime), &record.id, record.pid)
            .await?;
        record.state = ContainerState::Running as i32;
        record.started_at = now_nanos();
        self.containers.put(&record.id, &record)?;
        self.publish(container_event(container_event::Kind::Started, &record));
        Ok(())
    }

    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), RuntimeError> {
        let record = self.container(id)?;
        self.stop_container_now(&record.id, timeout).await
    }

    /// The stop signal, then SIGKILL once `timeout` seconds have passed.
    pub async fn stop_container_now(&self, id: &str, timeout: i64) -> Result<(), RuntimeError> {
        let _guard = self.lock(id).await;
        let Some(record) = self.containers.get(id)? else {
            return Ok(());
        };
        let record = self.refresh(record)?;
        if record.state != ContainerState::Running as i32 {
            return Ok(());
        }
        let runtime = PathBuf::from(&record.oci_runtime);
        if timeout > 0 {
            let signal = if record.stop_signal.is_empty() {
                "TERM".to_string()
            } else {
                record.stop_signal.trim_start_matches("SIG").to_string()
            };
            self.oci.kill(&runtime, id, &signal).await?;
            if self
                .wait_exit(id, Duration::from_secs(timeout as u64))
                .await
            {
                self.refresh(record)?;
                return Ok(());
            }
        }
        self.oci.kill(&runtime, id, "KILL").await?;
        if !self.wait_exit(id, KILL_WAIT).await {
            return Err(RuntimeError::Timeout {
                what: format!("container {id} to exit after SIGKILL"),
                seconds: KILL_WAIT.as_secs(),
            });
        }
        self.refresh(record)?;
        Ok(())
    }

    async fn wait_exit(&self, id: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.oci.exit_status(id).is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        match self.resolve(&self.containers, id, "container", |r| &r.id) {
            Ok(record) => self.remove_container_now(&record.id).await,
            Err(RuntimeError::NotFound(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    pub async fn remove_container_now(&self, id: &str) -> Result<(), RuntimeError> {
        self.stop_container_now(id, 0).await?;
        let _guard = self.lock(id).await;
        let Some(record) = self.containers.get(id)? else {
            return Ok(());
        };
        self.destroy(&record).await?;
        self.containers.delete(id)?;
        self.publish(container_event(container_event::Kind::Deleted, &record));
        Ok(())
    }

    fn container_cri_state(record: &ContainerRecord) -> ContainerState_ {
        match ContainerState::try_from(record.state) {
            Ok(ContainerState::Created) => ContainerState_::ContainerCreated,
            Ok(ContainerState::Running) => ContainerState_::ContainerRunning,
            Ok(ContainerState::Exited) => ContainerState_::ContainerExited,
            _ => ContainerState_::ContainerUnknown,
        }
    }

    pub fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<ContainerStatusResponse, RuntimeError> {
        let record = self.container(id)?;
        let config = decode(&record)?;
        let status = ContainerStatus {
            id: record.id.clone(),
            metadata: config.metadata.clone(),
            state: Self::container_cri_state(&record) as i32,
            created_at: record.created_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            exit_code: record.exit_code,
            image: config.image.clone(),
            image_ref: record.image_id.clone(),
            reason: record.reason.clone(),
            message: record.message.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            mounts: config.mounts.clone(),
            log_path: record.log_path.clone(),
            resources: Self::reported_resources(&config),
            ..Default::default()
        };
        let mut info = HashMap::new();
        if verbose {
            info.insert("info".into(), serde_json::json!({ "pid": record.pid, "sandboxId": record.sandbox_id, "runtime": record.oci_runtime }).to_string());
        }
        Ok(ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    pub fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<Container>, RuntimeError> {
        let filter = filter.unwrap_or_default();
        let mut list = Vec::new();
        for record in self.containers.all()? {
            if record.state == ContainerState::Creating as i32 || record.infra {
                continue;
            }
            let record = self.refresh(record)?;
            let config = decode(&record)?;
            let state = Self::container_cri_state(&record);
            let keep = (filter.id.is_empty() || record.id.starts_with(&filter.id))
                && (filter.pod_sandbox_id.is_empty()
                    || record.sandbox_id.starts_with(&filter.pod_sandbox_id))
                && filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == state as i32)
                && filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| config.labels.get(k) == Some(v));
            if keep {
                list.push(Container {
                    id: record.id.clone(),
                    pod_sandbox_id: record.sandbox_id.clone(),
                    metadata: config.metadata,
                    image: config.image,
                    image_ref: record.image_id.clone(),
                    state: state as i32,
                    created_at: record.created_at,
                    labels: config.labels,
                    annotations: config.annotations,
                    ..Default::default()
                });
            }
        }
        Ok(list)
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<ExecSyncResponse, RuntimeError> {
        let record = self.container(id)?;
        if record.state != ContainerState::Running as i32 {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        if cmd.is_empty() {
            return Err(RuntimeError::InvalidArgument(
                "ExecSync needs a command".into(),
            ));
        }
        let limit = (timeout > 0).then(|| Duration::from_secs(timeout as u64));
        let (stdout, stderr, exit_code) = self
            .oci
            .exec_sync(Path::new(&record.oci_runtime), &record.id, &cmd, limit)
            .await?;
        Ok(ExecSyncResponse {
            stdout,
            stderr,
            exit_code,
        })
    }
}

/// The CRI's container state enum, named apart from our record state.
use k8s_cri::v1::ContainerState as ContainerState_;

impl Runtime {
    /// Asks conmon to reopen the log file (after the kubelet rotated it), through the
    /// control fifo conmon keeps in the bundle ("2" is its reopen-logs event).
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), RuntimeError> {
        let record = self.container(id)?;
        if record.state != ContainerState::Running as i32 {
            return Err(RuntimeError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        let control = self.bundle_dir(&record.id).join("ctl");
        let write = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut fifo = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&control)?;
            fifo.write_all(b"2 0 0\n")
        });
        use std::os::unix::fs::OpenOptionsExt;
        write
            .await
            .map_err(|e| RuntimeError::Oci(format!("log reopen stopped: {e}")))?
            .map_err(|source| {
                RuntimeError::io(
                    format!(
                        "cannot ask conmon of container {} to reopen its log",
                        record.id
                    ),
                    source,
                )
            })?;
        // conmon reopens asynchronously; answer once the new file exists.
        let log = PathBuf::from(&record.log_path);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log.exists() && Instant::now() < deadline {
            tokio::time::sleep(EXIT_POLL).await;
        }
        Ok(())
    }

    /// At start: undo creations cut short; exits during the outage are read from
    /// conmon's exit files as each container is next looked at.
    pub async fn recover(&self) -> Result<(), RuntimeError> {
        for record in self.containers.all()? {
            if record.state == ContainerState::Creating as i32 {
                tracing::info!(container = %record.id, "removing a container whose creation was cut short");
                self.destroy(&record).await?;
                self.containers.delete(&record.id)?;
            } else {
                self.refresh(record)?;
            }
        }
        for record in self.sandboxes.all()? {
            if record.state == crate::records::SandboxState::Creating as i32 {
                tracing::info!(sandbox = %record.id, "removing a pod whose set-up was cut short");
                for container in self
                    .containers
                    .all()?
                    .into_iter()
                    .filter(|c| c.sandbox_id == record.id)
                {
                    self.destroy(&container).await?;
                    self.containers.delete(&container.id)?;
                }
                self.remove_pod_sandbox(&record.id).await?;
            }
        }
        Ok(())
    }
}
