//! Hostile images, pulled through the CRI socket from a real registry: layers that
//! try to reach the host through symlinks, hard links and paths, that carry setuid
//! binaries, device nodes and overlayfs's own attributes, decompression bombs, and
//! images of more layers than one mount's options used to hold. Each is refused with
//! the right code, or accepted with nothing outside its layer changed and nothing
//! reachable by an unprivileged host user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_cri::v1::*;
use tar::EntryType as Kind;
use tonic::Code;
use trellis_integration::cri::{
    Pod, create, exec, host_network_pod, pull, remove_pods, run_pod, shell, start,
};
use trellis_integration::registry::{
    BuiltLayer, Compression, Entry, RawEntry, Registry, busybox_layer, image, layer, layer_of_tar,
    raw_layer,
};
use trellis_integration::{Node, NodeOptions};

/// A node and the registry it pulls hostile images from.
struct Scene {
    node: Node,
    registry: Registry,
    dir: tempfile::TempDir,
}

impl Scene {
    async fn start(extra_config: &str) -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = Registry::start(dir.path(), None);
        let node = Node::start(NodeOptions {
            extra_config: extra_config.to_string(),
            ..Default::default()
        })
        .await;
        Scene {
            node,
            registry,
            dir,
        }
    }

    /// Pushes busybox plus `layers` as `tests/<name>:1` and pulls it through the CRI.
    async fn pull(&self, name: &str, layers: Vec<BuiltLayer>) -> Result<String, tonic::Status> {
        pull(&self.node, &self.push(name, layers).await).await
    }

    async fn push(&self, name: &str, layers: Vec<BuiltLayer>) -> String {
        let mut all = vec![busybox_layer()];
        all.extend(layers);
        self.registry
            .push(
                &format!("tests/{name}"),
                "1",
                &image(all, &["/bin/sleep", "3600"], "amd64", false),
            )
            .await;
        format!("{}/tests/{name}:1", self.registry.address)
    }

    /// A path on the host, outside the node, that layers aim at.
    fn host(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state(&self) -> PathBuf {
        self.node.root().join("state")
    }

    /// Whatever an import left half-done: `tmp-` directories in the layer store.
    fn temporary_layers(&self) -> Vec<String> {
        self.node
            .layer_dirs()
            .into_iter()
            .filter(|name| name.starts_with("tmp-"))
            .collect()
    }

    async fn pod(&self, name: &str) -> Pod {
        run_pod(&self.node, host_network_pod(name, false)).await
    }

    fn stop(self) {
        self.node.stop();
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// A host file or directory with `mode`, to be aimed at.
fn victim(path: &Path, dir: bool, mode: u32) -> String {
    if dir {
        std::fs::create_dir(path).expect("host dir");
    } else {
        std::fs::write(path, b"host content").expect("host file");
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.display().to_string()
}

/// A container of a pulled test image, running the image's own command (a sleep).
fn sleeper(name: &str, image: String) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs `command` as the unprivileged host user nobody.
fn as_nobody(command: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(command)
        .output()
        .expect("setpriv (util-linux)")
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_of_entries_never_reaches_through_symlinks_whatever_the_order() {
    let scene = Scene::start("").await;
    let (dir_first, file_first) = (
        victim(&scene.host("dir-first"), true, 0o700),
        victim(&scene.host("file-first"), false, 0o600),
    );
    let (dir_later, file_later) = (
        victim(&scene.host("dir-later"), true, 0o700),
        victim(&scene.host("file-later"), false, 0o600),
    );
    let device_later = victim(&scene.host("device-later"), false, 0o600);
    let directory_then_symlink = raw_layer(
        &[
            RawEntry::new(Kind::Directory, "d/").mode(0o777),
            RawEntry::new(Kind::Symlink, "d").link(&dir_first),
            RawEntry::new(Kind::Directory, "f/").mode(0o6777),
            RawEntry::new(Kind::Symlink, "f").link(&file_first),
        ],
        Compression::Gzip,
    );
    let symlink_then_entry = raw_layer(
        &[
            RawEntry::new(Kind::Symlink, "s").link(&dir_later),
            RawEntry::new(Kind::Directory, "s/").mode(0o777),
            RawEntry::new(Kind::Symlink, "g").link(&file_later),
            RawEntry::new(Kind::Regular, "g")
                .data(b"layer")
                .mode(0o6777),
            RawEntry::new(Kind::Symlink, "c").link(&device_later),
            RawEntry::new(Kind::Char, "c").device(1, 3).mode(0o666),
        ],
        Compression::Zstd,
    );
    scene
        .pull("symlinks", vec![directory_then_symlink, symlink_then_entry])
        .await
        .expect("a layer may replace its own entries");
    for (path, mode) in [
        ("dir-first", 0o700),
        ("file-first", 0o600),
        ("dir-later", 0o700),
        ("file-later", 0o600),
        ("device-later", 0o600),
    ] {
        assert_eq!(
            mode_of(&scene.host(path)),
            mode,
            "host {path} kept its mode"
        );
    }
    for file in ["file-first", "file-later", "device-later"] {
        assert_eq!(
            std::fs::read(scene.host(file)).expect("host file"),
            b"host content",
            "host {file} kept its content"
        );
    }
    assert_eq!(
        std::fs::metadata(scene.host("file-later"))
            .expect("host")
            .nlink(),
        1
    );
    scene.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_reaching_out_of_themselves_are_refused_as_invalid() {
    let scene = Scene::start("").await;
    let cases: Vec<(&str, Vec<RawEntry>, &str)> = vec![
        (
            "parent",
            vec![RawEntry::new(Kind::Regular, "../escape").data(b"x")],
            "path contains `..`",
        ),
        (
            "absolute",
            vec![RawEntry::new(Kind::Regular, "/escape").data(b"x")],
            "absolute path",
        ),
        (
            "through-symlink",
            vec![
                RawEntry::new(Kind::Symlink, "out").link("/"),
                RawEntry::new(Kind::Regular, "out/escape").data(b"x"),
            ],
            "writes through the symlink `out`",
        ),
        (
            "hardlink-absolute",
            vec![RawEntry::new(Kind::Link, "shadow").link("/etc/shadow")],
            "hard link to the absolute path",
        ),
        (
            "hardlink-parent",
            vec![RawEntry::new(Kind::Link, "shadow").link("../../../../etc/shadow")],
            "leaves the layer",
        ),
        (
            "hardlink-through-symlink",
            vec![
                RawEntry::new(Kind::Symlink, "etc").link("/etc"),
                RawEntry::new(Kind::Link, "shadow").link("etc/shadow"),
            ],
            "not in this layer",
        ),
    ];
    for (name, entries, reason) in cases {
        let refused = scene
            .pull(name, vec![raw_layer(&entries, Compression::Gzip)])
            .await
            .expect_err(name);
        assert_eq!(refused.code(), Code::InvalidArgument, "{name}: {refused:?}");
        assert!(
            refused.message().contains(reason),
            "{name}: `{}` should say {reason}",
            refused.message()
        );
    }
    for escaped in [
        Path::new("/escape").to_path_buf(),
        scene.state().join("storage/escape"),
        scene.state().join("storage/layers/escape"),
    ] {
        assert!(!escaped.exists(), "{} was written", escaped.display());
    }
    assert!(
        scene.temporary_layers().is_empty(),
        "refused layers leave nothing: {:?}",
        scene.temporary_layers()
    );
    scene.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn setuid_files_and_devices_of_images_and_containers_are_out_of_reach_of_host_users() {
    let scene = Scene::start("").await;
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let privileged = raw_layer(
        &[
            RawEntry::new(Kind::Directory, "opt/"),
            RawEntry::new(Kind::Regular, "opt/suid")
                .data(&busybox)
                .mode(0o4755),
            RawEntry::new(Kind::Char, "opt/null")
                .device(1, 3)
                .mode(0o666),
        ],
        Compression::Gzip,
    );
    let layer_hex = privileged.diff_id.trim_start_matches("sha256:").to_string();
    let reference = scene
        .pull("setuid", vec![privileged])
        .await
        .expect("setuid files and devices are allowed in images");
    let pod = scene.pod("setuid").await;
    let config = sleeper("planter", reference);
    let container = start(&scene.node, &pod, config).await;
    let planted = shell(
        &scene.node,
        &container,
        "cp /bin/busybox /planted && chmod 4755 /planted && ls -l /planted /opt/suid",
    )
    .await;
    assert_eq!(planted.code, 0, "{planted:?}");

    let layer_dir = scene.state().join("storage/layers").join(&layer_hex);
    let container_dir = scene.state().join("storage/containers").join(&container);
    let targets = [
        layer_dir.join("opt/suid"),
        layer_dir.join("opt/null"),
        container_dir.join("upper/planted"),
        container_dir.join("merged/planted"),
        container_dir.join("merged/opt/suid"),
    ];
    for target in &targets {
        assert!(
            std::fs::symlink_metadata(target).is_ok(),
            "{} is there for root",
            target.display()
        );
    }
    // The same tools work for nobody elsewhere: what stops them below is the path.
    assert!(
        as_nobody(&["/bin/busybox", "true"]).status.success(),
        "setpriv runs commands as nobody"
    );
    for target in &targets {
        let path = target.display().to_string();
        let ran = as_nobody(&[&path, "id", "-u"]);
        assert!(
            !ran.status.success(),
            "nobody ran {path}: {}",
            String::from_utf8_lossy(&ran.stdout)
        );
        let read = as_nobody(&["/bin/busybox", "head", "-c", "1", &path]);
        assert!(!read.status.success(), "nobody read {path}");
        assert!(
            String::from_utf8_lossy(&read.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&read.stderr)
        );
    }
    for dir in [
        scene.state(),
        scene.state().join("storage/layers"),
        scene.state().join("storage/containers"),
    ] {
        assert_eq!(mode_of(&dir), 0o700, "{} is root's only", dir.display());
    }
    remove_pods(&scene.node, &[&pod]).await;
    scene.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn overlay_attributes_from_layers_are_dropped_and_file_capabilities_kept() {
    let scene = Scene::start("").await;
    // CAP_NET_BIND_SERVICE, permitted and effective (a v2 capability set).
    let capability: &[u8] = &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let attributes = raw_layer(
        &[
            RawEntry::new(Kind::Directory, "r/").xattr("trusted.overlay.redirect", b"/bin"),
            RawEntry::new(Kind::Directory, "bin/").xattr("trusted.overlay.opaque", b"y"),
            RawEntry::new(Kind::Regular, "bind")
                .data(b"#!/bin/sh\n")
                .mode(0o755)
                .xattr("security.capability", capability),
        ],
        Compression::Gzip,
    );
    let hex = attributes.diff_id.trim_start_matches("sha256:").to_string();
    let reference = scene
        .pull("attributes", vec![attributes])
        .await
        .expect("pull");
    let layer_dir = scene.state().join("storage/layers").join(&hex);
    assert_eq!(
        xattr::get(layer_dir.join("r"), "trusted.overlay.redirect").expect("read"),
        None
    );
    assert_eq!(
        xattr::get(layer_dir.join("bin"), "trusted.overlay.opaque").expect("read"),
        None
    );
    assert_eq!(
        xattr::get(layer_dir.join("bind"), "security.capability")
            .expect("read")
            .as_deref(),
        Some(capability)
    );

    let pod = scene.pod("attributes").await;
    let config = sleeper("reader", reference);
    let container = start(&scene.node, &pod, config).await;
    let redirected = exec(&scene.node, &container, &["/bin/ls", "-A", "/r"]).await;
    assert_eq!(
        (redirected.code, redirected.stdout.trim()),
        (0, ""),
        "/r is the layer's empty directory, not /bin"
    );
    let lower_bin = exec(&scene.node, &container, &["/bin/ls", "/bin/busybox"]).await;
    assert_eq!(
        lower_bin.code, 0,
        "/bin of the lower layer stays visible: {lower_bin:?}"
    );
    remove_pods(&scene.node, &[&pod]).await;
    scene.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn fifos_written_by_gnu_tar_unpack() {
    let scene = Scene::start("").await;
    let source = scene.host("fifo-source");
    std::fs::create_dir(&source).expect("dir");
    nix::unistd::mkfifo(
        &source.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .expect("mkfifo");
    let tar = Command::new("tar")
        .args(["--format=gnu", "--owner=0", "--group=0", "-cf", "-", "-C"])
        .arg(&source)
        .arg("pipe")
        .output()
        .expect("GNU tar");
    assert!(
        tar.status.success(),
        "{}",
        String::from_utf8_lossy(&tar.stderr)
    );
    // GNU tar leaves a FIFO's device fields as NULs, which was refused.
    assert_eq!(
        &tar.stdout[329..345],
        &[0u8; 16],
        "the device fields are NULs"
    );
    let reference = scene
        .pull("fifo", vec![layer_of_tar(tar.stdout, Compression::None)])
        .await
        .expect("a FIFO unpacks");
    let pod = scene.pod("fifo").await;
    let config = sleeper("fifo", reference);
    let container = start(&scene.node, &pod, config).await;
    let fifo = shell(&scene.node, &container, "test -p /pipe && ls -l /pipe").await;
    assert_eq!(fifo.code, 0, "{fifo:?}");
    assert!(fifo.stdout.starts_with("prw-r-----"), "{}", fifo.stdout);
    remove_pods(&scene.node, &[&pod]).await;
    scene.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn decompression_bombs_stop_at_the_configured_limit() {
    let scene = Scene::start("[storage]\nmax_layer_bytes = 16777216\n").await;
    // 64 MiB of zeros: about 64 KB once compressed.
    let bomb = layer(
        &[Entry::File("zeros", vec![0; 64 << 20])],
        Compression::Gzip,
    );
    assert!(
        bomb.blob.len() < 1 << 20,
        "a small blob: {} bytes",
        bomb.blob.len()
    );
    let digest = bomb.digest();
    let refused = scene
        .pull("bomb", vec![bomb])
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains(&digest)
            && refused.message().contains("storage.max_layer_bytes"),
        "names the layer and the limit: {}",
        refused.message()
    );
    assert!(
        scene.temporary_layers().is_empty(),
        "the partial layer is gone: {:?}",
        scene.temporary_layers()
    );
    let used = Command::new("du")
        .args(["-sb"])
        .arg(scene.state().join("storage/layers"))
        .output()
        .expect("du");
    let bytes: u64 = String::from_utf8_lossy(&used.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        bytes < 24 << 20,
        "the layer store holds {bytes} bytes after the refusal"
    );
    scene
        .pull(
            "fine",
            vec![layer(
                &[Entry::File("small", vec![1; 1024])],
                Compression::Gzip,
            )],
        )
        .await
        .expect("the next pull is served");
    scene.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_of_128_layers_starts() {
    let scene = Scene::start("").await;
    let layers: Vec<BuiltLayer> = (1..128)
        .map(|n| {
            layer(
                &[Entry::File(
                    Box::leak(format!("layer-{n:03}").into_boxed_str()),
                    vec![b'x'; n],
                )],
                Compression::Gzip,
            )
        })
        .collect();
    let reference = scene.pull("tall", layers).await.expect("pull 128 layers");
    let pod = scene.pod("tall").await;
    let config = sleeper("tall", reference);
    let container = create(&scene.node, &pod, config)
        .await
        .expect("CreateContainer of 128 layers");
    scene
        .node
        .runtime()
        .start_container(StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .expect("StartContainer");
    let listed = shell(
        &scene.node,
        &container,
        "ls / | grep -c '^layer-' && cat /layer-127 | wc -c",
    )
    .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert_eq!(
        listed.stdout.split_whitespace().collect::<Vec<_>>(),
        ["127", "127"],
        "every layer is in the root filesystem"
    );
    remove_pods(&scene.node, &[&pod]).await;
    scene.stop();
}
