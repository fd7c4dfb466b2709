//! Directories that hold image or container content, and files that hold secrets:
//! reachable by root only.
//!
//! Image layers carry setuid binaries and device nodes, and containers plant files in
//! their writable layers; a host user who can walk into those directories can run or
//! open them. Every such tree hangs under a 0700 directory, as containers/storage
//! does, set when the directory is made and again at every start (for nodes made
//! before this rule). Lock files (one owner at a time of a socket or a state
//! directory) are made 0600 here too.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// The mode of a private directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `path` (and missing parents) and makes it 0700 and owned by this process's
/// user. A symlink in its place is refused rather than followed.
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new()
        .mode(PRIVATE_DIR_MODE)
        .create(path)
    {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory (a symlink or file is in its place)",
            path.display()
        )));
    }
    if meta.permissions().mode() & 0o7777 != PRIVATE_DIR_MODE {
        // The path was just checked not to be a symlink, and its parents are ours.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
    }
    Ok(())
}

/// Writes `contents` to `path` as a file only its owner can read or write (0600),
/// whatever was there before: the file is made anew beside it and renamed into place,
/// so that no reader ever sees it half written or with a wider mode.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?
        .to_owned();
    name.push(".new");
    let staging = path.with_file_name(name);
    match std::fs::remove_file(&staging) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&staging, path)
}

/// An exclusive `flock` on `path` (made 0600 when missing), taken without waiting:
/// `None` when another process holds it. It is held until the returned value drops,
/// and the kernel lets it go with the process however that ends.
pub fn try_lock_file(path: &Path) -> io::Result<Option<Flock<File>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn new_and_existing_directories_become_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fresh = dir.path().join("a/b/state");
        ensure_private_dir(&fresh).expect("create");
        assert_eq!(
            std::fs::metadata(&fresh).expect("meta").mode() & 0o7777,
            0o700
        );
        let old = dir.path().join("old");
        std::fs::create_dir(&old).expect("mkdir");
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&old).expect("tighten");
        assert_eq!(
            std::fs::metadata(&old).expect("meta").mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn private_files_are_0600_even_over_a_wider_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("seed");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private_file(&path, b"new").expect("write private");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o7777,
            0o600
        );
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            1,
            "no staging file left"
        );
    }

    #[test]
    fn a_symlink_in_place_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(ensure_private_dir(&link).is_err());
        assert_eq!(
            std::fs::metadata(&target).expect("meta").mode() & 0o7777,
            0o755
        );
    }
}
