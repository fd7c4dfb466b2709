//! `trellis up`: the all-in-one node supervisor.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_common::config::{Config, ServiceKind};
use trellis_common::service::ConfigArgs;
use trellis_common::transport::OwnedSocket;

use crate::child::{ChildError, ChildSpec, describe, terminate};
use crate::private_bus::PrivateBus;
use crate::probe;
use crate::up_metrics::RestartReason;

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
}

const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its own drain (`node.shutdown_grace_seconds`) a child gets to
/// exit after SIGTERM before it is killed: the bus flush and its exit come after.
const STOP_MARGIN: Duration = Duration::from_secs(5);
/// A child that ran this long before dying is restarted at once; quicker deaths back off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How often a ready child's health is asked for.
const HEALTH_POLL: Duration = Duration::from_secs(1);

/// How `trellis up` tells that a child is ready.
#[derive(Debug, Clone)]
enum Readiness {
    Grpc(PathBuf),
    Tcp(SocketAddr),
    /// A health status set by a test.
    #[cfg(test)]
    Scripted(std::sync::Arc<std::sync::Mutex<ServingStatus>>),
}

impl Readiness {
    async fn check(&self) -> Result<(), String> {
        match self {
            Self::Tcp(address) => tokio::net::TcpStream::connect(address)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            _ => match self.health().await? {
                ServingStatus::Serving => Ok(()),
                other => Err(format!("health is {}", other.as_str_name())),
            },
        }
    }

    /// The child's gRPC health; a TCP child (the bus) is always SERVING once it listens.
    async fn health(&self) -> Result<ServingStatus, String> {
        match self {
            Self::Grpc(socket) => probe::health(socket).await,
            Self::Tcp(_) => Ok(ServingStatus::Serving),
            #[cfg(test)]
            Self::Scripted(status) => Ok(*status.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    /// Why the child says it is NOT_SERVING, when it says.
    async fn not_serving_reason(&self) -> String {
        match self {
            Self::Grpc(socket) => probe::info(socket)
                .await
                .map(|info| info.not_serving_reason)
                .unwrap_or_default(),
            _ => String::new(),
        }
    }
}

/// How long a child has reported NOT_SERVING, from the answers of its health polls.
#[derive(Debug)]
struct UnhealthyTimer {
    since: Option<Instant>,
}

impl UnhealthyTimer {
    /// Takes one poll's answer; returns how long the child has been NOT_SERVING. A poll
    /// that got no answer changes nothing: a busy child is not a sick one, and one that
    /// died is seen dying.
    fn observe(&mut self, health: &Result<ServingStatus, String>, now: Instant) -> Duration {
        match health {
            Ok(ServingStatus::Serving) => self.since = None,
            Ok(_) => {
                self.since.get_or_insert(now);
            }
            Err(_) => {}
        }
        self.since.map_or(Duration::ZERO, |since| now - since)
    }
}

/// Polls the child's health until it has been NOT_SERVING for `after`, then returns
/// its reason; never returns when `after` is `None`.
async fn until_unhealthy_for(readiness: &Readiness, after: Option<Duration>) -> String {
    let Some(after) = after else {
        return std::future::pending().await;
    };
    let mut timer = UnhealthyTimer { since: None };
    let mut tick = tokio::time::interval(HEALTH_POLL.min(after / 4).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let health = readiness.health().await;
        if timer.observe(&health, Instant::now()) >= after {
            return readiness.not_serving_reason().await;
        }
    }
}

/// A ready child is restarted after `unhealthy_after` of NOT_SERVING (never if `None`);
/// asked to stop, it gets `stop_grace` before it is killed.
#[derive(Debug, Clone)]
struct Watch {
    readiness: Readiness,
    unhealthy_after: Option<Duration>,
    stop_grace: Duration,
}

struct Supervised {
    name: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

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
    let mut sockets = Vec::new();
    for kind in ServiceKind::START_ORDER {
        let endpoint = config.endpoint(kind);
        let socket_error = |source| UpError::Socket {
            service: kind.name().to_string(),
            source,
        };
        let mut socket =
            OwnedSocket::bind(&endpoint.socket, endpoint.socket_mode).map_err(socket_error)?;
        let listener = socket.listener.take().ok_or_else(|| {
            socket_error(trellis_common::transport::TransportError::Bind {
                path: endpoint.socket.clone(),
                source: std::io::Error::other("listener already taken"),
            })
        })?;
        sockets.push((kind, Arc::new(OwnedFd::from(listener))));
        held.push(socket);
    }
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
                    },
                )
                .await?,
            );
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
            let listen = sockets
                .iter()
                .find(|(held, _)| *held == kind)
                .map(|(_, fd)| (fd.clone(), kind.name().to_string()));
            let spec = ChildSpec {
                name: kind.name().to_string(),
                program,
                args: args.to_args(),
                env,
                listen,
            };
            let watch = Watch {
                readiness: Readiness::Grpc(config.endpoint(kind).socket),
                unhealthy_after,
                stop_grace,
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
    drop(sockets);
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

/// Starts a child, waits until it is ready, then leaves it to a supervising task.
async fn start(spec: ChildSpec, watch: Watch) -> Result<Supervised, UpError> {
    let readiness = &watch.readiness;
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
            terminate(&spec.name, &mut child, watch.stop_grace).await;
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
    let task = tokio::spawn(keep_running(spec, child, watch, stopped));
    Ok(Supervised { name, stop, task })
}

/// How a supervised child's run ended, when it was not asked to stop.
enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    /// NOT_SERVING for longer than allowed: stopped, to be started again.
    Unhealthy {
        reason: String,
    },
}

/// Restarts the child whenever it dies or stays NOT_SERVING too long, with backoff for
/// repeated quick deaths, until asked to stop; then stops it.
async fn keep_running(
    spec: ChildSpec,
    mut child: tokio::process::Child,
    watch: Watch,
    mut stop: watch::Receiver<bool>,
) {
    let mut started = Instant::now();
    let mut quick_deaths: u32 = 0;
    loop {
        let ended = tokio::select! {
            status = child.wait() => Ended::Exited(status),
            _ = stop.changed() => {
                terminate(&spec.name, &mut child, watch.stop_grace).await;
                return;
            }
            reason = until_unhealthy_for(&watch.readiness, watch.unhealthy_after) => {
                Ended::Unhealthy { reason }
            }
        };
        quick_deaths = if started.elapsed() >= STABLE_AFTER {
            0
        } else {
            quick_deaths.saturating_add(1)
        };
        let delay = backoff(quick_deaths);
        let reason = match &ended {
            Ended::Exited(status) => RestartReason::of(status),
            Ended::Unhealthy { .. } => RestartReason::Unhealthy,
        };
        match &ended {
            // Stopped by someone else (a SIGTERM from an operator, say): nothing failed.
            Ended::Exited(Ok(status)) if status.success() => {
                tracing::info!(child = %spec.name, restart_in = ?delay, "child exited cleanly without being asked to by trellis up; restarting it")
            }
            Ended::Exited(status) => {
                tracing::error!(child = %spec.name, reason = %describe(status), restart_in = ?delay, "child died; restarting")
            }
            Ended::Unhealthy { reason } => {
                let after = watch.unhealthy_after.unwrap_or_default();
                tracing::warn!(child = %spec.name, not_serving_for = ?after, %reason, "child NOT_SERVING for too long (supervisor.unhealthy_restart_after_seconds); restarting it");
                let status = terminate(&spec.name, &mut child, watch.stop_grace).await;
                tracing::info!(child = %spec.name, ?status, restart_in = ?delay, "stopped the unhealthy child");
            }
        }
        let mut delay = delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            match spec.spawn() {
                Ok(new) => {
                    child = new;
                    started = Instant::now();
                    tracing::info!(child = %spec.name, pid = child.id(), "restarted");
                    crate::restarts::count(&spec.name);
                    crate::up_metrics::restarted(&spec.name, reason);
                    break;
                }
                Err(error) => {
                    quick_deaths = quick_deaths.saturating_add(1);
                    delay = backoff(quick_deaths);
                    tracing::error!(child = %spec.name, %error, retry_in = ?delay, "restart failed");
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

    #[test]
    fn the_timer_counts_not_serving_and_forgets_it_when_serving_again() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut timer = UnhealthyTimer { since: None };
        assert_eq!(
            timer.observe(&Ok(ServingStatus::Serving), at(0)),
            Duration::ZERO
        );
        let not_serving = Ok(ServingStatus::NotServing);
        assert_eq!(timer.observe(&not_serving, at(100)), Duration::ZERO);
        assert_eq!(
            timer.observe(&Err("no answer".into()), at(300)),
            Duration::from_millis(200),
            "a poll without an answer neither starts nor stops the clock"
        );
        assert_eq!(
            timer.observe(&not_serving, at(600)),
            Duration::from_millis(500)
        );
        assert_eq!(
            timer.observe(&Ok(ServingStatus::Serving), at(700)),
            Duration::ZERO
        );
        assert_eq!(timer.observe(&not_serving, at(800)), Duration::ZERO);
        assert_eq!(
            timer.observe(&Err("no answer".into()), at(900)),
            Duration::from_millis(100)
        );
        let mut fresh = UnhealthyTimer { since: None };
        assert_eq!(
            fresh.observe(&Err("no answer".into()), at(900)),
            Duration::ZERO
        );
    }

    /// A supervised `sh` that notes each start of its in `starts` and then waits.
    fn noting_child(starts: &Path) -> ChildSpec {
        ChildSpec {
            name: "test-child".into(),
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!("echo $$ >> {}; exec sleep 60", starts.display()),
            ],
            env: Vec::new(),
            listen: None,
        }
    }

    fn starts(file: &Path) -> Vec<u32> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    fn alive(pid: u32) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
    }

    /// Runs a child under `keep_running` with a scripted health, `script` changes it
    /// over time, and returns the pids it was started with.
    async fn supervise_with_health(
        unhealthy_after: Duration,
        script: &[(ServingStatus, Duration)],
    ) -> Vec<u32> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("starts");
        let spec = noting_child(&file);
        let health = std::sync::Arc::new(std::sync::Mutex::new(ServingStatus::Serving));
        let child = spec.spawn().expect("spawn");
        let (stop, stopped) = watch::channel(false);
        let watch = Watch {
            readiness: Readiness::Scripted(health.clone()),
            unhealthy_after: Some(unhealthy_after),
            stop_grace: Duration::from_secs(10),
        };
        let task = tokio::spawn(keep_running(spec, child, watch, stopped));
        for (status, hold) in script {
            *health.lock().expect("health") = *status;
            tokio::time::sleep(*hold).await;
        }
        let _ = stop.send(true);
        task.await.expect("supervisor task");
        let pids = starts(&file);
        for pid in &pids {
            assert!(!alive(*pid), "child {pid} still running after the stop");
        }
        pids
    }

    #[tokio::test]
    async fn a_child_that_stays_not_serving_is_restarted() {
        let pids = supervise_with_health(
            Duration::from_millis(300),
            &[
                (ServingStatus::Serving, Duration::from_millis(200)),
                (ServingStatus::NotServing, Duration::from_millis(1000)),
                (ServingStatus::Serving, Duration::from_millis(300)),
            ],
        )
        .await;
        assert!(
            pids.len() >= 2,
            "NOT_SERVING for 1 s with a 300 ms limit: restarted ({pids:?})"
        );
    }

    #[tokio::test]
    async fn a_child_that_recovers_in_time_is_left_running() {
        let pids = supervise_with_health(
            Duration::from_millis(600),
            &[
                (ServingStatus::NotServing, Duration::from_millis(300)),
                (ServingStatus::Serving, Duration::from_millis(300)),
                (ServingStatus::NotServing, Duration::from_millis(300)),
                (ServingStatus::Serving, Duration::from_millis(500)),
            ],
        )
        .await;
        assert_eq!(pids.len(), 1, "never NOT_SERVING for 600 ms: {pids:?}");
    }
}
