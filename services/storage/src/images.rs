//! Image records and the references (tags, digests) that name them.
//!
//! A reference names at most one image: recording an image under a tag another image
//! holds moves the tag. Removing a tag leaves the image's other tags; the image goes
//! with its last tag. Removing by id removes every reference.

use std::collections::HashSet;

use std::sync::{Arc, Mutex};

use trellis_common::reference::{self, ImageRef};
use trellis_common::store::{Records, Store, Table};
use trellis_common::text::excerpt;
use trellis_proto::storage::v1::Image;

use crate::error::StorageError;
use crate::layers::valid_digest;

const IMAGES: &str = "images";
const REFERENCES: &str = "image-references";

pub struct ImageStore {
    images: Records<Image, StorageError>,
    /// Reference (tag or digest form) → image id.
    references: Arc<dyn Table>,
    // Updates touch several records; one writer at a time keeps them consistent.
    write: Mutex<()>,
    /// The generation of the records: one more at every change, made under `write`.
    /// It starts at the store's opening time in nanoseconds, so that it only grows
    /// across restarts and a watcher that knew an earlier instance sees a new number.
    generation: tokio::sync::watch::Sender<u64>,
}

/// What a removal did.
#[derive(Debug, Default, PartialEq)]
pub struct Removal {
    pub image_id: String,
    pub deleted: Option<Image>,
    /// The image after a reference of it was removed (the image kept).
    pub remaining: Option<Image>,
    pub generation: u64,
}

impl ImageStore {
    pub fn open(store: &dyn Store) -> Result<Self, StorageError> {
        let start = u64::try_from(trellis_common::clock::now_nanos()).unwrap_or(1);
        Ok(Self {
            images: Records::open(store, IMAGES)?,
            references: store.table(REFERENCES)?,
            write: Mutex::new(()),
            generation: tokio::sync::watch::Sender::new(start),
        })
    }

    /// The generation now, then each new one.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The next generation; called under the write lock, after a change.
    fn changed(&self) -> u64 {
        self.generation.send_modify(|generation| *generation += 1);
        *self.generation.borrow()
    }

    /// Every image and the generation they are at.
    pub fn list_with_generation(&self) -> Result<(Vec<Image>, u64), StorageError> {
        let _write = self.lock();
        let images = self.list()?;
        Ok((images, *self.generation.borrow()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The one image whose id a short id (`crictl images` shows 13 hex characters)
    /// begins, if `reference` is one and names exactly one.
    fn by_short_id(&self, reference: &str) -> Result<Option<Image>, StorageError> {
        let Some(prefix) = reference::short_id_prefix(reference) else {
            return Ok(None);
        };
        let images = self.images.all()?;
        let ids = images.iter().map(|image| image.id.as_str());
        let id = match reference::unique_by_prefix(&prefix, ids) {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(None),
            Err(several) => {
                return Err(StorageError::InvalidArgument(format!(
                    "short image id `{}` is ambiguous: {several} images have ids that begin so",
                    excerpt(reference)
                )));
            }
        };
        Ok(images.iter().find(|image| image.id == id).cloned())
    }

    fn load(&self, id: &str) -> Result<Option<Image>, StorageError> {
        self.images.get(id)
    }

    fn save(&self, image: &Image) -> Result<(), StorageError> {
        self.images.put(&image.id, image)
    }

    pub fn list(&self) -> Result<Vec<Image>, StorageError> {
        self.images.all()
    }

    /// The image a reference (id, tag or digest form) names, if any.
    pub fn resolve(&self, reference: &str) -> Result<Option<Image>, StorageError> {
        match reference::parse(reference)
            .map_err(|e| StorageError::InvalidArgument(e.to_string()))?
        {
            ImageRef::Id(id) => self.load(&id),
            ImageRef::Named(named) => {
                let key = match (&named.digest, named.tagged()) {
                    (Some(digest), _) => named.with_digest(digest),
                    (None, Some(tagged)) => tagged,
                    (None, None) => return Ok(None),
                };
                match self.references.get(key.as_bytes())? {
                    Some(id) => self.load(&String::from_utf8_lossy(&id)),
                    None => self.by_short_id(reference),
                }
            }
        }
    }

    /// Records an image, taking its references from whichever image held them;
    /// returns it as recorded and the generation this made.
    pub fn put(&self, mut image: Image) -> Result<(Image, u64), StorageError> {
        if !valid_digest(&image.id) {
            return Err(StorageError::InvalidArgument(format!(
                "image id `{}` is not sha256:<64 hex>",
                excerpt(&image.id)
            )));
        }
        let _write = self.lock();
        if let Some(existing) = self.load(&image.id)? {
            merge_unique(&mut image.repo_tags, existing.repo_tags);
            merge_unique(&mut image.repo_digests, existing.repo_digests);
        }
        for name in image.repo_tags.iter().chain(&image.repo_digests) {
            if let Some(holder) = self.references.get(name.as_bytes())?
                && holder != image.id.as_bytes()
                && let Some(mut previous) = self.load(&String::from_utf8_lossy(&holder))?
            {
                previous.repo_tags.retain(|t| t != name);
                previous.repo_digests.retain(|d| d != name);
                self.save(&previous)?;
            }
            self.references.put(name.as_bytes(), image.id.as_bytes())?;
        }
        let saved = self.save(&image);
        // Records may have moved before a failure: watchers look again either way.
        let generation = self.changed();
        saved?;
        Ok((image, generation))
    }

    /// Removes what `reference` names. `in_use` says which container (if any) uses an
    /// image, and refuses deleting it.
    pub fn remove(
        &self,
        reference: &str,
        in_use: impl Fn(&str) -> Option<String>,
    ) -> Result<Removal, StorageError> {
        let parsed = reference::parse(reference)
            .map_err(|e| StorageError::InvalidArgument(e.to_string()))?;
        let _write = self.lock();
        let Some(mut image) = self.resolve(reference)? else {
            return Ok(Removal {
                generation: *self.generation.borrow(),
                ..Removal::default()
            });
        };
        let delete_whole = match &parsed {
            ImageRef::Id(_) => true,
            ImageRef::Named(named) => {
                let name = match &named.digest {
                    Some(digest) => named.with_digest(digest),
                    None => named.tagged().unwrap_or_default(),
                };
                // A name the image does not carry found it as a short id, which names
                // the image itself, as its whole id does.
                let by_short_id =
                    !image.repo_tags.contains(&name) && !image.repo_digests.contains(&name);
                image.repo_tags.retain(|t| *t != name);
                image.repo_digests.retain(|d| *d != name);
                // With its last tag gone, nothing but a digest would keep the image; it
                // goes (kubelet and crictl expect `rmi <tag>` to free the image).
                by_short_id || image.repo_tags.is_empty()
            }
        };
        if delete_whole {
            if let Some(container) = in_use(&image.id) {
                return Err(StorageError::InUse {
                    image: image.id,
                    container,
                });
            }
            let original = self.load(&image.id)?.unwrap_or_else(|| image.clone());
            let deleted = self.delete_whole(&original);
            let generation = self.changed();
            deleted?;
            return Ok(Removal {
                image_id: original.id.clone(),
                deleted: Some(original),
                remaining: None,
                generation,
            });
        }
        let removed = self.remove_reference(&parsed, &image);
        let generation = self.changed();
        removed?;
        Ok(Removal {
            image_id: image.id.clone(),
            deleted: None,
            remaining: Some(image),
            generation,
        })
    }

    fn delete_whole(&self, image: &Image) -> Result<(), StorageError> {
        for name in image.repo_tags.iter().chain(&image.repo_digests) {
            if self.references.get(name.as_bytes())?.as_deref() == Some(image.id.as_bytes()) {
                self.references.delete(name.as_bytes())?;
            }
        }
        self.images.delete(&image.id)?;
        Ok(())
    }

    fn remove_reference(&self, parsed: &ImageRef, image: &Image) -> Result<(), StorageError> {
        if let ImageRef::Named(named) = parsed {
            let name = named
                .digest
                .as_ref()
                .map(|d| named.with_digest(d))
                .or_else(|| named.tagged())
                .unwrap_or_default();
            self.references.delete(name.as_bytes())?;
        }
        self.save(image)
    }

    /// Whether any recorded image other than `except` uses a layer chain.
    /// Every layer chain some image uses, from one pass over the images.
    pub fn chains_in_use(&self) -> Result<HashSet<String>, StorageError> {
        Ok(self
            .list()?
            .into_iter()
            .flat_map(|image| image.chain_ids)
            .collect())
    }
}

fn merge_unique(into: &mut Vec<String>, from: Vec<String>) {
    for item in from {
        if !into.contains(&item) {
            into.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_common::store::SledStore;

    fn image(id_char: char, tags: &[&str]) -> Image {
        Image {
            id: format!("sha256:{}", id_char.to_string().repeat(64)),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn tags_move_and_removal_follows_the_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("store");
        let images = ImageStore::open(&store).expect("images");
        let watch = images.watch();
        let start = *watch.borrow();
        let (a, first) = images
            .put(image(
                'a',
                &["docker.io/library/x:1", "docker.io/library/x:latest"],
            ))
            .expect("put a");
        let (b, second) = images
            .put(image('b', &["docker.io/library/x:latest"]))
            .expect("put b");
        assert_eq!(
            (first, second),
            (start + 1, start + 2),
            "one generation a change"
        );
        assert_eq!(*watch.borrow(), second, "watchers see the last one");
        assert_eq!(
            images.resolve("x").expect("resolve").map(|i| i.id),
            Some(b.id.clone()),
            "latest moved to b"
        );
        assert_eq!(
            images.resolve("x:1").expect("resolve").map(|i| i.repo_tags),
            Some(vec!["docker.io/library/x:1".to_string()])
        );

        let removal = images.remove("x:1", |_| None).expect("remove tag");
        assert_eq!(removal.generation, start + 3);
        assert_eq!(
            removal.deleted.map(|i| i.id),
            Some(a.id.clone()),
            "a went with its last tag"
        );
        assert_eq!(images.resolve(&a.id).expect("resolve"), None);

        assert_eq!(
            images
                .remove("never-pulled", |_| None)
                .expect("missing is fine"),
            Removal {
                generation: start + 3,
                ..Removal::default()
            },
            "nothing changed, no new generation"
        );
        let (listed, generation) = images.list_with_generation().expect("list");
        assert_eq!((listed.len(), generation), (1, start + 3));
        let refused = images
            .remove(&b.id, |_| Some("c1".into()))
            .expect_err("in use");
        assert!(refused.to_string().contains("in use by container c1"));
        assert!(
            images
                .remove(&b.id, |_| None)
                .expect("remove by id")
                .deleted
                .is_some()
        );
        assert!(images.list().expect("list").is_empty());
    }
}
