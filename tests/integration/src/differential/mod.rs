//! The scenarios of the differential check (`bin/differential.rs`): one runtime under
//! test ([`Side`]) driven through the CRI as the kubelet drives it, and what a
//! container and a CRI client observe on it, normalised so that values which must
//! differ between any two runs (ids, the pod's IP, timestamps) do not count.

pub mod errors;
pub mod exits;
pub mod identity;
pub mod ids;
pub mod logs;
pub mod mounts;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;
use trellis_common::text::excerpt;

use crate::cri::pod_config;
use crate::pods::container_config;

/// What one side observed: observation name → normalised text.
pub type Observed = BTreeMap<String, String>;

/// The images both sides pull from the shared registry, beyond busybox.
#[derive(Clone, Default)]
pub struct Images {
    /// busybox with neither entrypoint nor command.
    pub without_command: String,
    /// Two images whose ids share a prefix, and that prefix (hex, without `sha256:`).
    pub twins: [String; 2],
    pub twin_prefix: String,
}

/// One runtime under test.
pub struct Side {
    pub name: &'static str,
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    pub logs: PathBuf,
    pub image: String,
    pub extra: Images,
}

/// A pod of one kind, with the words that stand for its run-specific values.
pub struct PodUnderTest {
    pub id: String,
    pub config: PodSandboxConfig,
    pub replacements: Vec<(String, &'static str)>,
}

/// The gRPC code of a call's outcome, `OK` when it succeeded.
pub fn code_of<T>(result: &Result<T, tonic::Status>) -> String {
    match result {
        Ok(_) => "OK".into(),
        Err(status) => format!("{:?}", status.code()),
    }
}

impl Side {
    /// A pod of `name`; a host-network pod gets no hostname (the kubelet sends none:
    /// the node's is the pod's), nor does one asked `hostname: false`.
    pub async fn run_pod(
        &self,
        name: &str,
        host_network: bool,
        hostname: bool,
    ) -> Result<PodUnderTest, tonic::Status> {
        let mut config = pod_config(name, host_network);
        if host_network || !hostname {
            config.hostname.clear();
        }
        self.run_pod_of(config).await
    }

    /// RunPodSandbox of `config`, logging under a directory named after the pod.
    pub async fn run_pod_of(
        &self,
        mut config: PodSandboxConfig,
    ) -> Result<PodUnderTest, tonic::Status> {
        let name = config.metadata.as_ref().map_or("", |m| m.name.as_str());
        let log_directory = self.logs.join(name);
        std::fs::create_dir_all(&log_directory).expect("log directory");
        config.log_directory = log_directory.display().to_string();
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let status = self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|s| s.into_inner().status);
        let mut replacements = vec![(id.clone(), "<pod-id>")];
        if let Some(ip) = status.and_then(|s| s.network).map(|n| n.ip)
            && !ip.is_empty()
        {
            replacements.push((ip, "<pod-ip>"));
        }
        Ok(PodUnderTest {
            id,
            config,
            replacements,
        })
    }

    /// The busybox image running `command`, with one variable from the request.
    pub fn container(&self, name: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            envs: vec![KeyValue {
                key: "FROM_REQUEST".into(),
                value: "yes".into(),
            }],
            ..container_config(name, &self.image, command)
        }
    }

    /// CreateContainer as the kubelet sends it: the container shares the pod's
    /// namespace options.
    pub async fn create(
        &self,
        pod: &PodUnderTest,
        mut config: ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let pod_namespaces = pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options = pod_namespaces;
        self.runtime
            .clone()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    /// [`Side::create`] and StartContainer, the failing step's code noted under
    /// `key` as `<key>/create` or `<key>/start`; the running container's id.
    pub async fn create_and_start(
        &self,
        pod: &PodUnderTest,
        config: ContainerConfig,
        key: &str,
        observed: &mut Observed,
    ) -> Option<String> {
        let id = match self.create(pod, config).await {
            Ok(id) => id,
            Err(status) => {
                observed.insert(format!("{key}/create"), format!("{:?}", status.code()));
                return None;
            }
        };
        let started = self.start(&id).await;
        observed.insert(format!("{key}/start"), code_of(&started));
        started.ok().map(|()| id)
    }

    pub async fn start(&self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    /// `sh -c script` in the container: what it printed and its exit code.
    pub async fn exec(&self, id: &str, script: &str) -> String {
        match self
            .runtime
            .clone()
            .exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
                timeout: 20,
            })
            .await
        {
            Ok(out) => {
                let out = out.into_inner();
                format!(
                    "{}{}[exit {}]",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    out.exit_code
                )
            }
            Err(status) => format!("ExecSync failed: {:?}", status.code()),
        }
    }

    pub async fn status(&self, id: &str) -> Result<ContainerStatus, tonic::Status> {
        self.runtime
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .map(|r| r.into_inner().status.unwrap_or_default())
    }

    pub async fn wait_exited(&self, id: &str) -> ContainerStatus {
        for _ in 0..200 {
            if let Ok(status) = self.status(id).await
                && status.state == ContainerState::ContainerExited as i32
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.status(id).await.unwrap_or_default()
    }

    /// ImageStatus of `image`: the image's id, if the side has it.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, tonic::Status> {
        self.images
            .clone()
            .image_status(ImageStatusRequest {
                image: crate::cri::image_spec(image),
                verbose: false,
            })
            .await
            .map(|r| r.into_inner().image.map(|image| image.id))
    }

    pub async fn pull(&self, image: &str) -> Result<String, tonic::Status> {
        self.images
            .clone()
            .pull_image(PullImageRequest {
                image: crate::cri::image_spec(image),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().image_ref)
    }
}

/// The pod, or none with its failure noted as the scenario's observation.
pub async fn pod_or_note(
    side: &Side,
    name: &str,
    host_network: bool,
    hostname: bool,
    observed: &mut Observed,
) -> Option<PodUnderTest> {
    match side.run_pod(name, host_network, hostname).await {
        Ok(pod) => Some(pod),
        Err(status) => {
            observed.insert(
                format!("{name}/RunPodSandbox"),
                format!("{:?}: {}", status.code(), excerpt(status.message())),
            );
            None
        }
    }
}

pub fn replace_all(mut text: String, replacements: &[(String, &str)]) -> String {
    for (value, placeholder) in replacements {
        text = text.replace(value.as_str(), placeholder);
    }
    text
}

/// Every scenario, in order, on one side.
pub async fn observe(side: &Side) -> Observed {
    let mut observed = Observed::new();
    identity::identity_and_environment(side, &mut observed).await;
    mounts::mounts_and_limits(side, &mut observed).await;
    mounts::privileged(side, &mut observed).await;
    exits::exits(side, &mut observed).await;
    logs::log_lines(side, &mut observed).await;
    errors::invalid_configs(side, &mut observed).await;
    ids::short_ids(side, &mut observed).await;
    ids::ambiguous_prefixes(side, &mut observed).await;
    observed
}

impl Images {
    /// Pushes the images the scenarios need beyond busybox to `registry`, under
    /// `repository/`: one without a command, and two whose ids (config digests)
    /// share their first two hex digits, found by varying a command no one runs.
    pub async fn push(registry: &crate::registry::Registry, repository: &str) -> Images {
        use crate::registry::{Compression, Entry, busybox_layer, image, layer};
        let bare = image(vec![busybox_layer()], &[], "amd64", false);
        registry
            .push(&format!("{repository}/bare"), "1", &bare)
            .await;
        let mut seen: BTreeMap<String, crate::registry::BuiltImage> = BTreeMap::new();
        for n in 0.. {
            let marker = layer(&[Entry::File("marker", Vec::new())], Compression::None);
            let comment = format!("# twin {n}");
            let candidate = image(vec![marker], &["/bin/sh", "-c", &comment], "amd64", false);
            let id = candidate.id();
            let prefix = id.trim_start_matches("sha256:")[..2].to_string();
            let Some(twin) = seen.remove(&prefix) else {
                seen.insert(prefix, candidate);
                continue;
            };
            registry
                .push(&format!("{repository}/twin"), "a", &twin)
                .await;
            registry
                .push(&format!("{repository}/twin"), "b", &candidate)
                .await;
            let name = |tag: &str| format!("{}/{repository}/twin:{tag}", registry.address);
            return Images {
                without_command: format!("{}/{repository}/bare:1", registry.address),
                twins: [name("a"), name("b")],
                twin_prefix: prefix,
            };
        }
        unreachable!("some two of 257 ids share two hex digits")
    }
}
