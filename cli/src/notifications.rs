//! Where a child's processes tell `trellis up` that they are ready (systemd's notify
//! protocol, see `trellis_common::notify`): one datagram socket per child, in a
//! directory only root can enter, so no other local user can say "ready" for a
//! service. A message counts only for the pid it names (`MAINPID`), the one started.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::UnixDatagram;
use trellis_common::notify;

/// More pids than a node replaces between two waits; past it the oldest are forgotten.
const MAX_REMEMBERED: usize = 64;

#[derive(Debug)]
pub struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
    /// Pids that said READY=1 while nobody was waiting for them.
    ready: Mutex<HashSet<u32>>,
}

impl Notifications {
    /// Binds `<dir>/<name>.notify`; `dir` is made private (0700) first.
    pub fn bind(dir: &Path, name: &str) -> std::io::Result<Self> {
        trellis_common::dirs::ensure_private_dir(dir)?;
        let path = dir.join(format!("{name}.notify"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let socket = UnixDatagram::bind(&path)?;
        Ok(Self {
            socket,
            path,
            ready: Mutex::new(HashSet::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok` once `pid` has said READY=1 (now or before); an error after `within`.
    pub async fn ready_within(&self, pid: u32, within: Duration) -> Result<(), String> {
        if self.take(pid) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut buffer = [0u8; 1024];
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer)).await;
            let n = match received {
                Err(_) => return Err(format!("pid {pid} has not said READY=1")),
                Ok(Err(error)) => {
                    return Err(format!("cannot read {}: {error}", self.path.display()));
                }
                Ok(Ok(n)) => n,
            };
            let Some(sender) = ready_pid(&buffer[..n]) else {
                continue;
            };
            if sender == pid {
                return Ok(());
            }
            let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            if ready.len() >= MAX_REMEMBERED {
                ready.clear();
            }
            ready.insert(sender);
        }
    }

    fn take(&self, pid: u32) -> bool {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid)
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid of a `READY=1` message, from its `MAINPID`; `None` for anything else.
fn ready_pid(datagram: &[u8]) -> Option<u32> {
    let mut ready = false;
    let mut pid = None;
    for state in notify::states(datagram) {
        if state == notify::READY {
            ready = true;
        } else if let Some(value) = state.strip_prefix("MAINPID=") {
            pid = value.parse().ok();
        }
    }
    pid.filter(|_| ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_message_with_a_pid_counts() {
        assert_eq!(ready_pid(b"READY=1\nMAINPID=42\n"), Some(42));
        assert_eq!(ready_pid(b"STOPPING=1\nMAINPID=42\n"), None);
        assert_eq!(ready_pid(b"READY=1\n"), None);
        assert_eq!(ready_pid(b"READY=1\nMAINPID=-3\n"), None);
    }

    #[tokio::test]
    async fn a_ready_pid_is_seen_whether_it_spoke_before_or_during_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let notifications = Notifications::bind(&dir.path().join("up"), "gateway").expect("bind");
        let sender = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        let say = |text: &str| {
            sender
                .send_to(text.as_bytes(), notifications.path())
                .expect("send");
        };
        say("READY=1\nMAINPID=7\n");
        say("READY=1\nMAINPID=8\n");
        let short = Duration::from_millis(200);
        assert!(notifications.ready_within(8, short).await.is_ok());
        assert!(
            notifications.ready_within(7, short).await.is_ok(),
            "7 spoke while 8 was awaited"
        );
        assert!(notifications.ready_within(9, short).await.is_err());
        let mode = std::fs::metadata(dir.path().join("up"))
            .expect("stat")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
    }
}
