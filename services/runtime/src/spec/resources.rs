//! A container's cgroup resources: from the CRI's `LinuxContainerResources` to the OCI
//! spec's `LinuxResources`, for CreateContainer and UpdateContainerResources alike.

use std::path::Path;
use std::sync::OnceLock;

use k8s_cri::v1::LinuxContainerResources;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxDeviceCgroup, LinuxHugepageLimitBuilder, LinuxMemoryBuilder,
    LinuxResources, LinuxResourcesBuilder,
};
use trellis_common::text::excerpt;

use crate::error::RuntimeError;

use super::built;

/// A cpuset list as the kernel takes it: "0-3,7".
fn validate_cpuset(field: &str, value: &str) -> Result<(), RuntimeError> {
    let well_formed = value.split(',').all(|part| {
        let mut bounds = part.splitn(2, '-');
        let numbers: Vec<Option<u32>> = bounds.by_ref().map(|n| n.trim().parse().ok()).collect();
        match numbers.as_slice() {
            [Some(_)] => true,
            [Some(low), Some(high)] => low <= high,
            _ => false,
        }
    });
    if well_formed {
        Ok(())
    } else {
        Err(RuntimeError::InvalidArgument(format!(
            "{field} `{}` is not a CPU or memory node list like \"0-3,7\"",
            excerpt(value)
        )))
    }
}

/// Checks what the kernel would refuse, so the caller gets InvalidArgument and a
/// field name rather than the OCI runtime's error.
pub fn validate(resources: &LinuxContainerResources) -> Result<(), RuntimeError> {
    for (field, value) in [
        ("cpu_period", resources.cpu_period),
        ("cpu_quota", resources.cpu_quota),
        ("cpu_shares", resources.cpu_shares),
        ("memory_limit_in_bytes", resources.memory_limit_in_bytes),
        (
            "memory_swap_limit_in_bytes",
            resources.memory_swap_limit_in_bytes,
        ),
    ] {
        if value < 0 {
            return Err(RuntimeError::InvalidArgument(format!(
                "resources.{field} is {value}; it cannot be negative"
            )));
        }
    }
    if resources.cpu_period > 0 && !(1000..=1_000_000).contains(&resources.cpu_period) {
        return Err(RuntimeError::InvalidArgument(format!(
            "resources.cpu_period is {}; the kernel takes 1000 to 1000000 µs",
            resources.cpu_period
        )));
    }
    if resources.cpu_quota > 0 && resources.cpu_quota < 1000 {
        return Err(RuntimeError::InvalidArgument(format!(
            "resources.cpu_quota is {}; the kernel takes at least 1000 µs",
            resources.cpu_quota
        )));
    }
    if resources.memory_swap_limit_in_bytes > 0
        && resources.memory_limit_in_bytes > 0
        && resources.memory_swap_limit_in_bytes < resources.memory_limit_in_bytes
    {
        return Err(RuntimeError::InvalidArgument(format!(
            "resources.memory_swap_limit_in_bytes ({}) is below memory_limit_in_bytes ({}); it counts memory and swap together",
            resources.memory_swap_limit_in_bytes, resources.memory_limit_in_bytes
        )));
    }
    if !resources.cpuset_cpus.is_empty() {
        validate_cpuset("resources.cpuset_cpus", &resources.cpuset_cpus)?;
    }
    if !resources.cpuset_mems.is_empty() {
        validate_cpuset("resources.cpuset_mems", &resources.cpuset_mems)?;
    }
    for hugepage in &resources.hugepage_limits {
        let size = hugepage.page_size.trim_end_matches('B');
        let digits = size.trim_end_matches(['K', 'M', 'G']);
        if digits.is_empty() || digits.parse::<u64>().is_err() || size.len() == digits.len() {
            return Err(RuntimeError::InvalidArgument(format!(
                "resources.hugepage_limits page size `{}` is not like \"2MB\" or \"1GB\"",
                excerpt(&hugepage.page_size)
            )));
        }
    }
    Ok(())
}

/// Whether the host limits memory and swap together per cgroup (cgroup v1's memsw
/// files, present when the kernel accounts swap): the OCI runtime fails a swap limit
/// it cannot set.
fn swap_accounted() -> bool {
    static ACCOUNTED: OnceLock<bool> = OnceLock::new();
    *ACCOUNTED
        .get_or_init(|| Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists())
}

/// The OCI resources for `resources`, with the given device rules; zero and empty
/// fields are left to the cgroup's defaults.
pub fn linux_resources(
    resources: &LinuxContainerResources,
    devices: Vec<LinuxDeviceCgroup>,
) -> Result<LinuxResources, RuntimeError> {
    validate(resources)?;
    let mut memory = LinuxMemoryBuilder::default();
    if resources.memory_limit_in_bytes > 0 {
        memory = memory.limit(resources.memory_limit_in_bytes);
    }
    if resources.memory_swap_limit_in_bytes > 0 {
        memory = memory.swap(resources.memory_swap_limit_in_bytes);
    } else if resources.memory_limit_in_bytes > 0 && swap_accounted() {
        // Memory and swap together at the memory limit: no swapping past the limit
        // the kubelet set, as containerd and CRI-O do when swap is not asked for.
        memory = memory.swap(resources.memory_limit_in_bytes);
    }
    let mut cpu = LinuxCpuBuilder::default();
    if resources.cpu_shares > 0 {
        cpu = cpu.shares(resources.cpu_shares as u64);
    }
    if resources.cpu_quota > 0 {
        cpu = cpu.quota(resources.cpu_quota);
    }
    if resources.cpu_period > 0 {
        cpu = cpu.period(resources.cpu_period as u64);
    }
    if !resources.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(resources.cpuset_cpus.clone());
    }
    if !resources.cpuset_mems.is_empty() {
        cpu = cpu.mems(resources.cpuset_mems.clone());
    }
    let hugepages = resources
        .hugepage_limits
        .iter()
        .map(|h| {
            built(
                LinuxHugepageLimitBuilder::default()
                    .page_size(h.page_size.clone())
                    .limit(h.limit as i64)
                    .build(),
                "hugepage limits",
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = LinuxResourcesBuilder::default()
        .memory(built(memory.build(), "memory limits")?)
        .cpu(built(cpu.build(), "cpu limits")?)
        .devices(devices);
    if !hugepages.is_empty() {
        builder = builder.hugepage_limits(hugepages);
    }
    if !resources.unified.is_empty() {
        builder = builder.unified(resources.unified.clone());
    }
    built(builder.build(), "resources")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_reach_the_spec() {
        let cri = LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpu_shares: 512,
            memory_limit_in_bytes: 64 << 20,
            cpuset_cpus: "0-1".into(),
            hugepage_limits: vec![k8s_cri::v1::HugepageLimit {
                page_size: "2MB".into(),
                limit: 0,
            }],
            ..Default::default()
        };
        let resources = linux_resources(&cri, Vec::new()).expect("valid");
        let cpu = resources.cpu().clone().expect("cpu");
        assert_eq!(
            (cpu.quota(), cpu.period(), cpu.shares(), cpu.cpus().clone()),
            (
                Some(50_000),
                Some(100_000),
                Some(512),
                Some("0-1".to_string())
            )
        );
        assert_eq!(resources.memory().expect("memory").limit(), Some(64 << 20));
        let swap = swap_accounted().then_some(64 << 20);
        assert_eq!(resources.memory().expect("memory").swap(), swap);
        assert_eq!(
            resources.hugepage_limits().clone().expect("hugepages")[0].page_size(),
            "2MB"
        );
    }

    #[test]
    fn impossible_values_name_their_field() {
        let cases = [
            (
                LinuxContainerResources {
                    memory_limit_in_bytes: -1,
                    ..Default::default()
                },
                "memory_limit_in_bytes",
            ),
            (
                LinuxContainerResources {
                    cpu_period: 10,
                    ..Default::default()
                },
                "cpu_period",
            ),
            (
                LinuxContainerResources {
                    cpu_quota: 5,
                    ..Default::default()
                },
                "cpu_quota",
            ),
            (
                LinuxContainerResources {
                    cpuset_cpus: "0-x".into(),
                    ..Default::default()
                },
                "cpuset_cpus",
            ),
            (
                LinuxContainerResources {
                    cpuset_mems: "3-1".into(),
                    ..Default::default()
                },
                "cpuset_mems",
            ),
            (
                LinuxContainerResources {
                    memory_limit_in_bytes: 100,
                    memory_swap_limit_in_bytes: 50,
                    ..Default::default()
                },
                "memory_swap_limit_in_bytes",
            ),
        ];
        for (resources, field) in cases {
            match linux_resources(&resources, Vec::new()) {
                Err(RuntimeError::InvalidArgument(message)) => {
                    assert!(message.contains(field), "{message}")
                }
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
        }
        let bad_page = LinuxContainerResources {
            hugepage_limits: vec![k8s_cri::v1::HugepageLimit {
                page_size: "huge".into(),
                limit: 1,
            }],
            ..Default::default()
        };
        assert!(matches!(
            linux_resources(&bad_page, Vec::new()),
            Err(RuntimeError::InvalidArgument(_))
        ));
    }
}
