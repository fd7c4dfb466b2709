//! Images: pulls from a real registry into the layered store, through the CRI socket.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::cri::{image_spec, pull, pull_in_background};
use trellis_integration::nats::{NatsServer, read_events};
use trellis_integration::registry::{
    BuiltImage, Compression, Entry, Registry, busybox_layer, image, layer,
};
use trellis_integration::{Node, NodeOptions, kill9, unix_channel};
use trellis_proto::events::v1::{event::Payload, image_event};
use trellis_proto::storage::v1::storage_client::StorageClient;
use trellis_proto::storage::v1::{PrepareRootfsRequest, ReleaseRootfsRequest};

async fn status(node: &Node, image: &str) -> Option<Image> {
    node.images()
        .image_status(ImageStatusRequest {
            image: image_spec(image),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
}

async fn list(node: &Node) -> Vec<Image> {
    node.images()
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images
}

fn storage(node: &Node) -> StorageClient<tonic::transport::Channel> {
    StorageClient::new(unix_channel(&node.socket("storage")))
}

fn small_image(marker: &'static str) -> BuiltImage {
    image(
        vec![
            busybox_layer(),
            layer(
                &[Entry::File(marker, marker.as_bytes().to_vec())],
                Compression::Gzip,
            ),
        ],
        &["/bin/sh"],
        "amd64",
        false,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_by_tag_and_digest_list_status_remove_and_pull_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = small_image("marker-1");
    let digest = registry.push("tests/app", "v1", &built).await;
    // A bus of the test's own, open to it: the private bus of `trellis up` lets no one
    // but the node's services in, and none of them reads the event history.
    let nats = NatsServer::start(dir.path());
    let node = Node::start(NodeOptions {
        bus_url: Some(nats.url()),
        ..Default::default()
    })
    .await;
    let tagged = format!("{}/tests/app:v1", registry.address);
    let by_digest = format!("{}/tests/app@{digest}", registry.address);

    assert_eq!(pull(&node, &tagged).await.expect("pull by tag"), built.id());
    let listed = list(&node).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, built.id());
    assert_eq!(listed[0].repo_tags, vec![tagged.clone()]);
    assert_eq!(listed[0].repo_digests, vec![by_digest.clone()]);
    assert_eq!(listed[0].uid.as_ref().map(|u| u.value), Some(0));
    assert!(
        listed[0].size > 900_000,
        "size counts the layers: {}",
        listed[0].size
    );
    for name in [&tagged, &by_digest, &built.id()] {
        assert_eq!(
            status(&node, name).await.map(|i| i.id),
            Some(built.id()),
            "ImageStatus by {name}"
        );
    }
    let verbose = node
        .images()
        .image_status(ImageStatusRequest {
            image: image_spec(&tagged),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner();
    assert!(
        verbose.info["info"].contains("diff_ids"),
        "verbose info has the config: {:?}",
        verbose.info
    );
    assert!(
        status(&node, &format!("{}/tests/other:v1", registry.address))
            .await
            .is_none(),
        "unknown image: no error, no image"
    );
    let filtered = node
        .images()
        .list_images(ListImagesRequest {
            filter: Some(ImageFilter {
                image: image_spec(&by_digest),
            }),
        })
        .await
        .expect("list")
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);

    node.images()
        .remove_image(RemoveImageRequest {
            image: image_spec(&tagged),
        })
        .await
        .expect("remove by tag");
    assert!(list(&node).await.is_empty());
    assert!(
        node.layer_dirs().is_empty(),
        "layers go with the last image using them: {:?}",
        node.layer_dirs()
    );
    node.images()
        .remove_image(RemoveImageRequest {
            image: image_spec(&tagged),
        })
        .await
        .expect("removing a missing image is not an error");

    assert_eq!(
        pull(&node, &by_digest).await.expect("pull by digest"),
        built.id()
    );
    let again = status(&node, &by_digest).await.expect("present");
    assert!(again.repo_tags.is_empty(), "pulled by digest: no tag");
    pull(&node, &tagged).await.expect("pull the tag too");
    assert_eq!(list(&node).await.len(), 1, "one image, two names");
    node.images()
        .remove_image(RemoveImageRequest {
            image: image_spec(&built.id()),
        })
        .await
        .expect("remove by id");
    assert!(list(&node).await.is_empty());

    let error = pull(&node, "Not A Reference").await.expect_err("bad name");
    assert_eq!(error.code(), Code::InvalidArgument);

    // Every pull and removal is an event on the bus, in order.
    let bus = node
        .info("image")
        .await
        .expect("info")
        .bus
        .expect("bus")
        .url;
    let filter = format!("trellis.{}.events.image.>", node.node_name);
    let events = read_events(&bus, &filter, Duration::from_secs(10), |events| {
        events.len() >= 5
    })
    .await;
    let kinds: Vec<(image_event::Kind, String)> = events
        .iter()
        .map(|stored| match &stored.event.payload {
            Some(Payload::Image(event)) => (event.kind(), event.image_id.clone()),
            other => panic!("not an image event: {other:?}"),
        })
        .collect();
    use image_event::Kind::{Pulled, Removed};
    let id = built.id();
    assert_eq!(
        kinds,
        vec![
            (Pulled, id.clone()),
            (Removed, id.clone()),
            (Pulled, id.clone()),
            (Pulled, id.clone()),
            (Removed, id)
        ]
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_whiteouts_and_opaque_directories_give_the_expected_rootfs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let bottom = layer(
        &[
            Entry::Dir("a"),
            Entry::File("a/gone", b"1".to_vec()),
            Entry::File("a/kept", b"2".to_vec()),
            Entry::Dir("b"),
            Entry::File("b/old", b"3".to_vec()),
            Entry::File("c", b"4".to_vec()),
            Entry::HardLink("c-link", "c"),
        ],
        Compression::Gzip,
    );
    let middle = layer(
        &[
            Entry::Whiteout("a/gone"),
            Entry::Dir("b"),
            Entry::Opaque("b"),
            Entry::File("b/new", b"5".to_vec()),
        ],
        Compression::None,
    );
    let top = layer(
        &[Entry::File("d", b"6".to_vec()), Entry::Whiteout("c")],
        Compression::Zstd,
    );
    let built = image(vec![bottom, middle, top], &["/d"], "amd64", true);
    registry.push("tests/layers", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    pull(&node, &format!("{}/tests/layers:1", registry.address))
        .await
        .expect("pull a docker schema 2 image");

    let rootfs = storage(&node)
        .prepare_rootfs(PrepareRootfsRequest {
            container_id: "c1".into(),
            image: built.id(),
        })
        .await
        .expect("prepare rootfs")
        .into_inner();
    let root = Path::new(&rootfs.mount_path);
    assert_eq!(
        std::fs::read_to_string(root.join("a/kept")).expect("a/kept"),
        "2"
    );
    assert!(!root.join("a/gone").exists(), "whiteout hides a/gone");
    assert!(!root.join("b/old").exists(), "opaque b hides b/old");
    assert_eq!(
        std::fs::read_to_string(root.join("b/new")).expect("b/new"),
        "5"
    );
    assert!(!root.join("c").exists(), "whiteout hides c");
    assert_eq!(
        std::fs::read_to_string(root.join("c-link")).expect("hard link survives"),
        "4"
    );
    assert_eq!(std::fs::read_to_string(root.join("d")).expect("d"), "6");
    std::fs::write(root.join("written"), b"upper").expect("the rootfs is writable");

    let refused = node
        .images()
        .remove_image(RemoveImageRequest {
            image: image_spec(&built.id()),
        })
        .await
        .expect_err("in use");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("c1"), "{}", refused.message());

    storage(&node)
        .release_rootfs(ReleaseRootfsRequest {
            container_id: "c1".into(),
        })
        .await
        .expect("release");
    storage(&node)
        .release_rootfs(ReleaseRootfsRequest {
            container_id: "c1".into(),
        })
        .await
        .expect("release is idempotent");
    assert!(!root.exists());
    node.images()
        .remove_image(RemoveImageRequest {
            image: image_spec(&built.id()),
        })
        .await
        .expect("remove once released");
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_resolves_to_amd64_and_zstd_layers_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let amd64 = image(
        vec![layer(
            &[Entry::File("arch", b"amd64".to_vec())],
            Compression::Zstd,
        )],
        &["/x"],
        "amd64",
        false,
    );
    let arm64 = image(
        vec![layer(
            &[Entry::File("arch", b"arm64".to_vec())],
            Compression::Gzip,
        )],
        &["/x"],
        "arm64",
        false,
    );
    registry.push("tests/multi", "arm64", &arm64).await;
    registry.push("tests/multi", "amd64", &amd64).await;
    let index_digest = registry
        .push_index(
            "tests/multi",
            "both",
            &[(&arm64, "arm64"), (&amd64, "amd64")],
        )
        .await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/multi:both", registry.address);
    assert_eq!(
        pull(&node, &name).await.expect("pull index"),
        amd64.id(),
        "the amd64 image"
    );
    let pulled = status(&node, &name).await.expect("present");
    assert_eq!(
        pulled.repo_digests,
        vec![format!("{}/tests/multi@{index_digest}", registry.address)],
        "the digest asked for is the index's"
    );

    let rootfs = storage(&node)
        .prepare_rootfs(PrepareRootfsRequest {
            container_id: "z".into(),
            image: name.clone(),
        })
        .await
        .expect("rootfs")
        .into_inner();
    assert_eq!(
        std::fs::read_to_string(Path::new(&rootfs.mount_path).join("arch")).expect("arch"),
        "amd64"
    );
    storage(&node)
        .release_rootfs(ReleaseRootfsRequest {
            container_id: "z".into(),
        })
        .await
        .expect("release");
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_registry_needs_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), Some(("tester", "s3cret")));
    let built = small_image("private");
    registry.push("tests/private", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let name = format!("{}/tests/private:1", registry.address);

    let error = pull(&node, &name).await.expect_err("no credentials");
    assert_eq!(error.code(), Code::Unauthenticated, "{}", error.message());
    assert!(
        error.message().to_lowercase().contains("auth"),
        "{}",
        error.message()
    );
    let wrong = AuthConfig {
        username: "tester".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    let error = node
        .images()
        .pull_image(PullImageRequest {
            image: image_spec(&name),
            auth: Some(wrong),
            ..Default::default()
        })
        .await
        .expect_err("bad password");
    assert_eq!(error.code(), Code::Unauthenticated, "{}", error.message());

    let auth = AuthConfig {
        username: "tester".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let pulled = node
        .images()
        .pull_image(PullImageRequest {
            image: image_spec(&name),
            auth: Some(auth),
            ..Default::default()
        })
        .await
        .expect("pull with credentials");
    assert_eq!(pulled.into_inner().image_ref, built.id());
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_serves_a_registry_that_does_not_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = small_image("mirrored");
    registry.push("e2e-test-images/app", "1.0", &built).await;
    let extra_config = format!(
        "[image]\nmirrors = [\"registry.invalid.test=http://{}\"]\n",
        registry.address
    );
    let node = Node::start(NodeOptions {
        extra_config,
        ..Default::default()
    })
    .await;
    let name = "registry.invalid.test/e2e-test-images/app:1.0";
    assert_eq!(
        pull(&node, name).await.expect("pull through the mirror"),
        built.id()
    );
    let pulled = status(&node, name)
        .await
        .expect("present under the name asked for");
    assert_eq!(pulled.repo_tags, vec![name.to_string()]);
    let error = pull(&node, "registry.invalid.test/e2e-test-images/absent:1")
        .await
        .expect_err("not in the mirror either");
    assert!(
        error.message().contains("mirror http://")
            && error.message().contains("registry registry.invalid.test"),
        "names every source tried: {}",
        error.message()
    );
    node.stop();
}

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

    assert!(list(&node).await.is_empty(), "no image recorded");
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
    let survivors: Vec<String> = list(&node).await.into_iter().map(|i| i.id).collect();
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
async fn image_fs_info_agrees_with_du() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = small_image("du");
    registry.push("tests/du", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    pull(&node, &format!("{}/tests/du:1", registry.address))
        .await
        .expect("pull");
    let info = node
        .images()
        .image_fs_info(ImageFsInfoRequest::default())
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let used = info.image_filesystems[0]
        .used_bytes
        .as_ref()
        .expect("bytes")
        .value as f64;
    let inodes = info.image_filesystems[0]
        .inodes_used
        .as_ref()
        .expect("inodes")
        .value as f64;
    let store = node.root().join("state/storage/layers");
    let du = std::process::Command::new("du")
        .args(["-s", "-B1"])
        .arg(&store)
        .output()
        .expect("du");
    let du_bytes: f64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du figure");
    let du_inodes = std::process::Command::new("du")
        .args(["-s", "--inodes"])
        .arg(&store)
        .output()
        .expect("du --inodes");
    let du_inodes: f64 = String::from_utf8_lossy(&du_inodes.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du inodes");
    assert!(
        (used - du_bytes).abs() <= du_bytes * 0.05,
        "ImageFsInfo {used} vs du {du_bytes}"
    );
    assert!(
        (inodes - du_inodes).abs() <= du_inodes * 0.05,
        "inodes {inodes} vs du {du_inodes}"
    );
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
