//! The gRPC code a client gets for configs and ids that cannot work: missing
//! metadata, images absent or misnamed, no command at all, names taken, ids unknown.

use k8s_cri::v1::*;

use super::{Observed, PodUnderTest, Side, code_of, pod_or_note};

/// An id no runtime gave out.
const UNKNOWN_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub async fn invalid_configs(side: &Side, observed: &mut Observed) {
    let mut note = |what: &str, code: String| {
        observed.insert(format!("errors/{what}"), code);
    };
    let no_metadata = side
        .runtime
        .clone()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: None,
                ..crate::cri::pod_config("no-metadata", true)
            }),
            runtime_handler: String::new(),
        })
        .await;
    note("RunPodSandbox(no metadata)", code_of(&no_metadata));
    let mut scratch = Observed::new();
    let Some(pod) = pod_or_note(side, "errors", true, false, &mut scratch).await else {
        note("RunPodSandbox", format!("{scratch:?}"));
        return;
    };
    let again = side
        .runtime
        .clone()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod.config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map(|r| r.into_inner().pod_sandbox_id);
    note(
        "RunPodSandbox(name of a ready pod, same config)",
        same_or_code(&again, &pod.id, "pod"),
    );
    let mut other = pod.config.clone();
    other.labels.insert("another".into(), "config".into());
    let again = side
        .runtime
        .clone()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(other),
            runtime_handler: String::new(),
        })
        .await
        .map(|r| r.into_inner().pod_sandbox_id);
    note(
        "RunPodSandbox(name of a ready pod, another config)",
        same_or_code(&again, &pod.id, "pod"),
    );
    let repository = side.image.rsplit_once(':').map_or("", |(name, _)| name);
    let absent = format!("{repository}-absent:1");
    let cases: [(&str, ContainerConfig); 5] = [
        (
            "no metadata",
            ContainerConfig {
                metadata: None,
                ..side.container("x", &["sleep", "1"])
            },
        ),
        (
            "no image",
            ContainerConfig {
                image: None,
                ..side.container("no-image", &["sleep", "1"])
            },
        ),
        (
            "image not pulled",
            with_image(side.container("not-pulled", &["sleep", "1"]), &absent),
        ),
        (
            "malformed image",
            with_image(side.container("malformed", &["sleep", "1"]), "Not//A:Ref"),
        ),
        (
            "no command anywhere",
            with_image(
                side.container("no-command", &[]),
                &side.extra.without_command,
            ),
        ),
    ];
    for (case, config) in cases {
        note(
            &format!("CreateContainer({case})"),
            code_of(&side.create(&pod, config).await),
        );
    }
    let first = side
        .create(&pod, side.container("twice", &["sleep", "3600"]))
        .await;
    note("CreateContainer(first of a name)", code_of(&first));
    let first = first.unwrap_or_default();
    let again = side.create(&pod, side.container("twice", &["sleep", "3600"]));
    note(
        "CreateContainer(name taken, same config)",
        same_or_code(&again.await, &first, "container"),
    );
    let again = side.create(&pod, side.container("twice", &["sleep", "60"]));
    note(
        "CreateContainer(name taken, another config)",
        same_or_code(&again.await, &first, "container"),
    );
    let elsewhere = PodUnderTest {
        id: UNKNOWN_ID.into(),
        config: pod.config.clone(),
        replacements: Vec::new(),
    };
    let orphan = side.create(&elsewhere, side.container("orphan", &["sleep", "1"]));
    note("CreateContainer(unknown pod)", code_of(&orphan.await));
    unknown_ids(side, &mut note).await;
    image_errors(side, &absent, &mut note).await;
}

/// What a repeated creation answered: the earlier one's id, another, or an error.
fn same_or_code(answer: &Result<String, tonic::Status>, earlier: &str, what: &str) -> String {
    match answer {
        Ok(id) if id == earlier => format!("OK, the same {what}"),
        Ok(_) => format!("OK, another {what}"),
        Err(_) => code_of(answer),
    }
}

fn with_image(config: ContainerConfig, image: &str) -> ContainerConfig {
    ContainerConfig {
        image: crate::cri::image_spec(image),
        ..config
    }
}

/// Calls naming a pod or container that never existed.
async fn unknown_ids(side: &Side, note: &mut impl FnMut(&str, String)) {
    let id = || UNKNOWN_ID.to_string();
    let mut runtime = side.runtime.clone();
    note(
        "ContainerStatus(unknown id)",
        code_of(&side.status(UNKNOWN_ID).await),
    );
    note(
        "StartContainer(unknown id)",
        code_of(&side.start(UNKNOWN_ID).await),
    );
    let stop = runtime
        .stop_container(StopContainerRequest {
            container_id: id(),
            timeout: 1,
        })
        .await;
    note("StopContainer(unknown id)", code_of(&stop));
    let remove = runtime
        .remove_container(RemoveContainerRequest { container_id: id() })
        .await;
    note("RemoveContainer(unknown id)", code_of(&remove));
    let status = runtime
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id(),
            verbose: false,
        })
        .await;
    note("PodSandboxStatus(unknown id)", code_of(&status));
    let stop = runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id(),
        })
        .await;
    note("StopPodSandbox(unknown id)", code_of(&stop));
    let remove = runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id(),
        })
        .await;
    note("RemovePodSandbox(unknown id)", code_of(&remove));
}

/// Image calls naming an image that is not there or cannot be a name.
async fn image_errors(side: &Side, absent: &str, note: &mut impl FnMut(&str, String)) {
    note("PullImage(absent)", code_of(&side.pull(absent).await));
    note(
        "PullImage(malformed)",
        code_of(&side.pull("Not//A:Ref").await),
    );
    let status = side.image_id("Not//A:Ref").await;
    note(
        "ImageStatus(malformed)",
        format!("{} {:?}", code_of(&status), status.ok()),
    );
    let status = side.image_id(absent).await;
    note(
        "ImageStatus(absent)",
        format!("{} {:?}", code_of(&status), status.ok()),
    );
    let remove = side
        .images
        .clone()
        .remove_image(RemoveImageRequest {
            image: crate::cri::image_spec(absent),
        })
        .await;
    note("RemoveImage(absent)", code_of(&remove));
}
