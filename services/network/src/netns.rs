//! Pod network namespaces, each pinned by a bind mount on a file under
//! `<node.run_dir>/netns/` so that it outlives the thread that made it and this
//! process, and so that plugins and the runtime can open it by path.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use tracing::Instrument;

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
    let span = trellis_common::step_span!("netns.create", k8s.pod.sandbox_id = %sandbox_id);
    create_pinned(pin, sandbox_id).instrument(span).await
}

async fn create_pinned(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let io = |what: &'static str| {
        let (pin, sandbox_id) = (pin.to_path_buf(), sandbox_id.to_string());
        move |source| NetnsError::Io {
            sandbox_id,
            what,
            path: pin,
            source,
        }
    };
    if let Some(dir) = pin.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io("create the directory of"))?;
    }
    // A leftover from an earlier attempt for the same sandbox is replaced.
    if tokio::fs::try_exists(pin).await.unwrap_or(false) {
        remove(pin, sandbox_id).await?;
    }
    tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(pin)
        .await
        .map_err(io("create the pin file"))?;
    let (done, answer) = tokio::sync::oneshot::channel();
    let (thread_pin, thread_id) = (pin.to_path_buf(), sandbox_id.to_string());
    std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || {
            let _ = done.send(unshare_and_pin(&thread_pin, &thread_id));
        })
        .map_err(io("start a thread to create"))?;
    let created = answer.await.unwrap_or_else(|_| {
        Err(NetnsError::ThreadLost {
            sandbox_id: sandbox_id.to_string(),
        })
    });
    if created.is_err() {
        // The pin file alone is harmless but would look like a namespace to a reader.
        let _ = tokio::fs::remove_file(pin).await;
    }
    created
}

fn unshare_and_pin(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let sys = |what: &'static str, path: &Path| {
        let (path, sandbox_id) = (path.to_path_buf(), sandbox_id.to_string());
        move |source| NetnsError::Sys {
            sandbox_id,
            what,
            path,
            source,
        }
    };
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(sys("unshare a network namespace for", pin))?;
    // While this thread is inside: a netlink socket opened here talks to the new namespace.
    loopback_up().map_err(sys("bring up the loopback of", pin))?;
    let own_namespace = Path::new("/proc/thread-self/ns/net");
    nix::mount::mount(
        Some(own_namespace),
        pin,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind-mount the namespace on", pin))
}

/// Sets `lo` up in the calling thread's network namespace with one rtnetlink request,
/// which is what the stock `loopback` CNI plugin does, without starting a process
/// (about 5 ms per pod). A new namespace's loopback is always interface index 1.
fn loopback_up() -> Result<(), Errno> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    const RTM_NEWLINK: u16 = 16;
    const NLM_F_REQUEST_ACK: u16 = 0x1 | 0x4;
    const NLMSG_ERROR: u16 = 2;
    const LOOPBACK_INDEX: i32 = 1;
    const IFF_UP: u32 = 1;
    let socket = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &NetlinkAddr::new(0, 0),
    )?;
    let mut request = Vec::with_capacity(32);
    // struct nlmsghdr: length, type, flags, sequence, port id.
    request.extend_from_slice(&32u32.to_ne_bytes());
    request.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST_ACK.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg: family (AF_UNSPEC), padding, type, index, flags, change mask.
    request.extend_from_slice(&[0, 0, 0, 0]);
    request.extend_from_slice(&LOOPBACK_INDEX.to_ne_bytes());
    request.extend_from_slice(&IFF_UP.to_ne_bytes());
    request.extend_from_slice(&IFF_UP.to_ne_bytes());
    nix::sys::socket::send(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &request,
        MsgFlags::empty(),
    )?;
    let mut answer = [0u8; 256];
    let length = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &mut answer,
        MsgFlags::empty(),
    )?;
    // The acknowledgement is an NLMSG_ERROR message whose error field is 0, or -errno.
    if length < 20 || u16::from_ne_bytes([answer[4], answer[5]]) != NLMSG_ERROR {
        return Err(Errno::EPROTO);
    }
    match i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]) {
        0 => Ok(()),
        negative => Err(Errno::from_raw(-negative)),
    }
}

/// Unmounts and removes the pin; a pin (or mount) already gone is fine.
pub async fn remove(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let span = trellis_common::step_span!("netns.remove", k8s.pod.sandbox_id = %sandbox_id);
    unpin(pin, sandbox_id).instrument(span).await
}

async fn unpin(pin: &Path, sandbox_id: &str) -> Result<(), NetnsError> {
    let (path, id) = (pin.to_path_buf(), sandbox_id.to_string());
    let unmounted = tokio::task::spawn_blocking(move || {
        match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (never mounted, or unmounted already).
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(source) => Err(NetnsError::Sys {
                sandbox_id: id,
                what: "unmount",
                path,
                source,
            }),
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(NetnsError::ThreadLost {
            sandbox_id: sandbox_id.to_string(),
        })
    });
    unmounted?;
    match tokio::fs::remove_file(pin).await {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(NetnsError::Io {
            sandbox_id: sandbox_id.to_string(),
            what: "remove",
            path: pin.to_path_buf(),
            source: error,
        }),
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
        let pin_for_thread = pin.clone();
        let loopback_works = std::thread::spawn(move || {
            let namespace = std::fs::File::open(&pin_for_thread).expect("open the pin");
            nix::sched::setns(namespace, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").expect("bind on the loopback");
            std::net::TcpStream::connect(listener.local_addr().expect("address")).is_ok()
        })
        .join()
        .expect("thread");
        assert!(loopback_works, "lo is up in the new namespace");
        // Creating again replaces it.
        create(&pin, "sandbox-1").await.expect("create again");
        remove(&pin, "sandbox-1").await.expect("remove");
        assert!(!pin.exists() && !is_pinned(&pin));
        remove(&pin, "sandbox-1").await.expect("remove twice");
    }
}
