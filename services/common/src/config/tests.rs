//! Tests of configuration loading: layers, sources named in errors, the shipped example.
use super::load::known_keys;
use super::*;
use std::path::Path;

mod typed;

pub(super) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create config dir");
    }
    std::fs::write(&path, text).expect("write config");
    path
}

pub(super) fn load(
    file: &Path,
    env: &[(&str, &str)],
    flags: &[&str],
) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ConfigSource {
        file: Some(file.to_path_buf()),
        overrides: flags.iter().map(|s| s.to_string()).collect(),
    }
    .load_with_env(&env)
}

#[test]
fn no_file_gives_working_defaults() {
    let config = ConfigSource::default()
        .load_with_env(&[])
        .expect("defaults");
    assert_eq!(
        config.endpoint(ServiceKind::Gateway).socket,
        PathBuf::from("/run/trellis/trellis.sock")
    );
    assert_eq!(
        config.endpoint(ServiceKind::Runtime).socket,
        PathBuf::from("/run/trellis/runtime.sock")
    );
    assert_eq!(config.endpoint(ServiceKind::Runtime).socket_mode, 0o600);
    assert_eq!(config.endpoint(ServiceKind::Gateway).socket_mode, 0o660);
    assert_eq!(config.endpoint(ServiceKind::Gateway).metrics_listen, None);
}

#[test]
fn layers_apply_in_order_file_dropins_env_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[node]\nrun_dir = \"/a\"\nstate_dir = \"/s\"\n[gateway]\nbackend_retry_ms = 1\n",
    );
    write(
        dir.path(),
        "trellis.d/20-b.toml",
        "[node]\nrun_dir = \"/c\"\n",
    );
    write(
        dir.path(),
        "trellis.d/10-a.toml",
        "[node]\nrun_dir = \"/b\"\n[gateway]\nbackend_retry_ms = 2\n",
    );
    write(dir.path(), "trellis.d/ignored.conf", "not toml at all");
    let config = load(&file, &[], &[]).expect("load");
    assert_eq!(config.node.run_dir, PathBuf::from("/c"));
    assert_eq!(config.node.state_dir, PathBuf::from("/s"));
    assert_eq!(config.gateway.backend_retry_ms, 2);

    let config = load(
        &file,
        &[
            ("TRELLIS_NODE_RUN_DIR", "/env"),
            ("TRELLIS_GATEWAY_BACKEND_RETRY_MS", "7"),
        ],
        &[],
    )
    .expect("env");
    assert_eq!(config.node.run_dir, PathBuf::from("/env"));
    assert_eq!(config.gateway.backend_retry_ms, 7);

    let config = load(
        &file,
        &[("TRELLIS_NODE_RUN_DIR", "/env")],
        &["node.run_dir=/flag", "network.cni_plugin_dirs=/x,/y"],
    )
    .expect("flags");
    assert_eq!(config.node.run_dir, PathBuf::from("/flag"));
    assert_eq!(
        config.network.cni_plugin_dirs,
        vec![PathBuf::from("/x"), PathBuf::from("/y")]
    );
}

#[test]
fn unknown_key_in_file_names_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "trellis.toml", "[gateway]\nsokcet = \"/x\"\n");
    let message = load(&file, &[], &[]).expect_err("must fail").to_string();
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert!(message.contains("sokcet"), "{message}");
    assert!(
        message.contains("socket"),
        "expected keys listed: {message}"
    );
}

#[test]
fn wrong_type_in_dropin_names_that_dropin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "trellis.toml", "");
    let dropin = write(
        dir.path(),
        "trellis.d/50-x.toml",
        "[gateway]\nbackend_retry_ms = \"soon\"\n",
    );
    let message = load(&file, &[], &[]).expect_err("must fail").to_string();
    assert!(message.contains(&dropin.display().to_string()), "{message}");
    assert!(
        message.contains("backend_retry_ms") && message.contains("u64"),
        "{message}"
    );
}

#[test]
fn semantic_error_names_the_layer_that_set_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[telemetry]\nlog_format = \"xml\"\n",
    );
    let message = load(&file, &[], &[]).expect_err("must fail").to_string();
    assert!(
        message.contains(&file.display().to_string())
            && message.contains("telemetry.log_format")
            && message.contains("`text` or `json`"),
        "{message}"
    );

    let message = load(
        &file,
        &[("TRELLIS_RUNTIME_SOCKET", "relative.sock")],
        &["telemetry.log_format=json"],
    )
    .expect_err("must fail")
    .to_string();
    assert!(
        message.contains("TRELLIS_RUNTIME_SOCKET") && message.contains("absolute path"),
        "{message}"
    );
}

#[test]
fn bad_env_and_flag_values_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "trellis.toml", "");
    let message = load(&file, &[("TRELLIS_GATEWAY_BACKEND_RETRY_MS", "-3")], &[])
        .expect_err("must fail")
        .to_string();
    assert!(
        message.contains("TRELLIS_GATEWAY_BACKEND_RETRY_MS")
            && message.contains("non-negative integer"),
        "{message}"
    );
    let message = load(&file, &[("TRELLIS_GATEWAY_NOPE", "1")], &[])
        .expect_err("must fail")
        .to_string();
    assert!(message.contains("unknown configuration key"), "{message}");
    load(&file, &[("TRELLIS_BIN_DIR", "/x"), ("TRELLIS", "y")], &[])
        .expect("variables naming no section are not configuration");
    let message = load(&file, &[], &["gateway.socket_mode=rw"])
        .expect_err("must fail")
        .to_string();
    assert!(
        message.contains("--set gateway.socket_mode=rw") && message.contains("octal"),
        "{message}"
    );
    assert!(matches!(
        load(&file, &[], &["novalue"]),
        Err(ConfigError::BadFlag(_))
    ));
}

/// deploy/trellis.toml is the operator's reference: it must load, list every key,
/// and show the built-in defaults (it only turns the metrics listeners on).
#[test]
fn shipped_example_lists_every_key_with_its_default() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/trellis.toml");
    let config = load(&example, &[], &[]).expect("example loads");
    let mut expected = Config::default();
    for (listen, port) in [
        (&mut expected.gateway.metrics_listen, 9460),
        (&mut expected.runtime.metrics_listen, 9461),
        (&mut expected.image.metrics_listen, 9462),
        (&mut expected.storage.metrics_listen, 9463),
        (&mut expected.network.metrics_listen, 9464),
        (&mut expected.supervisor.metrics_listen, 9465),
    ] {
        *listen = format!("127.0.0.1:{port}");
    }
    assert_eq!(config, expected);
    let text: toml::Table =
        toml::from_str(&std::fs::read_to_string(&example).expect("read")).expect("toml");
    let defaults = toml::Value::try_from(Config::default()).expect("defaults");
    for key in known_keys(&defaults) {
        let (section, field) = key.split_once('.').expect("dotted");
        assert!(
            text.get(section).and_then(|s| s.get(field)).is_some(),
            "deploy/trellis.toml does not list {key}"
        );
    }
}

#[test]
fn explicit_missing_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.toml");
    let message = load(&missing, &[], &[]).expect_err("must fail").to_string();
    assert!(message.contains("absent.toml"), "{message}");
}

#[test]
fn parallelism_is_the_cores_unless_configured() {
    assert!(parallelism(0, 1) >= 1);
    assert_eq!(parallelism(0, 2), 2 * parallelism(0, 1));
    assert_eq!(parallelism(3, 2), 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("trellis.toml");
    std::fs::write(&file, "[runtime]\nmax_parallel_creates = 4\n").expect("write");
    let set = load(&file, &[("TRELLIS_NETWORK_MAX_PARALLEL_CNI", "2")], &[]).expect("valid");
    assert_eq!(
        (
            set.runtime.max_parallel_creates,
            set.network.max_parallel_cni
        ),
        (4, 2)
    );
}
