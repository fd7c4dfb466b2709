//! Images under faults: hostile or corrupt layers, concurrent pulls of the same
//! blobs, storage killed mid-pull, and a pull that makes no progress.

use std::path::Path;
use std::time::Duration;

use tonic::Code;
use trellis_integration::cri::{list_images, pull, pull_in_background};
use trellis_integration::registry::{
    Compression, Entry, Registry, busybox_layer, image, layer, small_image,
};
use trellis_integration::{Node, NodeOptions, kill9};

#[tokio::test(flavor = "multi_thread")]
async fn hostile_or_corrupt_layers_fail_by_name_and_leave_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let node = Node::start(NodeOptions::default()).await;
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "dotdot",
            vec![Entry::File("../escape", b"x".to_vec())],
            "path contains `..`",
        ),
        (
            "absolute",
            vec![Entry::File("/escape-abs", b"x".to_vec())],
            "absolute path",
        ),
        (
            "symlink",
            vec![
                Entry::Symlink("etc", "/etc"),
                Entry::File("etc/trellis-escape", b"x".to_vec()),
            ],
            "writes through the symlink `etc`",
        ),
        (
            "hardlink",
            vec![Entry::HardLink("passwd", "/etc/passwd")],
            "hard link to the absolute path `/etc/passwd`",
        ),
    ];
    for (tag, entries, expected) in cases {
        let built = image(
            vec![layer(&entries, Compression::Gzip)],
            &["/x"],
            "amd64",
            false,
        );
        registry.push("tests/hostile", tag, &built).await;
        let error = pull(&node, &format!("{}/tests/hostile:{tag}", registry.address))
            .await
            .expect_err("must fail");
        assert!(
            error.message().contains(expected),
            "{tag}: {}",
            error.message()
        );
    }
    // A blob whose bytes do not match its digest.
    let built = small_image("corrupt");
    registry.push("tests/hostile", "corrupt", &built).await;
    let top = built.layers.last().expect("layer");
    let mut bytes = std::fs::read(registry.blob_file(&top.digest())).expect("blob file");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(registry.blob_file(&top.digest()), bytes).expect("corrupt blob");
    let error = pull(
        &node,
        &format!("{}/tests/hostile:corrupt", registry.address),
    )
    .await
    .expect_err("corrupt blob");
    assert!(
        error.message().contains(&top.digest()) && error.message().contains("digest"),
        "{}",
        error.message()
    );

    assert!(list_images(&node).await.is_empty(), "no image recorded");
    // A failed layer cancels its siblings; storage removes their partial unpack as
    // soon as it sees the stream end, which may be just after the pull answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node
        .layer_dirs()
        .iter()
        .any(|name| name.starts_with("tmp-"))
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let layers = node.layer_dirs();
    assert!(
        layers.iter().all(|name| !name.starts_with("tmp-")),
        "no half layer: {layers:?}"
    );
    assert!(
        layers.len() <= 1,
        "at most the good busybox layer of the corrupt image: {layers:?}"
    );
    assert!(!Path::new("/escape-abs").exists() && !Path::new("/etc/trellis-escape").exists());
    assert!(!node.root().join("state/storage/escape").exists());
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_download_each_blob_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(
        vec![
            busybox_layer(),
            layer(&[Entry::File("one", vec![1; 300_000])], Compression::Gzip),
            layer(&[Entry::File("two", vec![2; 300_000])], Compression::Zstd),
        ],
        &["/bin/sh"],
        "amd64",
        false,
    );
    registry.push("tests/shared", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/shared:1", registry.address);
    let (a, b, c) = tokio::join!(pull(&node, &name), pull(&node, &name), pull(&node, &name));
    for result in [a, b, c] {
        assert_eq!(result.expect("pull"), built.id());
    }
    for blob in built
        .layers
        .iter()
        .map(|l| l.digest())
        .chain(std::iter::once(trellis_integration::registry::sha256(
            &built.config,
        )))
    {
        assert_eq!(
            registry.blob_downloads(&blob),
            1,
            "blob {blob} downloaded once"
        );
    }
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn storage_killed_mid_pull_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    // Big and uncompressed, so the unpack takes long enough to be interrupted.
    let big: Vec<u8> = (0..150_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let built = image(
        vec![layer(&[Entry::File("big", big)], Compression::None)],
        &["/x"],
        "amd64",
        false,
    );
    registry.push("tests/big", "1", &built).await;
    let small = small_image("survivor");
    registry.push("tests/small", "1", &small).await;
    let node = Node::start(NodeOptions::default()).await;
    pull(&node, &format!("{}/tests/small:1", registry.address))
        .await
        .expect("pull small");
    let name = format!("{}/tests/big:1", registry.address);
    let storage_pid = node.info("storage").await.expect("info").pid;

    let layers_dir = node.root().join("state/storage/layers");
    let pulling = pull_in_background(&node, &name);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let unpacking = std::fs::read_dir(&layers_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
            })
            .unwrap_or(false);
        if unpacking {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && !pulling.is_finished(),
            "never caught the unpack in progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    kill9(storage_pid);
    assert!(
        pulling.await.expect("join").is_err(),
        "the interrupted pull fails"
    );
    node.wait_restarted("storage", storage_pid, Duration::from_secs(10))
        .await;
    let survivors: Vec<String> = list_images(&node).await.into_iter().map(|i| i.id).collect();
    assert_eq!(
        survivors,
        vec![small.id()],
        "records survive the kill; the interrupted image is not recorded"
    );
    assert_eq!(
        node.layer_dirs().len(),
        2,
        "only the small image's layers remain: {:?}",
        node.layer_dirs()
    );

    assert_eq!(pull(&node, &name).await.expect("pull again"), built.id());
    assert_eq!(node.layer_dirs().len(), 3);
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_that_makes_no_progress_is_cancelled() {
    // A "registry" that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = silent.local_addr().expect("address");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(16).flatten() {
            held.push(stream);
        }
    });
    let node = Node::start(NodeOptions {
        extra_config: "[image]\npull_progress_timeout_seconds = 1\n".into(),
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let error = pull(&node, &format!("{address}/tests/stuck:1"))
        .await
        .expect_err("stalled");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancelled after about a second: {:?}",
        started.elapsed()
    );
    assert_eq!(error.code(), Code::DeadlineExceeded, "{}", error.message());
    assert!(
        error
            .message()
            .contains("nothing received for 1 s while fetching the manifest"),
        "{}",
        error.message()
    );
    node.stop();
}
