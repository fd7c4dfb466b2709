//! Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox.
//!
//! No infra container: the pod is its network namespace (from the network service),
//! its pinned IPC and UTS namespaces, its /dev/shm and its hostname, hosts and
//! resolv.conf files. A failure half-way through RunPodSandbox undoes what was done
//! (and what cannot be undone at once is retried: `rollback.rs`).

use std::path::Path;

use k8s_cri::v1::*;
use trellis_common::failpoint;
use trellis_proto::events::v1::{SandboxEvent, event::Payload, sandbox_event};
use trellis_proto::network::v1 as network;

use super::Runtime;
use crate::error::RuntimeError;
use crate::namespaces::OwnNamespaces;
use crate::spec::pod::{hostname_of, on_host_network};
use crate::store::{SandboxRecord, SandboxState, new_id, now_nanos, pod_config_digest};

/// What claiming a pod's name found.
enum Claim {
    /// A repeat of an earlier call: the pod it made.
    Earlier(String),
    Claimed(std::sync::Arc<SandboxRecord>),
}

fn sandbox_event(kind: sandbox_event::Kind, id: &str, config: &PodSandboxConfig) -> Payload {
    let metadata = config.metadata.clone().unwrap_or_default();
    Payload::Sandbox(SandboxEvent {
        kind: kind.into(),
        sandbox_id: id.to_string(),
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
    })
}

pub(super) fn namespace_options(config: &PodSandboxConfig) -> NamespaceOption {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

fn write_pod_files(
    pod_dir: &Path,
    config: &PodSandboxConfig,
    hostname: &str,
    ips: &[String],
) -> Result<(), RuntimeError> {
    let own_hosts = || {
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        for ip in ips {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        hosts
    };
    // A pod on the node's network resolves the node's names as the node does (as
    // under containerd and CRI-O); a pod of its own network gets its own entries.
    let hosts = if on_host_network(config) {
        std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| own_hosts())
    } else {
        own_hosts()
    };
    let resolv = match &config.dns_config {
        Some(dns)
            if !dns.servers.is_empty() || !dns.searches.is_empty() || !dns.options.is_empty() =>
        {
            let mut text = String::new();
            for server in &dns.servers {
                text.push_str(&format!("nameserver {server}\n"));
            }
            if !dns.searches.is_empty() {
                text.push_str(&format!("search {}\n", dns.searches.join(" ")));
            }
            if !dns.options.is_empty() {
                text.push_str(&format!("options {}\n", dns.options.join(" ")));
            }
            text
        }
        _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    for (name, content) in [
        ("hostname", format!("{hostname}\n")),
        ("hosts", hosts),
        ("resolv.conf", resolv),
    ] {
        let path = pod_dir.join(name);
        std::fs::write(&path, content).map_err(|source| {
            RuntimeError::io(format!("cannot write {}", path.display()), source)
        })?;
    }
    Ok(())
}

impl Runtime {
    pub async fn run_pod_sandbox(
        &self,
        config: PodSandboxConfig,
        handler: String,
    ) -> Result<String, RuntimeError> {
        crate::validate::pod_config(&config)?;
        self.oci_runtime(&handler)?;
        let config_digest = pod_config_digest(&config);
        let record = SandboxRecord {
            id: new_id()?,
            state: SandboxState::Creating as i32,
            config: Some(config.clone()),
            created_at: now_nanos(),
            runtime_handler: handler,
            config_digest,
            ..Default::default()
        };
        let key = record.name_key();
        // Held from before the name is claimed, so that a repeat of this call finds
        // the name and waits for the outcome instead of seeing a half-made pod.
        let _guard = self.lock(&record.id).await;
        let record = match self.claim_pod_name(record, &key).await? {
            Claim::Earlier(id) => return Ok(id),
            Claim::Claimed(record) => record,
        };
        let id = record.id.clone();
        let set_up = async {
            self.set_up_pod(&record, &config).await?;
            failpoint::hit_async("runtime.sandbox.before-record").await?;
            self.store.sandboxes.update(&id, |record| {
                record.set_state(SandboxState::Ready);
                Ok(())
            })
        };
        match set_up.await {
            Ok(_) => {
                self.publish(sandbox_event(sandbox_event::Kind::Created, &id, &config));
                self.publish(sandbox_event(sandbox_event::Kind::Started, &id, &config));
                // Done but not answered: a kill here leaves a caller to retry.
                failpoint::hit_async("runtime.sandbox.after-record").await?;
                Ok(id)
            }
            Err(error) => {
                tracing::debug!(sandbox = %id, %error, "RunPodSandbox failed; rolling back");
                self.mark_pod_rolling_back(&id);
                // A clean-up that cannot finish now is retried in the background.
                let _ = self.roll_back_pod_locked(&id).await;
                Err(error)
            }
        }
    }

    /// Claims the pod's name for `record`, unless a repeat of this call finds the pod
    /// it made before. A failed pod still holding the name is finished first, so
    /// that a kubelet's retry succeeds once the clean-up can.
    async fn claim_pod_name(
        &self,
        record: SandboxRecord,
        key: &str,
    ) -> Result<Claim, RuntimeError> {
        let handler = record.runtime_handler.clone();
        let digest = record.config_digest.clone();
        if let Some(id) = self.earlier_pod(key, &handler, &digest).await? {
            return Ok(Claim::Earlier(id));
        }
        self.free_pod_name(key).await?;
        // The store claims the name with the record: a different pod under it is
        // AlreadyExists, naming the holder.
        match self.store.insert_sandbox(record) {
            Ok(record) => Ok(Claim::Claimed(record)),
            // Two first calls at once: the later answers the earlier's pod.
            Err(RuntimeError::AlreadyExists(message)) => {
                match self.earlier_pod(key, &handler, &digest).await? {
                    Some(id) => Ok(Claim::Earlier(id)),
                    None => Err(RuntimeError::AlreadyExists(message)),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Removes a pod, failed or stopped: its containers (the pause process), network,
    /// namespaces, files and record. Each step tolerates what is already gone.
    pub(super) async fn remove_pod_now(&self, id: &str) -> Result<(), RuntimeError> {
        for container in self.store.containers_of(id) {
            self.remove_container_now(&container.id).await?;
        }
        self.release_pod(id).await?;
        let pod_dir = self.pod_dir(id);
        match std::fs::remove_dir_all(&pod_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RuntimeError::io(
                    format!("cannot remove {}", pod_dir.display()),
                    source,
                ));
            }
        }
        self.store.remove_sandbox(id)
    }

    /// The pause image, pulled through the image service when it is not present.
    async fn ensure_pause_image(&self) -> Result<String, RuntimeError> {
        let image = self.config.pause_image.clone();
        if self.backends.storage.image(&image).await?.is_none() {
            self.backends.images.pull(&image).await?;
        }
        Ok(image)
    }

    /// Starts the pod's pause process: the init of the PID namespace its containers share.
    async fn start_pause(
        &self,
        record: &SandboxRecord,
        config: &PodSandboxConfig,
    ) -> Result<(), RuntimeError> {
        let image = self.ensure_pause_image().await?;
        let pause = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "POD".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image,
                ..Default::default()
            }),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options(config)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self.create_in_pod(record, pause, true).await?;
        self.store.sandboxes.update(&record.id, |record| {
            record.pause_container_id = id.clone();
            Ok(())
        })?;
        self.start_record(&id).await
    }

    async fn set_up_pod(
        &self,
        record: &SandboxRecord,
        config: &PodSandboxConfig,
    ) -> Result<(), RuntimeError> {
        let id = record.id.clone();
        let pod_dir = self.pod_dir(&id);
        std::fs::create_dir_all(&pod_dir).map_err(|source| {
            RuntimeError::io(format!("cannot create {}", pod_dir.display()), source)
        })?;
        let options = namespace_options(config);
        let host_network = options.network == NamespaceMode::Node as i32;
        let own = OwnNamespaces {
            ipc: options.ipc != NamespaceMode::Node as i32,
            uts: !host_network,
        };
        let hostname = hostname_of(config, &super::node_hostname()?);
        // The pod's own namespaces are made while the network service sets its network up.
        let (namespaces, namespaces_dir, pod_hostname) =
            (self.namespaces.clone(), pod_dir.clone(), hostname.clone());
        let step = trellis_common::step_span!("namespaces.set_up");
        let pod_namespaces = tokio::task::spawn_blocking(move || {
            step.in_scope(|| namespaces.set_up(&namespaces_dir, &pod_hostname, own))
        });

        let metadata = config.metadata.clone().unwrap_or_default();
        let port_mappings = config
            .port_mappings
            .iter()
            .map(|p| network::PortMapping {
                protocol: p.protocol,
                container_port: p.container_port,
                host_port: p.host_port,
                host_ip: p.host_ip.clone(),
            })
            .collect();
        let dns = config.dns_config.as_ref().map(|d| network::DnsConfig {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        });
        let request = network::SetUpPodRequest {
            sandbox_id: id.clone(),
            pod_name: metadata.name,
            pod_namespace: metadata.namespace,
            pod_uid: metadata.uid,
            host_network,
            port_mappings,
            dns,
            annotations: config.annotations.clone(),
            ..Default::default()
        };
        failpoint::hit_async("runtime.sandbox.before-network").await?;
        let pod_network = self.backends.network.set_up_pod(request).await;
        pod_namespaces.await.map_err(|e| {
            RuntimeError::Oci(format!("setting up the pod's namespaces stopped: {e}"))
        })??;
        let pod_network = pod_network?;
        failpoint::hit_async("runtime.sandbox.after-network").await?;
        let (record, ()) = self.store.sandboxes.update(&id, |record| {
            record.ips = pod_network.ips.into_iter().map(|ip| ip.ip).collect();
            record.netns_path = pod_network.netns_path;
            Ok(())
        })?;
        trellis_common::step_span!("pod.files")
            .in_scope(|| write_pod_files(&pod_dir, config, &hostname, &record.ips))?;
        failpoint::hit_async("runtime.sandbox.after-files").await?;
        if options.pid == NamespaceMode::Pod as i32 {
            self.start_pause(&record, config).await?;
            failpoint::hit_async("runtime.sandbox.after-pause").await?;
        }
        Ok(())
    }

    /// Undoes everything a pod holds but its record and containers: network,
    /// namespaces, /dev/shm. Each step tolerates what is already gone.
    async fn release_pod(&self, id: &str) -> Result<(), RuntimeError> {
        self.backends.network.tear_down_pod(id).await?;
        self.namespaces.tear_down(&self.pod_dir(id))
    }

    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let record = self.sandbox(id)?;
        let _guard = self.lock(&record.id).await;
        for container in self.store.containers_of(&record.id) {
            self.stop_container_now(&container.id, 0).await?;
        }
        self.release_pod(&record.id).await?;
        let (record, stopped_now) = self.store.sandboxes.update(&record.id, |record| {
            match record.state() {
                // Still owed its clean-up: the background keeps retrying it.
                SandboxState::RollingBack | SandboxState::NotReady => Ok(false),
                SandboxState::Creating | SandboxState::Ready => {
                    record.set_state(SandboxState::NotReady);
                    Ok(true)
                }
            }
        })?;
        if stopped_now {
            self.publish(sandbox_event(
                sandbox_event::Kind::Stopped,
                &record.id,
                record.config(),
            ));
        }
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let record = match self.sandbox(id) {
            Ok(record) => record,
            // Removing what is gone is not an error (the CRI asks for idempotence).
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        let _guard = self.lock(&record.id).await;
        // Read again under the lock: a clean-up may have finished meanwhile.
        let Some(record) = self.store.sandboxes.get(&record.id) else {
            return Ok(());
        };
        if record.state() == SandboxState::RollingBack {
            // Never announced: its removal finishes the clean-up, and says why not yet.
            let outcome = self.remove_pod_now(&record.id).await;
            return self
                .count_attempt(&record.id, "pod", outcome)
                .map_err(|source| RuntimeError::Unfinished {
                    what: format!(
                        "pod sandbox {}: the clean-up of its failed set-up is not finished (retried in the background)",
                        record.id
                    ),
                    source: Box::new(source),
                });
        }
        self.remove_pod_now(&record.id).await?;
        self.publish(sandbox_event(
            sandbox_event::Kind::Deleted,
            &record.id,
            record.config(),
        ));
        Ok(())
    }
}
