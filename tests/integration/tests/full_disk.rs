//! A node whose state directory fills up, then is freed: calls fail with
//! ResourceExhausted naming a path while it is full, the services that cannot write
//! say NOT_SERVING, and once space is back the node heals by itself, in place (no
//! service restarted), with nothing written before lost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::cri::{
    Pod, container_status, create, host_network_pod, list_images, list_pods, pull, run_pod, start,
};
use trellis_integration::pods::container_config;
use trellis_integration::registry::{Registry, small_image};
use trellis_integration::{Node, NodeOptions};

/// Room for the four record stores and a few small images, and little else.
const STATE_BYTES: u64 = 96 << 20;
/// How long the node may take to heal once space is freed.
const HEAL_BOUND: Duration = Duration::from_secs(30);

/// Fills the filesystem holding `path` with one file, to the last byte it takes.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("filler");
    let mut chunk = vec![0u8; 1 << 20];
    while !chunk.is_empty() {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if trellis_common::error::io_is_out_of_space(&e) => {
                chunk.truncate(chunk.len() / 2);
            }
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Whatever write_all left half-written stays: the filesystem is full.
    let _ = file.sync_all();
}

/// `trellis status` output.
fn status(node: &Node) -> String {
    let output = std::process::Command::new(trellis_integration::binary("trellis"))
        .arg("--config")
        .arg(&node.config_path)
        .arg("status")
        .output()
        .expect("trellis status");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The HEALTH column of `service` in `trellis status`.
fn health_of(status: &str, service: &str) -> String {
    status
        .lines()
        .find(|line| line.starts_with(service))
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string()
}

async fn run_pod_sandbox(node: &Node, name: String) -> Result<String, tonic::Status> {
    node.runtime()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(host_network_pod(&name, false)),
            runtime_handler: String::new(),
        })
        .await
        .map(|r| r.into_inner().pod_sandbox_id)
}

/// Makes `attempt` calls until one fails (the first may still fit in space a file
/// had already); its error.
async fn first_failure<F, Fut>(what: &str, mut attempt: F) -> tonic::Status
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<String, tonic::Status>>,
{
    for n in 0..20 {
        match attempt(n).await {
            Ok(id) => eprintln!("{what} {n} fitted in the space left ({id})"),
            Err(error) => return error,
        }
    }
    panic!("{what} must fail on a full disk");
}

fn assert_out_of_space(what: &str, error: &tonic::Status, state: &Path) {
    println!(
        "{what} on a full disk: {:?} {}",
        error.code(),
        error.message()
    );
    assert_eq!(
        error.code(),
        Code::ResourceExhausted,
        "{what} on a full disk: {error:?}"
    );
    assert!(
        error.message().contains(&state.display().to_string()),
        "{what}: the message names the path that is full ({}): {}",
        state.display(),
        error.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_state_directory_fails_calls_then_heals_by_itself_once_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let node = Node::start(NodeOptions {
        state_tmpfs_bytes: Some(STATE_BYTES),
        // Only an in-place heal can pass: the supervisor would restart far later.
        extra_config: "[supervisor]\nunhealthy_restart_after_seconds = 600\n".into(),
        ..Default::default()
    })
    .await;
    let state: PathBuf = node.root().join("state");
    let pids_before: Vec<u32> = {
        let mut pids = Vec::new();
        for service in ["storage", "runtime", "image", "network"] {
            pids.push(node.info(service).await.expect("info").pid);
        }
        pids
    };

    // Written before the disk fills: must all be there after.
    registry
        .push("tests/disk", "before", &small_image("before"))
        .await;
    let before = format!("{}/tests/disk:before", registry.address);
    pull(&node, &before)
        .await
        .expect("pull before the disk fills");
    let kept_pod = run_pod(&node, host_network_pod("kept", false)).await;
    registry
        .push("tests/disk", "during", &small_image("during"))
        .await;
    let during = format!("{}/tests/disk:during", registry.address);

    let filler = state.join("filler");
    fill(&filler);

    let error = pull(&node, &during).await.expect_err("pull on a full disk");
    assert_out_of_space("PullImage", &error, &state);
    // The first writes may still fit in pages sled's log file has already; a full
    // disk is met a few records later. A container's root filesystem and records
    // (storage's store and the runtime's), then a pod's.
    let error = first_failure("CreateContainer", |attempt| {
        let config = container_config(&format!("c{attempt}"), &before, &["sleep", "60"]);
        create(&node, &kept_pod, config)
    })
    .await;
    assert_out_of_space("CreateContainer", &error, &state);
    let error = first_failure("RunPodSandbox", |attempt| {
        run_pod_sandbox(&node, format!("full-{attempt}"))
    })
    .await;
    assert_out_of_space("RunPodSandbox", &error, &state);

    // Storage cannot unpack, the runtime's store cannot write: both NOT_SERVING, and
    // `trellis status` says why.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = status(&node);
        if ["runtime", "storage"]
            .iter()
            .all(|service| health_of(&text, service) == "NOT_SERVING")
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "runtime and storage not both NOT_SERVING on a full disk:\n{text}\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for service in ["runtime", "storage"] {
        let why = text
            .lines()
            .skip_while(|line| !line.starts_with(service))
            .nth(1)
            .unwrap_or_default();
        assert!(
            why.trim_start().starts_with("why: ") && why.contains(&state.display().to_string()),
            "status says why {service} is NOT_SERVING, naming the full path:\n{text}"
        );
    }
    println!("{text}");

    std::fs::remove_file(&filler).expect("free the space");
    let freed = Instant::now();
    let mut pulled = false;
    let mut pod = None;
    let mut last = String::new();
    while !(pulled && pod.is_some()) {
        assert!(
            freed.elapsed() < HEAL_BOUND,
            "not healed {HEAL_BOUND:?} after space was freed (pulled: {pulled}, pod: {pod:?}); last error: {last}\n{}",
            node.log_tail()
        );
        if !pulled {
            match pull(&node, &during).await {
                Ok(_) => pulled = true,
                Err(error) => last = format!("PullImage: {error:?}"),
            }
        }
        if pod.is_none() {
            match run_pod_sandbox(&node, "after".into()).await {
                Ok(id) => pod = Some(id),
                Err(error) => last = format!("RunPodSandbox: {error:?}"),
            }
        }
        if !(pulled && pod.is_some()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let healed = freed.elapsed();
    let pod = Pod {
        id: pod.expect("pod"),
        config: host_network_pod("after", false),
    };
    let container = start(
        &node,
        &pod,
        container_config("after", &during, &["sleep", "60"]),
    )
    .await;
    assert_eq!(
        container_status(&node, &container).await.state,
        ContainerState::ContainerRunning as i32
    );
    println!(
        "healed {:.2} s after space was freed (a pull and a pod start succeed)",
        healed.as_secs_f64()
    );

    // In place: no service was restarted, and every service serves again.
    for (service, before) in ["storage", "runtime", "image", "network"]
        .into_iter()
        .zip(pids_before)
    {
        let pid = node.info(service).await.expect("info").pid;
        assert_eq!(pid, before, "{service} was restarted");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = status(&node);
        if trellis_integration::SERVICES
            .iter()
            .all(|service| health_of(&text, service) == "SERVING")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not all SERVING again:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "every service SERVING again {:.2} s after space was freed",
        freed.elapsed().as_secs_f64()
    );

    // Nothing written before the disk filled was lost.
    let images: Vec<String> = list_images(&node)
        .await
        .into_iter()
        .flat_map(|image| image.repo_tags)
        .collect();
    assert!(
        images.contains(&before) && images.contains(&during),
        "{images:?}"
    );
    let pods = list_pods(&node).await;
    assert!(
        pods.iter().any(|p| p.id == kept_pod.id),
        "the pod made before is still there: {pods:?}"
    );

    // Remove everything; the harness checks that nothing is left.
    for pod in &pods {
        node.runtime()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .expect("RemovePodSandbox");
    }
    for image in [&before, &during] {
        node.images()
            .remove_image(RemoveImageRequest {
                image: trellis_integration::cri::image_spec(image),
            })
            .await
            .expect("RemoveImage");
    }
    node.stop();
}

/// A service that stays NOT_SERVING past `supervisor.unhealthy_restart_after_seconds`
/// is restarted by `trellis up`, which says why; the node works once space is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_not_serving_past_the_configured_time_is_restarted() {
    let node = Node::start(NodeOptions {
        state_tmpfs_bytes: Some(STATE_BYTES),
        extra_config: "[supervisor]\nunhealthy_restart_after_seconds = 2\n".into(),
        ..Default::default()
    })
    .await;
    let state = node.root().join("state");
    let old = node.info("runtime").await.expect("runtime info").pid;
    let filler = state.join("filler");
    fill(&filler);
    let mut failed = false;
    for attempt in 0..20 {
        if run_pod_sandbox(&node, format!("full-{attempt}"))
            .await
            .is_err()
        {
            failed = true;
            break;
        }
    }
    assert!(failed, "RunPodSandbox must fail on a full disk");
    let deadline = Instant::now() + Duration::from_secs(15);
    let said = loop {
        let log = node.log();
        if let Some(line) = log
            .lines()
            .find(|line| line.contains("NOT_SERVING for too long"))
        {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "runtime not restarted for being NOT_SERVING:\n{}",
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        said.contains("runtime") && said.contains(&state.display().to_string()),
        "says which child and why: {said}"
    );
    // The new runtime may not start while the disk is full (each attempt logged, with
    // backoff): it must once space is back.
    std::fs::remove_file(&filler).expect("free the space");
    let deadline = Instant::now() + HEAL_BOUND;
    let pod = loop {
        match run_pod_sandbox(&node, "after".into()).await {
            Ok(id) => break id,
            Err(error) => assert!(
                Instant::now() < deadline,
                "no pod after space was freed: {error:?}\n{}",
                node.log_tail()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(node.info("runtime").await.expect("info").pid, old);
    let pods = list_pods(&node).await;
    assert!(pods.iter().any(|p| p.id == pod), "{pods:?}");
    for pod in &pods {
        node.runtime()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .expect("RemovePodSandbox");
    }
    node.stop();
}
