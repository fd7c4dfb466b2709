//! What a call is about, as attributes of its server span under OpenTelemetry's names
//! (`k8s.pod.name`, `container.id`, ...), so that an operator finds a pod's or a
//! container's calls in the traces. Nothing is done when spans are not exported.

use k8s_cri::v1::{ContainerConfig, PodSandboxMetadata};
use trellis_common::telemetry::{annotate, exporting};

use crate::lifecycle::Runtime;

pub fn container(id: &str) {
    annotate(&[("container.id", id)]);
}

pub fn pod(id: &str) {
    annotate(&[("k8s.pod.sandbox_id", id)]);
}

pub fn pod_metadata(metadata: Option<&PodSandboxMetadata>) {
    if let Some(metadata) = metadata {
        annotate(&[
            ("k8s.pod.name", &metadata.name),
            ("k8s.namespace.name", &metadata.namespace),
            ("k8s.pod.uid", &metadata.uid),
        ]);
    }
}

/// The pod `id` as its record has it (not as a caller describes it).
pub fn recorded_pod(runtime: &Runtime, id: &str) {
    pod(id);
    if !exporting() {
        return;
    }
    if let Ok(sandbox) = runtime.sandbox(id) {
        pod_metadata(sandbox.config().metadata.as_ref());
    }
}

pub fn container_config(config: &ContainerConfig) {
    let name = config.metadata.as_ref().map(|m| m.name.as_str());
    let image = config.image.as_ref().map(|i| i.image.as_str());
    annotate(&[
        ("container.name", name.unwrap_or_default()),
        ("container.image.name", image.unwrap_or_default()),
    ]);
}
