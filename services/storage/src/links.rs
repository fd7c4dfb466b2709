//! Short names for layer directories, so that an image of many layers fits in one
//! overlay mount.
//!
//! The kernel takes a mount's options in one page (4096 bytes). Spelled as absolute
//! paths (`/var/lib/trellis/storage/layers/<64 hex>`), lower directories fill it after
//! about 37 layers. Each layer directory gets a symlink `l/<name>` → `../<hex>`, the
//! name being the first 16 hex digits of its diff id (more on the rare clash), and the
//! overlay is mounted from inside the layer store with `lowerdir=l/<name>:…`: 19
//! bytes a layer, so 128 layers take 2.4 KB (overlayfs itself stops at 500). This is
//! what containers/storage does with its `l/` directory.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

/// The directory of short links inside the layer store.
pub const LINK_DIR: &str = "l";
/// Name lengths tried in turn; a whole diff id never clashes.
const LENGTHS: [usize; 4] = [16, 24, 32, 64];

fn target_of(hex: &str) -> PathBuf {
    Path::new("..").join(hex)
}

fn candidates(hex: &str) -> impl Iterator<Item = &str> {
    LENGTHS
        .into_iter()
        .filter(move |len| *len <= hex.len())
        .map(move |len| &hex[..len])
}

/// The short link of a layer directory (`l/<name>`, relative to the store), made
/// when missing.
pub fn ensure(root: &Path, hex: &str) -> io::Result<String> {
    let dir = root.join(LINK_DIR);
    std::fs::create_dir_all(&dir)?;
    for name in candidates(hex) {
        let link = dir.join(name);
        match std::fs::read_link(&link) {
            Ok(target) if target == target_of(hex) => return Ok(format!("{LINK_DIR}/{name}")),
            // Another layer's: try a longer name.
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::os::unix::fs::symlink(target_of(hex), &link) {
                    Ok(()) => return Ok(format!("{LINK_DIR}/{name}")),
                    // Made meanwhile, perhaps for this very layer: look again.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return ensure(root, hex),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "no short link name is free for layer {hex}"
    )))
}

/// Removes links to layer directories that are not in `keep` (their hex names).
pub fn sweep(root: &Path, keep: &HashSet<String>) -> io::Result<()> {
    let dir = root.join(LINK_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let target = std::fs::read_link(&path).ok();
        let kept = target
            .as_deref()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str())
            .is_some_and(|hex| keep.contains(hex));
        if !kept {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_short_and_stable_and_clashes_get_longer_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = format!("{}{}", "ab".repeat(8), "1".repeat(48));
        let clash = format!("{}{}", "ab".repeat(8), "2".repeat(48));
        assert_eq!(
            ensure(dir.path(), &first).expect("link"),
            format!("l/{}", &first[..16])
        );
        assert_eq!(
            ensure(dir.path(), &first).expect("again"),
            format!("l/{}", &first[..16])
        );
        assert_eq!(
            ensure(dir.path(), &clash).expect("clash"),
            format!("l/{}", &clash[..24])
        );
        sweep(dir.path(), &HashSet::from([clash.clone()])).expect("sweep");
        assert!(std::fs::symlink_metadata(dir.path().join("l").join(&first[..16])).is_err());
        assert_eq!(
            std::fs::read_link(dir.path().join("l").join(&clash[..24])).expect("kept"),
            target_of(&clash)
        );
    }
}
