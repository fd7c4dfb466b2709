//! Disk usage of the layer store, as ImageFsInfo reports it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use trellis_proto::storage::v1::FsUsageResponse;

use crate::error::StorageError;

#[derive(Debug, Default, PartialEq)]
pub struct Usage {
    /// Allocated bytes, as `du` counts them (blocks, not apparent sizes).
    pub bytes: u64,
    pub inodes: u64,
}

/// Walks a tree without following symlinks, counting each hard-linked inode once.
pub fn measure(root: &Path) -> Result<Usage, StorageError> {
    let mut usage = Usage::default();
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::symlink_metadata(&path).map_err(|source| {
            StorageError::io(format!("cannot stat {}", path.display()), source)
        })?;
        if metadata.nlink() > 1
            && !metadata.is_dir()
            && !seen.insert((metadata.dev(), metadata.ino()))
        {
            continue;
        }
        usage.bytes += metadata.blocks() * 512;
        usage.inodes += 1;
        if metadata.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|source| {
                StorageError::io(format!("cannot list {}", path.display()), source)
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| {
                    StorageError::io(format!("cannot list {}", path.display()), source)
                })?;
                pending.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// The mount point of the filesystem holding `path`: the longest mount point in
/// /proc/self/mountinfo that is a prefix of it.
pub fn mountpoint_of(path: &Path) -> Result<PathBuf, StorageError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| StorageError::io("cannot read /proc/self/mountinfo", source))?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|mountpoint| canonical.starts_with(mountpoint))
        .max_by_key(|mountpoint| mountpoint.as_os_str().len())
        .unwrap_or_else(|| PathBuf::from("/")))
}

/// Usage of the store at `store_path`, walked on a blocking thread.
pub async fn fs_usage(store_path: PathBuf) -> Result<FsUsageResponse, StorageError> {
    let path = store_path.clone();
    let (usage, mountpoint) = tokio::task::spawn_blocking(move || {
        Ok::<_, StorageError>((measure(&path)?, mountpoint_of(&path)?))
    })
    .await
    .map_err(|e| StorageError::io("usage scan stopped", std::io::Error::other(e.to_string())))??;
    Ok(FsUsageResponse {
        store_path: store_path.display().to_string(),
        mountpoint: mountpoint.display().to_string(),
        used_bytes: usage.bytes,
        inodes_used: usage.inodes,
        timestamp_unix_nano: crate::now_nanos(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_inodes_and_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::hard_link(dir.path().join("sub/a"), dir.path().join("b")).expect("link");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("c")).expect("symlink");
        let usage = measure(dir.path()).expect("measure");
        assert_eq!(usage.inodes, 4, "root, sub, a (once), symlink");
        assert!(usage.bytes >= 64 * 1024, "{usage:?}");
        assert!(mountpoint_of(dir.path()).expect("mountpoint").is_absolute());
    }
}
