//! A container's capabilities: the default set, the CRI's add and drop lists, and
//! "all" as this host knows it (a privileged container, `add: [ALL]`).

use std::collections::HashSet;
use std::sync::OnceLock;

use k8s_cri::v1::LinuxContainerSecurityContext;
use oci_spec::runtime::Capability;
use trellis_common::text::excerpt;

use crate::error::RuntimeError;

/// Capabilities a container gets unless its security context says otherwise (the
/// same set CRI-O and containerd give).
const DEFAULT_CAPABILITIES: [Capability; 11] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::Kill,
    Capability::SysChroot,
    Capability::Mknod,
];

/// Every capability the OCI spec names, indexed by the kernel's number for it
/// (`linux/capability.h`).
const BY_NUMBER: [Capability; 41] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

/// The capabilities this host can give a container: those the kernel knows
/// (`cap_last_cap`) that are in this process's own bounding set, since the OCI
/// runtime cannot grant more than it holds (root here may lack CAP_SYS_RESOURCE).
pub fn host() -> &'static HashSet<Capability> {
    static HOST: OnceLock<HashSet<Capability>> = OnceLock::new();
    HOST.get_or_init(|| {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|text| text.trim().parse().ok());
        let bounding = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("CapBnd:"))
                    .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            });
        available(last, bounding)
    })
}

/// The capabilities numbered up to `last` whose bit is set in `bounding`; what is
/// unknown is not a limit.
pub fn available(last: Option<u32>, bounding: Option<u64>) -> HashSet<Capability> {
    let last = last.map_or(BY_NUMBER.len() - 1, |l| l as usize);
    BY_NUMBER
        .iter()
        .enumerate()
        .filter(|(number, _)| {
            *number <= last && bounding.is_none_or(|mask| mask & (1 << number) != 0)
        })
        .map(|(_, cap)| *cap)
        .collect()
}

/// A capability by name, with or without `CAP_`, any case.
pub fn parse(name: &str) -> Result<Capability, RuntimeError> {
    let upper = name.trim().to_ascii_uppercase();
    upper.trim_start_matches("CAP_").parse().map_err(|_| {
        RuntimeError::InvalidArgument(format!("unknown capability `{}`", excerpt(name)))
    })
}

/// The set a container runs with: everything `host` has when privileged, else the
/// defaults with the request's additions (`ALL` for all of `host`) and drops (`ALL`
/// for every one). Adding a capability the host cannot give is refused here, with its
/// name, rather than by the OCI runtime.
pub fn resolve(
    security: Option<&LinuxContainerSecurityContext>,
    privileged: bool,
    host: &HashSet<Capability>,
) -> Result<HashSet<Capability>, RuntimeError> {
    if privileged {
        return Ok(host.clone());
    }
    let mut set: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    let Some(requested) = security.and_then(|s| s.capabilities.as_ref()) else {
        return Ok(set);
    };
    let is_all = |name: &String| name.trim().eq_ignore_ascii_case("ALL");
    if requested.add_capabilities.iter().any(is_all) {
        set.clone_from(host);
    }
    for name in requested
        .add_capabilities
        .iter()
        .filter(|name| !is_all(name))
    {
        let capability = parse(name)?;
        if !host.contains(&capability) {
            return Err(RuntimeError::FailedPrecondition(format!(
                "capability {} cannot be given: the runtime does not hold it on this host",
                excerpt(name)
            )));
        }
        set.insert(capability);
    }
    if requested.drop_capabilities.iter().any(is_all) {
        set.clear();
    }
    for name in requested
        .drop_capabilities
        .iter()
        .filter(|name| !is_all(name))
    {
        set.remove(&parse(name)?);
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::Capability as Requested;

    fn asking(add: &[&str], drop: &[&str]) -> LinuxContainerSecurityContext {
        let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        LinuxContainerSecurityContext {
            capabilities: Some(Requested {
                add_capabilities: strings(add),
                drop_capabilities: strings(drop),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn all_means_what_the_kernel_knows_and_the_runtime_holds() {
        let everything = available(Some(40), None);
        assert_eq!(everything.len(), 41);
        // Root without CAP_SYS_RESOURCE (bit 24), on a kernel that stops at CAP_BPF (39).
        let limited = available(Some(39), Some(0x1ff_feff_ffff));
        assert_eq!(limited.len(), 39);
        assert!(
            !limited.contains(&Capability::SysResource)
                && !limited.contains(&Capability::CheckpointRestore)
        );
        assert!(limited.contains(&Capability::SysAdmin) && limited.contains(&Capability::Bpf));
        assert_eq!(available(None, None).len(), BY_NUMBER.len());
    }

    #[test]
    fn privileged_and_add_all_get_the_host_set() {
        let host = available(Some(40), Some(0x1ff_feff_ffff));
        assert_eq!(resolve(None, true, &host).expect("privileged"), host);
        assert_eq!(
            resolve(Some(&asking(&["ALL"], &[])), false, &host).expect("add all"),
            host
        );
        let dropped =
            resolve(Some(&asking(&["all"], &["NET_RAW"])), false, &host).expect("all but one");
        assert_eq!(dropped.len(), host.len() - 1);
        assert!(!dropped.contains(&Capability::NetRaw));
    }

    #[test]
    fn defaults_add_and_drop() {
        let host = available(Some(40), Some(0x1ff_feff_ffff));
        let plain = resolve(None, false, &host).expect("defaults");
        assert_eq!(plain.len(), DEFAULT_CAPABILITIES.len());
        assert!(!plain.contains(&Capability::SysAdmin));
        let changed = resolve(
            Some(&asking(&["CAP_SYS_ADMIN", "net_admin"], &["KILL"])),
            false,
            &host,
        )
        .expect("add and drop");
        assert!(
            changed.contains(&Capability::SysAdmin)
                && changed.contains(&Capability::NetAdmin)
                && !changed.contains(&Capability::Kill)
        );
        assert!(
            resolve(Some(&asking(&[], &["ALL"])), false, &host)
                .expect("drop all")
                .is_empty()
        );
        let unknown =
            resolve(Some(&asking(&["CAP_TELEPORT"], &[])), false, &host).expect_err("unknown");
        assert!(
            matches!(unknown, RuntimeError::InvalidArgument(ref m) if m.contains("CAP_TELEPORT"))
        );
        let missing =
            resolve(Some(&asking(&["SYS_RESOURCE"], &[])), false, &host).expect_err("not held");
        assert!(
            matches!(missing, RuntimeError::FailedPrecondition(ref m) if m.contains("SYS_RESOURCE"))
        );
    }
}
