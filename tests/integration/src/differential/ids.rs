//! Lookups by the short ids a `crictl` user types, unique ones and prefixes two ids
//! share, for pods, containers and images.

use k8s_cri::v1::*;

use super::{Observed, Side, code_of, pod_or_note};

/// Calls naming a pod, a container and an image by a unique prefix of its id.
pub async fn short_ids(side: &Side, observed: &mut Observed) {
    let Some(pod) = pod_or_note(side, "short-ids", true, false, observed).await else {
        return;
    };
    let short = side.container("short", &["sleep", "3600"]);
    let Some(id) = side
        .create_and_start(&pod, short, "short-ids", observed)
        .await
    else {
        return;
    };
    let container = side.status(&id[..8]).await.map(|s| s.id == id);
    observed.insert(
        "short-ids/ContainerStatus(8 chars)".into(),
        format!("{} {:?}", code_of(&container), container.ok()),
    );
    let pod_status = side
        .runtime
        .clone()
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.id[..8].to_string(),
            verbose: false,
        })
        .await;
    observed.insert(
        "short-ids/PodSandboxStatus(8 chars)".into(),
        code_of(&pod_status),
    );
    let image_id = side.image_id(&side.image).await.ok().flatten();
    let short = hex_of(image_id.as_deref().unwrap_or_default());
    let short = &short[..short.len().min(12)];
    let found = side.image_id(short).await;
    observed.insert(
        "short-ids/ImageStatus(12 hex chars)".into(),
        format!(
            "{} same {:?}",
            code_of(&found),
            found.ok().map(|f| f == image_id)
        ),
    );
    let stopped = side
        .runtime
        .clone()
        .stop_container(StopContainerRequest {
            container_id: id[..8].to_string(),
            timeout: 0,
        })
        .await;
    observed.insert("short-ids/StopContainer(8 chars)".into(), code_of(&stopped));
    let removed = side
        .runtime
        .clone()
        .remove_container(RemoveContainerRequest {
            container_id: id[..8].to_string(),
        })
        .await;
    let gone = side.status(&id).await;
    observed.insert(
        "short-ids/RemoveContainer(8 chars)".into(),
        format!(
            "{}, then ContainerStatus {}",
            code_of(&removed),
            code_of(&gone)
        ),
    );
}

/// A prefix two ids share: ImageStatus/RemoveImage, ContainerStatus and
/// PodSandboxStatus, then RemoveImage of one of the two by a unique prefix.
pub async fn ambiguous_prefixes(side: &Side, observed: &mut Observed) {
    let [first, second] = &side.extra.twins;
    let (Some(one), Some(other)) = (
        side.image_id(first).await.ok().flatten(),
        side.image_id(second).await.ok().flatten(),
    ) else {
        observed.insert("ambiguous/images".into(), "twins not pulled".into());
        return;
    };
    let prefix = &side.extra.twin_prefix;
    let status = side.image_id(prefix).await;
    let found = status.as_ref().ok().map(|found| found.is_some());
    observed.insert(
        "ambiguous/ImageStatus(shared prefix)/code".into(),
        code_of(&status),
    );
    observed.insert(
        "ambiguous/ImageStatus(shared prefix)/found".into(),
        format!("{found:?}"),
    );
    let removed = remove_image(side, prefix).await;
    let kept = [&one, &other].map(|id| id.clone());
    let still = count_present(side, &kept).await;
    observed.insert(
        "ambiguous/RemoveImage(shared prefix)/code".into(),
        code_of(&removed),
    );
    observed.insert(
        "ambiguous/RemoveImage(shared prefix)/twins left".into(),
        still.to_string(),
    );
    let unique = &hex_of(&other)[..12];
    let removed = remove_image(side, unique).await;
    let still = count_present(side, &kept).await;
    observed.insert(
        "short-ids/RemoveImage(12 hex chars)".into(),
        format!("{}, twins left: {still}", code_of(&removed)),
    );
    ambiguous_containers_and_pods(side, observed).await;
}

async fn ambiguous_containers_and_pods(side: &Side, observed: &mut Observed) {
    let containers = container_ids(side).await;
    let seen = match shared_prefix(&containers) {
        Some(prefix) => {
            let status = side.status(&prefix).await;
            let removed = side
                .runtime
                .clone()
                .remove_container(RemoveContainerRequest {
                    container_id: prefix,
                })
                .await;
            let left = container_ids(side).await.len();
            Some([
                code_of(&status),
                code_of(&removed),
                (containers.len() - left).to_string(),
            ])
        }
        None => None,
    };
    let keys = prefix_keys("ContainerStatus", "RemoveContainer", "containers");
    note_prefix(observed, keys, seen);
    let mut spare = 0;
    let (pods, prefix) = loop {
        let pods = pod_ids(side).await;
        if let Some(prefix) = shared_prefix(&pods) {
            break (pods, Some(prefix));
        }
        // Among 17 ids two share their first hex digit: more pods until they do.
        spare += 1;
        if spare > 17
            || side
                .run_pod(&format!("spare-{spare}"), true, false)
                .await
                .is_err()
        {
            break (pods, None);
        }
    };
    let seen = match prefix {
        Some(prefix) => {
            let mut runtime = side.runtime.clone();
            let status = runtime
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: prefix.clone(),
                    verbose: false,
                })
                .await;
            let removed = runtime
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: prefix,
                })
                .await;
            let left = pod_ids(side).await.len();
            Some([
                code_of(&status),
                code_of(&removed),
                (pods.len() - left).to_string(),
            ])
        }
        None => None,
    };
    let keys = prefix_keys("PodSandboxStatus", "RemovePodSandbox", "pods");
    note_prefix(observed, keys, seen);
}

/// The names of the three observations of a kind of id: what a status call and a
/// removal answer a shared prefix, and how many the removal removed.
fn prefix_keys(status: &str, remove: &str, kind: &str) -> [String; 3] {
    [
        format!("ambiguous/{status}(shared prefix)/code"),
        format!("ambiguous/{remove}(shared prefix)/code"),
        format!("ambiguous/{remove}(shared prefix)/{kind} removed"),
    ]
}

/// The three observations, or a note on each when no two ids shared a prefix.
fn note_prefix(observed: &mut Observed, keys: [String; 3], seen: Option<[String; 3]>) {
    let seen = seen.unwrap_or_else(|| std::array::from_fn(|_| "no two ids share a prefix".into()));
    for (key, seen) in keys.into_iter().zip(seen) {
        observed.insert(key, seen);
    }
}

async fn container_ids(side: &Side) -> Vec<String> {
    side.runtime
        .clone()
        .list_containers(ListContainersRequest::default())
        .await
        .map(|r| {
            r.into_inner()
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect()
        })
        .unwrap_or_default()
}

async fn pod_ids(side: &Side) -> Vec<String> {
    side.runtime
        .clone()
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .map(|r| r.into_inner().items.into_iter().map(|p| p.id).collect())
        .unwrap_or_default()
}

async fn remove_image(side: &Side, image: &str) -> Result<(), tonic::Status> {
    side.images
        .clone()
        .remove_image(RemoveImageRequest {
            image: crate::cri::image_spec(image),
        })
        .await
        .map(|_| ())
}

/// How many of the images `ids` the side still has.
async fn count_present(side: &Side, ids: &[String]) -> usize {
    let mut present = 0;
    for id in ids {
        if side.image_id(id).await.ok().flatten().is_some() {
            present += 1;
        }
    }
    present
}

fn hex_of(id: &str) -> &str {
    id.trim_start_matches("sha256:")
}

/// The longest prefix that two of `ids` share, if any two share one.
pub fn shared_prefix(ids: &[String]) -> Option<String> {
    let mut sorted: Vec<&str> = ids.iter().map(|id| hex_of(id)).collect();
    sorted.sort();
    sorted
        .windows(2)
        .map(|pair| {
            let common = pair[0]
                .bytes()
                .zip(pair[1].bytes())
                .take_while(|(a, b)| a == b)
                .count();
            &pair[0][..common]
        })
        .filter(|prefix| !prefix.is_empty())
        .max_by_key(|prefix| prefix.len())
        .map(str::to_string)
}
