//! `trellis bench churn`: clients cycling pod+container while an operator acts on the
//! node every few seconds (restarts, upgrades, kill -9 of a service), to measure what
//! callers see: failed calls by code and message, and latency per phase.
//!
//! A client behaves as the kubelet's does: a call that never left it (it raced a
//! GOAWAY) is sent again at once, as grpc-go does on its own; a call that failed is
//! tried again, as the kubelet's next sync would, and counted as failed either way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use super::actions::{Action, act};
use super::{BenchArgs, BenchError, container_config, percentile, pod_config};
use crate::output::outln_or_drop;

/// Each call's deadline, the kubelet's default.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Tries of a failed call before its cycle is given up.
const TRIES: usize = 5;
/// Calls started this long after an action ended still count to its phase.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Clients cycling pod+container at once.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// How long the clients run.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// What happens every `--every` seconds, in turn: none, restart:SERVICE,
    /// upgrade:SERVICE or kill:SERVICE; comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub during: Vec<Action>,
    /// Seconds between two actions (the first comes after one period).
    #[arg(long, default_value_t = 5)]
    pub every: u64,
    /// Where `upgrade:SERVICE` finds the new binary (`trellis-SERVICE`) [default: next
    /// to this `trellis`].
    #[arg(long)]
    pub binary_dir: Option<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One failed try of a call: its code and message, and whether a later try of the
/// same call succeeded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub call: &'static str,
    pub code: String,
    pub message: String,
    pub recovered: bool,
    pub phase: String,
}

/// An action as it happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Done {
    pub action: String,
    pub ok: bool,
    pub detail: String,
    pub millis: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub calls: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// What `trellis bench churn --json` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChurnReport {
    pub clients: usize,
    pub seconds: u64,
    pub cycles: usize,
    pub calls: usize,
    /// Calls sent again because they never left the client (raced a GOAWAY).
    pub resent: usize,
    pub failures: Vec<Failure>,
    /// Calls that failed every try: their cycle was given up.
    pub lost: usize,
    pub actions: Vec<Done>,
    pub phases: BTreeMap<String, Phase>,
}

/// The phase now: the action under way (or just ended), else "steady".
#[derive(Default)]
struct Clock {
    phase: std::sync::Mutex<(String, Option<Instant>)>,
}

impl Clock {
    fn now(&self) -> String {
        let phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        match phase.1 {
            Some(ended) if ended.elapsed() > SETTLE => "steady".into(),
            _ if phase.0.is_empty() => "steady".into(),
            _ => phase.0.clone(),
        }
    }

    fn set(&self, action: &Action, ended: Option<Instant>) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (action.to_string(), ended);
    }
}

#[derive(Default)]
struct Tally {
    cycles: usize,
    calls: usize,
    resent: usize,
    lost: usize,
    failures: Vec<Failure>,
    latencies: BTreeMap<String, Vec<Duration>>,
}

struct Client {
    runtime: RuntimeServiceClient<Channel>,
    tally: Arc<Mutex<Tally>>,
    clock: Arc<Clock>,
}

impl Client {
    /// One CRI call, tried again until it succeeds (at most [`TRIES`] times).
    async fn call<T, F, Fut>(&self, what: &'static str, mut call: F) -> Option<T>
    where
        F: FnMut(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut failed_tries = Vec::new();
        let mut tries = 0;
        let mut resent = 0;
        let outcome = loop {
            let phase = self.clock.now();
            let began = Instant::now();
            let result = tokio::time::timeout(CALL_TIMEOUT, call(self.runtime.clone())).await;
            let elapsed = began.elapsed();
            // A call belongs to an action that began while it was under way too.
            let phase = match self.clock.now() {
                now if now != "steady" => now,
                _ => phase,
            };
            let status = match result {
                Ok(Ok(response)) => {
                    self.record(&phase, elapsed).await;
                    break Some(response.into_inner());
                }
                Ok(Err(status)) if trellis_common::upstream::never_sent(&status) => {
                    resent += 1;
                    continue;
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    tonic::Status::deadline_exceeded(format!("no answer within {CALL_TIMEOUT:?}"))
                }
            };
            self.record(&phase, elapsed).await;
            // A connection lost under the call is UNAVAILABLE to grpc-go (the
            // kubelet's client); tonic calls it UNKNOWN "transport error".
            let (code, message) = if trellis_common::upstream::not_reached(&status) {
                let why = trellis_common::upstream::reason(&status);
                (
                    tonic::Code::Unavailable,
                    format!("connection lost or refused: {why}"),
                )
            } else {
                (status.code(), status.message().to_string())
            };
            failed_tries.push(Failure {
                call: what,
                code: format!("{code:?}"),
                message,
                recovered: false,
                phase,
            });
            tries += 1;
            if tries >= TRIES {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200 * tries as u64)).await;
        };
        let mut tally = self.tally.lock().await;
        tally.calls += 1;
        tally.resent += resent;
        let recovered = outcome.is_some();
        tally.lost += usize::from(!recovered);
        tally
            .failures
            .extend(failed_tries.into_iter().map(|mut failure| {
                failure.recovered = recovered;
                failure
            }));
        outcome
    }

    async fn record(&self, phase: &str, elapsed: Duration) {
        let mut tally = self.tally.lock().await;
        tally
            .latencies
            .entry(phase.to_string())
            .or_default()
            .push(elapsed);
    }

    /// Pod and container cycles until `stop`. A call lost for good ends its cycle;
    /// what it left is the runtime's to clean when the pod is removed by the caller.
    async fn churn(self, args: BenchArgs, client: usize, stop: Arc<AtomicBool>) {
        let mut cycle = 0;
        while !stop.load(Ordering::SeqCst) {
            cycle += 1;
            let name = format!("churn-{}-{client}-{cycle}", std::process::id());
            if self.cycle(&args, &name).await {
                self.tally.lock().await.cycles += 1;
            }
        }
    }

    async fn cycle(&self, args: &BenchArgs, name: &str) -> bool {
        let pod_config = pod_config(args, name);
        let request = RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        };
        let Some(pod) = self
            .call("RunPodSandbox", |mut c| {
                let request = request.clone();
                async move { c.run_pod_sandbox(request).await }
            })
            .await
        else {
            return false;
        };
        let pod_id = pod.pod_sandbox_id;
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(container_config(args, "work")),
            sandbox_config: Some(pod_config),
        };
        let created = self
            .call("CreateContainer", |mut c| {
                let request = request.clone();
                async move { c.create_container(request).await }
            })
            .await;
        let mut whole = true;
        if let Some(created) = created {
            let id = created.container_id;
            whole &= self
                .call("StartContainer", |mut c| {
                    let container_id = id.clone();
                    async move {
                        c.start_container(StartContainerRequest { container_id })
                            .await
                    }
                })
                .await
                .is_some();
            whole &= self
                .call("StopContainer", |mut c| {
                    let container_id = id.clone();
                    async move {
                        c.stop_container(StopContainerRequest {
                            container_id,
                            timeout: 0,
                        })
                        .await
                    }
                })
                .await
                .is_some();
            whole &= self
                .call("RemoveContainer", |mut c| {
                    let container_id = id.clone();
                    async move {
                        c.remove_container(RemoveContainerRequest { container_id })
                            .await
                    }
                })
                .await
                .is_some();
        } else {
            whole = false;
        }
        whole &= self
            .call("StopPodSandbox", |mut c| {
                let pod_sandbox_id = pod_id.clone();
                async move {
                    c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id })
                        .await
                }
            })
            .await
            .is_some();
        whole &= self
            .call("RemovePodSandbox", |mut c| {
                let pod_sandbox_id = pod_id.clone();
                async move {
                    c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id })
                        .await
                }
            })
            .await
            .is_some();
        whole
    }
}

/// Runs the churn and the actions, then prints the report.
pub async fn run(
    runtime: RuntimeServiceClient<Channel>,
    args: &BenchArgs,
    churn: &ChurnArgs,
    config: &trellis_common::Config,
) -> Result<ChurnReport, BenchError> {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clock = Arc::new(Clock::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..churn.clients)
        .map(|client| {
            let worker = Client {
                runtime: runtime.clone(),
                tally: tally.clone(),
                clock: clock.clone(),
            };
            tokio::spawn(worker.churn(args.clone(), client, stop.clone()))
        })
        .collect();
    let began = Instant::now();
    let run_for = Duration::from_secs(churn.seconds);
    let every = Duration::from_secs(churn.every.max(1));
    let mut actions = Vec::new();
    let mut next = 0;
    while began.elapsed() + every <= run_for {
        tokio::time::sleep(every).await;
        let Some(action) = churn.during.get(next % churn.during.len().max(1)) else {
            break;
        };
        next += 1;
        if *action == Action::None {
            continue;
        }
        clock.set(action, None);
        let started = Instant::now();
        let outcome = act(action, churn, config).await;
        clock.set(action, Some(Instant::now()));
        actions.push(Done {
            action: action.to_string(),
            ok: outcome.is_ok(),
            detail: outcome.unwrap_or_else(|error| error),
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
    tokio::time::sleep(run_for.saturating_sub(began.elapsed())).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let _ = client.await;
    }
    let mut tally = std::mem::take(&mut *tally.lock().await);
    let failed_by_phase = tally
        .failures
        .iter()
        .fold(BTreeMap::new(), |mut by, failure| {
            *by.entry(failure.phase.clone()).or_insert(0) += 1;
            by
        });
    let phases = tally
        .latencies
        .iter_mut()
        .map(|(phase, latencies)| {
            latencies.sort_unstable();
            let figures = Phase {
                calls: latencies.len(),
                failed: failed_by_phase.get(phase).copied().unwrap_or(0),
                p50_ms: percentile(latencies, 0.50),
                p95_ms: percentile(latencies, 0.95),
                p99_ms: percentile(latencies, 0.99),
            };
            (phase.clone(), figures)
        })
        .collect();
    let report = ChurnReport {
        clients: churn.clients,
        seconds: churn.seconds,
        cycles: tally.cycles,
        calls: tally.calls,
        resent: tally.resent,
        failures: tally.failures,
        lost: tally.lost,
        actions,
        phases,
    };
    print(&report, churn.json);
    Ok(report)
}

fn print(report: &ChurnReport, json: bool) {
    if json {
        outln_or_drop!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    outln_or_drop!(
        "churn: {} clients for {} s: {} cycles, {} calls, {} failed tries, {} calls lost, {} resent (never sent)",
        report.clients,
        report.seconds,
        report.cycles,
        report.calls,
        report.failures.len(),
        report.lost,
        report.resent
    );
    for done in &report.actions {
        let outcome = if done.ok { "ok" } else { "FAILED" };
        outln_or_drop!(
            "  {:<18} {outcome:<6} {:>6} ms  {}",
            done.action,
            done.millis,
            done.detail
        );
    }
    outln_or_drop!(
        "  {:<18} {:>6} {:>6} {:>9} {:>9} {:>9}",
        "phase",
        "calls",
        "failed",
        "p50 ms",
        "p95 ms",
        "p99 ms"
    );
    for (name, phase) in &report.phases {
        outln_or_drop!(
            "  {name:<18} {:>6} {:>6} {:>9.1} {:>9.1} {:>9.1}",
            phase.calls,
            phase.failed,
            phase.p50_ms,
            phase.p95_ms,
            phase.p99_ms
        );
    }
    let mut by_error: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for failure in &report.failures {
        let key = (failure.code.clone(), failure.message.clone());
        let entry = by_error.entry(key).or_default();
        entry.0 += 1;
        entry.1 += usize::from(failure.recovered);
    }
    for ((code, message), (count, recovered)) in by_error {
        outln_or_drop!("  failed {count}x ({recovered} recovered): {code}: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_counts_to_the_action_under_way_until_it_settles() {
        let clock = Clock::default();
        assert_eq!(clock.now(), "steady");
        let action = Action::Restart("gateway".into());
        clock.set(&action, None);
        assert_eq!(clock.now(), "restart:gateway");
        clock.set(&action, Some(Instant::now()));
        assert_eq!(clock.now(), "restart:gateway", "within the settle time");
        clock.set(&action, Instant::now().checked_sub(SETTLE * 2));
        assert_eq!(clock.now(), "steady");
    }
}
