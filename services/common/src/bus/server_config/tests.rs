//! Tests of the generated nats-server configuration: nats-server itself accepts it,
//! and it holds public keys and permissions only.
use std::path::Path;

use super::*;
use crate::bus::permissions::for_service;
use crate::config::ServiceKind;

fn node_config(dir: &Path, tls: Option<ServerTls>) -> (ServerConfig, Vec<String>) {
    let mut seeds = Vec::new();
    let mut users = Vec::new();
    for kind in ServiceKind::START_ORDER {
        let pair = nkeys::KeyPair::new_user();
        seeds.push(pair.seed().expect("seed"));
        users.push(NatsUser {
            public_key: pair.public_key(),
            permissions: for_service(kind, "n1", "TRELLIS_EVENTS"),
        });
    }
    (
        ServerConfig {
            listen: "127.0.0.1:4999".parse().expect("address"),
            store_dir: dir.join("store $x #y"),
            users,
            tls,
        },
        seeds,
    )
}

/// `nats-server -t`: parse the configuration and exit.
fn nats_server_accepts(file: &Path) -> Result<(), String> {
    let program = crate::grpc::find_executable("nats-server")
        .expect("nats-server is not installed (apt-get install nats-server)");
    let output = std::process::Command::new(program)
        .arg("-t")
        .arg("-c")
        .arg(file)
        .output()
        .expect("run nats-server -t");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn nats_server_accepts_the_node_configuration_which_holds_no_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, seeds) = node_config(dir.path(), None);
    let text = config.render().expect("render");
    for seed in &seeds {
        assert!(
            !text.contains(seed.as_str()),
            "a seed in the server configuration"
        );
    }
    for user in &config.users {
        assert!(
            text.contains(&format!("{{nkey: \"{}\"", user.public_key)),
            "{text}"
        );
    }
    assert!(text.contains("publish: {allow: [\"trellis.n1.events.service.*\", \"trellis.n1.events.sandbox.*\", \"trellis.n1.events.container.*\", \"$JS.API.STREAM.INFO.TRELLIS_EVENTS\", \"$JS.API.STREAM.CREATE.TRELLIS_EVENTS\"]}, subscribe: {allow: [\"_INBOX.n1.runtime.>\"]}"), "{text}");
    assert!(
        text.contains("publish: {deny: [\">\"]}, subscribe: {allow: [\"trellis.n1.events.>\"]}"),
        "the gateway publishes nothing: {text}"
    );
    let file = dir.path().join("nats.conf");
    std::fs::write(&file, &text).expect("write");
    nats_server_accepts(&file)
        .unwrap_or_else(|e| panic!("nats-server refuses the configuration: {e}\n{text}"));
}

#[test]
fn tls_settings_are_accepted_by_nats_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    // nats-server -t loads the certificate files, so real ones are needed.
    let ca = self_signed_certificate(dir.path());
    let tls = ServerTls {
        cert_file: ca.0.clone(),
        key_file: ca.1.clone(),
        client_ca_file: Some(ca.0),
    };
    let (config, _) = node_config(dir.path(), Some(tls));
    let text = config.render().expect("render");
    assert!(text.contains("verify: true"), "{text}");
    let file = dir.path().join("nats.conf");
    std::fs::write(&file, &text).expect("write");
    nats_server_accepts(&file)
        .unwrap_or_else(|e| panic!("nats-server refuses the configuration: {e}\n{text}"));
}

/// A self-signed certificate and its key, made by openssl (installed with
/// ca-certificates).
fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

#[test]
fn values_are_quoted_and_control_characters_refused() {
    assert_eq!(quote("a\"b\\c $x").expect("quote"), "\"a\\\"b\\\\c $x\"");
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut config, _) = node_config(dir.path(), None);
    config.store_dir = dir.path().join("bad\nlisten: 0.0.0.0:4222");
    let error = config
        .render()
        .expect_err("a newline cannot be quoted")
        .to_string();
    assert!(
        error.contains("control characters") && error.contains("\\n"),
        "{error}"
    );
}

/// deploy/nats/nats-server.conf shows operators the permissions Trellis needs: they
/// must be the ones `trellis up` gives its private bus (for node `node1`).
#[test]
fn the_shipped_sample_grants_what_the_services_need() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/nats-server.conf");
    let text = std::fs::read_to_string(&sample).expect("read deploy/nats/nats-server.conf");
    for kind in ServiceKind::START_ORDER {
        let user = NatsUser {
            public_key: format!("<{}_PUBLIC_KEY>", kind.name().to_ascii_uppercase()),
            permissions: for_service(kind, "node1", "TRELLIS_EVENTS"),
        };
        let line = user_line(user);
        assert!(
            text.contains(line.trim()),
            "deploy/nats/nats-server.conf lacks, for {}:\n{}",
            kind.name(),
            line.trim()
        );
    }
}

/// deploy/nats/cluster.md shows the users of a fleet's servers: a node's (as above)
/// and an operator's consumer, whose permissions the fleet test uses.
#[test]
fn the_cluster_example_grants_the_consumer_what_it_needs() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nats/cluster.md");
    let text = std::fs::read_to_string(&doc).expect("read deploy/nats/cluster.md");
    let users = [
        NatsUser {
            public_key: "<NODE1_RUNTIME_PUBLIC_KEY>".into(),
            permissions: for_service(ServiceKind::Runtime, "node1", "TRELLIS_EVENTS"),
        },
        NatsUser {
            public_key: "<CONSUMER_PUBLIC_KEY>".into(),
            permissions: crate::bus::permissions::for_consumer(
                "TRELLIS_EVENTS",
                "_INBOX.fleet-consumer",
            ),
        },
    ];
    for user in users {
        let line = user_line(user);
        assert!(
            text.contains(line.trim()),
            "deploy/nats/cluster.md lacks:\n{}",
            line.trim()
        );
    }
}

/// The line a server configuration gives `user` (its nkey and permissions).
fn user_line(user: NatsUser) -> String {
    let config = ServerConfig {
        listen: "127.0.0.1:4222".parse().expect("address"),
        store_dir: "/var/lib/trellis/nats".into(),
        users: vec![user],
        tls: None,
    };
    let rendered = config.render().expect("render");
    rendered
        .lines()
        .find(|line| line.contains("nkey:"))
        .expect("user line")
        .to_string()
}
