//! The runtime service takes nothing in a CRI request on trust: a container gets its
//! pod's namespaces, cgroup and log directory from the pod's record whatever the
//! CreateContainer request says; pod fields that would forge lines of `/etc/hosts`,
//! `resolv.conf` or keys of `CNI_ARGS` are refused; oversized ids are refused and never
//! echoed whole; ExecSync output always fits one CRI message; and the runtime's state
//! directory is root's alone while non-root containers still read their pod files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::Code;
use trellis_common::grpc::MAX_MESSAGE_BYTES;
use trellis_integration::cri::{
    BusyboxNode, Pod, exec, host_network_pod, remove_pods, run_pod, shell, start,
};
use trellis_integration::{Node, NodeOptions, unix_channel};

const SLEEP: &[&str] = &["/bin/sleep", "3600"];

fn namespace_options(mode: NamespaceMode, pid: NamespaceMode) -> Option<NamespaceOption> {
    Some(NamespaceOption {
        network: mode as i32,
        pid: pid as i32,
        ipc: mode as i32,
        ..Default::default()
    })
}

/// A pod with a network of its own (CNI), the pod's own IPC namespace and DNS settings.
fn pod_network_pod(name: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "tests".into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_directory.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec!["tests.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: namespace_options(NamespaceMode::Pod, NamespaceMode::Container),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pid of a running container's process, as ContainerStatus tells it.
async fn container_pid(node: &Node, id: &str) -> u32 {
    let status = node
        .runtime()
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .expect("ContainerStatus")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(&status.info["info"]).expect("verbose info is JSON");
    info["pid"].as_u64().expect("a pid") as u32
}

fn namespace_of(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_container_takes_the_pod_from_its_record_not_from_the_request() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let logs = busybox.dir.path().join("logs");
    let pod = run_pod(node, pod_network_pod("confined", &logs)).await;

    // The request's copy of the pod asks for every host namespace, privileges, the
    // root cgroup and another log directory.
    let mut lie = pod.config.clone();
    lie.log_directory = busybox.dir.path().join("elsewhere").display().to_string();
    lie.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: "/".into(),
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: namespace_options(NamespaceMode::Node, NamespaceMode::Node),
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let create = |config: ContainerConfig| {
        let mut runtime = node.runtime();
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(lie.clone()),
        };
        async move {
            runtime
                .create_container(request)
                .await
                .map(|r| r.into_inner().container_id)
        }
    };
    let mut config = busybox.container("confined", SLEEP);
    config.log_path = "confined.log".into();
    let id = create(config).await.expect("CreateContainer");
    node.runtime()
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");

    let pid = container_pid(node, &id).await.to_string();
    for kind in ["net", "pid", "ipc", "uts"] {
        assert_ne!(
            namespace_of(&pid, kind),
            namespace_of("self", kind),
            "the container is not in the host's {kind} namespace"
        );
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(
        cgroup.contains(&format!(":/trellis/{id}\n")) && !cgroup.contains(&format!(":/{id}\n")),
        "under the pod's cgroup parent, not `/`: {cgroup}"
    );
    let status = trellis_integration::cri::container_status(node, &id).await;
    assert_eq!(
        Path::new(&status.log_path),
        logs.join("confined.log"),
        "the pod's own log directory"
    );
    let seen = shell(
        node,
        &id,
        "hostname; cat /etc/resolv.conf; cat /proc/net/dev",
    )
    .await;
    assert!(
        seen.stdout.starts_with(
            "confined\nnameserver 10.0.0.10\nsearch tests.svc.cluster.local\noptions ndots:5\n"
        ),
        "{seen:?}"
    );
    assert!(seen.stdout.contains("eth0:"), "the pod's network: {seen:?}");

    // What the pod does not have cannot be asked for by one of its containers either.
    let mut privileged = busybox.container("privileged", SLEEP);
    privileged.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let error = create(privileged)
        .await
        .expect_err("a privileged container in an unprivileged pod");
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("privileged pod"),
        "{}",
        error.message()
    );
    let mut host_network = busybox.container("hostnet", SLEEP);
    host_network.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            namespace_options: namespace_options(NamespaceMode::Node, NamespaceMode::Pod),
            ..Default::default()
        }),
        ..Default::default()
    });
    let error = create(host_network)
        .await
        .expect_err("the host's network in a pod-network pod");
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("namespace_options.network"),
        "{}",
        error.message()
    );
    assert!(
        !busybox.dir.path().join("elsewhere").exists(),
        "nothing was written where the request said"
    );
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

fn assert_refused(error: &tonic::Status, field: &str) {
    assert_eq!(error.code(), Code::InvalidArgument, "{field}: {error:?}");
    assert!(
        error.message().contains(field),
        "names {field}: {}",
        error.message()
    );
    assert!(
        !error.message().contains('\n') && error.message().len() < 400,
        "one short line: {:?}",
        error.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_fields_that_would_forge_files_or_cni_arguments_are_refused() {
    let node = Node::start(NodeOptions::default()).await;
    let mut runtime = node.runtime();
    let base = host_network_pod("forged", false);
    let dns = |servers: &[&str], searches: &[&str], options: &[&str]| {
        let strings = |values: &[&str]| values.iter().map(|v| v.to_string()).collect();
        PodSandboxConfig {
            dns_config: Some(DnsConfig {
                servers: strings(servers),
                searches: strings(searches),
                options: strings(options),
            }),
            ..base.clone()
        }
    };
    let metadata = |change: fn(&mut PodSandboxMetadata)| {
        let mut config = base.clone();
        change(config.metadata.as_mut().expect("metadata"));
        config
    };
    let ports = |mapping: PortMapping| PodSandboxConfig {
        port_mappings: vec![mapping],
        ..base.clone()
    };
    let cases = [
        (
            "hostname",
            PodSandboxConfig {
                hostname: "web\n10.6.6.6 kubernetes.default".into(),
                ..base.clone()
            },
        ),
        (
            "hostname",
            PodSandboxConfig {
                hostname: "web 0".into(),
                ..base.clone()
            },
        ),
        (
            "dns_config.servers[0]",
            dns(&["8.8.8.8\nnameserver 10.6.6.6"], &[], &[]),
        ),
        (
            "dns_config.searches[0]",
            dns(&[], &["svc.cluster.local\nnameserver 10.6.6.6"], &[]),
        ),
        ("dns_config.options[0]", dns(&[], &[], &["ndots:5 debug"])),
        (
            "metadata.name",
            metadata(|m| m.name = "web;K8S_POD_NAMESPACE=kube-system".into()),
        ),
        (
            "metadata.namespace",
            metadata(|m| m.namespace = "tests\nX".into()),
        ),
        ("metadata.uid", metadata(|m| m.uid = "uid=1".into())),
        (
            "port_mappings[0].host_port",
            ports(PortMapping {
                container_port: 80,
                host_port: 70000,
                ..Default::default()
            }),
        ),
        (
            "port_mappings[0].host_ip",
            ports(PortMapping {
                container_port: 80,
                host_port: 8080,
                host_ip: "127.0.0.1 -j ACCEPT".into(),
                ..Default::default()
            }),
        ),
    ];
    for (field, config) in cases {
        let error = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .expect_err(field);
        assert_refused(&error, field);
    }
    assert!(
        runtime
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .expect("list")
            .into_inner()
            .items
            .is_empty(),
        "no pod made"
    );

    // Ids: one longer than an id is refused up front and quoted short; an unknown one
    // is not found, its control characters escaped.
    let huge = "f".repeat(20_000);
    let errors = [
        runtime
            .container_status(ContainerStatusRequest {
                container_id: huge.clone(),
                verbose: false,
            })
            .await
            .expect_err("status"),
        runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: huge.clone(),
                verbose: false,
            })
            .await
            .expect_err("pod status"),
        runtime
            .stop_container(StopContainerRequest {
                container_id: huge.clone(),
                timeout: 0,
            })
            .await
            .expect_err("stop"),
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: huge.clone(),
            })
            .await
            .expect_err("remove"),
        runtime
            .exec_sync(ExecSyncRequest {
                container_id: huge.clone(),
                cmd: vec!["true".into()],
                timeout: 1,
            })
            .await
            .expect_err("exec"),
        runtime
            .port_forward(PortForwardRequest {
                pod_sandbox_id: huge.clone(),
                port: vec![80],
            })
            .await
            .expect_err("port-forward"),
    ];
    for error in errors {
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(
            error.message().len() < 300 && error.message().contains("20000 bytes"),
            "{}",
            error.message()
        );
    }
    let unknown = format!("{}\n\u{1b}[2J", "0".repeat(59));
    let error = runtime
        .container_status(ContainerStatusRequest {
            container_id: unknown,
            verbose: false,
        })
        .await
        .expect_err("unknown");
    assert_eq!(error.code(), Code::NotFound);
    assert!(
        error.message().contains("\\n\\u{1b}[2J") && !error.message().contains('\n'),
        "{:?}",
        error.message()
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_output_beyond_one_message_is_cut_with_a_note() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("bigexec", false)).await;
    let id = start(node, &pod, busybox.container("talker", SLEEP)).await;
    // The kubelet's own limit for an answer.
    let mut runtime = RuntimeServiceClient::new(unix_channel(&node.socket("gateway")))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let twenty_mib = 20 * 1024 * 1024;
    let script =
        format!("head -c {twenty_mib} /dev/zero; head -c {twenty_mib} /dev/zero >&2; exit 3");
    let request = ExecSyncRequest {
        container_id: id.clone(),
        cmd: vec!["/bin/sh".into(), "-c".into(), script],
        timeout: 60,
    };
    let answer = runtime
        .exec_sync(request)
        .await
        .expect("ExecSync of 40 MiB")
        .into_inner();
    assert_eq!(answer.exit_code, 3);
    assert!(
        answer.stdout.len() > 7 * 1024 * 1024 && answer.stdout.len() < MAX_MESSAGE_BYTES / 2,
        "stdout cut to half a message: {}",
        answer.stdout.len()
    );
    assert!(
        answer.stdout.iter().all(|b| *b == 0),
        "the first bytes are kept"
    );
    let zeros = answer.stderr.iter().take_while(|b| **b == 0).count();
    assert_eq!(zeros, answer.stdout.len(), "stderr is cut the same way");
    let note = String::from_utf8_lossy(&answer.stderr[zeros..]).into_owned();
    assert!(
        note.contains(&format!(
            "stdout {twenty_mib} bytes, first {} kept",
            answer.stdout.len()
        )),
        "{note}"
    );
    assert!(
        note.contains(&format!("stderr {twenty_mib} bytes, first {zeros} kept")),
        "{note}"
    );

    let small = exec(node, &id, &["/bin/sh", "-c", "echo out; echo err >&2"]).await;
    assert_eq!(
        (small.stdout.as_str(), small.stderr.as_str(), small.code),
        ("out\n", "err\n", 0),
        "no note when nothing is cut"
    );
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// `command` run on the host as nobody, with no groups.
fn as_nobody(command: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(command)
        .output()
        .expect("setpriv")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_state_is_root_only_and_non_root_containers_still_read_their_pod_files() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    // The node's root is a private temporary directory; open it (and run/) the way
    // /run and /run/trellis are on a host, so that only the runtime's own mode counts.
    for open in [node.root().to_path_buf(), node.root().join("run")] {
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
    }
    let runtime_dir = node.root().join("run/runtime");
    assert_eq!(mode(&runtime_dir), 0o700);
    let pod = run_pod(
        node,
        pod_network_pod("private", &busybox.dir.path().join("logs")),
    )
    .await;
    let mut config = busybox.container("nobody", SLEEP);
    let nobody = Some(Int64Value { value: 65534 });
    config.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            run_as_user: nobody,
            run_as_group: nobody,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = start(node, &pod, config).await;
    assert_pod_files_readable(node, &pod, &id).await;

    // On the host, nobody reaches nothing under the runtime's directory...
    let sanity = as_nobody(&["/bin/cat", node.config_path.to_str().expect("utf-8")]);
    assert!(
        sanity.status.success(),
        "nobody can reach the node's root: {sanity:?}"
    );
    let paths = [
        runtime_dir.clone(),
        runtime_dir.join("containers"),
        runtime_dir.join("containers").join(&id).join("config.json"),
        runtime_dir.join("pods").join(&pod.id).join("hosts"),
        runtime_dir.join("runc"),
    ];
    for path in &paths {
        let path = path.to_str().expect("utf-8");
        let tool = if path.ends_with("json") || path.ends_with("hosts") {
            "/bin/cat"
        } else {
            "/bin/ls"
        };
        let denied = as_nobody(&[tool, path]);
        assert!(
            !denied.status.success()
                && String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
            "{tool} {path} as nobody: {denied:?}"
        );
    }

    // ... and a node whose directory was opened (made before this rule) is closed again
    // when the runtime service starts.
    std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755");
    let old = node.info("runtime").await.expect("info").pid;
    trellis_integration::kill9(old);
    node.wait_restarted("runtime", old, Duration::from_secs(15))
        .await;
    assert_eq!(mode(&runtime_dir), 0o700, "private again after a start");
    assert_pod_files_readable(node, &pod, &id).await;
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// A container running as nobody reads its hostname, hosts and resolv.conf and writes
/// its /dev/shm.
async fn assert_pod_files_readable(node: &Node, pod: &Pod, id: &str) {
    let seen = shell(node, id, "id -u; cat /etc/hostname /etc/resolv.conf /etc/hosts && echo shared > /dev/shm/note && cat /dev/shm/note").await;
    assert_eq!(seen.code, 0, "{seen:?}");
    assert!(
        seen.stdout
            .starts_with("65534\nprivate\nnameserver 10.0.0.10\n"),
        "{seen:?}"
    );
    assert!(
        seen.stdout.contains("\tprivate\n") && seen.stdout.ends_with("shared\n"),
        "{seen:?}"
    );
    let status = node
        .runtime()
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner();
    let ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .expect("a pod IP");
    assert!(seen.stdout.contains(&format!("{ip}\tprivate")), "{seen:?}");
}
