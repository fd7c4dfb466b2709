//! Prometheus metrics in every service: a node with every listener on is scraped
//! before any CRI call (every expected name there, error series at 0) and after a
//! failed pull, two pulls, a pod with a container that exits, and the pod's removal
//! (the right counters moved, and no label holds an id).

use std::time::Duration;

use trellis_integration::cri::{self, Pod};
use trellis_integration::metrics::{Scrape, scrape, scrape_address};
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions, free_port, kill9, pods};

const SERVICES: [&str; 5] = ["gateway", "runtime", "image", "storage", "network"];
const CRI_RUNTIME: &str = "runtime.v1.RuntimeService";
const CRI_IMAGE: &str = "runtime.v1.ImageService";

fn handled(service: &str, method: &str, code: &str) -> String {
    format!(
        "trellis_grpc_server_handled_total{{grpc_service=\"{service}\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
    )
}

fn handling_count(service: &str, method: &str) -> String {
    format!(
        "trellis_grpc_server_handling_seconds_count{{grpc_service=\"{service}\",grpc_method=\"{method}\"}}"
    )
}

/// What every service exports, and what each exports at 0 before any CRI call.
fn expect_before_any_call(service: &str, scrape: &Scrape) {
    for name in [
        "trellis_process_cpu_seconds_total",
        "trellis_process_resident_memory_bytes",
        "trellis_process_open_fds",
        "trellis_process_start_time_seconds",
        "trellis_bus_connected",
        "trellis_events_outbox_pending",
        "trellis_events_published_total",
        "trellis_events_dropped_total",
        "trellis_grpc_server_handled_total",
        "trellis_grpc_server_handling_seconds_count",
    ] {
        assert!(scrape.has(name), "{service}: no {name} in\n{}", scrape.text);
    }
    assert_eq!(
        scrape.value(&format!(
            "trellis_build_info{{service=\"{service}\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(scrape.value("trellis_process_resident_memory_bytes") > 0.0);
    // The skeleton's own services are counted too.
    assert_eq!(
        scrape.value(&handled("grpc.health.v1.Health", "Check", "Unavailable")),
        0.0
    );
    let zero: &[&str] = match service {
        "gateway" | "runtime" => &["RunPodSandbox", "CreateContainer", "StopContainer"],
        _ => &[],
    };
    for method in zero {
        for code in [
            "OK",
            "Internal",
            "NotFound",
            "Unavailable",
            "DeadlineExceeded",
        ] {
            assert_eq!(scrape.value(&handled(CRI_RUNTIME, method, code)), 0.0);
        }
    }
    match service {
        "gateway" | "image" => {
            for code in ["OK", "NotFound", "Unauthenticated", "Unavailable"] {
                assert_eq!(scrape.value(&handled(CRI_IMAGE, "PullImage", code)), 0.0);
            }
        }
        _ => {}
    }
    let at_zero: &[&str] = match service {
        "runtime" => &[
            "trellis_runtime_pods{state=\"ready\"}",
            "trellis_runtime_containers{state=\"running\"}",
            "trellis_runtime_container_exits_total{reason=\"Error\"}",
            "trellis_runtime_container_exits_total{reason=\"OOMKilled\"}",
            "trellis_runtime_oom_kills_total",
            "trellis_runtime_oci_duration_seconds_count{operation=\"create\"}",
            "trellis_runtime_container_stop_duration_seconds_count",
            "trellis_runtime_streaming_sessions{kind=\"exec\"}",
        ],
        "image" => &[
            "trellis_image_pulls_total{outcome=\"ok\",reason=\"\"}",
            "trellis_image_pulls_total{outcome=\"failed\",reason=\"NotFound\"}",
            "trellis_image_pulls_total{outcome=\"failed\",reason=\"Unavailable\"}",
            "trellis_image_pull_bytes_total",
            "trellis_image_layers_reused_total",
            "trellis_image_pull_duration_seconds_count{outcome=\"ok\"}",
        ],
        "storage" => &[
            "trellis_storage_layers",
            "trellis_storage_images",
            "trellis_storage_containers",
            "trellis_storage_used_bytes{store=\"layers\"}",
            "trellis_storage_unpacked_bytes_total",
            "trellis_storage_unpack_duration_seconds_count",
            "trellis_storage_write_errors_total{store=\"layers\"}",
            "trellis_storage_write_errors_total{store=\"containers\"}",
        ],
        "network" => &[
            "trellis_network_pod_ips",
            "trellis_network_pod_add_duration_seconds_count",
            "trellis_network_cni_failures_total{operation=\"add\",plugin=\"bridge\"}",
            "trellis_network_cni_failures_total{operation=\"del\",plugin=\"portmap\"}",
            "trellis_network_cni_failures_total{operation=\"add\",plugin=\"netns\"}",
        ],
        _ => &[],
    };
    for series in at_zero {
        assert_eq!(scrape.value(series), 0.0, "{service}: {series}");
    }
}

async fn scrape_all(node: &Node) -> Vec<(&'static str, Scrape)> {
    let mut scrapes = Vec::new();
    for service in SERVICES {
        scrapes.push((service, scrape(node, service).await));
    }
    scrapes
}

fn of<'a>(scrapes: &'a [(&str, Scrape)], service: &str) -> &'a Scrape {
    &scrapes
        .iter()
        .find(|(name, _)| *name == service)
        .expect("scraped")
        .1
}

/// No label value is an id: pods, containers, images (ids and digests), anything
/// that looks like a 64-digit hex digest.
fn assert_no_ids(scrapes: &[(&str, Scrape)], ids: &[&str]) {
    for (service, scrape) in scrapes {
        for value in scrape.label_values() {
            let hex = value.trim_start_matches("sha256:");
            assert!(
                !(hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit())),
                "{service}: a label holds an id: {value}"
            );
            assert!(
                !ids.iter().any(|id| value.contains(id)),
                "{service}: a label holds an id: {value}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_reports_its_calls_and_its_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    registry
        .push(
            "tests/busybox",
            "1",
            &image(vec![busybox_layer()], &["/bin/sh"], "amd64", false),
        )
        .await;
    // The same layer under another config: its pull reuses the layer.
    registry
        .push(
            "tests/busybox",
            "2",
            &image(vec![busybox_layer()], &["/bin/echo"], "amd64", false),
        )
        .await;
    let node = Node::start(NodeOptions {
        with_cni_config: true,
        with_metrics: true,
        ..Default::default()
    })
    .await;

    for (service, scrape) in scrape_all(&node).await {
        expect_before_any_call(service, &scrape);
    }

    let missing = format!("{}/tests/missing:1", registry.address);
    let failed = cri::pull(&node, &missing).await.expect_err("no such image");
    let busybox = format!("{}/tests/busybox:1", registry.address);
    cri::pull(&node, &busybox).await.expect("pull busybox");
    cri::pull(&node, &format!("{}/tests/busybox:2", registry.address))
        .await
        .expect("pull busybox:2");

    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let pod: Pod = cri::run_pod(
        &node,
        pods::pod_config("metrics", logs.to_str().expect("utf-8"), false),
    )
    .await;
    let container = cri::start(
        &node,
        &pod,
        pods::container_config("exits", &busybox, &["/bin/sh", "-c", "exit 3"]),
    )
    .await;
    let status = cri::wait_exited(&node, &container, Duration::from_secs(20)).await;
    assert_eq!(status.exit_code, 3);

    let during = scrape_all(&node).await;
    let code = format!("{:?}", failed.code());
    let code = if code == "Cancelled" {
        "Canceled"
    } else {
        &code
    };
    let gateway = of(&during, "gateway");
    assert_eq!(gateway.value(&handled(CRI_IMAGE, "PullImage", "OK")), 2.0);
    assert_eq!(gateway.value(&handled(CRI_IMAGE, "PullImage", code)), 1.0);
    assert_eq!(
        gateway.value(&handled(CRI_RUNTIME, "RunPodSandbox", "OK")),
        1.0
    );
    assert_eq!(
        gateway.value(&handled(CRI_RUNTIME, "StartContainer", "OK")),
        1.0
    );
    assert_eq!(
        gateway.value(&handling_count(CRI_RUNTIME, "RunPodSandbox")),
        1.0
    );

    let runtime = of(&during, "runtime");
    assert_eq!(
        runtime.value(&handled(CRI_RUNTIME, "CreateContainer", "OK")),
        1.0
    );
    assert_eq!(runtime.value("trellis_runtime_pods{state=\"ready\"}"), 1.0);
    assert_eq!(
        runtime.value("trellis_runtime_containers{state=\"exited\"}"),
        1.0
    );
    assert_eq!(
        runtime.value("trellis_runtime_container_exits_total{reason=\"Error\"}"),
        1.0
    );
    assert!(
        runtime.value("trellis_runtime_oci_duration_seconds_count{operation=\"create\"}") >= 1.0
    );
    assert!(
        runtime.value("trellis_runtime_oci_duration_seconds_count{operation=\"start\"}") >= 1.0
    );

    let image = of(&during, "image");
    assert_eq!(image.value(&handled(CRI_IMAGE, "PullImage", code)), 1.0);
    assert_eq!(
        image.value("trellis_image_pulls_total{outcome=\"ok\",reason=\"\"}"),
        2.0
    );
    assert_eq!(
        image.value(&format!(
            "trellis_image_pulls_total{{outcome=\"failed\",reason=\"{code}\"}}"
        )),
        1.0
    );
    assert!(image.value("trellis_image_pull_bytes_total") > 0.0);
    assert_eq!(image.value("trellis_image_layers_reused_total"), 1.0);

    let storage = of(&during, "storage");
    // Internal gRPC is counted like the CRI.
    assert_eq!(
        storage.value(&handled("trellis.storage.v1.Storage", "ImportLayer", "OK")),
        1.0
    );
    assert!(
        storage.value(&handled(
            "trellis.storage.v1.Storage",
            "PrepareRootfs",
            "OK"
        )) >= 1.0
    );
    assert_eq!(storage.value("trellis_storage_layers"), 1.0);
    assert_eq!(storage.value("trellis_storage_images"), 2.0);
    assert!(storage.value("trellis_storage_used_bytes{store=\"layers\"}") > 0.0);
    assert!(storage.value("trellis_storage_unpacked_bytes_total") > 0.0);
    assert_eq!(
        storage.value("trellis_storage_unpack_duration_seconds_count"),
        1.0
    );

    let network = of(&during, "network");
    assert_eq!(
        network.value(&handled("trellis.network.v1.Network", "SetUpPod", "OK")),
        1.0
    );
    assert_eq!(
        network.value("trellis_network_pod_add_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        network.value(
            "trellis_network_cni_plugin_duration_seconds_count{command=\"ADD\",plugin=\"bridge\"}"
        ),
        1.0
    );
    assert_eq!(network.value("trellis_network_pod_ips"), 1.0);

    cri::remove_pod(&node, &pod.id).await;
    let after = scrape_all(&node).await;
    let network = of(&after, "network");
    assert_eq!(
        network.value("trellis_network_pod_del_duration_seconds_count"),
        1.0
    );
    assert!(
        network.value(
            "trellis_network_cni_plugin_duration_seconds_count{command=\"DEL\",plugin=\"bridge\"}"
        ) >= 1.0
    );
    assert_eq!(network.value("trellis_network_pod_ips"), 0.0);
    assert_eq!(
        of(&after, "runtime").value("trellis_runtime_pods{state=\"ready\"}"),
        0.0
    );
    // The stateful services publish (through their outbox); the others only report.
    for service in ["runtime", "storage", "network"] {
        let scrape = of(&after, service);
        assert!(
            scrape.value("trellis_events_published_total") > 0.0
                || scrape.value("trellis_events_outbox_pending") > 0.0,
            "{service} published no event"
        );
    }
    assert_no_ids(&during, &[&pod.id, &container]);
    assert_no_ids(&after, &[&pod.id, &container]);
    node.stop();
}

/// `trellis up` counts each restart under its child and reason; every pair is at 0
/// before the first.
#[tokio::test(flavor = "multi_thread")]
async fn the_supervisor_counts_restarts_by_child_and_reason() {
    let address = format!("127.0.0.1:{}", free_port());
    let node = Node::start(NodeOptions {
        env: vec![("TRELLIS_SUPERVISOR_METRICS_LISTEN".into(), address.clone())],
        ..Default::default()
    })
    .await;
    let killed = "trellis_supervisor_restarts_total{service=\"runtime\",reason=\"killed\"}";
    let before = scrape_address(&address);
    for service in SERVICES.iter().chain(&["nats"]) {
        for reason in ["exited", "killed", "unhealthy", "operator"] {
            let series = format!(
                "trellis_supervisor_restarts_total{{service=\"{service}\",reason=\"{reason}\"}}"
            );
            assert_eq!(before.value(&series), 0.0, "{series}");
        }
    }
    assert!(before.has("trellis_process_resident_memory_bytes"));

    let pid = node.info("runtime").await.expect("info").pid;
    kill9(pid);
    node.wait_restarted("runtime", pid, Duration::from_secs(30))
        .await;
    let after = scrape_address(&address);
    assert_eq!(after.value(killed), 1.0);
    assert_eq!(
        after.value("trellis_supervisor_restarts_total{service=\"runtime\",reason=\"exited\"}"),
        0.0
    );
    node.stop();
}
