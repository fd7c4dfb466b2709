//! Remembers that a directory ran out of space, until a write there works again.
//!
//! A full disk met while writing files (a layer being unpacked) leaves nothing broken
//! behind that would tell health about it, unlike a record store that failed: the next
//! call simply fails again. A service that writes big files keeps a `SpaceWatch`, so
//! that its health says NOT_SERVING (and why) from the failure until a test write in
//! that directory succeeds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::service::ReadinessProbe;

/// How much a probe writes: more than the page a file system may still have room in.
const PROBE_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct SpaceWatch {
    /// Where the probe file is written: a directory of the service's own that nothing
    /// sweeps (a stray file among layers would be taken for one).
    probe_dir: PathBuf,
    /// The directory that ran out, until a probe write works.
    full: Arc<Mutex<Option<PathBuf>>>,
}

impl SpaceWatch {
    /// A watch whose probe writes in `probe_dir`, on the file system it watches.
    pub fn new(probe_dir: &Path) -> Self {
        Self {
            probe_dir: probe_dir.to_path_buf(),
            full: Arc::default(),
        }
    }

    /// Notes that writing under `dir` failed for want of space.
    pub fn ran_out(&self, dir: &Path) {
        let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        if full.is_none() {
            tracing::warn!(dir = %dir.display(), "out of space; NOT_SERVING until a write there works again");
        }
        *full = Some(dir.to_path_buf());
    }

    /// `Ok` unless space ran out and a test write in that directory still fails.
    pub fn check(&self) -> Result<(), String> {
        let Some(dir) = self.full.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let probe = self
            .probe_dir
            .join(format!(".space-probe-{}", std::process::id()));
        let written = std::fs::File::create(&probe).and_then(|mut file| {
            file.write_all(&[0; PROBE_BYTES])?;
            file.sync_all()
        });
        let _ = std::fs::remove_file(&probe);
        match written {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "space is back");
                let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
                if full.as_deref() == Some(dir.as_path()) {
                    *full = None;
                }
                Ok(())
            }
            Err(error) => Err(format!(
                "cannot write in {} (probed in {}): {error}",
                dir.display(),
                self.probe_dir.display()
            )),
        }
    }

    /// [`SpaceWatch::check`] as a health check of the service skeleton.
    pub fn readiness_probe(&self) -> ReadinessProbe {
        let watch = self.clone();
        Box::new(move || watch.check())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_ran_out_is_unready_until_a_write_there_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("gone");
        let watch = SpaceWatch::new(&gone);
        watch.check().expect("nothing ran out");
        watch.ran_out(&gone.join("layers"));
        let error = watch
            .check()
            .expect_err("cannot write in a missing directory");
        assert!(error.contains(&gone.display().to_string()), "{error}");
        std::fs::create_dir(&gone).expect("mkdir");
        watch.check().expect("writable again");
        assert!(
            std::fs::read_dir(&gone).expect("list").next().is_none(),
            "the probe file is removed"
        );
        watch.check().expect("and stays ready");
    }
}
