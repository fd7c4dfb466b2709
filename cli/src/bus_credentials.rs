//! `trellis bus-credentials`: a node's credentials for a bus run outside `trellis up`
//! (the systemd units' trellis-nats, or a shared NATS).
//!
//! The same users and permissions as the private bus of `trellis up`, written once
//! for an operator to install: a seed file per service (each service is pointed at
//! its own with `TRELLIS_BUS_NKEY_SEED_FILE`) and a nats-server configuration holding
//! the public keys; for a server shared by several nodes, the `users` of each node's
//! file go into one server configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use trellis_common::bus::server_config::{ServerConfig, ServerTls};
use trellis_common::config::{Config, ServiceKind};
use trellis_common::dirs::ensure_private_dir;

use crate::output::outln;
use crate::private_bus::{SERVER_CONFIG_FILE, seed_file, write_credentials};
use crate::up::UpError;

#[derive(Debug, Clone, clap::Args)]
pub struct BusCredentialsArgs {
    /// Directory for the seeds and the server configuration (made 0700).
    #[arg(long, default_value = "/etc/trellis/bus")]
    dir: PathBuf,
    /// Where the nats-server listens.
    #[arg(long, default_value = "127.0.0.1:4222")]
    listen: SocketAddr,
    /// JetStream's store [default: <node.state_dir>/nats].
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// The server's TLS certificate (PEM); with --tls-key, clients must use TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server's TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A CA to verify client certificates by: clients must then present one.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Replace credentials already in --dir (the node's services and the server must
    /// then be restarted to use the new ones).
    #[arg(long)]
    force: bool,
}

pub fn run(args: &BusCredentialsArgs, config: &Config) -> Result<(), UpError> {
    let conf = args.dir.join(SERVER_CONFIG_FILE);
    if conf.exists() && !args.force {
        return Err(UpError::Credentials(format!(
            "{} exists: the node's services may be using these credentials (--force replaces them)",
            conf.display()
        )));
    }
    ensure_private_dir(&args.dir).map_err(|source| UpError::CreateDir {
        path: args.dir.clone(),
        source,
    })?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert_file), Some(key_file)) => Some(ServerTls {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            client_ca_file: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    let store_dir = args
        .store_dir
        .clone()
        .unwrap_or_else(|| config.node.state_dir.join("nats"));
    let node = config.node_name();
    let conf = write_credentials(
        &args.dir,
        &node,
        &config.bus.stream,
        ServerConfig {
            listen: args.listen,
            store_dir,
            users: Vec::new(),
            tls,
        },
    )?;
    outln!(
        "wrote {} (node {node}, stream {}): start nats-server with -c {}",
        conf.display(),
        config.bus.stream,
        conf.display()
    );
    for kind in ServiceKind::START_ORDER {
        outln!(
            "  {:<8} TRELLIS_BUS_NKEY_SEED_FILE={}",
            kind.name(),
            seed_file(&args.dir, kind).display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BusCredentialsArgs,
    }

    #[test]
    fn writes_private_credentials_nats_server_accepts_and_keeps_them_without_force() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("bus");
        let mut config = Config::default();
        config.node.name = "n1".into();
        config.node.state_dir = root.path().join("state");
        let parse = |extra: &[&str]| {
            Cli::parse_from([&["test", "--dir", dir.to_str().expect("utf-8")], extra].concat()).args
        };
        run(&parse(&[]), &config).expect("write");
        assert_eq!(
            std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o7777,
            0o700
        );
        let seed = std::fs::read_to_string(seed_file(&dir, ServiceKind::Gateway)).expect("seed");
        for entry in std::fs::read_dir(&dir).expect("list") {
            let path = entry.expect("entry").path();
            assert_eq!(
                std::fs::metadata(&path).expect("meta").permissions().mode() & 0o7777,
                0o600,
                "{}",
                path.display()
            );
        }
        let conf = dir.join(SERVER_CONFIG_FILE);
        let text = std::fs::read_to_string(&conf).expect("conf");
        assert!(
            text.contains("listen: \"127.0.0.1:4222\"")
                && text.contains("trellis.n1.events.>")
                && !text.contains(seed.trim()),
            "{text}"
        );
        let program = trellis_common::grpc::find_executable("nats-server")
            .expect("nats-server is not installed");
        let check = std::process::Command::new(program)
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .output()
            .expect("nats-server -t");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );

        let error = run(&parse(&[]), &config)
            .expect_err("credentials in use are kept")
            .to_string();
        assert!(error.contains("--force"), "{error}");
        assert_eq!(
            std::fs::read_to_string(seed_file(&dir, ServiceKind::Gateway)).expect("seed"),
            seed
        );
        run(&parse(&["--force", "--listen", "127.0.0.1:4333"]), &config).expect("replace");
        assert_ne!(
            std::fs::read_to_string(seed_file(&dir, ServiceKind::Gateway)).expect("seed"),
            seed
        );
    }
}
