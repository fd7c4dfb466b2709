//! Where a pod's pieces live under its directory, and its hostname: facts the spec
//! and the lifecycle both need, computed from the pod's config alone.

use std::path::{Path, PathBuf};

use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};

/// A namespace of the pod (`ipc`, `uts`), pinned by a bind mount.
pub fn pin_path(pod_dir: &Path, kind: &str) -> PathBuf {
    pod_dir.join("ns").join(kind)
}

/// The pod's `/dev/shm` (a tmpfs when the pod has its own IPC namespace).
pub fn shm_path(pod_dir: &Path) -> PathBuf {
    pod_dir.join("shm")
}

/// Whether the pod shares the node's network namespace.
pub fn on_host_network(config: &PodSandboxConfig) -> bool {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.network == NamespaceMode::Node as i32)
}

/// The pod's hostname: the node's for a pod on the host's network (its UTS
/// namespace is the host's, and the kubelet sends none: `HOSTNAME` and
/// `/etc/hostname` must agree with `hostname`, as under containerd and CRI-O); else
/// the requested one (checked at RunPodSandbox), else the pod's name, cut to the 63
/// characters the kernel (and DNS) allow, as the kubelet does.
pub fn hostname_of(config: &PodSandboxConfig, node_hostname: &str) -> String {
    if on_host_network(config) {
        return node_hostname.to_string();
    }
    if !config.hostname.is_empty() {
        return config.hostname.clone();
    }
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .unwrap_or_default();
    let mut hostname: String = name
        .trim_start_matches(['-', '.'])
        .chars()
        .take(63)
        .collect();
    while hostname.ends_with(['-', '.']) {
        hostname.pop();
    }
    hostname
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::PodSandboxMetadata;

    #[test]
    fn long_pod_names_make_valid_hostnames() {
        let long = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: format!("{}-{}", "a".repeat(62), "tail"),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(hostname_of(&long, "node"), "a".repeat(62));
        let given = PodSandboxConfig {
            hostname: "web-0".into(),
            ..long
        };
        assert_eq!(hostname_of(&given, "node"), "web-0");
        let on_host_network = PodSandboxConfig {
            linux: Some(k8s_cri::v1::LinuxPodSandboxConfig {
                security_context: Some(k8s_cri::v1::LinuxSandboxSecurityContext {
                    namespace_options: Some(k8s_cri::v1::NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..given
        };
        assert_eq!(hostname_of(&on_host_network, "node"), "node");
    }
}
