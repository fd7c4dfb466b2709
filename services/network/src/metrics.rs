//! The network service's Prometheus figures: how long pods take to get and lose
//! their network, how long each CNI plugin takes, which plugins fail, and the pod
//! addresses in use. Failure series exist at 0 for every plugin of the configured
//! network from the start (and for any other plugin from its first run), so the first
//! failure is seen by `rate()`.

use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use trellis_common::metrics::{encode_gauge, precreate};

use crate::pods::Pods;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// "add" or "del".
    pub operation: String,
    /// The plugin that failed ("netns" for the namespace itself, "" for the rest:
    /// records, configuration).
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    /// ADD, DEL or CHECK.
    command: &'static str,
    /// The plugin's type, from the operator's network configuration.
    plugin: String,
}

#[derive(Clone, Debug)]
pub struct NetworkMetrics {
    add_latency: Histogram,
    del_latency: Histogram,
    plugin_latency: Family<PluginLabels, Histogram>,
    failures: Family<FailureLabels, Counter>,
}

/// Buckets from a fast loopback-only pod to a slow IPAM.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const OPERATIONS: [&str; 2] = ["add", "del"];

impl Default for NetworkMetrics {
    /// Figures kept but exported nowhere (for tests).
    fn default() -> Self {
        Self {
            add_latency: Histogram::new(BUCKETS),
            del_latency: Histogram::new(BUCKETS),
            plugin_latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            failures: Family::default(),
        }
    }
}

impl NetworkMetrics {
    /// Registers the figures, with failure series for the plugins `plugins` (those of
    /// the network configured at start).
    pub fn register(registry: &mut Registry, plugins: &[String]) -> Self {
        let metrics = Self::default();
        registry.register(
            "network_pod_add_duration_seconds",
            "Time to set up a pod network (namespace, loopback, CNI ADD chain)",
            metrics.add_latency.clone(),
        );
        registry.register(
            "network_pod_del_duration_seconds",
            "Time to tear down a pod network (CNI DEL chain, namespace)",
            metrics.del_latency.clone(),
        );
        registry.register(
            "network_cni_plugin_duration_seconds",
            "Time one CNI plugin took, by command and plugin",
            metrics.plugin_latency.clone(),
        );
        registry.register(
            "network_cni_failures",
            "Failed pod network set-ups and tear-downs, by operation and plugin",
            metrics.failures.clone(),
        );
        let blamed = ["", "netns"].map(String::from);
        for plugin in plugins.iter().chain(&blamed) {
            metrics.plugin_seen(plugin);
        }
        metrics
    }

    /// Makes the failure series of a plugin exist.
    fn plugin_seen(&self, plugin: &str) {
        precreate(
            &self.failures,
            OPERATIONS.map(|operation| FailureLabels {
                operation: operation.to_string(),
                plugin: plugin.to_string(),
            }),
        );
    }

    pub fn observe_add(&self, elapsed: Duration) {
        self.add_latency.observe(elapsed.as_secs_f64());
    }

    pub fn observe_del(&self, elapsed: Duration) {
        self.del_latency.observe(elapsed.as_secs_f64());
    }

    pub fn observe_plugin(&self, command: &'static str, plugin: &str, elapsed: Duration) {
        let labels = PluginLabels {
            command,
            plugin: plugin.to_string(),
        };
        if self.plugin_latency.get(&labels).is_none() {
            self.plugin_seen(plugin);
        }
        self.plugin_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
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

/// The pod addresses in use, counted from the records at each scrape.
pub fn register_addresses(registry: &mut Registry, pods: Arc<Pods>) {
    registry.register_collector(Box::new(AddressCollector(pods)));
}

struct AddressCollector(Arc<Pods>);

impl Debug for AddressCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AddressCollector")
    }
}

impl Collector for AddressCollector {
    /// Records that cannot be read leave the figure out (health says why).
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Ok(count) = self.0.addresses_in_use() else {
            return Ok(());
        };
        encode_gauge(
            &mut encoder,
            "network_pod_ips",
            "Pod IP addresses in use (of pods whose network is set up)",
            count as f64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every configured plugin (and the namespace, and "no plugin") has its failure
    /// series at 0 before anything ran; a plugin first seen later gets them then.
    #[test]
    fn failure_series_exist_before_any_failure() {
        let mut registry = Registry::with_prefix("trellis");
        let metrics = NetworkMetrics::register(&mut registry, &["bridge".into(), "portmap".into()]);
        metrics.observe_plugin("ADD", "firewall", Duration::from_millis(3));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for plugin in ["bridge", "portmap", "netns", "", "firewall"] {
            for operation in OPERATIONS {
                let series = format!(
                    "trellis_network_cni_failures_total{{operation=\"{operation}\",plugin=\"{plugin}\"}} 0"
                );
                assert!(text.contains(&series), "{series} missing from\n{text}");
            }
        }
    }
}
