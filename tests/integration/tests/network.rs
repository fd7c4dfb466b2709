//! The network service through its internal socket, against the real CNI plugins in
//! /usr/lib/cni. Each test has a network of its own (bridge, /24, IP allocations
//! under the node's root), so tests run in parallel.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis_integration::nats::{NatsServer, read_events};
use trellis_integration::netns::{self, TestNetwork};
use trellis_integration::{Node, NodeOptions, unix_channel};
use trellis_proto::events::v1::event::Payload;
use trellis_proto::events::v1::{NetworkEvent, network_event};
use trellis_proto::network::v1::network_client::NetworkClient;
use trellis_proto::network::v1::{
    PodNetwork, PodNetworkStatusRequest, PortMapping, SetUpPodRequest, TearDownPodRequest,
    pod_network, port_mapping,
};

fn client(node: &Node) -> NetworkClient<Channel> {
    NetworkClient::new(unix_channel(&node.socket("network")))
}

fn pod(sandbox_id: &str) -> SetUpPodRequest {
    SetUpPodRequest {
        sandbox_id: sandbox_id.to_string(),
        pod_name: format!("pod-{sandbox_id}"),
        pod_namespace: "default".into(),
        pod_uid: format!("uid-{sandbox_id}"),
        ..Default::default()
    }
}

async fn set_up(client: &mut NetworkClient<Channel>, request: SetUpPodRequest) -> PodNetwork {
    let id = request.sandbox_id.clone();
    client
        .set_up_pod(request)
        .await
        .unwrap_or_else(|e| panic!("SetUpPod {id}: {e:?}"))
        .into_inner()
}

async fn tear_down(client: &mut NetworkClient<Channel>, sandbox_id: &str) {
    client
        .tear_down_pod(TearDownPodRequest {
            sandbox_id: sandbox_id.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("TearDownPod {sandbox_id}: {e:?}"));
}

fn run_dir(node: &Node) -> PathBuf {
    node.root().join("run")
}

/// Nothing of the node's pods is left: no pin, no veth on the bridge, no address
/// held, no NAT rule naming a sandbox.
fn assert_nothing_left(node: &Node, network: &TestNetwork, sandbox_ids: &[&str]) {
    assert_eq!(
        netns::pins(&run_dir(node)),
        Vec::<String>::new(),
        "netns pins left"
    );
    assert_eq!(
        network.bridge_ports(),
        Vec::<String>::new(),
        "veths left on {}",
        network.bridge
    );
    assert_eq!(
        network.allocations(),
        Vec::<String>::new(),
        "addresses left allocated"
    );
    for id in sandbox_ids {
        assert_eq!(
            netns::nat_rules_mentioning(id),
            Vec::<String>::new(),
            "NAT rules left for {id}"
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&run_dir(node).join("netns").display().to_string()),
        "netns mounts left"
    );
}

/// A listener inside the namespace at `pin`, answering one connection with what it read.
fn echo_server_in(pin: &Path) -> (u16, std::thread::JoinHandle<()>) {
    let listener = netns::in_netns(pin, || {
        TcpListener::bind("0.0.0.0:0").expect("listen in pod")
    });
    let port = listener.local_addr().expect("address").port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buffer = [0u8; 5];
        stream.read_exact(&mut buffer).expect("read");
        stream.write_all(&buffer).expect("write");
    });
    (port, server)
}

fn echo(address: (std::net::IpAddr, u16)) -> Result<[u8; 5], std::io::Error> {
    let mut stream = TcpStream::connect_timeout(&address.into(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"hello")?;
    let mut answer = [0u8; 5];
    stream.read_exact(&mut answer)?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_pods_get_distinct_addresses_and_reach_each_other() {
    let node = Node::start(NodeOptions::default()).await;
    let network = TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let mut client = client(&node);

    let a = set_up(&mut client, pod("pod-a")).await;
    let b = set_up(&mut client, pod("pod-b")).await;
    assert_eq!(a.state(), pod_network::State::Ready);
    assert_eq!(
        (a.network_name.as_str(), a.interface.as_str()),
        (network.name.as_str(), "eth0")
    );
    let (ip_a, ip_b) = (&a.ips[0].ip, &b.ips[0].ip);
    assert!(
        network.contains(ip_a) && network.contains(ip_b) && ip_a != ip_b,
        "{a:?} {b:?}"
    );
    assert_eq!(a.ips[0].gateway, network.gateway().to_string());
    assert_eq!(
        a.netns_path,
        run_dir(&node).join("netns/pod-a").display().to_string()
    );

    // A second SetUpPod answers the same network.
    assert_eq!(set_up(&mut client, pod("pod-a")).await, a);
    let status = client
        .pod_network_status(PodNetworkStatusRequest {
            sandbox_id: "pod-b".into(),
            check: true,
        })
        .await
        .expect("status with CHECK")
        .into_inner();
    assert_eq!(status, b);

    let (port, server) = echo_server_in(Path::new(&b.netns_path));
    let target = (ip_b.parse().expect("ip"), port);
    let answer = netns::in_netns(Path::new(&a.netns_path), move || echo(target));
    assert_eq!(&answer.expect("pod a reaches pod b"), b"hello");
    server.join().expect("server");
    // Loopback is up inside the pod.
    let loopback = netns::in_netns(Path::new(&a.netns_path), || {
        TcpListener::bind("127.0.0.1:0").is_ok()
    });
    assert!(loopback);

    tear_down(&mut client, "pod-a").await;
    tear_down(&mut client, "pod-b").await;
    assert_nothing_left(&node, &network, &["pod-a", "pod-b"]);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn host_port_reaches_the_pod_from_localhost() {
    let node = Node::start(NodeOptions::default()).await;
    let network = TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let mut client = client(&node);
    let sandbox_id = format!("hostport-{}", netns::random_hex(8));

    let host_port = trellis_integration::free_port();
    let mut request = pod(&sandbox_id);
    request.port_mappings = vec![PortMapping {
        protocol: port_mapping::Protocol::Tcp.into(),
        container_port: 8080,
        host_port: i32::from(host_port),
        host_ip: String::new(),
    }];
    let pod = set_up(&mut client, request).await;
    // Bound after set-up, as a container's server would be.
    let listener = netns::in_netns(Path::new(&pod.netns_path), || {
        TcpListener::bind("0.0.0.0:8080").expect("listen in pod")
    });
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buffer = [0u8; 5];
        stream.read_exact(&mut buffer).expect("read");
        stream.write_all(&buffer).expect("write");
    });
    assert!(
        !netns::nat_rules_mentioning(&sandbox_id).is_empty(),
        "portmap rules name the sandbox:\n{}",
        netns::nat_rules()
    );

    let answer =
        tokio::task::spawn_blocking(move || echo(("127.0.0.1".parse().expect("ip"), host_port)))
            .await
            .expect("join");
    assert_eq!(
        &answer.expect("127.0.0.1:<hostPort> reaches the pod"),
        b"hello"
    );
    server.join().expect("server");

    tear_down(&mut client, &sandbox_id).await;
    assert_nothing_left(&node, &network, &[&sandbox_id]);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn tear_down_is_complete_idempotent_and_200_cycles_leave_nothing() {
    let node = Node::start(NodeOptions::default()).await;
    let network = TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let mut client = client(&node);

    let mut request = pod("cycle");
    request.port_mappings = vec![PortMapping {
        protocol: port_mapping::Protocol::Udp.into(),
        container_port: 53,
        host_port: i32::from(trellis_integration::free_port()),
        host_ip: "127.0.0.1".into(),
    }];
    let started = Instant::now();
    for cycle in 0..200 {
        let pod = set_up(&mut client, request.clone()).await;
        assert_eq!(pod.ips.len(), 1, "cycle {cycle}: {pod:?}");
        if cycle == 0 {
            assert_eq!(network.bridge_ports().len(), 1);
            assert_eq!(network.allocations(), vec![pod.ips[0].ip.clone()]);
            assert!(
                !netns::nat_rules_mentioning("cycle").is_empty(),
                "portmap rules while set up"
            );
        }
        tear_down(&mut client, "cycle").await;
        if cycle == 0 {
            assert_nothing_left(&node, &network, &["cycle"]);
            // Again, and for a pod never set up: both succeed.
            tear_down(&mut client, "cycle").await;
            tear_down(&mut client, "never-set-up").await;
            let error = client
                .pod_network_status(PodNetworkStatusRequest {
                    sandbox_id: "cycle".into(),
                    check: false,
                })
                .await
                .expect_err("gone");
            assert_eq!(error.code(), tonic::Code::NotFound);
        }
    }
    eprintln!("200 set-up/tear-down cycles in {:?}", started.elapsed());
    // Other tests add and remove host interfaces meanwhile; this network's veths are
    // the bridge's ports, which `assert_nothing_left` checks.
    assert_nothing_left(&node, &network, &["cycle"]);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn host_network_pods_and_bad_ids() {
    let node = Node::start(NodeOptions::default()).await;
    let mut client = client(&node);
    // No CNI configuration needed: a host-network pod calls no plugin.
    let mut request = pod("host-pod");
    request.host_network = true;
    let host_pod = set_up(&mut client, request).await;
    assert!(
        host_pod.host_network && host_pod.netns_path.is_empty() && host_pod.ips.is_empty(),
        "{host_pod:?}"
    );
    assert!(netns::pins(&run_dir(&node)).is_empty());
    tear_down(&mut client, "host-pod").await;

    for bad in ["", "../etc", "a b", &"x".repeat(129)] {
        let error = client.set_up_pod(pod(bad)).await.expect_err("invalid id");
        assert_eq!(
            error.code(),
            tonic::Code::InvalidArgument,
            "{bad:?}: {error:?}"
        );
        let error = client
            .tear_down_pod(TearDownPodRequest {
                sandbox_id: bad.into(),
            })
            .await
            .expect_err("invalid id");
        assert_eq!(
            error.code(),
            tonic::Code::InvalidArgument,
            "{bad:?}: {error:?}"
        );
    }
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_config_is_failed_precondition_until_one_appears() {
    let node = Node::start(NodeOptions::default()).await;
    let mut client = client(&node);
    let error = client
        .set_up_pod(pod("early"))
        .await
        .expect_err("no CNI config");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    assert!(
        error.message().contains("NoCNIConfiguration")
            && error
                .message()
                .contains(&node.cni_dir().display().to_string()),
        "{}",
        error.message()
    );
    assert!(
        netns::pins(&run_dir(&node)).is_empty(),
        "nothing made before the check"
    );

    let network = TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let pod = set_up(&mut client, pod("early")).await;
    assert!(network.contains(&pod.ips[0].ip), "{pod:?}");
    tear_down(&mut client, "early").await;
    assert_nothing_left(&node, &network, &["early"]);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_conflist_and_missing_plugin_are_named() {
    let node = Node::start(NodeOptions::default()).await;
    let mut client = client(&node);
    std::fs::write(
        node.cni_dir().join("05-broken.conflist"),
        "{ \"name\": \"x\", ",
    )
    .expect("write");
    let error = client.set_up_pod(pod("p1")).await.expect_err("broken");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    assert!(
        error.message().contains("05-broken.conflist")
            && error.message().contains("not valid JSON"),
        "{}",
        error.message()
    );

    let network = TestNetwork::new(node.root())
        .with_plugin(serde_json::json!({ "type": "trellis-no-such-plugin" }));
    let file = network.write(&node.cni_dir());
    let error = client
        .set_up_pod(pod("p1"))
        .await
        .expect_err("missing plugin");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition);
    assert!(
        error.message().contains("`trellis-no-such-plugin`")
            && error.message().contains(&file.display().to_string()),
        "{}",
        error.message()
    );
    assert!(netns::pins(&run_dir(&node)).is_empty());
    node.stop();
}

/// A plugin that fails ADD: the set-up is rolled back (DEL, namespace removed) and
/// the error names the plugin and its message.
#[tokio::test(flavor = "multi_thread")]
async fn failed_add_is_rolled_back_and_names_the_plugin() {
    let plugins = tempfile::tempdir().expect("plugin dir");
    write_plugin(
        plugins.path(),
        "trellis-test-fail",
        r#"cat >/dev/null
if [ "$CNI_COMMAND" = "ADD" ]; then
  echo '{"cniVersion":"1.0.0","code":100,"msg":"refused by the test","details":"on purpose"}'
  exit 1
fi
exit 0"#,
    );
    let node = Node::start(plugin_dir_options(plugins.path())).await;
    let network = TestNetwork::new(node.root())
        .with_plugin(serde_json::json!({ "type": "trellis-test-fail" }));
    network.write(&node.cni_dir());
    let mut client = client(&node);
    let error = client
        .set_up_pod(pod("failing"))
        .await
        .expect_err("plugin fails");
    assert_eq!(error.code(), tonic::Code::Internal);
    assert!(
        error.message().contains("`trellis-test-fail`")
            && error.message().contains("refused by the test")
            && error.message().contains("on purpose"),
        "{}",
        error.message()
    );
    assert_nothing_left(&node, &network, &["failing"]);
    let error = client
        .pod_network_status(PodNetworkStatusRequest {
            sandbox_id: "failing".into(),
            check: false,
        })
        .await
        .expect_err("no record");
    assert_eq!(error.code(), tonic::Code::NotFound);
    node.stop();
}

/// The network service is killed after the plugins ran ADD and before it recorded
/// the pod as set up: when `trellis up` restarts it, it rolls the pod back.
#[tokio::test(flavor = "multi_thread")]
async fn killed_between_add_and_record_is_rolled_back_on_restart() {
    let plugins = tempfile::tempdir().expect("plugin dir");
    // Its parent is trellis-network.
    write_plugin(
        plugins.path(),
        "trellis-test-kill-parent",
        "cat >/dev/null\nif [ \"$CNI_COMMAND\" = \"ADD\" ]; then kill -9 $PPID; fi\nexit 0",
    );
    let node = Node::start(plugin_dir_options(plugins.path())).await;
    let network = TestNetwork::new(node.root())
        .with_plugin(serde_json::json!({ "type": "trellis-test-kill-parent" }));
    network.write(&node.cni_dir());
    let old_pid = node.info("network").await.expect("network info").pid;

    let mut request = pod("killed");
    request.port_mappings = vec![PortMapping {
        protocol: 0,
        container_port: 80,
        host_port: i32::from(trellis_integration::free_port()),
        host_ip: String::new(),
    }];
    let error = client(&node)
        .set_up_pod(request)
        .await
        .expect_err("the service died");
    assert!(
        matches!(
            error.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        ),
        "{error:?}"
    );
    assert_eq!(
        network.bridge_ports().len(),
        1,
        "the bridge plugin had plugged a veth"
    );

    node.wait_restarted("network", old_pid, Duration::from_secs(20))
        .await;
    assert!(
        node.log()
            .contains("repairing a pod network interrupted by a restart"),
        "{}",
        node.log_tail()
    );
    assert_nothing_left(&node, &network, &["killed"]);
    let error = client(&node)
        .pod_network_status(PodNetworkStatusRequest {
            sandbox_id: "killed".into(),
            check: false,
        })
        .await
        .expect_err("rolled back");
    assert_eq!(error.code(), tonic::Code::NotFound);
    node.stop();
}

/// A pod set up before a restart is torn down with the configuration its ADD used,
/// even once that configuration is gone from the directory; calls for one sandbox
/// are serialised.
#[tokio::test(flavor = "multi_thread")]
async fn tear_down_after_restart_uses_the_recorded_config() {
    let node = Node::start(NodeOptions::default()).await;
    let network = TestNetwork::new(node.root());
    let file = network.write(&node.cni_dir());
    let mut request = pod("survivor");
    request.port_mappings = vec![PortMapping {
        protocol: 0,
        container_port: 80,
        host_port: i32::from(trellis_integration::free_port()),
        host_ip: String::new(),
    }];
    let (mut one, mut two) = (client(&node), client(&node));
    let (first, second) =
        tokio::join!(set_up(&mut one, request.clone()), set_up(&mut two, request));
    assert_eq!(first, second, "one ADD, answered twice");
    assert_eq!(network.bridge_ports().len(), 1);

    std::fs::remove_file(&file).expect("remove the conflist");
    let old_pid = node.info("network").await.expect("info").pid;
    trellis_integration::kill9(old_pid);
    node.wait_restarted("network", old_pid, Duration::from_secs(20))
        .await;
    let status = client(&node)
        .pod_network_status(PodNetworkStatusRequest {
            sandbox_id: "survivor".into(),
            check: false,
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status, first, "the record survives the restart");

    tear_down(&mut client(&node), "survivor").await;
    assert_nothing_left(&node, &network, &["survivor"]);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn set_up_and_tear_down_raise_events_and_metrics() {
    // A bus of the test's own, open to it: the private bus of `trellis up` lets no one
    // but the node's services in, and none of them reads the event history.
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start(dir.path());
    let options = NodeOptions {
        bus_url: Some(nats.url()),
        env: vec![(
            "TRELLIS_NETWORK_METRICS_LISTEN".into(),
            "127.0.0.1:0".into(),
        )],
        ..Default::default()
    };
    let node = Node::start(options).await;
    let network = TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let mut client = client(&node);
    let pod = set_up(&mut client, pod("evented")).await;
    tear_down(&mut client, "evented").await;

    let info = node.info("network").await.expect("network info");
    let filter = format!("trellis.{}.events.network.>", node.node_name);
    let bus_url = info.bus.expect("bus").url;
    let stored = read_events(&bus_url, &filter, Duration::from_secs(20), |events| {
        events.len() >= 2
    })
    .await;
    let events: Vec<&NetworkEvent> = stored
        .iter()
        .map(|s| match &s.event.payload {
            Some(Payload::Network(event)) => event,
            other => panic!("not a network event: {other:?}"),
        })
        .collect();
    assert_eq!(
        events.iter().map(|e| e.kind()).collect::<Vec<_>>(),
        vec![network_event::Kind::SetUp, network_event::Kind::TornDown]
    );
    for event in events {
        assert_eq!(
            (event.sandbox_id.as_str(), event.netns_path.as_str()),
            ("evented", pod.netns_path.as_str())
        );
        assert_eq!(event.ips, vec![pod.ips[0].ip.clone()]);
    }

    let mut stream = TcpStream::connect(&info.metrics_address).expect("connect to metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    assert!(
        body.contains("trellis_network_pod_add_duration_seconds_count 1"),
        "{body}"
    );
    assert!(
        body.contains("trellis_network_pod_del_duration_seconds_count 1"),
        "{body}"
    );
    node.stop();
}

fn plugin_dir_options(dir: &Path) -> NodeOptions {
    let dirs = format!("{},/usr/lib/cni", dir.display());
    NodeOptions {
        env: vec![("TRELLIS_NETWORK_CNI_PLUGIN_DIRS".into(), dirs)],
        ..Default::default()
    }
}

fn write_plugin(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod plugin");
}
