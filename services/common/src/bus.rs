//! Publishing events on NATS JetStream through a durable outbox.
//!
//! `publish` never waits for the bus and never fails because of it: the event is
//! written (and flushed) to the service's outbox table first, and one delivery task
//! sends outbox entries in key order, deleting each only after JetStream has
//! acknowledged it. A message sent twice (the ack was lost) carries the same
//! `Nats-Msg-Id`, so the stream keeps one copy. The outbox is bounded: past
//! `bus.outbox_max_events` the oldest event is dropped, counted and logged.

mod connect;
pub mod permissions;
pub mod server_config;
mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use tokio::sync::Notify;
use trellis_proto::events::v1::{Event, event::Payload};

use crate::config::BusConfig;
use crate::store::{Store, StoreError, Table};
use crate::telemetry::current_trace_headers;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid bus URL {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot load the bus credentials {path} ({key}): {source}")]
    Credentials {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a nats-server configuration: {0}")]
    ServerConfig(String),
    #[error("event outbox: {0}")]
    Outbox(#[from] StoreError),
    #[error("event outbox entry {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Subjects all Trellis events live under, for the JetStream stream.
pub const EVENTS_SUBJECT_FILTER: &str = "trellis.*.events.>";
/// Headers naming the node and service that raised an event, so that a consumer of a
/// fleet's stream tells nodes apart without decoding the payload (which says it too)
/// or parsing the subject.
pub const NODE_HEADER: &str = "Trellis-Node";
pub const SERVICE_HEADER: &str = "Trellis-Service";
const OUTBOX_TABLE: &str = "event-outbox";

#[derive(Clone, PartialEq, prost::Message)]
struct OutboxRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    subject: String,
    #[prost(map = "string, string", tag = "3")]
    headers: HashMap<String, String>,
    #[prost(bytes = "vec", tag = "4")]
    payload: Vec<u8>,
}

#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    service: &'static str,
    url: String,
    client: Option<async_nats::Client>,
    store: Option<Arc<dyn Store>>,
    outbox: Option<Arc<dyn Table>>,
    // Id allocation and the outbox write happen under this lock so that key order is
    // the order in which events were raised.
    enqueue: std::sync::Mutex<()>,
    wake: Notify,
    drained: Notify,
    config: BusConfig,
    published: AtomicU64,
    dropped: AtomicU64,
}

/// What `trellis status` and the metrics show of the bus.
#[derive(Debug, Clone, Default)]
pub struct BusStatus {
    pub url: String,
    pub connected: bool,
    pub pending: u64,
    pub published: u64,
    pub dropped: u64,
}

impl EventBus {
    /// Connects in the background (the call returns at once, even with the bus down)
    /// and starts delivering what the outbox holds, including events left by an
    /// earlier run. Without a store the bus only reports status: nothing is published.
    pub async fn start(
        config: &BusConfig,
        node: String,
        service: &'static str,
        store: Option<Arc<dyn Store>>,
    ) -> Result<Self, BusError> {
        let client = if config.url.is_empty() {
            None
        } else {
            Some(connect::connect(config, &node, service).await?)
        };
        let outbox = store
            .as_ref()
            .map(|store| store.table(OUTBOX_TABLE))
            .transpose()?;
        let bus = Self {
            inner: Arc::new(Inner {
                node,
                service,
                url: config.url.clone(),
                client,
                store,
                outbox,
                enqueue: std::sync::Mutex::new(()),
                wake: Notify::new(),
                drained: Notify::new(),
                config: config.clone(),
                published: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        };
        if bus.inner.client.is_some() && bus.inner.outbox.is_some() {
            tokio::spawn(deliver(bus.inner.clone()));
        }
        Ok(bus)
    }

    /// Records an event for delivery and returns its id.
    pub fn publish(&self, payload: Payload) -> Result<String, BusError> {
        let inner = &self.inner;
        let (Some(store), Some(outbox)) = (&inner.store, &inner.outbox) else {
            return Ok(String::new());
        };
        let subject = event_subject(&inner.node, &payload);
        // Written to the outbox and flushed before the call goes on: a step of its own,
        // whose context the event carries to its consumers.
        let _step =
            crate::step_span!("event.publish", messaging.destination.name = %subject).entered();
        let time = crate::clock::now_nanos();
        let mut headers = current_trace_headers();
        headers.insert(NODE_HEADER.to_string(), inner.node.clone());
        headers.insert(SERVICE_HEADER.to_string(), inner.service.to_string());
        let _order = inner
            .enqueue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sequence = store.next_id()?;
        let id = format!("{}-{}-{sequence}", inner.node, inner.service);
        let event = Event {
            id: id.clone(),
            node: inner.node.clone(),
            service: inner.service.to_string(),
            time_unix_nano: time,
            payload: Some(payload),
        };
        let record = OutboxRecord {
            id: id.clone(),
            subject,
            headers,
            payload: event.encode_to_vec(),
        };
        while outbox.len() as u64 >= inner.config.outbox_max_events {
            let Some((oldest, _)) = outbox.first()? else {
                break;
            };
            outbox.delete(&oldest)?;
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                limit = inner.config.outbox_max_events,
                "event outbox full: dropped the oldest undelivered event"
            );
        }
        outbox.put(&sequence.to_be_bytes(), &record.encode_to_vec())?;
        inner.wake.notify_one();
        Ok(id)
    }

    pub fn status(&self) -> BusStatus {
        let inner = &self.inner;
        BusStatus {
            url: inner.url.clone(),
            connected: inner
                .client
                .as_ref()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected),
            pending: inner
                .outbox
                .as_ref()
                .map_or(0, |outbox| outbox.len() as u64),
            published: inner.published.load(Ordering::Relaxed),
            dropped: inner.dropped.load(Ordering::Relaxed),
        }
    }

    /// The NATS client, for services that also subscribe.
    pub fn client(&self) -> Option<&async_nats::Client> {
        self.inner.client.as_ref()
    }

    /// Waits up to `timeout` for the outbox to empty (at shutdown). What is not
    /// delivered by then stays on disk for the next run.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let Some(outbox) = &self.inner.outbox else {
            return true;
        };
        if self.inner.client.is_none() {
            return outbox.is_empty();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let drained = self.inner.drained.notified();
            if outbox.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return outbox.is_empty();
            }
        }
    }
}

/// `trellis.<node>.events.<area>.<kind>`: the one subject an event may travel on.
pub fn event_subject(node: &str, payload: &Payload) -> String {
    let (area, kind) = subject_parts(payload);
    format!("trellis.{node}.events.{area}.{kind}")
}

/// Area from the payload type, kind from its enum.
fn subject_parts(payload: &Payload) -> (&'static str, String) {
    let (area, kind) = match payload {
        Payload::ServiceEvent(e) => ("service", e.kind().as_str_name()),
        Payload::Sandbox(e) => ("sandbox", e.kind().as_str_name()),
        Payload::Container(e) => ("container", e.kind().as_str_name()),
        Payload::Image(e) => ("image", e.kind().as_str_name()),
        Payload::Network(e) => ("network", e.kind().as_str_name()),
    };
    (area, kind.to_ascii_lowercase())
}

async fn deliver(inner: Arc<Inner>) {
    let (Some(client), Some(outbox)) = (inner.client.clone(), inner.outbox.clone()) else {
        return;
    };
    let jetstream = jetstream::new(client.clone());
    let mut stream_ready = false;
    let mut stream_warned = false;
    let mut failures: u32 = 0;
    loop {
        let woken = inner.wake.notified();
        let entry = match outbox.first() {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                inner.drained.notify_waiters();
                woken.await;
                continue;
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the event outbox");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let record = match OutboxRecord::decode(entry.1.as_slice()) {
            Ok(record) => record,
            Err(source) => {
                let error = BusError::Corrupt {
                    key: format!("{:02x?}", entry.0),
                    source,
                };
                tracing::error!(%error, "discarding an undecodable outbox entry");
                let _ = outbox.delete(&entry.0);
                continue;
            }
        };
        if client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let result = async {
            if !stream_ready {
                stream::ensure(&jetstream, &inner.config, &mut stream_warned).await?;
                stream_ready = true;
            }
            send(&jetstream, &record, &inner.config).await
        }
        .await;
        match result {
            Ok(()) => {
                failures = 0;
                inner.published.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = outbox.delete(&entry.0) {
                    tracing::error!(%error, "cannot remove a delivered event from the outbox; it will be sent again and deduplicated");
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(%error, failures, "event delivery failed; retrying");
                }
                stream_ready = false;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20)))).await;
            }
        }
    }
}

async fn send(
    jetstream: &jetstream::Context,
    record: &OutboxRecord,
    config: &BusConfig,
) -> Result<(), String> {
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &record.headers {
        headers.insert(name.as_str(), value.as_str());
    }
    let publish = jetstream::message::PublishMessage::build()
        .payload(record.payload.clone().into())
        .headers(headers)
        .message_id(record.id.as_str());
    let timeout = Duration::from_millis(config.publish_timeout_ms);
    let ack = tokio::time::timeout(timeout, async {
        let ack = jetstream
            .send_publish(record.subject.clone(), publish)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no acknowledgement within {timeout:?}"))??;
    if ack.duplicate {
        tracing::debug!(id = %record.id, "bus already had this event");
    }
    Ok(())
}
