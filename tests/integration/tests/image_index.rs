//! The image service answers ListImages and ImageStatus from its own index of the
//! storage service's records: it must follow changes it did not make (another writer
//! of storage) and a storage service that restarts.

use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trellis_integration::cri::{image_spec, pull};
use trellis_integration::registry::{Registry, small_image};
use trellis_integration::{Node, NodeOptions, kill9, unix_channel};
use trellis_proto::storage::v1::storage_client::StorageClient;
use trellis_proto::storage::v1::{PutImageRequest, RemoveImageRequest};

async fn listed_tags(node: &Node) -> Vec<String> {
    let mut tags: Vec<String> = node
        .images()
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images
        .into_iter()
        .flat_map(|image| image.repo_tags)
        .collect();
    tags.sort();
    tags
}

async fn status_id(node: &Node, name: &str) -> Option<String> {
    node.images()
        .image_status(ImageStatusRequest {
            image: image_spec(name),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
        .map(|image| image.id)
}

/// Polls ListImages until it lists `want`, for at most `within`.
async fn until_listed(node: &Node, want: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let tags = listed_tags(node).await;
        if tags == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "listed {tags:?}, expected {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A process stopped (SIGSTOP) until this is dropped, even when the test fails.
struct Frozen(Pid);

impl Frozen {
    fn new(pid: u32) -> Self {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_follow_other_writers_of_storage_and_its_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::start(dir.path(), None);
    let built = small_image("index-1");
    registry.push("tests/index", "a", &built).await;
    registry.push("tests/index", "b", &built).await;
    let node = Node::start(NodeOptions::default()).await;
    let a = format!("{}/tests/index:a", registry.address);
    let b = format!("{}/tests/index:b", registry.address);
    pull(&node, &a).await.expect("pull a");
    pull(&node, &b).await.expect("pull b");
    // What this service did is seen at once, with no wait for anything.
    assert_eq!(listed_tags(&node).await, vec![a.clone(), b.clone()]);
    assert_eq!(status_id(&node, &b).await, Some(built.id()));

    // Answered without storage: it is frozen while the image service answers.
    let storage_pid = node.info("storage").await.expect("storage info").pid;
    {
        let _frozen = Frozen::new(storage_pid);
        let answered = tokio::time::timeout(Duration::from_secs(2), async {
            (listed_tags(&node).await, status_id(&node, &a).await)
        })
        .await
        .expect("ListImages and ImageStatus answered while storage is stopped");
        assert_eq!(answered, (vec![a.clone(), b.clone()], Some(built.id())));
    }

    // Another writer removes tag b straight from storage.
    let mut storage = StorageClient::new(unix_channel(&node.socket("storage")));
    storage
        .remove_image(RemoveImageRequest {
            reference: b.clone(),
        })
        .await
        .expect("RemoveImage on storage");
    until_listed(&node, std::slice::from_ref(&a), Duration::from_secs(2)).await;
    assert_eq!(status_id(&node, &b).await, None, "b is gone");
    assert_eq!(status_id(&node, &a).await, Some(built.id()));

    // Storage killed and restarted: its records are read again, and changes made
    // after the restart are followed as before.
    kill9(storage_pid);
    node.wait_restarted("storage", storage_pid, Duration::from_secs(10))
        .await;
    until_listed(&node, std::slice::from_ref(&a), Duration::from_secs(5)).await;
    let record = storage
        .get_image(trellis_proto::storage::v1::GetImageRequest {
            reference: a.clone(),
        })
        .await
        .expect("GetImage")
        .into_inner();
    let mut retagged = record.clone();
    retagged.repo_tags = vec![b.clone()];
    retagged.repo_digests.clear();
    storage
        .put_image(PutImageRequest {
            image: Some(retagged),
            ..Default::default()
        })
        .await
        .expect("PutImage on storage");
    until_listed(&node, &[a.clone(), b.clone()], Duration::from_secs(5)).await;
    assert_eq!(status_id(&node, &b).await, Some(built.id()));
    node.stop();
}
