//! The runtime service's Prometheus figures: pods and containers by state (counted
//! from the in-memory index at each scrape), container exits by reason and OOM kills,
//! how long the OCI runtime's steps take (`create` is conmon's spawn through `runc
//! create` until the container's pid is known), how long a stop takes, and the
//! streaming sessions open. Every label value is from a fixed set, created at start.

use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use trellis_common::metrics::precreate;

/// Reasons a container's exit is recorded with (the CRI's words).
pub const EXIT_REASONS: [&str; 3] = ["Completed", "Error", "OOMKilled"];
/// The OCI runtime's steps that are timed.
pub const OCI_OPERATIONS: [&str; 6] = ["create", "start", "update", "kill", "delete", "exec_sync"];
/// The kinds of streaming session.
pub const SESSION_KINDS: [&str; 3] = ["exec", "attach", "portforward"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Counts the pods and containers in each state; the lifecycle answers.
pub trait StateCounts: Send + Sync + 'static {
    /// Every pod state with its count (states with none included).
    fn pods_by_state(&self) -> Vec<(&'static str, u64)>;
    /// Every container state with its count (pause containers left out).
    fn containers_by_state(&self) -> Vec<(&'static str, u64)>;
}

#[derive(Clone)]
pub struct RuntimeMetrics {
    exits: Family<ReasonLabels, Counter>,
    oom_kills: Counter,
    oci: Family<OperationLabels, Histogram>,
    stop: Histogram,
    sessions: Family<KindLabels, Gauge>,
}

const OCI_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const STOP_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Default for RuntimeMetrics {
    /// Figures kept but exported nowhere until [`RuntimeMetrics::register`].
    fn default() -> Self {
        Self {
            exits: Family::default(),
            oom_kills: Counter::default(),
            oci: Family::new_with_constructor(|| Histogram::new(OCI_BUCKETS)),
            stop: Histogram::new(STOP_BUCKETS),
            sessions: Family::default(),
        }
    }
}

impl RuntimeMetrics {
    /// Exports the figures, and the pods and containers by state from `states`.
    pub fn register(&self, registry: &mut Registry, states: Arc<dyn StateCounts>) {
        registry.register(
            "runtime_container_exits",
            "Container exits recorded, by reason",
            self.exits.clone(),
        );
        registry.register(
            "runtime_oom_kills",
            "Containers killed for lack of memory",
            self.oom_kills.clone(),
        );
        registry.register(
            "runtime_oci_duration_seconds",
            "Time of each OCI runtime step, by operation (create: conmon spawned through runc create)",
            self.oci.clone(),
        );
        registry.register(
            "runtime_container_stop_duration_seconds",
            "Time from the stop signal to the container's exit",
            self.stop.clone(),
        );
        registry.register(
            "runtime_streaming_sessions",
            "Streaming sessions open, by kind",
            self.sessions.clone(),
        );
        precreate(
            &self.exits,
            EXIT_REASONS.map(|reason| ReasonLabels { reason }),
        );
        precreate(
            &self.oci,
            OCI_OPERATIONS.map(|operation| OperationLabels { operation }),
        );
        precreate(
            &self.sessions,
            SESSION_KINDS.map(|kind| KindLabels { kind }),
        );
        registry.register_collector(Box::new(StateCollector(states)));
    }

    /// A container's exit, recorded once, with its reason (one of [`EXIT_REASONS`]).
    pub fn exited(&self, reason: &'static str) {
        self.exits.get_or_create(&ReasonLabels { reason }).inc();
        if reason == "OOMKilled" {
            self.oom_kills.inc();
        }
    }

    pub fn oci_step(&self, operation: &'static str, elapsed: Duration) {
        self.oci
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    pub fn stopped(&self, elapsed: Duration) {
        self.stop.observe(elapsed.as_secs_f64());
    }

    /// A session of `kind` is open until the guard drops.
    pub fn session(&self, kind: &'static str) -> SessionOpen {
        let gauge = self.sessions.get_or_create_owned(&KindLabels { kind });
        gauge.inc();
        SessionOpen(gauge)
    }
}

pub struct SessionOpen(Gauge);

impl Drop for SessionOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct StateCollector(Arc<dyn StateCounts>);

impl Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

fn by_state(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counts: Vec<(&'static str, u64)>,
) -> fmt::Result {
    let family = Family::<StateLabels, Gauge>::default();
    for (state, count) in counts {
        family
            .get_or_create(&StateLabels { state })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    family.encode(encoder.encode_descriptor(name, help, None, family.metric_type())?)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        by_state(
            &mut encoder,
            "runtime_pods",
            "Pod sandboxes, by state",
            self.0.pods_by_state(),
        )?;
        by_state(
            &mut encoder,
            "runtime_containers",
            "Containers (not counting pause containers), by state",
            self.0.containers_by_state(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl StateCounts for Nothing {
        fn pods_by_state(&self) -> Vec<(&'static str, u64)> {
            vec![("ready", 0), ("notready", 0)]
        }
        fn containers_by_state(&self) -> Vec<(&'static str, u64)> {
            vec![("running", 0)]
        }
    }

    /// Every exit reason, OCI step and session kind is in the first scrape at 0; an
    /// OOM kill counts as an exit and as an OOM kill.
    #[test]
    fn series_exist_before_anything_happened() {
        let mut registry = Registry::with_prefix("trellis");
        let metrics = RuntimeMetrics::default();
        metrics.register(&mut registry, Arc::new(Nothing));
        let encode = |registry: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
            text
        };
        let text = encode(&registry);
        for reason in EXIT_REASONS {
            let series = format!("trellis_runtime_container_exits_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
        for operation in OCI_OPERATIONS {
            let series = format!(
                "trellis_runtime_oci_duration_seconds_count{{operation=\"{operation}\"}} 0"
            );
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
        for kind in SESSION_KINDS {
            let series = format!("trellis_runtime_streaming_sessions{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
        assert!(text.contains("trellis_runtime_oom_kills_total 0"));
        assert!(text.contains("trellis_runtime_pods{state=\"notready\"} 0"));
        metrics.exited("OOMKilled");
        let session = metrics.session("exec");
        let text = encode(&registry);
        assert!(text.contains("trellis_runtime_oom_kills_total 1"));
        assert!(text.contains("trellis_runtime_streaming_sessions{kind=\"exec\"} 1"));
        drop(session);
        assert!(encode(&registry).contains("trellis_runtime_streaming_sessions{kind=\"exec\"} 0"));
    }
}
