//! Differences from containerd that the differential check (`bin/differential.rs`)
//! found and that are fixed, kept fixed without containerd present.

use k8s_cri::v1::*;
use trellis_integration::cri::{
    BusyboxNode, create, host_network_pod, image_spec, image_status, pull, remove_pods, run_pod,
    shell, start,
};
use trellis_integration::differential::Images;

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
/// wrong, not with its raw log lines (timestamps, levels, warnings), and as the
/// caller's to fix (FailedPrecondition), not as a fault of the runtime (Internal).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_create_says_what_went_wrong_without_runc_log_lines() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("missing", false)).await;
    let error = create(node, &pod, busybox.container("c", &["/no/such/binary"]))
        .await
        .expect_err("no such executable");
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
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

async fn remove_image(node: &trellis_integration::Node, image: &str) -> Result<(), tonic::Status> {
    node.images()
        .remove_image(RemoveImageRequest {
            image: image_spec(image),
        })
        .await
        .map(|_| ())
}

/// RemoveImage takes the short id `crictl images` shows, as ImageStatus does, and
/// removes the image it names (it answered OK and kept the image).
#[tokio::test(flavor = "multi_thread")]
async fn remove_image_takes_a_short_image_id() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let id = image_status(node, &busybox.image)
        .await
        .expect("the busybox image")
        .id;
    remove_image(node, &id["sha256:".len().."sha256:".len() + 13])
        .await
        .expect("RemoveImage by short id");
    assert_eq!(image_status(node, &id).await, None, "{id} is still there");
    assert_eq!(image_status(node, &busybox.image).await, None);
    busybox.node.stop();
}

/// A prefix that two image ids share names neither: ImageStatus and RemoveImage
/// refuse it as ambiguous (InvalidArgument), as they do for pods and containers,
/// rather than answering "no such image" or removing nothing with OK.
#[tokio::test(flavor = "multi_thread")]
async fn an_ambiguous_short_image_id_is_refused() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let twins = Images::push(&busybox.registry, "twins").await;
    for twin in &twins.twins {
        pull(node, twin).await.expect("pull a twin");
    }
    let status = node
        .images()
        .image_status(ImageStatusRequest {
            image: image_spec(&twins.twin_prefix),
            verbose: false,
        })
        .await;
    let status = status.expect_err("an ambiguous prefix");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ambiguous"), "{status:?}");
    let removed = remove_image(node, &twins.twin_prefix).await;
    let removed = removed.expect_err("an ambiguous prefix");
    assert_eq!(removed.code(), tonic::Code::InvalidArgument, "{removed:?}");
    for twin in &twins.twins {
        assert!(
            image_status(node, twin).await.is_some(),
            "{twin} was removed"
        );
    }
    busybox.node.stop();
}

/// /proc is mounted as containerd and CRI-O mount it: nosuid, nodev, noexec.
#[tokio::test(flavor = "multi_thread")]
async fn proc_is_mounted_nosuid_nodev_noexec() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("proc", false)).await;
    let id = start(node, &pod, busybox.container("c", &["sleep", "3600"])).await;
    let mountinfo = shell(node, &id, "cat /proc/self/mountinfo").await.stdout;
    let options = mountinfo
        .lines()
        .map(|line| line.split(' ').collect::<Vec<_>>())
        .find(|fields| fields.get(4) == Some(&"/proc"))
        .and_then(|fields| fields.get(5).map(|o| o.to_string()))
        .expect("a mount at /proc");
    for wanted in ["nosuid", "nodev", "noexec"] {
        assert!(options.split(',').any(|o| o == wanted), "/proc {options}");
    }
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// A memory limit without a swap limit caps memory and swap together (cgroup v1's
/// memsw), as under containerd and CRI-O: a container cannot swap past its limit.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_limit_caps_memory_and_swap_together() {
    let memsw = "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes";
    if !std::path::Path::new(memsw).exists() {
        eprintln!("skipped: this host accounts no swap per cgroup (no {memsw})");
        return;
    }
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("swap", false)).await;
    let mut config = busybox.container("c", &["sleep", "3600"]);
    config.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = start(node, &pod, config).await;
    let limits = shell(node, &id, &format!("cat {memsw}")).await.stdout;
    assert_eq!(limits.trim(), (64 << 20).to_string());
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}
