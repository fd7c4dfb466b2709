//! Resident memory of processes, as the benchmarks compare it: `VmRSS` from
//! `/proc/<pid>/status` (pages of the process in memory, shared libraries included).

use std::path::Path;

/// The resident set of `pid` in KiB; none when the process is gone.
pub fn vm_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The anonymous (heap, stacks) and file-backed (the executable and libraries mapped)
/// parts of the resident set of `pid`, in KiB.
pub fn rss_parts_kib(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("RssAnon:")?, field("RssFile:")?))
}

/// The number of threads of `pid`.
pub fn threads(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|rest| rest.trim().parse().ok())
}

/// Live processes whose command name (`/proc/<pid>/comm`, 15 characters at most)
/// starts with `name` and whose command line mentions `needle` (a root or socket of
/// one node), so that another node's processes are not counted.
pub fn processes_named(name: &str, needle: &Path) -> Vec<i32> {
    let needle = needle.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end().starts_with(name))
                && crate::cmdline(pid).contains(&needle)
        })
        .collect()
}

/// The summed resident sets of `pids`, in KiB (processes gone count nothing).
pub fn total_rss_kib(pids: &[i32]) -> u64 {
    pids.iter().filter_map(|&pid| vm_rss_kib(pid)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id() as i32;
        assert!(vm_rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(threads(me).is_some_and(|n| n >= 1));
        assert_eq!(vm_rss_kib(i32::MAX), None);
    }
}
