//! Trellis's RuntimeDefault seccomp profile: deny (EPERM) whatever is not listed;
//! allow the system calls ordinary programs make; allow the privileged ones only to a
//! container holding the capability they need; let `clone` create no namespace
//! without CAP_SYS_ADMIN; answer `clone3` with ENOSYS then (so C libraries fall back to
//! `clone`, whose flags can be checked); allow only the common `personality` values.
//! Names libseccomp does not know are ignored by runc, so the list may be ahead of it.
//!
//! Most of this file is the list of system calls: it is data, kept in one file (past the
//! usual size) so the profile can be read and reviewed from top to bottom.

use super::{Arg, Filter, Profile, Rule};

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// personality(2) values a container may set: PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26|PER_LINUX32, and 0xffffffff (which only queries).
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// Allowed to every container.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed to a container holding the capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "finit_module", "init_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["ioperm", "iopl"]),
    (
        "CAP_SYS_TIME",
        &["clock_settime", "clock_settime64", "settimeofday", "stime"],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// Allowed on one architecture family.
const BY_ARCH: &[(&[&str], &[&str])] = &[
    (
        &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        &["arch_prctl", "modify_ldt"],
    ),
    (
        &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        &[
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "breakpoint",
            "cacheflush",
            "set_tls",
            "sync_file_range2",
        ],
    ),
];

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn allow(list: &[&str]) -> Rule {
    Rule {
        names: names(list),
        action: "SCMP_ACT_ALLOW".into(),
        ..Default::default()
    }
}

fn caps(cap: &str) -> Filter {
    Filter {
        caps: vec![cap.into()],
        ..Default::default()
    }
}

pub fn profile() -> Profile {
    let mut syscalls = vec![allow(ALLOWED)];
    // ptrace and process_vm_* read only what the caller may read since Linux 4.8.
    syscalls.push(Rule {
        includes: Filter {
            min_kernel: Some("4.8".into()),
            ..Default::default()
        },
        ..allow(&["process_vm_readv", "process_vm_writev", "ptrace"])
    });
    for value in PERSONALITIES {
        syscalls.push(Rule {
            args: vec![Arg {
                index: 0,
                value,
                value_two: 0,
                op: "SCMP_CMP_EQ".into(),
            }],
            ..allow(&["personality"])
        });
    }
    syscalls.push(Rule {
        args: vec![Arg {
            index: 0,
            value: CLONE_NAMESPACE_FLAGS,
            value_two: 0,
            op: "SCMP_CMP_MASKED_EQ".into(),
        }],
        excludes: caps("CAP_SYS_ADMIN"),
        ..allow(&["clone"])
    });
    syscalls.push(Rule {
        names: names(&["clone3"]),
        action: "SCMP_ACT_ERRNO".into(),
        errno_ret: Some(ENOSYS),
        excludes: caps("CAP_SYS_ADMIN"),
        ..Default::default()
    });
    for (cap, list) in BY_CAPABILITY {
        syscalls.push(Rule {
            includes: caps(cap),
            ..allow(list)
        });
    }
    for (arches, list) in BY_ARCH {
        syscalls.push(Rule {
            includes: Filter {
                arches: names(arches),
                ..Default::default()
            },
            ..allow(list)
        });
    }
    let arch_map = [
        ("SCMP_ARCH_X86_64", &["SCMP_ARCH_X86", "SCMP_ARCH_X32"][..]),
        ("SCMP_ARCH_AARCH64", &["SCMP_ARCH_ARM"][..]),
    ]
    .into_iter()
    .map(|(architecture, subs)| super::ArchMap {
        architecture: architecture.into(),
        sub_architectures: names(subs),
    })
    .collect();
    Profile {
        default_action: "SCMP_ACT_ERRNO".into(),
        default_errno_ret: Some(EPERM),
        arch_map,
        syscalls,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use oci_spec::runtime::{Capability, LinuxSeccompAction, LinuxSeccompOperator};

    use super::super::Target;
    use super::*;

    fn allowed(
        capabilities: &HashSet<Capability>,
        arch: &str,
    ) -> Vec<oci_spec::runtime::LinuxSyscall> {
        profile()
            .to_oci(&Target {
                capabilities,
                arch,
                kernel: (6, 1),
            })
            .expect("default profile converts")
            .syscalls()
            .clone()
            .expect("rules")
    }

    fn unconditionally_allowed(rules: &[oci_spec::runtime::LinuxSyscall], name: &str) -> bool {
        rules.iter().any(|r| {
            r.action() == LinuxSeccompAction::ScmpActAllow
                && r.args().is_none()
                && r.names().iter().any(|n| n == name)
        })
    }

    #[test]
    fn ordinary_calls_are_allowed_and_privileged_ones_follow_capabilities() {
        let plain: HashSet<Capability> = [Capability::Chown, Capability::SysChroot]
            .into_iter()
            .collect();
        let rules = allowed(&plain, "SCMP_ARCH_X86_64");
        for name in [
            "read",
            "execve",
            "openat",
            "futex",
            "chroot",
            "arch_prctl",
            "ptrace",
        ] {
            assert!(unconditionally_allowed(&rules, name), "{name}");
        }
        for name in [
            "mount",
            "unshare",
            "sethostname",
            "reboot",
            "clone3",
            "setns",
            "arm_fadvise64_64",
        ] {
            assert!(!unconditionally_allowed(&rules, name), "{name}");
        }
        let clone = rules
            .iter()
            .find(|r| r.names() == &["clone".to_string()])
            .expect("clone rule");
        let arg = clone.args().clone().expect("filtered")[0];
        assert_eq!(
            (arg.index(), arg.value(), arg.op()),
            (
                0,
                CLONE_NAMESPACE_FLAGS,
                LinuxSeccompOperator::ScmpCmpMaskedEq
            )
        );
        let clone3 = rules
            .iter()
            .find(|r| r.names() == &["clone3".to_string()])
            .expect("clone3 rule");
        assert_eq!(
            (clone3.action(), clone3.errno_ret()),
            (LinuxSeccompAction::ScmpActErrno, Some(ENOSYS))
        );
        assert_eq!(
            rules
                .iter()
                .filter(|r| r.names() == &["personality".to_string()])
                .count(),
            PERSONALITIES.len()
        );

        let admin: HashSet<Capability> = [Capability::SysAdmin].into_iter().collect();
        let rules = allowed(&admin, "SCMP_ARCH_AARCH64");
        for name in [
            "mount",
            "unshare",
            "sethostname",
            "clone",
            "clone3",
            "setns",
            "arm_fadvise64_64",
        ] {
            assert!(unconditionally_allowed(&rules, name), "{name}");
        }
        assert!(
            !unconditionally_allowed(&rules, "arch_prctl")
                && !unconditionally_allowed(&rules, "chroot")
        );
    }

    #[test]
    fn no_syscall_is_listed_twice_in_the_allow_list() {
        let mut seen = HashSet::new();
        for name in ALLOWED {
            assert!(seen.insert(*name), "{name} listed twice");
        }
        for (_, list) in BY_CAPABILITY {
            assert!(
                list.iter().all(|n| !seen.contains(n)),
                "{list:?} gated on a capability yet allowed to all"
            );
        }
    }
}
