//! Images: pulls from a real registry into the layered store, through the CRI socket.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::cri::{image_spec, image_status, list_images, pull};
use trellis_integration::nats::{NatsServer, read_events};
use trellis_integration::registry::{Compression, Entry, Registry, image, layer, small_image};
use trellis_integration::{Node, NodeOptions, unix_channel};
use trellis_proto::events::v1::{event::Payload, image_event};
use trellis_proto::storage::v1::storage_client::StorageClient;
use trellis_proto::storage::v1::{PrepareRootfsRequest, ReleaseRootfsRequest};

fn storage(node: &Node) -> StorageClient<tonic::transport::Channel> {
    StorageClient::new(unix_channel(&node.socket("storage")))
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
    let listed = list_images(&node).await;
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
            image_status(&node, name).await.map(|i| i.id),
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
        image_status(&node, &format!("{}/tests/other:v1", registry.address))
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
    assert!(list_images(&node).await.is_empty());
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
    let again = image_status(&node, &by_digest).await.expect("present");
    assert!(again.repo_tags.is_empty(), "pulled by digest: no tag");
    pull(&node, &tagged).await.expect("pull the tag too");
    assert_eq!(list_images(&node).await.len(), 1, "one image, two names");
    node.images()
        .remove_image(RemoveImageRequest {
            image: image_spec(&built.id()),
        })
        .await
        .expect("remove by id");
    assert!(list_images(&node).await.is_empty());

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
    let pulled = image_status(&node, &name).await.expect("present");
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
    let pulled = image_status(&node, name)
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
