//! Restarts per child, as `trellis up` counts them, for `trellis status`.
//!
//! The supervisor has no interface of its own to ask, so it keeps its counts in a small
//! file next to the services' sockets, with its pid: a file left by a supervisor that
//! is gone (killed, so it could not remove it) is not read as today's counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

const FILE: &str = "up-restarts.json";
/// Far more than five children's counts: a bigger file is not ours.
const MAX_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counts {
    supervisor_pid: u32,
    children: BTreeMap<String, u64>,
}

struct Ledger {
    path: PathBuf,
    counts: Mutex<Counts>,
}

static LEDGER: OnceLock<Ledger> = OnceLock::new();

/// Starts counting for this `trellis up`, over what an earlier one left.
pub fn start(run_dir: &Path) {
    let ledger = Ledger {
        path: run_dir.join(FILE),
        counts: Mutex::new(Counts {
            supervisor_pid: std::process::id(),
            children: BTreeMap::new(),
        }),
    };
    if let Err(error) = std::fs::create_dir_all(run_dir) {
        tracing::warn!(dir = %run_dir.display(), %error, "cannot keep restart counts for trellis status");
        return;
    }
    ledger.save(&ledger.counts.lock().unwrap_or_else(|p| p.into_inner()));
    let _ = LEDGER.set(ledger);
}

/// Counts one restart of `child` (nothing outside `trellis up`).
pub fn count(child: &str) {
    let Some(ledger) = LEDGER.get() else {
        return;
    };
    let mut counts = ledger.counts.lock().unwrap_or_else(|p| p.into_inner());
    *counts.children.entry(child.to_string()).or_default() += 1;
    ledger.save(&counts);
}

/// Removes the counts when `trellis up` stops: its children are gone with it.
pub fn stop() {
    if let Some(ledger) = LEDGER.get() {
        let _ = std::fs::remove_file(&ledger.path);
    }
}

impl Ledger {
    /// Written whole and renamed into place, so a reader never sees half of it. A
    /// failure costs `trellis status` its counts, not the node its supervisor.
    fn save(&self, counts: &Counts) {
        let temporary = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(counts)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&temporary, bytes))
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(error) = written {
            tracing::warn!(file = %self.path.display(), %error, "cannot save restart counts for trellis status");
        }
    }
}

/// The running supervisor's restart counts per child (0 for one never restarted), or
/// `None` when no `trellis up` runs this node's services.
pub fn read(run_dir: &Path) -> Option<BTreeMap<String, u64>> {
    let path = run_dir.join(FILE);
    let file = std::fs::File::open(&path).ok()?;
    if file.metadata().ok()?.len() > MAX_FILE_BYTES {
        return None;
    }
    let counts: Counts = serde_json::from_reader(std::io::BufReader::new(file)).ok()?;
    alive(counts.supervisor_pid).then_some(counts.children)
}

fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Pid 0 would be our own process group. EPERM: alive, but another user's (a
    // status run by someone other than the supervisor's user).
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_a_supervisor_that_is_gone_are_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |pid: u32| {
            let counts = Counts {
                supervisor_pid: pid,
                children: BTreeMap::from([("runtime".to_string(), 2)]),
            };
            std::fs::write(
                dir.path().join(FILE),
                serde_json::to_vec(&counts).expect("json"),
            )
            .expect("write");
        };
        assert_eq!(read(dir.path()), None, "no file");
        write(std::process::id());
        assert_eq!(
            read(dir.path()),
            Some(BTreeMap::from([("runtime".to_string(), 2)]))
        );
        write(0);
        assert_eq!(read(dir.path()), None, "pid 0 is no supervisor");
        write(i32::MAX as u32);
        assert_eq!(read(dir.path()), None, "a pid no process has");
        std::fs::write(dir.path().join(FILE), b"{not json").expect("write");
        assert_eq!(read(dir.path()), None, "garbage");
    }
}
