//! The OCI runtime spec of a container, from the image config and the CRI configs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_cri::v1::{ContainerConfig, NamespaceMode, PodSandboxConfig};
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount, MountBuilder, RootBuilder, Spec, UserBuilder,
};
use trellis_proto::storage::v1::ImageConfig;

use crate::error::RuntimeError;

/// Capabilities a container gets unless its security context says otherwise (the
/// same set CRI-O and containerd give).
const DEFAULT_CAPABILITIES: [Capability; 11] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::Kill,
    Capability::SysChroot,
    Capability::Mknod,
];

/// Every capability, for privileged containers and `add: [ALL]`.
const ALL_CAPABILITIES: [Capability; 41] = [
    Capability::AuditControl,
    Capability::AuditRead,
    Capability::AuditWrite,
    Capability::BlockSuspend,
    Capability::Bpf,
    Capability::CheckpointRestore,
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::Kill,
    Capability::Lease,
    Capability::LinuxImmutable,
    Capability::MacAdmin,
    Capability::MacOverride,
    Capability::Mknod,
    Capability::NetAdmin,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetRaw,
    Capability::Perfmon,
    Capability::Setgid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::Setuid,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysChroot,
    Capability::SysModule,
    Capability::SysNice,
    Capability::SysPacct,
    Capability::SysPtrace,
    Capability::SysRawio,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Syslog,
    Capability::WakeAlarm,
];

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

fn invalid(message: String) -> RuntimeError {
    RuntimeError::InvalidArgument(message)
}

fn built<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> Result<T, RuntimeError> {
    result.map_err(|e| RuntimeError::Oci(format!("cannot build the OCI {what}: {e}")))
}

/// The command: the CRI's command and args over the image's entrypoint and cmd.
pub fn command(container: &ContainerConfig, image: &ImageConfig) -> Result<Vec<String>, RuntimeError> {
    let entrypoint = if container.command.is_empty() { image.entrypoint.clone() } else { container.command.clone() };
    let args = if !container.args.is_empty() {
        container.args.clone()
    } else if container.command.is_empty() {
        image.cmd.clone()
    } else {
        Vec::new()
    };
    let command: Vec<String> = entrypoint.into_iter().chain(args).collect();
    if command.is_empty() {
        return Err(invalid("the container has no command: neither the request nor the image names one".into()));
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
    set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for entry in &image.env {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        set(key, value);
    }
    set("HOSTNAME", hostname);
    for env in &container.envs {
        set(&env.key, &env.value);
    }
    order.into_iter().map(|key| format!("{key}={}", values[&key])).collect()
}

fn parse_capability(name: &str) -> Result<Capability, RuntimeError> {
    let upper = name.trim().to_ascii_uppercase();
    upper.trim_start_matches("CAP_").parse().map_err(|_| invalid(format!("unknown capability `{name}`")))
}

fn namespace(kind: LinuxNamespaceType, path: Option<PathBuf>) -> Result<LinuxNamespace, RuntimeError> {
    let mut builder = LinuxNamespaceBuilder::default().typ(kind);
    if let Some(path) = path {
        builder = builder.path(path);
    }
    built(builder.build(), "namespace")
}

fn bind(destination: &str, source: &Path, options: &[&str]) -> Result<Mount, RuntimeError> {
    built(
        MountBuilder::default()
            .destination(destination)
            .typ("bind")
            .source(source)
            .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build(),
        "mount",
    )
}

pub fn build(input: &SpecInput<'_>) -> Result<Spec, RuntimeError> {
    let container = input.container;
    let security = container.linux.as_ref().and_then(|l| l.security_context.as_ref());
    if security.is_some_and(|s| s.run_as_group.is_some() && s.run_as_user.is_none() && s.run_as_username.is_empty()) {
        return Err(invalid("run_as_group needs run_as_user or run_as_username".into()));
    }
    let pod_security = input.sandbox.linux.as_ref().and_then(|l| l.security_context.as_ref());
    let namespaces = security.and_then(|s| s.namespace_options.clone()).or_else(|| pod_security.and_then(|s| s.namespace_options.clone())).unwrap_or_default();
    let privileged = security.is_some_and(|s| s.privileged);
    let hostname = crate::sandbox::hostname_of(input.sandbox);

    let mut spec = Spec::default();
    spec.set_hostname((namespaces.network != NamespaceMode::Node as i32).then(|| hostname.clone()));
    spec.set_root(Some(built(RootBuilder::default().path(input.rootfs).readonly(security.is_some_and(|s| s.readonly_rootfs)).build(), "root")?));
    let mut annotations: HashMap<String, String> = container.annotations.clone();
    annotations.insert("io.kubernetes.cri.container-type".into(), "container".into());
    annotations.insert("io.kubernetes.cri.sandbox-id".into(), input.sandbox.metadata.as_ref().map(|m| m.uid.clone()).unwrap_or_default());
    spec.set_annotations(Some(annotations));

    // Process.
    let process = spec.process_mut().as_mut().ok_or_else(|| RuntimeError::Oci("default spec has no process".into()))?;
    process.set_args(Some(command(container, input.image)?));
    process.set_env(Some(environment(container, input.image, &hostname)));
    let cwd = if !container.working_dir.is_empty() { container.working_dir.clone() } else if !input.image.working_dir.is_empty() { input.image.working_dir.clone() } else { "/".into() };
    process.set_cwd(PathBuf::from(cwd));
    process.set_terminal(Some(container.tty));
    let user = &input.user;
    process.set_user(built(UserBuilder::default().uid(user.uid).gid(user.gid).additional_gids(user.additional_gids.clone()).build(), "user")?);
    process.set_no_new_privileges(Some(security.is_some_and(|s| s.no_new_privs)));
    let requested_oom = container.linux.as_ref().and_then(|l| l.resources.as_ref()).map(|r| r.oom_score_adj as i32).unwrap_or(0);
    process.set_oom_score_adj(Some(requested_oom.max(input.oom_score_floor)));
    let capabilities: HashSet<Capability> = if privileged {
        ALL_CAPABILITIES.into_iter().collect()
    } else {
        let mut set: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
        if let Some(requested) = security.and_then(|s| s.capabilities.as_ref()) {
            if requested.add_capabilities.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
                set = ALL_CAPABILITIES.into_iter().collect();
            } else {
                for name in &requested.add_capabilities {
                    set.insert(parse_capability(name)?);
                }
            }
            if requested.drop_capabilities.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
                set.clear();
            }
            for name in requested.drop_capabilities.iter().filter(|c| !c.eq_ignore_ascii_case("ALL")) {
                set.remove(&parse_capability(name)?);
            }
        }
        set
    };
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

    // Mounts: the defaults, the pod's files and /dev/shm, then the request's own.
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default().into_iter().filter(|m| m.destination() != Path::new("/dev/shm")).collect();
    let shm = if namespaces.ipc == NamespaceMode::Node as i32 { PathBuf::from("/dev/shm") } else { crate::namespaces::shm_path(input.pod_dir) };
    mounts.push(bind("/dev/shm", &shm, &["rbind", "rw"])?);
    for file in ["hostname", "hosts", "resolv.conf"] {
        mounts.push(bind(&format!("/etc/{file}"), &input.pod_dir.join(file), &["rbind", "rw"])?);
    }
    for mount in &container.mounts {
        let source = Path::new(&mount.host_path);
        if !source.is_absolute() || !source.exists() {
            return Err(invalid(format!("mount source {} does not exist (or is not an absolute path)", mount.host_path)));
        }
        if !mount.container_path.starts_with('/') {
            return Err(invalid(format!("mount destination {} must be an absolute path", mount.container_path)));
        }
        let propagation = match mount.propagation {
            1 => "rslave",
            2 => "rshared",
            _ => "rprivate",
        };
        let access = if mount.readonly { "ro" } else { "rw" };
        mounts.push(bind(&mount.container_path, source, &["rbind", access, propagation])?);
    }
    spec.set_mounts(Some(mounts));

    // Namespaces, cgroup, resources.
    let pin = |kind: &str| Some(crate::namespaces::pin_path(input.pod_dir, kind));
    let mut linux_namespaces = vec![namespace(LinuxNamespaceType::Mount, None)?];
    if namespaces.pid != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(LinuxNamespaceType::Pid, input.pid_namespace.clone())?);
    }
    if namespaces.network != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(LinuxNamespaceType::Network, (!input.netns_path.is_empty()).then(|| PathBuf::from(input.netns_path)))?);
    }
    if namespaces.ipc != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(LinuxNamespaceType::Ipc, pin("ipc"))?);
    }
    if namespaces.network != NamespaceMode::Node as i32 {
        linux_namespaces.push(namespace(LinuxNamespaceType::Uts, pin("uts"))?);
    }
    let parent = input.sandbox.linux.as_ref().map(|l| l.cgroup_parent.clone()).unwrap_or_default();
    let cgroups_path = cgroups_path(&parent, input.container_id);
    let resources = container.linux.as_ref().and_then(|l| l.resources.clone()).unwrap_or_default();
    let mut memory = LinuxMemoryBuilder::default();
    if resources.memory_limit_in_bytes > 0 {
        memory = memory.limit(resources.memory_limit_in_bytes);
    }
    let mut cpu = LinuxCpuBuilder::default();
    if resources.cpu_shares > 0 {
        cpu = cpu.shares(resources.cpu_shares as u64);
    }
    if resources.cpu_quota > 0 {
        cpu = cpu.quota(resources.cpu_quota);
    }
    if resources.cpu_period > 0 {
        cpu = cpu.period(resources.cpu_period as u64);
    }
    let linux_resources = built(
        LinuxResourcesBuilder::default().memory(built(memory.build(), "memory limits")?).cpu(built(cpu.build(), "cpu limits")?).build(),
        "resources",
    )?;
    let defaults = spec.linux().clone().unwrap_or_default();
    let mut linux = LinuxBuilder::default()
        .namespaces(linux_namespaces)
        .cgroups_path(PathBuf::from(cgroups_path))
        .resources(linux_resources)
        .sysctl(input.sandbox.linux.as_ref().map(|l| l.sysctls.clone()).unwrap_or_default());
    if !privileged {
        let masked = security.map(|s| s.masked_paths.clone()).filter(|p| !p.is_empty()).or_else(|| defaults.masked_paths().clone()).unwrap_or_default();
        let readonly = security.map(|s| s.readonly_paths.clone()).filter(|p| !p.is_empty()).or_else(|| defaults.readonly_paths().clone()).unwrap_or_default();
        linux = linux.masked_paths(masked).readonly_paths(readonly);
    }
    spec.set_linux(Some(built(linux.build(), "linux section")?));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parents_of_both_kinds() {
        assert_eq!(cgroups_path("", "c1"), "/trellis/c1");
        assert_eq!(cgroups_path("/kubepods/besteffort/pod12/", "c1"), "/kubepods/besteffort/pod12/c1");
        assert_eq!(cgroups_path("kubepods-besteffort-pod12.slice", "c1"), "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/c1");
    }

    #[test]
    fn command_prefers_the_request_then_the_image() {
        let image = ImageConfig { entrypoint: vec!["/entry".into()], cmd: vec!["default".into()], ..Default::default() };
        let plain = ContainerConfig::default();
        assert_eq!(command(&plain, &image).expect("image"), vec!["/entry", "default"]);
        let args = ContainerConfig { args: vec!["x".into()], ..Default::default() };
        assert_eq!(command(&args, &image).expect("args"), vec!["/entry", "x"]);
        let cmd = ContainerConfig { command: vec!["/bin/sh".into()], ..Default::default() };
        assert_eq!(command(&cmd, &image).expect("command"), vec!["/bin/sh"]);
        assert!(command(&plain, &ImageConfig::default()).is_err());
    }
}
