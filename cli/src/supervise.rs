//! How `trellis up` keeps one child running: started and waited for until ready,
//! restarted when it dies or stays NOT_SERVING, and replaced on an operator's order
//! (`trellis restart`, `trellis upgrade`) without a caller noticing.
//!
//! A replacement takes over in one of two ways. A service without a record store
//! (the gateway) overlaps: the new process serves on the shared socket beside the old
//! one, which drains only once the new one said it is ready. A service with a record
//! store hands over: the old process drains and exits, releasing its store, then the
//! new one opens it; callers meanwhile wait in the socket's backlog, which `trellis
//! up` holds. A new process that does not become ready is stopped and the previous
//! one (or its program, after a hand-over) serves again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::child::{ChildSpec, describe, terminate};
use crate::notifications::Notifications;
use crate::probe;
use crate::up::UpError;
use crate::up_metrics::RestartReason;

/// How long a starting child has to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child that ran this long before dying is restarted at once; quicker deaths back off.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How often a ready child's health is asked for.
const HEALTH_POLL: Duration = Duration::from_secs(1);

/// How `trellis up` tells that a child is ready.
#[derive(Debug, Clone)]
pub enum Readiness {
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
pub(crate) struct UnhealthyTimer {
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

/// How a replacement process takes over from the running one (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    Overlap,
    HandOver,
}

impl Takeover {
    pub fn name(self) -> &'static str {
        match self {
            Self::Overlap => "overlap",
            Self::HandOver => "hand-over",
        }
    }
}

/// A ready child is restarted after `unhealthy_after` of NOT_SERVING (never if `None`);
/// asked to stop, it gets `stop_grace` before it is killed. `notify` is where its
/// processes say they are ready; a child without one cannot be replaced.
#[derive(Debug, Clone)]
pub struct Watch {
    pub readiness: Readiness,
    pub unhealthy_after: Option<Duration>,
    pub stop_grace: Duration,
    pub takeover: Takeover,
    pub notify: Option<Arc<Notifications>>,
}

/// An operator's order for one child.
#[derive(Debug)]
pub enum Order {
    /// A new process, of `program` when given (an upgrade), else of the same one.
    Replace {
        program: Option<PathBuf>,
        reply: oneshot::Sender<Result<Replaced, String>>,
    },
}

/// What a replacement did, for the operator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Replaced {
    pub service: String,
    pub old_pid: u32,
    pub new_pid: u32,
    pub program: String,
    pub takeover: String,
    pub millis: u64,
}

pub struct Supervised {
    pub name: String,
    pub stop: watch::Sender<bool>,
    pub task: JoinHandle<()>,
    pub orders: mpsc::Sender<Order>,
}

/// Starts a child, waits until it is ready, then leaves it to a supervising task.
pub async fn start(spec: ChildSpec, watch: Watch) -> Result<Supervised, UpError> {
    let mut child = spec.spawn()?;
    // Its own word when it can give it: a replica's socket may be answered by another.
    let ready = wait_ready(&mut child, &watch.readiness, watch.notify.as_deref()).await;
    if let Err(failure) = ready {
        return Err(match failure {
            NotReady::Exited(reason) => UpError::StartFailed {
                name: spec.name.clone(),
                reason,
            },
            NotReady::TimedOut(last) => {
                terminate(&spec.name, &mut child, watch.stop_grace).await;
                UpError::StartTimeout {
                    name: spec.name.clone(),
                    timeout: START_TIMEOUT,
                    last,
                }
            }
        });
    }
    tracing::info!(child = %spec.name, pid = child.id(), "ready");
    let (stop, stopped) = watch::channel(false);
    let (orders, ordered) = mpsc::channel(4);
    let name = spec.name.clone();
    let task = tokio::spawn(keep_running(spec, child, watch, stopped, ordered));
    Ok(Supervised {
        name,
        stop,
        task,
        orders,
    })
}

/// Why a started process is not ready.
enum NotReady {
    Exited(String),
    TimedOut(String),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(reason) => write!(f, "it ended ({reason})"),
            Self::TimedOut(last) => write!(f, "not ready within {START_TIMEOUT:?} ({last})"),
        }
    }
}

/// Waits until `child` is ready: it says so on `notify` when given (the socket may be
/// answered by another process), else its socket answers as SERVING.
async fn wait_ready(
    child: &mut Child,
    readiness: &Readiness,
    notify: Option<&Notifications>,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + START_TIMEOUT;
    let pid = child.id().unwrap_or_default();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Exited(describe(&Ok(status))));
        }
        let ready = match notify {
            Some(notify) => notify.ready_within(pid, Duration::from_millis(100)).await,
            None => readiness.check().await,
        };
        match ready {
            Ok(()) => return Ok(()),
            Err(last) if Instant::now() > deadline => return Err(NotReady::TimedOut(last)),
            Err(_) => {}
        }
        if notify.is_none() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// How a supervised child's run ended, when it was not asked to stop.
enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    /// NOT_SERVING for longer than allowed: stopped, to be started again.
    Unhealthy {
        reason: String,
    },
}

/// The child as its supervising task has it.
struct Running {
    spec: ChildSpec,
    child: Child,
    started: Instant,
    /// Replaced processes still draining (an overlap does not wait for them).
    draining: Vec<JoinHandle<()>>,
}

/// Restarts the child whenever it dies or stays NOT_SERVING too long, with backoff for
/// repeated quick deaths, and replaces it when ordered, until asked to stop; then
/// stops it.
async fn keep_running(
    spec: ChildSpec,
    child: Child,
    watch: Watch,
    mut stop: watch::Receiver<bool>,
    mut orders: mpsc::Receiver<Order>,
) {
    let mut running = Running {
        spec,
        child,
        started: Instant::now(),
        draining: Vec::new(),
    };
    let mut quick_deaths: u32 = 0;
    loop {
        let ended = tokio::select! {
            status = running.child.wait() => Ended::Exited(status),
            _ = stop.changed() => {
                terminate(&running.spec.name, &mut running.child, watch.stop_grace).await;
                for draining in running.draining {
                    let _ = draining.await;
                }
                return;
            }
            reason = until_unhealthy_for(&watch.readiness, watch.unhealthy_after) => {
                Ended::Unhealthy { reason }
            }
            Some(Order::Replace { program, reply }) = orders.recv() => {
                let (answer, ended) = replace(&mut running, program, &watch).await;
                let _ = reply.send(answer);
                match ended {
                    Some(ended) => ended,
                    None => continue,
                }
            }
        };
        let name = running.spec.name.clone();
        quick_deaths = if running.started.elapsed() >= STABLE_AFTER {
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
                tracing::info!(child = %name, restart_in = ?delay, "child exited cleanly without being asked to by trellis up; restarting it")
            }
            Ended::Exited(status) => {
                tracing::error!(child = %name, reason = %describe(status), restart_in = ?delay, "child died; restarting")
            }
            Ended::Unhealthy { reason } => {
                let after = watch.unhealthy_after.unwrap_or_default();
                tracing::warn!(child = %name, not_serving_for = ?after, %reason, "child NOT_SERVING for too long (supervisor.unhealthy_restart_after_seconds); restarting it");
                let status = terminate(&name, &mut running.child, watch.stop_grace).await;
                tracing::info!(child = %name, ?status, restart_in = ?delay, "stopped the unhealthy child");
            }
        }
        let mut delay = delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            match running.spec.spawn() {
                Ok(new) => {
                    running.child = new;
                    running.started = Instant::now();
                    tracing::info!(child = %name, pid = running.child.id(), "restarted");
                    crate::restarts::count(&name);
                    crate::up_metrics::restarted(&name, reason);
                    break;
                }
                Err(error) => {
                    quick_deaths = quick_deaths.saturating_add(1);
                    delay = backoff(quick_deaths);
                    tracing::error!(child = %name, %error, retry_in = ?delay, "restart failed");
                }
            }
        }
    }
}

/// Replaces the running process with one of `program` (or the same program). Returns
/// the operator's answer, and how the run ended when no process is left serving.
async fn replace(
    running: &mut Running,
    program: Option<PathBuf>,
    watch: &Watch,
) -> (Result<Replaced, String>, Option<Ended>) {
    let began = Instant::now();
    let name = running.spec.name.clone();
    let Some(notify) = watch.notify.as_deref() else {
        return (Err(format!("{name} cannot be replaced")), None);
    };
    let mut next = running.spec.clone();
    if let Some(program) = program {
        next.program = program;
    }
    let old_pid = running.child.id().unwrap_or_default();
    tracing::info!(child = %name, old_pid, program = %next.program.display(), takeover = watch.takeover.name(), "replacing on an operator's order");
    match watch.takeover {
        Takeover::Overlap => match spawn_ready(&next, watch, notify).await {
            Ok(new) => {
                let mut old = std::mem::replace(&mut running.child, new);
                let grace = watch.stop_grace;
                let old_name = name.clone();
                running.draining.retain(|task| !task.is_finished());
                running.draining.push(tokio::spawn(async move {
                    terminate(&old_name, &mut old, grace).await;
                }));
            }
            Err(why) => {
                let failed = format!(
                    "{name}: the new process of {} {why}; pid {old_pid} still serves",
                    next.program.display()
                );
                return (Err(failed), None);
            }
        },
        Takeover::HandOver => {
            terminate(&name, &mut running.child, watch.stop_grace).await;
            match spawn_ready(&next, watch, notify).await {
                Ok(new) => running.child = new,
                Err(why) => {
                    let failed = format!(
                        "{name}: the new process of {} {why}",
                        next.program.display()
                    );
                    tracing::error!(child = %name, %failed, "replacement failed; starting the previous program again");
                    return match spawn_ready(&running.spec, watch, notify).await {
                        Ok(previous) => {
                            running.child = previous;
                            running.started = Instant::now();
                            let back = format!(
                                "{failed}; {} serves again",
                                running.spec.program.display()
                            );
                            (Err(back), None)
                        }
                        Err(again) => {
                            let status = running.child.wait().await;
                            let lost = format!(
                                "{failed}; and {} {again}: restarting it with backoff",
                                running.spec.program.display()
                            );
                            (Err(lost), Some(Ended::Exited(status)))
                        }
                    };
                }
            }
        }
    }
    running.spec = next;
    running.started = Instant::now();
    crate::restarts::count(&name);
    crate::up_metrics::restarted(&name, RestartReason::Operator);
    let new_pid = running.child.id().unwrap_or_default();
    let replaced = Replaced {
        service: name.clone(),
        old_pid,
        new_pid,
        program: running.spec.program.display().to_string(),
        takeover: watch.takeover.name().to_string(),
        millis: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    tracing::info!(child = %name, old_pid, new_pid, took = ?began.elapsed(), "replaced");
    (Ok(replaced), None)
}

/// Starts a process of `spec` and waits for it to say it is ready; one that does not
/// is stopped.
async fn spawn_ready(
    spec: &ChildSpec,
    watch: &Watch,
    notify: &Notifications,
) -> Result<Child, String> {
    let mut child = spec.spawn().map_err(|error| error.to_string())?;
    match wait_ready(&mut child, &watch.readiness, Some(notify)).await {
        Ok(()) => Ok(child),
        Err(why) => {
            terminate(&spec.name, &mut child, watch.stop_grace).await;
            Err(format!("did not become ready: {why}"))
        }
    }
}

fn backoff(quick_deaths: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(quick_deaths.min(16))).min(MAX_BACKOFF) / 2
}

#[cfg(test)]
mod tests;
