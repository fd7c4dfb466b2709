//! The lifecycle against fakes of everything it works through (OCI runtime, storage,
//! image and network services, host namespaces, the bus): every path, the failures
//! and rollbacks included, without root.

use std::sync::{Arc, Mutex};

use k8s_cri::v1::*;
use trellis_common::store::SledStore;
use trellis_proto::events::v1::event::Payload;

use super::{Events, Parts, Runtime};
use crate::backends::fake::Fakes;
use crate::error::RuntimeError;
use crate::namespaces::NoNamespaces;
use crate::oci::fake::{FakeOci, FakeState};
use crate::store::{ContainerState, RecordStore, SandboxState};

pub(super) const IMAGE: &str = "registry.test/app:1";

#[derive(Default)]
pub(super) struct RecordedEvents(Mutex<Vec<String>>);

impl Events for RecordedEvents {
    fn publish(&self, payload: Payload) {
        let line = match payload {
            Payload::Sandbox(event) => format!("pod {:?}", event.kind()),
            Payload::Container(event) => {
                format!("container {:?} {}", event.kind(), &event.container_id[..8])
            }
            other => format!("{other:?}"),
        };
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(line);
    }
}

impl RecordedEvents {
    pub(super) fn taken(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }
}

pub(super) struct Node {
    dir: tempfile::TempDir,
    runtime: Option<Arc<Runtime>>,
    pub(super) oci: Arc<FakeOci>,
    pub(super) fakes: Fakes,
    pub(super) events: Arc<RecordedEvents>,
}

impl Node {
    pub(super) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let fakes = Fakes::new(dir.path().join("rootfs"));
        fakes
            .storage
            .add_image(IMAGE, trellis_proto::storage::v1::ImageConfig::default());
        let mut node = Self {
            runtime: None,
            oci: Arc::new(FakeOci::default()),
            fakes,
            events: Arc::default(),
            dir,
        };
        node.start();
        node
    }

    /// Opens the records and makes a runtime over them, as the service does at start.
    pub(super) fn start(&mut self) {
        let store = SledStore::open(&self.dir.path().join("records")).expect("store");
        let mut config = trellis_common::config::Config::default().runtime;
        // Any installed program will do: the fake OCI runtime never runs it.
        config.oci_runtime = trellis_common::config::RuntimeHandler::new("sh").expect("handler");
        config.pause_image = "registry.test/pause:3".into();
        let parts = Parts {
            store: RecordStore::open(&store).expect("records"),
            oci: self.oci.clone(),
            backends: self.fakes.backends(),
            namespaces: Arc::new(NoNamespaces),
            events: self.events.clone(),
            metrics: Default::default(),
        };
        let runtime = Runtime::new(config, self.dir.path().join("runtime"), parts);
        self.runtime = Some(Arc::new(runtime.expect("runtime")));
    }

    /// The service stops (or is killed) and starts again over the same records.
    pub(super) async fn restart(&mut self) {
        self.runtime = None;
        self.start();
        self.runtime().recover().await.expect("recover");
    }

    pub(super) fn runtime(&self) -> &Runtime {
        self.runtime.as_deref().expect("started")
    }

    pub(super) fn shared(&self) -> Arc<Runtime> {
        self.runtime.clone().expect("started")
    }

    pub(super) async fn run_pod(&self, name: &str) -> Result<String, RuntimeError> {
        self.runtime()
            .run_pod_sandbox(pod_config(name), String::new())
            .await
    }

    pub(super) async fn create(&self, pod: &str, name: &str) -> Result<String, RuntimeError> {
        self.runtime()
            .create_container(pod, container_config(name))
            .await
    }

    pub(super) fn state_of(&self, id: &str) -> ContainerState {
        self.runtime()
            .store
            .containers
            .get(id)
            .expect("container record")
            .state()
    }

    /// A CreateContainer of `name` that fails at the OCI runtime and whose clean-up
    /// cannot finish (storage will not release the root filesystem).
    pub(super) async fn create_failing_with_an_unfinished_clean_up(&self, pod: &str, name: &str) {
        self.oci.fail("create");
        self.fakes.storage.failures.fail("release_rootfs");
        let failed = self.create(pod, name).await;
        assert!(matches!(failed, Err(RuntimeError::Oci(_))), "{failed:?}");
    }

    /// Puts a pod back to `Creating`, as a restart would find one whose set-up was
    /// cut short.
    pub(super) fn cut_pod_set_up_short(&self, id: &str) {
        self.runtime()
            .store
            .sandboxes
            .update(id, |record| {
                record.set_state(SandboxState::Creating);
                Ok(())
            })
            .expect("back to creating");
    }
}

pub(super) fn pod_config(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "default".into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        ..Default::default()
    }
}

pub(super) fn container_config(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "60".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_pod_and_its_container_from_run_to_removal() {
    let node = Node::new();
    let runtime = node.runtime();
    let pod = node.run_pod("web").await.expect("run pod");
    assert_eq!(node.fakes.network.pods(), vec![pod.clone()]);
    assert_eq!(
        node.fakes.images.pulled.lock().expect("pulled").as_slice(),
        ["registry.test/pause:3"],
        "the pause image is pulled when missing"
    );
    let pause = runtime
        .store
        .sandboxes
        .get(&pod)
        .expect("pod")
        .pause_container_id
        .clone();
    assert_eq!(node.oci.state(&pause), Some(FakeState::Running));

    let app = node.create(&pod, "app").await.expect("create");
    assert_eq!(node.state_of(&app), ContainerState::Created);
    runtime
        .start_container(&app[..12])
        .await
        .expect("start by prefix");
    assert_eq!(node.oci.state(&app), Some(FakeState::Running));
    let listed = runtime.list_containers(None).expect("list");
    assert_eq!(listed.len(), 1, "the pause process is not shown");
    assert_eq!(listed[0].state, ContainerState_::ContainerRunning as i32);
    assert_eq!(runtime.list_pod_sandbox(None).len(), 1);

    runtime.stop_container(&app, 5).await.expect("stop");
    let status = runtime.container_status(&app, false).expect("status");
    let status = status.status.expect("status");
    assert_eq!(
        (status.state, status.exit_code, status.reason.as_str()),
        (ContainerState_::ContainerExited as i32, 143, "Error")
    );
    runtime.remove_container(&app).await.expect("remove");
    assert_eq!(node.oci.state(&app), None);
    assert_eq!(node.fakes.storage.mounted(), vec![pause.clone()]);
    assert!(!runtime.bundle_dir(&app).exists());

    runtime.stop_pod_sandbox(&pod).await.expect("stop pod");
    assert_eq!(
        runtime.store.sandboxes.get(&pod).expect("pod").state(),
        SandboxState::NotReady
    );
    assert!(node.fakes.network.pods().is_empty());
    runtime.remove_pod_sandbox(&pod).await.expect("remove pod");
    runtime
        .remove_pod_sandbox(&pod)
        .await
        .expect("removing twice is fine");
    assert!(runtime.list_pod_sandbox(None).is_empty());
    assert!(node.oci.known().is_empty(), "{:?}", node.oci.known());
    assert!(node.fakes.storage.mounted().is_empty());
    assert!(!runtime.pod_dir(&pod).exists());
    let (a, p) = (&app[..8], &pause[..8]);
    assert_eq!(
        node.events.taken(),
        [
            format!("container Created {p}"),
            format!("container Started {p}"),
            "pod Created".into(),
            "pod Started".into(),
            format!("container Created {a}"),
            format!("container Started {a}"),
            format!("container Stopped {a}"),
            format!("container Deleted {a}"),
            format!("container Stopped {p}"),
            "pod Stopped".into(),
            format!("container Deleted {p}"),
            "pod Deleted".into(),
        ]
    );
}

use k8s_cri::v1::ContainerState as ContainerState_;

#[tokio::test]
async fn names_are_unique_until_their_holder_is_removed() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("first");
    // The same name with another config (a repeat of the same call is answered:
    // `repeat_tests`).
    let mut other = pod_config("web");
    other.hostname = "other".into();
    let again = node.runtime().run_pod_sandbox(other, String::new()).await;
    assert!(
        matches!(&again, Err(RuntimeError::AlreadyExists(m)) if m.contains(&pod)),
        "{again:?}"
    );
    let app = node.create(&pod, "app").await.expect("app");
    let mut other = container_config("app");
    other.command = vec!["true".into()];
    let twice = node.runtime().create_container(&pod, other).await;
    assert!(
        matches!(&twice, Err(RuntimeError::AlreadyExists(m)) if m.contains(&app)),
        "{twice:?}"
    );
    node.runtime().remove_container(&app).await.expect("remove");
    node.create(&pod, "app")
        .await
        .expect("the name is free again");
    node.runtime()
        .remove_pod_sandbox(&pod)
        .await
        .expect("remove pod");
    node.run_pod("web")
        .await
        .expect("the pod name is free again");
}

#[tokio::test]
async fn a_failed_network_set_up_leaves_nothing_and_the_pod_can_be_run_again() {
    let node = Node::new();
    node.fakes.network.failures.fail("set_up_pod");
    let failed = node.run_pod("web").await;
    assert!(
        matches!(
            failed,
            Err(RuntimeError::Backend {
                service: "network",
                ..
            })
        ),
        "{failed:?}"
    );
    let runtime = node.runtime();
    assert!(runtime.store.sandboxes.all().is_empty(), "no record left");
    assert!(runtime.store.containers.all().is_empty());
    assert!(node.oci.known().is_empty());
    assert!(node.fakes.storage.mounted().is_empty());
    assert!(
        std::fs::read_dir(runtime.dir.join("pods"))
            .expect("pods")
            .next()
            .is_none()
    );
    node.fakes.network.failures.heal("set_up_pod");
    node.run_pod("web").await.expect("run again");
}

#[tokio::test]
async fn a_pause_process_that_cannot_start_rolls_the_whole_pod_back() {
    let node = Node::new();
    node.oci.fail("start");
    let failed = node.run_pod("web").await;
    assert!(matches!(failed, Err(RuntimeError::Oci(_))), "{failed:?}");
    let runtime = node.runtime();
    assert!(runtime.store.sandboxes.all().is_empty());
    assert!(runtime.store.containers.all().is_empty());
    assert!(
        node.oci.known().is_empty(),
        "the pause container is deleted"
    );
    assert!(
        node.fakes.storage.mounted().is_empty(),
        "its rootfs is released"
    );
    assert!(
        node.fakes.network.pods().is_empty(),
        "the network is torn down"
    );
}

#[tokio::test]
async fn a_failed_container_creation_releases_what_it_took() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let mounted_before = node.fakes.storage.mounted();
    node.oci.fail("create");
    let failed = node.create(&pod, "app").await;
    assert!(matches!(failed, Err(RuntimeError::Oci(_))), "{failed:?}");
    assert_eq!(
        node.fakes.storage.mounted(),
        mounted_before,
        "rootfs released"
    );
    assert_eq!(
        node.runtime().store.containers_of(&pod).len(),
        1,
        "only the pause"
    );
    node.oci.heal("create");
    node.create(&pod, "app").await.expect("the name is free");

    let missing = node
        .runtime()
        .create_container(
            &pod,
            ContainerConfig {
                image: Some(ImageSpec {
                    image: "registry.test/absent:1".into(),
                    ..Default::default()
                }),
                ..container_config("other")
            },
        )
        .await;
    assert!(
        matches!(&missing, Err(RuntimeError::NotFound(m)) if m.contains("pull it first")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn containers_need_a_ready_pod_and_the_right_state() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    let runtime = node.runtime();
    let not_running = runtime.exec_sync(&app, vec!["true".into()], 1).await;
    assert!(matches!(
        not_running,
        Err(RuntimeError::FailedPrecondition(_))
    ));
    runtime.start_container(&app).await.expect("start");
    runtime
        .start_container(&app)
        .await
        .expect("a repeated start of a running container answers as the start did");
    let output = runtime
        .exec_sync(&app, vec!["echo".into(), "hi".into()], 1)
        .await
        .expect("exec");
    assert_eq!(output.stdout, b"echo hi");
    runtime.stop_pod_sandbox(&pod).await.expect("stop pod");
    assert_eq!(node.state_of(&app), ContainerState::Exited);
    let late = node.create(&pod, "late").await;
    assert!(
        matches!(late, Err(RuntimeError::FailedPrecondition(_))),
        "{late:?}"
    );
    assert!(matches!(
        runtime.container_status("ffff", false),
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_stop_escalates_to_sigkill_when_the_signal_is_ignored() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    node.runtime().start_container(&app).await.expect("start");
    node.oci.ignore_term();
    node.runtime().stop_container(&app, 1).await.expect("stop");
    let status = node
        .runtime()
        .container_status(&app, false)
        .expect("status");
    assert_eq!(status.status.expect("status").exit_code, 137);
    let kills = node
        .oci
        .calls()
        .into_iter()
        .filter(|call| call == &format!("kill {app}"))
        .count();
    assert_eq!(kills, 2, "TERM, then KILL");
}

#[tokio::test]
async fn an_exit_is_recorded_and_announced_once_however_often_it_is_seen() {
    let node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    let runtime = node.runtime();
    runtime.start_container(&app).await.expect("start");
    node.events.taken();
    node.oci.exit_by_itself(&app, 137, true);
    for _ in 0..3 {
        runtime.list_containers(None).expect("list");
        runtime.container_status(&app, false).expect("status");
    }
    let status = runtime.container_status(&app, false).expect("status");
    let status = status.status.expect("status");
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled")
    );
    assert_eq!(
        node.events.taken(),
        [format!("container Stopped {}", &app[..8])]
    );
}

#[tokio::test]
async fn a_restart_undoes_creations_cut_short_and_reads_exits_from_the_outage() {
    let mut node = Node::new();
    let pod = node.run_pod("web").await.expect("pod");
    let app = node.create(&pod, "app").await.expect("app");
    node.runtime().start_container(&app).await.expect("start");
    // A creation cut short by a kill: its record says Creating, its rootfs is mounted.
    let cut = node.create(&pod, "cut").await.expect("cut");
    node.runtime()
        .store
        .containers
        .update(&cut, |record| {
            record.set_state(ContainerState::Creating);
            Ok(())
        })
        .expect("back to creating");
    // A pod whose set-up was cut short.
    let half = node.run_pod("half").await.expect("half");
    node.cut_pod_set_up_short(&half);
    node.oci.exit_by_itself(&app, 0, false);

    node.restart().await;
    let runtime = node.runtime();
    assert!(runtime.store.containers.get(&cut).is_none());
    assert_eq!(node.oci.state(&cut), None, "its runtime state is deleted");
    assert!(
        !node.fakes.storage.mounted().contains(&cut),
        "its rootfs released"
    );
    assert!(
        runtime.store.sandboxes.get(&half).is_none(),
        "the half pod is gone"
    );
    assert!(!node.fakes.network.pods().contains(&half));
    let status = runtime.container_status(&app, false).expect("status");
    let status = status.status.expect("status");
    assert_eq!(
        (status.state, status.reason.as_str()),
        (ContainerState_::ContainerExited as i32, "Completed")
    );
    assert_eq!(runtime.list_pod_sandbox(None).len(), 1);
}

#[tokio::test]
async fn lists_filter_by_prefix_state_pod_and_labels() {
    let node = Node::new();
    let runtime = node.runtime();
    let web = node.run_pod("web").await.expect("web");
    let db = node.run_pod("db").await.expect("db");
    let mut labelled = container_config("app");
    labelled.labels.insert("tier".into(), "front".into());
    let app = runtime.create_container(&web, labelled).await.expect("app");
    let store = node.create(&db, "store").await.expect("store");
    runtime.start_container(&store).await.expect("start");

    let ids = |filter: ContainerFilter| -> Vec<String> {
        runtime
            .list_containers(Some(filter))
            .expect("list")
            .into_iter()
            .map(|c| c.id)
            .collect()
    };
    assert_eq!(
        ids(ContainerFilter {
            pod_sandbox_id: web[..10].into(),
            ..Default::default()
        }),
        vec![app.clone()]
    );
    assert_eq!(
        ids(ContainerFilter {
            id: store[..10].into(),
            ..Default::default()
        }),
        vec![store.clone()]
    );
    let running = ContainerStateValue {
        state: ContainerState_::ContainerRunning as i32,
    };
    assert_eq!(
        ids(ContainerFilter {
            state: Some(running),
            ..Default::default()
        }),
        vec![store.clone()]
    );
    let front = [("tier".to_string(), "front".to_string())].into();
    assert_eq!(
        ids(ContainerFilter {
            label_selector: front,
            ..Default::default()
        }),
        [app]
    );
    let pods = runtime.list_pod_sandbox(Some(PodSandboxFilter {
        id: db[..6].into(),
        ..Default::default()
    }));
    assert_eq!(pods.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), [db]);
}
