//! Differences from containerd that the differential check (`bin/differential.rs`)
//! found and that are fixed, kept fixed without containerd present.

use k8s_cri::v1::*;
use trellis_integration::cri::{
    BusyboxNode, create, host_network_pod, image_status, remove_pods, run_pod, shell, start,
};

/// A process's supplementary groups include its primary group, with and without a
/// requested user (`id` lists it under `groups=`), as under containerd, CRI-O and
/// Docker.
#[tokio::test(flavor = "multi_thread")]
async fn the_primary_group_is_among_the_process_groups() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("groups", false)).await;
    let mut as_user = busybox.container("as-user", &["sleep", "3600"]);
    as_user.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            run_as_user: Some(Int64Value { value: 1000 }),
            run_as_group: Some(Int64Value { value: 3000 }),
            supplemental_groups: vec![4000],
            ..Default::default()
        }),
        ..Default::default()
    });
    let as_user = start(node, &pod, as_user).await;
    let as_root = start(node, &pod, busybox.container("as-root", &["sleep", "3600"])).await;
    let groups = "sed -n 's/^Groups:[[:space:]]*//p' /proc/self/status";
    assert_eq!(
        shell(node, &as_user, groups).await.stdout.trim(),
        "3000 4000"
    );
    assert_eq!(shell(node, &as_root, groups).await.stdout.trim(), "0");
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// ImageStatus finds an image by the short id `crictl images` shows (13 hex
/// characters) or fewer, when no image is named so.
#[tokio::test(flavor = "multi_thread")]
async fn image_status_takes_a_short_image_id() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let id = image_status(node, &busybox.image)
        .await
        .expect("the busybox image")
        .id;
    let short = &id["sha256:".len().."sha256:".len() + 13];
    let found = image_status(node, short).await.map(|image| image.id);
    assert_eq!(found, Some(id.clone()), "ImageStatus {short}");
    assert_eq!(image_status(node, "fffffffffffff").await, None);
    busybox.node.stop();
}

/// A host-network pod's processes see the node's hostname everywhere: `hostname`,
/// `$HOSTNAME` and `/etc/hostname` agree, as under containerd and CRI-O.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_network_pod_has_the_nodes_hostname_everywhere() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let node_hostname = nix::unistd::gethostname()
        .expect("hostname")
        .to_string_lossy()
        .into_owned();
    let pod = run_pod(node, host_network_pod("on-the-host", false)).await;
    let id = start(node, &pod, busybox.container("c", &["sleep", "3600"])).await;
    let seen = shell(node, &id, "hostname; echo $HOSTNAME; cat /etc/hostname").await;
    assert_eq!(
        seen.stdout,
        format!("{node_hostname}\n{node_hostname}\n{node_hostname}\n")
    );
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// A host-network pod resolves the node's names as the node does: its /etc/hosts is
/// the node's, as under containerd and CRI-O.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_network_pod_has_the_nodes_hosts_file() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("hosts", false)).await;
    let id = start(node, &pod, busybox.container("c", &["sleep", "3600"])).await;
    let node_hosts = std::fs::read_to_string("/etc/hosts").expect("the node's /etc/hosts");
    assert_eq!(shell(node, &id, "cat /etc/hosts").await.stdout, node_hosts);
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// A container whose command cannot run fails with what the OCI runtime said went
/// wrong, not with its raw log lines (timestamps, levels, warnings).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_create_says_what_went_wrong_without_runc_log_lines() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("missing", false)).await;
    let error = create(node, &pod, busybox.container("c", &["/no/such/binary"]))
        .await
        .expect_err("no such executable");
    let message = error.message();
    assert!(
        message
            .contains("exec: \"/no/such/binary\": stat /no/such/binary: no such file or directory"),
        "{message}"
    );
    for raw in ["time=", "level=", "msg="] {
        assert!(!message.contains(raw), "{raw} in {message}");
    }
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}
