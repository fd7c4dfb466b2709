//! Device nodes in a container and the cgroup rules that let it use them: the CRI's
//! `devices` (host path → container path, permissions), and every host device for a
//! privileged container.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use k8s_cri::v1::Device;
use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType,
};
use trellis_common::text::{excerpt, excerpt_path};

use crate::error::RuntimeError;

/// Directories of `/dev` that hold no device a container should get, or that the
/// container gets its own of (as runc and containerd skip them).
const SKIPPED_DIRS: [&str; 7] = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];

/// The device nodes to create in a container and its device cgroup rules.
#[derive(Debug, Default)]
pub struct Devices {
    pub nodes: Vec<LinuxDevice>,
    pub rules: Vec<LinuxDeviceCgroup>,
}

fn built<T, E: std::fmt::Display>(result: Result<T, E>) -> Result<T, RuntimeError> {
    result.map_err(|e| RuntimeError::Oci(format!("cannot build an OCI device entry: {e}")))
}

fn rule(
    allow: bool,
    device: Option<&LinuxDevice>,
    access: &str,
) -> Result<LinuxDeviceCgroup, RuntimeError> {
    let mut builder = LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .access(access);
    if let Some(device) = device {
        builder = builder
            .typ(device.typ())
            .major(device.major())
            .minor(device.minor());
    }
    built(builder.build())
}

/// The device at `host` (symbolic links followed) as it should appear at
/// `container`; `None` when `host` is not a character or block device.
fn device_at(host: &Path, container: &Path) -> std::io::Result<Option<LinuxDevice>> {
    let metadata = std::fs::metadata(host)?;
    let kind = metadata.file_type();
    let typ = if kind.is_char_device() {
        LinuxDeviceType::C
    } else if kind.is_block_device() {
        LinuxDeviceType::B
    } else {
        return Ok(None);
    };
    let rdev = metadata.rdev();
    let device = LinuxDeviceBuilder::default()
        .path(container)
        .typ(typ)
        .major(nix::sys::stat::major(rdev) as i64)
        .minor(nix::sys::stat::minor(rdev) as i64)
        .file_mode(metadata.mode() & 0o777)
        .uid(metadata.uid())
        .gid(metadata.gid())
        .build()
        .map_err(std::io::Error::other)?;
    Ok(Some(device))
}

/// Every device under `dir` (not following links to directories), each at the same
/// place under `container_dir`.
fn devices_under(
    dir: &Path,
    container_dir: &Path,
    skip: &[&str],
    found: &mut Vec<LinuxDevice>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let (host, container) = (entry.path(), container_dir.join(&name));
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if !skip.iter().any(|s| name == *s) {
                devices_under(&host, &container, skip, found)?;
            }
            continue;
        }
        if kind.is_symlink() || name == "console" {
            continue;
        }
        match device_at(&host, &container) {
            Ok(Some(device)) => found.push(device),
            Ok(None) => {}
            // Devices come and go (hot-plug): one that vanished meanwhile is skipped.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Every device of the host's `/dev` and a rule allowing all devices: what a
/// privileged container gets.
pub fn privileged() -> Result<Devices, RuntimeError> {
    let mut nodes = Vec::new();
    devices_under(
        Path::new("/dev"),
        Path::new("/dev"),
        &SKIPPED_DIRS,
        &mut nodes,
    )
    .map_err(|source| RuntimeError::io("cannot list the host's devices in /dev", source))?;
    Ok(Devices {
        nodes,
        rules: vec![rule(true, None, "rwm")?],
    })
}

/// A rule denying every device, which the OCI runtime follows with the few every
/// container needs (null, zero, random, tty, pts...) and the rules of `requested`.
pub fn deny_all() -> Result<LinuxDeviceCgroup, RuntimeError> {
    rule(false, None, "rwm")
}

fn permissions(device: &Device) -> Result<String, RuntimeError> {
    if device.permissions.is_empty() {
        return Ok("rwm".into());
    }
    if device.permissions.chars().any(|c| !"rwm".contains(c)) {
        return Err(RuntimeError::InvalidArgument(format!(
            "device {}: permissions `{}` may only use r, w and m",
            excerpt(&device.host_path),
            excerpt(&device.permissions)
        )));
    }
    Ok(device.permissions.clone())
}

/// The CRI's devices: each host device (or every device under a host directory) at
/// its container path, with an allow rule of its permissions. A host path that does
/// not exist, or holds no device, is refused with its name.
pub fn requested(devices: &[Device]) -> Result<Devices, RuntimeError> {
    let mut found = Devices::default();
    for device in devices {
        let host = Path::new(&device.host_path);
        let container = if device.container_path.is_empty() {
            PathBuf::from(&device.host_path)
        } else {
            PathBuf::from(&device.container_path)
        };
        if !host.is_absolute() || !container.is_absolute() {
            return Err(RuntimeError::InvalidArgument(format!(
                "device {} → {}: both paths must be absolute",
                excerpt(&device.host_path),
                excerpt_path(&container)
            )));
        }
        let access = permissions(device)?;
        let missing = |source: std::io::Error| {
            RuntimeError::InvalidArgument(format!(
                "device {} cannot be used: {source}",
                excerpt(&device.host_path)
            ))
        };
        let mut nodes = Vec::new();
        if std::fs::metadata(host).map_err(missing)?.is_dir() {
            devices_under(host, &container, &[], &mut nodes).map_err(missing)?;
        } else if let Some(node) = device_at(host, &container).map_err(missing)? {
            nodes.push(node);
        }
        if nodes.is_empty() {
            return Err(RuntimeError::InvalidArgument(format!(
                "device {} is not a device node (nor a directory of them)",
                excerpt(&device.host_path)
            )));
        }
        for node in nodes {
            found.rules.push(rule(true, Some(&node), &access)?);
            found.nodes.retain(|n| n.path() != node.path());
            found.nodes.push(node);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking(host: &str, container: &str, permissions: &str) -> Device {
        Device {
            host_path: host.into(),
            container_path: container.into(),
            permissions: permissions.into(),
        }
    }

    #[test]
    fn a_requested_device_gets_a_node_and_an_allow_rule() {
        let found = requested(&[asking("/dev/null", "/dev/mynull", "rw")]).expect("/dev/null");
        assert_eq!(found.nodes.len(), 1);
        let node = &found.nodes[0];
        assert_eq!(
            (
                node.path().as_path(),
                node.typ(),
                node.major(),
                node.minor()
            ),
            (Path::new("/dev/mynull"), LinuxDeviceType::C, 1, 3)
        );
        let rule = &found.rules[0];
        assert_eq!(
            (
                rule.allow(),
                rule.typ(),
                rule.major(),
                rule.minor(),
                rule.access().as_deref()
            ),
            (true, Some(LinuxDeviceType::C), Some(1), Some(3), Some("rw"))
        );
    }

    #[test]
    fn missing_or_wrong_devices_are_refused_by_name() {
        for (device, needle) in [
            (
                asking("/dev/no-such-device", "/dev/x", ""),
                "/dev/no-such-device",
            ),
            (asking("/etc/hostname", "/dev/x", ""), "/etc/hostname"),
            (asking("/dev/null", "/dev/x", "rwx"), "rwx"),
            (asking("dev/null", "/dev/x", ""), "dev/null"),
        ] {
            let error = requested(&[device]).expect_err(needle);
            assert!(
                matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains(needle)),
                "{error}"
            );
        }
    }

    #[test]
    fn privileged_gets_every_host_device_and_all_access() {
        let found = privileged().expect("host devices");
        assert!(
            found
                .nodes
                .iter()
                .any(|n| n.path() == Path::new("/dev/null"))
        );
        assert!(
            !found
                .nodes
                .iter()
                .any(|n| n.path().starts_with("/dev/pts") || n.path() == Path::new("/dev/console"))
        );
        assert_eq!(found.rules.len(), 1);
        assert!(found.rules[0].allow() && found.rules[0].typ().is_none());
    }
}
