//! The event bus: events raised while NATS is down are delivered, in order, once.

use std::time::{Duration, Instant};

use trellis_integration::nats::{NatsServer, StoredEvent, read_events};
use trellis_integration::{Node, NodeOptions, kill9};
use trellis_proto::events::v1::{Event, event::Payload, service_event};

async fn wait_for_bus(node: &Node, connected: bool, empty_outbox: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bus = node.info("runtime").await.ok().and_then(|i| i.bus);
        if bus
            .as_ref()
            .is_some_and(|b| b.connected == connected && (!empty_outbox || b.outbox_pending == 0))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bus never reached connected={connected}: {bus:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_raised_while_the_bus_is_down_arrive_in_order_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsServer::start(dir.path());
    let node = Node::start(NodeOptions {
        bus_url: Some(nats.url()),
        ..Default::default()
    })
    .await;
    wait_for_bus(&node, true, true).await;
    let mut pids = vec![node.info("runtime").await.expect("info").pid];

    nats.stop();
    wait_for_bus(&node, false, false).await;
    // Each restart of the runtime raises a "started" event the bus cannot take now.
    for _ in 0..3 {
        let old = *pids.last().expect("pid");
        kill9(old);
        pids.push(
            node.wait_restarted("runtime", old, Duration::from_secs(10))
                .await,
        );
    }
    let held = node
        .info("runtime")
        .await
        .expect("info")
        .bus
        .expect("bus")
        .outbox_pending;
    assert!(
        held >= 3,
        "the outbox holds the events raised during the outage (it holds {held})"
    );

    nats.restart();
    wait_for_bus(&node, true, true).await;

    let filter = format!("trellis.{}.events.service.>", node.node_name);
    let runtime_count = |events: &[StoredEvent]| {
        events
            .iter()
            .filter(|e| e.event.service == "runtime")
            .count()
    };
    let stored = read_events(&nats.url(), &filter, Duration::from_secs(20), |events| {
        runtime_count(events) >= pids.len()
    })
    .await;
    for stored in &stored {
        assert_eq!(
            stored.message_id.as_deref(),
            Some(stored.event.id.as_str()),
            "JetStream de-duplicates by event id"
        );
    }
    let runtime_events: Vec<&Event> = stored
        .iter()
        .map(|s| &s.event)
        .filter(|e| e.service == "runtime")
        .collect();

    let ids: Vec<&str> = runtime_events.iter().map(|e| e.id.as_str()).collect();
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice: {ids:?}");
    let sequences: Vec<u64> = ids
        .iter()
        .map(|id| {
            id.rsplit('-')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("sequence in id")
        })
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "in the order raised: {ids:?}"
    );
    let started: Vec<u32> = runtime_events
        .iter()
        .map(|e| match &e.payload {
            Some(Payload::ServiceEvent(s)) if s.kind() == service_event::Kind::Started => s.pid,
            other => panic!("unexpected runtime event {other:?}"),
        })
        .collect();
    assert_eq!(started, pids, "one 'started' per runtime process, in order");
    node.stop();
}
