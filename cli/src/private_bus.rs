//! The private bus of `trellis up`: a nats-server that takes this node's services and
//! nobody else.
//!
//! It listens on loopback, where every local user can reach it, so it authenticates:
//! at every start each service gets a fresh nkey user, its seed in a file of its own
//! (0600, in the 0700 `<state_dir>/bus/`), and the server's configuration (0600 too)
//! holds the public keys with each user's permissions (`trellis_common::bus::permissions`).
//! A service learns its seed file's path from its environment: secrets never go on a
//! command line, which every local user can read in /proc.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;
use trellis_common::bus::permissions;
use trellis_common::bus::server_config::{NatsUser, ServerConfig};
use trellis_common::config::{Config, ServiceKind};
use trellis_common::dirs::{ensure_private_dir, try_lock_file, write_private_file};
use trellis_common::grpc::find_executable;

use crate::child::ChildSpec;
use crate::up::UpError;

/// The variable naming a service's seed file (the configuration key `bus.nkey_seed_file`).
const SEED_FILE_ENV: &str = "TRELLIS_BUS_NKEY_SEED_FILE";
const URL_ENV: &str = "TRELLIS_BUS_URL";
pub const SERVER_CONFIG_FILE: &str = "nats-server.conf";

pub struct PrivateBus {
    pub spec: ChildSpec,
    pub address: SocketAddr,
    dir: PathBuf,
    /// Held while the node runs: a second `trellis up` over the same state directory
    /// would otherwise replace the seeds of the services already running.
    _lock: Flock<std::fs::File>,
}

impl PrivateBus {
    /// Makes the credentials and the server configuration; the server is not started.
    pub fn prepare(config: &Config) -> Result<PrivateBus, UpError> {
        let program =
            find_executable(&config.bus.nats_server).ok_or_else(|| UpError::MissingProgram {
                program: config.bus.nats_server.clone(),
                hint: " (apt-get install nats-server, or set bus.url to a NATS server)".into(),
            })?;
        let address = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(UpError::Port)?;
        let dir = config.node.state_dir.join("bus");
        ensure_private_dir(&config.node.state_dir).map_err(|source| UpError::CreateDir {
            path: config.node.state_dir.clone(),
            source,
        })?;
        ensure_private_dir(&dir).map_err(|source| UpError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let lock = lock(&dir.join("lock"))?;
        let store = config.node.state_dir.join("nats");
        std::fs::create_dir_all(&store).map_err(|source| UpError::CreateDir {
            path: store.clone(),
            source,
        })?;

        let conf = write_credentials(
            &dir,
            &config.node_name(),
            &config.bus.stream,
            ServerConfig {
                listen: address,
                store_dir: store,
                users: Vec::new(),
                tls: None,
            },
        )?;
        let args = vec!["-c".to_string(), conf.display().to_string()];
        Ok(PrivateBus {
            spec: ChildSpec {
                name: "nats".into(),
                program,
                args,
                env: Vec::new(),
                listen: None,
            },
            address,
            dir,
            _lock: lock,
        })
    }

    /// What `kind` is started with to reach this bus as its own user.
    pub fn env(&self, kind: ServiceKind) -> Vec<(String, String)> {
        vec![
            (URL_ENV.to_string(), format!("nats://{}", self.address)),
            (
                SEED_FILE_ENV.to_string(),
                seed_file(&self.dir, kind).display().to_string(),
            ),
        ]
    }
}

fn lock(path: &Path) -> Result<Flock<std::fs::File>, UpError> {
    try_lock_file(path)
        .map_err(|source| UpError::WriteFile {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| {
            UpError::Credentials(format!(
                "another `trellis up` runs over this state directory (it holds {})",
                path.display()
            ))
        })
}

/// Writes a fresh nkey seed per service into `dir` (which must be private) and the
/// server configuration `server` with their users added; returns that file's path.
pub fn write_credentials(
    dir: &Path,
    node: &str,
    stream: &str,
    mut server: ServerConfig,
) -> Result<PathBuf, UpError> {
    for kind in ServiceKind::START_ORDER {
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().map_err(|e| {
            UpError::Credentials(format!(
                "cannot encode the nkey seed of {}: {e}",
                kind.name()
            ))
        })?;
        let path = seed_file(dir, kind);
        write_private_file(&path, format!("{seed}\n").as_bytes())
            .map_err(|source| UpError::WriteFile { path, source })?;
        server.users.push(NatsUser {
            public_key: pair.public_key(),
            permissions: permissions::for_service(kind, node, stream),
        });
    }
    let text = server
        .render()
        .map_err(|e| UpError::Credentials(e.to_string()))?;
    let conf = dir.join(SERVER_CONFIG_FILE);
    write_private_file(&conf, text.as_bytes()).map_err(|source| UpError::WriteFile {
        path: conf.clone(),
        source,
    })?;
    Ok(conf)
}

pub fn seed_file(dir: &Path, kind: ServiceKind) -> PathBuf {
    dir.join(format!("{}.nk", kind.name()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn credentials_are_private_and_fresh_at_every_start() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.node.state_dir = root.path().join("state");
        config.node.name = "n1".into();
        let first = PrivateBus::prepare(&config).expect("prepare");
        let mode =
            |path: &Path| std::fs::metadata(path).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(mode(&first.dir), 0o700);
        let seed =
            std::fs::read_to_string(seed_file(&first.dir, ServiceKind::Runtime)).expect("seed");
        let conf = std::fs::read_to_string(first.dir.join("nats-server.conf")).expect("conf");
        assert!(
            !conf.contains(seed.trim()),
            "the server configuration holds no seed"
        );
        for entry in std::fs::read_dir(&first.dir).expect("list") {
            let path = entry.expect("entry").path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
        let public = nkeys::KeyPair::from_seed(seed.trim())
            .expect("a user seed")
            .public_key();
        assert!(
            conf.contains(&public) && conf.contains(&format!("listen: \"{}\"", first.address)),
            "{conf}"
        );
        let env = first.env(ServiceKind::Runtime);
        assert!(
            env.iter()
                .any(|(k, v)| k == SEED_FILE_ENV && v.ends_with("bus/runtime.nk")),
            "{env:?}"
        );
        assert!(
            first.spec.args.iter().all(|arg| !arg.contains(seed.trim())),
            "no secret in argv"
        );

        let refused = PrivateBus::prepare(&config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            refused.contains("another `trellis up`"),
            "a second node over the same state is refused: {refused}"
        );
        assert_eq!(
            std::fs::read_to_string(seed_file(&first.dir, ServiceKind::Runtime)).expect("seed"),
            seed,
            "and leaves the seeds alone"
        );
        drop(first);
        let second = PrivateBus::prepare(&config).expect("prepare again");
        assert_ne!(
            std::fs::read_to_string(seed_file(&second.dir, ServiceKind::Runtime)).expect("seed"),
            seed,
            "a new seed at every start"
        );
    }
}
