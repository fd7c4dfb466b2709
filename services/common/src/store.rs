//! Durable records for the stateful services, behind a small interface of our own so
//! that the engine (sled today) is a detail. Every change is flushed before it
//! returns: a service killed right after a write finds the write on restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
