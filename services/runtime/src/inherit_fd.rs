//! The one place the runtime needs `unsafe`: keeping the sync pipe open across exec
//! for conmon, which reports the container's pid (or the OCI runtime's error) on it.
#![allow(unsafe_code)]

use std::os::fd::RawFd;

/// Clears close-on-exec on `fd` in the child only, after fork: the pipe is created
/// close-on-exec so no other child started concurrently inherits it.
pub fn keep_open_in_child(command: &mut tokio::process::Command, fd: RawFd) {
    // SAFETY: the closure runs between fork and exec and makes only fcntl(2) calls,
    // which are async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(move || {
            let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
            if flags < 0
                || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
