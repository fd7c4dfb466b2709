//! Container root filesystems: an overlay of the image's layers under a writable
//! upper directory, one per container, at `<root>/<container>/merged`.
//!
//! The record is written before the mount (Preparing) and after it (Mounted), and
//! before teardown (Releasing); at start, anything not Mounted is torn down and a
//! Mounted record whose mount vanished (a reboot) is mounted again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{MntFlags, MsFlags};
use trellis_common::store::{Records, Store};

use crate::error::StorageError;

const TABLE: &str = "rootfs";

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum RootfsState {
    Preparing = 0,
    Mounted = 1,
    Releasing = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RootfsRecord {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub image_id: String,
    #[prost(enumeration = "RootfsState", tag = "3")]
    pub state: i32,
    /// Overlay lower directories, top first, as mounted.
    #[prost(string, repeated, tag = "4")]
    pub lower_dirs: Vec<String>,
}

pub struct RootfsStore {
    root: PathBuf,
    table: Records<RootfsRecord, StorageError>,
    write: Mutex<()>,
}

/// Container ids name directories: a strict alphabet, no path tricks.
pub fn validate_container_id(id: &str) -> Result<(), StorageError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "container id `{}` must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'",
            trellis_common::text::excerpt(id)
        )))
    }
}

impl RootfsStore {
    pub fn open(root: PathBuf, store: &dyn Store) -> Result<Self, StorageError> {
        // Writable layers hold what containers planted (setuid files among them): no
        // host user may walk in.
        trellis_common::dirs::ensure_private_dir(&root).map_err(|source| {
            StorageError::io(
                format!("cannot make {} private (0700)", root.display()),
                source,
            )
        })?;
        let rootfs = Self {
            root,
            table: Records::open(store, TABLE)?,
            write: Mutex::new(()),
        };
        rootfs.recover()?;
        Ok(rootfs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dir(&self, container_id: &str) -> PathBuf {
        self.root.join(container_id)
    }

    /// The writable (upper) directory of a container's root filesystem.
    pub fn upper_dir(&self, container_id: &str) -> PathBuf {
        self.dir(container_id).join("upper")
    }

    pub fn mount_path(&self, container_id: &str) -> PathBuf {
        self.dir(container_id).join("merged")
    }

    fn records(&self) -> Result<Vec<RootfsRecord>, StorageError> {
        self.table.all()
    }

    /// The containers with a root filesystem recorded.
    pub fn container_ids(&self) -> Result<Vec<String>, StorageError> {
        Ok(self
            .records()?
            .into_iter()
            .map(|record| record.container_id)
            .collect())
    }

    fn save(&self, record: &RootfsRecord) -> Result<(), StorageError> {
        self.table.put(&record.container_id, record)
    }

    /// The container using an image, if one does.
    pub fn user_of(&self, image_id: &str) -> Result<Option<String>, StorageError> {
        Ok(self
            .records()?
            .into_iter()
            .find(|r| r.image_id == image_id)
            .map(|r| r.container_id))
    }

    /// Mounts (or finds mounted) the root filesystem of a container.
    pub fn prepare(
        &self,
        container_id: &str,
        image_id: &str,
        lower_dirs: Vec<PathBuf>,
    ) -> Result<PathBuf, StorageError> {
        validate_container_id(container_id)?;
        let _write = self.lock();
        if let Some(existing) = self.table.get(container_id)? {
            if existing.image_id != image_id {
                return Err(StorageError::InvalidArgument(format!(
                    "container {container_id} already has a root filesystem of image {}",
                    existing.image_id
                )));
            }
            if existing.state == RootfsState::Mounted as i32
                && is_mounted(&self.mount_path(container_id))?
            {
                return Ok(self.mount_path(container_id));
            }
        }
        let record = RootfsRecord {
            container_id: container_id.to_string(),
            image_id: image_id.to_string(),
            state: RootfsState::Preparing as i32,
            lower_dirs: lower_dirs.iter().map(|d| d.display().to_string()).collect(),
        };
        self.save(&record)?;
        let step = trellis_common::step_span!("rootfs.prepare", container.id = %container_id);
        let mounted = step.in_scope(|| self.mount(&record)).and_then(|()| {
            trellis_common::failpoint::hit("storage.rootfs.after-mount")?;
            Ok(())
        });
        if let Err(error) = mounted {
            let _ = self.teardown(container_id);
            let _ = self.table.delete(container_id);
            return Err(error);
        }
        self.save(&RootfsRecord {
            state: RootfsState::Mounted as i32,
            ..record
        })?;
        Ok(self.mount_path(container_id))
    }

    fn mount(&self, record: &RootfsRecord) -> Result<(), StorageError> {
        let dir = self.dir(&record.container_id);
        for sub in ["upper", "work", "merged"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| {
                StorageError::io(format!("cannot create {}", path.display()), source)
            })?;
        }
        let merged = dir.join("merged");
        if is_mounted(&merged)? {
            return Ok(());
        }
        mount_overlay(
            &record.lower_dirs,
            &dir.join("upper"),
            &dir.join("work"),
            &merged,
        )
    }

    /// Unmounts and removes a container's root filesystem; nothing there is fine.
    pub fn release(&self, container_id: &str) -> Result<(), StorageError> {
        validate_container_id(container_id)?;
        let _write = self.lock();
        if let Some(record) = self.table.get(container_id)? {
            self.save(&RootfsRecord {
                state: RootfsState::Releasing as i32,
                ..record
            })?;
        }
        let step = trellis_common::step_span!("rootfs.remove", container.id = %container_id);
        step.in_scope(|| self.teardown(container_id))?;
        self.table.delete(container_id)?;
        Ok(())
    }

    fn teardown(&self, container_id: &str) -> Result<(), StorageError> {
        let merged = self.mount_path(container_id);
        while is_mounted(&merged)? {
            nix::mount::umount2(&merged, MntFlags::MNT_DETACH).map_err(|source| {
                StorageError::Mount {
                    action: "unmount",
                    target: merged.display().to_string(),
                    source,
                }
            })?;
        }
        let dir = self.dir(container_id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StorageError::io(
                format!("cannot remove {}", dir.display()),
                source,
            )),
        }
    }

    fn recover(&self) -> Result<(), StorageError> {
        for record in self.records()? {
            if record.state == RootfsState::Mounted as i32 {
                if let Err(error) = self.mount(&record) {
                    tracing::error!(container = %record.container_id, %error, "cannot mount a recorded root filesystem again");
                }
            } else {
                tracing::info!(container = %record.container_id, "finishing a root filesystem operation cut short");
                self.teardown(&record.container_id)?;
                self.table.delete(&record.container_id)?;
            }
        }
        Ok(())
    }
}

/// The kernel's limit on a mount's options: one page.
const MOUNT_OPTIONS_MAX: usize = 4095;

/// Mounts an overlay of `lower_dirs` (layer directories, top first, all in one layer
/// store) at `merged`. The lower directories are named by their short links, relative
/// to the layer store, so that many layers fit in the kernel's one page of options;
/// the mount is made from a thread of its own whose working directory is the store
/// (`unshare(CLONE_FS)` gives the thread a working directory of its own).
fn mount_overlay(
    lower_dirs: &[String],
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<(), StorageError> {
    let mount_error = |source| StorageError::Mount {
        action: "mount the overlay at",
        target: merged.display().to_string(),
        source,
    };
    let store = lower_dirs
        .first()
        .and_then(|dir| Path::new(dir).parent())
        .ok_or_else(|| StorageError::InvalidArgument("an image needs at least one layer".into()))?;
    let mut lowers = Vec::with_capacity(lower_dirs.len());
    for dir in lower_dirs {
        let dir = Path::new(dir);
        let hex = dir
            .file_name()
            .and_then(|name| name.to_str())
            .filter(|_| dir.parent() == Some(store));
        let hex = hex.ok_or_else(|| {
            StorageError::Corrupt(format!(
                "lower directory {} is not in the layer store {}",
                dir.display(),
                store.display()
            ))
        })?;
        lowers.push(crate::links::ensure(store, hex).map_err(|source| {
            StorageError::io(format!("cannot make the short link of layer {hex}"), source)
        })?);
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    if options.len() > MOUNT_OPTIONS_MAX {
        return Err(StorageError::InvalidArgument(format!(
            "an image of {} layers does not fit in one overlay mount: its options take {} bytes, the kernel takes {MOUNT_OPTIONS_MAX}",
            lower_dirs.len(),
            options.len()
        )));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).map_err(mount_error)?;
                nix::unistd::chdir(store).map_err(mount_error)?;
                nix::mount::mount(
                    Some("overlay"),
                    merged,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(options.as_str()),
                )
                .map_err(mount_error)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(StorageError::io(
                    format!("cannot mount the overlay at {}", merged.display()),
                    std::io::Error::other("the mounting thread panicked"),
                ))
            })
    })
}

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> Result<bool, StorageError> {
    trellis_common::mounts::is_mounted(path)
        .map_err(|source| StorageError::io("cannot read /proc/self/mountinfo", source))
}
