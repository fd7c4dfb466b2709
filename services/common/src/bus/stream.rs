//! The events stream: made as configured when missing, left alone when it exists.
//!
//! On a shared NATS (a fleet's cluster) the stream may have been made by another node
//! with other settings, or by an operator on purpose (more replicas, a longer age).
//! Changing it from here would let the last node to start decide for every node, so
//! an existing stream is never updated; what differs from this node's configuration is
//! logged, once per process, so that an operator sees why, say, `bus.stream_replicas =
//! 3` did not give three copies.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::EVENTS_SUBJECT_FILTER;
use crate::config::BusConfig;

/// Long enough to cover an outbox's retries across a NATS server's restart or a
/// cluster's leader election: a copy sent again within it is dropped by its id.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The stream this node's configuration asks for.
pub(super) fn wanted(config: &BusConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        subjects: vec![EVENTS_SUBJECT_FILTER.to_string()],
        max_age: Duration::from_secs(config.stream_max_age_seconds),
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        num_replicas: config.stream_replicas,
        ..Default::default()
    }
}

/// Finds the stream or makes it. `warned` is the caller's: whether the differences of
/// an existing stream were already logged.
pub(super) async fn ensure(
    jetstream: &jetstream::Context,
    config: &BusConfig,
    warned: &mut bool,
) -> Result<(), String> {
    let wanted = wanted(config);
    let stream = jetstream
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| format!("cannot create or find stream {}: {e}", config.stream))?;
    let differences = differences(&wanted, &stream.cached_info().config);
    if !differences.is_empty() && !*warned {
        *warned = true;
        tracing::warn!(
            stream = %config.stream,
            differences = %differences.join("; "),
            "the events stream exists with other settings than this node's; it is used as it is (change it with `nats stream edit`, or align the [bus] settings)"
        );
    }
    Ok(())
}

/// What `existing` has otherwise than `wanted`, as `setting: existing (configured
/// wanted)`, for the settings this node chooses.
pub(super) fn differences(wanted: &stream::Config, existing: &stream::Config) -> Vec<String> {
    let mut found = Vec::new();
    let mut compare = |name: &str, existing: String, wanted: String| {
        if existing != wanted {
            found.push(format!("{name}: {existing} (configured {wanted})"));
        }
    };
    compare(
        "subjects",
        existing.subjects.join(","),
        wanted.subjects.join(","),
    );
    compare(
        "replicas",
        existing.num_replicas.to_string(),
        wanted.num_replicas.to_string(),
    );
    compare(
        "max_age",
        format!("{:?}", existing.max_age),
        format!("{:?}", wanted.max_age),
    );
    compare(
        "duplicate_window",
        format!("{:?}", existing.duplicate_window),
        format!("{:?}", wanted.duplicate_window),
    );
    compare(
        "storage",
        format!("{:?}", existing.storage),
        format!("{:?}", wanted.storage),
    );
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_settings_that_differ_are_named() {
        let config = BusConfig {
            stream_replicas: 3,
            ..Default::default()
        };
        let wanted = wanted(&config);
        assert_eq!(wanted.num_replicas, 3);
        assert!(differences(&wanted, &wanted.clone()).is_empty());
        let existing = stream::Config {
            num_replicas: 1,
            max_age: Duration::from_secs(3600),
            ..wanted.clone()
        };
        assert_eq!(
            differences(&wanted, &existing),
            vec![
                "replicas: 1 (configured 3)".to_string(),
                "max_age: 3600s (configured 86400s)".to_string()
            ]
        );
    }
}
