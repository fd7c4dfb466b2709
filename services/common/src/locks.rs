//! One async lock per key (a pod, a container, a layer chain, a blob), for work that
//! must not interleave on one key while work on other keys goes on.
//!
//! Keys are ids from requests and registries: a map that kept one entry per key ever
//! seen would grow for the life of the process. An entry lives only while someone
//! holds its lock or waits for it, counted explicitly (not by `Arc` counts, which a
//! cancelled wait would drop in any order), so a caller that gives up waiting frees
//! it too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedMutexGuard;

type Slots = Mutex<HashMap<String, Slot>>;

struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Holders and waiters: the slot goes when the last of them does.
    users: usize,
}

/// An async mutex per key.
#[derive(Default, Clone)]
pub struct KeyedLocks {
    slots: Arc<Slots>,
}

/// The lock of one key, held until dropped. It owns what it needs, so it can move into
/// a blocking task that outlives the call that took it.
#[must_use = "the key is unlocked when the guard is dropped"]
pub struct KeyGuard {
    // Fields drop in order: the lock is let go before the slot may be freed.
    _guard: OwnedMutexGuard<()>,
    _user: User,
}

/// One holder or waiter of a key's slot.
struct User {
    slots: Arc<Slots>,
    key: String,
}

impl Drop for User {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(&self.key) {
            slot.users = slot.users.saturating_sub(1);
            if slot.users == 0 {
                slots.remove(&self.key);
            }
        }
    }
}

fn lock(slots: &Slots) -> MutexGuard<'_, HashMap<String, Slot>> {
    // The map is consistent after every statement: a panic elsewhere leaves it usable.
    slots
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl KeyedLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no one else holds `key`'s lock, and takes it. Dropping the future
    /// while it waits gives up its turn.
    pub async fn lock(&self, key: &str) -> KeyGuard {
        let (user, mutex) = {
            let mut slots = lock(&self.slots);
            let slot = slots.entry(key.to_string()).or_insert_with(|| Slot {
                lock: Arc::default(),
                users: 0,
            });
            slot.users += 1;
            let user = User {
                slots: self.slots.clone(),
                key: key.to_string(),
            };
            (user, slot.lock.clone())
        };
        let guard = mutex.lock_owned().await;
        KeyGuard {
            _guard: guard,
            _user: user,
        }
    }

    /// Keys held or waited for now.
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_key_waits_another_does_not() {
        let locks = KeyedLocks::new();
        let first = locks.lock("a").await;
        let other = tokio::time::timeout(Duration::from_secs(5), locks.lock("b"))
            .await
            .expect("a second key is not held up by the first");
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a second lock on one key waits");
        assert_eq!(locks.len(), 2);
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter gets the lock once it is let go")
            .expect("waiter");
        drop(other);
        assert!(locks.is_empty(), "entries go with their last user");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_frees_its_entry() {
        let locks = KeyedLocks::new();
        let held = locks.lock("a").await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), locks.lock("a")).await;
        assert!(gave_up.is_err(), "the key is held");
        assert_eq!(locks.len(), 1, "only the holder's entry");
        drop(held);
        assert!(locks.is_empty());
        // And the key is still usable afterwards.
        let _again = locks.lock("a").await;
        assert_eq!(locks.len(), 1);
    }

    #[tokio::test]
    async fn a_guard_moves_into_a_blocking_task() {
        let locks = KeyedLocks::new();
        let guard = locks.lock("chain").await;
        let blocking = tokio::task::spawn_blocking(move || {
            let _held = guard;
            std::thread::sleep(Duration::from_millis(30));
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let waited = tokio::time::timeout(Duration::from_millis(5), locks.lock("chain")).await;
        assert!(waited.is_err(), "the blocking task holds the key");
        blocking.await.expect("blocking task");
        let _after = locks.lock("chain").await;
        drop(_after);
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn many_keys_leave_nothing_behind() {
        let locks = KeyedLocks::new();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let locks = locks.clone();
                tokio::spawn(async move {
                    let _guard = locks.lock(&format!("key-{}", i % 7)).await;
                    tokio::task::yield_now().await;
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert!(locks.is_empty());
    }
}
