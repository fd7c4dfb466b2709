//! A real registry (Debian's docker-registry, the CNCF distribution server) on a free
//! loopback port with its own storage, and small OCI images built by the tests
//! themselves, pushed to it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
pub use trellis_test_tar::RawEntry;

pub struct Registry {
    pub address: String,
    root: PathBuf,
    child: Option<Child>,
    auth: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry storing under `dir`; with `auth`, it requires HTTP basic
    /// authentication (htpasswd).
    pub fn start(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        let root = dir.join("registry");
        std::fs::create_dir_all(&root).expect("registry dir");
        let auth_config = auth.map(|(user, password)| {
            let hash = bcrypt::hash(password, 4).expect("bcrypt");
            std::fs::write(root.join("htpasswd"), format!("{user}:{hash}\n")).expect("htpasswd");
            format!(
                "auth:\n  htpasswd:\n    realm: trellis-test\n    path: {}\n",
                root.join("htpasswd").display()
            )
        });
        Self::serve(
            root,
            auth_config.unwrap_or_default(),
            auth.map(|(u, p)| (u.to_string(), p.to_string())),
        )
    }

    /// Starts a registry storing under `dir` that sends clients for a bearer token to
    /// `realm` (docker's token authentication). It trusts a throwaway certificate, so
    /// no token is ever good: the tests use it to reach what the realm answers.
    pub fn start_token_auth(dir: &Path, realm: &str) -> Registry {
        let root = dir.join("registry");
        std::fs::create_dir_all(&root).expect("registry dir");
        let certificates = crate::pki::Pki::new(&root.join("token-pki"));
        let auth_config = format!(
            "auth:\n  token:\n    realm: {realm}\n    service: trellis-test\n    issuer: trellis-test\n    rootcertbundle: {}\n",
            certificates.ca_file.display()
        );
        Self::serve(root, auth_config, None)
    }

    fn serve(root: PathBuf, auth_config: String, auth: Option<(String, String)>) -> Registry {
        std::fs::create_dir_all(root.join("data")).expect("registry dir");
        let address = format!("127.0.0.1:{}", crate::free_port());
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}\nhealth:\n  storagedriver:\n    enabled: false\n{auth_config}",
            root.join("data").display()
        );
        std::fs::write(root.join("config.yml"), config).expect("registry config");
        let log = std::fs::File::create(root.join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(root.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry is not installed (apt-get install docker-registry)");
        let registry = Registry {
            address,
            root,
            child: Some(child),
            auth,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&registry.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        registry
    }

    /// The requests the registry served (its access log lines).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| {
                line.contains("\"GET ")
                    || line.contains("\"HEAD ")
                    || line.contains("\"PUT ")
                    || line.contains("\"POST ")
            })
            .map(str::to_string)
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("registry.log")).unwrap_or_default()
    }

    /// How many times a blob was downloaded (GET requests in the access log).
    pub fn blob_downloads(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP");
        self.log()
            .lines()
            .filter(|line| line.contains("\"GET ") && line.contains(&needle))
            .count()
    }

    /// Where the registry keeps a blob's bytes, so a test can corrupt them.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.root
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn client(&self) -> Client {
        crate::install_tls_provider();
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(vec![self.address.clone()]),
            ..Default::default()
        })
    }

    fn auth(&self) -> RegistryAuth {
        match &self.auth {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Pushes an image as `repository:tag`; returns its manifest digest.
    pub async fn push(&self, repository: &str, tag: &str, image: &BuiltImage) -> String {
        let reference = Reference::with_tag(
            self.address.clone(),
            repository.to_string(),
            tag.to_string(),
        );
        let client = self.client();
        client
            .store_auth_if_needed(&self.address, &self.auth())
            .await;
        client
            .auth(
                &reference,
                &self.auth(),
                oci_client::RegistryOperation::Push,
            )
            .await
            .expect("registry auth");
        for blob in image
            .layers
            .iter()
            .map(|l| &l.blob)
            .chain(std::iter::once(&image.config))
        {
            client
                .push_blob(&reference, blob.clone(), &sha256(blob))
                .await
                .expect("push blob");
        }
        self.push_manifest(
            &client,
            &reference,
            &image.manifest,
            &image.manifest_media_type,
        )
        .await
    }

    /// Pushes an index of already pushed manifests as `repository:tag`.
    pub async fn push_index(
        &self,
        repository: &str,
        tag: &str,
        entries: &[(&BuiltImage, &str)],
    ) -> String {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(image, arch)| {
                serde_json::json!({
                    "mediaType": image.manifest_media_type,
                    "digest": sha256(&image.manifest),
                    "size": image.manifest.len(),
                    "platform": {"architecture": arch, "os": "linux"},
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .expect("index json");
        let reference = Reference::with_tag(
            self.address.clone(),
            repository.to_string(),
            tag.to_string(),
        );
        let client = self.client();
        client
            .auth(
                &reference,
                &self.auth(),
                oci_client::RegistryOperation::Push,
            )
            .await
            .expect("registry auth");
        self.push_manifest(
            &client,
            &reference,
            &index,
            "application/vnd.oci.image.index.v1+json",
        )
        .await
    }

    async fn push_manifest(
        &self,
        client: &Client,
        reference: &Reference,
        manifest: &[u8],
        media_type: &str,
    ) -> String {
        let content_type = http::HeaderValue::from_str(media_type).expect("media type");
        client
            .push_manifest_raw(reference, manifest.to_vec(), content_type)
            .await
            .expect("push manifest");
        sha256(manifest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One tar entry of a test layer.
#[derive(Clone, Debug)]
pub enum Entry {
    Dir(&'static str),
    File(&'static str, Vec<u8>),
    Symlink(&'static str, &'static str),
    HardLink(&'static str, &'static str),
    /// `.wh.<name>` in the named directory, hiding `<name>` from lower layers.
    Whiteout(&'static str),
    /// `.wh..wh..opq` in the named directory, hiding all of it from lower layers.
    Opaque(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

pub struct BuiltLayer {
    pub blob: Vec<u8>,
    pub diff_id: String,
    pub media_type: &'static str,
}

impl BuiltLayer {
    pub fn digest(&self) -> String {
        sha256(&self.blob)
    }
}

pub struct BuiltImage {
    pub layers: Vec<BuiltLayer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub manifest_media_type: String,
}

impl BuiltImage {
    /// The image id Trellis reports: the config digest.
    pub fn id(&self) -> String {
        sha256(&self.config)
    }
}

/// A layer of raw entries.
pub fn raw_layer(entries: &[RawEntry], compression: Compression) -> BuiltLayer {
    layer_of_tar(trellis_test_tar::tar_of(entries).expect("tar"), compression)
}

pub fn layer(entries: &[Entry], compression: Compression) -> BuiltLayer {
    use tar::EntryType as Kind;
    let raw: Vec<RawEntry> = entries
        .iter()
        .map(|entry| match entry {
            Entry::Dir(path) => RawEntry::new(Kind::Directory, &format!("{path}/")),
            Entry::File(path, data) => RawEntry::new(Kind::Regular, path).data(data).mode(0o755),
            Entry::Symlink(path, target) => {
                RawEntry::new(Kind::Symlink, path).link(target).mode(0o777)
            }
            Entry::HardLink(path, target) => RawEntry::new(Kind::Link, path).link(target),
            Entry::Whiteout(path) => {
                let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
                let whiteout = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                RawEntry::new(Kind::Regular, &whiteout)
            }
            Entry::Opaque(dir) => RawEntry::new(Kind::Regular, &format!("{dir}/.wh..wh..opq")),
        })
        .collect();
    raw_layer(&raw, compression)
}

/// A layer of an uncompressed tar stream as given (from GNU tar, say).
pub fn layer_of_tar(tar: Vec<u8>, compression: Compression) -> BuiltLayer {
    let diff_id = sha256(&tar);
    let (blob, media_type) = match compression {
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(&tar).expect("gzip");
            (
                encoder.finish().expect("gzip"),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => (
            ruzstd::encoding::compress_to_vec(
                tar.as_slice(),
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
    };
    BuiltLayer {
        blob,
        diff_id,
        media_type,
    }
}

/// Busybox (Debian's busybox-static) with a few applets, as a base layer.
pub fn busybox_layer() -> BuiltLayer {
    let busybox = std::fs::read("/bin/busybox")
        .expect("busybox-static is not installed (apt-get install busybox-static)");
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::File("bin/busybox", busybox),
        Entry::Dir("etc"),
        Entry::Dir("tmp"),
    ];
    for applet in [
        "sh", "echo", "cat", "ls", "sleep", "true", "false", "id", "env", "hostname", "ps",
        "touch", "mkdir", "rm", "head", "tail", "tr", "dd", "grep", "wc", "cut", "sed", "yes",
        "mount", "ip", "nc", "stty",
    ] {
        entries.push(Entry::Symlink(
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            "busybox",
        ));
    }
    entries.push(Entry::File(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
    ));
    entries.push(Entry::File(
        "etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    ));
    layer(&entries, Compression::Gzip)
}

/// An image of the given layers with a config naming `cmd`; OCI media types, or
/// Docker schema 2 ones when `docker` is set.
pub fn image(
    layers: Vec<BuiltLayer>,
    cmd: &[&str],
    architecture: &str,
    docker: bool,
) -> BuiltImage {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/", "User": "0"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .expect("config json");
    let (manifest_type, config_type) = if docker {
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
        )
    } else {
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
        )
    };
    let layer_descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let media_type = if docker && l.media_type.ends_with("gzip") {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            } else {
                l.media_type
            };
            serde_json::json!({"mediaType": media_type, "digest": l.digest(), "size": l.blob.len()})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": sha256(&config), "size": config.len()},
        "layers": layer_descriptors,
    }))
    .expect("manifest json");
    BuiltImage {
        layers,
        config,
        manifest,
        manifest_media_type: manifest_type.to_string(),
    }
}

/// busybox and one small layer with a file named after `marker`, so each test
/// pulls an image of its own.
pub fn small_image(marker: &'static str) -> BuiltImage {
    image(
        vec![
            busybox_layer(),
            layer(
                &[Entry::File(marker, marker.as_bytes().to_vec())],
                Compression::Gzip,
            ),
        ],
        &["/bin/sh"],
        "amd64",
        false,
    )
}
