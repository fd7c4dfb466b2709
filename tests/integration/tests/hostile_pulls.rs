//! Pulls that hostile registries, token endpoints and requests must not break: bad
//! credentials refused up front, a registry client panic contained to its pull,
//! abandoned pulls stopped and cleaned up, loose references never sent anywhere.

use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use tonic::Code;
use trellis_integration::cri::{image_spec, pull, pull_in_background};
use trellis_integration::hostile::{TokenServer, TrickleProxy, slow_image};
use trellis_integration::registry::{BuiltImage, Registry, busybox_layer, image};
use trellis_integration::{Node, NodeOptions, eventually, kill9, unix_channel};

/// Waits until the pull is mid-way: the small layer stored (one more than the
/// `stored_before` layers), the big one unpacking.
async fn wait_mid_pull(node: &Node, proxy: &TrickleProxy, stored_before: usize) {
    let midway = eventually(Duration::from_secs(30), || {
        let dirs = node.layer_dirs();
        dirs.iter().any(|d| d.starts_with("tmp-"))
            && dirs.iter().filter(|d| !d.starts_with("tmp-")).count() > stored_before
    })
    .await;
    assert!(
        midway,
        "never caught the pull mid-way: layers {:?}, {} bytes through the proxy\n{}",
        node.layer_dirs(),
        proxy.forwarded(),
        node.log_tail()
    );
}

/// An abandoned pull stops: no connection to the registry, no half or orphan layer.
async fn assert_stopped_and_cleaned(node: &Node, proxy: &TrickleProxy, how: &str) {
    assert!(
        eventually(Duration::from_secs(5), || proxy.open_connections() == 0).await,
        "{how}: the download goes on ({} connections open)",
        proxy.open_connections()
    );
    let passed = proxy.forwarded();
    assert!(
        eventually(Duration::from_secs(5), || node.layer_dirs().is_empty()).await,
        "{how}: layers left behind: {:?}\n{}",
        node.layer_dirs(),
        node.log_tail()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy.forwarded(),
        passed,
        "{how}: nothing more is downloaded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_registry_token_in_the_request_is_refused_and_the_image_still_pulls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/app", "1", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let image_pid = node.info("image").await.expect("info").pid;
    let name = format!("{}/tests/app:1", registry.address);

    for (field, auth) in [
        (
            "registry_token",
            AuthConfig {
                registry_token: "secret-one\nInjected: header".into(),
                ..Default::default()
            },
        ),
        (
            "identity_token",
            AuthConfig {
                identity_token: "secret-two\r".into(),
                ..Default::default()
            },
        ),
        (
            "password",
            AuthConfig {
                username: "u".into(),
                password: "secret-three\u{0}".into(),
                ..Default::default()
            },
        ),
    ] {
        let error = node
            .images()
            .pull_image(PullImageRequest {
                image: image_spec(&name),
                auth: Some(auth),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(
            error.code(),
            Code::InvalidArgument,
            "{field}: {}",
            error.message()
        );
        assert!(
            error.message().contains(&format!("AuthConfig.{field}")),
            "names the field: {}",
            error.message()
        );
        assert!(
            !error.message().contains("secret"),
            "never echoes the secret: {}",
            error.message()
        );
    }
    assert_eq!(
        pull(&node, &name).await.expect("a normal pull right after"),
        built.id()
    );
    assert_eq!(
        node.info("image").await.expect("info").pid,
        image_pid,
        "the image service never went down"
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_handing_out_a_control_character_fails_the_pull_not_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = TokenServer::start("hostile\ntoken");
    let registry = Registry::start_token_auth(dir.path(), &token.url);
    let node = Node::start(NodeOptions::default()).await;
    let image_pid = node.info("image").await.expect("info").pid;
    let name = format!("{}/tests/app:1", registry.address);

    let error = pull(&node, &name).await.expect_err("no usable token");
    assert_eq!(error.code(), Code::Internal, "{}", error.message());
    assert!(
        error.message().contains("registry client failed"),
        "{}",
        error.message()
    );
    assert_eq!(
        token.requests(),
        1,
        "the registry sent the client to the hostile realm"
    );
    // Not stuck on the failed pull: the next one asks the realm again, and fails the same way.
    let again = pull(&node, &name).await.expect_err("still no usable token");
    assert!(
        again.message().contains("registry client failed"),
        "{}",
        again.message()
    );
    assert_eq!(token.requests(), 2, "the next pull is tried afresh");
    assert_eq!(
        node.info("image")
            .await
            .expect("the image service still answers")
            .pid,
        image_pid,
        "same process"
    );
    assert!(
        node.images()
            .list_images(ListImagesRequest::default())
            .await
            .expect("ListImages")
            .into_inner()
            .images
            .is_empty()
    );
    node.stop();
}

/// A node, and `slow_image` in its registry behind a trickling proxy.
struct SlowSource {
    node: Node,
    registry: Registry,
    proxy: TrickleProxy,
    built: BuiltImage,
    /// The slow image's name, through the proxy.
    name: String,
    _dir: tempfile::TempDir,
}

impl SlowSource {
    async fn start() -> SlowSource {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::start(dir.path(), None);
        let built = slow_image();
        registry.push("tests/slow", "1", &built).await;
        let proxy = TrickleProxy::start(&registry.address, 4096, Duration::from_millis(20)).await;
        let node = Node::start(NodeOptions::default()).await;
        let name = format!("{}/tests/slow:1", proxy.address);
        SlowSource {
            node,
            registry,
            proxy,
            built,
            name,
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_pull_stops_and_leaves_no_layer() {
    // Every part is bound: the registry and the directory must live to the end.
    let SlowSource {
        node,
        registry: _registry,
        proxy,
        built,
        name,
        _dir,
    } = SlowSource::start().await;

    // The client hangs up.
    let call = pull_in_background(&node, &name);
    wait_mid_pull(&node, &proxy, 0).await;
    call.abort();
    assert_stopped_and_cleaned(&node, &proxy, "client gone").await;

    // The client's deadline passes.
    let mut request = tonic::Request::new(PullImageRequest {
        image: image_spec(&name),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(3));
    let error = node
        .images()
        .pull_image(request)
        .await
        .expect_err("deadline");
    assert!(
        matches!(error.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{:?}: {}",
        error.code(),
        error.message()
    );
    assert_stopped_and_cleaned(&node, &proxy, "deadline passed").await;

    proxy.full_speed();
    assert_eq!(
        pull(&node, &name).await.expect("a full pull afterwards"),
        built.id()
    );
    assert_eq!(
        node.layer_dirs().len(),
        2,
        "both layers, nothing else: {:?}",
        node.layer_dirs()
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_a_killed_image_service_left_are_pruned_when_it_starts_again() {
    let SlowSource {
        node,
        registry,
        proxy,
        built: _,
        name,
        _dir,
    } = SlowSource::start().await;
    let kept = image(vec![busybox_layer()], &["/bin/sh"], "amd64", false);
    registry.push("tests/kept", "1", &kept).await;
    pull(&node, &format!("{}/tests/kept:1", registry.address))
        .await
        .expect("an image to keep");
    let image_pid = node.info("image").await.expect("info").pid;

    // On the image service's own socket: the gateway would repeat the pull on the
    // next process, and this is about what the killed one left.
    let mut images = ImageServiceClient::new(unix_channel(&node.socket("image")));
    let request = PullImageRequest {
        image: image_spec(&name),
        ..Default::default()
    };
    let call = tokio::spawn(async move { images.pull_image(request).await });
    wait_mid_pull(&node, &proxy, 1).await;
    kill9(image_pid);
    assert!(
        call.await.expect("join").is_err(),
        "the interrupted pull fails"
    );
    node.wait_restarted("image", image_pid, Duration::from_secs(15))
        .await;
    assert!(
        eventually(Duration::from_secs(5), || node.layer_dirs().len() == 1).await,
        "only the kept image's layer remains: {:?}\n{}",
        node.layer_dirs(),
        node.log_tail()
    );
    let images = node
        .images()
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    assert_eq!(
        images.into_iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![kept.id()]
    );
    node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn loose_references_are_refused_before_any_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let node = Node::start(NodeOptions::default()).await;
    let huge = format!("{}/{}x", registry.address, "a/".repeat(10_000));
    let cases = [
        (
            format!("{}/tests/../app:1", registry.address),
            "path component `..`",
        ),
        (
            format!("{}/../../v2/_catalog", registry.address),
            "path component `..`",
        ),
        (
            "127.0.0.1:70000/tests/app:1".to_string(),
            "registry port `70000`",
        ),
        (format!("{}/tests/app:..", registry.address), "tag `..`"),
        (huge, "bytes in all"),
    ];
    for (reference, expected) in &cases {
        let error = pull(&node, reference).await.expect_err("refused");
        assert_eq!(error.code(), Code::InvalidArgument, "{}", error.message());
        assert!(
            error.message().contains(expected),
            "{expected}: {}",
            error.message()
        );
        assert!(
            error.message().len() < 400,
            "quotes an excerpt, not the whole input: {} bytes",
            error.message().len()
        );
    }
    assert!(
        registry.requests().is_empty(),
        "nothing reached the registry: {:?}",
        registry.requests()
    );
    node.stop();
}
