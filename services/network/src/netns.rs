//! Pod network namespaces, each pinned by a bind mount on a file under
//! `<node.run_dir>/netns/` so that it outlives the thread that made it and this
//! process, and so that plugins and the runtime can open it by path.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace for sandbox {sandbox_id}: cannot {what} {path}: {source}")]
    Io {
        sandbox_id: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace for sandbox {sandbox_id}: cannot {what} {path}: {source}")]
    Sys {
        sandbox_id: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("network namespace for sandbox {sandbox_id}: the thread creating it died")]
    ThreadLost { sandbox_id: String },
}

/// Where a sandbox's namespace is pinned.
pub fn pin_path(run_dir: &Path, sandbox_id: &str) -> PathBuf {
    run_dir.join("netns").join(sandbox_id)
}

/// Creates a new network namespace pinned at `pin`. The namespace is entered by a
/// thread of its own that ends right after pinning it: unsharing changes the calling
/// thread for good, so it must never be a thread that runs anything else.
pub async fn create(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let io = |what: &'static str| {
        let (pin, sandbox_id) = (pin.to_path_buf(), sandbox_id.to_string());
        move |source| NetnsError::Io { sandbox_id, what, path: pin, source }
    };
    if let Some(dir) = pin.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io("create the directory of"))?;
    }
    // A leftover from an earlier attempt for the same sandbox is replaced.
    if tokio::fs::try_exists(pin).await.unwrap_or(false) {
        remove(pin, sandbox_id).await?;
    }
    tokio::fs::OpenOptions::new().write(true).create_new(true).open(pin).await.map_err(io("create the pin file"))?;
    let (done, answer) = tokio::sync::oneshot::channel();
    let (thread_pin, thread_id) = (pin.to_path_buf(), sandbox_id.to_string());
    std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || {
            let _ = done.send(unshare_and_pin(&thread_pin, &thread_id));
        })
        .map_err(io("start a thread to create"))?;
    let created = answer.await.unwrap_or_else(|_| Err(NetnsError::ThreadLost { sandbox_id: sandbox_id.to_string() }));
    if created.is_err() {
        // The pin file alone is harmless but would look like a namespace to a reader.
        let _ = tokio::fs::remove_file(pin).await;
    }
    created
}

fn unshare_and_pin(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let sys = |what: &'static str, path: &Path| {
        let (path, sandbox_id) = (path.to_path_buf(), sandbox_id.to_string());
        move |source| NetnsError::Sys { sandbox_id, what, path, source }
    };
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare a network namespace for", pin))?;
    let own_namespace = Path::new("/proc/thread-self/ns/net");
    nix::mount::mount(Some(own_namespace), pin, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(sys("bind-mount the namespace on", pin))
}

/// Unmounts and removes the pin; a pin (or mount) already gone is fine.
pub async fn remove(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let (path, id) = (pin.to_path_buf(), sandbox_id.to_string());
    let unmounted = tokio::task::spawn_blocking(move || match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (never mounted, or unmounted already).
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(source) => Err(NetnsError::Sys { sandbox_id: id, what: "unmount", path, source }),
    })
    .await
    .unwrap_or_else(|_| Err(NetnsError::ThreadLost { sandbox_id: sandbox_id.to_string() }));
    unmounted?;
    match tokio::fs::remove_file(pin).await {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(NetnsError::Io { sandbox_id: sandbox_id.to_string(), what: "remove", path: pin.to_path_buf(), source: error })
        }
        _ => Ok(()),
    }
}

/// Whether `pin` holds a namespace (is a mount point), as opposed to a bare file.
pub fn is_pinned(pin: &Path) -> bool {
    trellis_common::mounts::is_mounted(pin).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_pins_a_new_namespace_and_remove_is_idempotent() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pin = pin_path(dir.path(), "sandbox-1");
        create(&pin, "sandbox-1").await.expect("create");
        assert!(is_pinned(&pin));
        let ours = std::fs::metadata("/proc/self/ns/net").expect("own netns");
        let pinned = std::fs::metadata(&pin).expect("pinned netns");
        use std::os::unix::fs::MetadataExt;
        assert_ne!(ours.ino(), pinned.ino(), "a namespace of its own");
        // Creating again replaces it.
        create(&pin, "sandbox-1").await.expect("create again");
        remove(&pin, "sandbox-1").await.expect("remove");
        assert!(!pin.exists() && !is_pinned(&pin));
        remove(&pin, "sandbox-1").await.expect("remove twice");
    }
}
