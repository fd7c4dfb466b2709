//! `trellis up`: the all-in-one node supervisor.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use trellis_common::config::{Config, ServiceKind};
use trellis_common::service::ConfigArgs;
use trellis_common::transport::OwnedSocket;

use crate::child::{ChildError, ChildSpec};
use crate::notifications::Notifications;
use crate::private_bus::PrivateBus;
use crate::supervise::{Readiness, Supervised, Takeover, Watch, start};

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{program} not found{hint}")]
    MissingProgram { program: String, hint: String },
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error("cannot hold the {service} socket: {source}")]
    Socket {
        service: String,
        #[source]
        source: trellis_common::transport::TransportError,
    },
    #[error("cannot find a free loopback port for the private bus: {0}")]
    Port(std::io::Error),
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("private bus credentials: {0}")]
    Credentials(String),
    #[error("{name} {reason} while starting (see its log above)")]
    StartFailed { name: String, reason: String },
    #[error("{name} did not become healthy within {timeout:?}: {last}")]
    StartTimeout {
        name: String,
        timeout: Duration,
        last: String,
    },
    #[error("interrupted while starting")]
    Interrupted,
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot make {path} for the services to say they are ready: {source}")]
    Notify {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// How much longer than its own drain (`node.shutdown_grace_seconds`) a child gets to
/// exit after SIGTERM before it is killed: the bus flush and its exit come after.
const STOP_MARGIN: Duration = Duration::from_secs(5);
pub async fn run(args: &ConfigArgs, config: Config) -> anyhow::Result<()> {
    let telemetry = trellis_common::telemetry::Telemetry::init("trellis-up", &config.telemetry)?;
    config.log_notices();
    crate::restarts::start(&config.node.run_dir);
    // Checked when the configuration was loaded: an address that does not parse is none.
    let listen = config.supervisor.metrics_listen.parse().ok();
    if let Some(address) = crate::up_metrics::start(listen).await? {
        tracing::info!(metrics = %address, "serving the supervisor's metrics");
    }
    let result = supervise_node(args, &config).await;
    crate::restarts::stop();
    match &result {
        Ok(()) => tracing::info!("node stopped cleanly"),
        Err(error) => tracing::error!(%error, "node stopped"),
    }
    telemetry.shutdown();
    Ok(result?)
}

async fn supervise_node(args: &ConfigArgs, config: &Config) -> Result<(), UpError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(UpError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(UpError::Signals)?;
    let bin_dir = binary_dir(config);
    let unhealthy_after = match config.supervisor.unhealthy_restart_after_seconds {
        0 => None,
        seconds => Some(Duration::from_secs(seconds)),
    };
    let stop_grace = Duration::from_secs(config.node.shutdown_grace_seconds) + STOP_MARGIN;
    // Every service socket is created and held here for the life of the node, and a
    // copy handed to the service: a service that restarts (or is killed) leaves its
    // socket listening, so callers wait in the backlog for the next process instead of
    // being refused. Dropped (files removed) only after every child has stopped.
    let mut held = Vec::new();
    let members = hold_sockets(config, &mut held)?;
    let mut running: Vec<Supervised> = Vec::new();

    let startup = async {
        let mut bus: Option<PrivateBus> = None;
        if config.bus.url.is_empty() {
            let private = PrivateBus::prepare(config)?;
            running.push(
                start(
                    private.spec.clone(),
                    Watch {
                        readiness: Readiness::Tcp(private.address),
                        unhealthy_after: None,
                        stop_grace,
                        takeover: Takeover::HandOver,
                        notify: None,
                    },
                )
                .await?,
            );
            bus = Some(private);
        }
        for member in &members {
            let kind = member.kind;
            let program = bin_dir.join(kind.binary());
            if !program.is_file() {
                return Err(UpError::MissingProgram {
                    program: program.display().to_string(),
                    hint: " (build with `cargo build --release`, or set node.bin_dir)".into(),
                });
            }
            let mut env = bus.as_ref().map(|bus| bus.env(kind)).unwrap_or_default();
            let notify_dir = crate::control::private_dir(&config.node.run_dir);
            let notify = Notifications::bind(&notify_dir, &member.name).map_err(|source| {
                UpError::Notify {
                    path: notify_dir.clone(),
                    source,
                }
            })?;
            env.push((
                trellis_common::notify::ENV.to_string(),
                notify.path().display().to_string(),
            ));
            env.push((
                trellis_common::config::REPLICA_ENV.to_string(),
                member.replica.to_string(),
            ));
            let spec = ChildSpec {
                name: member.name.clone(),
                program,
                args: args.to_args(),
                env,
                listen: Some((member.listener.clone(), member.name.clone())),
            };
            let watch = Watch {
                readiness: Readiness::Grpc(member.socket.clone()),
                unhealthy_after,
                stop_grace,
                // A record store is one process's at a time; an outbox has a spare.
                takeover: if kind.is_stateful() && !kind.keeps_only_an_outbox() {
                    Takeover::HandOver
                } else {
                    Takeover::Overlap
                },
                notify: Some(Arc::new(notify)),
            };
            running.push(start(spec, watch).await?);
        }
        Ok(bus)
    };
    let started = tokio::select! {
        result = startup => result,
        _ = term.recv() => Err(UpError::Interrupted),
        _ = int.recv() => Err(UpError::Interrupted),
    };
    let mut started = started;
    if started.is_ok() {
        let orders = running
            .iter()
            .map(|child| (child.name.clone(), child.orders.clone()))
            .collect();
        match crate::control::serve(&config.node.run_dir, orders) {
            Ok(control) => {
                tracing::info!(gateway = %config.endpoint(ServiceKind::Gateway).socket.display(), control = %control.path().display(), "node is up");
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: stopping the node"),
                    _ = int.recv() => tracing::info!("SIGINT: stopping the node"),
                }
                // No replacement starts while the node stops.
                drop(control);
            }
            Err(error) => started = Err(error.into()),
        }
    }
    // Reverse order: the gateway stops taking calls before the services behind it go.
    while let Some(child) = running.pop() {
        let _ = child.stop.send(true);
        let _ = child.task.await;
        tracing::info!(child = %child.name, "stopped");
    }
    drop(members);
    drop(held);
    match started {
        // Asked to stop before the node was complete: a clean stop all the same.
        Err(UpError::Interrupted) => {
            tracing::info!("stopped during start-up");
            Ok(())
        }
        // The private bus (its lock) is let go only once every child has stopped.
        other => other.map(drop),
    }
}

/// One process `trellis up` runs for a service: the service, or one of its replicas.
struct Member {
    kind: ServiceKind,
    replica: u32,
    name: String,
    socket: PathBuf,
    listener: Arc<OwnedFd>,
}

/// Binds and holds every service socket for the life of the node (into `held`, which
/// removes the files when dropped), and says which process gets which: each image
/// replica its own socket, every gateway replica the one CRI socket. A service that
/// restarts (or is killed) leaves its socket listening, so callers wait in the
/// backlog for the next process instead of being refused.
fn hold_sockets(config: &Config, held: &mut Vec<OwnedSocket>) -> Result<Vec<Member>, UpError> {
    let mut members = Vec::new();
    for kind in ServiceKind::START_ORDER {
        let mode = config.endpoint(kind).socket_mode;
        let mut shared: Option<Arc<OwnedFd>> = None;
        for replica in 1..=config.replicas(kind) {
            let name = trellis_common::config::replica_name(kind, replica);
            let socket = config.replica_socket(kind, replica);
            let listener = match &shared {
                Some(listener) => listener.clone(),
                None => {
                    let socket_error = |source| UpError::Socket {
                        service: name.clone(),
                        source,
                    };
                    let mut owned = OwnedSocket::bind(&socket, mode).map_err(socket_error)?;
                    let listener = owned.listener.take().ok_or_else(|| {
                        socket_error(trellis_common::transport::TransportError::Bind {
                            path: socket.clone(),
                            source: std::io::Error::other("listener already taken"),
                        })
                    })?;
                    held.push(owned);
                    Arc::new(OwnedFd::from(listener))
                }
            };
            if kind == ServiceKind::Gateway {
                shared = Some(listener.clone());
            }
            members.push(Member {
                kind,
                replica,
                name,
                socket,
                listener,
            });
        }
    }
    Ok(members)
}

fn binary_dir(config: &Config) -> PathBuf {
    if !config.node.bin_dir.is_empty() {
        return PathBuf::from(&config.node.bin_dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin"))
}
