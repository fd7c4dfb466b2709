//! The bus down for 30 s under pod churn: no CRI call fails, and once NATS is back
//! the events stream holds each pod's events exactly once, in order. (The other
//! dependency faults are in `fault_dependencies.rs`; this one is long, so it is a
//! file, and a test binary, of its own that runs beside them.)

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use trellis_integration::cri::pod_config;
use trellis_integration::nats::{NatsServer, read_events, stream_len};
use trellis_integration::{Node, NodeOptions, SERVICES};
use trellis_proto::events::v1::event::Payload;

const OUTAGE: Duration = Duration::from_secs(30);

/// Waits until every service's bus is `connected`, and with `drained`, its outbox
/// empty.
async fn wait_for_bus(node: &Node, connected: bool, drained: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for service in SERVICES {
        loop {
            let bus = node.info(service).await.ok().and_then(|i| i.bus);
            if bus
                .as_ref()
                .is_some_and(|b| b.connected == connected && (!drained || b.outbox_pending == 0))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{service}: bus never connected={connected} drained={drained}: {bus:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One pod's whole life; every call must succeed.
async fn pod_cycle(node: &Node, n: usize) -> String {
    let mut runtime = node.runtime();
    let id = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config(&format!("churn-{n}"), false)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {n} with the bus down: {e}"))
        .into_inner()
        .pod_sandbox_id;
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox {n} with the bus down: {e}"));
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox {n} with the bus down: {e}"));
    id
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

    // Per pod, in the order stored: its sandbox events and its network events.
    let mut sandbox: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut network: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for stored in &stored {
        match &stored.event.payload {
            Some(Payload::Sandbox(e)) => sandbox
                .entry(e.sandbox_id.as_str())
                .or_default()
                .push(e.kind().as_str_name().to_string()),
            Some(Payload::Network(e)) => network
                .entry(e.sandbox_id.as_str())
                .or_default()
                .push(e.kind().as_str_name().to_string()),
            _ => {}
        }
    }
    assert_eq!(
        sandbox.len(),
        pods.len(),
        "a sandbox's events for every pod"
    );
    for (n, id) in pods.iter().enumerate() {
        assert_eq!(
            sandbox.get(id.as_str()).map(Vec::as_slice),
            Some(&["CREATED", "STARTED", "STOPPED", "DELETED"].map(String::from)[..]),
            "pod {n} ({id}): each sandbox event once, in order"
        );
        assert_eq!(
            network.get(id.as_str()).map(Vec::as_slice),
            Some(&["SET_UP", "TORN_DOWN"].map(String::from)[..]),
            "pod {n} ({id}): each network event once, in order"
        );
    }
    node.stop();
}
