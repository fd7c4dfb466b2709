//! What every Trellis service process does around its own gRPC services: load the
//! configuration, install telemetry, own its socket, open its records, start the
//! event bus, serve health and info next to its services, export metrics, and shut
//! down cleanly on SIGTERM or SIGINT (or SIGHUP, when its starter died).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use trellis_proto::events::v1::{ServiceEvent, event::Payload, service_event};
use trellis_proto::service::v1::service_info_server::{ServiceInfo, ServiceInfoServer};
use trellis_proto::service::v1::{BusInfo, InfoRequest, InfoResponse};

use crate::bus::EventBus;
use crate::config::{Config, ConfigSource, ServiceKind};
use crate::error::CommonError;
use crate::metrics::grpc::{GrpcMetrics, GrpcService};
use crate::store::{SledStore, Store};
use crate::telemetry::{Telemetry, grpc_server_span};
use crate::transport::OwnedSocket;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The flags every service binary and `trellis` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file [default: /etc/trellis/trellis.toml, or $TRELLIS_CONFIG].
    #[arg(long, short = 'c', global = true)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set gateway.metrics_listen=127.0.0.1:9460` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", global = true)]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    pub fn source(&self) -> ConfigSource {
        ConfigSource {
            file: self.config.clone(),
            overrides: self.overrides.clone(),
        }
    }

    /// The same settings as command-line arguments, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(config) = &self.config {
            args.extend(["--config".to_string(), config.display().to_string()]);
        }
        for set in &self.overrides {
            args.extend(["--set".to_string(), set.clone()]);
        }
        args
    }
}

#[derive(Debug, clap::Parser)]
#[command(version = VERSION)]
struct ServiceCli {
    #[command(flatten)]
    config: ConfigArgs,
}

/// Handed to a service's builder: everything it needs to build its gRPC services.
pub struct ServiceContext {
    pub kind: ServiceKind,
    pub config: Config,
    pub node: String,
    pub store: Option<Arc<dyn Store>>,
    pub bus: EventBus,
    pub registry: Registry,
    /// Turns true when the process begins to stop: a stream that would never end on
    /// its own (a watch) ends then, rather than holding the stop for its grace period.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// This process's name among its service's replicas (`image`, `image-2`).
    pub replica: String,
    /// Whether an earlier process of this replica still serves (an overlapping
    /// restart: it drains the calls it took while this one starts).
    pub predecessor_serving: bool,
    /// Checks, besides the record store's, that the service can do its job; see
    /// [`ServiceContext::add_readiness_probe`].
    probes: Vec<ReadinessProbe>,
}

/// One check of whether a service can do its job: `Err` says why not. Called from a
/// blocking thread every [`HEALTH_INTERVAL`]; it should be quick.
pub type ReadinessProbe = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// How often the skeleton checks readiness and sets the gRPC health status.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

impl ServiceContext {
    /// Adds a check to the service's health: while any fails, health is NOT_SERVING
    /// with its reason (`trellis up` restarts a child that stays so).
    pub fn add_readiness_probe(&mut self, probe: ReadinessProbe) {
        self.probes.push(probe);
    }
}

/// Runs a service process to completion. `build` returns the service's own gRPC
/// services; health and info are added here.
pub fn run<B>(kind: ServiceKind, build: B) -> Result<(), CommonError>
where
    B: AsyncFnOnce(&mut ServiceContext) -> Result<Routes, Box<dyn std::error::Error + Send + Sync>>,
{
    use clap::Parser;
    let cli = ServiceCli::parse();
    let config = cli.config.source().load()?;
    // The async tasks run on one thread. The services mostly wait on sockets and child
    // processes, and a call crosses several tasks (the connection, the handler, the
    // client of the next service): on one thread each hand-over is a queue push, where
    // worker threads would wake each other for every one of them, and each keep a
    // stack and an allocator arena of its own. Blocking work has tokio's blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CommonError::Io {
            what: "cannot start the async runtime".into(),
            source,
        })?;
    runtime.block_on(serve(kind, config, build))
}

async fn serve<B>(kind: ServiceKind, config: Config, build: B) -> Result<(), CommonError>
where
    B: AsyncFnOnce(&mut ServiceContext) -> Result<Routes, Box<dyn std::error::Error + Send + Sync>>,
{
    let replica = replica_of(&config, kind)?;
    let name = crate::config::replica_name(kind, replica);
    let process = format!("trellis-{name}");
    let process = process.as_str();
    let telemetry = Telemetry::init(process, &config.telemetry)?;
    config.log_notices();
    let endpoint = replica_endpoint(&config, kind, replica);
    // Handed down by `trellis up` or systemd, the socket is the parent's: it stays
    // (and keeps queueing connections) when this process ends. Alone, the service
    // binds and owns it.
    let (socket, listener) = match crate::activation::take_listener(&name)? {
        Some(listener) => {
            tracing::info!(socket = %endpoint.socket.display(), "serving on the socket handed down by the parent (LISTEN_FDS)");
            (None, listener)
        }
        None => {
            let mut socket = OwnedSocket::bind(&endpoint.socket, endpoint.socket_mode)?;
            let listener = socket.listener.take().ok_or_else(|| CommonError::Io {
                what: format!("socket {} has no listener", endpoint.socket.display()),
                source: std::io::Error::other("listener already taken"),
            })?;
            (Some(socket), listener)
        }
    };
    let listener = crate::transport::into_async(listener).map_err(|source| CommonError::Io {
        what: format!("cannot serve on {}", endpoint.socket.display()),
        source,
    })?;

    let mut predecessor_serving = false;
    let store: Option<Arc<dyn Store>> = if kind.is_stateful() {
        // The state directory holds image layers and container files: root only.
        crate::dirs::ensure_private_dir(&config.node.state_dir).map_err(|source| {
            CommonError::Io {
                what: format!(
                    "cannot make the state directory {} private (0700)",
                    config.node.state_dir.display()
                ),
                source,
            }
        })?;
        // Each replica its own records (an image replica's are only its outbox).
        let (store, spare) = open_store(kind, &config.node.state_dir.join(&name))?;
        predecessor_serving = spare;
        Some(Arc::new(store))
    } else {
        None
    };
    let node = config.node_name();
    let bus = EventBus::start(&config.bus, node.clone(), kind.name(), store.clone()).await?;
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let mut context = ServiceContext {
        stopping: stop.clone(),
        kind,
        config: config.clone(),
        node: node.clone(),
        store,
        bus: bus.clone(),
        registry: Registry::with_prefix("trellis"),
        replica: name.clone(),
        predecessor_serving,
        probes: Vec::new(),
    };
    let routes = build(&mut context).await.map_err(CommonError::Build)?;

    crate::metrics::process::register(&mut context.registry, kind.name(), VERSION, bus.clone());
    let grpc_metrics = GrpcMetrics::register(&mut context.registry, &served_by(kind));
    let metrics_address = match endpoint.metrics_listen {
        Some(address) => Some(crate::metrics::serve(address, Arc::new(context.registry)).await?),
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let not_serving_reason = Arc::new(std::sync::Mutex::new(String::new()));
    let mut probes = std::mem::take(&mut context.probes);
    if let Some(store) = context.store.clone() {
        // A store that failed to write is reopened here too, so a service with no
        // calls coming heals as soon as writing works again.
        probes.insert(
            0,
            Box::new(move || store.check().map_err(|e| e.to_string())),
        );
    }
    tokio::spawn(watch_readiness(probes, health, not_serving_reason.clone()));
    let info = Info {
        kind,
        node,
        socket: endpoint.socket.clone(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default(),
        bus: bus.clone(),
        metrics_address,
        not_serving_reason,
    };
    let routes = routes
        .add_service(health_service)
        .add_service(ServiceInfoServer::new(info));

    publish_lifecycle(&bus, service_event::Kind::Started);
    tracing::info!(socket = %endpoint.socket.display(), metrics = ?metrics_address, bus = %config.bus.url, pid = std::process::id(), "{process} {VERSION} serving");

    // Every connection goes through the authority shim: Go clients dialling a socket
    // path would otherwise be refused by the HTTP/2 server (see `authority`).
    let incoming =
        UnixListenerStream::new(listener).map(|accepted| accepted.map(crate::authority::normalize));
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(crate::transport::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::transport::CONNECTION_WINDOW_BYTES)
        .trace_fn(grpc_server_span)
        // Outermost: a call its caller dropped still runs, and is counted, to its end.
        .layer(crate::detach::DetachLayer {
            enabled: kind.runs_calls_to_their_end(),
        })
        .layer(grpc_metrics.layer())
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            let mut stop = stop;
            let _ = stop.wait_for(|stopping| *stopping).await;
        });
    // The listener is polled from the first await below; until then callers wait in
    // its backlog, so ready means ready.
    crate::notify::tell(crate::notify::READY);
    // On the signal the server stops accepting (callers wait in the socket's backlog
    // for the next process when the socket is held by a parent), sends GOAWAY, and
    // waits for the calls it accepted; watch streams end at once (`stopping`), asked to
    // come back. Only calls still open after the grace are cut.
    let grace = Duration::from_secs(config.node.shutdown_grace_seconds);
    let why = std::sync::OnceLock::new();
    let result = tokio::select! {
        result = server => result,
        _ = async {
            let reason = shutdown_signal().await;
            let _ = why.set(reason);
            if reason == StopReason::Asked {
                crate::notify::tell(crate::notify::STOPPING);
            }
            let _ = stopping.send(true);
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "calls still open after node.shutdown_grace_seconds are cut");
            Ok(())
        }
    };

    tracing::info!("{process} shutting down");
    publish_lifecycle(&bus, service_event::Kind::Stopping);
    if !bus.drain(Duration::from_secs(2)).await {
        tracing::warn!(
            pending = bus.status().pending,
            "bus unreachable: undelivered events stay in the outbox for the next start"
        );
    }
    match socket {
        Some(owned) => drop(owned),
        // The starter's lock goes with its last thread, a moment after the signal
        // that its first dying thread sent.
        None => crate::transport::remove_if_orphaned(
            &endpoint.socket,
            match why.get() {
                Some(StopReason::StarterGone) => Duration::from_secs(3),
                _ => Duration::ZERO,
            },
        ),
    }
    match &result {
        Ok(()) => tracing::info!("{process} stopped cleanly"),
        Err(error) => tracing::error!(%error, "{process} stopped: serving failed"),
    }
    telemetry.shutdown();
    result.map_err(|e| CommonError::Serve(e.to_string()))
}

/// The record store in `dir`. A service whose records are only its outbox may start
/// while its predecessor still drains (an overlapping restart): when `db` is held, it
/// takes `db-2` (and the other way round next time). Events the predecessor could not
/// deliver wait in its outbox for the next process that opens it. Says whether it
/// took the spare, so whether the predecessor still serves.
fn open_store(kind: ServiceKind, dir: &std::path::Path) -> Result<(SledStore, bool), CommonError> {
    let first = dir.join("db");
    let opened = if kind.keeps_only_an_outbox() {
        SledStore::open_unless_held(&first)
    } else {
        SledStore::open(&first)
    };
    match opened {
        Err(error) if kind.keeps_only_an_outbox() && error.held_by_another() => {
            let second = dir.join("db-2");
            tracing::info!(held = %first.display(), using = %second.display(), "the previous process still holds its outbox (an overlapping restart); using the other one");
            Ok((SledStore::open(&second)?, true))
        }
        opened => Ok((opened?, false)),
    }
}

/// Which replica of `kind` this process is (`TRELLIS_REPLICA`, 1 when unset), checked
/// against the configured count: a replica the configuration does not have would
/// serve on a socket nobody calls.
fn replica_of(config: &Config, kind: ServiceKind) -> Result<u32, CommonError> {
    let Some(raw) = std::env::var_os(crate::config::REPLICA_ENV) else {
        return Ok(1);
    };
    let raw = raw.to_string_lossy();
    let count = config.replicas(kind);
    raw.parse::<u32>()
        .ok()
        .filter(|replica| (1..=count).contains(replica))
        .ok_or_else(|| CommonError::Io {
            what: format!(
                "{} `{}` is not a replica of the {} service (it has {count}: {}.replicas)",
                crate::config::REPLICA_ENV,
                crate::text::excerpt(&raw),
                kind.name(),
                kind.name()
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })
}

/// Where replica `replica` of `kind` serves: its own socket, and its metrics on the
/// configured port plus `replica - 1` (port 0, any free one, stays 0).
fn replica_endpoint(config: &Config, kind: ServiceKind, replica: u32) -> crate::config::Endpoint {
    let mut endpoint = config.endpoint(kind);
    endpoint.socket = config.replica_socket(kind, replica);
    if let Some(address) = endpoint.metrics_listen.as_mut()
        && address.port() != 0
    {
        let offset = u16::try_from(replica.saturating_sub(1)).unwrap_or(0);
        address.set_port(address.port().saturating_add(offset));
    }
    endpoint
}

/// Runs the readiness probes every [`HEALTH_INTERVAL`] and sets the health status
/// (and the reason `Info` gives) from them, logging each change once.
async fn watch_readiness(
    probes: Vec<ReadinessProbe>,
    health: tonic_health::server::HealthReporter,
    reason: Arc<std::sync::Mutex<String>>,
) {
    if probes.is_empty() {
        return;
    }
    let probes = Arc::new(probes);
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        tick.tick().await;
        let run = probes.clone();
        // Probes touch the disk (a store reopen may wait for a file lock).
        let failure =
            match tokio::task::spawn_blocking(move || run.iter().find_map(|probe| probe().err()))
                .await
            {
                Ok(failure) => failure,
                Err(error) => Some(format!("readiness probe failed: {error}")),
            };
        let now_serving = failure.is_none();
        match &failure {
            Some(why) if serving => {
                tracing::warn!(reason = %why, "NOT_SERVING: this service cannot do its job")
            }
            None if !serving => tracing::info!("SERVING again"),
            _ => {}
        }
        *reason.lock().unwrap_or_else(|p| p.into_inner()) = failure.unwrap_or_default();
        // Set on changes only: every set wakes the health watchers.
        if now_serving != serving {
            serving = now_serving;
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
        }
    }
}

fn publish_lifecycle(bus: &EventBus, kind: service_event::Kind) {
    let event = ServiceEvent {
        kind: kind.into(),
        pid: std::process::id(),
        version: VERSION.to_string(),
    };
    if let Err(error) = bus.publish(Payload::ServiceEvent(event)) {
        tracing::error!(%error, "cannot record a service event");
    }
}

/// Why a service stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// SIGTERM or SIGINT: an operator, systemd or `trellis up` asked.
    Asked,
    /// SIGHUP, the parent-death signal `trellis up` gives its children: the starter
    /// holding this service's socket died (SIGKILL), so the socket is this
    /// service's to remove (see `transport::remove_if_orphaned`).
    StarterGone,
}

async fn shutdown_signal() -> StopReason {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = hup.recv() => {
            tracing::info!("SIGHUP received: the process that started this one is gone");
            return StopReason::StarterGone;
        }
    }
    StopReason::Asked
}

/// The gRPC services a process of `kind` serves, for its call metrics.
fn served_by(kind: ServiceKind) -> Vec<GrpcService> {
    use crate::metrics::grpc::{CRI_IMAGE, CRI_RUNTIME, HEALTH, NETWORK, SERVICE_INFO, STORAGE};
    let own: &[GrpcService] = match kind {
        ServiceKind::Gateway => &[CRI_RUNTIME, CRI_IMAGE],
        ServiceKind::Runtime => &[CRI_RUNTIME],
        ServiceKind::Image => &[CRI_IMAGE],
        ServiceKind::Storage => &[STORAGE],
        ServiceKind::Network => &[NETWORK],
    };
    own.iter().copied().chain([HEALTH, SERVICE_INFO]).collect()
}

struct Info {
    kind: ServiceKind,
    node: String,
    socket: PathBuf,
    started: i64,
    bus: EventBus,
    metrics_address: Option<SocketAddr>,
    not_serving_reason: Arc<std::sync::Mutex<String>>,
}

#[tonic::async_trait]
impl ServiceInfo for Info {
    async fn info(
        &self,
        _: tonic::Request<InfoRequest>,
    ) -> Result<tonic::Response<InfoResponse>, tonic::Status> {
        let bus = self.bus.status();
        Ok(tonic::Response::new(InfoResponse {
            service: self.kind.name().to_string(),
            version: VERSION.to_string(),
            pid: std::process::id(),
            node: self.node.clone(),
            socket: self.socket.display().to_string(),
            started_unix_seconds: self.started,
            bus: Some(BusInfo {
                url: bus.url,
                connected: bus.connected,
                outbox_pending: bus.pending,
                outbox_dropped: bus.dropped,
            }),
            metrics_address: self
                .metrics_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
            not_serving_reason: self
                .not_serving_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::{HealthReporter, HealthService};

    use super::*;

    async fn status(health: &HealthService) -> i32 {
        health
            .check(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .expect("check")
            .into_inner()
            .status
    }

    /// A failing probe turns health NOT_SERVING with its reason; once it passes,
    /// SERVING again with no reason.
    #[tokio::test]
    async fn health_follows_the_readiness_probes() {
        let reporter = HealthReporter::new();
        let health = HealthService::from_health_reporter(reporter.clone());
        let full = Arc::new(AtomicBool::new(true));
        let probe_full = full.clone();
        let probes: Vec<ReadinessProbe> = vec![
            Box::new(|| Ok(())),
            Box::new(move || {
                if probe_full.load(Ordering::SeqCst) {
                    Err("no space left in /var/lib/trellis".into())
                } else {
                    Ok(())
                }
            }),
        ];
        let reason = Arc::new(std::sync::Mutex::new(String::new()));
        let watcher = tokio::spawn(watch_readiness(probes, reporter, reason.clone()));
        tokio::time::sleep(HEALTH_INTERVAL / 2).await;
        assert_eq!(
            status(&health).await,
            tonic_health::ServingStatus::NotServing as i32
        );
        assert_eq!(
            *reason.lock().expect("reason"),
            "no space left in /var/lib/trellis"
        );
        full.store(false, Ordering::SeqCst);
        tokio::time::sleep(HEALTH_INTERVAL + HEALTH_INTERVAL / 2).await;
        assert_eq!(
            status(&health).await,
            tonic_health::ServingStatus::Serving as i32
        );
        assert!(reason.lock().expect("reason").is_empty());
        watcher.abort();
    }
}
