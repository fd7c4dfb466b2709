//! `runc exec` under conmon's runtime: the process of an Exec (killed with the command
//! it started, so no zombie is left) and the capped capture of an ExecSync's output.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Child;

use super::MAX_EXEC_OUTPUT;

/// After an exec is to be ended: how long runc may take to start the command (write
/// its pid) and then to exit once the command is killed, before runc itself is killed.
const EXEC_KILL_GRACE: Duration = Duration::from_secs(5);
/// How often the exec's pid file is looked for meanwhile.
const EXEC_PID_POLL: Duration = Duration::from_millis(50);

/// A `runc exec` under way, and the file it writes the started command's pid to:
/// that command is what must be killed to end the exec (killing `runc exec` would
/// leave it running); `runc exec` then reaps it, so no zombie is left.
pub struct ExecProcess {
    pub child: Child,
    pub(super) pid_file: PathBuf,
}

impl ExecProcess {
    /// SIGKILL to the command in the container once runc has said its pid; runc itself
    /// when that does not end it within [`EXEC_KILL_GRACE`]. Returns runc's exit code.
    pub async fn kill_command(&mut self) -> i32 {
        let deadline = tokio::time::Instant::now() + EXEC_KILL_GRACE;
        let mut killed = false;
        loop {
            if !killed && let Some(pid) = self.command_pid() {
                if let Err(error) = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                ) {
                    tracing::debug!(pid, %error, "cannot kill the exec'd command");
                }
                killed = true;
            }
            let wait = if killed {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                EXEC_PID_POLL
            };
            if let Ok(status) = tokio::time::timeout(wait, self.child.wait()).await {
                return status.ok().and_then(|s| s.code()).unwrap_or(-1);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        tracing::warn!("runc exec did not end with its command: killing it");
        let _ = self.child.start_kill();
        match tokio::time::timeout(EXEC_KILL_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => status.code().unwrap_or(-1),
            _ => -1,
        }
    }

    fn command_pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|pid| *pid > 0)
    }
}

impl Drop for ExecProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// One stream of an ExecSync: its first [`MAX_EXEC_OUTPUT`] bytes and how many the
/// command wrote in all.
#[derive(Debug, Default)]
pub(super) struct Captured {
    pub(super) kept: Vec<u8>,
    pub(super) total: u64,
}

/// Reads the whole stream, so the command never blocks on a full pipe, keeping the
/// first `limit` bytes.
pub(super) async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    stream: Option<R>,
    limit: usize,
) -> Captured {
    use tokio::io::AsyncReadExt;
    let mut captured = Captured::default();
    let Some(mut stream) = stream else {
        return captured;
    };
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        captured.total += n as u64;
        let room = limit.saturating_sub(captured.kept.len());
        captured.kept.extend_from_slice(&buf[..n.min(room)]);
    }
    captured
}

/// The line appended to stderr when output was cut, naming what was kept of each
/// stream; none when nothing was.
pub(super) fn cut_note(stdout_total: u64, stderr_total: u64) -> Option<String> {
    let limit = MAX_EXEC_OUTPUT as u64;
    if stdout_total <= limit && stderr_total <= limit {
        return None;
    }
    let stream = |name: &str, total: u64| {
        if total > limit {
            format!("{name} {total} bytes, first {limit} kept")
        } else {
            format!("{name} {total} bytes")
        }
    };
    Some(format!(
        "\n[trellis: ExecSync output cut to fit one CRI message: {}; {}. Use Exec for larger output.]\n",
        stream("stdout", stdout_total),
        stream("stderr", stderr_total)
    ))
}
