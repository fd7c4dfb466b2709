//! Pod and container lifecycle benchmark: `trellis bench` against a Trellis node and
//! against containerd (Debian's, runc, its own socket) in one run, on one CNI network,
//! with the same images from the same registry. Prints both; asserts nothing.
//!
//!     cargo build --release --bins && cargo run --release -p trellis-integration --bin bench-pods
//!
//! BENCH_ITERATIONS (default 50), BENCH_CONCURRENCY (default 10) and BENCH_ROUNDS
//! (default 5) are passed on to `trellis bench`.

use trellis_integration::netns::TestNetwork;
use trellis_integration::peer::Containerd;
use trellis_integration::registry::{Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions, binary};

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn bench(endpoint: &std::path::Path, image: &str) {
    let status = std::process::Command::new(binary("trellis"))
        .arg("bench")
        .arg("--endpoint")
        .arg(format!("unix://{}", endpoint.display()))
        .args(["--image", image])
        .args(["--iterations", &setting("BENCH_ITERATIONS", "50")])
        .args(["--concurrency", &setting("BENCH_CONCURRENCY", "10")])
        .args(["--rounds", &setting("BENCH_ROUNDS", "5")])
        .status()
        .expect("run trellis bench");
    assert!(
        status.success(),
        "trellis bench failed against {}",
        endpoint.display()
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::Builder::new()
        .prefix("trellis-bench-")
        .tempdir()
        .expect("temp dir");
    let registry = Registry::start(dir.path(), None);
    registry
        .push(
            "bench/busybox",
            "latest",
            &image(vec![busybox_layer()], &["/bin/sh"], "amd64", false),
        )
        .await;
    // containerd's sandboxes need a pause image; a shell that exits on SIGTERM does.
    let pause = image(
        vec![busybox_layer()],
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done",
        ],
        "amd64",
        false,
    );
    registry.push("bench/pause", "3.9", &pause).await;
    let images = format!("{}/bench/busybox:latest", registry.address);

    let node = Node::start(NodeOptions::default()).await;
    let network = TestNetwork::new(node.root());
    network.write(&node.cni_dir());
    let containerd = Containerd::start(
        dir.path(),
        &[&registry.address],
        &node.cni_dir(),
        &format!("{}/bench/pause:3.9", registry.address),
    )
    .await;

    println!("=== Trellis ===");
    bench(&node.socket("gateway"), &images);
    println!("\n=== containerd ===");
    bench(&containerd.socket, &images);
    drop(containerd);
    node.stop();
}
