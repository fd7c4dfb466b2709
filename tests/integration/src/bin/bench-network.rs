//! Pod network set-up and tear-down latency: Trellis's SetUpPod/TearDownPod through
//! the network service's socket on a node this boots, against the floor, the same
//! plugin chain run directly from this process (namespace, loopback, ADD chain; DEL
//! chain, namespace). Prints medians and 95th percentiles, sequential and 10 at once.
//!
//! Run as root, after `cargo build --release --bins`:
//! `cargo run --release -p trellis-integration --bin bench-network [-- <sequential> <concurrent>]`

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::transport::Channel;
use trellis_integration::netns::{self, TestNetwork};
use trellis_integration::{Node, NodeOptions, unix_channel};
use trellis_proto::network::v1::network_client::NetworkClient;
use trellis_proto::network::v1::{SetUpPodRequest, TearDownPodRequest};

const PLUGIN_DIR: &str = "/usr/lib/cni";
const ROUNDS_AT_ONCE: usize = 5;

/// Set-up and tear-down times of one way of doing it.
#[derive(Default)]
struct Samples {
    set_up: Vec<Duration>,
    tear_down: Vec<Duration>,
}

impl Samples {
    fn extend(&mut self, other: Samples) {
        self.set_up.extend(other.set_up);
        self.tear_down.extend(other.tear_down);
    }
}

fn main() {
    // The harness finds the service binaries beside `deps/`, where test binaries run
    // from. TRELLIS_BIN_DIR cannot point it elsewhere here: every Trellis process would
    // read it as the configuration key `bin_dir.`. So this runs its own copy in deps/.
    let exe = std::env::current_exe().expect("own path");
    if exe
        .parent()
        .and_then(Path::file_name)
        .is_none_or(|dir| dir != "deps")
    {
        let dir = exe.parent().expect("own directory");
        assert!(
            dir.join("trellis-network").is_file(),
            "no trellis-network beside {}: run `cargo build --release --bins` first",
            exe.display()
        );
        let copy = copy_in_deps(&exe)
            .unwrap_or_else(|| panic!("no copy of {} in {}/deps", exe.display(), dir.display()));
        let status = Command::new(copy)
            .args(std::env::args_os().skip(1))
            .status()
            .expect("run the copy in deps/");
        std::process::exit(status.code().unwrap_or(1));
    }
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("counts are numbers"));
    let sequential = args.next().unwrap_or(50);
    let at_once = args.next().unwrap_or(10);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(bench(sequential, at_once));
}

/// Cargo's own build of this binary, `deps/bench_network-<hash>`, which `exe` is a
/// hard link to (or a copy of).
fn copy_in_deps(exe: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata(exe).ok()?;
    let deps = exe.parent()?.join("deps");
    std::fs::read_dir(deps)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|path| {
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bench_network-") && !n.contains('.'));
            named
                && std::fs::metadata(path)
                    .is_ok_and(|m| m.ino() == own.ino() || m.len() == own.len())
        })
}

async fn bench(sequential: usize, at_once: usize) {
    let node = Node::start(NodeOptions::default()).await;
    let trellis_network = TestNetwork::new(node.root());
    trellis_network.write(&node.cni_dir());
    let client = NetworkClient::new(unix_channel(&node.socket("network")));

    let floor_root = tempfile::Builder::new()
        .prefix("trellis-bench-floor-")
        .tempdir()
        .expect("floor root");
    let floor_network = TestNetwork::new(floor_root.path());
    let floor = Floor {
        config: floor_network.conflist(),
        pins: floor_root.path().join("netns"),
    };
    std::fs::create_dir_all(&floor.pins).expect("floor pin dir");

    // Warm-up: page cache, bridge creation, iptables chains.
    trellis_sequential(&client, "warm", 3).await;
    floor.sequential("warm", 3);

    let trellis_seq = trellis_sequential(&client, "seq", sequential).await;
    let floor_seq = floor.sequential("seq", sequential);
    let mut trellis_par = Samples::default();
    let mut floor_par = Samples::default();
    for round in 0..ROUNDS_AT_ONCE {
        trellis_par.extend(trellis_at_once(&client, &format!("par{round}"), at_once).await);
        floor_par.extend(floor.at_once(&format!("par{round}"), at_once));
    }

    println!(
        "pod network latency (plugins: bridge + host-local + portmap, plus loopback), milliseconds"
    );
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>14}",
        "", "set-up median", "set-up p95", "tear-down med", "tear-down p95"
    );
    report(
        &format!("sequential ({sequential})"),
        &trellis_seq,
        &floor_seq,
    );
    report(
        &format!("{at_once} at once ({}x{at_once})", ROUNDS_AT_ONCE),
        &trellis_par,
        &floor_par,
    );

    assert!(
        netns::pins(&node.root().join("run")).is_empty()
            && netns::pins(floor_root.path()).is_empty(),
        "the bench left pins"
    );
    node.stop();
}

fn report(label: &str, trellis: &Samples, floor: &Samples) {
    let figures = |s: &Samples| {
        [
            median(&s.set_up),
            p95(&s.set_up),
            median(&s.tear_down),
            p95(&s.tear_down),
        ]
    };
    let (t, f) = (figures(trellis), figures(floor));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("{label:<28}");
    println!(
        "{:<28} {:>14.1} {:>14.1} {:>14.1} {:>14.1}",
        "  trellis",
        ms(t[0]),
        ms(t[1]),
        ms(t[2]),
        ms(t[3])
    );
    println!(
        "{:<28} {:>14.1} {:>14.1} {:>14.1} {:>14.1}",
        "  floor (plugins direct)",
        ms(f[0]),
        ms(f[1]),
        ms(f[2]),
        ms(f[3])
    );
    let ratio = |i: usize| ms(t[i]) / ms(f[i]);
    println!(
        "{:<28} {:>13.2}x {:>13.2}x {:>13.2}x {:>13.2}x",
        "  trellis / floor",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3)
    );
}

fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 0.5)
}

fn p95(samples: &[Duration]) -> Duration {
    percentile(samples, 0.95)
}

fn percentile(samples: &[Duration], quantile: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

fn request(sandbox_id: &str) -> SetUpPodRequest {
    SetUpPodRequest {
        sandbox_id: sandbox_id.into(),
        pod_name: sandbox_id.into(),
        pod_namespace: "bench".into(),
        pod_uid: sandbox_id.into(),
        ..Default::default()
    }
}

async fn trellis_one(
    mut client: NetworkClient<Channel>,
    sandbox_id: String,
) -> (Duration, Duration) {
    let started = Instant::now();
    client
        .set_up_pod(request(&sandbox_id))
        .await
        .unwrap_or_else(|e| panic!("SetUpPod {sandbox_id}: {e:?}"));
    let set_up = started.elapsed();
    let started = Instant::now();
    client
        .tear_down_pod(TearDownPodRequest {
            sandbox_id: sandbox_id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("TearDownPod {sandbox_id}: {e:?}"));
    (set_up, started.elapsed())
}

async fn trellis_sequential(
    client: &NetworkClient<Channel>,
    prefix: &str,
    count: usize,
) -> Samples {
    let mut samples = Samples::default();
    for i in 0..count {
        let (set_up, tear_down) = trellis_one(client.clone(), format!("{prefix}-{i}")).await;
        samples.set_up.push(set_up);
        samples.tear_down.push(tear_down);
    }
    samples
}

/// `count` pods set up at once, then torn down at once.
async fn trellis_at_once(client: &NetworkClient<Channel>, prefix: &str, count: usize) -> Samples {
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let set_ups = ids.iter().map(|id| {
        let (mut client, id) = (client.clone(), id.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            client
                .set_up_pod(request(&id))
                .await
                .unwrap_or_else(|e| panic!("SetUpPod {id}: {e:?}"));
            started.elapsed()
        })
    });
    let set_up = futures::future::join_all(set_ups.collect::<Vec<_>>())
        .await
        .into_iter()
        .map(|r| r.expect("set-up task"))
        .collect();
    let tear_downs = ids.iter().map(|id| {
        let (mut client, id) = (client.clone(), id.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            client
                .tear_down_pod(TearDownPodRequest {
                    sandbox_id: id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("TearDownPod {id}: {e:?}"));
            started.elapsed()
        })
    });
    let tear_down = futures::future::join_all(tear_downs.collect::<Vec<_>>())
        .await
        .into_iter()
        .map(|r| r.expect("tear-down task"))
        .collect();
    Samples { set_up, tear_down }
}

/// The same work without Trellis: what any runtime must at least spend.
struct Floor {
    config: Value,
    pins: PathBuf,
}

impl Floor {
    fn sequential(&self, prefix: &str, count: usize) -> Samples {
        let mut samples = Samples::default();
        for i in 0..count {
            let id = format!("{prefix}-{i}");
            samples.set_up.push(self.set_up(&id));
            samples.tear_down.push(self.tear_down(&id));
        }
        samples
    }

    fn at_once(&self, prefix: &str, count: usize) -> Samples {
        let ids: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        let timed = |work: &(dyn Fn(&str) -> Duration + Sync)| -> Vec<Duration> {
            std::thread::scope(|scope| {
                ids.iter()
                    .map(|id| scope.spawn(move || work(id)))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|h| h.join().expect("floor thread"))
                    .collect()
            })
        };
        let set_up = timed(&|id| self.set_up(id));
        let tear_down = timed(&|id| self.tear_down(id));
        Samples { set_up, tear_down }
    }

    fn set_up(&self, id: &str) -> Duration {
        let started = Instant::now();
        let pin = self.pins.join(id);
        netns::create_netns(&pin).expect("create netns");
        let loopback =
            json!({"cniVersion": "1.0.0", "name": "loopback", "plugins": [{"type": "loopback"}]});
        run_chain(&loopback, "ADD", id, &pin, "lo");
        run_chain(&self.config, "ADD", id, &pin, "eth0");
        started.elapsed()
    }

    fn tear_down(&self, id: &str) -> Duration {
        let started = Instant::now();
        let pin = self.pins.join(id);
        run_chain(&self.config, "DEL", id, &pin, "eth0");
        netns::delete_netns(&pin).expect("delete netns");
        started.elapsed()
    }
}

/// ADD in order with results chained, or DEL in reverse.
fn run_chain(network: &Value, command: &str, id: &str, netns: &Path, interface: &str) {
    let plugins = network["plugins"].as_array().cloned().unwrap_or_default();
    let ordered: Vec<Value> = if command == "DEL" {
        plugins.into_iter().rev().collect()
    } else {
        plugins
    };
    let mut previous: Option<Value> = None;
    for plugin in ordered {
        let mut config = plugin.as_object().cloned().unwrap_or_default();
        config.insert("name".into(), network["name"].clone());
        config.insert("cniVersion".into(), network["cniVersion"].clone());
        if let Some(previous) = &previous {
            config.insert("prevResult".into(), previous.clone());
        }
        let plugin_type = plugin["type"].as_str().unwrap_or_default();
        let mut child = Command::new(Path::new(PLUGIN_DIR).join(plugin_type))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", interface)
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID={id}"))
            .env("CNI_PATH", PLUGIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {plugin_type}: {e}"));
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(Value::Object(config).to_string().as_bytes())
            .expect("write config");
        let output = child.wait_with_output().expect("plugin output");
        assert!(
            output.status.success(),
            "{plugin_type} {command} {id}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if command == "ADD" {
            previous = Some(serde_json::from_slice(&output.stdout).expect("plugin result"));
        }
    }
}
