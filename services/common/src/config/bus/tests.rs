//! Tests of the bus credential and TLS checks: each mistake is named with its key and
//! source, and no secret appears in a message.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, ConfigSource};

const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
const PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

struct Files {
    dir: tempfile::TempDir,
    seed: String,
}

impl Files {
    fn new() -> Files {
        let seed = nkeys::KeyPair::new_user().seed().expect("seed");
        let files = Files {
            dir: tempfile::tempdir().expect("tempdir"),
            seed,
        };
        files.write("user.nk", &format!("{}\n", files.seed), 0o600);
        let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln";
        files.write("user.creds", &format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n", files.seed), 0o600);
        files.write("ca.pem", CERTIFICATE, 0o644);
        files.write("client.pem", CERTIFICATE, 0o644);
        files.write("client.key", PRIVATE_KEY, 0o600);
        files
    }

    fn write(&self, name: &str, text: &str, mode: u32) -> String {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Loads a configuration file of `bus` keys (and no other layer).
    fn load(&self, bus: &[(&str, &str)]) -> Result<crate::config::Config, ConfigError> {
        let mut text = String::from("[bus]\n");
        for (key, value) in bus {
            // File keys name files of this test's directory unless given a path.
            let in_dir =
                key.ends_with("_file") && !value.starts_with(['/', '.']) && !value.is_empty();
            let value = if in_dir {
                self.path(value).display().to_string()
            } else {
                value.to_string()
            };
            text.push_str(&format!("{key} = \"{value}\"\n"));
        }
        let file = self.path("trellis.toml");
        std::fs::write(&file, text).expect("write config");
        ConfigSource {
            file: Some(file),
            overrides: Vec::new(),
        }
        .load_with_env(&[])
    }

    fn error(&self, bus: &[(&str, &str)]) -> String {
        let message = self.load(bus).expect_err("must be refused").to_string();
        assert!(
            !message.contains(&self.seed),
            "a message quotes the seed: {message}"
        );
        assert!(
            message.contains(&self.path("trellis.toml").display().to_string()),
            "names the file that set it: {message}"
        );
        message
    }
}

const URL: (&str, &str) = ("url", "tls://127.0.0.1:4222");

#[test]
fn good_credentials_and_tls_files_load() {
    let files = Files::new();
    let config = files
        .load(&[
            URL,
            ("nkey_seed_file", "user.nk"),
            ("tls_ca_file", "ca.pem"),
            ("tls_cert_file", "client.pem"),
            ("tls_key_file", "client.key"),
        ])
        .expect("nkey and TLS");
    assert_eq!(Path::new(&config.bus.nkey_seed_file), files.path("user.nk"));
    files
        .load(&[
            ("url", "nats://a:4222, nats://b:4222"),
            ("credentials_file", "user.creds"),
        ])
        .expect("creds and two servers");
}

#[test]
fn credentials_need_an_external_bus_and_one_identity() {
    let files = Files::new();
    let message = files.error(&[("nkey_seed_file", "user.nk")]);
    assert!(
        message.contains("bus.nkey_seed_file") && message.contains("bus.url is empty"),
        "{message}"
    );
    let message = files.error(&[
        URL,
        ("nkey_seed_file", "user.nk"),
        ("credentials_file", "user.creds"),
    ]);
    assert!(
        message.contains("bus.nkey_seed_file") && message.contains("bus.credentials_file is set"),
        "{message}"
    );
    let message = files.error(&[URL, ("nkey_seed_file", "./relative.nk")]);
    assert!(message.contains("absolute path"), "{message}");
}

#[test]
fn a_client_certificate_needs_its_key_and_the_other_way_round() {
    let files = Files::new();
    let message = files.error(&[URL, ("tls_cert_file", "client.pem")]);
    assert!(
        message.contains("bus.tls_cert_file") && message.contains("bus.tls_key_file"),
        "{message}"
    );
    let message = files.error(&[URL, ("tls_key_file", "client.key")]);
    assert!(message.contains("key `bus.tls_key_file`"), "{message}");
    let message = files.error(&[("url", "ws://127.0.0.1:8080"), ("tls_ca_file", "ca.pem")]);
    assert!(message.contains("wss://"), "{message}");
}

#[test]
fn missing_unreadable_or_malformed_files_are_named() {
    let files = Files::new();
    let message = files.error(&[URL, ("tls_ca_file", "absent.pem")]);
    assert!(
        message.contains("bus.tls_ca_file")
            && message.contains("absent.pem")
            && message.contains("cannot be read"),
        "{message}"
    );
    files.write("empty.pem", "not a certificate\n", 0o644);
    let message = files.error(&[URL, ("tls_ca_file", "empty.pem")]);
    assert!(message.contains("no PEM certificate"), "{message}");
    files.write("bad.key", CERTIFICATE, 0o600);
    let message = files.error(&[
        URL,
        ("tls_cert_file", "client.pem"),
        ("tls_key_file", "bad.key"),
    ]);
    assert!(message.contains("no PEM private key"), "{message}");
    files.write(
        "account.nk",
        &nkeys::KeyPair::new_account().seed().expect("seed"),
        0o600,
    );
    let message = files.error(&[URL, ("nkey_seed_file", "account.nk")]);
    assert!(message.contains("not a user's"), "{message}");
    files.write("garbage.nk", "SUnot-a-seed", 0o600);
    let message = files.error(&[URL, ("nkey_seed_file", "garbage.nk")]);
    assert!(
        message.contains("does not hold an nkey user seed"),
        "{message}"
    );
    let message = files.error(&[URL, ("credentials_file", "user.nk")]);
    assert!(message.contains("not a NATS credentials file"), "{message}");
    let message = files.error(&[
        URL,
        ("nkey_seed_file", files.dir.path().to_str().expect("utf-8")),
    ]);
    assert!(message.contains("not a regular file"), "{message}");
}

#[test]
fn secrets_others_can_read_are_refused() {
    let files = Files::new();
    for (key, name) in [
        ("nkey_seed_file", "user.nk"),
        ("credentials_file", "user.creds"),
    ] {
        std::fs::set_permissions(files.path(name), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        let message = files.error(&[URL, (key, name)]);
        assert!(
            message.contains(&format!("bus.{key}"))
                && message.contains("mode 0640")
                && message.contains("0600"),
            "{message}"
        );
    }
    std::fs::set_permissions(
        files.path("client.key"),
        std::fs::Permissions::from_mode(0o604),
    )
    .expect("chmod");
    let message = files.error(&[
        URL,
        ("tls_cert_file", "client.pem"),
        ("tls_key_file", "client.key"),
    ]);
    assert!(
        message.contains("bus.tls_key_file") && message.contains("mode 0604"),
        "{message}"
    );
}

#[test]
fn a_password_in_the_url_is_refused_and_not_quoted() {
    let files = Files::new();
    let message = files.error(&[("url", "nats://a:4222,nats://trellis:hunter2@b:4222")]);
    assert!(
        message.contains("bus.url")
            && message.contains("nats://***@b:4222")
            && message.contains("bus.nkey_seed_file"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
    let message = files.error(&[("url", "http://b:4222")]);
    assert!(message.contains("nats://, tls://"), "{message}");
    let message = files.error(&[("url", "http://trellis:hunter2@b:4222")]);
    assert!(
        message.contains("http://***@b:4222") && !message.contains("hunter2"),
        "a bad scheme does not quote the password either: {message}"
    );
}

#[test]
fn environment_sets_each_service_its_own_seed_file() {
    let files = Files::new();
    let env = [
        (
            "TRELLIS_BUS_URL".to_string(),
            "nats://127.0.0.1:4222".to_string(),
        ),
        (
            "TRELLIS_BUS_NKEY_SEED_FILE".to_string(),
            files.path("user.nk").display().to_string(),
        ),
    ];
    let config = ConfigSource::default()
        .load_with_env(&env)
        .expect("from the environment");
    assert_eq!(Path::new(&config.bus.nkey_seed_file), files.path("user.nk"));
    std::fs::set_permissions(
        files.path("user.nk"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let message = ConfigSource::default()
        .load_with_env(&env)
        .expect_err("readable by others")
        .to_string();
    assert!(
        message.contains("environment variable TRELLIS_BUS_NKEY_SEED_FILE")
            && message.contains("bus.nkey_seed_file"),
        "{message}"
    );
}

#[test]
fn a_stream_name_that_could_leave_its_subject_or_quotes_is_refused() {
    let files = Files::new();
    for stream in ["EVENTS.>", "EV\\\"ENTS", "A B"] {
        let message = files.error(&[("stream", stream)]);
        assert!(
            message.contains("bus.stream") && message.contains("letters, digits"),
            "{message}"
        );
    }
    files
        .load(&[("stream", "TRELLIS_EVENTS-2")])
        .expect("a plain name");
}

#[test]
fn stream_replicas_are_those_jetstream_can_keep() {
    let files = Files::new();
    let load = |replicas: &str| {
        let file = files.path("trellis.toml");
        std::fs::write(&file, format!("[bus]\nstream_replicas = {replicas}\n")).expect("write");
        ConfigSource {
            file: Some(file),
            overrides: Vec::new(),
        }
        .load_with_env(&[])
    };
    for replicas in ["0", "6"] {
        let message = load(replicas).expect_err("refused").to_string();
        assert!(
            message.contains("bus.stream_replicas") && message.contains("1 to 5"),
            "{message}"
        );
    }
    let config = load("3").expect("three copies");
    assert_eq!(config.bus.stream_replicas, 3);
}
