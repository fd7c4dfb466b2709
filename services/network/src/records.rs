//! The service's records of pod networks, in two tables of its sled store: `pods`
//! holds pods that are set up; `in_flight` holds the intent of an ADD or a DEL that
//! has not finished. A pod is in `in_flight` from before its first world-changing step
//! until after its last, so whatever a crash interrupts is found there on start.
//!
//! Records are stored as protobuf (`StoredPod`), as every Trellis service stores its
//! records; the CNI documents in them (the configuration list, the runtime config, the
//! ADD result) stay JSON text, the form the plugins read and write. Releases before
//! stored whole records as JSON: `legacy` rewrites those when the tables are opened.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde_json::Value;
use trellis_common::store::{Store, StoreError};

use crate::cni::Attachment;
use crate::error::NetworkError;

mod legacy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum PodState {
    Adding = 0,
    Ready = 1,
    Removing = 2,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PodRecord {
    pub sandbox_id: String,
    pub state: PodState,
    pub host_network: bool,
    pub config_file: PathBuf,
    pub network_name: String,
    /// What the plugins are told; none for a host-network pod.
    pub attachment: Option<Attachment>,
    /// The ADD chain's result, once there is one.
    pub result: Option<Value>,
}

/// A `PodRecord` as stored. Paths are bytes: a path need not be UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredPod {
    #[prost(string, tag = "1")]
    pub sandbox_id: String,
    #[prost(enumeration = "PodState", tag = "2")]
    pub state: i32,
    #[prost(bool, tag = "3")]
    pub host_network: bool,
    #[prost(bytes = "vec", tag = "4")]
    pub config_file: Vec<u8>,
    #[prost(string, tag = "5")]
    pub network_name: String,
    #[prost(message, optional, tag = "6")]
    pub attachment: Option<StoredAttachment>,
    /// JSON.
    #[prost(string, optional, tag = "7")]
    pub result: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredAttachment {
    #[prost(string, tag = "1")]
    pub sandbox_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub netns: Vec<u8>,
    #[prost(string, tag = "3")]
    pub args: String,
    /// JSON: the configuration list.
    #[prost(string, tag = "4")]
    pub network: String,
    /// JSON: an object.
    #[prost(string, tag = "5")]
    pub runtime_config: String,
}

impl From<&PodRecord> for StoredPod {
    fn from(record: &PodRecord) -> Self {
        Self {
            sandbox_id: record.sandbox_id.clone(),
            state: record.state as i32,
            host_network: record.host_network,
            config_file: record.config_file.as_os_str().as_bytes().to_vec(),
            network_name: record.network_name.clone(),
            attachment: record.attachment.as_ref().map(|a| StoredAttachment {
                sandbox_id: a.sandbox_id.clone(),
                netns: a.netns.as_os_str().as_bytes().to_vec(),
                args: a.args.clone(),
                network: a.network.to_string(),
                runtime_config: Value::Object(a.runtime_config.clone()).to_string(),
            }),
            result: record.result.as_ref().map(Value::to_string),
        }
    }
}

impl StoredPod {
    fn into_record(self, table: &'static str) -> Result<PodRecord, NetworkError> {
        let unreadable = |problem: String| NetworkError::Record {
            sandbox_id: trellis_common::text::excerpt(&self.sandbox_id),
            table,
            problem,
        };
        let json = |what: &str, text: &str| {
            serde_json::from_str::<Value>(text)
                .map_err(|e| unreadable(format!("its {what} is not JSON: {e}")))
        };
        let state = PodState::try_from(self.state)
            .map_err(|_| unreadable(format!("unknown state {}", self.state)))?;
        let attachment = match &self.attachment {
            None => None,
            Some(stored) => Some(Attachment {
                sandbox_id: stored.sandbox_id.clone(),
                netns: path(&stored.netns),
                args: stored.args.clone(),
                network: json("network configuration", &stored.network)?,
                runtime_config: match json("runtime config", &stored.runtime_config)? {
                    Value::Object(map) => map,
                    _ => return Err(unreadable("its runtime config is not an object".into())),
                },
            }),
        };
        let result = match &self.result {
            Some(text) => Some(json("CNI result", text)?),
            None => None,
        };
        Ok(PodRecord {
            state,
            host_network: self.host_network,
            config_file: path(&self.config_file),
            network_name: self.network_name.clone(),
            attachment,
            result,
            sandbox_id: self.sandbox_id,
        })
    }
}

fn path(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(bytes))
}

type Table = trellis_common::store::Records<StoredPod, NetworkError>;

pub struct Records {
    pods: Table,
    in_flight: Table,
}

const PODS: &str = "pods";
const IN_FLIGHT: &str = "in_flight";

impl Records {
    pub fn open(store: &dyn Store) -> Result<Self, NetworkError> {
        for table in [PODS, IN_FLIGHT] {
            let rewritten = legacy::rewrite_json_records(store, table)?;
            if rewritten > 0 {
                tracing::info!(
                    table,
                    records = rewritten,
                    "pod records of an earlier release rewritten as protobuf"
                );
            }
        }
        Ok(Self {
            pods: Table::open(store, PODS)?,
            in_flight: Table::open(store, IN_FLIGHT)?,
        })
    }

    /// The newest record of a sandbox: an unfinished operation wins over a finished one.
    pub fn get(&self, sandbox_id: &str) -> Result<Option<PodRecord>, NetworkError> {
        if let Some(stored) = self.in_flight.get(sandbox_id)? {
            return stored.into_record(IN_FLIGHT).map(Some);
        }
        self.pods
            .get(sandbox_id)?
            .map(|stored| stored.into_record(PODS))
            .transpose()
    }

    /// Every finished record (a pod whose network is set up, or a repair parked).
    pub fn finished(&self) -> Result<Vec<PodRecord>, NetworkError> {
        self.pods
            .all()?
            .into_iter()
            .map(|stored| stored.into_record(PODS))
            .collect()
    }

    /// Intent: an ADD or DEL is about to change the world for this pod.
    pub fn begin(&self, record: &PodRecord) -> Result<(), NetworkError> {
        self.in_flight
            .put(&record.sandbox_id, &StoredPod::from(record))
    }

    /// Done: the record moves from the intents to the finished records. Written
    /// before the intent is dropped, so a crash in between leaves both, which
    /// `first_in_flight` reports. Also how a repair that failed is parked (as
    /// Removing): start-up moves on and a later TearDownPod finishes it.
    pub fn settle(&self, record: &PodRecord) -> Result<(), NetworkError> {
        self.pods
            .put(&record.sandbox_id, &StoredPod::from(record))?;
        self.drop_intent(&record.sandbox_id)
    }

    /// Intent to remove: recorded as in flight before the ready record goes.
    pub fn begin_removal(&self, record: &PodRecord) -> Result<(), NetworkError> {
        self.begin(record)?;
        self.pods.delete(&record.sandbox_id)
    }

    /// Done: nothing is left of the pod's network. Only the intent is left to drop:
    /// `begin_removal` already removed the finished record.
    pub fn forget(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        self.drop_intent(sandbox_id)
    }

    /// Drops an intent whose operation is known to have completed.
    pub fn drop_intent(&self, sandbox_id: &str) -> Result<(), NetworkError> {
        self.in_flight.delete(sandbox_id)
    }

    /// The unfinished operation with the smallest sandbox id, and whether the pod
    /// also has a finished record.
    pub fn first_in_flight(&self) -> Result<Option<(PodRecord, bool)>, NetworkError> {
        while let Some(sandbox_id) = self.in_flight.first_key()? {
            let record = match self.in_flight.get(&sandbox_id) {
                Ok(Some(stored)) => stored.into_record(IN_FLIGHT),
                // Taken away between the two reads: look again.
                Ok(None) => continue,
                Err(NetworkError::Store(error @ StoreError::Decode { .. })) => {
                    Err(NetworkError::Store(error))
                }
                Err(error) => return Err(error),
            };
            match record {
                Ok(record) => {
                    let finished = self.pods.contains(&sandbox_id)?;
                    return Ok(Some((record, finished)));
                }
                Err(error) => {
                    // Nothing can be done with an unreadable intent but say so and drop
                    // it; keeping it would stop every later start at the same place.
                    tracing::error!(%error, "dropping an unreadable in-flight record");
                    self.drop_intent(&sandbox_id)?;
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
