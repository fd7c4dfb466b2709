//! Image benchmark: Trellis against containerd, same registry, same images, same CRI
//! client, in one run. Prints figures; asserts nothing.
//!
//!     cargo build --release --bins && cargo run --release -p trellis-integration --bin bench-images
//!
//! BENCH_RUNS (default 3) sets how many cold and warm pulls each side makes;
//! BENCH_IMAGES (default 500) how many images ListImages lists.

use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ListImagesRequest, PullImageRequest};
use tonic::transport::Channel;
use trellis_integration::peer::{Containerd, summary};
use trellis_integration::registry::{BuiltLayer, Compression, Entry, Registry, image, layer};
use trellis_integration::{Node, NodeOptions};

const LAYERS: usize = 5;
const LAYER_BYTES: usize = 20 * 1024 * 1024;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Incompressible bytes, so the blobs are as big as the content (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn big_layers(seed: u64) -> Vec<BuiltLayer> {
    (0..LAYERS)
        .map(|i| {
            layer(
                &[Entry::File(
                    ["l0", "l1", "l2", "l3", "l4"][i],
                    noise(seed * 10 + i as u64, LAYER_BYTES),
                )],
                Compression::Gzip,
            )
        })
        .collect()
}

async fn timed_pull(client: &mut ImageServiceClient<Channel>, name: &str) -> Duration {
    let started = Instant::now();
    client
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: name.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("pull {name}: {e}"));
    started.elapsed()
}

fn row(what: &str, trellis: &mut [Duration], containerd: &mut [Duration]) {
    let (t50, t95, _) = summary(trellis);
    let (c50, c95, _) = summary(containerd);
    println!(
        "{what:<34} {t50:>10.1} {t95:>10.1} {c50:>12.1} {c95:>12.1} {:>8.2}",
        t50 / c50
    );
}

#[tokio::main]
async fn main() {
    let runs = env_number("BENCH_RUNS", 3);
    let image_count = env_number("BENCH_IMAGES", 500);
    let dir = tempfile::Builder::new()
        .prefix("trellis-bench-")
        .tempdir()
        .expect("temp dir");
    let registry = Registry::start(dir.path(), None);
    let node = Node::start(NodeOptions::default()).await;
    let cni = dir.path().join("cni");
    std::fs::create_dir_all(&cni).expect("cni dir");
    let containerd = Containerd::start(
        dir.path(),
        &[&registry.address],
        &cni,
        "registry.k8s.io/pause:3.9",
    )
    .await;
    let (mut trellis, mut peer) = (node.images(), containerd.images());

    eprintln!(
        "building and pushing {runs} images of {LAYERS} x {} MiB ...",
        LAYER_BYTES >> 20
    );
    let mut cold = (Vec::new(), Vec::new());
    let mut warm = (Vec::new(), Vec::new());
    let mut blob_bytes = 0;
    for run in 0..runs {
        let layers = big_layers(run as u64 + 1);
        blob_bytes = layers.iter().map(|l| l.blob.len()).sum::<usize>();
        let built = image(layers, &["/l0"], "amd64", false);
        registry.push("bench/big", &run.to_string(), &built).await;
        let name = format!("{}/bench/big:{run}", registry.address);
        // Alternate who goes first, so neither always gets the warmer page cache.
        if run % 2 == 0 {
            cold.0.push(timed_pull(&mut trellis, &name).await);
            cold.1.push(timed_pull(&mut peer, &name).await);
        } else {
            cold.1.push(timed_pull(&mut peer, &name).await);
            cold.0.push(timed_pull(&mut trellis, &name).await);
        }
        // Same layers, new config: only the manifest and config are new.
        let variant = image(layers_of(&built), &[&format!("/run{run}")], "amd64", false);
        registry
            .push("bench/warm", &run.to_string(), &variant)
            .await;
        let name = format!("{}/bench/warm:{run}", registry.address);
        warm.0.push(timed_pull(&mut trellis, &name).await);
        warm.1.push(timed_pull(&mut peer, &name).await);
    }

    eprintln!("pushing and pulling {image_count} small images ...");
    let tiny = layer(&[Entry::File("tiny", b"tiny".to_vec())], Compression::Gzip);
    for i in 0..image_count {
        let built = image(
            vec![BuiltLayer {
                blob: tiny.blob.clone(),
                diff_id: tiny.diff_id.clone(),
                media_type: tiny.media_type,
            }],
            &[&format!("/{i}")],
            "amd64",
            false,
        );
        registry.push("bench/many", &i.to_string(), &built).await;
        let name = format!("{}/bench/many:{i}", registry.address);
        timed_pull(&mut trellis, &name).await;
        timed_pull(&mut peer, &name).await;
    }
    let mut listing = (Vec::new(), Vec::new());
    for _ in 0..30 {
        for (client, samples) in [(&mut trellis, &mut listing.0), (&mut peer, &mut listing.1)] {
            let started = Instant::now();
            let images = client
                .list_images(ListImagesRequest::default())
                .await
                .expect("ListImages")
                .into_inner()
                .images;
            samples.push(started.elapsed());
            assert!(
                images.len() >= image_count,
                "{} images listed",
                images.len()
            );
        }
    }

    let version = containerd
        .runtime()
        .version(k8s_cri::v1::VersionRequest::default())
        .await
        .map(|v| v.into_inner().runtime_version)
        .unwrap_or_default();
    println!();
    println!(
        "Trellis vs containerd {version}: same registry on 127.0.0.1, same images, same CRI client; times in ms"
    );
    println!(
        "image: {LAYERS} layers, {:.1} MB of gzip blobs; {runs} runs each",
        blob_bytes as f64 / 1e6
    );
    println!(
        "{:<34} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "", "trellis p50", "p95", "containerd p50", "p95", "ratio"
    );
    row("pull, cold", &mut cold.0, &mut cold.1);
    row("pull, layers already present", &mut warm.0, &mut warm.1);
    row(
        &format!("ListImages, {image_count} images"),
        &mut listing.0,
        &mut listing.1,
    );
    drop(containerd);
    node.stop();
}

/// The layers of a built image, for a variant that shares them under a new config.
fn layers_of(built: &trellis_integration::registry::BuiltImage) -> Vec<BuiltLayer> {
    built
        .layers
        .iter()
        .map(|l| BuiltLayer {
            blob: l.blob.clone(),
            diff_id: l.diff_id.clone(),
            media_type: l.media_type,
        })
        .collect()
}
