//! Durable records for the stateful services, behind a small interface of our own so
//! that the engine (sled today) is a detail. Every change is flushed before it
//! returns: a service killed right after a write finds the write on restart.
//!
//! Records are protobuf messages ([`Records`]): one encoding for every service, whose
//! fields can be added without a migration, and decoded without trusting their bytes.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::text::excerpt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the record store at {path} (is another instance using it?): {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("record store {path}, table {table}: {source}")]
    Engine {
        path: PathBuf,
        table: String,
        #[source]
        source: sled::Error,
    },
    /// A failure reading or writing one record of a [`Records`] table.
    #[error("record {key}: {source}")]
    Record {
        key: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("record {key} of table {table} is unreadable: {source}")]
    Decode {
        table: String,
        key: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Key-ordered records. Keys sort as bytes, so big-endian integers iterate in order.
/// One record: its key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

pub trait Table: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn delete(&self, key: &[u8]) -> Result<(), StoreError>;
    /// The record with the smallest key.
    fn first(&self) -> Result<Option<Entry>, StoreError>;
    /// Every record, in key order.
    fn scan(&self) -> Result<Vec<Entry>, StoreError>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub trait Store: Send + Sync {
    fn table(&self, name: &str) -> Result<Arc<dyn Table>, StoreError>;
    /// A number never handed out before by this store, even across restarts.
    fn next_id(&self) -> Result<u64, StoreError>;
}

/// A table of one kind of protobuf record, keyed by a string (an id, a chain id). Its
/// errors are `E`, a service's own error type, so that `?` needs no conversion.
pub struct Records<T, E = StoreError> {
    table: Arc<dyn Table>,
    name: String,
    _kind: PhantomData<fn() -> (T, E)>,
}

impl<T: prost::Message + Default, E: From<StoreError>> Records<T, E> {
    pub fn open(store: &dyn Store, name: &str) -> Result<Self, E> {
        Ok(Self {
            table: store.table(name)?,
            name: name.to_string(),
            _kind: PhantomData,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn get(&self, key: &str) -> Result<Option<T>, E> {
        let raw = self
            .table
            .get(key.as_bytes())
            .map_err(|source| about(key, source))?;
        Ok(raw
            .map(|raw| self.decode(key.as_bytes(), &raw))
            .transpose()?)
    }

    pub fn put(&self, key: &str, record: &T) -> Result<(), E> {
        self.table
            .put(key.as_bytes(), &record.encode_to_vec())
            .map_err(|source| about(key, source).into())
    }

    pub fn delete(&self, key: &str) -> Result<(), E> {
        self.table
            .delete(key.as_bytes())
            .map_err(|source| about(key, source).into())
    }

    /// Whether a record is there, without decoding it.
    pub fn contains(&self, key: &str) -> Result<bool, E> {
        Ok(self
            .table
            .get(key.as_bytes())
            .map_err(|source| about(key, source))?
            .is_some())
    }

    /// Every record, in key order.
    pub fn all(&self) -> Result<Vec<T>, E> {
        self.table
            .scan()?
            .into_iter()
            .map(|(key, raw)| Ok(self.decode(&key, &raw)?))
            .collect()
    }

    /// The smallest key, without decoding its record.
    pub fn first_key(&self) -> Result<Option<String>, E> {
        Ok(self
            .table
            .first()?
            .map(|(key, _)| String::from_utf8_lossy(&key).into_owned()))
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn decode(&self, key: &[u8], raw: &[u8]) -> Result<T, StoreError> {
        T::decode(raw).map_err(|source| StoreError::Decode {
            table: self.name.clone(),
            key: excerpt(&String::from_utf8_lossy(key)),
            source,
        })
    }
}

/// An engine error with the record it was about (the engine names the table).
fn about(key: &str, source: StoreError) -> StoreError {
    StoreError::Record {
        key: excerpt(key),
        source: Box::new(source),
    }
}

/// The bound of sled's page cache. Its default, 1 GiB, lets the cache grow with
/// whatever was read; a service's records (pods, containers, images, its outbox) fit
/// in a few MiB, and the lists the kubelet asks for are answered from the services'
/// own indexes.
const CACHE_BYTES: u64 = 8 << 20;

/// How long an open waits for a lock that a closing handle still holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // sled lets go of its file lock a moment after the last handle is dropped (its
        // flusher thread holds one), so an open right after a close in the same process
        // may find it still held. A live owner in another process keeps it: that still
        // fails, once the short wait is over.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // No periodic flush: every change is flushed before it returns, so sled's
            // flusher thread would only wake up for nothing.
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::LowSpace)
                .cache_capacity(CACHE_BYTES)
                .flush_every_ms(None)
                .open()
            {
                Ok(db) => {
                    return Ok(Self {
                        db,
                        path: path.to_path_buf(),
                    });
                }
                Err(sled::Error::Io(error))
                    if error.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
    }

    fn engine_error(&self, table: &str) -> impl Fn(sled::Error) -> StoreError + use<'_> {
        let table = table.to_string();
        move |source| StoreError::Engine {
            path: self.path.clone(),
            table: table.clone(),
            source,
        }
    }
}

impl Store for SledStore {
    fn table(&self, name: &str) -> Result<Arc<dyn Table>, StoreError> {
        let tree = self.db.open_tree(name).map_err(self.engine_error(name))?;
        Ok(Arc::new(SledTable {
            tree,
            path: self.path.clone(),
            name: name.to_string(),
        }))
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(self.engine_error("<ids>"))
    }
}

struct SledTable {
    tree: sled::Tree,
    path: PathBuf,
    name: String,
}

impl SledTable {
    fn error(&self, source: sled::Error) -> StoreError {
        StoreError::Engine {
            path: self.path.clone(),
            table: self.name.clone(),
            source,
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush().map(|_| ()).map_err(|e| self.error(e))
    }
}

impl Table for SledTable {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .get(key)
            .map_err(|e| self.error(e))?
            .map(|v| v.to_vec()))
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(key, value).map_err(|e| self.error(e))?;
        self.flush()
    }

    fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        self.tree.remove(key).map_err(|e| self.error(e))?;
        self.flush()
    }

    fn first(&self) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .tree
            .first()
            .map_err(|e| self.error(e))?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn scan(&self) -> Result<Vec<Entry>, StoreError> {
        self.tree
            .iter()
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| self.error(e))
            })
            .collect()
    }

    fn len(&self) -> usize {
        self.tree.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_ids_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first_id;
        {
            let store = SledStore::open(dir.path()).expect("open");
            let table = store.table("t").expect("table");
            table.put(&2u64.to_be_bytes(), b"two").expect("put");
            table.put(&1u64.to_be_bytes(), b"one").expect("put");
            first_id = store.next_id().expect("id");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        let table = store.table("t").expect("table");
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.first().expect("first"),
            Some((1u64.to_be_bytes().to_vec(), b"one".to_vec()))
        );
        table.delete(&1u64.to_be_bytes()).expect("delete");
        assert_eq!(
            table.get(&2u64.to_be_bytes()).expect("get"),
            Some(b"two".to_vec())
        );
        assert!(
            store.next_id().expect("id") > first_id,
            "ids keep growing across restarts"
        );
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct Note {
        #[prost(string, tag = "1")]
        text: String,
        #[prost(uint64, tag = "2")]
        count: u64,
    }

    fn note(text: &str, count: u64) -> Note {
        Note {
            text: text.into(),
            count,
        }
    }

    #[test]
    fn typed_records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            let notes = Records::<Note>::open(&store, "notes").expect("table");
            notes.put("b", &note("bee", 2)).expect("put");
            notes.put("a", &note("ay", 1)).expect("put");
            notes.put("c", &note("sea", 3)).expect("put");
            notes.delete("c").expect("delete");
            assert!(
                notes.contains("b").expect("contains") && !notes.contains("c").expect("contains")
            );
            notes
                .delete("never")
                .expect("deleting a missing record is no error");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        let notes = Records::<Note>::open(&store, "notes").expect("table");
        assert_eq!(notes.get("b").expect("get"), Some(note("bee", 2)));
        assert_eq!(notes.get("c").expect("get"), None);
        assert_eq!(
            notes.all().expect("all"),
            vec![note("ay", 1), note("bee", 2)],
            "in key order"
        );
        assert_eq!(notes.first_key().expect("first"), Some("a".into()));
        assert_eq!((notes.len(), notes.name()), (2, "notes"));
    }

    #[test]
    fn an_unreadable_record_is_named_by_table_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        // A length-delimited field that claims more bytes than there are.
        store
            .table("notes")
            .expect("raw table")
            .put(b"bad\nkey", &[0x0a, 0x7f, b'x'])
            .expect("put");
        let notes = Records::<Note>::open(&store, "notes").expect("table");
        for error in [
            notes.get("bad\nkey").expect_err("undecodable"),
            notes.all().expect_err("undecodable"),
        ] {
            assert!(matches!(error, StoreError::Decode { .. }), "{error:?}");
            let message = error.to_string();
            assert!(
                message.contains("table notes") && message.contains("record bad\\nkey"),
                "{message}"
            );
        }
    }

    #[test]
    fn second_open_of_a_live_store_fails_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _store = SledStore::open(dir.path()).expect("open");
        let message = SledStore::open(dir.path())
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }
}
