//! Pod and container lifecycle benchmark: `trellis bench` against a Trellis node and
//! against containerd (Debian's, runc, its own socket) in one run, on one CNI network,
//! with the same images from the same registry. Prints both, the ratios of their
//! figures, and the resident memory of both with a hundred pods and idle after the
//! run; asserts nothing.
//!
//!     cargo build --release --bins && cargo run --release -p trellis-integration --bin bench-pods
//!
//! BENCH_ITERATIONS (default 50), BENCH_CONCURRENCY (default 10), BENCH_ROUNDS
//! (default 5), BENCH_STATS_CONTAINERS (default 100), BENCH_LIST_PODS (default 100)
//! and BENCH_LIST_CALLS (default 300) are passed on to `trellis bench`;
//! BENCH_SETTLE_SECONDS (default 15) is how long both stay idle before the last
//! memory reading.
//!
//! Memory is compared daemon to daemon: Trellis's five services against the
//! containerd process. Per-pod helpers (Trellis's conmons, containerd's shims) are
//! shown apart, as are the processes Trellis runs beside its services (the `trellis up`
//! supervisor and its private NATS server), which a containerd node has no
//! counterpart of in-process (systemd supervises it and it has no bus).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use trellis_integration::memory::{
    processes_named, rss_parts_kib, threads, total_rss_kib, vm_rss_kib,
};
use trellis_integration::peer::{Containerd, SideBySide};
use trellis_integration::{SERVICES, binary};

/// What `trellis bench` appends to the title of the lists timed past the gateway.
const DIRECT_PHASE: &str = ", straight to the runtime and image services";
const HOLD_LINE: &str = "trellis-bench: holding the list pods; a line on stdin goes on";

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Runs `trellis bench` against `endpoint`, printing what it prints; `loaded` is
/// called while its list pods are up. Returns its JSON report.
fn bench(
    endpoint: &Path,
    direct: Option<(PathBuf, PathBuf)>,
    image: &str,
    report: &Path,
    loaded: impl FnOnce(),
) -> serde_json::Value {
    let mut command = Command::new(binary("trellis"));
    command.arg("bench");
    if let Some((runtime, images)) = direct {
        command
            .arg(format!("--direct-runtime=unix://{}", runtime.display()))
            .arg(format!("--direct-image=unix://{}", images.display()));
    }
    let mut child = command
        .arg("--endpoint")
        .arg(format!("unix://{}", endpoint.display()))
        .args(["--image", image])
        .args(["--iterations", &setting("BENCH_ITERATIONS", "50")])
        .args(["--concurrency", &setting("BENCH_CONCURRENCY", "10")])
        .args(["--rounds", &setting("BENCH_ROUNDS", "5")])
        .args([
            "--stats-containers",
            &setting("BENCH_STATS_CONTAINERS", "100"),
        ])
        .args(["--list-pods", &setting("BENCH_LIST_PODS", "100")])
        .args(["--list-calls", &setting("BENCH_LIST_CALLS", "300")])
        .arg("--hold")
        .arg("--report")
        .arg(report)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run trellis bench");
    let mut stdin = child.stdin.take().expect("bench stdin");
    let stdout = child.stdout.take().expect("bench stdout");
    let mut loaded = Some(loaded);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line == HOLD_LINE {
            if let Some(loaded) = loaded.take() {
                loaded();
            }
            let _ = writeln!(stdin, "go on");
        } else {
            println!("{line}");
        }
    }
    drop(stdin);
    let status = child.wait().expect("wait for trellis bench");
    assert!(
        status.success(),
        "trellis bench failed against {}",
        endpoint.display()
    );
    let text = std::fs::read_to_string(report).expect("bench report");
    serde_json::from_str(&text).expect("bench report is JSON")
}

/// One reading of what each side holds in memory.
#[derive(Default)]
struct Memory {
    /// Each daemon counted.
    daemons: Vec<Daemon>,
    /// Per-pod helpers: how many, and their summed KiB.
    helpers: (usize, u64),
    /// Beside the daemons, not counted with them: (name, KiB).
    beside: Vec<(String, u64)>,
}

struct Daemon {
    name: String,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

impl Memory {
    fn total(&self) -> u64 {
        self.daemons.iter().map(|d| d.rss_kib).sum()
    }
}

fn daemon(name: &str, pid: i32) -> Daemon {
    let (anon_kib, file_kib) = rss_parts_kib(pid).unwrap_or_default();
    Daemon {
        name: name.to_string(),
        rss_kib: vm_rss_kib(pid).unwrap_or(0),
        anon_kib,
        file_kib,
        threads: threads(pid).unwrap_or(0),
    }
}

fn trellis_memory(node_root: &Path, services: &[(String, i32)], up: Option<i32>) -> Memory {
    let conmons = processes_named("conmon", node_root);
    let mut beside = Vec::new();
    if let Some(up) = up {
        beside.push(("trellis up".to_string(), vm_rss_kib(up).unwrap_or(0)));
    }
    beside.push((
        "nats-server".to_string(),
        total_rss_kib(&processes_named("nats-server", node_root)),
    ));
    Memory {
        daemons: services
            .iter()
            .map(|(name, pid)| daemon(&format!("trellis-{name}"), *pid))
            .collect(),
        helpers: (conmons.len(), total_rss_kib(&conmons)),
        beside,
    }
}

fn containerd_memory(containerd: &Containerd) -> Memory {
    // A shim's command line names the daemon's socket (`-address <socket>`).
    let shims = processes_named("containerd-shim", &containerd.socket);
    Memory {
        daemons: containerd
            .pid()
            .map(|pid| daemon("containerd", pid))
            .into_iter()
            .collect(),
        helpers: (shims.len(), total_rss_kib(&shims)),
        beside: Vec::new(),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn call_summary(report: &serde_json::Value, phase: &str, call: &str) -> Option<[f64; 3]> {
    let figures = &report["phases"][phase][call];
    Some([
        figures["p50"].as_f64()?,
        figures["p90"].as_f64()?,
        figures["p99"].as_f64()?,
    ])
}

fn print_comparison(trellis: &serde_json::Value, containerd: &serde_json::Value) {
    let Some(phases) = trellis["phases"].as_object() else {
        return;
    };
    println!(
        "\n=== Trellis / containerd, same run (ms; ratio of p50, below 1 is Trellis faster) ==="
    );
    for (phase, calls) in phases {
        println!("{phase}");
        // Trellis's lists timed past its gateway (`--direct-runtime`) are compared
        // with containerd's lists of the same run.
        let peer_phase = phase.strip_suffix(DIRECT_PHASE).unwrap_or(phase);
        println!(
            "  {:<22} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6}",
            "", "trellis", "p90", "p99", "ctrd p50", "p90", "p99", "ratio"
        );
        let Some(calls) = calls.as_object() else {
            continue;
        };
        for call in calls.keys() {
            let (Some(t), Some(c)) = (
                call_summary(trellis, phase, call),
                call_summary(containerd, peer_phase, call),
            ) else {
                continue;
            };
            println!(
                "  {:<22} {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} | {:>6.2}",
                call,
                t[0],
                t[1],
                t[2],
                c[0],
                c[1],
                c[2],
                t[0] / c[0]
            );
        }
    }
}

fn print_memory(when: &str, trellis: &Memory, containerd: &Memory) {
    println!("\n=== resident memory (VmRSS), {when} ===");
    for daemon in trellis.daemons.iter().chain(&containerd.daemons) {
        println!(
            "  {:<20} {:>8.1} MiB  (anonymous {:>5.1}, files {:>5.1})  {:>3} threads",
            daemon.name,
            mib(daemon.rss_kib),
            mib(daemon.anon_kib),
            mib(daemon.file_kib),
            daemon.threads
        );
    }
    println!(
        "  {:<20} {:>8.1} MiB  (the five services)",
        "trellis, daemons",
        mib(trellis.total())
    );
    println!(
        "  {:<20} {:>8.1} MiB  (the containerd process)",
        "containerd, daemon",
        mib(containerd.total())
    );
    println!(
        "  ratio trellis/containerd: {:.2}",
        trellis.total() as f64 / containerd.total().max(1) as f64
    );
    println!(
        "  per-pod helpers, apart: {} conmon {:.1} MiB; {} containerd-shim {:.1} MiB",
        trellis.helpers.0,
        mib(trellis.helpers.1),
        containerd.helpers.0,
        mib(containerd.helpers.1)
    );
    let beside: Vec<String> = trellis
        .beside
        .iter()
        .map(|(name, kib)| format!("{name} {:.1} MiB", mib(*kib)))
        .collect();
    println!("  beside Trellis's services, apart: {}", beside.join(", "));
}

#[tokio::main]
async fn main() {
    let dir = tempfile::Builder::new()
        .prefix("trellis-bench-")
        .tempdir()
        .expect("temp dir");
    let SideBySide {
        containerd,
        network: _network,
        node,
        image: images,
        registry: _registry,
    } = SideBySide::start(dir.path(), "bench").await;
    let mut services = Vec::new();
    for service in SERVICES {
        let info = node.info(service).await.expect("service info");
        services.push((service.to_string(), info.pid as i32));
    }
    let up = node.up_pid().map(|pid| pid as i32);
    let root: PathBuf = node.root().to_path_buf();

    println!("=== Trellis ===");
    let mut trellis_loaded = Memory::default();
    let trellis = bench(
        &node.socket("gateway"),
        Some((node.socket("runtime"), node.socket("image"))),
        &images,
        &dir.path().join("trellis.json"),
        || trellis_loaded = trellis_memory(&root, &services, up),
    );
    println!("\n=== containerd ===");
    let mut containerd_loaded = Memory::default();
    let peer = bench(
        &containerd.socket,
        None,
        &images,
        &dir.path().join("containerd.json"),
        || containerd_loaded = containerd_memory(&containerd),
    );
    print_comparison(&trellis, &peer);
    print_memory(
        "with the list pods up (Trellis's reading taken during its run, containerd's during its own)",
        &trellis_loaded,
        &containerd_loaded,
    );
    let settle: u64 = setting("BENCH_SETTLE_SECONDS", "15").parse().unwrap_or(15);
    tokio::time::sleep(Duration::from_secs(settle)).await;
    print_memory(
        &format!("idle after the run ({settle} s settled, both read at once)"),
        &trellis_memory(&root, &services, up),
        &containerd_memory(&containerd),
    );
    drop(containerd);
    node.stop();
}
