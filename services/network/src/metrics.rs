//! The network service's Prometheus figures: how long pods take to get and lose
//! their network, and which plugins fail.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// "add" or "del".
    pub operation: String,
    /// The plugin that failed ("netns" for the namespace itself, "" otherwise).
    pub plugin: String,
}

#[derive(Clone)]
pub struct NetworkMetrics {
    add_latency: Histogram,
    del_latency: Histogram,
    failures: Family<FailureLabels, Counter>,
}

/// Buckets from a fast loopback-only pod to a slow IPAM.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl NetworkMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let add_latency = Histogram::new(BUCKETS);
        let del_latency = Histogram::new(BUCKETS);
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "network_pod_add_duration_seconds",
            "Time to set up a pod network (namespace, loopback, CNI ADD chain)",
            add_latency.clone(),
        );
        registry.register(
            "network_pod_del_duration_seconds",
            "Time to tear down a pod network (CNI DEL chain, namespace)",
            del_latency.clone(),
        );
        registry.register(
            "network_cni_failures",
            "Failed pod network set-ups and tear-downs, by operation and plugin",
            failures.clone(),
        );
        Self {
            add_latency,
            del_latency,
            failures,
        }
    }

    pub fn observe_add(&self, elapsed: Duration) {
        self.add_latency.observe(elapsed.as_secs_f64());
    }

    pub fn observe_del(&self, elapsed: Duration) {
        self.del_latency.observe(elapsed.as_secs_f64());
    }

    pub fn failed(&self, operation: &str, plugin: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                operation: operation.to_string(),
                plugin: plugin.to_string(),
            })
            .inc();
    }
}
