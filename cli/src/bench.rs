//! `trellis bench`: a CRI workload against any CRI endpoint (Trellis's or another
//! runtime's), timing each lifecycle call, sequentially and N at once, the stats
//! calls, and the list and status calls over a node full of pods (`lists`).

mod actions;
mod churn;
mod lists;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;
use trellis_common::transport::unix_channel;

use crate::output::{errln, outln_or_drop};

#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = false)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Option<BenchMode>,
    /// CRI endpoint, e.g. unix:///run/containerd/containerd.sock [default: this node's gateway]
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Image of the benchmark's containers (pulled first); it must have `sleep`.
    #[arg(long, default_value = "127.0.0.1:5000/busybox:latest")]
    pub image: String,
    /// Pod+container cycles run one after another.
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Cycles run at once in the concurrent phase (0 skips it).
    #[arg(long, default_value_t = 10)]
    pub concurrency: usize,
    /// Rounds of the concurrent phase.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Give pods the host's network (no CNI) instead of their own.
    #[arg(long)]
    pub host_network: bool,
    /// Running containers (in pods of ten) over which the stats calls are timed (0 skips).
    #[arg(long, default_value_t = 100)]
    pub stats_containers: usize,
    /// Calls of each stats RPC timed.
    #[arg(long, default_value_t = 30)]
    pub stats_calls: usize,
    /// Pods, each running one container, over which the list and status calls are
    /// timed (0 skips).
    #[arg(long, default_value_t = 100)]
    pub list_pods: usize,
    /// Calls of each list and status RPC timed.
    #[arg(long, default_value_t = 300)]
    pub list_calls: usize,
    /// Once the list calls are timed, and before their pods go, print a line and wait
    /// for one on standard input (for a caller measuring the loaded node).
    #[arg(long)]
    pub hold: bool,
    /// Also time the list and status calls straight to Trellis's runtime and image
    /// services (unix:///<path> each), over the same pods: what the gateway's hop costs.
    #[arg(long, requires = "direct_image")]
    pub direct_runtime: Option<String>,
    #[arg(long, requires = "direct_runtime")]
    pub direct_image: Option<String>,
    /// Also write every figure to this file as JSON (phase → call → p50/p90/p99 in ms).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// A workload other than the default lifecycle, stats and list timings.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchMode {
    /// Clients cycling pod+container while services are restarted, upgraded or killed.
    Churn(churn::ChurnArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("endpoint {0} is not unix:///<path>")]
    Endpoint(String),
    #[error("{call} failed: {status}")]
    Call {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("cannot write the report {path}: {source}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const OPERATIONS: [&str; 18] = [
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
    "pod+container start",
    "whole cycle",
    "ListContainerStats",
    "ListPodSandboxStats",
    "ContainerStats",
    "ListPodSandbox",
    "ListContainers",
    "PodSandboxStatus",
    "ContainerStatus",
    "ListImages",
    "ImageStatus",
];

type Timings = BTreeMap<&'static str, Vec<Duration>>;

fn check<T>(
    call: &'static str,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, BenchError> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| BenchError::Call { call, status })
}

fn pod_config(args: &BenchArgs, name: &str) -> PodSandboxConfig {
    let mode = if args.host_network {
        NamespaceMode::Node
    } else {
        NamespaceMode::Pod
    };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "trellis-bench".into(),
            uid: name.into(),
            attempt: 0,
        }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: mode as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(args: &BenchArgs, name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: args.image.clone(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

/// One pod with one container, created, started, stopped and removed.
async fn cycle(
    mut runtime: RuntimeServiceClient<Channel>,
    args: BenchArgs,
    name: String,
) -> Result<Vec<(&'static str, Duration)>, BenchError> {
    let pod_config = pod_config(&args, &name);
    let container_config = container_config(&args, "work");
    let mut timings = Vec::new();
    let cycle_start = Instant::now();
    let mut timed = Instant::now();
    let mut lap = |name: &'static str, timings: &mut Vec<(&'static str, Duration)>| {
        timings.push((name, timed.elapsed()));
        timed = Instant::now();
    };
    let pod = check(
        "RunPodSandbox",
        runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config.clone()),
                runtime_handler: String::new(),
            })
            .await,
    )?
    .pod_sandbox_id;
    lap("RunPodSandbox", &mut timings);
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(container_config),
        sandbox_config: Some(pod_config),
    };
    let container = check("CreateContainer", runtime.create_container(request).await)?.container_id;
    lap("CreateContainer", &mut timings);
    check(
        "StartContainer",
        runtime
            .start_container(StartContainerRequest {
                container_id: container.clone(),
            })
            .await,
    )?;
    lap("StartContainer", &mut timings);
    timings.push(("pod+container start", cycle_start.elapsed()));
    check(
        "StopContainer",
        runtime
            .stop_container(StopContainerRequest {
                container_id: container.clone(),
                timeout: 0,
            })
            .await,
    )?;
    lap("StopContainer", &mut timings);
    check(
        "RemoveContainer",
        runtime
            .remove_container(RemoveContainerRequest {
                container_id: container,
            })
            .await,
    )?;
    lap("RemoveContainer", &mut timings);
    check(
        "StopPodSandbox",
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await,
    )?;
    lap("StopPodSandbox", &mut timings);
    check(
        "RemovePodSandbox",
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await,
    )?;
    lap("RemovePodSandbox", &mut timings);
    timings.push(("whole cycle", cycle_start.elapsed()));
    Ok(timings)
}

const CONTAINERS_PER_POD: usize = 10;

/// Pods of ten running containers, `total` containers in all; the pods made so far
/// when a call fails, so that they can be removed.
async fn fill(
    runtime: &mut RuntimeServiceClient<Channel>,
    args: &BenchArgs,
    total: usize,
    pods: &mut Vec<String>,
) -> Result<(), BenchError> {
    for p in 0..total.div_ceil(CONTAINERS_PER_POD) {
        let config = pod_config(args, &format!("bench-stats-{p}-{}", std::process::id()));
        let pod = check(
            "RunPodSandbox",
            runtime
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                })
                .await,
        )?
        .pod_sandbox_id;
        pods.push(pod.clone());
        let in_this_pod = CONTAINERS_PER_POD.min(total - p * CONTAINERS_PER_POD);
        let starts = (0..in_this_pod).map(|c| {
            let (mut runtime, pod, sandbox_config) = (runtime.clone(), pod.clone(), config.clone());
            let container = container_config(args, &format!("work-{c}"));
            async move {
                let request = CreateContainerRequest {
                    pod_sandbox_id: pod,
                    config: Some(container),
                    sandbox_config: Some(sandbox_config),
                };
                let id =
                    check("CreateContainer", runtime.create_container(request).await)?.container_id;
                check(
                    "StartContainer",
                    runtime
                        .start_container(StartContainerRequest { container_id: id })
                        .await,
                )
                .map(drop)
            }
        });
        futures::future::try_join_all(starts).await?;
    }
    Ok(())
}

/// Times the stats calls (and ListContainers) over `args.stats_containers` running containers.
async fn stats(
    runtime: &mut RuntimeServiceClient<Channel>,
    args: &BenchArgs,
) -> Result<Timings, BenchError> {
    let mut pods = Vec::new();
    let filled = fill(runtime, args, args.stats_containers, &mut pods).await;
    let measured = match filled {
        Ok(()) => time_stats(runtime, args).await,
        Err(error) => Err(error),
    };
    for pod in pods {
        if let Err(status) = runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
        {
            errln!("could not remove benchmark pod {pod}: {status}");
        }
    }
    measured
}

/// Times one call into `timings`; a failure is kept (the first per call) rather than
/// ending the benchmark, since runtimes differ in which stats calls they answer.
async fn timed<T>(
    timings: &mut Timings,
    failures: &mut BTreeMap<&'static str, String>,
    call: &'static str,
    answer: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<T> {
    let started = Instant::now();
    match answer.await {
        Ok(response) => {
            timings.entry(call).or_default().push(started.elapsed());
            Some(response.into_inner())
        }
        Err(status) => {
            failures
                .entry(call)
                .or_insert_with(|| status.message().to_string());
            None
        }
    }
}

async fn time_stats(
    runtime: &mut RuntimeServiceClient<Channel>,
    args: &BenchArgs,
) -> Result<Timings, BenchError> {
    let mut timings = Timings::new();
    let mut failures = BTreeMap::new();
    let containers = check(
        "ListContainers",
        runtime
            .list_containers(ListContainersRequest::default())
            .await,
    )?
    .containers;
    let one = containers.first().map(|c| c.id.clone()).unwrap_or_default();
    for _ in 0..args.stats_calls {
        let listed = timed(
            &mut timings,
            &mut failures,
            "ListContainerStats",
            runtime
                .clone()
                .list_container_stats(ListContainerStatsRequest::default()),
        )
        .await;
        if let Some(listed) = listed.filter(|l| l.stats.len() < args.stats_containers) {
            failures.entry("ListContainerStats").or_insert_with(|| {
                format!(
                    "{} stats for {} containers",
                    listed.stats.len(),
                    args.stats_containers
                )
            });
        }
        timed(
            &mut timings,
            &mut failures,
            "ListPodSandboxStats",
            runtime
                .clone()
                .list_pod_sandbox_stats(ListPodSandboxStatsRequest::default()),
        )
        .await;
        timed(
            &mut timings,
            &mut failures,
            "ContainerStats",
            runtime.clone().container_stats(ContainerStatsRequest {
                container_id: one.clone(),
            }),
        )
        .await;
        timed(
            &mut timings,
            &mut failures,
            "ListContainers",
            runtime
                .clone()
                .list_containers(ListContainersRequest::default()),
        )
        .await;
    }
    for (call, message) in failures {
        outln_or_drop!("  {call}: {message}");
    }
    Ok(timings)
}

fn record(into: &mut Timings, cycle: Vec<(&'static str, Duration)>) {
    for (name, took) in cycle {
        into.entry(name).or_default().push(took);
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Percentiles of one call, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Summary {
    p50: f64,
    p90: f64,
    p99: f64,
    n: usize,
}

/// Phases in the order they ran, each with its calls in `OPERATIONS` order.
type Report = Vec<(String, Vec<(&'static str, Summary)>)>;

fn print(report: &mut Report, title: &str, timings: &mut Timings) {
    outln_or_drop!("{title}");
    outln_or_drop!(
        "  {:<22} {:>9} {:>9} {:>9} {:>6}",
        "operation (ms)",
        "p50",
        "p90",
        "p99",
        "n"
    );
    let mut phase = Vec::new();
    for name in OPERATIONS {
        let Some(samples) = timings.get_mut(name) else {
            continue;
        };
        samples.sort();
        let summary = Summary {
            p50: percentile(samples, 0.5),
            p90: percentile(samples, 0.9),
            p99: percentile(samples, 0.99),
            n: samples.len(),
        };
        outln_or_drop!(
            "  {:<22} {:>9.3} {:>9.3} {:>9.3} {:>6}",
            name,
            summary.p50,
            summary.p90,
            summary.p99,
            summary.n
        );
        phase.push((name, summary));
    }
    report.push((title.to_string(), phase));
}

fn write_report(path: &std::path::Path, runtime: &str, report: &Report) -> Result<(), BenchError> {
    let phases: serde_json::Map<String, serde_json::Value> = report
        .iter()
        .map(|(title, calls)| {
            let calls: serde_json::Map<String, serde_json::Value> = calls
                .iter()
                .map(|(name, summary)| (name.to_string(), serde_json::json!(summary)))
                .collect();
            (title.clone(), serde_json::Value::Object(calls))
        })
        .collect();
    write_json(
        path,
        &serde_json::json!({ "runtime": runtime, "phases": phases }),
    )
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> Result<(), BenchError> {
    let json = serde_json::to_string(value).unwrap_or_default();
    std::fs::write(path, json).map_err(|source| BenchError::Report {
        path: path.to_path_buf(),
        source,
    })
}

/// The socket of a `unix:///<path>` endpoint.
fn socket_of(endpoint: &str) -> Result<PathBuf, BenchError> {
    endpoint
        .strip_prefix("unix://")
        .map(PathBuf::from)
        .ok_or_else(|| BenchError::Endpoint(endpoint.to_string()))
}

pub async fn run(args: BenchArgs, config: &trellis_common::Config) -> Result<(), BenchError> {
    let socket = match &args.endpoint {
        Some(endpoint) => socket_of(endpoint)?,
        None => config.endpoint(trellis_common::ServiceKind::Gateway).socket,
    };
    let channel = unix_channel(&socket);
    let runtime = RuntimeServiceClient::new(channel.clone());
    let images = ImageServiceClient::new(channel.clone());
    let version = check(
        "Version",
        runtime.clone().version(VersionRequest::default()).await,
    )?;
    let pull = PullImageRequest {
        image: Some(ImageSpec {
            image: args.image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    check("PullImage", images.clone().pull_image(pull).await)?;
    if let Some(BenchMode::Churn(churn)) = &args.mode {
        let report = churn::run(runtime, &args, churn, config).await?;
        if let Some(path) = &args.report {
            write_json(path, &report)?;
        }
        return Ok(());
    }
    let mut report = Report::new();
    outln_or_drop!(
        "{} {} on {}: image {}, {} network",
        version.runtime_name,
        version.runtime_version,
        socket.display(),
        args.image,
        if args.host_network {
            "host"
        } else {
            "pod (CNI)"
        }
    );

    let mut sequential = Timings::new();
    for i in 0..args.iterations {
        record(
            &mut sequential,
            cycle(
                runtime.clone(),
                args.clone(),
                format!("bench-seq-{i}-{}", std::process::id()),
            )
            .await?,
        );
    }
    if args.iterations > 0 {
        print(
            &mut report,
            &format!("sequential, {} cycles", args.iterations),
            &mut sequential,
        );
    }

    if args.concurrency > 0 {
        let mut concurrent = Timings::new();
        for round in 0..args.rounds {
            let cycles = (0..args.concurrency).map(|i| {
                tokio::spawn(cycle(
                    runtime.clone(),
                    args.clone(),
                    format!("bench-par-{round}-{i}-{}", std::process::id()),
                ))
            });
            for handle in futures::future::join_all(cycles).await {
                match handle {
                    Ok(result) => record(&mut concurrent, result?),
                    Err(error) => errln!("a benchmark cycle stopped: {error}"),
                }
            }
        }
        print(
            &mut report,
            &format!("{} at once, {} rounds", args.concurrency, args.rounds),
            &mut concurrent,
        );
    }

    if args.stats_containers > 0 {
        let mut runtime = runtime.clone();
        let mut timings = stats(&mut runtime, &args).await?;
        print(
            &mut report,
            &format!(
                "stats over {} running containers, {} calls each",
                args.stats_containers, args.stats_calls
            ),
            &mut timings,
        );
    }

    if args.list_pods > 0 {
        let direct = match (&args.direct_runtime, &args.direct_image) {
            (Some(runtime), Some(image)) => Some((
                RuntimeServiceClient::new(unix_channel(&socket_of(runtime)?)),
                ImageServiceClient::new(unix_channel(&socket_of(image)?)),
            )),
            _ => None,
        };
        let (mut timings, direct) = lists::run(&runtime, &images, direct, &args).await?;
        let title = format!(
            "lists over {} pods of one running container, {} calls each",
            args.list_pods, args.list_calls
        );
        print(&mut report, &title, &mut timings);
        if let Some(mut direct) = direct {
            print(
                &mut report,
                &format!("{title}, straight to the runtime and image services"),
                &mut direct,
            );
        }
    }
    if let Some(path) = &args.report {
        write_report(path, &version.runtime_name, &report)?;
    }
    Ok(())
}
