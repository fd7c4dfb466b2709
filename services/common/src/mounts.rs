//! What is mounted where, from /proc/self/mountinfo.

use std::path::Path;

/// Whether `path` is a mount point.
pub fn is_mounted(path: &Path) -> std::io::Result<bool> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // mountinfo escapes spaces in paths as \040.
    let wanted = path.display().to_string().replace(' ', "\\040");
    Ok(mountinfo
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(wanted.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_mounted_and_a_plain_directory_is_not() {
        assert!(is_mounted(Path::new("/")).expect("mountinfo"));
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_mounted(dir.path()).expect("mountinfo"));
    }
}
