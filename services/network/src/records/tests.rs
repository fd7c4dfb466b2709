//! Tests of the pod records: the intent/done protocol, the stored form, and records
//! of earlier releases (JSON) read after an upgrade.
use super::*;
use prost::Message;
use trellis_common::store::SledStore;

fn record(id: &str, state: PodState) -> PodRecord {
    PodRecord {
        sandbox_id: id.into(),
        state,
        host_network: false,
        config_file: "/c".into(),
        network_name: "n".into(),
        attachment: None,
        result: None,
    }
}

#[test]
fn intent_then_done_then_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("store");
    let records = Records::open(&store).expect("records");
    records
        .begin(&record("b", PodState::Adding))
        .expect("begin");
    records
        .begin(&record("a", PodState::Adding))
        .expect("begin");
    assert_eq!(
        records
            .first_in_flight()
            .expect("first")
            .map(|(r, done)| (r.sandbox_id, done)),
        Some(("a".into(), false))
    );
    records
        .settle(&record("a", PodState::Ready))
        .expect("commit");
    assert_eq!(
        records.get("a").expect("get").map(|r| r.state),
        Some(PodState::Ready)
    );
    assert_eq!(
        records
            .first_in_flight()
            .expect("first")
            .map(|(r, _)| r.sandbox_id),
        Some("b".into())
    );
    records
        .begin_removal(&record("a", PodState::Removing))
        .expect("removal");
    assert_eq!(
        records.get("a").expect("get").map(|r| r.state),
        Some(PodState::Removing)
    );
    records.forget("a").expect("forget");
    records
        .begin_removal(&record("b", PodState::Removing))
        .expect("removal");
    records.forget("b").expect("forget");
    assert_eq!(records.get("a").expect("get"), None);
    assert!(records.first_in_flight().expect("first").is_none());
}

/// What the release before protobuf wrote for a pod set up on the default bridge
/// network (serde_json of its `PodRecord`, field for field).
const OLD_READY_POD: &str = r#"{"sandbox_id":"5e1f","state":"Ready","host_network":false,"config_file":"/etc/cni/net.d/10-trellis.conflist","network_name":"trellis","attachment":{"sandbox_id":"5e1f","netns":"/run/trellis/netns/5e1f","args":"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=5e1f;K8S_POD_UID=u1","network":{"cniVersion":"1.0.0","name":"trellis","plugins":[{"type":"bridge","bridge":"trellis0","ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]]}},{"type":"portmap","capabilities":{"portMappings":true}}]},"runtime_config":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}},"result":{"cniVersion":"1.0.0","interfaces":[{"name":"trellis0","mac":"aa:bb:cc:dd:ee:01"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/run/trellis/netns/5e1f"}],"ips":[{"address":"10.88.0.7/16","gateway":"10.88.0.1","interface":1}]}}"#;

const OLD_INTENT: &str = r#"{"sandbox_id":"77aa","state":"Removing","host_network":true,"config_file":"","network_name":"","attachment":null,"result":null}"#;

#[test]
fn records_of_the_json_release_are_read_after_an_upgrade() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = SledStore::open(dir.path()).expect("store");
        store
            .table(PODS)
            .expect("pods")
            .put(b"5e1f", OLD_READY_POD.as_bytes())
            .expect("old record");
        store
            .table(IN_FLIGHT)
            .expect("in flight")
            .put(b"77aa", OLD_INTENT.as_bytes())
            .expect("old intent");
    }
    let expected = PodRecord {
        sandbox_id: "5e1f".into(),
        state: PodState::Ready,
        host_network: false,
        config_file: "/etc/cni/net.d/10-trellis.conflist".into(),
        network_name: "trellis".into(),
        attachment: Some(Attachment {
            sandbox_id: "5e1f".into(),
            netns: "/run/trellis/netns/5e1f".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=5e1f;K8S_POD_UID=u1".into(),
            network: serde_json::json!({"cniVersion": "1.0.0", "name": "trellis", "plugins": [
                {"type": "bridge", "bridge": "trellis0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}]}),
            runtime_config: serde_json::json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
                .as_object()
                .cloned()
                .expect("object"),
        }),
        result: serde_json::from_str::<serde_json::Value>(OLD_READY_POD)
            .expect("json")
            .get("result")
            .cloned(),
    };
    // Twice: the first open rewrites the records, the second reads them as protobuf.
    for _ in 0..2 {
        let store = SledStore::open(dir.path()).expect("store");
        let records = Records::open(&store).expect("records");
        let pod = records
            .get("5e1f")
            .expect("get")
            .expect("the pod is still known");
        assert_eq!(pod, expected);
        let ips: Vec<String> = crate::pods::addresses(&pod)
            .expect("addresses")
            .iter()
            .map(|a| format!("{}/{}", a.ip, a.prefix_length))
            .collect();
        assert_eq!(ips, vec!["10.88.0.7/16"], "the pod keeps its address");
        let (intent, finished) = records
            .first_in_flight()
            .expect("first")
            .expect("the intent is still there");
        assert_eq!(
            (
                intent.sandbox_id.as_str(),
                intent.state,
                intent.host_network,
                finished
            ),
            ("77aa", PodState::Removing, true, false)
        );
        let raw = store.table(PODS).expect("pods").get(b"5e1f").expect("raw");
        let raw = raw.expect("present");
        assert_ne!(raw.first(), Some(&b'{'), "rewritten as protobuf");
        assert_eq!(
            StoredPod::decode(raw.as_slice()).map(|s| s.sandbox_id).ok(),
            Some("5e1f".into())
        );
    }
}

#[test]
fn an_unreadable_intent_is_dropped_and_start_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("store");
    let records = Records::open(&store).expect("records");
    let in_flight = store.table(IN_FLIGHT).expect("in flight");
    // A JSON record no release wrote, and a stored record whose CNI result is not JSON.
    in_flight.put(b"a", b"{\"nonsense\": 1}").expect("put");
    let broken = StoredPod {
        result: Some("not json".into()),
        ..StoredPod::from(&record("b", PodState::Adding))
    };
    in_flight.put(b"b", &broken.encode_to_vec()).expect("put");
    records
        .begin(&record("c", PodState::Adding))
        .expect("begin");
    assert_eq!(
        records
            .first_in_flight()
            .expect("first")
            .map(|(r, _)| r.sandbox_id),
        Some("c".into())
    );
    assert_eq!(in_flight.len(), 1, "the unreadable intents are gone");
    let unreadable = StoredPod {
        result: Some("not json".into()),
        ..StoredPod::from(&record("d", PodState::Ready))
    };
    in_flight
        .put(b"d", &unreadable.encode_to_vec())
        .expect("put");
    let message = records.get("d").expect_err("unreadable").to_string();
    assert!(
        message.contains("sandbox d")
            && message.contains("in_flight")
            && message.contains("CNI result"),
        "{message}"
    );
}
