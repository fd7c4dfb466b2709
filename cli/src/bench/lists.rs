//! The calls a kubelet makes all the time, whatever the node does: its pod lifecycle
//! event generator relists pods and containers every second and asks the status of
//! each, and its image manager lists images. Timed over pods that each run one
//! container, so that the lists are as long as a busy node's.

use std::collections::BTreeMap;
use std::io::Write;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use super::{BenchArgs, BenchError, Timings, check, container_config, pod_config, timed};

/// Pods started at once while filling: enough to be quick, few enough not to time out.
const FILL_AT_ONCE: usize = 5;
/// Rounds of calls made before timing, so that connections and caches are warm on
/// both sides.
const WARM_UP_ROUNDS: usize = 10;
/// What `--hold` prints when the pods are up and the calls timed; the caller answers
/// with a line on standard input once it has looked at the node.
pub const HOLD_LINE: &str = "trellis-bench: holding the list pods; a line on stdin goes on";

/// One pod with one running container.
struct Running {
    pod: String,
    container: String,
}

/// Clients of Trellis's runtime and image services, past the gateway.
pub type Direct = (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>);

/// Starts `args.list_pods` pods of one container each, times the list and status
/// calls over them (and again through `direct`, if given), and removes them again,
/// even when a call failed.
pub async fn run(
    runtime: &RuntimeServiceClient<Channel>,
    images: &ImageServiceClient<Channel>,
    direct: Option<Direct>,
    args: &BenchArgs,
) -> Result<(Timings, Option<Timings>), BenchError> {
    let mut running = Vec::new();
    let filled = fill(runtime, args, &mut running).await;
    let measured = match filled {
        Ok(()) => match time_calls(runtime, images, args, &running).await {
            Ok(timings) => match &direct {
                Some((runtime, images)) => time_calls(runtime, images, args, &running)
                    .await
                    .map(|direct| (timings, Some(direct))),
                None => Ok((timings, None)),
            },
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    if measured.is_ok() && args.hold {
        hold().await;
    }
    let removals = running.into_iter().map(|Running { pod, .. }| {
        let mut runtime = runtime.clone();
        async move {
            let removal = runtime
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: pod.clone(),
                })
                .await;
            if let Err(status) = removal {
                eprintln!("could not remove benchmark pod {pod}: {status}");
            }
        }
    });
    futures::StreamExt::collect::<Vec<()>>(futures::StreamExt::buffer_unordered(
        futures::stream::iter(removals),
        FILL_AT_ONCE,
    ))
    .await;
    measured
}

async fn fill(
    runtime: &RuntimeServiceClient<Channel>,
    args: &BenchArgs,
    running: &mut Vec<Running>,
) -> Result<(), BenchError> {
    let names: Vec<usize> = (0..args.list_pods).collect();
    for batch in names.chunks(FILL_AT_ONCE) {
        let starts = batch.iter().map(|&i| start_one(runtime.clone(), args, i));
        for started in futures::future::join_all(starts).await {
            match started {
                Ok(one) => running.push(one),
                Err((pod, error)) => {
                    // Still removed by the caller, with the others.
                    if let Some(pod) = pod {
                        running.push(Running {
                            pod,
                            container: String::new(),
                        });
                    }
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// One pod and its container, started; on failure, the pod made so far (to remove).
async fn start_one(
    mut runtime: RuntimeServiceClient<Channel>,
    args: &BenchArgs,
    i: usize,
) -> Result<Running, (Option<String>, BenchError)> {
    let config = pod_config(args, &format!("bench-list-{i}-{}", std::process::id()));
    let pod = check(
        "RunPodSandbox",
        runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await,
    )
    .map_err(|error| (None, error))?
    .pod_sandbox_id;
    let container = async {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(args, "work")),
            sandbox_config: Some(config),
        };
        let id = check("CreateContainer", runtime.create_container(request).await)?.container_id;
        check(
            "StartContainer",
            runtime
                .start_container(StartContainerRequest {
                    container_id: id.clone(),
                })
                .await,
        )?;
        Ok::<_, BenchError>(id)
    };
    match container.await {
        Ok(container) => Ok(Running { pod, container }),
        Err(error) => Err((Some(pod), error)),
    }
}

async fn time_calls(
    runtime: &RuntimeServiceClient<Channel>,
    images: &ImageServiceClient<Channel>,
    args: &BenchArgs,
    running: &[Running],
) -> Result<Timings, BenchError> {
    let mut timings = Timings::new();
    let mut failures = BTreeMap::new();
    let image = ImageSpec {
        image: args.image.clone(),
        ..Default::default()
    };
    for round in 0..WARM_UP_ROUNDS + args.list_calls {
        let one = &running[round % running.len().max(1)];
        let mut round_timings = Timings::new();
        let pods = timed(
            &mut round_timings,
            &mut failures,
            "ListPodSandbox",
            runtime
                .clone()
                .list_pod_sandbox(ListPodSandboxRequest::default()),
        )
        .await;
        let containers = timed(
            &mut round_timings,
            &mut failures,
            "ListContainers",
            runtime
                .clone()
                .list_containers(ListContainersRequest::default()),
        )
        .await;
        timed(
            &mut round_timings,
            &mut failures,
            "PodSandboxStatus",
            runtime.clone().pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: one.pod.clone(),
                verbose: false,
            }),
        )
        .await;
        timed(
            &mut round_timings,
            &mut failures,
            "ContainerStatus",
            runtime.clone().container_status(ContainerStatusRequest {
                container_id: one.container.clone(),
                verbose: false,
            }),
        )
        .await;
        let listed = timed(
            &mut round_timings,
            &mut failures,
            "ListImages",
            images.clone().list_images(ListImagesRequest::default()),
        )
        .await;
        let status = timed(
            &mut round_timings,
            &mut failures,
            "ImageStatus",
            images.clone().image_status(ImageStatusRequest {
                image: Some(image.clone()),
                verbose: false,
            }),
        )
        .await;
        // A runtime that answers quickly with too little is not faster.
        let short = [
            ("ListPodSandbox", pods.map(|p| p.items.len())),
            ("ListContainers", containers.map(|c| c.containers.len())),
        ];
        for (call, listed) in short {
            if let Some(listed) = listed.filter(|&n| n < running.len()) {
                failures
                    .entry(call)
                    .or_insert_with(|| format!("{listed} listed of {} started", running.len()));
            }
        }
        if listed.is_some_and(|l| l.images.is_empty()) {
            failures
                .entry("ListImages")
                .or_insert_with(|| "no image listed".into());
        }
        if status.is_some_and(|s| s.image.is_none()) {
            failures
                .entry("ImageStatus")
                .or_insert_with(|| format!("{} not found", args.image));
        }
        if round >= WARM_UP_ROUNDS {
            for (call, samples) in round_timings {
                timings.entry(call).or_default().extend(samples);
            }
        }
    }
    for (call, message) in failures {
        println!("  {call}: {message}");
    }
    Ok(timings)
}

/// Waits for a line on standard input (or its end), having said so on standard output.
async fn hold() {
    println!("{HOLD_LINE}");
    let _ = std::io::stdout().flush();
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await;
}
