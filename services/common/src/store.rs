//! Durable records for the stateful services, behind a small interface of our own so
//! that the engine (sled today) is a detail. Every change is flushed before it
//! returns: a service killed right after a write finds the write on restart.
//!
//! Records are protobuf messages ([`Records`]): one encoding for every service, whose
//! fields can be added without a migration, and decoded without trusting their bytes.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;

use crate::text::excerpt;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the record store at {path}{hint}: {source}")]
    Open {
        path: PathBuf,
        /// What the operator may look at (another instance holding the lock).
        hint: &'static str,
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
    /// The engine failed to write (a full disk, an I/O error) and is reopened in the
    /// background; calls fail fast until a reopen has written again.
    #[error(
        "record store {path} is out of service since a write failed, until it can be reopened: {source}"
    )]
    Broken {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
}

impl StoreError {
    /// The gRPC code a caller gets: a full disk is `ResourceExhausted` (retry once
    /// space is freed), a store being reopened `Unavailable`.
    pub fn code(&self) -> tonic::Code {
        if crate::error::is_out_of_space(self) {
            return tonic::Code::ResourceExhausted;
        }
        match self {
            Self::Record { source, .. } => source.code(),
            Self::Broken { .. } => tonic::Code::Unavailable,
            Self::Engine {
                source: sled::Error::Io(_),
                ..
            } => tonic::Code::Unavailable,
            _ => tonic::Code::Internal,
        }
    }
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
    /// Whether the store can write: `Ok` unless a write failed and no reopen has
    /// written since. A broken store tries to reopen here (at most every so often).
    fn check(&self) -> Result<(), StoreError>;
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

mod sled_store;
pub use sled_store::SledStore;

#[cfg(test)]
mod tests;
