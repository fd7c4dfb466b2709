//! An entry's metadata: read from its tar header (leniently where writers differ),
//! and applied to the entry itself (owner, attributes, mode, times), never through a
//! symlink.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, XattrFlags};
use trellis_common::text::{excerpt, excerpt_path};

use super::{
    ExtractError, PRIVILEGED_XATTR_PREFIX, Written, XATTR_PAX_PREFIX, errno_error, refused,
    tar_error,
};

/// The mode, owner and time of an entry, from its header.
pub(super) struct Metadata {
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: i64,
}

pub(super) fn metadata(header: &tar::Header, entry: &Path) -> Result<Metadata, ExtractError> {
    let id = |value: u64, what: &str| -> Result<u32, ExtractError> {
        // -1 means "unchanged" to chown: no entry may ask for it.
        u32::try_from(value)
            .ok()
            .filter(|id| *id != u32::MAX)
            .ok_or_else(|| refused(entry, format!("{what} {value} is out of range")))
    };
    let raw = header.as_bytes();
    Ok(Metadata {
        mode: lenient(header.mode().map(u64::from), &raw[100..108])? as u32 & 0o7777,
        uid: id(lenient(header.uid(), &raw[108..116])?, "uid")?,
        gid: id(lenient(header.gid(), &raw[116..124])?, "gid")?,
        mtime: i64::try_from(lenient(header.mtime(), &raw[136..148])?).unwrap_or(i64::MAX),
    })
}

/// A numeric header field that some writers leave as NULs or spaces reads as 0, as
/// Go's archive/tar (containerd) reads it.
pub(super) fn lenient(parsed: io::Result<u64>, field: &[u8]) -> Result<u64, ExtractError> {
    match parsed {
        Ok(value) => Ok(value),
        Err(_) if field.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        Err(error) => Err(tar_error(error)),
    }
}

pub(super) fn timestamps(mtime: i64) -> Timestamps {
    let time = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

/// `/proc/self/fd/<n>`: a path that reaches exactly the inode an `O_PATH` descriptor
/// holds (the kernel jumps to it; nothing is looked up by name).
pub(super) fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Device numbers of a char or block device entry (ustar and GNU headers keep them
/// at the same offsets). GNU tar leaves the fields of other entries as NULs.
pub(super) fn device_numbers(header: &tar::Header) -> Result<(u32, u32), ExtractError> {
    let raw = header.as_bytes();
    let major = lenient(
        header.device_major().map(|v| u64::from(v.unwrap_or(0))),
        &raw[329..337],
    )?;
    let minor = lenient(
        header.device_minor().map(|v| u64::from(v.unwrap_or(0))),
        &raw[337..345],
    )?;
    Ok((
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    ))
}

/// The entry's extended attributes, without the privileged ones.
pub(super) fn xattrs_of<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    raw: &Path,
) -> Result<Vec<(String, Vec<u8>)>, ExtractError> {
    let mut xattrs = Vec::new();
    let Some(extensions) = entry.pax_extensions().map_err(tar_error)? else {
        return Ok(xattrs);
    };
    for extension in extensions {
        let extension = extension.map_err(tar_error)?;
        let Ok(key) = extension.key() else { continue };
        let Some(name) = key.strip_prefix(XATTR_PAX_PREFIX) else {
            continue;
        };
        if name.starts_with(PRIVILEGED_XATTR_PREFIX) {
            tracing::debug!(entry = %excerpt_path(raw), xattr = %excerpt(name), "dropping a trusted.* attribute from a layer");
            continue;
        }
        xattrs.push((name.to_string(), extension.value_bytes().to_vec()));
    }
    Ok(xattrs)
}

/// Owner, attributes, mode and time, on the entry itself. Owner first: chown clears
/// set-id bits, which the mode then sets. Directory modes and times wait for the end.
pub(super) fn apply(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    made: &Written,
    meta: &Metadata,
    xattrs: &[(String, Vec<u8>)],
    raw: &Path,
) -> Result<(), ExtractError> {
    let fail = errno_error(raw);
    let (uid, gid) = (
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
    );
    match made {
        Written::File(fd) | Written::Dir(fd) => {
            rustix::fs::fchown(fd, uid, gid).map_err(&fail)?;
            for (key, value) in xattrs {
                set_xattr(
                    rustix::fs::fsetxattr(fd, key.as_str(), value, XattrFlags::empty()),
                    key,
                    raw,
                )?;
            }
            if matches!(made, Written::File(_)) {
                rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(&fail)?;
                rustix::fs::futimens(fd, &timestamps(meta.mtime)).map_err(&fail)?;
            }
        }
        Written::Special(fd) => {
            rustix::fs::chownat(
                fd,
                "",
                uid,
                gid,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(&fail)?;
            // chmod and utimes have no descriptor form for O_PATH: the /proc link
            // leads to this very node. Attributes on device nodes are not kept.
            let path = proc_path(fd);
            rustix::fs::chmodat(
                rustix::fs::CWD,
                path.as_str(),
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(&fail)?;
            rustix::fs::utimensat(
                rustix::fs::CWD,
                path.as_str(),
                &timestamps(meta.mtime),
                AtFlags::empty(),
            )
            .map_err(&fail)?;
        }
        Written::Symlink => {
            rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW).map_err(&fail)?;
            rustix::fs::utimensat(
                dir,
                name,
                &timestamps(meta.mtime),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(&fail)?;
        }
    }
    Ok(())
}

/// A file system without extended attributes loses them with a warning; any other
/// failure fails the layer.
pub(super) fn set_xattr(
    result: rustix::io::Result<()>,
    key: &str,
    raw: &Path,
) -> Result<(), ExtractError> {
    match result {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOTSUP) => {
            tracing::warn!(entry = %excerpt_path(raw), xattr = %excerpt(key), "the layer store's file system keeps no such attribute; dropped");
            Ok(())
        }
        Err(errno) => Err(errno_error(raw)(errno)),
    }
}
