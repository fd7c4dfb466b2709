use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use super::*;

use trellis_test_tar::{RawEntry, header};

fn item(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> RawEntry {
    let entry = RawEntry::new(kind, name).data(data);
    match link {
        Some(target) => entry.link(target),
        None => entry,
    }
}

fn archive(entries: &[RawEntry]) -> Vec<u8> {
    trellis_test_tar::tar_of(entries).expect("tar")
}

/// A temporary directory with `layer/` to unpack into and `host/` standing for the
/// host outside it.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("layer")).expect("mkdir layer");
        std::fs::create_dir(dir.path().join("host")).expect("mkdir host");
        Scene { dir }
    }

    fn layer(&self) -> PathBuf {
        self.dir.path().join("layer")
    }

    fn host(&self, name: &str) -> PathBuf {
        self.dir.path().join("host").join(name)
    }

    fn unpack(&self, entries: &[RawEntry]) -> Result<u64, ExtractError> {
        unpack(archive(entries).as_slice(), &self.layer())
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("metadata").mode() & 0o7777
}

#[test]
fn regular_layer_with_links_and_whiteouts() {
    use tar::EntryType::*;
    let scene = Scene::new();
    let result = scene.unpack(&[
        item("/", Directory, None, b""),
        item("etc/", Directory, None, b""),
        item("etc/hostname", Regular, None, b"box\n"),
        item("etc/alias", Link, Some("etc/hostname"), b""),
        item("bin/sh", Symlink, Some("/bin/busybox"), b""),
        item("var/.wh.cache", Regular, None, b""),
        item("opt/.wh..wh..opq", Regular, None, b""),
    ]);
    assert_eq!(result.expect("unpacks"), 4);
    let layer = scene.layer();
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/hostname")).expect("file"),
        "box\n"
    );
    assert_eq!(
        std::fs::metadata(layer.join("etc/alias"))
            .expect("link")
            .ino(),
        std::fs::metadata(layer.join("etc/hostname"))
            .expect("file")
            .ino()
    );
    assert_eq!(
        std::fs::read_link(layer.join("bin/sh")).expect("symlink"),
        PathBuf::from("/bin/busybox")
    );
    let whiteout = std::fs::symlink_metadata(layer.join("var/cache")).expect("whiteout");
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    assert_eq!(
        xattr::get(layer.join("opt"), OPAQUE_XATTR).expect("xattr"),
        Some(b"y".to_vec())
    );
    assert_eq!(mode_of(&layer.join("etc")), 0o755);
    assert_eq!(
        std::fs::metadata(layer.join("etc")).expect("dir").mtime(),
        1_700_000_000
    );
}

#[test]
fn a_stream_without_its_trailer_still_unpacks_but_a_cut_file_does_not() {
    let full = archive(&[
        item("a", tar::EntryType::Regular, None, b"12345"),
        item("b", tar::EntryType::Regular, None, b"678"),
    ]);
    // Headers and data of both entries, no padding after b, no trailer.
    let without_trailer = &full[..512 + 512 + 512 + 3];
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(unpack(without_trailer, dir.path()).expect("accepted"), 8);
    assert_eq!(std::fs::read(dir.path().join("b")).expect("b"), b"678");
    let cut_inside = &full[..512 + 512 + 512 + 2];
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(
        unpack(cut_inside, dir.path()).is_err(),
        "a file cut short is an error"
    );
}

#[test]
fn hostile_entries_are_refused_by_name() {
    use tar::EntryType::*;
    let cases: Vec<(Vec<RawEntry>, &str)> = vec![
        (vec![item("../escape", Regular, None, b"x")], "`..`"),
        (
            vec![item("/etc/evil", Regular, None, b"x")],
            "absolute path",
        ),
        (
            vec![
                item("link", Symlink, Some("/etc"), b""),
                item("link/passwd", Regular, None, b"x"),
            ],
            "writes through the symlink `link`",
        ),
        (
            vec![
                item("link", Symlink, Some("/etc"), b""),
                item("link/.wh.passwd", Regular, None, b""),
            ],
            "writes through the symlink `link`",
        ),
        (
            vec![
                item("link", Symlink, Some("/etc"), b""),
                item("link/.wh..wh..opq", Regular, None, b""),
            ],
            "writes through the symlink `link`",
        ),
        (
            vec![
                item("file", Regular, None, b"x"),
                item("file/inner", Regular, None, b"x"),
            ],
            "is not a directory",
        ),
        (
            vec![item("passwd", Link, Some("/etc/passwd"), b"")],
            "hard link to the absolute path `/etc/passwd`",
        ),
        (
            vec![item("passwd", Link, Some("../../etc/passwd"), b"")],
            "leaves the layer",
        ),
        (
            vec![
                item("link", Symlink, Some("/etc"), b""),
                item("passwd", Link, Some("link/passwd"), b""),
            ],
            "not in this layer",
        ),
        (
            vec![
                item("dir/", Directory, None, b""),
                item("alias", Link, Some("dir"), b""),
            ],
            "hard link to a directory",
        ),
    ];
    for (entries, expected) in cases {
        let scene = Scene::new();
        let message = scene
            .unpack(&entries)
            .expect_err("must be refused")
            .to_string();
        assert!(
            message.contains(expected),
            "{message} should say {expected}"
        );
        assert!(
            !scene.dir.path().join("escape").exists() && !scene.dir.path().join("etc").exists(),
            "nothing written outside"
        );
    }
}

/// The finding of the security review: `d/` (0777) then `d -> <host dir>`, and the
/// saved directory mode landed on the host directory at the end of the unpack.
#[test]
fn deferred_directory_modes_never_reach_through_a_later_symlink() {
    use tar::EntryType::*;
    for target_is_file in [false, true] {
        let scene = Scene::new();
        let target = scene.host("victim");
        if target_is_file {
            std::fs::write(&target, b"secret").expect("host file");
        } else {
            std::fs::create_dir(&target).expect("host dir");
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let target_text = target.display().to_string();
        let dir = item("d/", Directory, None, b"").mode(0o6777);
        scene
            .unpack(&[dir, item("d", Symlink, Some(&target_text), b"")])
            .expect("a symlink may replace a directory");
        assert_eq!(
            mode_of(&target),
            0o600,
            "the host's {} kept its mode",
            if target_is_file { "file" } else { "directory" }
        );
        assert_eq!(
            std::fs::read_link(scene.layer().join("d")).expect("symlink stays"),
            target
        );
    }
}

#[test]
fn entries_after_a_symlink_replace_it_rather_than_follow_it() {
    use tar::EntryType::*;
    let scene = Scene::new();
    let host_dir = scene.host("dir");
    std::fs::create_dir(&host_dir).expect("host dir");
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let host_file = scene.host("file");
    std::fs::write(&host_file, b"host").expect("host file");
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (dir_text, file_text) = (
        host_dir.display().to_string(),
        host_file.display().to_string(),
    );
    scene
        .unpack(&[
            item("d", Symlink, Some(&dir_text), b""),
            item("d/", Directory, None, b"").mode(0o777),
            item("f", Symlink, Some(&file_text), b""),
            item("f", Regular, None, b"layer").mode(0o6777),
            item("c", Symlink, Some(&file_text), b""),
            item("c", Char, None, b"").mode(0o666),
        ])
        .expect("unpacks");
    assert_eq!(mode_of(&host_dir), 0o700);
    assert_eq!(mode_of(&host_file), 0o600);
    assert_eq!(std::fs::read(&host_file).expect("host file"), b"host");
    assert!(
        std::fs::symlink_metadata(scene.layer().join("d"))
            .expect("d")
            .is_dir()
    );
    assert_eq!(mode_of(&scene.layer().join("d")), 0o777);
    assert_eq!(
        mode_of(&scene.layer().join("f")),
        0o6777,
        "set-id bits survive the chown"
    );
    assert!(
        std::fs::symlink_metadata(scene.layer().join("c"))
            .expect("c")
            .file_type()
            .is_char_device()
    );
}

#[test]
fn replacing_a_directory_removes_its_tree_without_following_symlinks_in_it() {
    use tar::EntryType::*;
    let scene = Scene::new();
    let host_dir = scene.host("keep");
    std::fs::create_dir(&host_dir).expect("host dir");
    std::fs::write(host_dir.join("precious"), b"x").expect("host file");
    let text = host_dir.display().to_string();
    scene
        .unpack(&[
            item("a/", Directory, None, b""),
            item("a/b/", Directory, None, b""),
            item("a/b/out", Symlink, Some(&text), b""),
            item("a/file", Regular, None, b"x"),
            item("a", Regular, None, b"now a file"),
        ])
        .expect("unpacks");
    assert!(
        host_dir.join("precious").exists(),
        "nothing outside removed"
    );
    assert_eq!(
        std::fs::read(scene.layer().join("a")).expect("a"),
        b"now a file"
    );
}

#[test]
fn trusted_attributes_are_dropped_and_others_kept() {
    use tar::EntryType::*;
    let scene = Scene::new();
    let redirect = item("r/", Directory, None, b"")
        .xattr("trusted.overlay.redirect", b"/bin")
        .xattr("trusted.overlay.opaque", b"y")
        .xattr("user.note", b"kept");
    scene
        .unpack(&[
            redirect,
            item("f", Regular, None, b"x").xattr("user.note", b"file"),
        ])
        .expect("unpacks");
    let dir = scene.layer().join("r");
    assert_eq!(
        xattr::get(&dir, "trusted.overlay.redirect").expect("read"),
        None
    );
    assert_eq!(
        xattr::get(&dir, "trusted.overlay.opaque").expect("read"),
        None
    );
    // tmpfs below 6.6 keeps no user attributes; where kept, they are the layer's.
    if let Ok(Some(value)) = xattr::get(&dir, "user.note") {
        assert_eq!(value, b"kept");
    }
}

#[test]
fn file_capabilities_are_kept() {
    use tar::EntryType::*;
    // A v2 capability set: CAP_NET_BIND_SERVICE permitted and effective.
    let capability: &[u8] = &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let scene = Scene::new();
    let result = scene.unpack(&[item("ping", Regular, None, b"#!/bin/true\n")
        .xattr("security.capability", capability)
        .mode(0o755)]);
    result.expect("unpacks");
    assert_eq!(
        xattr::get(scene.layer().join("ping"), "security.capability")
            .expect("read")
            .as_deref(),
        Some(capability)
    );
}

#[test]
fn fifos_from_gnu_tar_and_devices_unpack() {
    use tar::EntryType::*;
    let scene = Scene::new();
    let mut builder = tar::Builder::new(Vec::new());
    // GNU tar leaves the device fields of a FIFO as NULs.
    let mut fifo = header(Fifo, 0, 0o644);
    fifo.set_path("pipe").expect("name");
    let gnu = fifo.as_gnu_mut().expect("gnu");
    gnu.dev_major = [0; 8];
    gnu.dev_minor = [0; 8];
    fifo.set_cksum();
    builder.append(&fifo, &b""[..]).expect("fifo");
    let mut null = header(Char, 0, 0o666);
    null.set_path("null").expect("name");
    null.set_device_major(1).expect("major");
    null.set_device_minor(3).expect("minor");
    null.set_cksum();
    builder.append(&null, &b""[..]).expect("char");
    unpack(
        builder.into_inner().expect("tar").as_slice(),
        &scene.layer(),
    )
    .expect("unpacks");
    let pipe = std::fs::symlink_metadata(scene.layer().join("pipe")).expect("pipe");
    assert!(pipe.file_type().is_fifo());
    assert_eq!(pipe.mode() & 0o7777, 0o644);
    let device = std::fs::symlink_metadata(scene.layer().join("null")).expect("null");
    assert!(device.file_type().is_char_device());
    assert_eq!(
        (device.rdev(), device.mode() & 0o7777),
        (rustix::fs::makedev(1, 3), 0o666)
    );
}

#[test]
fn hard_links_stay_inside_and_link_symlinks_themselves() {
    use tar::EntryType::*;
    let scene = Scene::new();
    let host = scene.host("target");
    std::fs::write(&host, b"host").expect("host file");
    let text = host.display().to_string();
    scene
        .unpack(&[
            item("s", Symlink, Some(&text), b""),
            item("t", Link, Some("s"), b""),
        ])
        .expect("unpacks");
    let linked = std::fs::symlink_metadata(scene.layer().join("t")).expect("t");
    assert!(
        linked.file_type().is_symlink(),
        "the link is to the symlink, not to the host file"
    );
    assert_eq!(std::fs::metadata(&host).expect("host").nlink(), 1);
}

#[test]
fn overlong_paths_and_impossible_owners_are_refused() {
    let long = "a/".repeat(2100) + "f";
    let scene = Scene::new();
    let mut builder = tar::Builder::new(Vec::new());
    let mut entry = header(tar::EntryType::Regular, 1, 0o644);
    builder
        .append_data(&mut entry, &long, &b"x"[..])
        .expect("long name");
    let message = unpack(
        builder.into_inner().expect("tar").as_slice(),
        &scene.layer(),
    )
    .expect_err("refused")
    .to_string();
    assert!(message.contains("longer than 4096 bytes"), "{message}");
    assert!(
        message.len() < 300,
        "the message quotes only an excerpt: {message}"
    );

    let mut builder = tar::Builder::new(Vec::new());
    let mut entry = header(tar::EntryType::Regular, 1, 0o644);
    entry.set_uid(u64::from(u32::MAX));
    builder
        .append_data(&mut entry, "f", &b"x"[..])
        .expect("entry");
    let message = unpack(
        builder.into_inner().expect("tar").as_slice(),
        &scene.layer(),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        message.contains("uid 4294967295 is out of range"),
        "{message}"
    );
}

#[test]
fn garbage_header_fields_are_quoted_in_short() {
    let scene = Scene::new();
    let mut raw = archive(&[item("f", tar::EntryType::Regular, None, b"x")]);
    // A mode field of high bytes: the tar crate quotes the field back.
    raw[100..108].copy_from_slice(&[0xff; 8]);
    let sum: u32 = raw[..512]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    raw[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let message = unpack(raw.as_slice(), &scene.layer())
        .expect_err("refused")
        .to_string();
    assert!(
        !message.contains('\u{fffd}') || message.len() < 300,
        "{message}"
    );
    assert!(
        message.chars().all(|c| !c.is_control()),
        "no raw control bytes: {message:?}"
    );
}
