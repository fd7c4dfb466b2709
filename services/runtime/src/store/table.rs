//! One kind of record, durable in the record store and held in memory, decoded, in
//! id order, so that lookups by full id or by the short prefixes `crictl` users type
//! cost a map lookup instead of a scan and decode of the whole store.
//!
//! Every change goes through [`Table::update`] (or insert/remove): it is written and
//! flushed first, and only then visible to readers, so what a list shows has always
//! been made durable. Changes to one record are serialised by that record's own slot
//! lock, so an update acts on the latest version and two changes never lose one.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use trellis_common::store::{Records, Store};
use trellis_common::text::excerpt;

use crate::error::RuntimeError;

/// A record with an id (pods and containers).
pub trait Record: prost::Message + Default + Clone + PartialEq + 'static {
    /// What the record is called in errors: `pod sandbox`, `container`.
    const KIND: &'static str;
    fn id(&self) -> &str;
}

/// One record's current version (None once removed); its lock serialises the
/// record's changes, so a change that raced a removal cannot write the record back.
type Slot<T> = Arc<Mutex<Option<Arc<T>>>>;

pub struct Table<T> {
    durable: Records<T, RuntimeError>,
    rows: RwLock<BTreeMap<String, Slot<T>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: Record> Table<T> {
    /// Opens the durable table and loads every record into memory.
    pub fn open(store: &dyn Store, name: &str) -> Result<Self, RuntimeError> {
        let durable = Records::<T, RuntimeError>::open(store, name)?;
        let mut rows = BTreeMap::new();
        for record in durable.all()? {
            rows.insert(
                record.id().to_string(),
                Arc::new(Mutex::new(Some(Arc::new(record)))),
            );
        }
        Ok(Self {
            durable,
            rows: RwLock::new(rows),
        })
    }

    fn slot(&self, id: &str) -> Option<Slot<T>> {
        self.rows
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(id)
            .cloned()
    }

    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.slot(id).and_then(|slot| lock(&slot).clone())
    }

    fn not_found(id: &str) -> RuntimeError {
        RuntimeError::NotFound(format!("{} {} not found", T::KIND, excerpt(id)))
    }

    /// The record with this id, or the only one whose id starts with it.
    pub fn resolve(&self, id: &str) -> Result<Arc<T>, RuntimeError> {
        crate::validate::lookup_id(T::KIND, id)?;
        // Slots are locked after the map's guard is gone: removal takes them the
        // other way round.
        let found: Vec<Slot<T>> = {
            let rows = self
                .rows
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match rows.get(id) {
                Some(slot) => vec![slot.clone()],
                None => rows
                    .range::<str, _>((Bound::Included(id), Bound::Unbounded))
                    .take_while(|(key, _)| key.starts_with(id))
                    .take(2)
                    .map(|(_, slot)| slot.clone())
                    .collect(),
            }
        };
        match found.as_slice() {
            [slot] => lock(slot).clone().ok_or_else(|| Self::not_found(id)),
            [] => Err(Self::not_found(id)),
            _ => Err(RuntimeError::InvalidArgument(format!(
                "{} id prefix {} matches more than one {} id",
                T::KIND,
                excerpt(id),
                T::KIND
            ))),
        }
    }

    /// Every record, in id order.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.with_prefix("")
    }

    /// Every record whose id starts with `prefix`, in id order.
    pub fn with_prefix(&self, prefix: &str) -> Vec<Arc<T>> {
        let slots: Vec<Slot<T>> = self
            .rows
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, slot)| slot.clone())
            .collect();
        slots.iter().filter_map(|slot| lock(slot).clone()).collect()
    }

    /// Adds a new record; its id must be new.
    pub fn insert(&self, record: T) -> Result<Arc<T>, RuntimeError> {
        let id = record.id().to_string();
        let mut rows = self
            .rows
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if rows.contains_key(&id) {
            return Err(RuntimeError::AlreadyExists(format!(
                "{} {id} exists already",
                T::KIND
            )));
        }
        self.durable.put(&id, &record)?;
        let record = Arc::new(record);
        rows.insert(id, Arc::new(Mutex::new(Some(record.clone()))));
        Ok(record)
    }

    /// Changes one record: `change` sees its latest version and may refuse (a guarded
    /// state transition); the result is written, then shown to readers.
    pub fn update<R>(
        &self,
        id: &str,
        change: impl FnOnce(&mut T) -> Result<R, RuntimeError>,
    ) -> Result<(Arc<T>, R), RuntimeError> {
        let slot = self.slot(id).ok_or_else(|| Self::not_found(id))?;
        let mut current = lock(&slot);
        let Some(record) = current.as_ref() else {
            return Err(Self::not_found(id));
        };
        let mut next = T::clone(record);
        let outcome = change(&mut next)?;
        if next != **record {
            self.durable.put(id, &next)?;
            *current = Some(Arc::new(next));
        }
        let record = current.clone().ok_or_else(|| Self::not_found(id))?;
        Ok((record, outcome))
    }

    /// Removes a record (gone already is fine) and returns its last version.
    pub fn remove(&self, id: &str) -> Result<Option<Arc<T>>, RuntimeError> {
        let Some(slot) = self.slot(id) else {
            return Ok(None);
        };
        let mut current = lock(&slot);
        if current.is_none() {
            return Ok(None);
        }
        self.durable.delete(id)?;
        let last = current.take();
        self.rows
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(id);
        Ok(last)
    }
}
