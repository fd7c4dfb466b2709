use k8s_cri::v1::{ContainerConfig, ContainerMetadata, PodSandboxConfig, PodSandboxMetadata};
use prost::Message;
use trellis_common::store::SledStore;

use super::*;

fn pod(id: &str, name: &str) -> SandboxRecord {
    SandboxRecord {
        id: id.into(),
        config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                namespace: "default".into(),
                uid: format!("uid-{name}"),
                attempt: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container(id: &str, sandbox_id: &str, name: &str) -> ContainerRecord {
    ContainerRecord {
        id: id.into(),
        sandbox_id: sandbox_id.into(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn open(dir: &tempfile::TempDir) -> RecordStore {
    let store = SledStore::open(&dir.path().join("records")).expect("store");
    RecordStore::open(&store).expect("records")
}

#[test]
fn ids_resolve_by_unique_prefix_and_ambiguity_is_an_invalid_argument() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.insert_sandbox(pod("abc111", "one")).expect("one");
    store.insert_sandbox(pod("abc222", "two")).expect("two");
    store.insert_sandbox(pod("abd333", "three")).expect("three");
    assert_eq!(
        store.sandboxes.resolve("abc2").expect("unique").id,
        "abc222"
    );
    assert_eq!(store.sandboxes.resolve("abd").expect("unique").id, "abd333");
    assert_eq!(
        store.sandboxes.resolve("abc111").expect("full").id,
        "abc111"
    );
    assert!(matches!(
        store.sandboxes.resolve("abc"),
        Err(RuntimeError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.sandboxes.resolve("abe"),
        Err(RuntimeError::NotFound(_))
    ));
    // A prefix past the last id, and one that sorts between ids.
    assert!(matches!(
        store.sandboxes.resolve("zz"),
        Err(RuntimeError::NotFound(_))
    ));
    assert!(matches!(
        store.sandboxes.resolve("abc3"),
        Err(RuntimeError::NotFound(_))
    ));
}

#[test]
fn names_are_claimed_once_and_freed_with_their_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store.insert_sandbox(pod("p1", "web")).expect("first");
    let again = store.insert_sandbox(pod("p2", "web"));
    assert!(
        matches!(&again, Err(RuntimeError::AlreadyExists(m)) if m.contains("p1")),
        "{again:?}"
    );
    store
        .insert_container(container("c1", "p1", "app"))
        .expect("app");
    assert!(matches!(
        store.insert_container(container("c2", "p1", "app")),
        Err(RuntimeError::AlreadyExists(_))
    ));
    // The same name in another pod is another container.
    store.insert_sandbox(pod("p3", "db")).expect("db");
    store
        .insert_container(container("c3", "p3", "app"))
        .expect("other pod");
    let ids = |records: Vec<Arc<ContainerRecord>>| -> Vec<String> {
        records.iter().map(|r| r.id.clone()).collect()
    };
    assert_eq!(ids(store.containers_of("p1")), ["c1"]);
    store.remove_container("c1").expect("remove");
    assert!(store.containers_of("p1").is_empty());
    store
        .insert_container(container("c4", "p1", "app"))
        .expect("name freed");
    store.remove_sandbox("p1").expect("remove pod");
    store
        .insert_sandbox(pod("p5", "web"))
        .expect("pod name freed");
}

#[test]
fn updates_see_the_latest_version_may_refuse_and_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(&dir);
        store.insert_sandbox(pod("p1", "web")).expect("pod");
        store
            .insert_container(container("c1", "p1", "app"))
            .expect("app");
        store
            .containers
            .update("c1", |r| {
                r.set_state(ContainerState::Running);
                Ok(())
            })
            .expect("start");
        let refused = store.containers.update("c1", |r| {
            if r.state() != ContainerState::Created {
                return Err(RuntimeError::FailedPrecondition("not created".into()));
            }
            r.set_state(ContainerState::Exited);
            Ok(())
        });
        assert!(matches!(refused, Err(RuntimeError::FailedPrecondition(_))));
        assert_eq!(
            store.containers.get("c1").expect("c1").state(),
            ContainerState::Running
        );
        store.remove_container("c1").expect("remove");
        assert!(matches!(
            store.containers.update("c1", |_| Ok(())),
            Err(RuntimeError::NotFound(_))
        ));
        store
            .insert_container(container("c2", "p1", "sidecar"))
            .expect("c2");
    }
    let store = open(&dir);
    assert!(
        store.containers.get("c1").is_none(),
        "removed stays removed"
    );
    assert_eq!(store.containers_of("p1").len(), 1);
    assert!(matches!(
        store.insert_sandbox(pod("p9", "web")),
        Err(RuntimeError::AlreadyExists(_))
    ));
}

/// Records written when configs were kept as bytes read back as messages.
#[test]
fn records_with_configs_as_bytes_still_load() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldSandboxRecord {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(int32, tag = "2")]
        state: i32,
        #[prost(bytes = "vec", tag = "3")]
        config: Vec<u8>,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = pod("p1", "web").config.expect("config");
    {
        let store = SledStore::open(&dir.path().join("records")).expect("store");
        let table = trellis_common::store::Store::table(&store, "sandboxes").expect("table");
        let old = OldSandboxRecord {
            id: "p1".into(),
            state: SandboxState::Ready as i32,
            config: config.encode_to_vec(),
        };
        table.put(b"p1", &old.encode_to_vec()).expect("put");
    }
    let store = open(&dir);
    let record = store.sandboxes.get("p1").expect("loaded");
    assert_eq!(record.state(), SandboxState::Ready);
    assert_eq!(record.config(), &config);
}
