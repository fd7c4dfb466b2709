//! Unpacking one layer's tar stream into a fresh directory, safely.
//!
//! A layer is hostile input. Every call here is made relative to a directory
//! descriptor reached from the layer's root one plain name at a time, with
//! `O_NOFOLLOW` (or `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and
//! every metadata change (owner, mode, times, xattrs) acts on the entry itself,
//! through a descriptor of it or with `AT_SYMLINK_NOFOLLOW`. So nothing an entry
//! says, in whatever order entries come, can touch a file outside the layer or go
//! through a symlink: not while writing, and not when directory modes are applied
//! at the end (a directory that a later entry replaced by a symlink is skipped).
//!
//! Paths with `..` or a leading `/` are refused, as are hard links whose source is
//! outside the layer. OCI whiteouts become overlayfs whiteouts: `.wh.<name>` a 0:0
//! character device, `.wh..wh..opq` the `trusted.overlay.opaque` attribute on its
//! directory. `trusted.*` attributes of the layer itself are dropped: overlayfs reads
//! its own instructions there (`redirect`, `opaque`, `metacopy`), and an image must
//! not give it any.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, XattrFlags};
use trellis_common::text::{excerpt, excerpt_path};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";
/// Attributes of this namespace are the kernel's and overlayfs's, never an image's.
const PRIVILEGED_XATTR_PREFIX: &str = "trusted.";
/// The longest entry path taken (Linux's PATH_MAX): it also bounds the tree's depth.
const MAX_PATH_BYTES: usize = 4096;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("layer entry `{entry}` refused: {reason}")]
    Refused { entry: String, reason: String },
    #[error("layer entry `{entry}`: {source}")]
    Io {
        entry: String,
        #[source]
        source: io::Error,
    },
    /// The stream is not tar, or a header field is garbage; the message quotes at most
    /// an excerpt of it.
    #[error("layer is not a readable tar stream: {0}")]
    Tar(String),
}

fn refused(entry: &Path, reason: impl Into<String>) -> ExtractError {
    ExtractError::Refused {
        entry: excerpt_path(entry),
        reason: reason.into(),
    }
}

fn io_error(entry: &Path) -> impl Fn(io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Io {
        entry: excerpt_path(entry),
        source,
    }
}

fn errno_error(entry: &Path) -> impl Fn(rustix::io::Errno) -> ExtractError + '_ {
    move |errno| ExtractError::Io {
        entry: excerpt_path(entry),
        source: io::Error::from(errno),
    }
}

fn tar_error(error: io::Error) -> ExtractError {
    ExtractError::Tar(excerpt(&error.to_string()))
}

/// The entry's path as a relative path of normal components, or a refusal.
fn sanitize(raw: &Path) -> Result<PathBuf, ExtractError> {
    if raw.as_os_str().len() > MAX_PATH_BYTES {
        return Err(refused(
            raw,
            format!("path longer than {MAX_PATH_BYTES} bytes"),
        ));
    }
    // `/` alone (umoci writes it) names the layer's root, which is not an escape.
    if raw
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::CurDir))
    {
        return Ok(PathBuf::new());
    }
    let mut clean = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(refused(raw, "absolute path")),
            Component::ParentDir => return Err(refused(raw, "path contains `..`")),
        }
    }
    Ok(clean)
}

/// A directory or a plain name inside it: `relative` split into parent and name.
fn split(relative: &Path) -> (&Path, &std::ffi::OsStr) {
    (
        relative.parent().unwrap_or(Path::new("")),
        relative.file_name().unwrap_or_default(),
    )
}

/// Opens `name` (one plain component) in `dir` as a directory, never through a symlink.
fn open_child_dir(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// The layer being written: its root, and the directory the last entry went into
/// (entries come grouped by directory, so most need no walk).
struct Layer {
    root: OwnedFd,
    last_parent: Option<(PathBuf, OwnedFd)>,
}

impl Layer {
    fn open(dest: &Path) -> Result<Self, ExtractError> {
        let root = rustix::fs::open(dest, DIR_FLAGS, Mode::empty()).map_err(errno_error(dest))?;
        Ok(Self {
            root,
            last_parent: None,
        })
    }

    /// The directory `relative` inside the layer, made (0755) where missing; refused
    /// when a component is a symlink or not a directory.
    fn dir(&mut self, relative: &Path, entry: &Path) -> Result<BorrowedFd<'_>, ExtractError> {
        let current = match self.last_parent.take() {
            Some((path, fd)) if path == relative => (path, fd),
            _ => (relative.to_path_buf(), self.walk(relative, entry)?),
        };
        Ok(self.last_parent.insert(current).1.as_fd())
    }

    fn walk(&self, relative: &Path, entry: &Path) -> Result<OwnedFd, ExtractError> {
        if relative.as_os_str().is_empty() {
            return rustix::io::dup(&self.root).map_err(errno_error(entry));
        }
        // One call when the whole path is already there, as it usually is.
        if let Ok(fd) = rustix::fs::openat2(&self.root, relative, DIR_FLAGS, Mode::empty(), BENEATH)
        {
            return Ok(fd);
        }
        let mut current = rustix::io::dup(&self.root).map_err(errno_error(entry))?;
        let mut walked = PathBuf::new();
        for component in relative.components() {
            let name = component.as_os_str();
            walked.push(name);
            current = match open_child_dir(current.as_fd(), name) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => {
                    match rustix::fs::mkdirat(&current, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(errno) => return Err(errno_error(entry)(errno)),
                    }
                    open_child_dir(current.as_fd(), name).map_err(errno_error(entry))?
                }
                Err(errno) => {
                    let kind = rustix::fs::statat(&current, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map(|stat| FileType::from_raw_mode(stat.st_mode));
                    return Err(match kind {
                        Ok(FileType::Symlink) => refused(
                            entry,
                            format!("writes through the symlink `{}`", excerpt_path(&walked)),
                        ),
                        Ok(kind) if kind != FileType::Directory => refused(
                            entry,
                            format!("a parent, `{}`, is not a directory", excerpt_path(&walked)),
                        ),
                        _ => errno_error(entry)(errno),
                    });
                }
            };
        }
        Ok(current)
    }

    /// An existing directory inside the layer, or none when something else (a later
    /// entry's symlink or file) is there now.
    fn existing_dir(&self, relative: &Path) -> Option<OwnedFd> {
        if relative.as_os_str().is_empty() {
            return rustix::io::dup(&self.root).ok();
        }
        rustix::fs::openat2(&self.root, relative, DIR_FLAGS, Mode::empty(), BENEATH).ok()
    }

    /// Forgets the cached directory: a removal may have taken it out of the tree.
    fn forget_cached(&mut self) {
        self.last_parent = None;
    }
}

/// Removes `name` in `dir` and, for a directory, everything under it, without
/// following any symlink.
fn remove_tree(dir: BorrowedFd<'_>, name: &std::ffi::OsStr) -> rustix::io::Result<()> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    let child = open_child_dir(dir, name)?;
    let mut names = Vec::new();
    for item in rustix::fs::Dir::read_from(&child)? {
        let item = item?;
        let item_name = item.file_name().to_bytes();
        if item_name != b"." && item_name != b".." {
            names.push(std::ffi::OsString::from_vec(item_name.to_vec()));
        }
    }
    for item_name in names {
        remove_tree(child.as_fd(), &item_name)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Removes whatever an earlier entry left at `name` (a later entry wins), except a
/// directory that the new entry keeps as a directory. Returns whether a directory
/// was removed.
fn clear(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    keep_dir: bool,
    entry: &Path,
) -> Result<bool, ExtractError> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            if keep_dir {
                return Ok(false);
            }
            remove_tree(dir, name).map_err(errno_error(entry))?;
            Ok(true)
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map(|()| false)
            .map_err(errno_error(entry)),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(errno) => Err(errno_error(entry)(errno)),
    }
}

/// What an entry became, held so that its metadata is set on it and nothing else.
enum Written {
    /// A regular file, open for writing.
    File(OwnedFd),
    /// A directory, open; its mode and time are applied at the end.
    Dir(OwnedFd),
    /// A device node or FIFO, held by an `O_PATH` descriptor (opening one for real
    /// could block or have effects).
    Special(OwnedFd),
    /// A symlink, set through its parent with `AT_SYMLINK_NOFOLLOW`.
    Symlink,
}

/// Unpacks the tar stream into `dest` (which must exist and be empty) and returns
/// the bytes of file content written.
pub fn unpack<R: Read>(reader: R, dest: &Path) -> Result<u64, ExtractError> {
    let mut archive = tar::Archive::new(reader);
    let mut layer = Layer::open(dest)?;
    let mut written = 0u64;
    // Directory modes and times are applied last, so that a read-only directory does
    // not stop its own entries from being written, and creating entries does not
    // change a directory's time after it was set. A later entry for the same path wins.
    let mut directories: BTreeMap<PathBuf, (u32, i64)> = BTreeMap::new();
    for entry in archive.entries().map_err(tar_error)? {
        let mut entry = match entry {
            Ok(entry) => entry,
            // Some image builders end the stream right after the last entry's data,
            // without padding or the end-of-archive blocks; Go's reader (containerd)
            // accepts that, and the diff id still vouches for every byte. A stream
            // cut inside an entry's data fails where that data is read instead.
            Err(error) if error.to_string().contains("unexpected EOF during skip") => {
                tracing::debug!("layer ends without its end-of-archive blocks");
                break;
            }
            Err(error) => return Err(tar_error(error)),
        };
        let raw = entry.path().map_err(tar_error)?.into_owned();
        let relative = sanitize(&raw)?;
        if relative.as_os_str().is_empty() {
            continue;
        }
        let (parent_path, name) = split(&relative);
        let name = name.to_os_string();
        let name_text = name.to_str().unwrap_or_default();

        if name_text == OPAQUE_MARKER {
            let dir = layer.dir(parent_path, &raw)?;
            rustix::fs::fsetxattr(dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(errno_error(&raw))?;
            continue;
        }
        if let Some(hidden) = name_text.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(refused(&raw, "malformed whiteout"));
            }
            let dir = layer.dir(parent_path, &raw)?;
            let removed_dir = clear(dir, hidden.as_ref(), false, &raw)?;
            rustix::fs::mknodat(dir, hidden, FileType::CharacterDevice, Mode::empty(), 0)
                .map_err(errno_error(&raw))?;
            if removed_dir {
                layer.forget_cached();
            }
            continue;
        }

        let header = entry.header().clone();
        let kind = header.entry_type();
        if matches!(kind, tar::EntryType::Link) {
            link(&mut layer, &mut entry, parent_path, &name, &raw)?;
            // A hard link shares the inode: ownership and mode are already set.
            continue;
        }
        let meta = metadata(&header, &raw)?;
        let dir = layer.dir(parent_path, &raw)?;
        let keep_dir = matches!(kind, tar::EntryType::Directory);
        let mut removed_dir = false;
        let made = match kind {
            tar::EntryType::Directory => {
                clear(dir, &name, true, &raw)?;
                match rustix::fs::mkdirat(dir, &name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(errno) => return Err(errno_error(&raw)(errno)),
                }
                directories.insert(relative.clone(), (meta.mode, meta.mtime));
                Written::Dir(open_child_dir(dir, &name).map_err(errno_error(&raw))?)
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                removed_dir = clear(dir, &name, keep_dir, &raw)?;
                let flags = OFlags::WRONLY
                    | OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC;
                let fd = rustix::fs::openat(dir, &name, flags, Mode::from_raw_mode(0o600))
                    .map_err(errno_error(&raw))?;
                let mut file = std::fs::File::from(fd);
                let copied = io::copy(&mut entry, &mut file).map_err(io_error(&raw))?;
                if copied != header.size().map_err(tar_error)? {
                    return Err(refused(&raw, "the layer ends inside this file's data"));
                }
                written += copied;
                Written::File(OwnedFd::from(file))
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(tar_error)?
                    .ok_or_else(|| refused(&raw, "symlink without a target"))?;
                removed_dir = clear(dir, &name, keep_dir, &raw)?;
                rustix::fs::symlinkat(target.as_ref(), dir, &name).map_err(errno_error(&raw))?;
                Written::Symlink
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (file_type, device) = match kind {
                    tar::EntryType::Fifo => (FileType::Fifo, 0),
                    other => {
                        let (major, minor) = device_numbers(&header)?;
                        let file_type = if other == tar::EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (file_type, rustix::fs::makedev(major, minor))
                    }
                };
                removed_dir = clear(dir, &name, keep_dir, &raw)?;
                rustix::fs::mknodat(dir, &name, file_type, Mode::empty(), device)
                    .map_err(errno_error(&raw))?;
                let fd = rustix::fs::openat(
                    dir,
                    &name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(errno_error(&raw))?;
                Written::Special(fd)
            }
            // PAX and GNU long-name headers are folded into entries by the tar crate;
            // anything else (sockets, sparse oddities) has no place in an image.
            other => {
                tracing::debug!(entry = %excerpt_path(&raw), ?other, "skipping tar entry of an unsupported type");
                continue;
            }
        };
        let xattrs = xattrs_of(&mut entry, &raw)?;
        apply(dir, &name, &made, &meta, &xattrs, &raw)?;
        if removed_dir {
            layer.forget_cached();
        }
    }
    // Deepest first; a directory that a later entry replaced (by a symlink, say) is
    // no longer reachable as a directory, and its mode belongs to nothing.
    let mut deferred: Vec<(PathBuf, (u32, i64))> = directories.into_iter().collect();
    deferred.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    for (path, (mode, mtime)) in deferred {
        let Some(fd) = layer.existing_dir(&path) else {
            tracing::debug!(entry = %excerpt_path(&path), "a later entry replaced this directory; its mode is not applied");
            continue;
        };
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(errno_error(&path))?;
        rustix::fs::futimens(&fd, &timestamps(mtime)).map_err(errno_error(&path))?;
    }
    Ok(written)
}

/// A hard link to an entry earlier in this layer (never to a directory).
fn link<R: Read>(
    layer: &mut Layer,
    entry: &mut tar::Entry<'_, R>,
    parent: &Path,
    name: &std::ffi::OsStr,
    raw: &Path,
) -> Result<(), ExtractError> {
    let source = entry
        .link_name()
        .map_err(tar_error)?
        .ok_or_else(|| refused(raw, "hard link without a target"))?
        .into_owned();
    if source.is_absolute() {
        return Err(refused(
            raw,
            format!("hard link to the absolute path `{}`", excerpt_path(&source)),
        ));
    }
    let source_relative = sanitize(&source).map_err(|_| {
        refused(
            raw,
            format!("hard link to `{}` leaves the layer", excerpt_path(&source)),
        )
    })?;
    let not_here = || {
        refused(
            raw,
            format!(
                "hard link to `{}`, which is not in this layer",
                excerpt_path(&source)
            ),
        )
    };
    let (source_parent, source_name) = split(&source_relative);
    let source_dir = layer.existing_dir(source_parent).ok_or_else(not_here)?;
    match rustix::fs::statat(&source_dir, source_name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            return Err(refused(raw, "hard link to a directory"));
        }
        Ok(_) => {}
        Err(_) => return Err(not_here()),
    }
    let dir = layer.dir(parent, raw)?;
    let removed_dir = clear(dir, name, false, raw)?;
    // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
    rustix::fs::linkat(&source_dir, source_name, dir, name, AtFlags::empty())
        .map_err(errno_error(raw))?;
    if removed_dir {
        layer.forget_cached();
    }
    Ok(())
}

mod metadata;
#[cfg(test)]
mod tests;

use metadata::{apply, device_numbers, metadata, timestamps, xattrs_of};
