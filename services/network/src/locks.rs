//! One operation at a time per sandbox: a SetUpPod and a TearDownPod for the same pod
//! must not interleave their plugin calls. Different pods do not wait for each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct SandboxLocks {
    held: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct SandboxGuard<'a> {
    locks: &'a SandboxLocks,
    sandbox_id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl SandboxLocks {
    pub async fn lock(&self, sandbox_id: &str) -> SandboxGuard<'_> {
        let mutex = {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            held.entry(sandbox_id.to_string()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        SandboxGuard {
            locks: self,
            sandbox_id: sandbox_id.to_string(),
            guard: Some(guard),
        }
    }
}

impl Drop for SandboxGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Only the map's own handle left: nobody holds or waits for it; without this
        // the map would grow by one entry per pod ever seen.
        if held
            .get(&self.sandbox_id)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            held.remove(&self.sandbox_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_sandbox_waits_other_sandboxes_do_not_and_entries_go() {
        let locks = Arc::new(SandboxLocks::default());
        let first = locks.lock("a").await;
        let _other = locks.lock("b").await;
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _second = locks.lock("a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a second lock on the same sandbox waits"
        );
        drop(first);
        waiting.await.expect("second lock taken");
        drop(_other);
        assert!(locks.held.lock().expect("map").is_empty());
    }
}
