//! Unpacking one layer's tar stream into a fresh directory, safely.
//!
//! Nothing an entry says can make us write outside `dest`: paths with `..` or a
//! leading `/` are refused, as are hard links whose target is absolute or escapes,
//! and an entry whose parent (inside the layer) is a symlink, since writing there
//! would follow it. Symlinks themselves are created as they are and never followed.
//! OCI whiteouts become overlayfs whiteouts: `.wh.<name>` a 0:0 character device,
//! `.wh..wh..opq` the `trusted.overlay.opaque` attribute on its directory.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, mknod};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";

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
    #[error("layer is not a readable tar stream: {0}")]
    Tar(#[source] io::Error),
}

fn refused(entry: &Path, reason: impl Into<String>) -> ExtractError {
    ExtractError::Refused { entry: entry.display().to_string(), reason: reason.into() }
}

fn io_error(entry: &Path) -> impl Fn(io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Io { entry: entry.display().to_string(), source }
}

fn nix_error(entry: &Path) -> impl Fn(nix::Error) -> ExtractError + '_ {
    move |errno| ExtractError::Io { entry: entry.display().to_string(), source: io::Error::from(errno) }
}

/// The entry's path as a relative path of normal components, or a refusal.
fn sanitize(raw: &Path) -> Result<PathBuf, ExtractError> {
    // `/` alone (umoci writes it) names the layer's root, which is not an escape.
    if raw.components().all(|c| matches!(c, Component::RootDir | Component::CurDir)) {
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

/// Makes sure every ancestor of `relative` inside `dest` is a real directory,
/// creating missing ones, and refusing to go through a symlink or a file.
fn prepare_parents(dest: &Path, relative: &Path, entry: &Path) -> Result<(), ExtractError> {
    let mut current = dest.to_path_buf();
    let Some(parent) = relative.parent() else { return Ok(()) };
    for component in parent.components() {
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                let inside = current.strip_prefix(dest).unwrap_or(&current);
                return Err(refused(entry, format!("writes through the symlink `{}`", inside.display())));
            }
            Ok(_) => return Err(refused(entry, "a parent is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(&current).map_err(io_error(entry))?,
            Err(e) => return Err(io_error(entry)(e)),
        }
    }
    Ok(())
}

/// Removes whatever an earlier entry left at `target` (a later entry wins), except a
/// directory that the new entry keeps as a directory.
fn clear(target: &Path, keep_dir: bool, entry: &Path) -> Result<(), ExtractError> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() && keep_dir => Ok(()),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(target).map_err(io_error(entry)),
        Ok(_) => std::fs::remove_file(target).map_err(io_error(entry)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(entry)(e)),
    }
}

struct DeferredDir {
    path: PathBuf,
    mode: u32,
    mtime: i64,
}

/// Unpacks the tar stream into `dest` (which must exist and be empty) and returns
/// the bytes of file content written.
pub fn unpack<R: Read>(reader: R, dest: &Path) -> Result<u64, ExtractError> {
    let mut archive = tar::Archive::new(reader);
    let mut written = 0u64;
    // Directory modes and times are applied last, so that a read-only directory does
    // not stop its own entries from being written.
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(ExtractError::Tar)? {
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
            Err(error) => return Err(ExtractError::Tar(error)),
        };
        let raw = entry.path().map_err(ExtractError::Tar)?.into_owned();
        let relative = sanitize(&raw)?;
        if relative.as_os_str().is_empty() {
            continue;
        }
        prepare_parents(dest, &relative, &raw)?;
        let target = dest.join(&relative);
        let name = relative.file_name().and_then(|n| n.to_str()).unwrap_or_default();

        if name == OPAQUE_MARKER {
            let dir = target.parent().unwrap_or(dest);
            xattr::set(dir, OPAQUE_XATTR, b"y").map_err(io_error(&raw))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(refused(&raw, "malformed whiteout"));
            }
            let whiteout = target.with_file_name(hidden);
            clear(&whiteout, false, &raw)?;
            mknod(&whiteout, SFlag::S_IFCHR, Mode::empty(), 0).map_err(nix_error(&raw))?;
            continue;
        }

        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(ExtractError::Tar)? & 0o7777;
        let mtime = header.mtime().map_err(ExtractError::Tar)? as i64;
        match kind {
            tar::EntryType::Directory => {
                clear(&target, true, &raw)?;
                if !target.is_dir() {
                    std::fs::create_dir(&target).map_err(io_error(&raw))?;
                }
                directories.push(DeferredDir { path: target.clone(), mode, mtime });
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                clear(&target, false, &raw)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(io_error(&raw))?;
                let copied = io::copy(&mut entry, &mut file).map_err(io_error(&raw))?;
                if copied != header.size().map_err(ExtractError::Tar)? {
                    return Err(refused(&raw, "the layer ends inside this file's data"));
                }
                written += copied;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name().map_err(ExtractError::Tar)?.ok_or_else(|| refused(&raw, "symlink without a target"))?;
                clear(&target, false, &raw)?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_error(&raw))?;
            }
            tar::EntryType::Link => {
                let link = entry.link_name().map_err(ExtractError::Tar)?.ok_or_else(|| refused(&raw, "hard link without a target"))?;
                if link.is_absolute() {
                    return Err(refused(&raw, format!("hard link to the absolute path `{}`", link.display())));
                }
                let source_relative = sanitize(&link).map_err(|_| refused(&raw, format!("hard link to `{}` leaves the layer", link.display())))?;
                prepare_parents(dest, &source_relative, &raw)?;
                let source = dest.join(&source_relative);
                match std::fs::symlink_metadata(&source) {
                    Ok(meta) if meta.is_dir() => return Err(refused(&raw, "hard link to a directory")),
                    Ok(_) => {}
                    Err(_) => return Err(refused(&raw, format!("hard link to `{}`, which is not in this layer", link.display()))),
                }
                clear(&target, false, &raw)?;
                std::fs::hard_link(&source, &target).map_err(io_error(&raw))?;
                // A hard link shares the inode: ownership and mode are already set.
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let flag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = u64::from(header.device_major().map_err(ExtractError::Tar)?.unwrap_or(0));
                let minor = u64::from(header.device_minor().map_err(ExtractError::Tar)?.unwrap_or(0));
                clear(&target, false, &raw)?;
                mknod(&target, flag, Mode::from_bits_truncate(mode), nix::sys::stat::makedev(major, minor)).map_err(nix_error(&raw))?;
            }
            // PAX and GNU long-name headers are folded into entries by the tar crate;
            // anything else (sockets, sparse oddities) has no place in an image.
            other => {
                tracing::debug!(entry = %raw.display(), ?other, "skipping tar entry of an unsupported type");
                continue;
            }
        }

        let uid = header.uid().map_err(ExtractError::Tar)? as u32;
        let gid = header.gid().map_err(ExtractError::Tar)? as u32;
        nix::unistd::fchownat(nix::fcntl::AT_FDCWD, &target, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(nix_error(&raw))?;
        if let Some(extensions) = entry.pax_extensions().map_err(ExtractError::Tar)? {
            for extension in extensions {
                let extension = extension.map_err(ExtractError::Tar)?;
                if let Ok(key) = extension.key()
                    && let Some(name) = key.strip_prefix(XATTR_PAX_PREFIX)
                {
                    xattr::set(&target, name, extension.value_bytes()).map_err(io_error(&raw))?;
                }
            }
        }
        if kind != tar::EntryType::Symlink && kind != tar::EntryType::Directory {
            // After chown, which clears set-id bits.
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(io_error(&raw))?;
        }
        if kind != tar::EntryType::Directory {
            set_mtime(&target, mtime, &raw)?;
        }
    }
    for dir in directories.iter().rev() {
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(dir.mode)).map_err(io_error(&dir.path))?;
        set_mtime(&dir.path, dir.mtime, &dir.path)?;
    }
    Ok(written)
}

fn set_mtime(path: &Path, mtime: i64, entry: &Path) -> Result<(), ExtractError> {
    let time = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, path, &time, &time, nix::sys::stat::UtimensatFlags::NoFollowSymlink).map_err(nix_error(entry))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    }

    /// Writes the raw name bytes, bypassing the tar crate's own path checks, so that
    /// hostile archives can be built.
    fn append_raw(builder: &mut tar::Builder<Vec<u8>>, mut header: tar::Header, name: &str, link: Option<&str>, data: &[u8]) {
        let gnu = header.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        builder.append(&header, data).expect("append");
    }

    fn archive(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mode = if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 };
            append_raw(&mut builder, header(*kind, data.len() as u64, mode), name, *link, data);
        }
        builder.into_inner().expect("finish")
    }

    fn unpack_into(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> (tempfile::TempDir, Result<u64, ExtractError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("layer");
        std::fs::create_dir(&dest).expect("mkdir");
        let result = unpack(archive(entries).as_slice(), &dest);
        (dir, result)
    }

    #[test]
    fn regular_layer_with_links_and_whiteouts() {
        use tar::EntryType::*;
        let (dir, result) = unpack_into(&[
            ("/", Directory, None, b""),
            ("etc/", Directory, None, b""),
            ("etc/hostname", Regular, None, b"box\n"),
            ("etc/alias", Link, Some("etc/hostname"), b""),
            ("bin/sh", Symlink, Some("/bin/busybox"), b""),
            ("var/.wh.cache", Regular, None, b""),
            ("opt/.wh..wh..opq", Regular, None, b""),
        ]);
        assert_eq!(result.expect("unpacks"), 4);
        let layer = dir.path().join("layer");
        assert_eq!(std::fs::read_to_string(layer.join("etc/hostname")).expect("file"), "box\n");
        assert_eq!(std::fs::metadata(layer.join("etc/alias")).expect("link").ino(), std::fs::metadata(layer.join("etc/hostname")).expect("file").ino());
        assert_eq!(std::fs::read_link(layer.join("bin/sh")).expect("symlink"), PathBuf::from("/bin/busybox"));
        let whiteout = std::fs::symlink_metadata(layer.join("var/cache")).expect("whiteout");
        assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
        assert_eq!(xattr::get(layer.join("opt"), OPAQUE_XATTR).expect("xattr"), Some(b"y".to_vec()));
        assert_eq!(std::fs::metadata(layer.join("etc")).expect("dir").mode() & 0o777, 0o755);
    }

    #[test]
    fn a_stream_without_its_trailer_still_unpacks_but_a_cut_file_does_not() {
        let full = archive(&[("a", tar::EntryType::Regular, None, b"12345"), ("b", tar::EntryType::Regular, None, b"678")]);
        // Headers and data of both entries, no padding after b, no trailer.
        let without_trailer = &full[..512 + 512 + 512 + 3];
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(unpack(without_trailer, dir.path()).expect("accepted"), 8);
        assert_eq!(std::fs::read(dir.path().join("b")).expect("b"), b"678");
        let cut_inside = &full[..512 + 512 + 512 + 2];
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(unpack(cut_inside, dir.path()).is_err(), "a file cut short is an error");
    }

    #[test]
    fn hostile_entries_are_refused_by_name() {
        use tar::EntryType::*;
        type Case<'a> = (&'a [(&'a str, tar::EntryType, Option<&'a str>, &'a [u8])], &'a str);
        let cases: [Case; 5] = [
            (&[("../escape", Regular, None, b"x")], "`..`"),
            (&[("/etc/evil", Regular, None, b"x")], "absolute path"),
            (&[("link", Symlink, Some("/etc"), b""), ("link/passwd", Regular, None, b"x")], "writes through the symlink `link`"),
            (&[("passwd", Link, Some("/etc/passwd"), b"")], "hard link to the absolute path `/etc/passwd`"),
            (&[("passwd", Link, Some("../../etc/passwd"), b"")], "leaves the layer"),
        ];
        for (entries, expected) in cases {
            let (dir, result) = unpack_into(entries);
            let message = result.expect_err("must be refused").to_string();
            assert!(message.contains(expected), "{message} should say {expected}");
            assert!(!dir.path().join("escape").exists() && !dir.path().join("etc").exists(), "nothing written outside");
        }
    }
}
