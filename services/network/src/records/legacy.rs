//! Pod records as releases before protobuf stored them: whole records as JSON. They are
//! rewritten as protobuf when the tables are opened, so that a node upgraded with pods
//! running keeps their networks: their addresses, and what DEL must tell the plugins.
//!
//! The shapes below are those releases' serde derives, frozen: they describe bytes
//! already on disk, and change with nothing else.

use std::path::PathBuf;

use prost::Message;
use serde::Deserialize;
use serde_json::{Map, Value};
use trellis_common::store::Store;
use trellis_common::text::excerpt;

use super::{PodRecord, PodState, StoredPod};
use crate::cni::Attachment;
use crate::error::NetworkError;

#[derive(Deserialize)]
struct JsonPod {
    sandbox_id: String,
    state: JsonState,
    host_network: bool,
    config_file: PathBuf,
    network_name: String,
    attachment: Option<JsonAttachment>,
    result: Option<Value>,
}

#[derive(Deserialize)]
enum JsonState {
    Adding,
    Ready,
    Removing,
}

#[derive(Deserialize)]
struct JsonAttachment {
    sandbox_id: String,
    netns: PathBuf,
    args: String,
    network: Value,
    runtime_config: Map<String, Value>,
}

impl From<JsonPod> for PodRecord {
    fn from(old: JsonPod) -> Self {
        PodRecord {
            sandbox_id: old.sandbox_id,
            state: match old.state {
                JsonState::Adding => PodState::Adding,
                JsonState::Ready => PodState::Ready,
                JsonState::Removing => PodState::Removing,
            },
            host_network: old.host_network,
            config_file: old.config_file,
            network_name: old.network_name,
            attachment: old.attachment.map(|a| Attachment {
                sandbox_id: a.sandbox_id,
                netns: a.netns,
                args: a.args,
                network: a.network,
                runtime_config: a.runtime_config,
            }),
            result: old.result,
        }
    }
}

/// Rewrites the JSON records of `table` as protobuf; how many it rewrote. A JSON record
/// starts with `{` (0x7b); a stored protobuf record never does: its first byte is the
/// key of its first field set, and 0x7b would be field 15 as a group, which
/// `StoredPod` does not have.
pub(super) fn rewrite_json_records(store: &dyn Store, table: &str) -> Result<usize, NetworkError> {
    let raw = store.table(table)?;
    let mut rewritten = 0;
    for (key, value) in raw.scan()? {
        if value.first() != Some(&b'{') {
            continue;
        }
        match serde_json::from_slice::<JsonPod>(&value) {
            Ok(old) => {
                let stored = StoredPod::from(&PodRecord::from(old));
                raw.put(&key, &stored.encode_to_vec())?;
                rewritten += 1;
            }
            // Left as it is, for an operator to look at; reading it fails, as it did.
            Err(error) => tracing::error!(
                table,
                sandbox_id = %excerpt(&String::from_utf8_lossy(&key)),
                %error,
                "a pod record of an earlier release is unreadable"
            ),
        }
    }
    Ok(rewritten)
}
