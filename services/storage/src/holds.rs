//! Layers that pulls under way hold, so that no prune removes them before the pull
//! records its image.
//!
//! An image service knows its own pulls and spares their layers when it prunes; with
//! several image replicas (`image.replicas`), one replica's prune (of a failed pull's
//! leftovers, or everything unused when it starts) would remove a layer another
//! replica has just imported or found present and is about to record an image with.
//! So storage, which all replicas share, keeps the holds: a pull names itself
//! (`holder`) when it asks for or imports a layer, and a prune keeps what another
//! live holder holds. A hold ends when its pull records its image or prunes its own
//! leftovers, or after [`HOLD_TTL`] without a word (its replica died). Holds live in
//! memory: a storage restart forgets them, and the pulls under way then hold again
//! with their next layer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Far longer than a pull waits for a layer's progress; a holder silent this long
/// is gone.
pub const HOLD_TTL: Duration = Duration::from_secs(30 * 60);
/// More holders than pulls a node runs at once; a flood of names is not believed.
const MAX_HOLDERS: usize = 4096;

#[derive(Debug, Default)]
pub struct Holds {
    /// chain id -> holder -> when its hold ends.
    chains: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl Holds {
    /// `holder` holds `chain` for [`HOLD_TTL`] from now. An empty holder holds nothing.
    pub fn hold(&self, holder: &str, chain: &str) {
        self.hold_at(holder, chain, Instant::now());
    }

    fn hold_at(&self, holder: &str, chain: &str, now: Instant) {
        if holder.is_empty() || chain.is_empty() {
            return;
        }
        let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        if chains.len() >= MAX_HOLDERS {
            chains.retain(|_, holders| {
                holders.retain(|_, until| *until > now);
                !holders.is_empty()
            });
            if chains.len() >= MAX_HOLDERS {
                tracing::warn!(holder, chain, "too many layers held; not holding another");
                return;
            }
        }
        chains
            .entry(chain.to_string())
            .or_default()
            .insert(holder.to_string(), now + HOLD_TTL);
    }

    /// Ends every hold of `holder`.
    pub fn release(&self, holder: &str) {
        if holder.is_empty() {
            return;
        }
        let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        chains.retain(|_, holders| {
            holders.remove(holder);
            !holders.is_empty()
        });
    }

    /// Ends every hold of a holder whose name starts with `prefix` (none when empty).
    pub fn release_prefix(&self, prefix: &str) {
        if prefix.is_empty() {
            return;
        }
        let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        chains.retain(|_, holders| {
            holders.retain(|holder, _| !holder.starts_with(prefix));
            !holders.is_empty()
        });
    }

    /// Whether a live holder other than `asking` holds `chain`.
    pub fn held_by_another(&self, chain: &str, asking: &str) -> bool {
        self.held_by_another_at(chain, asking, Instant::now())
    }

    fn held_by_another_at(&self, chain: &str, asking: &str, now: Instant) -> bool {
        let chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        chains.get(chain).is_some_and(|holders| {
            holders
                .iter()
                .any(|(holder, until)| holder != asking && *until > now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_another_pull_holds_is_kept_until_it_records_or_goes_silent() {
        let holds = Holds::default();
        let now = Instant::now();
        holds.hold_at("replica-2/pull-7", "chain-a", now);
        assert!(holds.held_by_another_at("chain-a", "replica-1/pull-3", now));
        assert!(
            !holds.held_by_another_at("chain-a", "replica-2/pull-7", now),
            "a pull's own hold does not stop its own prune"
        );
        assert!(!holds.held_by_another_at("chain-b", "", now));
        assert!(
            !holds.held_by_another_at("chain-a", "", now + HOLD_TTL + Duration::from_secs(1)),
            "a silent holder's hold ends"
        );
        holds.hold_at("image-2:41/pull-1", "chain-c", now);
        holds.hold_at("image:40/pull-1", "chain-c", now);
        holds.release_prefix("image:");
        assert!(
            holds.held_by_another_at("chain-c", "", now),
            "image-2's hold stays"
        );
        holds.release_prefix("image-2:");
        assert!(!holds.held_by_another_at("chain-c", "", now));
        holds.release("replica-2/pull-7");
        assert!(!holds.held_by_another_at("chain-a", "", now));
        holds.hold_at("", "chain-a", now);
        assert!(
            !holds.held_by_another_at("chain-a", "x", now),
            "no name, no hold"
        );
    }
}
