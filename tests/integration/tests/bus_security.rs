//! The event bus takes the node's services and nobody else: the private bus of
//! `trellis up` authenticates each service as its own nkey user confined to its own
//! node's subjects, the gateway passes on only its node's events, and an external bus
//! is reached with the configured nkey and TLS files.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::{ConnectErrorKind, ConnectOptions};
use futures::StreamExt;
use k8s_cri::v1::*;
use prost::Message;
use tokio::sync::mpsc;
use trellis_common::bus::permissions::{Permissions, for_service};
use trellis_common::bus::server_config::{NatsUser, ServerConfig, ServerTls};
use trellis_common::config::ServiceKind;
use trellis_integration::cri::{host_network_pod, pull, remove_pods, run_pod, start};
use trellis_integration::nats::{NatsServer, StoredEvent, read_events_with};
use trellis_integration::pki::Pki;
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions, SERVICES, ServiceProcess};
use trellis_proto::events::v1::{ContainerEvent, Event, container_event, event::Payload};

/// The private bus's URL, as the services report it.
async fn bus_url(node: &Node) -> String {
    node.wait_bus_connected(Duration::from_secs(20)).await;
    let url = node
        .info("runtime")
        .await
        .expect("info")
        .bus
        .expect("bus")
        .url;
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    url
}

fn bus_dir(node: &Node) -> PathBuf {
    node.root().join("state/bus")
}

fn seed(node: &Node, service: &str) -> String {
    std::fs::read_to_string(bus_dir(node).join(format!("{service}.nk")))
        .expect("seed file")
        .trim()
        .to_string()
}

/// A client connected with `options` (its credentials), and the errors the server
/// sends it (permission violations).
async fn connect_as(
    url: &str,
    options: ConnectOptions,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (errors, received) = mpsc::unbounded_channel();
    let client = options
        .event_callback(move |event| {
            let errors = errors.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = errors.send(error.to_string());
                }
            }
        })
        .connect(url)
        .await
        .expect("connect with credentials");
    (client, received)
}

async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, what: &str) {
    let error = tokio::time::timeout(Duration::from_secs(5), errors.recv())
        .await
        .unwrap_or_else(|_| panic!("no permission violation for {what}"))
        .expect("error channel");
    let lower = error.to_ascii_lowercase();
    assert!(
        lower.contains("permissions violation") && error.contains(what),
        "expected a violation for {what}, got: {error}"
    );
}

fn stopped_event(node: &str, container_id: &str) -> Vec<u8> {
    let payload = Payload::Container(ContainerEvent {
        kind: container_event::Kind::Stopped.into(),
        container_id: container_id.into(),
        ..Default::default()
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64;
    Event {
        id: format!("{container_id}-1"),
        node: node.into(),
        service: "runtime".into(),
        time_unix_nano: now,
        payload: Some(payload),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_private_bus_refuses_strangers_and_confines_each_service() {
    let node = Node::start(NodeOptions::default()).await;
    let url = bus_url(&node).await;
    let name = node.node_name.clone();

    // No credentials, or a key of one's own: not even a connection, so neither a
    // subscription nor a publication.
    let stranger = ConnectOptions::new()
        .connect(url.as_str())
        .await
        .expect_err("a client without credentials is refused");
    assert_eq!(
        stranger.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{stranger}"
    );
    let own_key = nkeys::KeyPair::new_user().seed().expect("seed");
    let forger = ConnectOptions::with_nkey(own_key)
        .connect(url.as_str())
        .await
        .expect_err("an unknown nkey is refused");
    assert_eq!(
        forger.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{forger}"
    );

    // The credentials: 0600 files, owned by root, in a 0700 directory; the server's
    // configuration holds no seed.
    let dir = bus_dir(&node);
    let meta = std::fs::metadata(&dir).expect("bus dir");
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, 0));
    let seeds: Vec<String> = SERVICES
        .iter()
        .map(|service| seed(&node, service))
        .collect();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("list") {
        let path = entry.expect("entry").path();
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid()),
            (0o600, 0),
            "{}",
            path.display()
        );
        files += 1;
    }
    assert_eq!(
        files,
        SERVICES.len() + 2,
        "a seed per service, the server configuration and the node's lock"
    );
    let conf = std::fs::read_to_string(dir.join("nats-server.conf")).expect("conf");
    assert!(
        seeds.iter().all(|seed| !conf.contains(seed.as_str())),
        "no seed in the server configuration"
    );

    // The runtime's user: nothing on another node, no wildcard subscription.
    let (runtime, mut errors) =
        connect_as(&url, ConnectOptions::with_nkey(seed(&node, "runtime"))).await;
    runtime
        .publish(
            "trellis.othernode.events.container.stopped",
            stopped_event("othernode", "c1").into(),
        )
        .await
        .expect("send");
    runtime.flush().await.expect("flush");
    expect_violation(&mut errors, "trellis.othernode.events.container.stopped").await;
    let _everything = runtime.subscribe("trellis.>").await.expect("send SUB");
    expect_violation(&mut errors, "trellis.>").await;
    let _acks = runtime.subscribe("_INBOX.>").await.expect("send SUB");
    expect_violation(&mut errors, "_INBOX.>").await;

    // The storage service's user cannot forge a container event, even on this node.
    let (storage, mut errors) =
        connect_as(&url, ConnectOptions::with_nkey(seed(&node, "storage"))).await;
    let subject = format!("trellis.{name}.events.container.stopped");
    storage
        .publish(subject.clone(), stopped_event(&name, "c1").into())
        .await
        .expect("send");
    storage.flush().await.expect("flush");
    expect_violation(&mut errors, &subject).await;

    // The gateway's user hears only its node's events and says nothing.
    let (gateway, mut errors) =
        connect_as(&url, ConnectOptions::with_nkey(seed(&node, "gateway"))).await;
    let _everything = gateway.subscribe("trellis.>").await.expect("send SUB");
    expect_violation(&mut errors, "trellis.>").await;
    gateway
        .publish(
            format!("trellis.{name}.events.service.started"),
            Vec::new().into(),
        )
        .await
        .expect("send");
    gateway.flush().await.expect("flush");
    expect_violation(
        &mut errors,
        &format!("trellis.{name}.events.service.started"),
    )
    .await;

    // The server logs each violation (what the absence of one elsewhere relies on).
    let log = node.log();
    assert!(
        log.contains("Publish Violation") && log.contains("Subscription Violation"),
        "{}",
        node.log_tail()
    );

    // Nothing shown of the bus holds a secret.
    let status = std::process::Command::new(trellis_integration::binary("trellis"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("status")
        .output()
        .expect("trellis status");
    let mut shown = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(shown.contains(&url), "{shown}");
    for service in SERVICES {
        shown.push_str(&format!("{:?}", node.info(service).await.expect("info")));
    }
    assert!(
        seeds.iter().all(|seed| !shown.contains(seed.as_str())),
        "a seed in status or info: {shown}"
    );
    for pid in trellis_integration::processes_mentioning(node.root()) {
        let cmdline = String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default(),
        )
        .into_owned();
        assert!(
            seeds.iter().all(|seed| !cmdline.contains(seed.as_str())),
            "a seed on a command line: {cmdline}"
        );
    }
    drop((runtime, storage, gateway));
    node.stop();
}

/// Behind the permissions, the gateway checks events itself: with the runtime's own
/// credentials (which may publish container events) an event naming another node, or
/// a container event on another kind's subject, still does not reach the kubelet.
#[tokio::test(flavor = "multi_thread")]
async fn get_container_events_passes_only_this_nodes_events_on_their_subjects() {
    let node = Node::start(NodeOptions::default()).await;
    let url = bus_url(&node).await;
    let name = node.node_name.clone();
    let mut events = node
        .runtime()
        .get_container_events(GetEventsRequest {})
        .await
        .expect("subscribe")
        .into_inner();

    let (runtime, _errors) =
        connect_as(&url, ConnectOptions::with_nkey(seed(&node, "runtime"))).await;
    let container_subject = format!("trellis.{name}.events.container.stopped");
    runtime
        .publish(
            container_subject.clone(),
            stopped_event("othernode", "forged-node").into(),
        )
        .await
        .expect("publish");
    runtime
        .publish(
            format!("trellis.{name}.events.service.started"),
            stopped_event(&name, "forged-subject").into(),
        )
        .await
        .expect("publish");
    runtime
        .publish(container_subject, stopped_event(&name, "sentinel").into())
        .await
        .expect("publish");
    runtime.flush().await.expect("flush");

    let first = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event")
        .expect("stream")
        .expect("not ended");
    assert_eq!(
        first.container_id, "sentinel",
        "the forged events were dropped and the genuine one passed: {first:?}"
    );
    assert_eq!(
        first.container_event_type(),
        ContainerEventType::ContainerStoppedEvent
    );
    assert!(
        node.log()
            .contains("dropping an event that is not this node's"),
        "the gateway says why"
    );
    drop(runtime);
    node.stop();
}

/// Real traffic of every kind (image pull, pod network, pod and container) goes
/// through each service's own permissions: every kind of event is heard on the bus,
/// every outbox empties, and the server reports no violation.
#[tokio::test(flavor = "multi_thread")]
async fn every_service_delivers_its_events_through_its_own_permissions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    registry
        .push(
            "tests/busybox",
            "1",
            &image(vec![busybox_layer()], &["/bin/sh"], "amd64", false),
        )
        .await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    let url = bus_url(&node).await;
    let (gateway, _errors) =
        connect_as(&url, ConnectOptions::with_nkey(seed(&node, "gateway"))).await;
    let mut heard = gateway
        .subscribe(format!("trellis.{}.events.>", node.node_name))
        .await
        .expect("subscribe");
    gateway.flush().await.expect("flush");

    let busybox = format!("{}/tests/busybox:1", registry.address);
    pull(&node, &busybox).await.expect("pull");
    let mut config = host_network_pod("bus-perms", false);
    if let Some(options) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        options.network = NamespaceMode::Pod as i32;
    }
    let pod = run_pod(&node, config).await;
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "sleeper".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: busybox,
            ..Default::default()
        }),
        command: vec!["/bin/sleep".into(), "1000".into()],
        ..Default::default()
    };
    start(&node, &pod, container).await;
    remove_pods(&node, &[&pod]).await;

    let mut areas = std::collections::BTreeSet::new();
    let wanted = ["container", "image", "network", "sandbox"];
    while !wanted.iter().all(|area| areas.contains(*area)) {
        let message = tokio::time::timeout(Duration::from_secs(20), heard.next())
            .await
            .unwrap_or_else(|_| panic!("heard only {areas:?}\n{}", node.log_tail()))
            .expect("subscription");
        areas.insert(
            message
                .subject
                .split('.')
                .nth(3)
                .unwrap_or_default()
                .to_string(),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for service in ["storage", "network", "image", "runtime"] {
        loop {
            let bus = node.info(service).await.expect("info").bus.expect("bus");
            if bus.connected && bus.outbox_pending == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{service} could not deliver its events: {bus:?}\n{}",
                node.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let log = node.log();
    assert!(
        !log.contains("Violation"),
        "{}",
        log.lines()
            .filter(|l| l.contains("Violation"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(gateway);
    node.stop();
}

/// An external bus with nkey users and TLS (client certificates verified): the
/// services connect with the configured files and their events are stored, while a
/// client without the nkey or without a client certificate is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_external_bus_is_reached_with_the_configured_nkey_and_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&dir.path().join("pki"));
    let name = trellis_integration::new_node_name();
    // Under `trellis up` the services share one environment, so one user with what
    // each of them may do; deploy/nats/ shows one user per service.
    let mut shared = Permissions {
        publish: Vec::new(),
        subscribe: Vec::new(),
    };
    for kind in ServiceKind::START_ORDER {
        let permissions = for_service(kind, &name, "TRELLIS_EVENTS");
        shared.publish.extend(
            permissions
                .publish
                .into_iter()
                .filter(|s| !shared.publish.contains(s))
                .collect::<Vec<_>>(),
        );
        shared.subscribe.extend(permissions.subscribe);
    }
    let node_key = nkeys::KeyPair::new_user();
    let reader_key = nkeys::KeyPair::new_user();
    let tls = ServerTls {
        cert_file: pki.server_cert_file.clone(),
        key_file: pki.server_key_file.clone(),
        client_ca_file: Some(pki.ca_file.clone()),
    };
    let all = Permissions {
        publish: vec![">".into()],
        subscribe: vec![">".into()],
    };
    let nats = NatsServer::start_configured(dir.path(), |listen, store_dir| ServerConfig {
        listen,
        store_dir,
        users: vec![
            NatsUser {
                public_key: node_key.public_key(),
                permissions: shared,
            },
            NatsUser {
                public_key: reader_key.public_key(),
                permissions: all,
            },
        ],
        tls: Some(tls),
    });
    let seed_file = dir.path().join("node.nk");
    trellis_common::dirs::write_private_file(&seed_file, node_key.seed().expect("seed").as_bytes())
        .expect("write seed");
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let extra_config = format!(
        "[bus]\nurl = \"{url}\"\nnkey_seed_file = \"{}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        seed_file.display(),
        pki.ca_file.display(),
        pki.client_cert_file.display(),
        pki.client_key_file.display()
    );
    let node = Node::start(NodeOptions {
        node_name: Some(name.clone()),
        extra_config,
        ..Default::default()
    })
    .await;
    node.wait_bus_connected(Duration::from_secs(20)).await;
    assert_eq!(
        node.info("gateway")
            .await
            .expect("info")
            .bus
            .expect("bus")
            .url,
        url
    );
    assert!(
        !node.root().join("state/bus").exists(),
        "no private bus with an external one"
    );

    let tls_options = |options: ConnectOptions| {
        options
            .add_root_certificates(pki.ca_file.clone())
            .add_client_certificate(pki.client_cert_file.clone(), pki.client_key_file.clone())
            .require_tls(true)
    };
    let reader = tls_options(ConnectOptions::with_nkey(reader_key.seed().expect("seed")))
        .connect(url.as_str())
        .await
        .expect("the reader connects");
    let filter = format!("trellis.{name}.events.service.started");
    let publishers = |events: &[StoredEvent]| {
        ["storage", "network", "image", "runtime"]
            .iter()
            .all(|service| events.iter().any(|e| e.event.service == *service))
    };
    let stored = read_events_with(reader, &filter, Duration::from_secs(20), publishers).await;
    assert!(stored.iter().all(|e| e.event.node == name), "{stored:?}");

    let no_key = tls_options(ConnectOptions::new())
        .connect(url.as_str())
        .await
        .expect_err("no nkey");
    assert_eq!(
        no_key.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{no_key}"
    );
    let no_certificate = ConnectOptions::with_nkey(node_key.seed().expect("seed"))
        .add_root_certificates(pki.ca_file.clone())
        .connect(url.as_str())
        .await;
    assert!(
        no_certificate.is_err(),
        "a client without a certificate is refused"
    );
    // nats-server logs the refusal after closing the connection: wait for the line.
    let logged = Instant::now() + Duration::from_secs(5);
    while !nats.log().contains("client didn't provide a certificate") && Instant::now() < logged {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        nats.log().contains("client didn't provide a certificate"),
        "refused for its missing certificate:\n{}",
        nats.log()
    );
    node.stop();
}

/// The systemd and compose way: `trellis bus-credentials` writes the users, nats-server
/// runs its configuration, and each service, started on its own, is given its own seed
/// file; every service connects and its events are heard.
#[tokio::test(flavor = "multi_thread")]
async fn services_started_on_their_own_use_the_users_bus_credentials_writes() {
    let root = tempfile::tempdir().expect("tempdir");
    let path = root.path();
    let name = trellis_integration::new_node_name();
    let config = path.join("trellis.toml");
    std::fs::write(&config, format!("[node]\nname = \"{name}\"\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[network]\ncni_config_dir = \"{0}/cni\"\n", path.display())).expect("config");
    std::fs::create_dir_all(path.join("cni")).expect("cni dir");
    let config = config.to_str().expect("utf-8");
    let port = trellis_integration::free_port();
    let bus = path.join("bus");
    let written = std::process::Command::new(trellis_integration::binary("trellis"))
        .args([
            "--config",
            config,
            "bus-credentials",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(&bus)
        .output()
        .expect("trellis bus-credentials");
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    let nats = NatsServer::start_with_file(path, port, &bus.join("nats-server.conf"));
    let seed_of = |service: &str| {
        std::fs::read_to_string(bus.join(format!("{service}.nk")))
            .expect("seed")
            .trim()
            .to_string()
    };
    let (gateway, _errors) =
        connect_as(&nats.url(), ConnectOptions::with_nkey(seed_of("gateway"))).await;
    let mut heard = gateway
        .subscribe(format!("trellis.{name}.events.service.started"))
        .await
        .expect("subscribe");
    gateway.flush().await.expect("flush");

    let mut services = Vec::new();
    for service in SERVICES {
        let env = [
            ("TRELLIS_BUS_URL".to_string(), nats.url()),
            (
                "TRELLIS_BUS_NKEY_SEED_FILE".to_string(),
                bus.join(format!("{service}.nk")).display().to_string(),
            ),
        ];
        services.push(ServiceProcess::spawn_with_env(
            &format!("trellis-{service}"),
            &["--config", config],
            &env,
            &path.join(format!("{service}.log")),
        ));
        let socket = path.join("run").join(if service == "gateway" {
            "trellis.sock".to_string()
        } else {
            format!("{service}.sock")
        });
        let mut info = trellis_proto::service::v1::service_info_client::ServiceInfoClient::new(
            trellis_integration::unix_channel(&socket),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let bus = info
                .info(trellis_proto::service::v1::InfoRequest {})
                .await
                .ok()
                .and_then(|r| r.into_inner().bus);
            if bus.as_ref().is_some_and(|bus| bus.connected) {
                break;
            }
            let log =
                std::fs::read_to_string(path.join(format!("{service}.log"))).unwrap_or_default();
            assert!(
                std::time::Instant::now() < deadline,
                "{service} not connected: {bus:?}\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut publishers = std::collections::BTreeSet::new();
    while publishers.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(20), heard.next())
            .await
            .unwrap_or_else(|_| panic!("heard only {publishers:?}"))
            .expect("subscription");
        publishers.insert(Event::decode(message.payload).expect("event").service);
    }
    assert_eq!(
        publishers.into_iter().collect::<Vec<_>>(),
        ["image", "network", "runtime", "storage"]
    );
    assert!(!nats.log().contains("Violation"), "{}", nats.log());
    drop(services);
}
