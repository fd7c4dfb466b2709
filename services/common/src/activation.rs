//! Listening sockets handed down by whoever started the process (`trellis up`, or
//! systemd from a `.socket` unit), with the socket-activation protocol (`LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES`; the sockets are fds 3, 4, ...).
//!
//! A socket held by the parent outlives the service process: while the service
//! restarts, clients wait in the socket's backlog instead of being refused, and the
//! file is never missing. The environment is as hostile as any input: it may have been
//! inherited from an unrelated activated ancestor (wrong `LISTEN_PID`), or name fds
//! that are not listening sockets at all, so everything is checked before use.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixListener;

use crate::text::excerpt;

/// The first fd of the protocol; the rest follow without gaps.
pub const FIRST_FD: RawFd = 3;
/// More than any Trellis service takes; a larger count is not ours to trust.
pub const MAX_FDS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ActivationError {
    #[error("LISTEN_PID `{value}` is not a process id")]
    BadPid { value: String },
    #[error("LISTEN_FDS `{value}` is not a count of sockets (0 to {MAX_FDS})")]
    BadCount { value: String },
    #[error("LISTEN_FDNAMES `{value}` names {names} sockets, but LISTEN_FDS is {count}")]
    NamesMismatch {
        value: String,
        names: usize,
        count: usize,
    },
    #[error("LISTEN_FDNAMES `{value}` holds a name that is empty, too long or not printable")]
    BadName { value: String },
    #[error("inherited fd {fd} (named `{name}`) is not a listening Unix stream socket: {why}")]
    NotAListener {
        fd: RawFd,
        name: String,
        why: String,
    },
    #[error("none of the inherited sockets ({names}) is named `{wanted}`")]
    NoneNamed { wanted: String, names: String },
    #[error("the inherited sockets were already taken once")]
    AlreadyTaken,
}

/// One socket the protocol says was passed: its fd and name (`unknown` if unnamed,
/// as systemd says).
#[derive(Debug, Clone, PartialEq)]
pub struct Passed {
    pub fd: RawFd,
    pub name: String,
}

/// Reads the three variables as given. `Ok(None)`: nothing was passed to this process
/// (no `LISTEN_FDS`, a count of 0, or a `LISTEN_PID` that is another process's).
pub fn parse(
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Option<Vec<Passed>>, ActivationError> {
    let Some(count) = count else {
        return Ok(None);
    };
    let Some(pid) = pid else {
        // sd_listen_fds(3) takes nothing without LISTEN_PID: the fds may be anyone's.
        return Ok(None);
    };
    let pid = strict_number(pid).ok_or_else(|| ActivationError::BadPid {
        value: excerpt(pid),
    })?;
    if pid != u64::from(own_pid) {
        // Meant for an ancestor; its fds are not ours to take.
        return Ok(None);
    }
    let count = strict_number(count)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= MAX_FDS)
        .ok_or_else(|| ActivationError::BadCount {
            value: excerpt(count),
        })?;
    if count == 0 {
        return Ok(None);
    }
    let names: Vec<String> = match names {
        None => vec!["unknown".to_string(); count],
        Some(value) => {
            let split: Vec<&str> = value.split(':').collect();
            if split.len() != count {
                return Err(ActivationError::NamesMismatch {
                    value: excerpt(value),
                    names: split.len(),
                    count,
                });
            }
            // systemd's own rule for FileDescriptorName=: 1-255 printable characters.
            if split
                .iter()
                .any(|n| n.is_empty() || n.len() > 255 || n.chars().any(|c| c.is_control()))
            {
                return Err(ActivationError::BadName {
                    value: excerpt(value),
                });
            }
            split.into_iter().map(str::to_string).collect()
        }
    };
    Ok(Some(
        names
            .into_iter()
            .zip(FIRST_FD..)
            .map(|(name, fd)| Passed { fd, name })
            .collect(),
    ))
}

/// Digits only: no sign, no spaces, no `0x`, and no overflow.
fn strict_number(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Why `fd` cannot be served on, if it cannot: it must be a socket, of the stream
/// type, in the Unix family, and already listening.
pub fn check_listener(fd: BorrowedFd<'_>) -> Result<(), String> {
    use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};
    use nix::sys::stat::{SFlag, fstat};
    let stat = fstat(fd).map_err(|e| format!("cannot stat it: {e}"))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err("not a socket".into());
    }
    let kind = nix::sys::socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|e| format!("cannot read its type: {e}"))?;
    if kind != SockType::Stream {
        return Err(format!("a {kind:?} socket, not a stream one"));
    }
    let address: SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd())
        .map_err(|e| format!("cannot read its address: {e}"))?;
    if address.family() != Some(AddressFamily::Unix) {
        return Err(format!("a {:?} socket, not a Unix one", address.family()));
    }
    let listening = nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| format!("cannot tell whether it listens: {e}"))?;
    if !listening {
        return Err("not listening".into());
    }
    Ok(())
}

/// The listening socket named `name` passed to this process, if any was passed; the
/// others passed are closed. Takes the fds once per process: a second call fails.
pub fn take_listener(name: &str) -> Result<Option<UnixListener>, ActivationError> {
    let var = |key: &str| std::env::var(key).ok();
    let passed = parse(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?;
    let Some(passed) = passed else {
        return Ok(None);
    };
    if !inherited::first_take() {
        return Err(ActivationError::AlreadyTaken);
    }
    let mut fds = Vec::with_capacity(passed.len());
    for one in &passed {
        let fd = inherited::adopt(one.fd).map_err(|why| ActivationError::NotAListener {
            fd: one.fd,
            name: excerpt(&one.name),
            why,
        })?;
        // The services start children (conmon, CNI plugins): none of them may get a
        // listening socket of ours.
        set_cloexec(fd.as_fd()).map_err(|why| ActivationError::NotAListener {
            fd: one.fd,
            name: excerpt(&one.name),
            why,
        })?;
        fds.push(fd);
    }
    let chosen = match passed.iter().position(|p| p.name == name) {
        Some(index) => index,
        // One socket with no name: it can only be this service's.
        None if passed.len() == 1 && passed[0].name == "unknown" => 0,
        None => {
            return Err(ActivationError::NoneNamed {
                wanted: excerpt(name),
                names: excerpt(
                    &passed
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(":"),
                ),
            });
        }
    };
    let fd = fds.swap_remove(chosen);
    check_listener(fd.as_fd()).map_err(|why| ActivationError::NotAListener {
        fd: passed[chosen].fd,
        name: excerpt(&passed[chosen].name),
        why,
    })?;
    Ok(Some(UnixListener::from(fd)))
}

fn set_cloexec(fd: BorrowedFd<'_>) -> Result<(), String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFD).map_err(|e| format!("cannot read its flags: {e}"))?;
    let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
    fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(|e| format!("cannot set close-on-exec: {e}"))?;
    Ok(())
}

/// The one place in this crate that needs `unsafe`: an fd number from the environment
/// becomes an owned fd.
#[allow(unsafe_code)]
mod inherited {
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    static TAKEN: AtomicBool = AtomicBool::new(false);

    /// True the first time only: the passed fds are owned once per process (later,
    /// their numbers may have been closed and reused by anything).
    pub(super) fn first_take() -> bool {
        !TAKEN.swap(true, Ordering::SeqCst)
    }

    /// Owns `fd` if it is open. Called only after [`first_take`], once per fd.
    pub(super) fn adopt(fd: RawFd) -> Result<OwnedFd, String> {
        // SAFETY: F_GETFD only reads flags; it tells whether `fd` is open at all.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
            return Err(format!("not open: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the protocol hands fds 3.. to this process at exec, before any code
        // of ours opened anything, and `first_take` lets each be owned once only.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests;
