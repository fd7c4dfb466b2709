//! The image records, held in memory so that ListImages and ImageStatus are answered
//! here rather than by a call to the storage service, which owns the records.
//!
//! The index is a copy, and it is used only while it is known to be current:
//! - it is built from a listing of storage's records, at the first call that needs it
//!   and after anything made it doubtful;
//! - this service's own changes (a pull recorded, a removal) are applied as their
//!   answers arrive, before the call that made them answers, so a caller sees what it
//!   just did;
//! - every change of the records, whoever made it (another image service, a tool),
//!   makes the next storage generation, and storage tells this service each one over
//!   `WatchImages`; a generation the index has not seen makes it doubtful, so the next
//!   call lists the records again. A change made by another writer is seen once its
//!   generation arrives (storage sends it as the change is made);
//! - while that watch is down (storage restarting, not yet up), the index is not used at
//!   all, and a reconnection starts over from a listing: a restarted storage counts from
//!   its own start time, and its records may have been changed while it was down.
//!
//! When the index cannot be used, the call is answered from storage as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use trellis_common::reference::{self, ImageRef};
use trellis_proto::storage::v1::Image;

/// A change this service made, as storage answered it.
#[derive(Debug)]
pub enum Change {
    /// An image recorded: the record as stored (its names taken from other images).
    Put(Image),
    /// A reference removed: the image's record after it, or the image gone with it.
    Removed { image: Image, deleted: bool },
}

/// Where the index stands against storage; read before a call that changes the
/// records, and given back with the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

#[derive(Default)]
pub struct ImageIndex {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    images: HashMap<String, Arc<Image>>,
    /// Tag and digest references (normalised as storage keys them) → image id.
    references: HashMap<String, String>,
    /// A listing was installed since the watch last (re)connected.
    built: bool,
    /// The storage generation the content reflects.
    generation: u64,
    /// The newest generation the watch reported.
    known: u64,
    /// Whether the watch is connected.
    watching: bool,
    /// Bumped at each (re)connection of the watch: a change or a listing that started
    /// before it says nothing certain about the storage after it.
    epoch: u64,
    /// Bumped whenever something applied may not match a storage generation (a change
    /// that did not follow the last one); `clean` is the value the content is known to
    /// reflect.
    doubts: u64,
    clean: u64,
}

impl State {
    fn current(&self) -> bool {
        self.built && self.watching && self.known <= self.generation && self.clean == self.doubts
    }

    fn put(&mut self, image: Image) {
        let names: Vec<&String> = image.repo_tags.iter().chain(&image.repo_digests).collect();
        // Storage moves each name to the image recorded under it.
        for name in &names {
            if let Some(holder) = self.references.get(name.as_str())
                && *holder != image.id
                && let Some(previous) = self.images.get_mut(holder)
            {
                let previous = Arc::make_mut(previous);
                previous.repo_tags.retain(|t| t != *name);
                previous.repo_digests.retain(|d| d != *name);
            }
        }
        for name in names {
            self.references.insert(name.clone(), image.id.clone());
        }
        self.images.insert(image.id.clone(), Arc::new(image));
    }

    fn remove(&mut self, image: Image, deleted: bool) {
        let id = image.id.clone();
        if deleted {
            self.images.remove(&id);
            self.references.retain(|_, holder| *holder != id);
            return;
        }
        let kept: Vec<&String> = image.repo_tags.iter().chain(&image.repo_digests).collect();
        self.references
            .retain(|name, holder| *holder != id || kept.contains(&name));
        self.images.insert(id, Arc::new(image));
    }
}

/// Strips what a listing does not carry: the config as pulled, for verbose status only.
fn slim(mut image: Image) -> Image {
    image.config_json = String::new();
    image
}

impl ImageIndex {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every image, when the index is current.
    pub fn list(&self) -> Option<Vec<Image>> {
        let state = self.lock();
        if !state.current() {
            return None;
        }
        let mut images: Vec<Image> = state.images.values().map(|i| Image::clone(i)).collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Some(images)
    }

    /// The image `name` (an id, a tag or a digest reference) names, when the index is
    /// current; `Some(None)` when it names none.
    pub fn resolve(&self, name: &str) -> Option<Option<Image>> {
        let state = self.lock();
        if !state.current() {
            return None;
        }
        let id = match reference::parse(name).ok()? {
            ImageRef::Id(id) => id,
            ImageRef::Named(named) => {
                let key = match (&named.digest, named.tagged()) {
                    (Some(digest), _) => named.with_digest(digest),
                    (None, Some(tagged)) => tagged,
                    (None, None) => return Some(None),
                };
                match state.references.get(&key) {
                    Some(id) => id.clone(),
                    None => {
                        let ids = state.images.keys().map(String::as_str);
                        let found = reference::short_id_prefix(name)
                            .map(|prefix| reference::unique_by_prefix(&prefix, ids));
                        match found {
                            Some(Ok(Some(id))) => id.to_string(),
                            // Storage refuses an ambiguous prefix, saying why.
                            Some(Err(_)) => return None,
                            Some(Ok(None)) | None => return Some(None),
                        }
                    }
                }
            }
        };
        Some(state.images.get(&id).map(|image| Image::clone(image)))
    }

    /// To be read before a listing or a change is asked of storage.
    pub fn epoch(&self) -> Epoch {
        let state = self.lock();
        Epoch(state.epoch)
    }

    /// Starts a listing: what to hand back to `install` with its result (the doubts
    /// it can clear are those raised before it started).
    pub fn listing(&self) -> Listing {
        let state = self.lock();
        Listing {
            epoch: Epoch(state.epoch),
            doubts: state.doubts,
        }
    }

    /// Installs a listing of storage's records at `generation`, unless the index has
    /// moved past it since the listing started.
    pub fn install(&self, listing: Listing, images: Vec<Image>, generation: u64) {
        let mut state = self.lock();
        if listing.epoch.0 != state.epoch || (state.built && generation < state.generation) {
            return;
        }
        state.images.clear();
        state.references.clear();
        for image in images {
            state.put(slim(image));
        }
        state.generation = generation;
        state.built = true;
        state.clean = listing.doubts;
    }

    /// Applies a change this service made; `generation` is the one storage gave it,
    /// `epoch` what `epoch()` said before the change was asked for.
    pub fn applied(&self, epoch: Epoch, generation: u64, change: Change) {
        let mut state = self.lock();
        if epoch.0 == state.epoch && state.built && generation <= state.generation {
            // A listing taken after the change already holds it.
            return;
        }
        let follows = epoch.0 == state.epoch
            && state.built
            && state.clean == state.doubts
            && generation == state.generation + 1;
        match change {
            Change::Put(image) => state.put(slim(image)),
            Change::Removed { image, deleted } => state.remove(slim(image), deleted),
        }
        if follows {
            state.generation = generation;
        } else {
            state.doubts += 1;
        }
    }

    /// The watch of storage's generations (re)connected, at `generation`.
    pub fn watching(&self, generation: u64) {
        let mut state = self.lock();
        state.epoch += 1;
        state.watching = true;
        state.built = false;
        state.known = generation;
    }

    /// The watch reported a generation.
    pub fn observed(&self, generation: u64) {
        let mut state = self.lock();
        state.known = state.known.max(generation);
    }

    /// The watch broke: storage may change without this service hearing of it.
    pub fn lost(&self) {
        let mut state = self.lock();
        state.watching = false;
    }
}

/// A listing under way (see `ImageIndex::listing`).
#[derive(Debug, Clone, Copy)]
pub struct Listing {
    epoch: Epoch,
    doubts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id_char: char, tags: &[&str]) -> Image {
        Image {
            id: format!("sha256:{}", id_char.to_string().repeat(64)),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: vec![format!(
                "docker.io/library/x@sha256:{}",
                id_char.to_string().repeat(64)
            )],
            config_json: "{\"big\": true}".into(),
            ..Default::default()
        }
    }

    /// An index watching storage at generation 10, built from `images`.
    fn built(images: Vec<Image>) -> ImageIndex {
        let index = ImageIndex::default();
        index.watching(10);
        let listing = index.listing();
        index.install(listing, images, 10);
        index
    }

    fn ids(index: &ImageIndex) -> Vec<String> {
        index
            .list()
            .expect("current")
            .into_iter()
            .map(|i| i.id)
            .collect()
    }

    #[test]
    fn answers_nothing_until_watched_and_built() {
        let index = ImageIndex::default();
        assert_eq!(index.list(), None);
        let listing = index.listing();
        index.install(listing, vec![image('a', &["docker.io/library/x:1"])], 5);
        assert_eq!(index.list(), None, "no watch: storage may change unheard");
        index.watching(5);
        assert_eq!(index.list(), None, "a new watch needs a new listing");
        let listing = index.listing();
        index.install(listing, vec![image('a', &["docker.io/library/x:1"])], 5);
        assert_eq!(ids(&index).len(), 1);
        index.lost();
        assert_eq!(index.resolve("x:1"), None);
    }

    #[test]
    fn resolves_ids_tags_and_digests_as_storage_does() {
        let a = image(
            'a',
            &["docker.io/library/x:1", "docker.io/library/x:latest"],
        );
        let index = built(vec![a.clone()]);
        let found = |name: &str| index.resolve(name).expect("current").map(|i| i.id);
        assert_eq!(found("x"), Some(a.id.clone()), "short name, latest tag");
        assert_eq!(found("docker.io/library/x:1"), Some(a.id.clone()));
        assert_eq!(found(&a.id), Some(a.id.clone()));
        assert_eq!(found(&a.id["sha256:".len()..]), Some(a.id.clone()));
        assert_eq!(found(&a.repo_digests[0]), Some(a.id.clone()));
        assert_eq!(found("x:2"), None);
        assert_eq!(found("y"), None);
        assert_eq!(found("aaaaaaaaaaaa"), Some(a.id.clone()), "a short id");
        assert_eq!(
            index.resolve("x").flatten().map(|i| i.config_json),
            Some(String::new()),
            "the config as pulled is not kept"
        );
    }

    #[test]
    fn own_changes_in_order_keep_it_current_and_move_tags() {
        let index = built(vec![image(
            'a',
            &["docker.io/library/x:1", "docker.io/library/x:latest"],
        )]);
        let epoch = index.epoch();
        index.applied(
            epoch,
            11,
            Change::Put(image('b', &["docker.io/library/x:latest"])),
        );
        let latest = index.resolve("x").expect("still current").expect("found");
        assert_eq!(latest.id, image('b', &[]).id, "latest moved to b");
        let a = index.resolve("x:1").flatten().expect("a stays");
        assert_eq!(a.repo_tags, vec!["docker.io/library/x:1".to_string()]);

        // x:1 removed: a goes with its last tag.
        index.applied(
            epoch,
            12,
            Change::Removed {
                image: a,
                deleted: true,
            },
        );
        assert_eq!(ids(&index), vec![image('b', &[]).id]);
        assert_eq!(index.resolve("x:1"), Some(None));

        // A reference of b removed, b kept with what remains.
        let mut b = image('b', &[]);
        b.repo_digests.clear();
        index.applied(
            epoch,
            13,
            Change::Removed {
                image: b.clone(),
                deleted: false,
            },
        );
        assert_eq!(index.resolve("x"), Some(None), "latest went");
        assert_eq!(index.resolve(&image('b', &[]).repo_digests[0]), Some(None));
        assert!(index.resolve(&b.id).flatten().is_some());
    }

    #[test]
    fn another_writer_makes_it_doubtful_until_listed_again() {
        let index = built(vec![image('a', &["docker.io/library/x:1"])]);
        index.observed(10);
        assert!(index.list().is_some(), "nothing new");
        index.observed(11);
        assert_eq!(index.list(), None, "a change it did not see");
        let listing = index.listing();
        index.install(
            listing,
            vec![
                image('a', &["docker.io/library/x:1"]),
                image('b', &["docker.io/library/y:1"]),
            ],
            11,
        );
        assert_eq!(ids(&index).len(), 2);
    }

    #[test]
    fn own_change_after_another_writer_is_doubtful() {
        let index = built(vec![]);
        // Storage made 11 for someone else; this service's change is 12.
        index.applied(
            index.epoch(),
            12,
            Change::Put(image('a', &["docker.io/library/x:1"])),
        );
        assert_eq!(index.list(), None);
        let listing = index.listing();
        index.install(listing, vec![image('a', &[]), image('b', &[])], 12);
        assert_eq!(ids(&index).len(), 2);
    }

    #[test]
    fn a_listing_older_than_an_own_change_is_not_installed() {
        let index = built(vec![]);
        // A listing starts (storage at 10), then this service records an image (11)
        // and applies it, then the listing's answer arrives.
        let listing = index.listing();
        index.applied(
            index.epoch(),
            11,
            Change::Put(image('a', &["docker.io/library/x:1"])),
        );
        index.install(listing, vec![], 10);
        assert_eq!(ids(&index), vec![image('a', &[]).id], "the pull stays seen");
    }

    #[test]
    fn a_reconnection_discards_what_started_before_it() {
        let index = built(vec![]);
        let before = index.epoch();
        let listing = index.listing();
        index.watching(1_000);
        index.install(listing, vec![image('a', &[])], 1_000);
        assert_eq!(index.list(), None, "listed before the reconnection");
        index.applied(before, 1_001, Change::Put(image('b', &[])));
        assert_eq!(index.list(), None, "changed before the reconnection");
        let listing = index.listing();
        index.install(listing, vec![image('b', &[])], 1_001);
        assert_eq!(ids(&index), vec![image('b', &[]).id]);
    }

    #[test]
    fn a_doubt_raised_during_a_listing_outlives_it() {
        let index = built(vec![]);
        let listing = index.listing();
        // Out of order: 12 arrives before 11 was applied.
        index.applied(index.epoch(), 12, Change::Put(image('b', &[])));
        index.install(listing, vec![image('b', &[])], 12);
        assert_eq!(index.list(), None, "the doubt came after the listing began");
        let listing = index.listing();
        index.install(listing, vec![image('a', &[]), image('b', &[])], 12);
        assert_eq!(ids(&index).len(), 2);
    }
}
