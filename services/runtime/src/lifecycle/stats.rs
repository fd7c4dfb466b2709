//! ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats: CPU and
//! memory from each container's cgroup (v1 or v2), the writable layer from the
//! storage service, pod figures as the sums of their containers'.

use std::collections::HashMap;
use std::path::Path;

use k8s_cri::v1::*;

use super::Runtime;
use crate::error::RuntimeError;
use crate::store::{ContainerRecord, ContainerState, SandboxRecord, now_nanos};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One reading of a container's cgroup.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CgroupReading {
    pub cpu_ns: u64,
    pub memory_usage: u64,
    pub working_set: u64,
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line of a cgroup stat file.
fn stat_field(path: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            line.strip_prefix(key)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
}

/// Reads a cgroup under `root`: the v1 controllers when mounted there (hybrid hosts
/// keep them), the unified v2 files otherwise. None when the cgroup is gone.
pub fn read_cgroup(root: &Path, cgroup: &str) -> Option<CgroupReading> {
    let relative = cgroup.trim_start_matches('/');
    let memory_v1 = root.join("memory").join(relative);
    if root.join("memory").is_dir() {
        let cpu = ["cpuacct", "cpu,cpuacct"]
            .iter()
            .find_map(|c| read_number(&root.join(c).join(relative).join("cpuacct.usage")))?;
        let usage = read_number(&memory_v1.join("memory.usage_in_bytes"))?;
        let inactive =
            stat_field(&memory_v1.join("memory.stat"), "total_inactive_file").unwrap_or(0);
        return Some(CgroupReading {
            cpu_ns: cpu,
            memory_usage: usage,
            working_set: usage.saturating_sub(inactive),
        });
    }
    let dir = root.join(relative);
    let cpu = stat_field(&dir.join("cpu.stat"), "usage_usec")? * 1000;
    let usage = read_number(&dir.join("memory.current"))?;
    let inactive = stat_field(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
    Some(CgroupReading {
        cpu_ns: cpu,
        memory_usage: usage,
        working_set: usage.saturating_sub(inactive),
    })
}

fn value(value: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value })
}

impl Runtime {
    fn cpu_rate(&self, id: &str, cpu_ns: u64, at: i64) -> u64 {
        let mut samples = self
            .cpu_samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rate = samples.get(id).and_then(|(before, then)| {
            let elapsed = (at - then) as f64;
            (elapsed > 0.0 && cpu_ns >= *before)
                .then(|| ((cpu_ns - before) as f64 / elapsed * 1e9) as u64)
        });
        samples.insert(id.to_string(), (cpu_ns, at));
        rate.unwrap_or(0)
    }

    async fn writable_layers(
        &self,
        ids: Vec<String>,
    ) -> Result<HashMap<String, FilesystemUsage>, RuntimeError> {
        let response = self.backends.storage.writable_layer_usage(ids).await?;
        Ok(response
            .usages
            .into_iter()
            .map(|u| {
                let usage = FilesystemUsage {
                    timestamp: response.timestamp_unix_nano,
                    fs_id: Some(FilesystemIdentifier {
                        mountpoint: u.mountpoint,
                    }),
                    used_bytes: value(u.used_bytes),
                    inodes_used: value(u.inodes_used),
                };
                (u.container_id, usage)
            })
            .collect())
    }

    fn container_stats_of(
        &self,
        record: &ContainerRecord,
        layers: &HashMap<String, FilesystemUsage>,
    ) -> Result<ContainerStats, RuntimeError> {
        let config = record.config().clone();
        let at = now_nanos();
        let reading = read_cgroup(Path::new(CGROUP_ROOT), &record.cgroup_path).unwrap_or_default();
        Ok(ContainerStats {
            attributes: Some(ContainerAttributes {
                id: record.id.clone(),
                metadata: config.metadata,
                labels: config.labels,
                annotations: config.annotations,
            }),
            cpu: Some(CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: value(reading.cpu_ns),
                usage_nano_cores: value(self.cpu_rate(&record.id, reading.cpu_ns, at)),
            }),
            memory: Some(MemoryUsage {
                timestamp: at,
                working_set_bytes: value(reading.working_set),
                usage_bytes: value(reading.memory_usage),
                ..Default::default()
            }),
            writable_layer: layers.get(&record.id).cloned(),
            ..Default::default()
        })
    }

    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        let record = self.container(id)?;
        let layers = self.writable_layers(vec![record.id.clone()]).await?;
        self.container_stats_of(&record, &layers)
    }

    pub async fn list_container_stats(
        &self,
        filter: Option<ContainerStatsFilter>,
    ) -> Result<Vec<ContainerStats>, RuntimeError> {
        Ok(self
            .container_stats_with_pods(filter)
            .await?
            .into_iter()
            .map(|(_, stats)| stats)
            .collect())
    }

    /// The stats of the containers `filter` picks, each with its pod's id.
    async fn container_stats_with_pods(
        &self,
        filter: Option<ContainerStatsFilter>,
    ) -> Result<Vec<(String, ContainerStats)>, RuntimeError> {
        let filter = filter.unwrap_or_default();
        let chosen: Vec<_> = self
            .visible_containers(self.store.containers.with_prefix(&filter.id))?
            .into_iter()
            .filter(|record| {
                // One whose creation failed has no process, cgroup or layer to measure.
                record.state() != ContainerState::RollingBack
                    && record.sandbox_id.starts_with(&filter.pod_sandbox_id)
                    && filter
                        .label_selector
                        .iter()
                        .all(|(k, v)| record.config().labels.get(k) == Some(v))
            })
            .collect();
        let layers = self
            .writable_layers(chosen.iter().map(|r| r.id.clone()).collect())
            .await?;
        chosen
            .iter()
            .map(|record| {
                Ok((
                    record.sandbox_id.clone(),
                    self.container_stats_of(record, &layers)?,
                ))
            })
            .collect()
    }

    /// A pod's figures from its containers' stats (taken by the caller, so that a list
    /// of pods reads every container once).
    fn pod_stats_of(
        sandbox: &SandboxRecord,
        containers: Vec<ContainerStats>,
    ) -> Result<PodSandboxStats, RuntimeError> {
        let config = sandbox.config().clone();
        let at = now_nanos();
        let sum = |pick: &dyn Fn(&ContainerStats) -> u64| containers.iter().map(pick).sum::<u64>();
        let cpu = CpuUsage {
            timestamp: at,
            usage_core_nano_seconds: value(sum(&|c| {
                c.cpu
                    .as_ref()
                    .and_then(|u| u.usage_core_nano_seconds.as_ref())
                    .map_or(0, |v| v.value)
            })),
            usage_nano_cores: value(sum(&|c| {
                c.cpu
                    .as_ref()
                    .and_then(|u| u.usage_nano_cores.as_ref())
                    .map_or(0, |v| v.value)
            })),
        };
        let memory = MemoryUsage {
            timestamp: at,
            working_set_bytes: value(sum(&|c| {
                c.memory
                    .as_ref()
                    .and_then(|m| m.working_set_bytes.as_ref())
                    .map_or(0, |v| v.value)
            })),
            usage_bytes: value(sum(&|c| {
                c.memory
                    .as_ref()
                    .and_then(|m| m.usage_bytes.as_ref())
                    .map_or(0, |v| v.value)
            })),
            ..Default::default()
        };
        Ok(PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: sandbox.id.clone(),
                metadata: config.metadata,
                labels: config.labels,
                annotations: config.annotations,
            }),
            linux: Some(LinuxPodSandboxStats {
                cpu: Some(cpu),
                memory: Some(memory),
                containers,
                ..Default::default()
            }),
            windows: None,
        })
    }

    pub async fn pod_sandbox_stats(&self, id: &str) -> Result<PodSandboxStats, RuntimeError> {
        let sandbox = self.sandbox(id)?;
        let containers = self
            .list_container_stats(Some(ContainerStatsFilter {
                pod_sandbox_id: sandbox.id.clone(),
                ..Default::default()
            }))
            .await?;
        Self::pod_stats_of(&sandbox, containers)
    }

    pub async fn list_pod_sandbox_stats(
        &self,
        filter: Option<PodSandboxStatsFilter>,
    ) -> Result<Vec<PodSandboxStats>, RuntimeError> {
        let filter = filter.unwrap_or_default();
        let chosen: Vec<_> = self
            .store
            .sandboxes
            .with_prefix(&filter.id)
            .into_iter()
            .filter(|sandbox| {
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| sandbox.config().labels.get(k) == Some(v))
            })
            .collect();
        let mut by_pod: HashMap<String, Vec<ContainerStats>> = HashMap::new();
        if !chosen.is_empty() {
            for (sandbox_id, stats) in self.container_stats_with_pods(None).await? {
                by_pod.entry(sandbox_id).or_default().push(stats);
            }
        }
        chosen
            .iter()
            .map(|sandbox| {
                Self::pod_stats_of(sandbox, by_pod.remove(&sandbox.id).unwrap_or_default())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: std::path::PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn reads_v1_and_v2_layouts() {
        let v1 = tempfile::tempdir().expect("tempdir");
        write(
            v1.path().join("cpu,cpuacct/trellis/c1/cpuacct.usage"),
            "5000\n",
        );
        write(
            v1.path().join("memory/trellis/c1/memory.usage_in_bytes"),
            "1000\n",
        );
        write(
            v1.path().join("memory/trellis/c1/memory.stat"),
            "cache 9\ntotal_inactive_file 200\n",
        );
        assert_eq!(
            read_cgroup(v1.path(), "/trellis/c1"),
            Some(CgroupReading {
                cpu_ns: 5000,
                memory_usage: 1000,
                working_set: 800
            })
        );

        let v2 = tempfile::tempdir().expect("tempdir");
        write(
            v2.path().join("trellis/c1/cpu.stat"),
            "usage_usec 7\nuser_usec 5\n",
        );
        write(v2.path().join("trellis/c1/memory.current"), "4096\n");
        write(
            v2.path().join("trellis/c1/memory.stat"),
            "anon 1\ninactive_file 96\n",
        );
        assert_eq!(
            read_cgroup(v2.path(), "/trellis/c1"),
            Some(CgroupReading {
                cpu_ns: 7000,
                memory_usage: 4096,
                working_set: 4000
            })
        );
        assert_eq!(read_cgroup(v2.path(), "/trellis/gone"), None);
    }
}
