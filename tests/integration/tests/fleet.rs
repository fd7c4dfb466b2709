//! A fleet on one event stream: two nodes publish to a JetStream stream replicated
//! over a cluster of three NATS servers, and an operator's consumer reading
//! `trellis.*.events.>` finds every event of both nodes, with its node's name, exactly
//! once, though the stream's leader was killed (SIGKILL) in the middle of pod churn.
//! The consumer is deploy/nats/cluster.md's: a user of its own that may only read the
//! stream, a durable pull consumer, explicit acknowledgements.
//!
//! Each node's services count what JetStream acknowledged
//! (`trellis_events_published_total`); the stream must hold exactly that many distinct
//! events per node and service (none lost) and no message id twice (none duplicated:
//! a publish whose ack the dying server never sent is sent again with the same
//! `Nats-Msg-Id`, and the new leader drops the copy).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use trellis_common::bus::EVENTS_SUBJECT_FILTER;
use trellis_common::bus::permissions::{Permissions, for_consumer};
use trellis_integration::nats::{
    StoredEvent, assert_pod_life, histories, stored_event, wait_for_bus,
};
use trellis_integration::nats_cluster::{NatsCluster, TestUser};
use trellis_integration::pods::pod_cycle;
use trellis_integration::{Node, NodeOptions, metrics, new_node_name};

const PODS_PER_NODE: usize = 10;
/// Pods finished (both nodes) when the stream's leader is killed.
const KILL_AFTER: usize = 4;
const PUBLISHERS: [&str; 4] = ["storage", "network", "image", "runtime"];

/// The consumer's inbox prefix, as in deploy/nats/cluster.md.
const CONSUMER_INBOX: &str = "_INBOX.fleet-consumer";

async fn fleet_node(cluster: &NatsCluster, name: &str, user: &TestUser) -> Node {
    Node::start(NodeOptions {
        node_name: Some(name.to_string()),
        // Every server, so that a node reconnects to the others when one dies.
        extra_config: format!(
            "[bus]\nurl = \"{}\"\nstream_replicas = 3\nnkey_seed_file = \"{}\"\n",
            cluster.urls(),
            user.seed_file.display()
        ),
        with_cni_config: true,
        with_metrics: true,
        ..Default::default()
    })
    .await
}

/// Runs, stops and removes `PODS_PER_NODE` pods one after the other, counting each
/// finished one in `done`.
async fn churn(node: &Node, done: &AtomicUsize) -> Vec<String> {
    let mut pods = Vec::new();
    for n in 0..PODS_PER_NODE {
        pods.push(pod_cycle(node, &format!("fleet-{n}")).await);
        done.fetch_add(1, Ordering::SeqCst);
    }
    pods
}

/// The events stream as a server still running sees it.
async fn stream_info(cluster: &NatsCluster) -> jetstream::stream::Info {
    let mut stream = jetstream::new(cluster.client().await)
        .get_stream("TRELLIS_EVENTS")
        .await
        .expect("events stream");
    stream.info().await.expect("stream info").clone()
}

/// What `node`'s services say JetStream acknowledged, by service.
async fn published(node: &Node) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for service in PUBLISHERS {
        let scrape = metrics::scrape(node, service).await;
        counts.insert(
            service.to_string(),
            scrape.value("trellis_events_published_total") as u64,
        );
    }
    counts
}

/// Reads the whole stream (`total` messages) as deploy/nats/cluster.md's operator
/// does: its own user, a durable pull consumer of every node's events, each message
/// acknowledged.
async fn read_as_operator(cluster: &NatsCluster, user: &TestUser, total: u64) -> Vec<StoredEvent> {
    let client = async_nats::ConnectOptions::with_nkey(user.seed.clone())
        .custom_inbox_prefix(CONSUMER_INBOX)
        .connect(cluster.urls().split(',').collect::<Vec<_>>().as_slice())
        .await
        .expect("the consumer connects");
    let stream = jetstream::new(client)
        .get_stream("TRELLIS_EVENTS")
        .await
        .expect("the consumer finds the stream");
    let config = consumer::pull::Config {
        durable_name: Some("fleet-audit".into()),
        filter_subject: EVENTS_SUBJECT_FILTER.into(),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    // Made while the cluster may still be electing after the kill: try again.
    let started = std::time::Instant::now();
    let durable = loop {
        match stream
            .get_or_create_consumer("fleet-audit", config.clone())
            .await
        {
            Ok(durable) => break durable,
            Err(error) if started.elapsed() > Duration::from_secs(30) => {
                panic!("the durable consumer: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut messages: consumer::pull::Stream = durable.messages().await.expect("messages");
    let mut events = Vec::new();
    while (events.len() as u64) < total {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .unwrap_or_else(|_| panic!("no message after {} of {total}", events.len()))
            .expect("the stream goes on")
            .expect("a message");
        events.push(stored_event(&message));
        message.ack().await.expect("the consumer acknowledges");
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_publish_through_a_three_server_cluster_that_loses_its_leader() {
    let keys = tempfile::tempdir().expect("tempdir");
    // Both nodes' services share one user with every permission: deploy/nats/ and
    // bus_security.rs cover per-service users; this test is about the cluster.
    let everything = Permissions {
        publish: vec![">".into()],
        subscribe: vec![">".into()],
    };
    let nodes_user = TestUser::new(keys.path(), "nodes", everything);
    let operator = TestUser::new(
        keys.path(),
        "operator",
        for_consumer("TRELLIS_EVENTS", CONSUMER_INBOX),
    );
    let mut cluster = NatsCluster::start("fleet", 3, &[&nodes_user.user, &operator.user]).await;
    let base = new_node_name();
    let names = [format!("{base}a"), format!("{base}b")];
    let nodes = [
        fleet_node(&cluster, &names[0], &nodes_user).await,
        fleet_node(&cluster, &names[1], &nodes_user).await,
    ];
    for node in &nodes {
        wait_for_bus(node, true, true).await;
    }
    let before = stream_info(&cluster).await;
    assert_eq!(
        before.config.num_replicas, 3,
        "bus.stream_replicas made the stream"
    );
    let leader = before
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("the stream has a leader");

    let done = AtomicUsize::new(0);
    let killer = async {
        while done.load(Ordering::SeqCst) < KILL_AFTER {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = cluster.index_of(&leader).expect("the leader is ours");
        cluster.kill9(n);
        eprintln!(
            "killed {leader} (the stream's leader) after {} pods",
            done.load(Ordering::SeqCst)
        );
    };
    let (pods_a, pods_b, ()) =
        tokio::join!(churn(&nodes[0], &done), churn(&nodes[1], &done), killer);
    for node in &nodes {
        wait_for_bus(node, true, true).await;
    }

    let after = stream_info(&cluster).await;
    let new_leader = after.cluster.as_ref().and_then(|c| c.leader.clone());
    assert_ne!(new_leader.as_deref(), Some(leader.as_str()), "a new leader");
    let stored = read_as_operator(&cluster, &operator, after.state.messages).await;

    // Every message: its id is the event's, and its node is named alike by the
    // header, the subject and the payload.
    let mut ids = HashSet::new();
    let mut by_service: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<(String, String), u64> = BTreeMap::new();
    for stored in &stored {
        let event = &stored.event;
        assert_eq!(stored.message_id.as_deref(), Some(event.id.as_str()));
        assert!(
            ids.insert(event.id.clone()),
            "{} twice in the stream",
            event.id
        );
        assert!(names.contains(&event.node), "a stranger's event: {event:?}");
        assert_eq!(stored.node_header.as_deref(), Some(event.node.as_str()));
        let mut tokens = stored.subject.splitn(4, '.');
        assert_eq!(
            tokens.nth(1),
            Some(event.node.as_str()),
            "{}",
            stored.subject
        );
        let kind = tokens.nth(1).unwrap_or_default().to_string();
        *by_service
            .entry((event.node.clone(), event.service.clone()))
            .or_default() += 1;
        *by_kind.entry((event.node.clone(), kind)).or_default() += 1;
    }

    for (node, name) in nodes.iter().zip(&names) {
        for (service, acknowledged) in published(node).await {
            let stored = by_service
                .get(&(name.clone(), service.clone()))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                stored, acknowledged,
                "{name} {service}: events in the stream vs acknowledged to the service"
            );
        }
    }
    let histories = histories(&stored);
    for pod in pods_a.iter().chain(&pods_b) {
        assert_pod_life(&histories, pod);
    }

    eprintln!(
        "{} events in the stream (R{}, leader {leader} killed, now {new_leader:?}), {} pods per node",
        stored.len(),
        after.config.num_replicas,
        PODS_PER_NODE
    );
    for (node, name) in nodes.iter().zip(&names) {
        // The publishes the kill interrupted, sent again (a retry logs at its 1st,
        // 2nd, 4th, ... failure in a row).
        let log = node.log();
        let failures: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("event delivery failed; retrying"))
            .collect();
        let mut reasons: Vec<&str> = failures
            .iter()
            .filter_map(|line| line.split("error=").nth(1))
            .map(|error| error.split(" failures=").next().unwrap_or(error))
            .collect();
        reasons.sort_unstable();
        reasons.dedup();
        eprintln!(
            "  {name}: {} delivery failures logged: {reasons:?}",
            failures.len()
        );
    }
    for ((node, kind), count) in &by_kind {
        eprintln!("  {node} {kind}: {count}");
    }
    for ((node, service), count) in &by_service {
        eprintln!("  {node} from {service}: {count}");
    }
    let [a, b] = nodes;
    a.stop();
    b.stop();
}
