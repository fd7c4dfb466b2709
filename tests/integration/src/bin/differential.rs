//! Differential check against containerd: the same CRI scenarios on a Trellis node and
//! on containerd (Debian's, runc, its own socket, same registry and CNI network), and
//! what a container and a CRI client observe on each side, printed side by side with
//! the differences marked. Asserts nothing: differences are for a person to judge
//! (fix, or document as deliberate in docs/).
//!
//!     cargo build --bins && cargo run -p trellis-integration --bin differential
//!
//! Values that must differ between any two runs (ids, the pod's IP, timestamps) are
//! replaced by placeholders before comparing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;
use trellis_common::text::excerpt;
use trellis_integration::cri::pod_config;
use trellis_integration::peer::SideBySide;
use trellis_integration::pods::container_config;

/// One runtime under test.
struct Side {
    name: &'static str,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    logs: PathBuf,
    image: String,
}

/// What one side observed: observation name → normalised text.
type Observed = BTreeMap<String, String>;

/// A pod of one kind, with the words that stand for its run-specific values.
struct PodUnderTest {
    id: String,
    config: PodSandboxConfig,
    replacements: Vec<(String, &'static str)>,
}

fn code_of<T>(result: &Result<T, tonic::Status>) -> String {
    match result {
        Ok(_) => "OK".into(),
        Err(status) => format!("{:?}", status.code()),
    }
}

impl Side {
    /// A pod of `name`; a host-network pod gets no hostname (the kubelet sends none:
    /// the node's is the pod's), nor does one asked `hostname: false`.
    async fn run_pod(
        &self,
        name: &str,
        host_network: bool,
        hostname: bool,
    ) -> Result<PodUnderTest, tonic::Status> {
        let mut config = pod_config(name, host_network);
        if host_network || !hostname {
            config.hostname.clear();
        }
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
    fn container(&self, name: &str, command: &[&str]) -> ContainerConfig {
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
    async fn create(
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

    async fn start(&self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .map(|_| ())
    }

    async fn exec(&self, id: &str, script: &str) -> String {
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

    async fn status(&self, id: &str) -> Result<ContainerStatus, tonic::Status> {
        self.runtime
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .map(|r| r.into_inner().status.unwrap_or_default())
    }

    async fn wait_exited(&self, id: &str) -> ContainerStatus {
        for _ in 0..100 {
            if let Ok(status) = self.status(id).await
                && status.state == ContainerState::ContainerExited as i32
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.status(id).await.unwrap_or_default()
    }
}

/// Who the process is and what it sees of its pod: user and groups, environment,
/// hostname and the files the runtime writes for the pod.
async fn identity_and_environment(side: &Side, observed: &mut Observed) {
    let kinds = [
        ("pod-network", false, true),
        ("pod-network-no-hostname", false, false),
        ("host-network", true, false),
    ];
    for (kind, host_network, hostname) in kinds {
        let Some(pod) = pod_or_note(side, kind, host_network, hostname, observed).await else {
            continue;
        };
        let users = [
            ("image-user", None),
            (
                "run-as-1000-3000-supplemental-4000",
                Some((1000, 3000, 4000)),
            ),
        ];
        for (user, ids) in users {
            let mut config = side.container(user, &["sleep", "3600"]);
            if let Some((uid, gid, supplemental)) = ids {
                config.linux = Some(LinuxContainerConfig {
                    security_context: Some(LinuxContainerSecurityContext {
                        run_as_user: Some(Int64Value { value: uid }),
                        run_as_group: Some(Int64Value { value: gid }),
                        supplemental_groups: vec![supplemental],
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            let key = |what: &str| format!("{kind}/{user}/{what}");
            let id = match side.create(&pod, config).await {
                Ok(id) => id,
                Err(status) => {
                    observed.insert(key("create"), format!("{:?}", status.code()));
                    continue;
                }
            };
            observed.insert(key("start"), code_of(&side.start(&id).await));
            let mut replacements = pod.replacements.clone();
            replacements.push((id.clone(), "<container-id>"));
            let views = [
                ("id", "id"),
                ("env", "env | sort"),
                ("hostname", "hostname; cat /etc/hostname"),
                ("hosts", "cat /etc/hosts"),
                ("resolv.conf", "cat /etc/resolv.conf"),
            ];
            for (what, script) in views {
                let seen = replace_all(side.exec(&id, script).await, &replacements);
                observed.insert(key(what), seen);
            }
        }
    }
}

/// How a process's end is reported, and a command that cannot run.
async fn exits(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "exits", true, false, observed).await else {
        return;
    };
    let cases: [(&str, &[&str]); 3] = [
        ("exit-3", &["/bin/sh", "-c", "exit 3"]),
        ("killed", &["/bin/sh", "-c", "kill -9 $$"]),
        ("missing-executable", &["/no/such/binary"]),
    ];
    for (case, command) in cases {
        let key = |what: &str| format!("exits/{case}/{what}");
        let id = match side.create(&pod, side.container(case, command)).await {
            Ok(id) => id,
            Err(status) => {
                observed.insert(key("create"), format!("{:?}", status.code()));
                continue;
            }
        };
        let started = side.start(&id).await;
        observed.insert(key("start"), code_of(&started));
        if started.is_err() {
            continue;
        }
        let status = side.wait_exited(&id).await;
        observed.insert(
            key("status"),
            format!("exit {} reason {:?}", status.exit_code, status.reason),
        );
    }
}

/// The CRI log of a process writing a line in two writes, and a last line without a
/// newline: timestamps replaced, the rest compared as written.
async fn log_lines(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "logs", true, false, observed).await else {
        return;
    };
    let script = "printf 'split '; sleep 0.3; printf 'line\\n'; printf 'no newline at the end'";
    let writer = side.container("writer", &["/bin/sh", "-c", script]);
    let id = match side.create(&pod, writer).await {
        Ok(id) => id,
        Err(status) => {
            observed.insert("logs/create".into(), format!("{:?}", status.code()));
            return;
        }
    };
    observed.insert("logs/start".into(), code_of(&side.start(&id).await));
    side.wait_exited(&id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = Path::new(&pod.config.log_directory).join("writer.log");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("unreadable: {e}"));
    let lines: Vec<String> = text
        .lines()
        .map(|line| match line.split_once(' ') {
            Some((_, rest)) => format!("<time> {rest}"),
            None => line.to_string(),
        })
        .collect();
    observed.insert("logs/partial-and-unterminated".into(), lines.join("\n"));
}

/// Lookups by the short ids a `crictl` user types.
async fn short_ids(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "short-ids", true, false, observed).await else {
        return;
    };
    let id = match side
        .create(&pod, side.container("short", &["sleep", "3600"]))
        .await
    {
        Ok(id) => id,
        Err(status) => {
            observed.insert("short-ids/create".into(), format!("{:?}", status.code()));
            return;
        }
    };
    observed.insert("short-ids/start".into(), code_of(&side.start(&id).await));
    let container = side.status(&id[..8]).await.map(|s| s.id == id);
    observed.insert(
        "short-ids/ContainerStatus(8 chars)".into(),
        format!("{} {:?}", code_of(&container), container.ok()),
    );
    let pod_status = side
        .runtime
        .clone()
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id[..8].to_string(),
            verbose: false,
        })
        .await;
    observed.insert(
        "short-ids/PodSandboxStatus(8 chars)".into(),
        code_of(&pod_status),
    );
    let image_id = side
        .images
        .clone()
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: side.image.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .ok()
        .and_then(|s| s.into_inner().image)
        .map(|image| image.id)
        .unwrap_or_default();
    let short = image_id.trim_start_matches("sha256:");
    let short = &short[..short.len().min(12)];
    let found = side
        .images
        .clone()
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: short.to_string(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .map(|s| s.into_inner().image.is_some());
    observed.insert(
        "short-ids/ImageStatus(12 hex chars)".into(),
        format!("{} found {:?}", code_of(&found), found.ok()),
    );
}

/// The pod, or none with its failure noted as the scenario's observation.
async fn pod_or_note(
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

fn replace_all(mut text: String, replacements: &[(String, &str)]) -> String {
    for (value, placeholder) in replacements {
        text = text.replace(value.as_str(), placeholder);
    }
    text
}

async fn observe(side: &Side) -> Observed {
    let mut observed = Observed::new();
    identity_and_environment(side, &mut observed).await;
    exits(side, &mut observed).await;
    log_lines(side, &mut observed).await;
    short_ids(side, &mut observed).await;
    observed
}

/// Removes every pod the scenarios made on one side.
async fn remove_all(side: &Side) {
    let pods = side
        .runtime
        .clone()
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .map(|r| r.into_inner().items)
        .unwrap_or_default();
    for pod in pods {
        let mut runtime = side.runtime.clone();
        let _ = runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await;
        if let Err(status) = runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
        {
            eprintln!("{}: cannot remove pod {}: {status}", side.name, pod.id);
        }
    }
}

fn indent(text: &str) -> String {
    text.trim_end().replace('\n', "\n      ")
}

#[tokio::main]
async fn main() {
    let dir = tempfile::Builder::new()
        .prefix("trellis-differential-")
        .tempdir()
        .expect("temp dir");
    let SideBySide {
        containerd,
        network: _network,
        node,
        image: image_name,
        registry: _registry,
    } = SideBySide::start(dir.path(), "diff").await;
    let sides = [
        Side {
            name: "trellis",
            runtime: node.runtime(),
            images: node.images(),
            logs: dir.path().join("logs-trellis"),
            image: image_name.clone(),
        },
        Side {
            name: "containerd",
            runtime: containerd.runtime(),
            images: containerd.images(),
            logs: dir.path().join("logs-containerd"),
            image: image_name.clone(),
        },
    ];
    let mut observations = Vec::new();
    for side in &sides {
        side.images
            .clone()
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image_name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{}: pull: {e}", side.name));
        observations.push(observe(side).await);
        remove_all(side).await;
    }
    let (trellis, peer) = (&observations[0], &observations[1]);
    let mut keys: Vec<&String> = trellis.keys().chain(peer.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut differences = 0;
    for key in &keys {
        let (ours, theirs) = (trellis.get(*key), peer.get(*key));
        let same = ours == theirs;
        if !same {
            differences += 1;
        }
        println!("{} {key}", if same { "  same" } else { "DIFFER" });
        if !same {
            let missing = String::from("(not observed)");
            println!("    trellis:    {}", indent(ours.unwrap_or(&missing)));
            println!("    containerd: {}", indent(theirs.unwrap_or(&missing)));
        }
    }
    println!("\n{} observations, {differences} different", keys.len());
    node.stop();
}
