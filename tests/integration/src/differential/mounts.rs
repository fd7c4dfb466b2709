//! What a container sees of its file systems and limits: its mounts and their
//! options (`/proc/self/mountinfo`), the paths masked or made read-only, and the
//! cgroup limits set in its config as read inside (cgroup v1 here).

use k8s_cri::v1::*;

use super::{Observed, Side, pod_or_note, replace_all};

/// Paths runtimes mask by default (containerd's and runc's lists).
const MASKED: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths runtimes make read-only by default, and two a container must not write.
const READ_ONLY: [&str; 8] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/sys",
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/memory",
];

/// The cgroup files the limits below land in, read inside the container.
const LIMIT_FILES: [&str; 7] = [
    "memory/memory.limit_in_bytes",
    "memory/memory.memsw.limit_in_bytes",
    "cpu/cpu.shares",
    "cpu/cpu.cfs_quota_us",
    "cpu/cpu.cfs_period_us",
    "cpuset/cpuset.cpus",
    "pids/pids.max",
];

/// The kubelet's lists for the default `procMount` (pkg/securitycontext), which it
/// sends in every CreateContainer of a container that is not privileged.
const KUBELET_MASKED: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const KUBELET_READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

pub async fn mounts_and_limits(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "mounts", false, true, observed).await else {
        return;
    };
    // As the kubelet sends it, and with no masked or read-only paths in the request.
    for (variant, from_kubelet) in [("kubelet-paths", true), ("no-paths", false)] {
        let key = |what: &str| format!("mounts/{variant}/{what}");
        let mut config = side.container(variant, &["sleep", "3600"]);
        let to_strings = |paths: &[&str]| paths.iter().map(|p| p.to_string()).collect();
        config.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_shares: 512,
                cpu_quota: 50_000,
                cpu_period: 100_000,
                cpuset_cpus: "0".into(),
                ..Default::default()
            }),
            security_context: from_kubelet.then(|| LinuxContainerSecurityContext {
                masked_paths: to_strings(&KUBELET_MASKED),
                readonly_paths: to_strings(&KUBELET_READ_ONLY),
                ..Default::default()
            }),
        });
        let Some(id) = side
            .create_and_start(&pod, config, &format!("mounts/{variant}"), observed)
            .await
        else {
            continue;
        };
        let mut replacements = pod.replacements.clone();
        replacements.push((id.clone(), "<container-id>"));
        let mountinfo = side.exec(&id, "cat /proc/self/mountinfo").await;
        let (uuid, mounts) =
            without_uuid(normalised_mounts(&replace_all(mountinfo, &replacements)));
        observed.insert(key("overlay-uuid"), uuid);
        observed.insert(key("mountinfo"), mounts.join("\n"));
        observed.insert(key("read-only"), read_only(&mounts));
        let masked = format!(
            "for p in {}; do if [ ! -e $p ]; then echo $p absent; \
             elif [ -d $p ]; then echo $p dir $(ls -A $p | wc -l) entries; \
             else echo $p file $(head -c 64 $p 2>/dev/null | wc -c) bytes; fi; done",
            MASKED.join(" ")
        );
        observed.insert(key("masked"), side.exec(&id, &masked).await);
        if !from_kubelet {
            continue;
        }
        let limits = format!(
            "cd /sys/fs/cgroup; for f in {}; do echo $f $(cat $f 2>&1); done",
            LIMIT_FILES.join(" ")
        );
        observed.insert("mounts/cgroup-limits".into(), side.exec(&id, &limits).await);
        let cgroups = side.exec(&id, "cat /proc/self/cgroup").await;
        observed.insert(
            "mounts/proc-self-cgroup".into(),
            replace_all(cgroups, &replacements),
        );
    }
}

/// A privileged container in a privileged pod: its mounts and what is read-only.
pub async fn privileged(side: &Side, observed: &mut Observed) {
    let mut config = crate::cri::host_network_pod("mounts-privileged", true);
    config.hostname.clear();
    let pod = match side.run_pod_of(config).await {
        Ok(pod) => pod,
        Err(status) => {
            observed.insert(
                "mounts/privileged/RunPodSandbox".into(),
                format!("{:?}", status.code()),
            );
            return;
        }
    };
    let mut config = side.container("privileged", &["sleep", "3600"]);
    config.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let key = "mounts/privileged";
    let Some(id) = side.create_and_start(&pod, config, key, observed).await else {
        return;
    };
    let mut replacements = pod.replacements.clone();
    replacements.push((id.clone(), "<container-id>"));
    let mountinfo = side.exec(&id, "cat /proc/self/mountinfo").await;
    let (uuid, mounts) = without_uuid(normalised_mounts(&replace_all(mountinfo, &replacements)));
    observed.insert(format!("{key}/overlay-uuid"), uuid);
    observed.insert(format!("{key}/mountinfo"), mounts.join("\n"));
    observed.insert(format!("{key}/read-only"), read_only(&mounts));
}

/// The overlay's `uuid=` on its own, and the mounts without it: the kernel picks it
/// by how the upper directory was first mounted, nothing a process sees.
fn without_uuid(mounts: Vec<String>) -> (String, Vec<String>) {
    let (uuid, mounts): (Vec<String>, Vec<String>) = mounts
        .into_iter()
        .map(|line| match line.split_once(",uuid=") {
            Some((before, uuid)) => (format!("uuid={uuid}"), before.to_string()),
            None => (String::new(), line),
        })
        .unzip();
    let uuid: Vec<String> = uuid.into_iter().filter(|u| !u.is_empty()).collect();
    (format!("{uuid:?}"), mounts)
}

/// `ro` or `rw` for each of the paths runtimes make read-only.
fn read_only(mounts: &[String]) -> String {
    READ_ONLY
        .iter()
        .map(|path| format!("{path} {}", access_of(mounts, path)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each mount as `point type options super-options`, sorted: the fields that must
/// differ between runs (mount ids, devices, sources, the layer directories an
/// overlay names) left out.
fn normalised_mounts(mountinfo: &str) -> Vec<String> {
    let mut mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            let (mine, theirs) = line.split_once(" - ")?;
            let mine: Vec<&str> = mine.split(' ').collect();
            let theirs: Vec<&str> = theirs.split(' ').collect();
            let super_options: Vec<&str> = theirs
                .get(2)?
                .split(',')
                .filter(|option| {
                    !["lowerdir=", "upperdir=", "workdir="]
                        .iter()
                        .any(|path| option.starts_with(path))
                })
                .collect();
            Some(format!(
                "{} {} {} {}",
                mine.get(4)?,
                theirs.first()?,
                mine.get(5)?,
                super_options.join(",")
            ))
        })
        .collect();
    mounts.sort();
    mounts
}

/// `ro` or `rw`: the access of the innermost mount holding `path`.
fn access_of(mounts: &[String], path: &str) -> String {
    mounts
        .iter()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let point = fields.next()?;
            let options = fields.nth(1)?;
            let holds = point == "/"
                || path == point
                || path
                    .strip_prefix(point)
                    .is_some_and(|rest| rest.starts_with('/'));
            holds.then(|| (point.len(), options.split(',').next().unwrap_or("?")))
        })
        .max_by_key(|(length, _)| *length)
        .map_or("not mounted".into(), |(_, access)| access.to_string())
}
