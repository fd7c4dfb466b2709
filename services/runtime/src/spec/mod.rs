//! The OCI runtime spec of a container, from the image config and the CRI configs.

pub mod apparmor;
pub mod capabilities;
pub mod devices;
pub mod pod;
pub mod propagation;
pub mod resources;
pub mod seccomp;
pub mod user;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_cri::v1::{ContainerConfig, NamespaceMode, NamespaceOption, PodSandboxConfig};
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, Mount, RootBuilder, Spec, UserBuilder,
};
use trellis_proto::storage::v1::ImageConfig;

use crate::error::RuntimeError;
use propagation::bind;

/// The identity the container's process runs as.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub container: &'a ContainerConfig,
    pub sandbox: &'a PodSandboxConfig,
    pub pod_dir: &'a Path,
    pub netns_path: &'a str,
    pub image: &'a ImageConfig,
    pub rootfs: &'a Path,
    pub user: ResolvedUser,
    /// This service's own oom_score_adj: the floor, since it cannot go lower.
    pub oom_score_floor: i32,
    /// The PID namespace to join (the pod's pause process's), when the pod shares one.
    pub pid_namespace: Option<PathBuf>,
    /// The node's hostname: a host-network pod's.
    pub node_hostname: &'a str,
}

/// The cgroupfs path of a container under the pod's cgroup parent: a cgroupfs path
/// as given, a systemd slice name expanded the way systemd nests slices
/// (`a-b.slice` → `/a.slice/a-b.slice`), or `/trellis` when there is none.
pub fn cgroups_path(parent: &str, container_id: &str) -> String {
    let parent = if let Some(name) = parent.strip_suffix(".slice").filter(|n| !n.contains('/')) {
        let mut path = String::new();
        let mut prefix = String::new();
        for part in name.split('-').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('-');
            }
            prefix.push_str(part);
            path.push_str(&format!("/{prefix}.slice"));
        }
        path
    } else if parent.starts_with('/') {
        parent.trim_end_matches('/').to_string()
    } else {
        "/trellis".to_string()
    };
    format!("{parent}/{container_id}")
}

/// The namespaces of a container: the pod's network and IPC, and the PID mode the
/// container asks for (its own, the pod's, a target's) unless its pod uses the host's.
/// The host's namespaces are the pod's to ask for at RunPodSandbox: a container asking
/// for one its pod does not have is refused, not given it.
pub fn namespaces_of(
    pod: Option<&NamespaceOption>,
    container: Option<&NamespaceOption>,
) -> Result<NamespaceOption, RuntimeError> {
    let pod = pod.cloned().unwrap_or_default();
    let node = NamespaceMode::Node as i32;
    if let Some(asked) = container {
        for (kind, asked, has) in [
            ("network", asked.network, pod.network),
            ("pid", asked.pid, pod.pid),
            ("ipc", asked.ipc, pod.ipc),
        ] {
            if asked == node && has != node {
                return Err(RuntimeError::InvalidArgument(format!(
                    "ContainerConfig.linux.security_context.namespace_options.{kind} is NODE but the pod does not use the host's {kind} namespace: host namespaces are set for the whole pod at RunPodSandbox"
                )));
            }
        }
    }
    let pid = match container {
        Some(asked) if pod.pid != node && NamespaceMode::try_from(asked.pid).is_ok() => asked.pid,
        _ => pod.pid,
    };
    Ok(NamespaceOption { pid, ..pod })
}

pub(crate) fn built<T, E: std::fmt::Display>(
    result: Result<T, E>,
    what: &str,
) -> Result<T, RuntimeError> {
    result.map_err(|e| RuntimeError::Oci(format!("cannot build the OCI {what}: {e}")))
}

/// The command: the CRI's command and args over the image's entrypoint and cmd.
pub fn command(
    container: &ContainerConfig,
    image: &ImageConfig,
) -> Result<Vec<String>, RuntimeError> {
    let entrypoint = if container.command.is_empty() {
        image.entrypoint.clone()
    } else {
        container.command.clone()
    };
    let args = if !container.args.is_empty() {
        container.args.clone()
    } else if container.command.is_empty() {
        image.cmd.clone()
    } else {
        Vec::new()
    };
    let command: Vec<String> = entrypoint.into_iter().chain(args).collect();
    if command.is_empty() {
        return Err(RuntimeError::InvalidArgument(
            "the container has no command: neither the request nor the image names one".into(),
        ));
    }
    Ok(command)
}

fn environment(container: &ContainerConfig, image: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    let mut set = |key: &str, value: &str| {
        if !values.contains_key(key) {
            order.push(key.to_string());
        }
        values.insert(key.to_string(), value.to_string());
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for entry in &image.env {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        set(key, value);
    }
    set("HOSTNAME", hostname);
    for env in &container.envs {
        set(&env.key, &env.value);
    }
    order
        .into_iter()
        .map(|key| format!("{key}={}", values[&key]))
        .collect()
}

fn namespace(
    kind: LinuxNamespaceType,
    path: Option<PathBuf>,
) -> Result<LinuxNamespace, RuntimeError> {
    let mut builder = LinuxNamespaceBuilder::default().typ(kind);
    if let Some(path) = path {
        builder = builder.path(path);
    }
    built(builder.build(), "namespace")
}

pub fn build(input: &SpecInput<'_>) -> Result<Spec, RuntimeError> {
    let container = input.container;
    let security = container
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    if security.is_some_and(|s| {
        s.run_as_group.is_some() && s.run_as_user.is_none() && s.run_as_username.is_empty()
    }) {
        return Err(RuntimeError::InvalidArgument(
            "run_as_group needs run_as_user or run_as_username".into(),
        ));
    }
    let pod_security = input
        .sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let namespaces = namespaces_of(
        pod_security.and_then(|s| s.namespace_options.as_ref()),
        security.and_then(|s| s.namespace_options.as_ref()),
    )?;
    let privileged = security.is_some_and(|s| s.privileged);
    if privileged && !pod_security.is_some_and(|s| s.privileged) {
        return Err(RuntimeError::InvalidArgument("a privileged container needs a privileged pod sandbox (linux.security_context.privileged)".into()));
    }
    let hostname = pod::hostname_of(input.sandbox, input.node_hostname);

    let mut spec = Spec::default();
    spec.set_hostname((namespaces.network != NamespaceMode::Node as i32).then(|| hostname.clone()));
    spec.set_root(Some(built(
        RootBuilder::default()
            .path(input.rootfs)
            .readonly(security.is_some_and(|s| s.readonly_rootfs))
            .build(),
        "root",
    )?));
    let mut annotations: HashMap<String, String> = container.annotations.clone();
    annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    annotations.insert(
        "io.kubernetes.cri.sandbox-id".into(),
        input
            .sandbox
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default(),
    );
    spec.set_annotations(Some(annotations));

    // Process.
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| RuntimeError::Oci("default spec has no process".into()))?;
    process.set_args(Some(command(container, input.image)?));
    process.set_env(Some(environment(container, input.image, &hostname)));
    let cwd = if !container.working_dir.is_empty() {
        container.working_dir.clone()
    } else if !input.image.working_dir.is_empty() {
        input.image.working_dir.clone()
    } else {
        "/".into()
    };
    process.set_cwd(PathBuf::from(cwd));
    process.set_terminal(Some(container.tty));
    let user = &input.user;
    process.set_user(built(
        UserBuilder::default()
            .uid(user.uid)
            .gid(user.gid)
            .additional_gids(user.additional_gids.clone())
            .build(),
        "user",
    )?);
    process.set_no_new_privileges(Some(security.is_some_and(|s| s.no_new_privs)));
    let requested_oom = container
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .map(|r| r.oom_score_adj as i32)
        .unwrap_or(0);
    process.set_oom_score_adj(Some(requested_oom.max(input.oom_score_floor)));
    let capabilities = capabilities::resolve(security, privileged, capabilities::host())?;
    process.set_apparmor_profile(apparmor::for_container(security, privileged)?);
    process.set_capabilities(Some(built(
        LinuxCapabilitiesBuilder::default()
            .bounding(capabilities.clone())
            .effective(capabilities.clone())
            .permitted(capabilities.clone())
            .inheritable(HashSet::new())
            .ambient(HashSet::new())
            .build(),
        "capabilities",
    )?));

    // Mounts: the defaults (sysfs and cgroupfs writable when privileged), the pod's
    // files and /dev/shm, then the request's own.
    let mut mounts: Vec<Mount> = spec
        .mounts()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.destination() != Path::new("/dev/shm"))
        .collect();
    // /proc as containerd and CRI-O mount it: nothing set-uid, executable or a
    // device node through it.
    for mount in mounts
        .iter_mut()
        .filter(|m| m.destination() == Path::new("/proc"))
    {
        let mut options = mount.options().clone().unwrap_or_default();
        for wanted in ["nosuid", "noexec", "nodev"] {
            if !options.iter().any(|o| o == wanted) {
                options.push(wanted.to_string());
            }
        }
        mount.set_options(Some(options));
    }
    if privileged {
        for mount in mounts
            .iter_mut()
            .filter(|m| matches!(m.typ().as_deref(), Some("sysfs" | "cgroup")))
        {
            let options = mount
                .options()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o != "ro")
                .collect();
            mount.set_options(Some(options));
        }
    }
    let shm = if namespaces.ipc == NamespaceMode::Node as i32 {
        PathBuf::from("/dev/shm")
    } else {
        pod::shm_path(input.pod_dir)
    };
    mounts.push(bind(Path::new("/dev/shm"), &shm, &["rbind", "rw"])?);
    for file in ["hostname", "hosts", "resolv.conf"] {
        mounts.push(bind(
            &Path::new("/etc").join(file),
            &input.pod_dir.join(file),
            &["rbind", "rw"],
        )?);
    }
    let requested = propagation::container_mounts(&container.mounts)?;
    let rootfs_propagation = requested.rootfs_propagation;
    mounts.extend(requested.mounts);
    spec.set_mounts(Some(mounts));

    // Namespaces, cgroup, resources.
    let pin = |kind: &str| Some(pod::pin_path(input.pod_dir, kind));
    let mut linux_namespaces = vec![namespace(LinuxNamespaceType::Mount, None)?];
    if namespaces.pid != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(
            LinuxNamespaceType::Pid,
            input.pid_namespace.clone(),
        )?);
    }
    if namespaces.network != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(
            LinuxNamespaceType::Network,
            (!input.netns_path.is_empty()).then(|| PathBuf::from(input.netns_path)),
        )?);
    }
    if namespaces.ipc != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(LinuxNamespaceType::Ipc, pin("ipc"))?);
    }
    if namespaces.network != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(LinuxNamespaceType::Uts, pin("uts"))?);
    }
    let parent = input
        .sandbox
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    let cgroups_path = cgroups_path(&parent, input.container_id);
    let resources = container
        .linux
        .as_ref()
        .and_then(|l| l.resources.clone())
        .unwrap_or_default();
    // Devices: every host device when privileged, else none but the OCI runtime's
    // few; the request's own in both cases.
    let mut devices = if privileged {
        devices::privileged()?
    } else {
        devices::Devices {
            rules: vec![devices::deny_all()?],
            ..Default::default()
        }
    };
    let requested = devices::requested(&container.devices)?;
    devices
        .nodes
        .retain(|n| !requested.nodes.iter().any(|r| r.path() == n.path()));
    devices.nodes.extend(requested.nodes);
    devices.rules.extend(requested.rules);
    let linux_resources = resources::linux_resources(&resources, devices.rules)?;
    let defaults = spec.linux().clone().unwrap_or_default();
    let mut linux = LinuxBuilder::default()
        .namespaces(linux_namespaces)
        .cgroups_path(PathBuf::from(cgroups_path))
        .resources(linux_resources)
        .sysctl(
            input
                .sandbox
                .linux
                .as_ref()
                .map(|l| l.sysctls.clone())
                .unwrap_or_default(),
        )
        .devices(devices.nodes);
    if let Some(propagation) = rootfs_propagation {
        linux = linux.rootfs_propagation(propagation);
    }
    if let Some(seccomp) = seccomp::for_container(security, privileged, &capabilities)? {
        linux = linux.seccomp(seccomp);
    }
    // The builder starts from the default masked and read-only paths: a privileged
    // container has none.
    let (masked, readonly) = if privileged {
        (Vec::new(), Vec::new())
    } else {
        let masked = security
            .map(|s| s.masked_paths.clone())
            .filter(|p| !p.is_empty())
            .or_else(|| defaults.masked_paths().clone())
            .unwrap_or_default();
        let readonly = security
            .map(|s| s.readonly_paths.clone())
            .filter(|p| !p.is_empty())
            .or_else(|| defaults.readonly_paths().clone())
            .unwrap_or_default();
        (masked, readonly)
    };
    linux = linux.masked_paths(masked).readonly_paths(readonly);
    spec.set_linux(Some(built(linux.build(), "linux section")?));
    Ok(spec)
}

#[cfg(test)]
mod tests;
