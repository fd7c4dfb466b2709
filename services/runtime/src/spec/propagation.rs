//! The CRI's bind mounts and their propagation: PROPAGATION_PRIVATE (rprivate),
//! HOST_TO_CONTAINER (rslave: the host's later mounts appear in the container) and
//! BIDIRECTIONAL (rshared: the container's mounts appear on the host too).
//!
//! A mount only receives what its host source's mount sends: HOST_TO_CONTAINER needs
//! the source on a shared or slave mount, BIDIRECTIONAL on a shared one, and this is
//! checked against `/proc/self/mountinfo` (a host without systemd often has a private
//! `/`), as CRI-O and containerd do. The container's root gets the propagation the
//! mounts need (`rslave`, or `rshared` for BIDIRECTIONAL), since the OCI runtime
//! otherwise makes the whole tree a slave and a container's mounts could not travel
//! back to the host.

use std::path::{Component, Path, PathBuf};

use k8s_cri::v1::{Mount as CriMount, MountPropagation};
use oci_spec::runtime::{Mount, MountBuilder};
use trellis_common::text::{excerpt, excerpt_path};

use crate::error::RuntimeError;

/// One line of mountinfo: where a mount is and how it propagates.
#[derive(Debug, Clone, PartialEq)]
pub struct MountPoint {
    pub point: PathBuf,
    pub shared: bool,
    pub slave: bool,
}

/// Undoes mountinfo's octal escapes (`\040` for a space...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of a mountinfo text, in its order.
pub fn parse_mountinfo(text: &str) -> Vec<MountPoint> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let optional = fields.get(6..)?.iter().take_while(|f| **f != "-");
            let (mut shared, mut slave) = (false, false);
            for field in optional {
                shared |= field.starts_with("shared:");
                slave |= field.starts_with("master:");
            }
            Some(MountPoint {
                point: PathBuf::from(unescape(point)),
                shared,
                slave,
            })
        })
        .collect()
}

/// The mount `path` lies on: the deepest mount point containing it, the last one
/// mounted when several are stacked there.
pub fn mount_of<'a>(path: &Path, mounts: &'a [MountPoint]) -> Option<&'a MountPoint> {
    mounts.iter().filter(|m| path.starts_with(&m.point)).fold(
        None,
        |best: Option<&MountPoint>, m| match best {
            Some(b) if b.point.components().count() > m.point.components().count() => Some(b),
            _ => Some(m),
        },
    )
}

/// Whether the host source of a mount can give the propagation asked for.
fn check_source(
    source: &Path,
    propagation: MountPropagation,
    mounts: &[MountPoint],
) -> Result<(), RuntimeError> {
    if propagation == MountPropagation::PropagationPrivate {
        return Ok(());
    }
    let mount = mount_of(source, mounts).ok_or_else(|| {
        RuntimeError::FailedPrecondition(format!(
            "no mount holds {} in /proc/self/mountinfo",
            excerpt_path(source)
        ))
    })?;
    let (ok, needed) = match propagation {
        MountPropagation::PropagationBidirectional => (mount.shared, "shared"),
        _ => (mount.shared || mount.slave, "shared or slave"),
    };
    if ok {
        return Ok(());
    }
    Err(RuntimeError::FailedPrecondition(format!(
        "mount propagation {}: {} is on mount {}, which is not a {needed} mount (make it one, e.g. `mount --make-rshared {}`)",
        propagation.as_str_name(),
        excerpt_path(source),
        mount.point.display(),
        mount.point.display()
    )))
}

/// A bind mount of `source` at `destination` with `options`.
pub fn bind(destination: &Path, source: &Path, options: &[&str]) -> Result<Mount, RuntimeError> {
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|e| {
            RuntimeError::Oci(format!(
                "cannot build the OCI mount of {}: {e}",
                destination.display()
            ))
        })
}

/// The OCI mounts of the CRI's mounts, and the propagation the container's root
/// needs for them (`None`: the OCI runtime's default, rslave).
pub struct Mounts {
    pub mounts: Vec<Mount>,
    pub rootfs_propagation: Option<&'static str>,
}

/// The CRI's mounts as OCI bind mounts. A source that does not exist, a relative
/// path, an unknown propagation or a source whose host mount cannot propagate as
/// asked is refused with the path.
pub fn container_mounts(requested: &[CriMount]) -> Result<Mounts, RuntimeError> {
    let needs_mountinfo = requested
        .iter()
        .any(|m| m.propagation != MountPropagation::PropagationPrivate as i32);
    let mountinfo = if needs_mountinfo {
        parse_mountinfo(
            &std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|source| RuntimeError::io("cannot read /proc/self/mountinfo", source))?,
        )
    } else {
        Vec::new()
    };
    let mut result = Mounts {
        mounts: Vec::new(),
        rootfs_propagation: None,
    };
    for mount in requested {
        let source = Path::new(&mount.host_path);
        if !source.is_absolute() || !source.exists() {
            return Err(RuntimeError::InvalidArgument(format!(
                "mount source {} does not exist (or is not an absolute path)",
                excerpt(&mount.host_path)
            )));
        }
        let destination = Path::new(&mount.container_path);
        if !destination.is_absolute() || destination.components().any(|c| c == Component::ParentDir)
        {
            return Err(RuntimeError::InvalidArgument(format!(
                "mount destination {} must be an absolute path without `..`",
                excerpt(&mount.container_path)
            )));
        }
        let propagation = MountPropagation::try_from(mount.propagation).map_err(|_| {
            RuntimeError::InvalidArgument(format!(
                "mount {}: unknown propagation {}",
                excerpt(&mount.container_path),
                mount.propagation
            ))
        })?;
        let resolved = source.canonicalize().map_err(|e| {
            RuntimeError::io(
                format!("cannot resolve mount source {}", excerpt_path(source)),
                e,
            )
        })?;
        check_source(&resolved, propagation, &mountinfo)?;
        let option = match propagation {
            MountPropagation::PropagationPrivate => "rprivate",
            MountPropagation::PropagationHostToContainer => {
                result.rootfs_propagation = result.rootfs_propagation.or(Some("rslave"));
                "rslave"
            }
            MountPropagation::PropagationBidirectional => {
                result.rootfs_propagation = Some("rshared");
                "rshared"
            }
        };
        let access = if mount.readonly { "ro" } else { "rw" };
        result
            .mounts
            .push(bind(destination, source, &["rbind", access, option])?);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
50 27 254:0 /tmp/a /tmp/a rw,relatime - ext4 /dev/vda rw
51 27 254:0 /tmp/b /tmp/b rw,relatime shared:1 - ext4 /dev/vda rw
52 51 254:0 /tmp/c /tmp/b/slave rw,relatime master:1 - ext4 /dev/vda rw
53 27 0:40 / /tmp/with\\040space rw shared:7 master:2 - tmpfs tmpfs rw
54 50 254:0 /x /tmp/a rw,relatime shared:9 - ext4 /dev/vda rw
";

    fn cri(host: &str, container: &str, propagation: MountPropagation) -> CriMount {
        CriMount {
            host_path: host.into(),
            container_path: container.into(),
            propagation: propagation as i32,
            ..Default::default()
        }
    }

    #[test]
    fn mountinfo_lines_give_points_and_propagation() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 6);
        assert_eq!(
            mounts[0],
            MountPoint {
                point: "/".into(),
                shared: false,
                slave: false
            }
        );
        assert_eq!(
            mounts[3],
            MountPoint {
                point: "/tmp/b/slave".into(),
                shared: false,
                slave: true
            }
        );
        assert_eq!(
            mounts[4],
            MountPoint {
                point: "/tmp/with space".into(),
                shared: true,
                slave: true
            }
        );
        assert_eq!(
            mount_of(Path::new("/tmp/b/x/y"), &mounts).map(|m| m.point.clone()),
            Some("/tmp/b".into())
        );
        assert_eq!(
            mount_of(Path::new("/tmp/bb"), &mounts).map(|m| m.point.clone()),
            Some("/".into())
        );
        // Stacked on /tmp/a: the later mount is the one seen.
        assert!(mount_of(Path::new("/tmp/a/f"), &mounts).is_some_and(|m| m.shared));
    }

    #[test]
    fn sources_must_be_able_to_propagate() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let check = |path: &str, p| check_source(Path::new(path), p, &mounts);
        assert!(check("/var/lib/x", MountPropagation::PropagationPrivate).is_ok());
        assert!(check("/tmp/b/x", MountPropagation::PropagationBidirectional).is_ok());
        assert!(
            check(
                "/tmp/b/slave/x",
                MountPropagation::PropagationHostToContainer
            )
            .is_ok()
        );
        let error = check("/tmp/b/slave/x", MountPropagation::PropagationBidirectional)
            .expect_err("slave is not shared");
        assert!(
            matches!(error, RuntimeError::FailedPrecondition(ref m) if m.contains("/tmp/b/slave") && m.contains("not a shared mount")),
            "{error}"
        );
        let error = check("/var/lib/x", MountPropagation::PropagationHostToContainer)
            .expect_err("private /");
        assert!(
            error.to_string().contains("/var/lib/x")
                && error.to_string().contains("shared or slave"),
            "{error}"
        );
    }

    #[test]
    fn options_and_root_propagation_follow_the_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().to_str().expect("utf-8");
        let private = container_mounts(&[cri(host, "/data", MountPropagation::PropagationPrivate)])
            .expect("private");
        assert_eq!(private.rootfs_propagation, None);
        assert_eq!(
            private.mounts[0].options().clone().expect("options"),
            vec!["rbind", "rw", "rprivate"]
        );
        let mut readonly = cri(host, "/data", MountPropagation::PropagationPrivate);
        readonly.readonly = true;
        assert_eq!(
            container_mounts(&[readonly]).expect("ro").mounts[0]
                .options()
                .clone()
                .expect("options"),
            vec!["rbind", "ro", "rprivate"]
        );
        for (bad, needle) in [
            (
                cri(
                    "/does/not/exist",
                    "/d",
                    MountPropagation::PropagationPrivate,
                ),
                "/does/not/exist",
            ),
            (
                cri(host, "rel", MountPropagation::PropagationPrivate),
                "rel",
            ),
        ] {
            let error = container_mounts(&[bad]).map(|_| ()).expect_err(needle);
            assert!(
                matches!(error, RuntimeError::InvalidArgument(ref m) if m.contains(needle)),
                "{error}"
            );
        }
        let mut unknown = cri(host, "/d", MountPropagation::PropagationPrivate);
        unknown.propagation = 7;
        assert!(matches!(
            container_mounts(&[unknown]),
            Err(RuntimeError::InvalidArgument(_))
        ));
    }
}
