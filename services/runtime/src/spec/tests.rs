//! The spec from CRI configs: namespaces, privileges, devices and mounts.
use super::*;

#[test]
fn cgroup_parents_of_both_kinds() {
    assert_eq!(cgroups_path("", "c1"), "/trellis/c1");
    assert_eq!(
        cgroups_path("/kubepods/besteffort/pod12/", "c1"),
        "/kubepods/besteffort/pod12/c1"
    );
    assert_eq!(
        cgroups_path("kubepods-besteffort-pod12.slice", "c1"),
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/c1"
    );
}

#[test]
fn command_prefers_the_request_then_the_image() {
    let image = ImageConfig {
        entrypoint: vec!["/entry".into()],
        cmd: vec!["default".into()],
        ..Default::default()
    };
    let plain = ContainerConfig::default();
    assert_eq!(
        command(&plain, &image).expect("image"),
        vec!["/entry", "default"]
    );
    let args = ContainerConfig {
        args: vec!["x".into()],
        ..Default::default()
    };
    assert_eq!(command(&args, &image).expect("args"), vec!["/entry", "x"]);
    let cmd = ContainerConfig {
        command: vec!["/bin/sh".into()],
        ..Default::default()
    };
    assert_eq!(command(&cmd, &image).expect("command"), vec!["/bin/sh"]);
    assert!(command(&plain, &ImageConfig::default()).is_err());
}

#[test]
fn host_namespaces_are_the_pods_to_ask_for() {
    let (node, pod, own) = (
        NamespaceMode::Node as i32,
        NamespaceMode::Pod as i32,
        NamespaceMode::Container as i32,
    );
    let options = |network, pid, ipc| NamespaceOption {
        network,
        pid,
        ipc,
        ..Default::default()
    };
    let pod_network = options(pod, pod, pod);
    assert_eq!(
        namespaces_of(Some(&pod_network), None).expect("the pod's"),
        pod_network
    );
    assert_eq!(
        namespaces_of(Some(&pod_network), Some(&options(pod, own, pod)))
            .expect("a PID namespace of its own")
            .pid,
        own
    );
    for (kind, asked) in [
        ("network", options(node, pod, pod)),
        ("pid", options(pod, node, pod)),
        ("ipc", options(pod, pod, node)),
    ] {
        let error = namespaces_of(Some(&pod_network), Some(&asked)).expect_err(kind);
        assert!(
            matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains(&format!("namespace_options.{kind}"))),
            "{error}"
        );
    }
    assert!(
        namespaces_of(None, Some(&options(node, pod, pod))).is_err(),
        "no pod options: no host namespace"
    );
    let host = options(node, node, node);
    assert_eq!(
        namespaces_of(Some(&host), Some(&options(pod, own, pod)))
            .expect("the pod's host namespaces"),
        host,
        "the pod decides"
    );
}

fn spec_of(container: ContainerConfig, pod_privileged: bool) -> Result<Spec, RuntimeError> {
    let sandbox = PodSandboxConfig {
        linux: Some(k8s_cri::v1::LinuxPodSandboxConfig {
            security_context: Some(k8s_cri::v1::LinuxSandboxSecurityContext {
                privileged: pod_privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container = ContainerConfig {
        command: vec!["/bin/sh".into()],
        ..container
    };
    build(&SpecInput {
        container_id: "c1",
        container: &container,
        sandbox: &sandbox,
        pod_dir: Path::new("/run/pod"),
        netns_path: "",
        image: &ImageConfig::default(),
        rootfs: Path::new("/rootfs"),
        user: ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
        },
        oom_score_floor: 0,
        pid_namespace: None,
        node_hostname: "node",
    })
}

fn with_security(security: k8s_cri::v1::LinuxContainerSecurityContext) -> ContainerConfig {
    ContainerConfig {
        linux: Some(k8s_cri::v1::LinuxContainerConfig {
            security_context: Some(security),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn privileged() -> ContainerConfig {
    with_security(k8s_cri::v1::LinuxContainerSecurityContext {
        privileged: true,
        seccomp: Some(Default::default()),
        ..Default::default()
    })
}

#[test]
fn privileged_containers_get_everything_the_host_has() {
    let spec = spec_of(privileged(), true).expect("privileged spec");
    let process = spec.process().clone().expect("process");
    let bounding = process
        .capabilities()
        .clone()
        .expect("caps")
        .bounding()
        .clone()
        .expect("bounding");
    assert_eq!(&bounding, capabilities::host());
    let linux = spec.linux().clone().expect("linux");
    assert!(
        linux.seccomp().is_none(),
        "privileged ignores its seccomp profile"
    );
    assert!(
        linux.masked_paths().as_ref().is_none_or(Vec::is_empty)
            && linux.readonly_paths().as_ref().is_none_or(Vec::is_empty)
    );
    let devices = linux.devices().clone().expect("host devices");
    assert!(
        devices.iter().any(|d| d.path() == Path::new("/dev/null")),
        "{devices:?}"
    );
    let rules = linux
        .resources()
        .clone()
        .expect("resources")
        .devices()
        .clone()
        .expect("rules");
    assert!(
        rules[0].allow() && rules[0].access().as_deref() == Some("rwm") && rules[0].typ().is_none()
    );
    let sys = spec
        .mounts()
        .clone()
        .expect("mounts")
        .into_iter()
        .find(|m| m.destination() == Path::new("/sys"))
        .expect("/sys");
    assert!(
        !sys.options()
            .clone()
            .unwrap_or_default()
            .contains(&"ro".to_string()),
        "{sys:?}"
    );
}

#[test]
fn privileged_containers_need_a_privileged_pod() {
    let error = spec_of(privileged(), false).expect_err("unprivileged pod");
    assert!(
        matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains("privileged pod")),
        "{error}"
    );
}

#[test]
fn ordinary_containers_are_confined() {
    let spec = spec_of(
        with_security(k8s_cri::v1::LinuxContainerSecurityContext {
            seccomp: Some(Default::default()),
            ..Default::default()
        }),
        false,
    )
    .expect("spec");
    let linux = spec.linux().clone().expect("linux");
    let seccomp = linux.seccomp().clone().expect("RuntimeDefault filter");
    assert_eq!(
        seccomp.default_action(),
        oci_spec::runtime::LinuxSeccompAction::ScmpActErrno
    );
    assert!(linux.devices().as_ref().is_none_or(Vec::is_empty));
    let rules = linux
        .resources()
        .clone()
        .expect("resources")
        .devices()
        .clone()
        .expect("rules");
    assert_eq!(rules.len(), 1);
    assert!(
        !rules[0].allow(),
        "all devices denied but the runtime's defaults"
    );
    assert!(
        linux
            .masked_paths()
            .as_ref()
            .is_some_and(|p| p.contains(&"/proc/kcore".to_string()))
    );
    let sys = spec
        .mounts()
        .clone()
        .expect("mounts")
        .into_iter()
        .find(|m| m.destination() == Path::new("/sys"))
        .expect("/sys");
    assert!(
        sys.options()
            .clone()
            .unwrap_or_default()
            .contains(&"ro".to_string())
    );
    assert!(linux.rootfs_propagation().is_none());

    let unconfined = spec_of(ContainerConfig::default(), false).expect("no profile");
    assert!(
        unconfined
            .linux()
            .clone()
            .expect("linux")
            .seccomp()
            .is_none(),
        "no profile asked: unconfined"
    );
}

#[test]
fn requested_devices_and_mounts_reach_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ContainerConfig {
        devices: vec![k8s_cri::v1::Device {
            host_path: "/dev/zero".into(),
            container_path: "/dev/myzero".into(),
            permissions: "r".into(),
        }],
        mounts: vec![k8s_cri::v1::Mount {
            host_path: dir.path().display().to_string(),
            container_path: "/data".into(),
            readonly: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let spec = spec_of(config, false).expect("spec");
    let linux = spec.linux().clone().expect("linux");
    let devices = linux.devices().clone().expect("devices");
    assert_eq!(
        devices
            .iter()
            .map(|d| (d.path().clone(), d.major(), d.minor()))
            .collect::<Vec<_>>(),
        vec![(PathBuf::from("/dev/myzero"), 1, 5)]
    );
    let rules = linux
        .resources()
        .clone()
        .expect("resources")
        .devices()
        .clone()
        .expect("rules");
    assert_eq!(
        (
            rules[1].allow(),
            rules[1].major(),
            rules[1].minor(),
            rules[1].access().as_deref()
        ),
        (true, Some(1), Some(5), Some("r"))
    );
    let data = spec
        .mounts()
        .clone()
        .expect("mounts")
        .into_iter()
        .find(|m| m.destination() == Path::new("/data"))
        .expect("/data");
    assert_eq!(
        data.options().clone().expect("options"),
        vec!["rbind", "ro", "rprivate"]
    );

    let missing = ContainerConfig {
        devices: vec![k8s_cri::v1::Device {
            host_path: "/dev/nope".into(),
            container_path: "/dev/nope".into(),
            permissions: "rw".into(),
        }],
        ..Default::default()
    };
    assert!(
        matches!(spec_of(missing, false), Err(RuntimeError::InvalidArgument(ref m)) if m.contains("/dev/nope"))
    );
}
