//! Tests of the storage calls apart from gRPC: images over imported layers only, layers
//! going with the last image that uses them, a prune waiting for an import of its chain.
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;
use trellis_common::store::SledStore;

use super::*;
use crate::layers::Limits;

pub(crate) struct Scene {
    pub(crate) storage: Arc<Storage>,
    _dir: tempfile::TempDir,
}

/// Stores in a temporary directory (also for the metrics' tests).
pub(crate) fn scene() -> Scene {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(&dir.path().join("db")).expect("store");
    let limits = Limits {
        max_bytes: 0,
        max_ratio: 0,
    };
    let layers = LayerStore::open(dir.path().join("layers"), &store, limits).expect("layers");
    let images = ImageStore::open(&store).expect("images");
    let rootfs = RootfsStore::open(dir.path().join("containers"), &store).expect("rootfs");
    Scene {
        storage: Arc::new(Storage::new(layers, images, rootfs)),
        _dir: dir,
    }
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A gzip base layer holding one file, and its header.
fn layer(content: &[u8]) -> (Bytes, LayerHeader) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "file", content)
        .expect("tar");
    let tar = builder.into_inner().expect("tar");
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&tar).expect("gzip");
    let blob = gzip.finish().expect("gzip");
    let diff_id = digest(&tar);
    let header = LayerHeader {
        digest: digest(&blob),
        size: blob.len() as i64,
        chain_id: diff_id.clone(),
        diff_id,
        image: "tests/storage".into(),
        ..Default::default()
    };
    (Bytes::from(blob), header)
}

fn image(id: char, chains: &[&str], tag: &str) -> Image {
    Image {
        id: format!("sha256:{}", id.to_string().repeat(64)),
        repo_tags: vec![tag.to_string()],
        chain_ids: chains.iter().map(|c| c.to_string()).collect(),
        config_json: "{\"config\":{}}".into(),
        ..Default::default()
    }
}

fn whole(blob: &Bytes) -> impl Stream<Item = io::Result<Bytes>> + Unpin {
    tokio_stream::iter(vec![Ok(blob.clone())])
}

#[tokio::test]
async fn images_need_their_layers_and_take_unused_ones_with_them() {
    let scene = scene();
    let storage = &scene.storage;
    let (blob, header) = layer(b"hello");
    let chain = header.chain_id.clone();

    let refused = storage
        .put_image(image('a', &[&chain], "docker.io/tests/a:1"), "")
        .expect_err("layer not imported");
    assert!(
        matches!(refused, StorageError::FailedPrecondition(_)),
        "{refused}"
    );
    assert_eq!(
        tonic::Status::from(refused).code(),
        tonic::Code::FailedPrecondition
    );

    let imported = storage
        .import_layer(header.clone(), whole(&blob))
        .await
        .expect("import");
    assert!(!imported.already_present);
    assert_eq!(imported.record.chain_id, chain);
    let again = storage
        .import_layer(header, tokio_stream::empty())
        .await
        .expect("present");
    assert!(again.already_present, "a second import reads nothing");
    assert!(storage.has_layer(&chain, "").expect("has"));

    let (a, first) = storage
        .put_image(image('a', &[&chain], "docker.io/tests/a:1"), "")
        .expect("put a");
    let (_, second) = storage
        .put_image(image('b', &[&chain], "docker.io/tests/b:1"), "")
        .expect("put b");
    assert!(second > first, "each change is a new generation");
    assert_eq!(storage.get_image("tests/a:1").expect("get").id, a.id);
    let missing = storage.get_image("tests/none:1").expect_err("absent");
    assert!(matches!(missing, StorageError::NotFound(_)), "{missing}");
    let (listed, generation) = storage.list_images().expect("list");
    assert_eq!(generation, second, "a listing says which generation it is");
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|image| image.config_json.is_empty()),
        "a listing carries no config"
    );

    assert!(
        storage
            .prune_layers(Vec::new(), "", "")
            .await
            .expect("prune")
            .is_empty(),
        "a layer in use stays"
    );
    let removal = storage.remove_image("tests/a:1").await.expect("remove a");
    assert!(removal.deleted.is_some());
    assert!(
        storage.has_layer(&chain, "").expect("has"),
        "b still uses it"
    );
    storage.remove_image("tests/b:1").await.expect("remove b");
    assert!(
        !storage.has_layer(&chain, "").expect("has"),
        "the last image took its layer"
    );
}

#[tokio::test]
async fn a_prune_waits_for_an_import_of_its_chain() {
    let scene = scene();
    let (blob, header) = layer(b"slow");
    let chain = header.chain_id.clone();
    let (sender, receiver) = mpsc::channel(4);
    let importing = {
        let storage = scene.storage.clone();
        tokio::spawn(async move {
            storage
                .import_layer(header, ReceiverStream::new(receiver))
                .await
        })
    };
    let (first, rest) = blob.split_at(blob.len() / 2);
    sender
        .send(Ok(Bytes::copy_from_slice(first)))
        .await
        .expect("send");
    // The import holds its chain from its start.
    tokio::time::timeout(Duration::from_secs(10), async {
        while scene.storage.importing.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the import takes its chain");
    let pruning = {
        let storage = scene.storage.clone();
        let chain = chain.clone();
        tokio::spawn(async move { storage.prune_layers(vec![chain], "", "").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pruning.is_finished(), "the prune waits for the import");
    sender
        .send(Ok(Bytes::copy_from_slice(rest)))
        .await
        .expect("send");
    drop(sender);
    let imported = importing.await.expect("task").expect("import");
    assert!(!imported.already_present);
    let removed = tokio::time::timeout(Duration::from_secs(10), pruning)
        .await
        .expect("the prune ends once the import has")
        .expect("task")
        .expect("prune");
    // Had the prune not waited, it would have found no layer to remove.
    assert_eq!(
        removed,
        vec![chain.clone()],
        "no image uses it: pruned after"
    );
    assert!(!scene.storage.has_layer(&chain, "").expect("has"));
}

/// Two image replicas: one imports a layer for its pull, the other prunes (its own
/// failed pull's leftovers, or everything unused at its start). The layer stays until
/// the first records its image; then the image keeps it.
#[tokio::test]
async fn a_prune_keeps_a_layer_another_pull_holds_until_its_image_is_recorded() {
    let scene = scene();
    let storage = &scene.storage;
    let (blob, mut header) = layer(b"held");
    let chain = header.chain_id.clone();
    header.holder = "replica-2/pull-1".into();
    storage
        .import_layer(header, whole(&blob))
        .await
        .expect("import");
    for (named, holder) in [(Vec::new(), ""), (vec![chain.clone()], "replica-1/pull-9")] {
        let removed = storage
            .prune_layers(named, holder, "")
            .await
            .expect("prune");
        assert!(removed.is_empty(), "a held layer stays: {removed:?}");
    }
    assert!(storage.has_layer(&chain, "").expect("has"));
    storage
        .put_image(
            image('c', &[&chain], "docker.io/tests/h:1"),
            "replica-2/pull-1",
        )
        .expect("put");
    storage.remove_image("tests/h:1").await.expect("remove");
    assert!(
        !storage.has_layer(&chain, "").expect("has"),
        "once recorded, the hold is over: the image took its layer with it"
    );
}
