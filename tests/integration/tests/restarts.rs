//! Services restarted under a running node, as an operator does: the sockets are held
//! by `trellis up`, so callers wait for the next process instead of being refused, and
//! a SIGTERM drains, so a call accepted before it is never cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::Mutex;
use trellis_integration::pods::*;
use trellis_integration::{Node, NodeOptions, count_refusals, kill9};

/// Every CRI call of the churn gets this long; the kubelet's default is 2 minutes.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn sigterm(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
}

/// Calls made, the failures among them (code and message), and the calls sent again
/// because they never left the client.
#[derive(Default)]
struct Tally {
    calls: AtomicUsize,
    cycles: AtomicUsize,
    resent: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    /// One CRI call as the kubelet's gRPC client makes it: a call that raced the
    /// gateway's GOAWAY and so was never written (hyper cancels it) is sent again on
    /// the next connection, which grpc-go does on its own (transparent retry).
    async fn call<T, F, Fut>(&self, what: &str, mut call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let failure = loop {
            match tokio::time::timeout_at(deadline, call()).await {
                Ok(Ok(response)) => return Some(response.into_inner()),
                Ok(Err(status)) if trellis_common::upstream::never_sent(&status) => {
                    self.resent.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(status)) => {
                    break format!("{what}: {:?}: {}", status.code(), status.message());
                }
                Err(_) => break format!("{what}: no answer within {CALL_TIMEOUT:?}"),
            }
        };
        self.failures.lock().await.push(failure);
        None
    }
}

/// `tally.call` of one RuntimeService method with `request`.
macro_rules! cri {
    ($tally:expr, $client:expr, $method:ident, $name:literal, $request:expr) => {{
        let request = $request;
        $tally
            .call($name, || {
                let mut client = $client.clone();
                let request = request.clone();
                async move { client.$method(request).await }
            })
            .await
    }};
}

/// One client: pod and container cycles until `stop`, each call tallied. A failed call
/// ends the cycle; what it left is removed by the node's stop.
async fn churn(
    client: usize,
    node: Arc<Node>,
    image: String,
    logs: String,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let runtime = node.runtime();
    let mut cycle = 0;
    while !stop.load(Ordering::SeqCst) {
        cycle += 1;
        let name = format!("churn{client}x{cycle}");
        // Each pod its own log directory: every container here is `work`.
        let logs = format!("{logs}/{name}");
        let Some(pod) = cri!(
            tally,
            runtime,
            run_pod_sandbox,
            "RunPodSandbox",
            RunPodSandboxRequest {
                config: Some(pod_config(&name, &logs, true)),
                ..Default::default()
            }
        ) else {
            continue;
        };
        let pod_id = pod.pod_sandbox_id;
        let created = cri!(
            tally,
            runtime,
            create_container,
            "CreateContainer",
            CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(container_config("work", &image, &["/bin/sleep", "1000"])),
                sandbox_config: Some(pod_config(&name, &logs, true)),
            }
        );
        if let Some(created) = created {
            let id = created.container_id;
            let started = cri!(
                tally,
                runtime,
                start_container,
                "StartContainer",
                StartContainerRequest {
                    container_id: id.clone(),
                }
            );
            if started.is_none() {
                continue;
            }
            if cri!(
                tally,
                runtime,
                stop_container,
                "StopContainer",
                StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 0,
                }
            )
            .is_none()
            {
                continue;
            }
            if cri!(
                tally,
                runtime,
                remove_container,
                "RemoveContainer",
                RemoveContainerRequest { container_id: id }
            )
            .is_none()
            {
                continue;
            }
        } else {
            continue;
        }
        if cri!(
            tally,
            runtime,
            stop_pod_sandbox,
            "StopPodSandbox",
            StopPodSandboxRequest {
                pod_sandbox_id: pod_id.clone(),
            }
        )
        .is_none()
        {
            continue;
        }
        if cri!(
            tally,
            runtime,
            remove_pod_sandbox,
            "RemovePodSandbox",
            RemovePodSandboxRequest {
                pod_sandbox_id: pod_id,
            }
        )
        .is_some()
        {
            tally.cycles.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Waits until `pid` has exited (gone, or a zombie not yet reaped).
async fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        if stat.is_empty() || state == Some(Some('Z')) {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} still alive after kill -9");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// SIGTERM of the runtime service, then of the gateway, under three clients' churn:
/// each drains, the supervisor restarts it, and not one call fails.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_of_runtime_and_gateway_under_churn_fails_no_call() {
    let (dir, _registry, node, image) = setup().await;
    let node = Arc::new(node);
    let logs = dir.path().join("logs").display().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..3)
        .map(|client| {
            tokio::spawn(churn(
                client,
                node.clone(),
                image.clone(),
                logs.clone(),
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    let refusals = count_refusals(&node.socket("gateway"), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    for service in ["runtime", "gateway", "runtime", "gateway"] {
        let old = node.info(service).await.expect("info").pid;
        sigterm(old);
        node.wait_restarted(service, old, Duration::from_secs(20))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("client task");
    }
    let (tries, refused) = refusals.await.expect("refusal counter");
    let failures = tally.failures.lock().await.clone();
    eprintln!(
        "churn through 2 runtime and 2 gateway SIGTERMs: {} cycles, {} calls, {} failed, {} resent (never sent: raced a GOAWAY), {refused} of {tries} connects refused",
        tally.cycles.load(Ordering::SeqCst),
        tally.calls.load(Ordering::SeqCst),
        failures.len(),
        tally.resent.load(Ordering::SeqCst),
    );
    assert!(
        failures.is_empty(),
        "failed calls: {failures:#?}\n{}",
        node.log_tail()
    );
    assert_eq!(refused, 0, "connects refused during the restarts");
    assert!(tally.cycles.load(Ordering::SeqCst) > 0, "the churn ran");
    let node = Arc::into_inner(node).expect("no client holds the node");
    node.stop();
}

/// A gateway SIGTERM with a GetContainerEvents stream open: the stream ends at once
/// with UNAVAILABLE, no connect is refused meanwhile, and a new subscription (to the
/// next gateway) gets the next event.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_sigterm_ends_event_streams_with_unavailable_and_refuses_no_connect() {
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        ..Default::default()
    })
    .await;
    node.wait_bus_connected(Duration::from_secs(10)).await;
    let mut events = node
        .runtime()
        .get_container_events(GetEventsRequest::default())
        .await
        .expect("subscribe")
        .into_inner();
    let stop = Arc::new(AtomicBool::new(false));
    let refusals = count_refusals(&node.socket("gateway"), stop.clone());
    let old = node.info("gateway").await.expect("info").pid;
    let signalled = Instant::now();
    sigterm(old);
    let ended = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .expect("the stream ends well before the grace");
    let ended_after = signalled.elapsed();
    let status = ended.expect_err("the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let new = node
        .wait_restarted("gateway", old, Duration::from_secs(20))
        .await;
    stop.store(true, Ordering::SeqCst);
    let (tries, refused) = refusals.await.expect("refusal counter");
    eprintln!(
        "gateway {old} -> {new}: stream ended ({}) after {ended_after:?}, {refused} of {tries} connects refused",
        status.code()
    );
    assert_eq!(refused, 0, "connects refused while the gateway restarted");

    let mut events = node
        .runtime()
        .get_container_events(GetEventsRequest::default())
        .await
        .expect("subscribe again")
        .into_inner();
    next_pod_event_reaches(&node, std::slice::from_mut(&mut events)).await;
    node.stop();
}

/// kill -9 of a service: its socket, held by `trellis up`, keeps listening, so a call
/// made during the restart waits for the next process and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_during_a_kill9_restart_waits_instead_of_being_refused() {
    let node = Node::start(NodeOptions::default()).await;
    for service in ["gateway", "runtime", "image"] {
        let old = node.info(service).await.expect("info").pid;
        let stop = Arc::new(AtomicBool::new(false));
        let refusals = count_refusals(&node.socket(service), stop.clone());
        kill9(old);
        // A connect that the dying process still accepted would be cut: that is a
        // call in flight at a kill, not one made during the restart.
        wait_dead(old).await;
        let started = Instant::now();
        let info = tokio::time::timeout(Duration::from_secs(20), node.info(service))
            .await
            .expect("an answer within 20 s")
            .unwrap_or_else(|status| panic!("{service} Info during its restart: {status:?}"));
        stop.store(true, Ordering::SeqCst);
        let (tries, refused) = refusals.await.expect("refusal counter");
        eprintln!(
            "{service} killed: the call waited {:?} for pid {}, {refused} of {tries} connects refused",
            started.elapsed(),
            info.pid
        );
        assert_ne!(info.pid, old, "answered by the next process");
        assert_eq!(
            refused, 0,
            "connects to {service} refused during its restart"
        );
    }
    node.stop();
}
