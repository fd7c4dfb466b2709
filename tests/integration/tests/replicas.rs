//! Several processes of one service on one node (`image.replicas`, `gateway.replicas`):
//! the gateway spreads pulls over the image replicas and a pull whose replica dies is
//! finished by another; gateways share the kubelet's one socket.

use std::collections::BTreeSet;
use std::time::Duration;

use trellis_integration::cri::pull_in_background;
use trellis_integration::hostile::{TrickleProxy, slow_image};
use trellis_integration::registry::Registry;
use trellis_integration::{Node, NodeOptions, eventually, kill9};
use trellis_proto::service::v1::InfoRequest;
use trellis_proto::service::v1::service_info_client::ServiceInfoClient;

const REPLICAS: &str = "[image]\nreplicas = 2\n[gateway]\nreplicas = 2\n";

/// The pid that answers ServiceInfo on a new connection to `socket`.
async fn pid_on_a_new_connection(socket: &std::path::Path) -> u32 {
    let mut client = ServiceInfoClient::new(trellis_common::transport::unix_channel(socket));
    client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner()
        .pid
}

fn lines_of(log: &str, service: &str, message: &str) -> usize {
    let tag = format!(" service={service} ");
    log.lines()
        .filter(|line| line.contains(&tag) && line.contains(message))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_image_replicas_finish_every_pull_when_one_is_killed_and_two_gateways_share_the_socket()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = slow_image();
    let repositories = ["tests/one", "tests/two", "tests/three", "tests/four"];
    for repository in repositories {
        registry.push(repository, "1", &built).await;
    }
    let proxy = TrickleProxy::start(&registry.address, 64 * 1024, Duration::from_millis(10)).await;
    let node = Node::start(NodeOptions {
        extra_config: REPLICAS.into(),
        ..Default::default()
    })
    .await;

    // Both gateways accept on the CRI socket.
    let cri_socket = node.socket("gateway");
    let mut gateways = BTreeSet::new();
    for _ in 0..200 {
        gateways.insert(pid_on_a_new_connection(&cri_socket).await);
        if gateways.len() == 2 {
            break;
        }
    }
    assert_eq!(
        gateways.len(),
        2,
        "connections reach both gateways: {gateways:?}"
    );

    // Twenty pulls at once, five of each image; replica 1 is killed under them.
    let image_1 = node.info("image").await.expect("image info").pid;
    let pulls: Vec<_> = (0..20)
        .map(|i| {
            let name = format!(
                "{}/{}:1",
                proxy.address,
                repositories[i % repositories.len()]
            );
            pull_in_background(&node, &name)
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || proxy.forwarded() > 2_000_000).await,
        "the pulls never got going: {} bytes\n{}",
        proxy.forwarded(),
        node.log_tail()
    );
    kill9(image_1);
    let mut failed = Vec::new();
    for pull in pulls {
        let outcome = tokio::time::timeout(Duration::from_secs(120), pull)
            .await
            .expect("the pull ends")
            .expect("pull task");
        if let Err(status) = outcome {
            failed.push(format!("{:?}: {}", status.code(), status.message()));
        }
    }
    let log = node.log();
    eprintln!(
        "20 pulls over 2 image replicas, replica 1 (pid {image_1}) killed: {} failed; pulled by image: {}, by image-2: {}",
        failed.len(),
        lines_of(&log, "image", "pulled"),
        lines_of(&log, "image-2", "pulled"),
    );
    assert!(
        failed.is_empty(),
        "failed pulls: {failed:#?}\n{}",
        node.log_tail()
    );
    assert!(
        lines_of(&log, "image-2", "pulled") > 0,
        "replica 2 took pulls\n{}",
        node.log_tail()
    );
    let restarted = node.info("image").await.expect("image info").pid;
    assert_ne!(restarted, image_1, "replica 1 was restarted");
    // Back to two replicas, calls go round them again.
    let before = lines_of(&node.log(), "image", "pulled");
    for repository in repositories.iter().chain(repositories.iter()) {
        let name = format!("{}/{repository}:1", proxy.address);
        trellis_integration::cri::pull(&node, &name)
            .await
            .expect("pull a present image");
    }
    assert!(
        eventually(Duration::from_secs(5), || lines_of(
            &node.log(),
            "image",
            "pulled"
        ) > before)
        .await,
        "the restarted replica 1 takes pulls again\n{}",
        node.log_tail()
    );
    node.stop();
}
