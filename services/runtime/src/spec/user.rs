//! Who a container runs as: the CRI's run_as_user / run_as_username / run_as_group
//! over the image's USER, names resolved in the image's /etc/passwd and /etc/group,
//! plus the primary group, the groups that list the user and the requested
//! supplemental groups.

use std::path::Path;

use k8s_cri::v1::LinuxContainerSecurityContext;
use trellis_common::text::excerpt;

use super::ResolvedUser;
use crate::error::RuntimeError;

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

/// A file of the image, read only if neither it nor `etc` is a symlink (which
/// could point outside the root filesystem).
fn read_image_file(rootfs: &Path, relative: &str) -> String {
    let etc = rootfs.join("etc");
    let file = rootfs.join(relative);
    let is_plain =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| !m.file_type().is_symlink());
    if is_plain(&etc) && is_plain(&file) {
        std::fs::read_to_string(file).unwrap_or_default()
    } else {
        String::new()
    }
}

fn passwd(rootfs: &Path) -> Vec<PasswdEntry> {
    read_image_file(rootfs, "etc/passwd")
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: fields.first()?.to_string(),
                uid: fields.get(2)?.parse().ok()?,
                gid: fields.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

/// (name, gid, members) of each group.
fn groups(rootfs: &Path) -> Vec<(String, u32, Vec<String>)> {
    read_image_file(rootfs, "etc/group")
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let members = fields
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            Some((
                fields.first()?.to_string(),
                fields.get(2)?.parse().ok()?,
                members,
            ))
        })
        .collect()
}

pub fn resolve(
    rootfs: &Path,
    image_user: &str,
    security: Option<&LinuxContainerSecurityContext>,
) -> Result<ResolvedUser, RuntimeError> {
    let entries = passwd(rootfs);
    let (image_name, image_group) = image_user
        .split_once(':')
        .map_or((image_user, None), |(u, g)| (u, Some(g)));
    let by_name = |name: &str| {
        entries.iter().find(|e| e.name == name).ok_or_else(|| {
            RuntimeError::InvalidArgument(format!(
                "user `{}` is not in the image's /etc/passwd",
                excerpt(name)
            ))
        })
    };
    let (uid, name) = match (
        security.and_then(|s| s.run_as_user.as_ref()),
        security
            .map(|s| s.run_as_username.as_str())
            .filter(|n| !n.is_empty()),
    ) {
        (Some(uid), _) => (
            u32::try_from(uid.value).map_err(|_| {
                RuntimeError::InvalidArgument(format!("run_as_user {} is out of range", uid.value))
            })?,
            None,
        ),
        (None, Some(username)) => {
            let entry = by_name(username)?;
            (entry.uid, Some(entry.name.clone()))
        }
        (None, None) if image_name.is_empty() => (0, None),
        (None, None) => match image_name.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                let entry = by_name(image_name)?;
                (entry.uid, Some(entry.name.clone()))
            }
        },
    };
    let entry = entries.iter().find(|e| e.uid == uid);
    let name = name.or_else(|| entry.map(|e| e.name.clone()));
    let all_groups = groups(rootfs);
    let gid = match (security.and_then(|s| s.run_as_group.as_ref()), image_group) {
        (Some(gid), _) => u32::try_from(gid.value).map_err(|_| {
            RuntimeError::InvalidArgument(format!("run_as_group {} is out of range", gid.value))
        })?,
        (None, Some(group)) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups
                .iter()
                .find(|(n, _, _)| n == group)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| {
                    RuntimeError::InvalidArgument(format!(
                        "group `{}` is not in the image's /etc/group",
                        excerpt(group)
                    ))
                })?,
        },
        (None, None) => entry.map_or(0, |e| e.gid),
    };
    let mut additional: Vec<u32> = Vec::new();
    if let Some(name) = &name {
        additional.extend(
            all_groups
                .iter()
                .filter(|(_, _, members)| members.contains(name))
                .map(|(_, gid, _)| *gid),
        );
    }
    additional.extend(
        security
            .map(|s| {
                s.supplemental_groups
                    .iter()
                    .filter_map(|g| u32::try_from(*g).ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    // The primary group is listed too, as containerd, CRI-O and Docker do: `id`
    // in the container shows it among the process's groups.
    additional.push(gid);
    additional.sort_unstable();
    additional.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids: additional,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/false\n",
        )
        .expect("passwd");
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nwww-data:x:33:\nextra:x:50000:www-data\n",
        )
        .expect("group");
        dir
    }

    #[test]
    fn image_user_names_and_groups_resolve() {
        let dir = rootfs();
        assert_eq!(
            resolve(dir.path(), "www-data", None).expect("name"),
            ResolvedUser {
                uid: 33,
                gid: 33,
                additional_gids: vec![33, 50000]
            }
        );
        assert_eq!(
            resolve(dir.path(), "1003:1004", None).expect("numeric"),
            ResolvedUser {
                uid: 1003,
                gid: 1004,
                additional_gids: vec![1004]
            }
        );
        assert_eq!(
            resolve(dir.path(), "www-data:extra", None)
                .expect("group name")
                .gid,
            50000
        );
        assert_eq!(resolve(dir.path(), "", None).expect("root").uid, 0);
        assert!(resolve(dir.path(), "nobody-here", None).is_err());
    }

    #[test]
    fn the_request_wins_over_the_image() {
        let dir = rootfs();
        let security = LinuxContainerSecurityContext {
            run_as_username: "www-data".into(),
            supplemental_groups: vec![7],
            ..Default::default()
        };
        assert_eq!(
            resolve(dir.path(), "0", Some(&security)).expect("username"),
            ResolvedUser {
                uid: 33,
                gid: 33,
                additional_gids: vec![7, 33, 50000]
            }
        );
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed_out_of_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("etc/passwd")).expect("symlink");
        assert!(
            resolve(dir.path(), "root", None).is_err(),
            "host's root entry must not be found"
        );
    }
}
