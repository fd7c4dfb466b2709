//! A pod's own IPC and UTS namespaces, pinned by bind mounts so that they outlive
//! the thread that made them and every container of the pod can join them; and the
//! pod's `/dev/shm`.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::error::RuntimeError;
use crate::spec::pod::{pin_path, shm_path};

/// Which namespaces the pod gets of its own (false: it shares the host's).
#[derive(Debug, Clone, Copy)]
pub struct OwnNamespaces {
    pub ipc: bool,
    pub uts: bool,
}

/// Creates the namespaces in a short-lived thread, sets the pod's hostname in the
/// new UTS namespace, and pins each with a bind mount under `<pod_dir>/ns/`.
fn pin(pod_dir: &Path, hostname: &str, own: OwnNamespaces) -> Result<(), RuntimeError> {
    let ns_dir = pod_dir.join("ns");
    std::fs::create_dir_all(&ns_dir).map_err(|source| {
        RuntimeError::io(format!("cannot create {}", ns_dir.display()), source)
    })?;
    let kinds: Vec<(&str, CloneFlags)> = [
        ("ipc", own.ipc, CloneFlags::CLONE_NEWIPC),
        ("uts", own.uts, CloneFlags::CLONE_NEWUTS),
    ]
    .into_iter()
    .filter(|(_, wanted, _)| *wanted)
    .map(|(kind, _, flag)| (kind, flag))
    .collect();
    if kinds.is_empty() {
        return Ok(());
    }
    let pod_dir = pod_dir.to_path_buf();
    let hostname = hostname.to_string();
    let worker = std::thread::spawn(move || -> Result<(), RuntimeError> {
        let flags = kinds
            .iter()
            .fold(CloneFlags::empty(), |all, (_, flag)| all | *flag);
        nix::sched::unshare(flags)
            .map_err(|e| RuntimeError::system("cannot create the pod's namespaces", e))?;
        if own.uts {
            nix::unistd::sethostname(&hostname).map_err(|e| {
                RuntimeError::system(
                    format!(
                        "cannot set hostname {}",
                        trellis_common::text::excerpt(&hostname)
                    ),
                    e,
                )
            })?;
        }
        for (kind, _) in &kinds {
            let target = pin_path(&pod_dir, kind);
            std::fs::File::create(&target).map_err(|source| {
                RuntimeError::io(format!("cannot create {}", target.display()), source)
            })?;
            let source = format!("/proc/thread-self/ns/{kind}");
            nix::mount::mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                RuntimeError::system(
                    format!("cannot pin the {kind} namespace at {}", target.display()),
                    e,
                )
            })?;
        }
        Ok(())
    });
    worker
        .join()
        .map_err(|_| RuntimeError::Oci("the namespace thread panicked".into()))?
}

/// Unmounts and removes the pins; what is not there is fine.
fn unpin(pod_dir: &Path) -> Result<(), RuntimeError> {
    for kind in ["ipc", "uts"] {
        let target = pin_path(pod_dir, kind);
        unmount_all(&target)?;
        remove_file(&target)?;
    }
    Ok(())
}

/// A 64 MiB tmpfs for the pod's `/dev/shm`.
fn mount_shm(pod_dir: &Path) -> Result<PathBuf, RuntimeError> {
    let target = shm_path(pod_dir);
    std::fs::create_dir_all(&target).map_err(|source| {
        RuntimeError::io(format!("cannot create {}", target.display()), source)
    })?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(
        Some("shm"),
        &target,
        Some("tmpfs"),
        flags,
        Some("mode=1777,size=67108864"),
    )
    .map_err(|e| {
        RuntimeError::system(
            format!("cannot mount the pod's /dev/shm at {}", target.display()),
            e,
        )
    })?;
    Ok(target)
}

fn unmount_shm(pod_dir: &Path) -> Result<(), RuntimeError> {
    unmount_all(&shm_path(pod_dir))
}

/// Whether `path` is a mount point.
fn is_mounted(path: &Path) -> Result<bool, RuntimeError> {
    trellis_common::mounts::is_mounted(path)
        .map_err(|source| RuntimeError::io("cannot read /proc/self/mountinfo", source))
}

fn unmount_all(target: &Path) -> Result<(), RuntimeError> {
    while is_mounted(target)? {
        nix::mount::umount2(target, MntFlags::MNT_DETACH)
            .map_err(|e| RuntimeError::system(format!("cannot unmount {}", target.display()), e))?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), RuntimeError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RuntimeError::io(
            format!("cannot remove {}", path.display()),
            source,
        )),
    }
}

/// What a pod needs of the host besides its network: its own namespaces and
/// `/dev/shm`. Behind a trait because making them takes root; unit tests of the
/// lifecycle use [`NoNamespaces`].
pub trait PodNamespaces: Send + Sync {
    /// Makes the pod's own namespaces (and its /dev/shm when it has its own IPC).
    fn set_up(
        &self,
        pod_dir: &Path,
        hostname: &str,
        own: OwnNamespaces,
    ) -> Result<(), RuntimeError>;
    /// Undoes [`PodNamespaces::set_up`]; what is gone already is fine.
    fn tear_down(&self, pod_dir: &Path) -> Result<(), RuntimeError>;
}

/// The real namespaces, pinned by bind mounts.
pub struct HostNamespaces;

impl PodNamespaces for HostNamespaces {
    fn set_up(
        &self,
        pod_dir: &Path,
        hostname: &str,
        own: OwnNamespaces,
    ) -> Result<(), RuntimeError> {
        if own.ipc {
            mount_shm(pod_dir)?;
        }
        pin(pod_dir, hostname, own)
    }

    fn tear_down(&self, pod_dir: &Path) -> Result<(), RuntimeError> {
        unpin(pod_dir)?;
        unmount_shm(pod_dir)
    }
}

/// Namespaces that are not made: the pod shares the test's.
#[cfg(test)]
pub struct NoNamespaces;

#[cfg(test)]
impl PodNamespaces for NoNamespaces {
    fn set_up(&self, _: &Path, _: &str, _: OwnNamespaces) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn tear_down(&self, _: &Path) -> Result<(), RuntimeError> {
        Ok(())
    }
}
