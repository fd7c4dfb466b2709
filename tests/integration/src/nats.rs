//! A nats-server with JetStream, run by a test so that it can stop and restart it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_nats::jetstream;
use futures::StreamExt;
use prost::Message;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use trellis_common::bus::server_config::ServerConfig;
use trellis_proto::events::v1::Event;
use trellis_proto::events::v1::event::Payload;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
    /// A configuration file (users, TLS); none means open to all, on flags alone.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts on a free loopback port with its store under `dir`, without
    /// authentication.
    pub fn start(dir: &Path) -> NatsServer {
        let mut server = NatsServer {
            port: crate::free_port(),
            store: dir.join("nats-store"),
            log: dir.join("nats.log"),
            config: None,
            child: None,
        };
        server.restart();
        server
    }

    /// Starts with the configuration `configure` makes for the chosen loopback port
    /// and store (the way `trellis up` configures its private bus, here with the test's
    /// own users and TLS).
    pub fn start_configured(
        dir: &Path,
        configure: impl FnOnce(SocketAddr, PathBuf) -> ServerConfig,
    ) -> NatsServer {
        let port = crate::free_port();
        let store = dir.join("nats-store");
        let text = configure(SocketAddr::from(([127, 0, 0, 1], port)), store.clone())
            .render()
            .expect("render the nats-server configuration");
        let config = dir.join("nats-server.conf");
        trellis_common::dirs::write_private_file(&config, text.as_bytes())
            .expect("write the nats-server configuration");
        let mut server = NatsServer {
            port,
            store,
            log: dir.join("nats.log"),
            config: Some(config),
            child: None,
        };
        server.restart();
        server
    }

    /// Starts with a configuration file made elsewhere (`trellis bus-credentials`),
    /// which listens on `port`.
    pub fn start_with_file(dir: &Path, port: u16, config: &Path) -> NatsServer {
        let mut server = NatsServer {
            port,
            store: dir.join("nats-store"),
            log: dir.join("nats.log"),
            config: Some(config.to_path_buf()),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// What the server logged (permission violations, refused clients).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (Re)starts on the same port and store, and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats log");
        let mut command = Command::new(nats_server());
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command
                .args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-sd",
                ])
                .arg(&self.store),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn nats_server() -> PathBuf {
    [
        "/usr/bin/nats-server",
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("nats-server is not installed (apt-get install nats-server)")
}

/// One event read back from the events stream, with the message id JetStream
/// de-duplicated it by.
#[derive(Debug)]
pub struct StoredEvent {
    pub event: Event,
    pub message_id: Option<String>,
    pub subject: String,
    /// The `Trellis-Node` header: the node that raised it, for a fleet's consumers.
    pub node_header: Option<String>,
}

/// Reads the events stream from its start, on subjects matching `filter`, until
/// `done` says enough has been read; panics after `timeout`.
pub async fn read_events(
    url: &str,
    filter: &str,
    timeout: Duration,
    done: impl Fn(&[StoredEvent]) -> bool,
) -> Vec<StoredEvent> {
    read_events_with(
        async_nats::connect(url).await.expect("connect to NATS"),
        filter,
        timeout,
        done,
    )
    .await
}

/// [`read_events`] through a client of the caller's (with credentials).
pub async fn read_events_with(
    client: async_nats::Client,
    filter: &str,
    timeout: Duration,
    done: impl Fn(&[StoredEvent]) -> bool,
) -> Vec<StoredEvent> {
    // The services make the stream when they first reach the bus, which may come
    // after a node's sockets answer (they are held for the services from the start).
    let context = jetstream::new(client);
    let started = std::time::Instant::now();
    let stream = loop {
        match context.get_stream("TRELLIS_EVENTS").await {
            Ok(stream) => break stream,
            Err(error) if started.elapsed() > timeout => panic!("events stream: {error:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // In a cluster that just lost a server, creating a consumer may time out until
    // JetStream has elected new leaders: try again until `timeout`.
    let consumer = loop {
        let created = stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: filter.to_string(),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::None,
                ..Default::default()
            })
            .await;
        match created {
            Ok(consumer) => break consumer,
            Err(error) if started.elapsed() > timeout => panic!("consumer: {error:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut messages = consumer.messages().await.expect("messages");
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    while !done(&events) {
        let message = match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            messages.next(),
        )
        .await
        {
            Ok(Some(Ok(message))) => message,
            other => panic!(
                "events stream ended or timed out ({other:?}) after {} events: {events:#?}",
                events.len()
            ),
        };
        events.push(stored_event(&message));
    }
    events
}

/// An event message of the stream, decoded.
pub fn stored_event(message: &async_nats::Message) -> StoredEvent {
    let event = Event::decode(message.payload.clone()).expect("event payload");
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    StoredEvent {
        event,
        message_id: header("Nats-Msg-Id"),
        subject: message.subject.to_string(),
        node_header: header(trellis_common::bus::NODE_HEADER),
    }
}

/// How many messages the events stream holds.
pub async fn stream_len(url: &str) -> u64 {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let mut stream = jetstream::new(client)
        .get_stream("TRELLIS_EVENTS")
        .await
        .expect("events stream");
    stream.info().await.expect("stream info").state.messages
}

/// Waits until every service of `node` is connected to the bus and, with `drained`,
/// has nothing left in its outbox.
pub async fn wait_for_bus(node: &crate::Node, connected: bool, drained: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for service in crate::SERVICES {
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

/// Per sandbox id, in stored order: the kinds of its sandbox events, and of its
/// network events.
pub type Histories = (BTreeMap<String, Vec<String>>, BTreeMap<String, Vec<String>>);

pub fn histories(stored: &[StoredEvent]) -> Histories {
    let mut sandbox: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut network: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stored in stored {
        match &stored.event.payload {
            Some(Payload::Sandbox(e)) => sandbox
                .entry(e.sandbox_id.clone())
                .or_default()
                .push(e.kind().as_str_name().to_string()),
            Some(Payload::Network(e)) => network
                .entry(e.sandbox_id.clone())
                .or_default()
                .push(e.kind().as_str_name().to_string()),
            _ => {}
        }
    }
    (sandbox, network)
}

/// What a pod run, stopped and removed leaves: each sandbox event once, in order, and
/// each network event once, in order.
pub fn assert_pod_life(histories: &Histories, pod: &str) {
    assert_eq!(
        histories.0.get(pod).map(Vec::as_slice),
        Some(&["CREATED", "STARTED", "STOPPED", "DELETED"].map(String::from)[..]),
        "pod {pod}: each sandbox event once, in order"
    );
    assert_eq!(
        histories.1.get(pod).map(Vec::as_slice),
        Some(&["SET_UP", "TORN_DOWN"].map(String::from)[..]),
        "pod {pod}: each network event once, in order"
    );
}
