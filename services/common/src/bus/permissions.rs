//! What each service may do on the bus.
//!
//! A local user who can reach the bus must not be able to read or forge a node's
//! events (a forged "stopped" reaches the kubelet through GetContainerEvents). So
//! each service is a NATS user of its own, allowed to publish only the events it
//! raises, on its own node's subjects, plus the two JetStream API requests its outbox
//! delivery makes, and to hear only the replies sent to its own inbox. Only the
//! gateway subscribes to events, and only to its node's. `trellis up` writes these
//! permissions into its private bus's configuration; deploy/nats/ shows them for an
//! external bus.

use crate::config::ServiceKind;

/// Subjects a NATS user may publish and subscribe to. An empty list allows nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The event areas (`trellis.<node>.events.<area>.<kind>`) a service raises.
pub fn areas(kind: ServiceKind) -> &'static [&'static str] {
    match kind {
        ServiceKind::Storage => &["service"],
        ServiceKind::Network => &["service", "network"],
        ServiceKind::Image => &["service", "image"],
        ServiceKind::Runtime => &["service", "sandbox", "container"],
        // The gateway keeps no records, so has no outbox and raises nothing.
        ServiceKind::Gateway => &[],
    }
}

/// Where a service's replies (JetStream acknowledgements and API answers) arrive.
pub fn inbox_prefix(node: &str, service: &str) -> String {
    format!("_INBOX.{node}.{service}")
}

/// The permissions of `kind`'s user on node `node`, events kept in stream `stream`.
pub fn for_service(kind: ServiceKind, node: &str, stream: &str) -> Permissions {
    let mut publish: Vec<String> = areas(kind)
        .iter()
        .map(|area| format!("trellis.{node}.events.{area}.*"))
        .collect();
    let mut subscribe = Vec::new();
    if !publish.is_empty() {
        // `get_or_create_stream`: STREAM.INFO, then STREAM.CREATE when it is missing.
        publish.extend([
            format!("$JS.API.STREAM.INFO.{stream}"),
            format!("$JS.API.STREAM.CREATE.{stream}"),
        ]);
        subscribe.push(format!("{}.>", inbox_prefix(node, kind.name())));
    }
    if kind == ServiceKind::Gateway {
        subscribe.push(format!("trellis.{node}.events.>"));
    }
    Permissions { publish, subscribe }
}

/// An operator's consumer of a fleet's events (deploy/nats/cluster.md): it may make,
/// read and acknowledge JetStream consumers of stream `stream` (durable or not), and
/// hears replies on inbox prefix `inbox` only. It publishes no event and subscribes
/// to none directly, so it can neither forge events nor see other clients' replies.
pub fn for_consumer(stream: &str, inbox: &str) -> Permissions {
    Permissions {
        publish: vec![
            "$JS.API.INFO".into(),
            format!("$JS.API.STREAM.INFO.{stream}"),
            // CREATE, INFO, DELETE, NAMES, LIST of the stream's consumers.
            format!("$JS.API.CONSUMER.*.{stream}"),
            format!("$JS.API.CONSUMER.*.{stream}.>"),
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>"),
            format!("$JS.ACK.{stream}.>"),
        ],
        subscribe: vec![format!("{inbox}.>")],
    }
}

#[cfg(test)]
mod tests {
    use trellis_proto::events::v1::event::Payload;
    use trellis_proto::events::v1::*;

    use super::*;

    #[test]
    fn every_event_is_published_by_exactly_the_services_allowed_to() {
        let payloads = [
            Payload::ServiceEvent(ServiceEvent::default()),
            Payload::Sandbox(SandboxEvent::default()),
            Payload::Container(ContainerEvent::default()),
            Payload::Image(ImageEvent::default()),
            Payload::Network(NetworkEvent::default()),
        ];
        for payload in payloads {
            let subject = crate::bus::event_subject("n1", &payload);
            let area = subject.split('.').nth(3).expect("area token");
            assert!(
                ServiceKind::START_ORDER
                    .iter()
                    .any(|kind| areas(*kind).contains(&area)),
                "nobody may publish {subject}"
            );
        }
        let runtime = for_service(ServiceKind::Runtime, "n1", "S");
        assert!(
            runtime
                .publish
                .contains(&"trellis.n1.events.container.*".to_string())
        );
        assert!(
            !for_service(ServiceKind::Storage, "n1", "S")
                .publish
                .iter()
                .any(|s| s.contains("container")),
            "storage cannot forge container events"
        );
    }

    #[test]
    fn only_the_gateway_subscribes_to_events_and_it_publishes_nothing() {
        let gateway = for_service(ServiceKind::Gateway, "n1", "S");
        assert_eq!(
            gateway,
            Permissions {
                publish: vec![],
                subscribe: vec!["trellis.n1.events.>".into()]
            }
        );
        let image = for_service(ServiceKind::Image, "n1", "S");
        assert_eq!(image.subscribe, vec!["_INBOX.n1.image.>".to_string()]);
        assert!(
            image
                .publish
                .contains(&"$JS.API.STREAM.CREATE.S".to_string())
        );
        assert!(
            image
                .publish
                .iter()
                .all(|s| s.starts_with("trellis.n1.events.") || s.starts_with("$JS.API.STREAM.")),
            "{image:?}"
        );
    }
}
