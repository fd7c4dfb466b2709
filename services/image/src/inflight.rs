//! Pulls under way, and what they leave behind when they end without an image.
//!
//! One pull runs per image and credentials; every request asking for it meanwhile
//! waits on the same one. The pull lives exactly as long as someone waits for it:
//! when its last waiter goes (the client hung up, its deadline passed), its entry
//! goes and with it the sender that keeps it running, so the download and the layer
//! streams to storage stop. An entry never outlives its pull, whatever the way it
//! ended, so a later request always starts afresh.
//!
//! Layers are imported before the image that uses them is recorded; a pull that
//! ends without an image leaves layers no image uses. Each pull says which chains it
//! needs and which it started importing, so what one pull left can be pruned without
//! taking a layer that another pull under way counts on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedRwLockWriteGuard, RwLock, oneshot, watch};
use tonic::Code;
use trellis_proto::storage::v1::Image;

/// How a pull ended, as every waiter receives it.
pub type Outcome = Result<Image, (Code, String)>;

/// What a pull is started with.
pub struct Start {
    pub id: u64,
    /// Resolves (with an error) once nobody waits for the pull any more.
    pub abandoned: oneshot::Receiver<()>,
    pub outcome: watch::Sender<Option<Outcome>>,
}

struct Entry {
    id: u64,
    waiters: usize,
    /// Dropped with the entry, which tells the pull it is abandoned.
    _keep_running: oneshot::Sender<()>,
    outcome: watch::Receiver<Option<Outcome>>,
}

#[derive(Default)]
struct Chains {
    /// By pull: the chains its image needs, once it has read the image config.
    needed: HashMap<u64, HashSet<String>>,
    /// By pull: the chains it started importing.
    started: HashMap<u64, HashSet<String>>,
}

#[derive(Default)]
pub struct InFlight {
    next_id: AtomicU64,
    pulls: Mutex<HashMap<String, Entry>>,
    chains: Mutex<Chains>,
    /// Written while a prune decides and runs, read while a pull declares what it
    /// needs: a pull that has declared a chain and then finds it present can count on
    /// it, and one that declares later finds it gone and imports it again.
    prune_gate: Arc<RwLock<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl InFlight {
    /// Waits for the pull of `key` under way, or registers a new one and has `start`
    /// run it.
    pub fn join(self: &Arc<Self>, key: &str, start: impl FnOnce(Start)) -> Waiter {
        let mut pulls = lock(&self.pulls);
        if let Some(entry) = pulls.get_mut(key) {
            entry.waiters += 1;
            return Waiter {
                inflight: self.clone(),
                key: key.to_string(),
                id: entry.id,
                outcome: entry.outcome.clone(),
            };
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (keep_running, abandoned) = oneshot::channel();
        let (sender, outcome) = watch::channel(None);
        pulls.insert(
            key.to_string(),
            Entry {
                id,
                waiters: 1,
                _keep_running: keep_running,
                outcome: outcome.clone(),
            },
        );
        start(Start {
            id,
            abandoned,
            outcome: sender,
        });
        Waiter {
            inflight: self.clone(),
            key: key.to_string(),
            id,
            outcome,
        }
    }

    /// The pull `id` ended: later requests for `key` start a new one.
    pub fn finished(&self, key: &str, id: u64) {
        let mut pulls = lock(&self.pulls);
        if pulls.get(key).is_some_and(|entry| entry.id == id) {
            pulls.remove(key);
        }
    }

    /// Pull `id` needs these chains: no prune takes them while it runs.
    pub async fn need(&self, id: u64, chains: &[String]) {
        let _not_pruning = self.prune_gate.read().await;
        lock(&self.chains)
            .needed
            .entry(id)
            .or_default()
            .extend(chains.iter().cloned());
    }

    /// Pull `id` is about to import `chain`.
    pub fn importing(&self, id: u64, chain: &str) {
        lock(&self.chains)
            .started
            .entry(id)
            .or_default()
            .insert(chain.to_string());
    }

    /// Holds every pull back from declaring what it needs until the guard is dropped.
    pub async fn pruning(&self) -> OwnedRwLockWriteGuard<()> {
        self.prune_gate.clone().write_owned().await
    }

    /// The same, for the prune at start, which must hold the gate before any pull runs.
    pub fn pruning_now(&self) -> Option<OwnedRwLockWriteGuard<()>> {
        self.prune_gate.clone().try_write_owned().ok()
    }

    /// What pull `id` leaves: the chains it needed or started importing that neither
    /// `kept` (its image's) nor any other pull under way needs. A chain it needed is
    /// its to prune too: the pull that imported it may have ended first and spared it
    /// for this one.
    fn leftovers(chains: &Chains, id: u64, kept: &[String]) -> Vec<String> {
        let others: HashSet<&String> = chains
            .needed
            .iter()
            .filter(|(pull, _)| **pull != id)
            .flat_map(|(_, needed)| needed)
            .collect();
        let own = chains
            .needed
            .get(&id)
            .into_iter()
            .chain(chains.started.get(&id))
            .flatten();
        let mut leftovers: Vec<String> = own
            .filter(|chain| !kept.contains(chain) && !others.contains(chain))
            .cloned()
            .collect();
        leftovers.sort();
        leftovers.dedup();
        leftovers
    }

    /// Forgets pull `id` when it leaves nothing; whether it did.
    pub fn forget_if_clean(&self, id: u64, kept: &[String]) -> bool {
        self.forget_when(id, kept, |leftovers| leftovers.is_empty())
            .is_empty()
    }

    /// Forgets pull `id` and returns what it leaves, at once: of two pulls sharing a
    /// chain and ending together, the one deciding second sees the first gone. Call
    /// with [`Self::pruning`] held until the chains are pruned.
    pub fn settle(&self, id: u64, kept: &[String]) -> Vec<String> {
        self.forget_when(id, kept, |_| true)
    }

    /// What pull `id` leaves; the pull is forgotten when `forget` says so of that.
    fn forget_when(
        &self,
        id: u64,
        kept: &[String],
        forget: impl FnOnce(&[String]) -> bool,
    ) -> Vec<String> {
        let mut chains = lock(&self.chains);
        let leftovers = Self::leftovers(&chains, id, kept);
        if forget(&leftovers) {
            chains.needed.remove(&id);
            chains.started.remove(&id);
        }
        leftovers
    }

    #[cfg(test)]
    fn registered(&self, key: &str) -> Option<(u64, usize)> {
        lock(&self.pulls)
            .get(key)
            .map(|entry| (entry.id, entry.waiters))
    }
}

/// One request waiting for a pull. Dropping the last one abandons the pull.
pub struct Waiter {
    inflight: Arc<InFlight>,
    key: String,
    id: u64,
    outcome: watch::Receiver<Option<Outcome>>,
}

impl Waiter {
    /// How the pull ended; `None` when it stopped without saying (it cannot, short
    /// of a bug: the pull always answers the waiters it has).
    pub async fn outcome(&mut self) -> Option<Outcome> {
        self.outcome
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|outcome| outcome.clone())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut pulls = lock(&self.inflight.pulls);
        let Some(entry) = pulls.get_mut(&self.key).filter(|entry| entry.id == self.id) else {
            return;
        };
        entry.waiters -= 1;
        if entry.waiters == 0 {
            pulls.remove(&self.key);
            tracing::info!(pull = %self.key.split('|').next().unwrap_or_default(), "nobody waits for the pull any more: abandoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chains(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn the_last_waiter_gone_abandons_the_pull_and_unregisters_it() {
        let inflight = Arc::new(InFlight::default());
        let mut started = Vec::new();
        let first = inflight.join("img", |start| started.push(start));
        let second = inflight.join("img", |_| panic!("joins the pull under way"));
        assert_eq!(inflight.registered("img"), Some((first.id, 2)));
        let mut start = started.pop().expect("started once");
        drop(first);
        assert!(
            start
                .abandoned
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty),
            "one waiter left: still running"
        );
        drop(second);
        assert_eq!(inflight.registered("img"), None);
        assert!(start.abandoned.await.is_err(), "told it is abandoned");
        let mut again = Vec::new();
        let _third = inflight.join("img", |start| again.push(start.id));
        assert_eq!(again, vec![start.id + 1], "a new request starts afresh");
    }

    #[tokio::test]
    async fn a_finished_pull_answers_its_waiters_and_is_unregistered() {
        let inflight = Arc::new(InFlight::default());
        let mut started = Vec::new();
        let mut waiter = inflight.join("img", |start| started.push(start));
        let start = started.pop().expect("started");
        inflight.finished("img", start.id);
        assert_eq!(inflight.registered("img"), None);
        start
            .outcome
            .send_replace(Some(Err((Code::Unavailable, "down".into()))));
        assert_eq!(
            waiter
                .outcome()
                .await
                .map(|o| o.map_err(|(code, _)| code).err()),
            Some(Some(Code::Unavailable))
        );
        // Dropping a waiter of a pull already replaced touches nothing.
        let _newer = inflight.join("img", |_| {});
        let newer = inflight.registered("img");
        drop(waiter);
        assert_eq!(inflight.registered("img"), newer);
    }

    #[tokio::test]
    async fn leftovers_spare_what_the_image_and_other_pulls_need() {
        let inflight = InFlight::default();
        inflight.need(1, &chains(&["a", "b", "c"])).await;
        inflight.need(2, &chains(&["a", "d"])).await;
        for chain in ["a", "b", "c"] {
            inflight.importing(1, chain);
        }
        inflight.importing(1, "from-a-failed-source");
        assert!(
            !inflight.forget_if_clean(1, &chains(&["a", "b", "c"])),
            "the chain of a failed source is left"
        );
        assert!(
            inflight.forget_if_clean(1, &chains(&["a", "b", "c", "from-a-failed-source"])),
            "nothing left"
        );
        assert_eq!(inflight.settle(1, &[]), Vec::<String>::new(), "forgotten");

        inflight.need(1, &chains(&["a", "b", "c"])).await;
        inflight.importing(1, "a");
        assert_eq!(
            inflight.settle(1, &chains(&["c"])),
            chains(&["b"]),
            "pull 2 still needs a; c is kept"
        );
        // Pull 1 spared `a` for pull 2, which now ends without its image: `a` is its to prune.
        assert_eq!(inflight.settle(2, &[]), chains(&["a", "d"]));
    }

    #[tokio::test]
    async fn a_pull_declares_its_needs_only_between_prunes() {
        let inflight = Arc::new(InFlight::default());
        let gate = inflight.pruning_now().expect("free at start");
        let declaring = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.need(7, &chains(&["x"])).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!declaring.is_finished(), "waits for the prune");
        inflight.importing(1, "x");
        assert_eq!(
            inflight.settle(1, &[]),
            chains(&["x"]),
            "decided before pull 7 declared"
        );
        drop(gate);
        declaring.await.expect("declared");
        inflight.importing(3, "x");
        assert!(inflight.settle(3, &[]).is_empty(), "pull 7 needs x now");
    }
}
