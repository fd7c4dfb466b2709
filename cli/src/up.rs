//! `trellis up`: the all-in-one node supervisor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_common::config::{Config, ServiceKind};
use trellis_common::service::ConfigArgs;

use crate::child::{ChildError, ChildSpec, describe, terminate};
use crate::private_bus::PrivateBus;
use crate::probe;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{program} not found{hint}")]
    MissingProgram { program: String, hint: String },
    #[error(transparent)]
    Child(#[from] ChildError),
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
}

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A child that ran this long before dying is restarted at once; quicker deaths back off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How `trellis up` tells that a child is ready.
#[derive(Debug, Clone)]
enum Readiness {
    Grpc(PathBuf),
    Tcp(SocketAddr),
}

impl Readiness {
    async fn check(&self) -> Result<(), String> {
        match self {
            Self::Grpc(socket) => match probe::health(socket).await? {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("health is {}", other.as_str_name())),
            },
            Self::Tcp(address) => tokio::net::TcpStream::connect(address)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

struct Supervised {
    name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub async fn run(args: &ConfigArgs, config: Config) -> anyhow::Result<()> {
    let telemetry = trellis_common::telemetry::Telemetry::init("trellis-up", &config.telemetry)?;
    config.log_notices();
    let result = supervise_node(args, &config).await;
    telemetry.shutdown();
    Ok(result?)
}

async fn supervise_node(args: &ConfigArgs, config: &Config) -> Result<(), UpError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(UpError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(UpError::Signals)?;
    let bin_dir = binary_dir(config);
    let mut running: Vec<Supervised> = Vec::new();

    let startup = async {
        let mut bus: Option<PrivateBus> = None;
        if config.bus.url.is_empty() {
            let private = PrivateBus::prepare(config)?;
            running.push(start(private.spec.clone(), Readiness::Tcp(private.address)).await?);
            bus = Some(private);
        }
        for kind in ServiceKind::START_ORDER {
            let program = bin_dir.join(kind.binary());
            if !program.is_file() {
                return Err(UpError::MissingProgram {
                    program: program.display().to_string(),
                    hint: " (build with `cargo build --release`, or set node.bin_dir)".into(),
                });
            }
            let env = bus.as_ref().map(|bus| bus.env(kind)).unwrap_or_default();
            let spec = ChildSpec {
                name: kind.name().to_string(),
                program,
                args: args.to_args(),
                env,
            };
            running.push(start(spec, Readiness::Grpc(config.endpoint(kind).socket)).await?);
        }
        Ok(bus)
    };
    let started = tokio::select! {
        result = startup => result,
        _ = term.recv() => Err(UpError::Interrupted),
        _ = int.recv() => Err(UpError::Interrupted),
    };
    if started.is_ok() {
        tracing::info!(gateway = %config.endpoint(ServiceKind::Gateway).socket.display(), "node is up");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the node"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the node"),
        }
    }
    // Reverse order: the gateway stops taking calls before the services behind it go.
    while let Some(child) = running.pop() {
        let _ = child.stop.send(true);
        let _ = child.task.await;
        tracing::info!(child = %child.name, "stopped");
    }
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

/// Starts a child, waits until it is ready, then leaves it to a supervising task.
async fn start(spec: ChildSpec, readiness: Readiness) -> Result<Supervised, UpError> {
    let mut child = spec.spawn()?;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpError::StartFailed {
                name: spec.name.clone(),
                reason: describe(&Ok(status)),
            });
        }
        match readiness.check().await {
            Ok(()) => break,
            Err(reason) => last = reason,
        }
        if Instant::now() > deadline {
            terminate(&spec.name, &mut child, STOP_GRACE).await;
            return Err(UpError::StartTimeout {
                name: spec.name.clone(),
                timeout: START_TIMEOUT,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tracing::info!(child = %spec.name, pid = child.id(), "ready");
    let (stop, stopped) = watch::channel(false);
    let name = spec.name.clone();
    let task = tokio::spawn(keep_running(spec, child, stopped));
    Ok(Supervised { name, stop, task })
}

/// Restarts the child whenever it dies, with backoff for repeated quick deaths, until
/// asked to stop; then stops it.
async fn keep_running(
    spec: ChildSpec,
    mut child: tokio::process::Child,
    mut stop: watch::Receiver<bool>,
) {
    let mut started = Instant::now();
    let mut quick_deaths: u32 = 0;
    loop {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.changed() => {
                terminate(&spec.name, &mut child, STOP_GRACE).await;
                return;
            }
        };
        quick_deaths = if started.elapsed() >= STABLE_AFTER {
            0
        } else {
            quick_deaths.saturating_add(1)
        };
        loop {
            let delay = backoff(quick_deaths);
            tracing::error!(child = %spec.name, reason = %describe(&status), restart_in = ?delay, "child died; restarting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            match spec.spawn() {
                Ok(new) => {
                    child = new;
                    started = Instant::now();
                    tracing::info!(child = %spec.name, pid = child.id(), "restarted");
                    break;
                }
                Err(error) => {
                    tracing::error!(child = %spec.name, %error, "restart failed");
                    quick_deaths = quick_deaths.saturating_add(1);
                }
            }
        }
    }
}

fn backoff(quick_deaths: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(quick_deaths.min(16))).min(MAX_BACKOFF) / 2
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_small_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(30), MAX_BACKOFF / 2);
    }
}
