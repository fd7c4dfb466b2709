//! The sled engine behind [`Store`], healed in place after an I/O failure.
//!
//! Once sled fails to write (a full disk, a quota, an I/O error) it keeps that error
//! and refuses every later operation for as long as the `Db` lives, even after space
//! is back: before this wrapper, a full disk left a service failing every write until
//! someone restarted it. Healing in place is chosen over a process restart (health
//! NOT_SERVING and the supervisor's restart) because it is what a restart does, without
//! dropping the service's connections, in-flight calls and in-memory indexes, and
//! sooner: every table handle goes through this wrapper, which alone holds sled's
//! `Db` and `Tree`s, so dropping them releases the old engine (and its file lock)
//! before the new one opens, and sled's recovery at open is the same crash recovery a
//! restart runs. Records flushed before the failure are on disk and found again; the
//! write that failed was never reported as done, and sled's log checksums drop
//! whatever part of it reached the disk.
//!
//! A failed engine is marked broken; calls then fail fast with the cause (so a full
//! disk stays `ResourceExhausted`), and a reopen is tried on the next use or health
//! check, at most every [`RETRY_INTERVAL`]. A reopen counts only once it has written
//! and flushed a probe record: opening alone succeeds on a full disk.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::{Entry, Store, StoreError, Table};

/// The bound of sled's page cache. Its default, 1 GiB, lets the cache grow with
/// whatever was read; a service's records (pods, containers, images, its outbox) fit
/// in a few MiB, and the lists the kubelet asks for are answered from the services'
/// own indexes.
const CACHE_BYTES: u64 = 8 << 20;

/// How long an open waits for a lock that a closing handle still holds.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// How often a broken engine is reopened at most: each attempt on a disk still full
/// costs an open and a failed write.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// The key of the record a reopen writes to prove that writing works again, in sled's
/// default tree (no service table).
const PROBE_KEY: &[u8] = b"trellis.store.write-probe";

pub struct SledStore {
    engine: Arc<Engine>,
}

struct Engine {
    path: PathBuf,
    /// The open engine; `None` while broken and not yet reopened.
    open: RwLock<Option<Open>>,
    /// Why the engine is broken, and when a reopen was last tried.
    fault: Mutex<Option<Fault>>,
    /// Every table handed out, by name: opened again by a reopen (kept apart from the
    /// engine, which is gone while a reopen keeps failing).
    names: Mutex<BTreeSet<String>>,
    /// A failure every engine operation meets, for tests.
    #[cfg(test)]
    injected: Mutex<Option<std::io::ErrorKind>>,
}

struct Open {
    db: sled::Db,
    trees: HashMap<String, sled::Tree>,
}

struct Fault {
    cause: sled::Error,
    last_attempt: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The hint of a store another process holds open.
const HELD_BY_ANOTHER: &str = " (is another instance using it?)";

impl StoreError {
    /// Whether opening failed because another process holds the store.
    pub fn held_by_another(&self) -> bool {
        matches!(self, StoreError::Open { hint, .. } if *hint == HELD_BY_ANOTHER)
    }
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_within(path, LOCK_WAIT)
    }

    /// [`SledStore::open`] without waiting for a held lock: for a process choosing
    /// between stores, one of which its still-running predecessor holds.
    pub fn open_unless_held(path: &Path) -> Result<Self, StoreError> {
        Self::open_within(path, Duration::ZERO)
    }

    fn open_within(path: &Path, lock_wait: Duration) -> Result<Self, StoreError> {
        let db = open_db(path, lock_wait).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            hint: if is_lock_error(&source) {
                HELD_BY_ANOTHER
            } else {
                ""
            },
            source,
        })?;
        Ok(Self {
            engine: Arc::new(Engine {
                path: path.to_path_buf(),
                open: RwLock::new(Some(Open {
                    db,
                    trees: HashMap::new(),
                })),
                fault: Mutex::new(None),
                names: Mutex::new(BTreeSet::new()),
                #[cfg(test)]
                injected: Mutex::new(None),
            }),
        })
    }

    /// Makes every engine operation fail with an I/O error of `kind` until cleared,
    /// as sled does once a write has failed.
    #[cfg(test)]
    pub(super) fn inject_failure(&self, kind: Option<std::io::ErrorKind>) {
        *lock(&self.engine.injected) = kind;
    }
}

fn open_db(path: &Path, lock_wait: Duration) -> Result<sled::Db, sled::Error> {
    // sled lets go of its file lock a moment after the last handle is dropped (its
    // flusher thread holds one), so an open right after a close in the same process
    // may find it still held. A live owner in another process keeps it: that still
    // fails, once the short wait is over.
    let deadline = Instant::now() + lock_wait;
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
            Err(error) if is_lock_error(&error) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// sled's refusal to open a store whose file lock another handle holds (it says so
/// only in words).
fn is_lock_error(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Errors after which sled refuses everything: the engine must be reopened.
fn breaks_the_engine(error: &sled::Error) -> bool {
    matches!(
        error,
        sled::Error::Io(_) | sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
    )
}

/// sled passes an I/O error on as a new error holding the old one's debug text, once
/// per copy: a kept cause would read `Custom { kind: StorageFull, error: "Custom {…`.
/// The kind is what matters (it makes a full disk ResourceExhausted); the text is
/// made plain again.
fn tidy(error: sled::Error) -> sled::Error {
    let sled::Error::Io(io) = error else {
        return error;
    };
    if io.raw_os_error().is_some() {
        return sled::Error::Io(io);
    }
    let text = match io.kind() {
        std::io::ErrorKind::StorageFull => "No space left on device".to_string(),
        std::io::ErrorKind::QuotaExceeded => "Disk quota exceeded".to_string(),
        _ => io.to_string(),
    };
    sled::Error::Io(std::io::Error::new(io.kind(), text))
}

impl Engine {
    fn engine_error(&self, table: &str, source: sled::Error) -> StoreError {
        StoreError::Engine {
            path: self.path.clone(),
            table: table.to_string(),
            source,
        }
    }

    /// Runs `op` on the open engine, after reopening it if it is broken and a retry
    /// is due; marks it broken if `op` fails the way sled does not recover from.
    fn run<T>(
        &self,
        table: &str,
        op: impl FnOnce(&Open) -> sled::Result<T>,
    ) -> Result<T, StoreError> {
        self.heal()?;
        let result = {
            let open = self.open.read().unwrap_or_else(|p| p.into_inner());
            let Some(open) = open.as_ref() else {
                return Err(self.broken_error());
            };
            match self.injected_failure() {
                Some(error) => Err(error),
                None => op(open),
            }
        };
        result.map_err(|source| {
            let source = tidy(source);
            if breaks_the_engine(&source) {
                self.mark_broken(&source);
            }
            self.engine_error(table, source)
        })
    }

    #[cfg(test)]
    fn injected_failure(&self) -> Option<sled::Error> {
        lock(&self.injected).map(|kind| sled::Error::Io(std::io::Error::from(kind)))
    }

    #[cfg(not(test))]
    fn injected_failure(&self) -> Option<sled::Error> {
        None
    }

    fn mark_broken(&self, cause: &sled::Error) {
        let mut fault = lock(&self.fault);
        if fault.is_none() {
            tracing::error!(path = %self.path.display(), error = %cause, "the record store failed to write; it is reopened once writing works again");
            *fault = Some(Fault {
                cause: tidy(cause.clone()),
                // The first reopen waits a little: sled has only just failed.
                last_attempt: Instant::now(),
            });
        }
    }

    fn broken_error(&self) -> StoreError {
        let cause = lock(&self.fault)
            .as_ref()
            .map(|fault| tidy(fault.cause.clone()))
            .unwrap_or_else(|| sled::Error::ReportableBug("record store closed".into()));
        StoreError::Broken {
            path: self.path.clone(),
            source: cause,
        }
    }

    /// If broken: reopens (when a retry is due) or fails fast with the cause.
    fn heal(&self) -> Result<(), StoreError> {
        {
            let mut fault = lock(&self.fault);
            let Some(current) = fault.as_mut() else {
                return Ok(());
            };
            if current.last_attempt.elapsed() < RETRY_INTERVAL {
                return Err(StoreError::Broken {
                    path: self.path.clone(),
                    source: tidy(current.cause.clone()),
                });
            }
            current.last_attempt = Instant::now();
        }
        // Only one reopen at a time: the others wait for it on the write lock, then
        // find the fault gone (or fail fast until the next retry).
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        if lock(&self.fault).is_none() {
            return Ok(());
        }
        let names: Vec<String> = lock(&self.names).iter().cloned().collect();
        // Every handle on the failed engine goes first, so that its file lock is let
        // go (and nothing of it writes after the new engine has read the log).
        *open = None;
        match self.reopen(&names) {
            Ok(reopened) => {
                *open = Some(reopened);
                *lock(&self.fault) = None;
                tracing::info!(path = %self.path.display(), "the record store writes again: reopened");
                Ok(())
            }
            Err(cause) => {
                let cause = tidy(cause);
                tracing::debug!(path = %self.path.display(), error = %cause, "the record store cannot be reopened yet");
                if let Some(fault) = lock(&self.fault).as_mut() {
                    fault.cause = tidy(cause.clone());
                }
                Err(StoreError::Broken {
                    path: self.path.clone(),
                    source: cause,
                })
            }
        }
    }

    fn reopen(&self, names: &[String]) -> sled::Result<Open> {
        if let Some(error) = self.injected_failure() {
            return Err(error);
        }
        let db = open_db(&self.path, LOCK_WAIT)?;
        db.insert(PROBE_KEY, &[])?;
        db.flush()?;
        let trees = names
            .iter()
            .map(|name| Ok((name.clone(), db.open_tree(name)?)))
            .collect::<sled::Result<HashMap<_, _>>>()?;
        Ok(Open { db, trees })
    }
}

impl Store for SledStore {
    fn table(&self, name: &str) -> Result<Arc<dyn Table>, StoreError> {
        let engine = &self.engine;
        engine.heal()?;
        let mut open = engine.open.write().unwrap_or_else(|p| p.into_inner());
        let Some(open) = open.as_mut() else {
            return Err(engine.broken_error());
        };
        if !open.trees.contains_key(name) {
            let tree = open
                .db
                .open_tree(name)
                .map_err(|source| engine.engine_error(name, source))?;
            open.trees.insert(name.to_string(), tree);
            lock(&engine.names).insert(name.to_string());
        }
        Ok(Arc::new(SledTable {
            engine: engine.clone(),
            name: name.to_string(),
        }))
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        self.engine.run("<ids>", |open| open.db.generate_id())
    }

    fn check(&self) -> Result<(), StoreError> {
        self.engine.heal()
    }
}

/// A table handle: a name, looked up in whichever engine is open at each call.
struct SledTable {
    engine: Arc<Engine>,
    name: String,
}

impl SledTable {
    fn run<T>(&self, op: impl FnOnce(&sled::Tree) -> sled::Result<T>) -> Result<T, StoreError> {
        self.engine
            .run(&self.name, |open| match open.trees.get(&self.name) {
                Some(tree) => op(tree),
                None => Err(sled::Error::CollectionNotFound(self.name.as_bytes().into())),
            })
    }
}

impl Table for SledTable {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(|tree| Ok(tree.get(key)?.map(|v| v.to_vec())))
    }

    // Every write is flushed before it returns: a step of its own in the call's trace.
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let _step = crate::step_span!("record.write", db.collection.name = %self.name).entered();
        self.run(|tree| {
            tree.insert(key, value)?;
            tree.flush().map(drop)
        })
    }

    fn delete(&self, key: &[u8]) -> Result<(), StoreError> {
        let _step = crate::step_span!("record.delete", db.collection.name = %self.name).entered();
        self.run(|tree| {
            tree.remove(key)?;
            tree.flush().map(drop)
        })
    }

    fn first(&self) -> Result<Option<Entry>, StoreError> {
        self.run(|tree| Ok(tree.first()?.map(|(k, v)| (k.to_vec(), v.to_vec()))))
    }

    fn scan(&self) -> Result<Vec<Entry>, StoreError> {
        self.run(|tree| {
            tree.iter()
                .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect()
        })
    }

    /// 0 while the store is broken and cannot be reopened: the count is advisory
    /// (metrics, the outbox bound), and every write says why it fails.
    fn len(&self) -> usize {
        self.run(|tree| Ok(tree.len())).unwrap_or(0)
    }
}
