//! The supervising task: restarts, health and replacements, with real child processes.
use std::path::Path;

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
    let (_orders, ordered) = mpsc::channel(1);
    let watch = Watch {
        readiness: Readiness::Scripted(health.clone()),
        unhealthy_after: Some(unhealthy_after),
        stop_grace: Duration::from_secs(10),
        takeover: Takeover::HandOver,
        notify: None,
    };
    let task = tokio::spawn(keep_running(spec, child, watch, stopped, ordered));
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

/// A child that says READY=1 on `NOTIFY_SOCKET` (after `delay_ms`), notes its pid
/// in `starts`, and waits; `python3` speaks the datagram protocol for it.
fn notifying_child(
    program: &str,
    starts: &Path,
    notify: &Notifications,
    delay_ms: u64,
) -> ChildSpec {
    let script = format!(
        "import os, socket, time\n\
         open({starts:?}, 'a').write('%d\\n' % os.getpid())\n\
         time.sleep({delay})\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         s.sendto(b'READY=1\\nMAINPID=%d\\n' % os.getpid(), os.environ['NOTIFY_SOCKET'])\n\
         time.sleep(60)\n",
        starts = starts.display().to_string(),
        delay = delay_ms as f64 / 1000.0,
    );
    ChildSpec {
        name: "test-service".into(),
        program: program.into(),
        args: vec!["-c".into(), script],
        env: vec![(
            trellis_common::notify::ENV.to_string(),
            notify.path().display().to_string(),
        )],
        listen: None,
    }
}

struct Replacing {
    orders: mpsc::Sender<Order>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    starts: PathBuf,
    _dir: tempfile::TempDir,
}

async fn supervise_replaceable(takeover: Takeover) -> Replacing {
    let dir = tempfile::tempdir().expect("tempdir");
    let starts = dir.path().join("starts");
    let notify = Arc::new(Notifications::bind(&dir.path().join("up"), "test").expect("notify"));
    let spec = notifying_child("/usr/bin/python3", &starts, &notify, 0);
    let mut child = spec.spawn().expect("spawn");
    let readiness = Readiness::Scripted(Arc::new(std::sync::Mutex::new(ServingStatus::Serving)));
    assert!(
        wait_ready(&mut child, &readiness, Some(&notify))
            .await
            .is_ok()
    );
    let watch = Watch {
        readiness,
        unhealthy_after: None,
        stop_grace: Duration::from_secs(5),
        takeover,
        notify: Some(notify),
    };
    let (stop, stopped) = watch::channel(false);
    let (orders, ordered) = mpsc::channel(1);
    let task = tokio::spawn(keep_running(spec, child, watch, stopped, ordered));
    Replacing {
        orders,
        stop,
        task,
        starts,
        _dir: dir,
    }
}

async fn replace_with(replacing: &Replacing, program: Option<PathBuf>) -> Result<Replaced, String> {
    let (reply, replied) = oneshot::channel();
    replacing
        .orders
        .send(Order::Replace { program, reply })
        .await
        .expect("order");
    replied.await.expect("answer")
}

async fn stop(replacing: Replacing) -> Vec<u32> {
    let _ = replacing.stop.send(true);
    replacing.task.await.expect("supervisor task");
    let pids = starts(&replacing.starts);
    for pid in &pids {
        assert!(!alive(*pid), "process {pid} still running after the stop");
    }
    pids
}

#[tokio::test]
async fn an_overlap_starts_the_new_process_before_the_old_one_stops() {
    let replacing = supervise_replaceable(Takeover::Overlap).await;
    let first = starts(&replacing.starts)[0];
    let replaced = replace_with(&replacing, None).await.expect("replaced");
    assert_eq!(replaced.old_pid, first);
    assert_ne!(replaced.new_pid, first);
    assert_eq!(replaced.takeover, "overlap");
    assert!(alive(replaced.new_pid), "the new process serves");
    let failed = replace_with(&replacing, Some("/bin/false".into())).await;
    let error = failed.expect_err("a program that exits never becomes ready");
    assert!(
        error.contains("did not become ready")
            && error.contains(&format!("pid {} still serves", replaced.new_pid)),
        "{error}"
    );
    assert!(
        alive(replaced.new_pid),
        "the serving process was left alone"
    );
    assert_eq!(stop(replacing).await.len(), 2);
}

#[tokio::test]
async fn a_hand_over_whose_new_program_fails_starts_the_previous_one_again() {
    let replacing = supervise_replaceable(Takeover::HandOver).await;
    let replaced = replace_with(&replacing, None).await.expect("replaced");
    assert!(
        !alive(replaced.old_pid),
        "a hand-over stops the old process first"
    );
    let failed = replace_with(&replacing, Some("/bin/false".into())).await;
    let error = failed.expect_err("a program that exits never becomes ready");
    assert!(error.contains("/usr/bin/python3 serves again"), "{error}");
    let pids = stop(replacing).await;
    assert_eq!(
        pids.len(),
        3,
        "first, its replacement, and the fallback: {pids:?}"
    );
}
