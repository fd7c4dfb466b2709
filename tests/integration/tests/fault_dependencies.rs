//! Faults of what a node depends on, seen through the CRI socket as a kubelet sees
//! them: a CNI plugin that fails or hangs, a registry that goes away mid-pull or
//! serves a truncated blob. Each call fails naming the part that failed, with the
//! code that says how, leaves nothing behind, and succeeds once the part is whole
//! again. (The node's own services down or stuck: `fault_services.rs`; the bus down
//! under churn: `fault_bus_outage.rs`.)

use std::time::{Duration, Instant};

use tonic::Code;
use trellis_integration::cri::{self, list_images, pod_config, pull, remove_pod, try_run_pod};
use trellis_integration::faults::entries;
use trellis_integration::hostile::TrickleProxy;
use trellis_integration::hostile::slow_image;
use trellis_integration::netns::{self, TestNetwork};
use trellis_integration::registry::{Registry, small_image};
use trellis_integration::{Node, NodeOptions, eventually};

/// A CNI plugin chained after bridge and portmap that does what `<dir>/mode` says on
/// ADD: `fail` (a CNI error), `hang` (starts a helper, records both pids in
/// `<dir>/pids`, waits forever), or, without the file, what the real `tuning`
/// plugin does with no settings: pass the result on.
struct FlakyPlugin {
    dir: tempfile::TempDir,
}

const FLAKY: &str = "trellis-test-flaky";

impl FlakyPlugin {
    fn install() -> FlakyPlugin {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("plugin dir");
        let mode = dir.path().join("mode");
        let pids = dir.path().join("pids");
        let script = format!(
            r#"#!/bin/sh
if [ "$CNI_COMMAND" = "ADD" ] && [ -e {mode} ]; then
  case "$(cat {mode})" in
    fail)
      cat >/dev/null
      echo '{{"cniVersion":"1.0.0","code":100,"msg":"refused by the test","details":"on purpose"}}'
      exit 1;;
    hang)
      sleep 600 &
      echo $$ $! > {pids}
      wait
      exit 0;;
  esac
fi
exec /usr/lib/cni/tuning
"#,
            mode = mode.display(),
            pids = pids.display(),
        );
        let path = dir.path().join(FLAKY);
        std::fs::write(&path, script).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod plugin");
        FlakyPlugin { dir }
    }

    fn set(&self, mode: Option<&str>) {
        let file = self.dir.path().join("mode");
        match mode {
            Some(mode) => std::fs::write(&file, mode).expect("write mode"),
            None => std::fs::remove_file(&file).expect("remove mode"),
        }
    }

    /// The hung plugin's pid and its helper's.
    fn hung_pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.path().join("pids"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }

    /// A node that finds this plugin, with `env` added, and its network.
    async fn node(&self, env: &[(&str, &str)]) -> (Node, TestNetwork) {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push((
            "TRELLIS_NETWORK_CNI_PLUGIN_DIRS".into(),
            format!("{},/usr/lib/cni", self.dir.path().display()),
        ));
        let node = Node::start(NodeOptions {
            env,
            ..Default::default()
        })
        .await;
        let network =
            TestNetwork::new(node.root()).with_plugin(serde_json::json!({ "type": FLAKY }));
        network.write(&node.cni_dir());
        (node, network)
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// No pod of the node holds anything: no pod listed, no pod directory, no netns pin,
/// no veth on the bridge, no address allocated, no NAT rule of the network.
async fn assert_no_pod_left(node: &Node, network: &TestNetwork) {
    let pods = cri::list_pods(node).await;
    assert!(pods.is_empty(), "pods left: {pods:?}");
    let run = node.root().join("run");
    assert_eq!(entries(&run.join("runtime/pods")), Vec::<String>::new());
    assert_eq!(netns::pins(&run), Vec::<String>::new(), "netns pins left");
    assert_eq!(network.bridge_ports(), Vec::<String>::new(), "veths left");
    assert_eq!(
        network.allocations(),
        Vec::<String>::new(),
        "addresses left"
    );
    assert_eq!(
        netns::nat_rules_mentioning(&network.name),
        Vec::<String>::new(),
        "NAT rules left"
    );
}

async fn run_pod_sandbox(node: &Node, name: &str) -> Result<String, tonic::Status> {
    try_run_pod(node, pod_config(name, false), Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_cni_plugin_fails_the_pod_by_name_and_the_pod_runs_once_it_is_fixed() {
    let plugin = FlakyPlugin::install();
    plugin.set(Some("fail"));
    let (node, network) = plugin.node(&[]).await;

    let error = run_pod_sandbox(&node, "flaky")
        .await
        .expect_err("the plugin fails ADD");
    let message = error.message();
    assert_eq!(error.code(), Code::Internal, "{message}");
    assert!(
        message.starts_with("network service: ")
            && message.contains(&format!("CNI plugin `{FLAKY}` ADD failed"))
            && message.contains("refused by the test")
            && !message.contains("not answering"),
        "{message}"
    );
    assert_no_pod_left(&node, &network).await;

    plugin.set(None);
    let id = run_pod_sandbox(&node, "flaky")
        .await
        .expect("the same pod runs once the plugin is fixed");
    assert_eq!(network.allocations().len(), 1);
    remove_pod(&node, &id).await;
    assert_no_pod_left(&node, &network).await;
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_cni_plugin_is_killed_at_its_timeout_and_the_pod_runs_once_it_answers() {
    let plugin = FlakyPlugin::install();
    plugin.set(Some("hang"));
    let (node, network) = plugin
        .node(&[("TRELLIS_NETWORK_CNI_PLUGIN_TIMEOUT_SECONDS", "2")])
        .await;

    let started = Instant::now();
    let error = run_pod_sandbox(&node, "hung")
        .await
        .expect_err("the plugin hangs");
    let waited = started.elapsed();
    let message = error.message();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "bounded by the plugin's timeout: {waited:?} ({message})"
    );
    assert!(
        message.starts_with("network service: ")
            && message.contains(&format!("CNI plugin `{FLAKY}` ADD"))
            && message.contains("did not finish within 2s"),
        "{message}"
    );
    let pids = plugin.hung_pids();
    assert_eq!(pids.len(), 2, "the plugin and its helper ran");
    assert!(
        eventually(Duration::from_secs(5), || !pids
            .iter()
            .any(|&pid| alive(pid)))
        .await,
        "the hung plugin or its helper lives on: {pids:?}"
    );
    assert_no_pod_left(&node, &network).await;

    plugin.set(None);
    let id = run_pod_sandbox(&node, "hung")
        .await
        .expect("the same pod runs once the plugin answers");
    remove_pod(&node, &id).await;
    assert_no_pod_left(&node, &network).await;
    node.stop();
}

/// Nothing of a failed pull is left: no image, and (once storage has seen the
/// stream end and the pull pruned what it imported) no layer, whole or half.
async fn assert_nothing_pulled(node: &Node, what: &str) {
    assert!(list_images(node).await.is_empty(), "{what}: no image");
    assert!(
        eventually(Duration::from_secs(10), || node.layer_dirs().is_empty()).await,
        "{what}: layers left: {:?}\n{}",
        node.layer_dirs(),
        node.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_goes_away_mid_pull_fails_it_by_name_and_the_pull_succeeds_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = slow_image();
    registry.push("tests/away", "1", &built).await;
    let proxy = TrickleProxy::start(&registry.address, 16 * 1024, Duration::from_millis(10)).await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/away:1", proxy.address);

    // A tag the registry does not have: NotFound, from the registry.
    let error = pull(&node, &format!("{}/tests/away:missing", proxy.address))
        .await
        .expect_err("no such tag");
    assert_eq!(error.code(), Code::NotFound, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("registry {}: manifest unknown", proxy.address)),
        "{}",
        error.message()
    );

    let pulling = trellis_integration::cri::pull_in_background(&node, &name);
    assert!(
        eventually(Duration::from_secs(30), || proxy.forwarded() > 1_000_000).await,
        "the big layer never got going: {} bytes\n{}",
        proxy.forwarded(),
        node.log_tail()
    );
    proxy.cut();
    let error = tokio::time::timeout(Duration::from_secs(30), pulling)
        .await
        .expect("the pull ends")
        .expect("pull task")
        .expect_err("the registry went away");
    let big = built.layers[1].digest();
    assert_eq!(error.code(), Code::Unavailable, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("registry {}: ", proxy.address))
            && error.message().contains(&format!("downloading {big}")),
        "names the registry and the blob: {}",
        error.message()
    );
    assert_nothing_pulled(&node, "cut mid-blob").await;

    proxy.mend();
    proxy.full_speed();
    pull(&node, &name)
        .await
        .expect("the same pull once the registry is back");
    assert_eq!(list_images(&node).await.len(), 1);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_blob_fails_the_pull_as_data_loss_and_the_pull_succeeds_once_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = small_image("truncated");
    registry.push("tests/truncated", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/truncated:1", registry.address);
    let busybox = built.layers[0].digest();
    let blob = registry.blob_file(&busybox);
    let whole = std::fs::read(&blob).expect("blob");
    std::fs::write(&blob, &whole[..whole.len() / 2]).expect("truncate blob");

    let error = pull(&node, &name).await.expect_err("truncated blob");
    assert_eq!(error.code(), Code::DataLoss, "{}", error.message());
    assert!(
        error
            .message()
            .contains(&format!("registry {}: ", registry.address))
            && error.message().contains(&busybox),
        "names the registry and the blob: {}",
        error.message()
    );
    assert_nothing_pulled(&node, "truncated blob").await;

    std::fs::write(&blob, &whole).expect("mend blob");
    pull(&node, &name)
        .await
        .expect("the same pull once the blob is whole");
    assert_eq!(list_images(&node).await.len(), 1);
    node.stop();
}
