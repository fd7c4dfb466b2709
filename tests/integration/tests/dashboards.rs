//! The Grafana dashboards in `deploy/grafana/` show data: Debian's Prometheus scrapes a
//! test node (its five services and `trellis up`) under load, and every query of every
//! panel, with the node variable set to the node's host, returns at least one series.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trellis_integration::cri::{self, BusyboxNode};
use trellis_integration::metrics::http_get;
use trellis_integration::{NodeOptions, eventually, free_port, kill9};

/// A Prometheus of the test's own: its config, data and port; killed when dropped.
struct Prometheus {
    child: Child,
    address: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes every `(service, address)` each 500 ms, each target labelled with its
    /// service as `deploy/prometheus/prometheus.yml` labels them.
    fn start(dir: &Path, targets: &[(String, String)]) -> Prometheus {
        let mut config = String::from(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\nscrape_configs:\n  - job_name: trellis\n    static_configs:\n",
        );
        for (service, address) in targets {
            config.push_str(&format!(
                "      - targets: [\"{address}\"]\n        labels:\n          service: {service}\n"
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let address = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian's prometheus package)");
        Prometheus { child, address }
    }

    /// Runs an instant query; the number of series it returns.
    fn series(&self, query: &str) -> Result<usize, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(query));
        let body = http_get(&self.address, &path)?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("query failed: {body}"));
        }
        Ok(answer["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `(panel title, query)` of every dashboard under `deploy/grafana/`.
fn panel_queries() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/grafana") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or_default();
                    queries.push((format!("{}: {title}", path.display()), expr.to_string()));
                }
            }
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread")]
async fn every_panel_of_every_dashboard_shows_data_from_a_node_under_load() {
    let queries = panel_queries();
    assert!(queries.len() >= 20, "the dashboards' queries: {queries:?}");
    // Fixed ports, so that a restarted service is scraped where it was.
    let targets: Vec<(String, String)> = [
        "supervisor",
        "gateway",
        "runtime",
        "image",
        "storage",
        "network",
    ]
    .iter()
    .map(|service| (service.to_string(), format!("127.0.0.1:{}", free_port())))
    .collect();
    let env = targets
        .iter()
        .map(|(service, address)| {
            let key = format!("TRELLIS_{}_METRICS_LISTEN", service.to_uppercase());
            (key, address.clone())
        })
        .collect();
    let node = BusyboxNode::start_with(NodeOptions {
        with_cni_config: true,
        env,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prometheus = Prometheus::start(dir.path(), &targets);

    // Load: pulls (one that fails), a pod whose container exits with an error, a
    // container stopped, a restart of a service.
    let _ = cri::pull(&node.node, "127.0.0.1:1/tests/none:1").await;
    let pod = cri::run_pod(&node.node, cri::pod_config("dash", false)).await;
    let failing = cri::start(
        &node.node,
        &pod,
        node.container("fails", &["sh", "-c", "exit 3"]),
    )
    .await;
    cri::wait_exited(&node.node, &failing, Duration::from_secs(10)).await;
    let sleeping = cri::start(&node.node, &pod, node.container("sleeps", &["sleep", "60"])).await;
    let runtime = node.node.info("runtime").await.expect("info").pid;
    kill9(runtime);
    node.node
        .wait_restarted("runtime", runtime, Duration::from_secs(20))
        .await;
    cri::container_status(&node.node, &sleeping).await;

    // Rates need two scrapes after the load; the restarted runtime's listener moved.
    let mut empty = Vec::new();
    let all_answer = eventually(Duration::from_secs(30), || {
        empty = queries
            .iter()
            .filter_map(|(panel, query)| {
                let query = query.replace("$node", "127.0.0.1");
                match prometheus.series(&query) {
                    Ok(0) => Some(format!("{panel}: no data: {query}")),
                    Ok(_) => None,
                    Err(error) => Some(format!("{panel}: {error}: {query}")),
                }
            })
            .collect();
        empty.is_empty()
    })
    .await;
    eprintln!(
        "{} panel queries over 6 targets; without data: {}",
        queries.len(),
        empty.len()
    );
    assert!(all_answer, "panels without data: {empty:#?}");
    cri::remove_pod(&node.node, &pod.id).await;
    drop(prometheus);
    node.node.stop();
}
