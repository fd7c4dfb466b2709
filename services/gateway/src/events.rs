//! GetContainerEvents: container and pod events from the bus, from the moment of
//! subscription, each with its pod's status and the pod's containers' statuses (what
//! the kubelet's evented PLEG reads), to every subscriber.

use std::pin::Pin;
use std::sync::Arc;
use tracing::Instrument;

use futures::StreamExt;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use trellis_common::text::excerpt;
use trellis_proto::events::v1::{Event, container_event, event::Payload, sandbox_event};

use crate::backend::{Backends, Retry};

pub type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

/// Events are handed to a slow subscriber through this many slots before the
/// subscriber falls behind and its stream is ended (it resubscribes and relists).
const SUBSCRIBER_BUFFER: usize = 1024;

/// The CRI event an event from the bus becomes: (container or pod id, its pod, type).
fn translate(event: &Event) -> Option<(String, String, ContainerEventType)> {
    match event.payload.as_ref()? {
        Payload::Container(c) => {
            let kind = match c.kind() {
                container_event::Kind::Created => ContainerEventType::ContainerCreatedEvent,
                container_event::Kind::Started => ContainerEventType::ContainerStartedEvent,
                container_event::Kind::Stopped => ContainerEventType::ContainerStoppedEvent,
                container_event::Kind::Deleted => ContainerEventType::ContainerDeletedEvent,
                container_event::Kind::Unspecified => return None,
            };
            Some((c.container_id.clone(), c.sandbox_id.clone(), kind))
        }
        Payload::Sandbox(s) => {
            let kind = match s.kind() {
                sandbox_event::Kind::Created => ContainerEventType::ContainerCreatedEvent,
                sandbox_event::Kind::Started => ContainerEventType::ContainerStartedEvent,
                sandbox_event::Kind::Stopped => ContainerEventType::ContainerStoppedEvent,
                sandbox_event::Kind::Deleted => ContainerEventType::ContainerDeletedEvent,
                sandbox_event::Kind::Unspecified => return None,
            };
            Some((s.sandbox_id.clone(), s.sandbox_id.clone(), kind))
        }
        _ => None,
    }
}

/// Whether an event is this node's and came on the one subject its kind travels on.
/// The bus's permissions already keep other nodes' and other services' users off
/// these subjects; this is the second line, for a bus configured too loosely.
fn is_own(event: &Event, subject: &str, node: &str) -> bool {
    let Some(payload) = event.payload.as_ref() else {
        return false;
    };
    let expected = trellis_common::bus::event_subject(node, payload);
    if event.node == node && subject == expected {
        return true;
    }
    tracing::warn!(subject = %excerpt(subject), event_node = %excerpt(&event.node), %expected, "dropping an event that is not this node's or came on another kind's subject");
    false
}

/// The pod's status and its containers' at the time of the event (none once gone).
async fn statuses(
    backends: &Backends,
    sandbox_id: &str,
) -> (Option<PodSandboxStatus>, Vec<ContainerStatus>) {
    let pod = backends
        .call(
            &backends.runtime,
            Retry::Idempotent,
            None,
            PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                verbose: false,
            },
            |channel, request| async move {
                RuntimeServiceClient::new(channel)
                    .pod_sandbox_status(request)
                    .await
            },
        )
        .await
        .ok()
        .and_then(|r| r.into_inner().status);
    let filter = ContainerFilter {
        pod_sandbox_id: sandbox_id.to_string(),
        ..Default::default()
    };
    let containers = backends
        .call(
            &backends.runtime,
            Retry::Idempotent,
            None,
            ListContainersRequest {
                filter: Some(filter),
            },
            |channel, request| async move {
                RuntimeServiceClient::new(channel)
                    .list_containers(request)
                    .await
            },
        )
        .await
        .map(|r| r.into_inner().containers)
        .unwrap_or_default();
    let mut container_statuses = Vec::new();
    for container in containers {
        let request = ContainerStatusRequest {
            container_id: container.id,
            verbose: false,
        };
        if let Ok(status) = backends
            .call(
                &backends.runtime,
                Retry::Idempotent,
                None,
                request,
                |channel, request| async move {
                    RuntimeServiceClient::new(channel)
                        .container_status(request)
                        .await
                },
            )
            .await
            && let Some(status) = status.into_inner().status
        {
            container_statuses.push(status);
        }
    }
    (pod, container_statuses)
}

/// Subscribes now, and streams what follows.
/// The stream ends when the gateway begins to stop, with UNAVAILABLE: the subscriber
/// comes back (to the next gateway process, waiting in the socket's backlog) rather
/// than holding this one open through its drain.
pub async fn subscribe(
    backends: Arc<Backends>,
    bus: Option<async_nats::Client>,
    node: &str,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<EventStream, Status> {
    let bus = bus.ok_or_else(|| {
        Status::unavailable(
            "GetContainerEvents needs the event bus, and none is configured (bus.url)",
        )
    })?;
    let mut subscription = bus
        .subscribe(format!("trellis.{node}.events.>"))
        .await
        .map_err(|e| Status::unavailable(format!("cannot subscribe to the event bus: {e}")))?;
    // SUB is sent asynchronously; the PING/PONG of a flush proves the server has it,
    // so no event raised after this call returns can miss the subscriber.
    bus.flush()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the event bus: {e}")))?;
    // Delivery through the services' outboxes lags a little: an event raised before
    // this moment may still arrive after it, and is not this subscriber's.
    let subscribed_at = trellis_common::clock::now_nanos();
    let node = node.to_string();
    let (events, receiver) = mpsc::channel(SUBSCRIBER_BUFFER);
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = subscription.next() => message,
                _ = stopping.wait_for(|stopping| *stopping) => {
                    let _ = events.try_send(Err(Status::unavailable(
                        "the gateway is restarting: subscribe again (and relist)",
                    )));
                    break;
                }
            };
            let Some(message) = message else {
                break;
            };
            let Ok(event) = Event::decode(message.payload) else {
                continue;
            };
            if !is_own(&event, message.subject.as_str(), &node) {
                continue;
            }
            if event.time_unix_nano < subscribed_at {
                continue;
            }
            let Some((id, sandbox_id, kind)) = translate(&event) else {
                continue;
            };
            // Its own trace (the subscription outlives many), linked to the call
            // that raised the event, whose context the message carries.
            let delivery = trellis_common::step_span!(
                "event.deliver",
                otel.kind = "consumer",
                messaging.destination.name = %message.subject,
                container.id = %id
            );
            if let Some(headers) = &message.headers {
                trellis_common::telemetry::link_to_headers(
                    &delivery,
                    ["traceparent", "tracestate"]
                        .into_iter()
                        .filter_map(|key| headers.get(key).map(|value| (key, value.as_str()))),
                );
            }
            let (pod_sandbox_status, containers_statuses) =
                statuses(&backends, &sandbox_id).instrument(delivery).await;
            let response = ContainerEventResponse {
                container_id: id,
                container_event_type: kind as i32,
                created_at: event.time_unix_nano,
                pod_sandbox_status,
                containers_statuses,
            };
            if events.try_send(Ok(response)).is_err() {
                tracing::warn!(
                    "a GetContainerEvents subscriber fell behind or left; ending its stream"
                );
                break;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        receiver,
    )))
}

#[cfg(test)]
mod tests {
    use trellis_proto::events::v1::ContainerEvent;

    use super::*;

    fn stopped(node: &str) -> Event {
        let payload = Payload::Container(ContainerEvent {
            kind: container_event::Kind::Stopped.into(),
            container_id: "c1".into(),
            ..Default::default()
        });
        Event {
            id: "x".into(),
            node: node.into(),
            service: "runtime".into(),
            time_unix_nano: 1,
            payload: Some(payload),
        }
    }

    #[test]
    fn only_this_nodes_events_on_their_own_subject_pass() {
        assert!(is_own(
            &stopped("n1"),
            "trellis.n1.events.container.stopped",
            "n1"
        ));
        assert!(
            !is_own(&stopped("n2"), "trellis.n1.events.container.stopped", "n1"),
            "another node's event"
        );
        assert!(
            !is_own(&stopped("n1"), "trellis.n2.events.container.stopped", "n1"),
            "another node's subject"
        );
        assert!(
            !is_own(&stopped("n1"), "trellis.n1.events.service.started", "n1"),
            "a container event on the service subject"
        );
        assert!(
            !is_own(&stopped("n1"), "trellis.n1.events.container.started", "n1"),
            "kind and subject disagree"
        );
        assert!(!is_own(
            &Event {
                payload: None,
                ..stopped("n1")
            },
            "trellis.n1.events.container.stopped",
            "n1"
        ));
    }
}
