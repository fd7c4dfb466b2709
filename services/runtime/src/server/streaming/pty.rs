//! The terminal of a TTY exec. runc 1.1 refuses `exec --tty --console-socket`
//! unless it detaches (and then its exit code is lost to us), so `runc exec --tty`
//! runs in the foreground with a pty of ours as its stdio: runc copies between the
//! container's terminal and our slave (which it sets raw), and we read and write the
//! master. A resize sets the master's window size, then SIGWINCH tells runc to copy
//! it to the container's terminal. rustix does all of it without `unsafe`.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustix::io::Errno;
use rustix::pty::OpenptFlags;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use trellis_streaming::remotecommand::TerminalSize;

use crate::error::RuntimeError;

/// A new pty pair: the master for us, the slave for `runc exec --tty`'s stdio.
pub fn open() -> Result<(PtyMaster, OwnedFd), RuntimeError> {
    let failed = |error: Errno| RuntimeError::io("cannot allocate a terminal", error.into());
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(failed)?;
    rustix::pty::grantpt(&master).map_err(failed)?;
    rustix::pty::unlockpt(&master).map_err(failed)?;
    let slave = rustix::pty::ioctl_tiocgptpeer(
        &master,
        OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC,
    )
    .map_err(failed)?;
    Ok((PtyMaster(master), slave))
}

/// The pty master. Read and written through duplicates of it as blocking files on
/// tokio's blocking pool (a pty is no socket or pipe tokio could poll without
/// `unsafe`); a read ends with EIO once every slave is closed, which is the end of
/// the output.
pub struct PtyMaster(OwnedFd);

impl PtyMaster {
    fn duplicate(&self) -> Result<tokio::fs::File, RuntimeError> {
        let fd = self
            .0
            .try_clone()
            .map_err(|source| RuntimeError::io("cannot duplicate the pty", source))?;
        Ok(tokio::fs::File::from_std(std::fs::File::from(fd)))
    }

    pub fn reader(&self) -> Result<impl AsyncRead + Unpin + Send + 'static, RuntimeError> {
        Ok(EioIsEnd(self.duplicate()?))
    }

    pub fn writer(&self) -> Result<impl AsyncWrite + Unpin + Send + 'static, RuntimeError> {
        self.duplicate()
    }

    pub fn resize(&self, size: TerminalSize) -> Result<(), RuntimeError> {
        let winsize = rustix::termios::Winsize {
            ws_row: size.height,
            ws_col: size.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&self.0, winsize)
            .map_err(|error| RuntimeError::io("cannot resize the terminal", error.into()))
    }
}

struct EioIsEnd<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for EioIsEnd<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.0).poll_read(cx, buf)) {
            Err(error) if error.raw_os_error() == Some(Errno::IO.raw_os_error()) => {
                Poll::Ready(Ok(()))
            }
            other => Poll::Ready(other),
        }
    }
}
