//! What every service process exports about itself, read at each scrape: CPU time,
//! memory, open files and start time from `/proc/self` (no exporter dependency), the
//! build it runs, and its event bus (connection, outbox depth, events published and
//! dropped, which only grow, so counters).

use std::fmt::{self, Debug};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::{encode_counter as counter, encode_gauge as gauge};
use crate::bus::EventBus;

/// Registers the process, build and bus metrics of service `service`.
pub fn register(
    registry: &mut Registry,
    service: &'static str,
    version: &'static str,
    bus: EventBus,
) {
    register_process(registry, service, version);
    registry.register_collector(Box::new(BusCollector(bus)));
}

/// Registers the process and build metrics of `service` (a process with no bus).
pub fn register_process(registry: &mut Registry, service: &'static str, version: &'static str) {
    registry.register(
        "build",
        "The service and version this process runs (always 1)",
        Info::new(vec![("service", service), ("version", version)]),
    );
    registry.register_collector(Box::new(ProcessCollector));
}

/// The figures of `/proc/self/stat` the metrics use.
#[derive(Debug, PartialEq)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub virtual_memory_bytes: u64,
    pub resident_memory_bytes: u64,
}

/// Parses `/proc/<pid>/stat` given the clock ticks per second, the page size and the
/// boot time (`btime` of `/proc/stat`). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from its last `)`.
pub fn parse_stat(stat: &str, ticks: f64, page_bytes: u64, boot_time: u64) -> Option<ProcStat> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) on; field n is at index n - 3.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let utime = field(14)?;
    let stime = field(15)?;
    let start_ticks = field(22)?;
    Some(ProcStat {
        cpu_seconds: (utime + stime) as f64 / ticks,
        start_time_seconds: boot_time as f64 + start_ticks as f64 / ticks,
        virtual_memory_bytes: field(23)?,
        resident_memory_bytes: field(24)? * page_bytes,
    })
}

fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn read_stat() -> Option<ProcStat> {
    use nix::unistd::{SysconfVar, sysconf};
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten()? as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()? as u64;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat, ticks, page, boot_time()?)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    /// A figure `/proc` does not give is left out of the scrape rather than failing it.
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if let Some(stat) = read_stat() {
            counter(
                &mut encoder,
                "process_cpu_seconds",
                "User and system CPU time spent",
                stat.cpu_seconds,
            )?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size",
                stat.resident_memory_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size",
                stat.virtual_memory_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch",
                stat.start_time_seconds,
            )?;
        }
        if let Some(fds) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds as f64,
            )?;
        }
        Ok(())
    }
}

struct BusCollector(EventBus);

impl Debug for BusCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BusCollector")
    }
}

impl Collector for BusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let status = self.0.status();
        gauge(
            &mut encoder,
            "bus_connected",
            "1 while connected to NATS",
            f64::from(u8::from(status.connected)),
        )?;
        gauge(
            &mut encoder,
            "events_outbox_pending",
            "Events raised and not yet acknowledged by the bus",
            status.pending as f64,
        )?;
        counter(
            &mut encoder,
            "events_published",
            "Events delivered to the bus since start",
            status.published,
        )?;
        counter(
            &mut encoder,
            "events_dropped",
            "Events dropped because the outbox was full",
            status.dropped,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "4242 (trellis (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 3 0 1000 123456789 300 18446744073709551615 0";
        let parsed = parse_stat(stat, 100.0, 4096, 1_700_000_000).expect("parsed");
        assert_eq!(
            parsed,
            ProcStat {
                cpu_seconds: 2.0,
                start_time_seconds: 1_700_000_010.0,
                virtual_memory_bytes: 123_456_789,
                resident_memory_bytes: 300 * 4096,
            }
        );
        assert_eq!(parse_stat("no name here", 100.0, 4096, 0), None);
    }

    #[test]
    fn this_process_has_figures() {
        let stat = read_stat().expect("/proc/self/stat");
        assert!(stat.resident_memory_bytes > 0);
        assert!(stat.start_time_seconds > 1_600_000_000.0);
        assert!(open_fds().expect("fds") > 0);
    }
}
