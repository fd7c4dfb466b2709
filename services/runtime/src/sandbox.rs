//! Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus,
//! ListPodSandbox.
//!
//! No infra container: the pod is its network namespace (from the network service),
//! its pinned IPC and UTS namespaces, its /dev/shm and its hostname, hosts and
//! resolv.conf files. A failure half-way through RunPodSandbox undoes what was done.

use std::collections::HashMap;
use std::path::Path;

use k8s_cri::v1::*;
use prost::Message;
use trellis_common::telemetry::traced_request;
use trellis_common::text::excerpt;
use trellis_proto::events::v1::{SandboxEvent, event::Payload, sandbox_event};
use trellis_proto::network::v1 as network;
use trellis_proto::network::v1::network_client::NetworkClient;

use crate::error::RuntimeError;
use crate::namespaces::{self, OwnNamespaces};
use crate::records::{SandboxRecord, SandboxState, new_id, now_nanos};
use crate::runtime::Runtime;
use crate::spec::pod::hostname_of;

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

pub fn decode_config(record: &SandboxRecord) -> Result<PodSandboxConfig, RuntimeError> {
    PodSandboxConfig::decode(record.config.as_slice()).map_err(RuntimeError::from)
}

fn namespace_options(config: &PodSandboxConfig) -> NamespaceOption {
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
    ips: &[String],
) -> Result<(), RuntimeError> {
    let hostname = hostname_of(config);
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for ip in ips {
        hosts.push_str(&format!("{ip}\t{hostname}\n"));
    }
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
    fn network_client(&self) -> NetworkClient<tonic::transport::Channel> {
        NetworkClient::new(self.network.clone())
    }

    pub async fn run_pod_sandbox(
        &self,
        config: PodSandboxConfig,
        handler: String,
    ) -> Result<String, RuntimeError> {
        let metadata = crate::validate::pod_config(&config)?.clone();
        self.oci_runtime(&handler)?;
        let key = format!(
            "{}/{}/{}/{}",
            metadata.namespace, metadata.name, metadata.uid, metadata.attempt
        );
        let _guard = self.lock(&format!("pod-name:{key}")).await;
        for existing in self.sandboxes.all()? {
            let other = decode_config(&existing)?.metadata.unwrap_or_default();
            if (
                other.namespace.as_str(),
                other.name.as_str(),
                other.uid.as_str(),
                other.attempt,
            ) == (
                metadata.namespace.as_str(),
                metadata.name.as_str(),
                metadata.uid.as_str(),
                metadata.attempt,
            ) {
                return Err(RuntimeError::AlreadyExists(format!(
                    "pod {} already exists as sandbox {}",
                    excerpt(&key),
                    existing.id
                )));
            }
        }
        let id = new_id()?;
        let mut record = SandboxRecord {
            id: id.clone(),
            state: SandboxState::Creating as i32,
            config: config.encode_to_vec(),
            created_at: now_nanos(),
            runtime_handler: handler,
            ..Default::default()
        };
        self.sandboxes.put(&id, &record)?;
        match self.set_up_pod(&mut record, &config).await {
            Ok(()) => {
                record.state = SandboxState::Ready as i32;
                self.sandboxes.put(&id, &record)?;
                self.publish(sandbox_event(sandbox_event::Kind::Created, &id, &config));
                self.publish(sandbox_event(sandbox_event::Kind::Started, &id, &config));
                Ok(id)
            }
            Err(error) => {
                if let Err(cleanup) = self.tear_down_failed_pod(&id).await {
                    tracing::error!(sandbox = %id, %cleanup, "rolling back a failed RunPodSandbox did not finish; it is retried at start");
                }
                Err(error)
            }
        }
    }

    /// Undoes a pod whose set-up failed: its containers (the pause process), network,
    /// namespaces, files and record.
    async fn tear_down_failed_pod(&self, id: &str) -> Result<(), RuntimeError> {
        for container in self
            .containers
            .all()?
            .into_iter()
            .filter(|c| c.sandbox_id == id)
        {
            self.remove_container_now(&container.id).await?;
        }
        self.release_pod(id).await?;
        let _ = std::fs::remove_dir_all(self.pod_dir(id));
        self.sandboxes.delete(id)
    }

    /// The pause image, pulled through the image service when it is not present.
    async fn ensure_pause_image(&self) -> Result<String, RuntimeError> {
        use trellis_proto::storage::v1::{GetImageRequest, storage_client::StorageClient};
        let image = self.config.runtime.pause_image.clone();
        match StorageClient::new(self.storage.clone())
            .get_image(traced_request(GetImageRequest {
                reference: image.clone(),
            }))
            .await
        {
            Ok(_) => return Ok(image),
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(RuntimeError::storage(status)),
        }
        let pull = traced_request(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
        image_service_client::ImageServiceClient::new(self.images.clone())
            .pull_image(pull)
            .await
            .map_err(|status| RuntimeError::Backend {
                service: "image",
                status,
            })?;
        Ok(image)
    }

    /// Starts the pod's pause process: the init of the PID namespace its containers share.
    async fn start_pause(
        &self,
        record: &mut SandboxRecord,
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
        record.pause_container_id = id.clone();
        self.sandboxes.put(&record.id, record)?;
        let pause = self
            .containers
            .get(&id)?
            .ok_or_else(|| RuntimeError::Oci(format!("pause container {id} vanished")))?;
        self.start_record(pause).await
    }

    async fn set_up_pod(
        &self,
        record: &mut SandboxRecord,
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
        // The pod's own namespaces are made while the network service sets its network up.
        let (namespaces_dir, hostname) = (pod_dir.clone(), hostname_of(config));
        let pod_namespaces = tokio::task::spawn_blocking(move || {
            if own.ipc {
                namespaces::mount_shm(&namespaces_dir)?;
            }
            namespaces::pin(&namespaces_dir, &hostname, own)
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
        let request = traced_request(network::SetUpPodRequest {
            sandbox_id: id.clone(),
            pod_name: metadata.name,
            pod_namespace: metadata.namespace,
            pod_uid: metadata.uid,
            host_network,
            port_mappings,
            dns,
            annotations: config.annotations.clone(),
            ..Default::default()
        });
        let pod_network = self
            .network_client()
            .set_up_pod(request)
            .await
            .map_err(RuntimeError::network);
        pod_namespaces.await.map_err(|e| {
            RuntimeError::Oci(format!("setting up the pod's namespaces stopped: {e}"))
        })??;
        let pod_network = pod_network?.into_inner();
        record.ips = pod_network.ips.into_iter().map(|ip| ip.ip).collect();
        record.netns_path = pod_network.netns_path;
        self.sandboxes.put(&id, record)?;
        write_pod_files(&pod_dir, config, &record.ips)?;
        if options.pid == NamespaceMode::Pod as i32 {
            self.start_pause(record, config).await?;
        }
        Ok(())
    }

    /// Undoes everything a pod holds but its record and containers: network,
    /// namespaces, /dev/shm. Each step tolerates what is already gone.
    async fn release_pod(&self, id: &str) -> Result<(), RuntimeError> {
        self.network_client()
            .tear_down_pod(traced_request(network::TearDownPodRequest {
                sandbox_id: id.to_string(),
            }))
            .await
            .map_err(RuntimeError::network)?;
        let pod_dir = self.pod_dir(id);
        namespaces::unpin(&pod_dir)?;
        namespaces::unmount_shm(&pod_dir)?;
        Ok(())
    }

    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut record = self.resolve(&self.sandboxes, id, "pod sandbox", |r| &r.id)?;
        let _guard = self.lock(&record.id).await;
        for container in self
            .containers
            .all()?
            .into_iter()
            .filter(|c| c.sandbox_id == record.id)
        {
            self.stop_container_now(&container.id, 0).await?;
        }
        self.release_pod(&record.id).await?;
        if record.state != SandboxState::NotReady as i32 {
            record.state = SandboxState::NotReady as i32;
            self.sandboxes.put(&record.id, &record)?;
            self.publish(sandbox_event(
                sandbox_event::Kind::Stopped,
                &record.id,
                &decode_config(&record)?,
            ));
        }
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let record = match self.resolve(&self.sandboxes, id, "pod sandbox", |r| &r.id) {
            Ok(record) => record,
            // Removing what is gone is not an error (the CRI asks for idempotence).
            Err(RuntimeError::NotFound(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        let _guard = self.lock(&record.id).await;
        for container in self
            .containers
            .all()?
            .into_iter()
            .filter(|c| c.sandbox_id == record.id)
        {
            self.remove_container_now(&container.id).await?;
        }
        self.release_pod(&record.id).await?;
        let pod_dir = self.pod_dir(&record.id);
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
        self.sandboxes.delete(&record.id)?;
        self.publish(sandbox_event(
            sandbox_event::Kind::Deleted,
            &record.id,
            &decode_config(&record)?,
        ));
        Ok(())
    }

    fn sandbox_cri_state(record: &SandboxRecord) -> PodSandboxState {
        if record.state == SandboxState::Ready as i32 {
            PodSandboxState::SandboxReady
        } else {
            PodSandboxState::SandboxNotready
        }
    }

    pub fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<PodSandboxStatusResponse, RuntimeError> {
        let record = self.resolve(&self.sandboxes, id, "pod sandbox", |r| &r.id)?;
        let config = decode_config(&record)?;
        let options = namespace_options(&config);
        let network = record.ips.first().map(|ip| PodSandboxNetworkStatus {
            ip: ip.clone(),
            additional_ips: record
                .ips
                .iter()
                .skip(1)
                .map(|ip| PodIp { ip: ip.clone() })
                .collect(),
        });
        let status = PodSandboxStatus {
            id: record.id.clone(),
            metadata: config.metadata.clone(),
            state: Self::sandbox_cri_state(&record) as i32,
            created_at: record.created_at,
            network,
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: Some(options),
                }),
            }),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            runtime_handler: record.runtime_handler.clone(),
        };
        let mut info = HashMap::new();
        if verbose {
            let details = serde_json::json!({ "netnsPath": record.netns_path, "podDir": self.pod_dir(&record.id).display().to_string() });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(PodSandboxStatusResponse {
            status: Some(status),
            info,
            ..Default::default()
        })
    }

    pub fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<Vec<PodSandbox>, RuntimeError> {
        let filter = filter.unwrap_or_default();
        let mut pods = Vec::new();
        for record in self.sandboxes.all()? {
            if record.state == SandboxState::Creating as i32 {
                continue;
            }
            let config = decode_config(&record)?;
            let state = Self::sandbox_cri_state(&record);
            let keep = (filter.id.is_empty() || record.id.starts_with(&filter.id))
                && filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == state as i32)
                && filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| config.labels.get(k) == Some(v));
            if keep {
                pods.push(PodSandbox {
                    id: record.id.clone(),
                    metadata: config.metadata.clone(),
                    state: state as i32,
                    created_at: record.created_at,
                    labels: config.labels,
                    annotations: config.annotations,
                    runtime_handler: record.runtime_handler,
                });
            }
        }
        Ok(pods)
    }
}
