//! The image service's Prometheus figures: pulls by outcome and reason, how long they
//! take, the bytes they download and the layers they find already stored. A pull
//! shared by several callers counts once. Every outcome and reason exists at 0 from
//! the start, so the first failure of a kind is seen by `rate()`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;
use trellis_common::metrics::grpc::{CODES, code_name};
use trellis_common::metrics::precreate;

/// How a pull ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullOutcome {
    Ok,
    /// Failed with this code (its name is the reason).
    Failed(Code),
    /// Every caller went away and the pull was stopped.
    Abandoned,
}

impl PullOutcome {
    fn labels(self) -> PullLabels {
        let (outcome, reason) = match self {
            Self::Ok => ("ok", ""),
            Self::Failed(code) => ("failed", code_name(code)),
            Self::Abandoned => ("abandoned", ""),
        };
        PullLabels { outcome, reason }
    }

    /// Every outcome a pull can have: all the codes but OK for a failure.
    fn all() -> impl Iterator<Item = Self> {
        [Self::Ok, Self::Abandoned].into_iter().chain(
            CODES
                .into_iter()
                .filter(|code| *code != Code::Ok)
                .map(Self::Failed),
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PullLabels {
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone)]
pub struct PullMetrics {
    pulls: Family<PullLabels, Counter>,
    duration: Family<OutcomeLabels, Histogram>,
    pub bytes: Counter,
    pub layers_reused: Counter,
    pub layer_import: Histogram,
}

impl PullMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let pulls = Family::<PullLabels, Counter>::default();
        let duration = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ])
        });
        let bytes = Counter::default();
        let layers_reused = Counter::default();
        let layer_import =
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
        registry.register(
            "image_pulls",
            "Image pulls (a pull shared by several callers counts once), by outcome (ok, failed, abandoned) and reason (the gRPC code of a failure)",
            pulls.clone(),
        );
        registry.register(
            "image_pull_duration_seconds",
            "Time to pull an image, by outcome",
            duration.clone(),
        );
        registry.register(
            "image_pull_bytes",
            "Compressed bytes downloaded from registries",
            bytes.clone(),
        );
        registry.register(
            "image_layers_reused",
            "Layers a pull found already stored, so did not download",
            layers_reused.clone(),
        );
        registry.register(
            "image_layer_import_duration_seconds",
            "Time to download, verify and unpack one layer",
            layer_import.clone(),
        );
        precreate(&pulls, PullOutcome::all().map(PullOutcome::labels));
        precreate(
            &duration,
            ["ok", "failed", "abandoned"].map(|outcome| OutcomeLabels { outcome }),
        );
        Self {
            pulls,
            duration,
            bytes,
            layers_reused,
            layer_import,
        }
    }

    pub fn pulled(&self, outcome: PullOutcome, seconds: f64) {
        let labels = outcome.labels();
        self.pulls.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&OutcomeLabels {
                outcome: labels.outcome,
            })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every outcome and failure reason is in the first scrape, at 0.
    #[test]
    fn every_outcome_exists_at_zero() {
        let mut registry = Registry::with_prefix("trellis");
        let metrics = PullMetrics::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for series in [
            "trellis_image_pulls_total{outcome=\"ok\",reason=\"\"} 0",
            "trellis_image_pulls_total{outcome=\"abandoned\",reason=\"\"} 0",
            "trellis_image_pulls_total{outcome=\"failed\",reason=\"NotFound\"} 0",
            "trellis_image_pulls_total{outcome=\"failed\",reason=\"Unauthenticated\"} 0",
            "trellis_image_pull_duration_seconds_count{outcome=\"failed\"} 0",
            "trellis_image_pull_bytes_total 0",
            "trellis_image_layers_reused_total 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        metrics.pulled(PullOutcome::Failed(Code::NotFound), 0.5);
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("trellis_image_pulls_total{outcome=\"failed\",reason=\"NotFound\"} 1")
        );
    }
}
