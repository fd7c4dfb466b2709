//! Security contexts through the CRI socket: privileged containers, devices,
//! seccomp profiles and mount propagation, run by runc under conmon.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::*;
use nix::mount::{MntFlags, MsFlags};
use tonic::Code;
use trellis_integration::cri::{
    BusyboxNode, create, exec, host_network_pod, remove_pods, run_pod, shell, start,
};

fn secure(mut config: ContainerConfig, security: LinuxContainerSecurityContext) -> ContainerConfig {
    config.linux = Some(LinuxContainerConfig {
        security_context: Some(security),
        ..Default::default()
    });
    config
}

fn seccomp(kind: ProfileType, localhost_ref: &str) -> LinuxContainerSecurityContext {
    LinuxContainerSecurityContext {
        seccomp: Some(SecurityProfile {
            profile_type: kind as i32,
            localhost_ref: localhost_ref.into(),
        }),
        ..Default::default()
    }
}

const SLEEP: &[&str] = &["/bin/sleep", "3600"];

/// The capability mask a privileged container should hold: every capability this
/// kernel knows that the runtime (root, here) holds itself.
fn host_capability_mask() -> u64 {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("cap_last_cap")
        .trim()
        .parse()
        .expect("number");
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).expect("hex"))
        .expect("CapBnd");
    // Capabilities past CAP_CHECKPOINT_RESTORE (40) have no OCI name yet.
    bounding & ((1u64 << (last.min(40) + 1)) - 1)
}

fn cap_eff(status: &str) -> u64 {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or_else(|| panic!("no CapEff in {status}"));
    u64::from_str_radix(mask.trim(), 16).expect("hex")
}

/// The first block device directly in the host's /dev, with its major and minor.
fn host_block_device() -> Option<(String, u64, u64)> {
    let mut entries: Vec<_> = std::fs::read_dir("/dev")
        .ok()?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let metadata = std::fs::symlink_metadata(e.path()).ok()?;
        metadata.file_type().is_block_device().then(|| {
            (
                e.file_name().to_string_lossy().into_owned(),
                nix::sys::stat::major(metadata.rdev()),
                nix::sys::stat::minor(metadata.rdev()),
            )
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn privileged_containers_get_every_capability_and_host_device_others_only_what_they_ask() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let privileged_pod = run_pod(node, host_network_pod("privileged", true)).await;
    let privileged = start(
        node,
        &privileged_pod,
        secure(
            busybox.container("root", SLEEP),
            LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            },
        ),
    )
    .await;
    let status = exec(node, &privileged, &["/bin/cat", "/proc/self/status"]).await;
    assert_eq!(
        cap_eff(&status.stdout),
        host_capability_mask(),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stdout
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('0')),
        "{}",
        status.stdout
    );
    let writable = shell(node, &privileged, "grep ' /sys ' /proc/mounts").await;
    assert!(
        writable.stdout.contains(" rw,"),
        "sysfs is writable: {writable:?}"
    );

    let device = host_block_device();
    if let Some((name, _, _)) = &device {
        let seen = exec(
            node,
            &privileged,
            &["/bin/busybox", "test", "-b", &format!("/dev/{name}")],
        )
        .await;
        assert_eq!(
            seen.code, 0,
            "/dev/{name} in the privileged container: {seen:?}"
        );
    }

    // Without privileges: no host device, default capabilities, and the device cgroup
    // refuses a node made by hand; a requested device is there, as asked.
    let pod = run_pod(node, host_network_pod("plain", false)).await;
    let mut config = busybox.container("plain", SLEEP);
    config.devices = vec![Device {
        host_path: "/dev/null".into(),
        container_path: "/dev/cri-null".into(),
        permissions: "rw".into(),
    }];
    let plain = start(node, &pod, config).await;
    let status = exec(node, &plain, &["/bin/cat", "/proc/self/status"]).await;
    assert_ne!(cap_eff(&status.stdout), host_capability_mask());
    let written = shell(
        node,
        &plain,
        "echo into the void > /dev/cri-null && echo done",
    )
    .await;
    assert_eq!(
        (written.code, written.stdout.as_str()),
        (0, "done\n"),
        "{written:?}"
    );
    if let Some((name, major, minor)) = &device {
        let absent = exec(
            node,
            &plain,
            &["/bin/busybox", "test", "-e", &format!("/dev/{name}")],
        )
        .await;
        assert_ne!(
            absent.code, 0,
            "/dev/{name} is not in an unprivileged container"
        );
        let by_hand = shell(node, &plain, &format!("/bin/busybox mknod /tmp/disk b {major} {minor} && /bin/busybox dd if=/tmp/disk of=/dev/null count=1")).await;
        assert_ne!(
            by_hand.code, 0,
            "the device cgroup denies {major}:{minor}: {by_hand:?}"
        );
    }

    // Privileged needs a privileged pod; a missing device is named.
    let error = create(
        node,
        &pod,
        secure(
            busybox.container("escalate", SLEEP),
            LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect_err("privileged in a plain pod");
    assert_eq!(error.code(), Code::InvalidArgument);
    let mut config = busybox.container("nodev", SLEEP);
    config.devices = vec![Device {
        host_path: "/dev/trellis-no-such-device".into(),
        container_path: "/dev/x".into(),
        permissions: "rw".into(),
    }];
    let error = create(node, &pod, config)
        .await
        .expect_err("missing device");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("/dev/trellis-no-such-device"),
        "{}",
        error.message()
    );
    remove_pods(node, &[&privileged_pod, &pod]).await;
    busybox.node.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn seccomp_profiles_confine_what_they_say() {
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("seccomp", false)).await;
    let unshare = ["/bin/busybox", "unshare", "-U", "/bin/true"];

    let default = start(
        node,
        &pod,
        secure(
            busybox.container("default", SLEEP),
            seccomp(ProfileType::RuntimeDefault, ""),
        ),
    )
    .await;
    let status = shell(node, &default, "grep Seccomp: /proc/self/status").await;
    assert!(
        status.stdout.trim_end().ends_with('2'),
        "filtered: {status:?}"
    );
    let refused = exec(node, &default, &unshare).await;
    assert_ne!(
        refused.code, 0,
        "RuntimeDefault refuses unshare without CAP_SYS_ADMIN: {refused:?}"
    );
    assert!(
        refused.stderr.contains("Operation not permitted"),
        "{refused:?}"
    );
    let ordinary = shell(
        node,
        &default,
        "mkdir /tmp/d && echo hi > /tmp/d/f && cat /tmp/d/f",
    )
    .await;
    assert_eq!(ordinary.stdout, "hi\n", "{ordinary:?}");

    let unconfined = start(
        node,
        &pod,
        secure(
            busybox.container("unconfined", SLEEP),
            seccomp(ProfileType::Unconfined, ""),
        ),
    )
    .await;
    let allowed = exec(node, &unconfined, &unshare).await;
    assert_eq!(
        allowed.code, 0,
        "unconfined may unshare a user namespace: {allowed:?}"
    );

    // A Localhost profile that refuses mkdir.
    let profiles = tempfile::tempdir().expect("tempdir");
    let no_mkdir = profiles.path().join("no-mkdir.json");
    let profile = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#;
    std::fs::write(&no_mkdir, profile).expect("write profile");
    let local = start(
        node,
        &pod,
        secure(
            busybox.container("local", SLEEP),
            seccomp(ProfileType::Localhost, no_mkdir.to_str().expect("utf-8")),
        ),
    )
    .await;
    let blocked = exec(node, &local, &["/bin/mkdir", "/tmp/blocked"]).await;
    assert_ne!(blocked.code, 0, "{blocked:?}");
    assert!(
        blocked.stderr.contains("Operation not permitted"),
        "{blocked:?}"
    );
    assert_eq!(
        exec(node, &local, &["/bin/touch", "/tmp/file"]).await.code,
        0,
        "the rest is allowed"
    );

    // The deprecated field names the same profiles.
    let mut by_path = LinuxContainerSecurityContext::default();
    #[allow(deprecated)]
    {
        by_path.seccomp_profile_path = format!("localhost/{}", no_mkdir.display());
    }
    let old = start(
        node,
        &pod,
        secure(busybox.container("old-field", SLEEP), by_path),
    )
    .await;
    assert_ne!(
        exec(node, &old, &["/bin/mkdir", "/tmp/blocked"]).await.code,
        0
    );

    // Missing and malformed profiles are refused with their path.
    let malformed = profiles.path().join("malformed.json");
    std::fs::write(&malformed, "{\"defaultAction\": ").expect("write");
    for (name, path) in [
        ("missing", profiles.path().join("missing.json")),
        ("malformed", malformed),
    ] {
        let path = path.to_str().expect("utf-8");
        let error = create(
            node,
            &pod,
            secure(
                busybox.container(name, SLEEP),
                seccomp(ProfileType::Localhost, path),
            ),
        )
        .await
        .expect_err(name);
        assert_eq!(error.code(), Code::InvalidArgument, "{name}: {error:?}");
        assert!(
            error.message().contains(path),
            "{name}: {}",
            error.message()
        );
    }
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}

/// A temporary directory bind-mounted on itself with the given propagation; on drop
/// every mount at or under it is detached, deepest first, and the directory removed.
struct MountedDir {
    dir: tempfile::TempDir,
}

impl MountedDir {
    fn new(propagation: MsFlags) -> MountedDir {
        let dir = tempfile::Builder::new()
            .prefix("trellis-propagation-")
            .tempdir()
            .expect("tempdir");
        let guard = MountedDir { dir };
        let path = guard.path().to_path_buf();
        nix::mount::mount(
            Some(&path),
            &path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("bind the directory on itself");
        nix::mount::mount(
            None::<&str>,
            &path,
            None::<&str>,
            propagation | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("set its propagation");
        guard
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn mounts_under(&self) -> Vec<PathBuf> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(self.path()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points
    }
}

impl Drop for MountedDir {
    fn drop(&mut self) {
        for _ in 0..16 {
            let points = self.mounts_under();
            if points.is_empty() {
                break;
            }
            for point in points {
                let _ = nix::mount::umount2(&point, MntFlags::MNT_DETACH);
            }
        }
    }
}

fn mount_of(host: &Path, container: &str, propagation: MountPropagation) -> Mount {
    Mount {
        host_path: host.display().to_string(),
        container_path: container.into(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mounts_propagate_as_asked() {
    let shared = MountedDir::new(MsFlags::MS_SHARED);
    let private = MountedDir::new(MsFlags::MS_PRIVATE);
    for sub in ["both", "down", "down/back", "private"] {
        std::fs::create_dir_all(shared.path().join(sub)).expect("mkdir");
    }
    let busybox = BusyboxNode::start().await;
    let node = &busybox.node;
    let pod = run_pod(node, host_network_pod("propagation", true)).await;
    let mut config = secure(
        busybox.container("mounter", SLEEP),
        LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        },
    );
    config.mounts = vec![
        mount_of(
            &shared.path().join("both"),
            "/both",
            MountPropagation::PropagationBidirectional,
        ),
        mount_of(
            &shared.path().join("down"),
            "/down",
            MountPropagation::PropagationHostToContainer,
        ),
        mount_of(
            &shared.path().join("private"),
            "/private",
            MountPropagation::PropagationPrivate,
        ),
    ];
    let mounter = start(node, &pod, config).await;

    // Bidirectional: a mount made in the container appears on the host.
    let made = shell(node, &mounter, "mkdir -p /both/inner && mount -t tmpfs tmpfs /both/inner && echo hi > /both/inner/from-container").await;
    assert_eq!(made.code, 0, "{made:?}");
    let on_host = std::fs::read_to_string(shared.path().join("both/inner/from-container"));
    assert_eq!(
        on_host.ok().as_deref(),
        Some("hi\n"),
        "the container's mount reached the host"
    );

    // Host to container: a host mount appears in the container, not the reverse.
    for (host, name) in [("down", "from-host"), ("private", "hidden")] {
        let target = shared.path().join(host).join("inner");
        std::fs::create_dir_all(&target).expect("mkdir");
        nix::mount::mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("host tmpfs");
        std::fs::write(target.join(name), "x").expect("write");
    }
    let seen = exec(
        node,
        &mounter,
        &["/bin/ls", "/down/inner", "/private/inner"],
    )
    .await;
    assert!(
        seen.stdout.contains("from-host") && !seen.stdout.contains("hidden"),
        "{seen:?}"
    );
    let back = shell(
        node,
        &mounter,
        "mount -t tmpfs tmpfs /down/back && touch /down/back/up",
    )
    .await;
    assert_eq!(back.code, 0, "{back:?}");
    assert!(
        !shared.path().join("down/back/up").exists(),
        "a rslave mount does not travel back to the host"
    );

    // A source on a mount that cannot propagate is refused with its path.
    let mut config = secure(
        busybox.container("refused", SLEEP),
        LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        },
    );
    config.mounts = vec![mount_of(
        private.path(),
        "/both",
        MountPropagation::PropagationBidirectional,
    )];
    let error = create(node, &pod, config)
        .await
        .expect_err("a private source");
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(
        error
            .message()
            .contains(&private.path().display().to_string())
            && error.message().contains("shared"),
        "{}",
        error.message()
    );
    remove_pods(node, &[&pod]).await;
    busybox.node.stop();
}
