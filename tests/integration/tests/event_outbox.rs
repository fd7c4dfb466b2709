//! The event outbox under load: many events across a bus outage, and its bound.

use std::sync::Arc;
use std::time::Duration;

use trellis_common::bus::EventBus;
use trellis_common::config::BusConfig;
use trellis_common::store::{SledStore, Store};
use trellis_integration::nats::{NatsServer, read_events, stream_len};
use trellis_proto::events::v1::{ContainerEvent, container_event, event::Payload};

fn container_event(n: i32) -> Payload {
    Payload::Container(ContainerEvent {
        kind: container_event::Kind::Started.into(),
        container_id: format!("c{n}"),
        exit_code: n,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_events_raised_before_the_bus_exists_arrive_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsServer::start(dir.path());
    let url = nats.url();
    nats.stop();

    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).expect("store"));
    let config = BusConfig {
        url: url.clone(),
        ..Default::default()
    };
    let bus = EventBus::start(&config, "outbox".into(), "runtime", Some(store))
        .await
        .expect("bus");
    for n in 0..500 {
        bus.publish(container_event(n))
            .expect("publish while the bus is down");
    }
    assert_eq!(bus.status().pending, 500);
    assert!(!bus.status().connected);

    nats.restart();
    assert!(
        bus.drain(Duration::from_secs(30)).await,
        "outbox drained once the bus is back: {:?}",
        bus.status()
    );

    let stored = read_events(
        &url,
        "trellis.outbox.events.container.started",
        Duration::from_secs(20),
        |events| events.len() >= 500,
    )
    .await;
    let seen: Vec<i32> = stored
        .iter()
        .map(|stored| match &stored.event.payload {
            Some(Payload::Container(event)) => event.exit_code,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        seen,
        (0..500).collect::<Vec<_>>(),
        "every event, in order, once"
    );
    assert_eq!(stream_len(&url).await, 500, "no duplicates in the stream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_drops_the_oldest_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).expect("store"));
    // Nothing listens on this port: the bus stays down for the whole test.
    let config = BusConfig {
        url: format!("nats://127.0.0.1:{}", trellis_integration::free_port()),
        outbox_max_events: 10,
        ..Default::default()
    };
    let bus = EventBus::start(&config, "bounded".into(), "image", Some(store.clone()))
        .await
        .expect("bus");
    for n in 0..25 {
        bus.publish(container_event(n)).expect("publish");
    }
    let status = bus.status();
    assert_eq!((status.pending, status.dropped), (10, 15));
    drop(bus);

    // The survivors are the newest ten, and they survive a restart of the service.
    let outbox = store.table("event-outbox").expect("outbox");
    assert_eq!(outbox.len(), 10);
}
