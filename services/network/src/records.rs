//! The service's records of pod networks, in two tables of its sled store: `pods`
//! holds pods that are set up; `in_flight` holds the intent of an ADD or a DEL that
//! has not finished. A pod is in `in_flight` from before its first world-changing step
//! until after its last, so whatever a crash interrupts is found there on start.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use trellis_common::store::{Store, StoreError, Table};

use crate::cni::Attachment;
use crate::error::NetworkError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    Adding,
    Ready,
    Removing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub sandbox_id: String,
    pub state: PodState,
    pub host_network: bool,
    pub config_file: PathBuf,
    pub network_name: String,
    /// What the plugins are told; none for a host-network pod.
    pub attachment: Option<Attachment>,
    /// The ADD chain's result, once there is one.
    pub result: Option<serde_json::Value>,
}

pub struct Records {
    pods: Arc<dyn Table>,
    in_flight: Arc<dyn Table>,
}

const PODS: &str = "pods";
const IN_FLIGHT: &str = "in_flight";

impl Records {
    pub fn open(store: &dyn Store) -> Result<Self, NetworkError> {
        Ok(Self {
            pods: store.table(PODS)?,
            in_flight: store.table(IN_FLIGHT)?,
        })
    }

    /// The newest record of a sandbox: an unfinished operation wins over a finished one.
    pub fn get(&self, sandbox_id: &str) -> Result<Option<PodRecord>, NetworkError> {
        match self.read(&self.in_flight, IN_FLIGHT, sandbox_id)? {
            Some(record) => Ok(Some(record)),
            None => self.read(&self.pods, PODS, sandbox_id),
        }
    }

    /// Intent: an ADD or DEL is about to change the world for this pod.
    pub fn begin(&self, record: &PodRecord) -> Result<(), NetworkError> {
        self.in_flight
            .put(record.sandbox_id.as_bytes(), &encode(record)?)
            .map_err(about(&record.sandbox_id))
    }

    /// Done: the record moves from the intents to the finished records. Written
    /// before the intent is dropped, so a crash in between leaves both, which
    /// `first_in_flight` reports. Also how a repair that failed is parked (as
    /// Removing): start-up moves on and a later TearDownPod finishes it.
    pub fn settle(&self, record: &PodRecord) -> Result<(), NetworkError> {
        self.pods
            .put(record.sandbox_id.as_bytes(), &encode(record)?)
            .map_err(about(&record.sandbox_id))?;
        self.drop_intent(&record.sandbox_id)
    }

    /// Intent to remove: recorded as in flight before the ready record goes.
    pub fn begin_removal(&self, record: &PodRecord) -> Result<(), NetworkError> {
        self.begin(record)?;
        self.pods
            .delete(record.sandbox_id.as_bytes())
            .map_err(about(&record.sandbox_id))
    }

    /// Done: nothing is left of the pod's network. Only the intent is left to drop:
    /// `begin_removal` already removed the finished record.
    pub fn forget(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        self.drop_intent(sandbox_id)
    }

    /// Drops an intent whose operation is known to have completed.
    pub fn drop_intent(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        self.in_flight
            .delete(sandbox_id.as_bytes())
            .map_err(about(sandbox_id))
    }

    /// The unfinished operation with the smallest sandbox id, and whether the pod
    /// also has a finished record.
    pub fn first_in_flight(&self) -> Result<Option<(PodRecord, bool)>, NetworkError> {
        let Some((key, value)) = self.in_flight.first()? else {
            return Ok(None);
        };
        let sandbox_id = String::from_utf8_lossy(&key).into_owned();
        let record = match decode(&sandbox_id, IN_FLIGHT, &value) {
            Ok(record) => record,
            Err(error) => {
                // Nothing can be done with an unreadable intent but say so and drop it;
                // keeping it would stop every later start at the same place.
                tracing::error!(%error, "dropping an unreadable in-flight record");
                self.drop_intent(&sandbox_id)?;
                return self.first_in_flight();
            }
        };
        let finished = self.pods.get(&key).map_err(about(&sandbox_id))?.is_some();
        Ok(Some((record, finished)))
    }

    fn read(
        &self,
        table: &Arc<dyn Table>,
        name: &'static str,
        sandbox_id: &str,
    ) -> Result<Option<PodRecord>, NetworkError> {
        table
            .get(sandbox_id.as_bytes())
            .map_err(about(sandbox_id))?
            .map(|value| decode(sandbox_id, name, &value))
            .transpose()
    }
}

/// Store errors with the sandbox they were about.
fn about(sandbox_id: &str) -> impl FnOnce(StoreError) -> NetworkError + use<> {
    let sandbox_id = sandbox_id.to_string();
    move |source| NetworkError::PodStore { sandbox_id, source }
}

fn encode(record: &PodRecord) -> Result<Vec<u8>, NetworkError> {
    serde_json::to_vec(record).map_err(|source| NetworkError::Record {
        sandbox_id: record.sandbox_id.clone(),
        table: "any",
        source,
    })
}

fn decode(sandbox_id: &str, table: &'static str, value: &[u8]) -> Result<PodRecord, NetworkError> {
    serde_json::from_slice(value).map_err(|source| NetworkError::Record {
        sandbox_id: sandbox_id.to_string(),
        table,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_common::store::SledStore;

    fn record(id: &str, state: PodState) -> PodRecord {
        PodRecord {
            sandbox_id: id.into(),
            state,
            host_network: false,
            config_file: "/c".into(),
            network_name: "n".into(),
            attachment: None,
            result: None,
        }
    }

    #[test]
    fn intent_then_done_then_removal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("store");
        let records = Records::open(&store).expect("records");
        records
            .begin(&record("b", PodState::Adding))
            .expect("begin");
        records
            .begin(&record("a", PodState::Adding))
            .expect("begin");
        assert_eq!(
            records
                .first_in_flight()
                .expect("first")
                .map(|(r, done)| (r.sandbox_id, done)),
            Some(("a".into(), false))
        );
        records
            .settle(&record("a", PodState::Ready))
            .expect("commit");
        assert_eq!(
            records.get("a").expect("get").map(|r| r.state),
            Some(PodState::Ready)
        );
        assert_eq!(
            records
                .first_in_flight()
                .expect("first")
                .map(|(r, _)| r.sandbox_id),
            Some("b".into())
        );
        records
            .begin_removal(&record("a", PodState::Removing))
            .expect("removal");
        assert_eq!(
            records.get("a").expect("get").map(|r| r.state),
            Some(PodState::Removing)
        );
        records.forget("a").expect("forget");
        records
            .begin_removal(&record("b", PodState::Removing))
            .expect("removal");
        records.forget("b").expect("forget");
        assert_eq!(records.get("a").expect("get"), None);
        assert!(records.first_in_flight().expect("first").is_none());
    }
}
