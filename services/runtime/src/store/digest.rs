//! A digest of a CRI config as the kubelet sent it, kept in the record, so that a
//! repeated RunPodSandbox or CreateContainer (a retry after a lost answer or a
//! kill -9) is told apart from a different config under the same name.
//!
//! prost encodes the CRI's `map` fields from `HashMap`s in their iteration order,
//! which differs between two decodings of the same bytes: the maps are taken out
//! of a copy and hashed sorted after its encoding, so equal configs always give
//! equal digests. A map field this does not know of (a newer CRI) only makes two
//! equal configs look different (AlreadyExists, as before), never the reverse.

use std::collections::HashMap;

use k8s_cri::v1::{ContainerConfig, ImageSpec, LinuxContainerResources, PodSandboxConfig};
use prost::Message;
use sha2::{Digest, Sha256};

/// Hashes a length-prefixed field, so that no two sequences of fields collide.
fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Hashes a map, named by its place in the config, in key order.
fn map(hasher: &mut Sha256, place: &str, entries: HashMap<String, String>) {
    field(hasher, place.as_bytes());
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort();
    hasher.update((entries.len() as u64).to_le_bytes());
    for (key, value) in entries {
        field(hasher, key.as_bytes());
        field(hasher, value.as_bytes());
    }
}

fn image_maps(
    maps: &mut Vec<(String, HashMap<String, String>)>,
    place: &str,
    image: &mut ImageSpec,
) {
    maps.push((
        format!("{place}.annotations"),
        std::mem::take(&mut image.annotations),
    ));
}

fn resources_maps(
    maps: &mut Vec<(String, HashMap<String, String>)>,
    place: &str,
    resources: &mut LinuxContainerResources,
) {
    maps.push((
        format!("{place}.unified"),
        std::mem::take(&mut resources.unified),
    ));
}

fn finish(encoded: Vec<u8>, maps: Vec<(String, HashMap<String, String>)>) -> Vec<u8> {
    let mut hasher = Sha256::new();
    field(&mut hasher, &encoded);
    for (place, entries) in maps {
        map(&mut hasher, &place, entries);
    }
    hasher.finalize().to_vec()
}

/// The digest of a pod's config (its runtime handler is compared beside it).
pub fn pod_config_digest(config: &PodSandboxConfig) -> Vec<u8> {
    let mut config = config.clone();
    let mut maps = vec![
        ("labels".to_string(), std::mem::take(&mut config.labels)),
        (
            "annotations".to_string(),
            std::mem::take(&mut config.annotations),
        ),
    ];
    if let Some(linux) = config.linux.as_mut() {
        maps.push((
            "linux.sysctls".to_string(),
            std::mem::take(&mut linux.sysctls),
        ));
        if let Some(overhead) = linux.overhead.as_mut() {
            resources_maps(&mut maps, "linux.overhead", overhead);
        }
        if let Some(resources) = linux.resources.as_mut() {
            resources_maps(&mut maps, "linux.resources", resources);
        }
    }
    finish(config.encode_to_vec(), maps)
}

/// The digest of a container's config as sent to CreateContainer.
pub fn container_config_digest(config: &ContainerConfig) -> Vec<u8> {
    let mut config = config.clone();
    let mut maps = vec![
        ("labels".to_string(), std::mem::take(&mut config.labels)),
        (
            "annotations".to_string(),
            std::mem::take(&mut config.annotations),
        ),
    ];
    if let Some(image) = config.image.as_mut() {
        image_maps(&mut maps, "image", image);
    }
    for (i, mount) in config.mounts.iter_mut().enumerate() {
        if let Some(image) = mount.image.as_mut() {
            image_maps(&mut maps, &format!("mounts[{i}].image"), image);
        }
    }
    if let Some(resources) = config.linux.as_mut().and_then(|l| l.resources.as_mut()) {
        resources_maps(&mut maps, "linux.resources", resources);
    }
    finish(config.encode_to_vec(), maps)
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::{LinuxContainerConfig, LinuxPodSandboxConfig, Mount};

    use super::*;

    fn entries(n: usize, reversed: bool) -> HashMap<String, String> {
        let mut keys: Vec<usize> = (0..n).collect();
        if reversed {
            keys.reverse();
        }
        // Each HashMap has its own random order; built in two orders besides.
        keys.into_iter()
            .map(|i| (format!("key-{i}"), format!("value-{i}")))
            .collect()
    }

    fn pod(reversed: bool) -> PodSandboxConfig {
        PodSandboxConfig {
            labels: entries(40, reversed),
            annotations: entries(40, !reversed),
            linux: Some(LinuxPodSandboxConfig {
                sysctls: entries(20, reversed),
                resources: Some(LinuxContainerResources {
                    unified: entries(20, reversed),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container(reversed: bool) -> ContainerConfig {
        ContainerConfig {
            labels: entries(40, reversed),
            annotations: entries(40, !reversed),
            image: Some(ImageSpec {
                image: "busybox".into(),
                annotations: entries(20, reversed),
                ..Default::default()
            }),
            mounts: vec![Mount {
                container_path: "/data".into(),
                image: Some(ImageSpec {
                    annotations: entries(20, !reversed),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    unified: entries(20, reversed),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn equal_configs_have_equal_digests_whatever_their_maps_order() {
        let a = pod(false);
        for _ in 0..10 {
            assert_eq!(pod_config_digest(&a), pod_config_digest(&pod(true)));
            // A decoding makes new HashMaps, in another order.
            let decoded = PodSandboxConfig::decode(a.encode_to_vec().as_slice()).expect("decode");
            assert_eq!(pod_config_digest(&a), pod_config_digest(&decoded));
            assert_eq!(
                container_config_digest(&container(false)),
                container_config_digest(&container(true))
            );
        }
    }

    #[test]
    fn any_difference_changes_the_digest() {
        let base = container(false);
        let mut label = base.clone();
        label.labels.insert("key-0".into(), "other".into());
        let mut moved = base.clone();
        // The same entries under another map are another config.
        let entry = moved.labels.remove("key-1").expect("entry");
        moved.annotations.insert("key-1".into(), entry);
        let mut command = base.clone();
        command.command = vec!["sh".into()];
        let mut unified = base.clone();
        if let Some(r) = unified.linux.as_mut().and_then(|l| l.resources.as_mut()) {
            r.unified.insert("memory.max".into(), "1".into());
        }
        let digest = container_config_digest(&base);
        for other in [label, moved, command, unified] {
            assert_ne!(digest, container_config_digest(&other));
        }
        let mut sysctl = pod(false);
        if let Some(l) = sysctl.linux.as_mut() {
            l.sysctls.insert("net.x".into(), "1".into());
        }
        assert_ne!(pod_config_digest(&pod(false)), pod_config_digest(&sysctl));
    }
}
