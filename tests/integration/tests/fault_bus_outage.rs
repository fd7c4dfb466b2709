//! The bus down for 30 s under pod churn: no CRI call fails, and once NATS is back
//! the events stream holds each pod's events exactly once, in order. (The other
//! dependency faults are in `fault_dependencies.rs`; this one is long, so it is a
//! file, and a test binary, of its own that runs beside them.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use trellis_integration::nats::{
    NatsServer, assert_pod_life, histories, read_events, stream_len, wait_for_bus,
};
use trellis_integration::pods::pod_cycle as cycle;
use trellis_integration::{Node, NodeOptions};

const OUTAGE: Duration = Duration::from_secs(30);

/// Pod `n`'s whole life; every call must succeed, the bus up or down.
async fn pod_cycle(node: &Node, n: usize) -> String {
    cycle(node, &format!("churn-{n}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_30_s_bus_outage_under_pod_churn_fails_no_call_and_loses_no_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsServer::start(dir.path());
    let node = Node::start(NodeOptions {
        bus_url: Some(nats.url()),
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    wait_for_bus(&node, true, true).await;

    // Two pods before, the most the outage allows during, two after.
    let mut pods = vec![pod_cycle(&node, 0).await, pod_cycle(&node, 1).await];
    nats.stop();
    wait_for_bus(&node, false, false).await;
    let outage = Instant::now();
    while outage.elapsed() < OUTAGE {
        pods.push(pod_cycle(&node, pods.len()).await);
    }
    let during = pods.len() - 2;
    nats.restart();
    pods.push(pod_cycle(&node, pods.len()).await);
    pods.push(pod_cycle(&node, pods.len()).await);
    wait_for_bus(&node, true, true).await;
    assert!(during >= 10, "only {during} pods during the outage");
    eprintln!(
        "{during} pods run, stopped and removed during the {OUTAGE:?} outage, {} in all",
        pods.len()
    );

    let total = stream_len(&nats.url()).await;
    let filter = format!("trellis.{}.events.>", node.node_name);
    let stored = read_events(&nats.url(), &filter, Duration::from_secs(30), |events| {
        events.len() as u64 >= total
    })
    .await;
    let ids: Vec<&str> = stored.iter().map(|s| s.event.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice");

    let histories = histories(&stored);
    assert_eq!(
        histories.0.len(),
        pods.len(),
        "a sandbox's events for every pod"
    );
    for id in &pods {
        assert_pod_life(&histories, id);
    }
    node.stop();
}
