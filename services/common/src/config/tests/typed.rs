//! Tests of the values parsed at load (runtime handlers, socket modes, mirrors) and of
//! the keys of older releases: each bad value is named with its key and its source.
use super::{load, write};
use crate::config::*;

fn error(result: Result<Config, ConfigError>) -> String {
    result.expect_err("must fail").to_string()
}

fn binary<'a>(config: &'a Config, handler: &str) -> Option<&'a str> {
    config
        .runtime
        .handler(handler)
        .map(|handler| handler.binary.as_str())
}

#[test]
fn runtime_handlers_are_tables_merged_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[runtime]\noci_runtime = \"/usr/sbin/runc\"\n[runtime.handlers.kata]\nbinary = \"/usr/bin/kata-runtime\"\n",
    );
    write(
        dir.path(),
        "trellis.d/50-youki.toml",
        "[runtime.handlers.youki]\nbinary = \"youki\"\n",
    );
    let config = load(&file, &[], &[]).expect("load");
    assert_eq!(binary(&config, ""), Some("/usr/sbin/runc"));
    assert_eq!(binary(&config, "kata"), Some("/usr/bin/kata-runtime"));
    assert_eq!(binary(&config, "youki"), Some("youki"));
    assert_eq!(
        binary(&config, "runc"),
        Some("runc"),
        "built-in handlers stay"
    );
    assert_eq!(binary(&config, "crun"), Some("crun"));
    assert_eq!(binary(&config, "gvisor"), None);
    assert!(config.notices.is_empty(), "{:?}", config.notices);

    let config = load(
        &file,
        &[(
            "TRELLIS_RUNTIME_HANDLERS",
            "{ gvisor = { binary = \"runsc\" } }",
        )],
        &["runtime.handlers={ kata = { binary = \"/opt/kata\" } }"],
    )
    .expect("inline tables");
    assert_eq!(binary(&config, "gvisor"), Some("runsc"));
    assert_eq!(binary(&config, "kata"), Some("/opt/kata"));
    assert_eq!(binary(&config, "youki"), Some("youki"));
}

#[test]
fn bad_runtime_handlers_name_their_key_and_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[runtime.handlers.kata]\nbinary = \"  \"\n",
            "runtime.handlers.kata",
            "OCI runtime binary",
        ),
        (
            "[runtime.handlers.kata]\npath = \"/x\"\n",
            "runtime.handlers.kata",
            "unknown field `path`",
        ),
        (
            "[runtime.handlers.kata]\n",
            "runtime.handlers.kata",
            "missing field `binary`",
        ),
        (
            "[runtime.handlers.Kata_1]\nbinary = \"x\"\n",
            "runtime.handlers.Kata_1",
            "DNS label",
        ),
        (
            "[runtime]\noci_runtime = \"\"\n",
            "runtime.oci_runtime",
            "OCI runtime binary",
        ),
    ];
    for (text, key, expected) in cases {
        let file = write(dir.path(), "trellis.toml", text);
        let message = error(load(&file, &[], &[]));
        assert!(
            message.contains(&file.display().to_string())
                && message.contains(key)
                && message.contains(expected),
            "{text}: {message}"
        );
    }
    let file = write(dir.path(), "trellis.toml", "");
    let message = error(load(
        &file,
        &[],
        &["runtime.handlers={ bad_name = { binary = \"x\" } }"],
    ));
    assert!(
        message.contains("flag --set runtime.handlers=")
            && message.contains("runtime.handlers.bad_name")
            && message.contains("DNS label"),
        "{message}"
    );
    let message = error(load(&file, &[("TRELLIS_RUNTIME_HANDLERS", "kata")], &[]));
    assert!(
        message.contains("TRELLIS_RUNTIME_HANDLERS") && message.contains("inline table"),
        "{message}"
    );
}

#[test]
fn old_handler_list_is_read_with_a_notice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[runtime]\nruntime_handlers = [\"kata = /usr/bin/kata-runtime\", \"runc=/usr/sbin/runc\", \"kata=/second\"]\n",
    );
    let config = load(&file, &[], &[]).expect("old list loads");
    assert_eq!(binary(&config, "kata"), Some("/usr/bin/kata-runtime"));
    assert_eq!(binary(&config, "runc"), Some("/usr/sbin/runc"));
    assert_eq!(
        binary(&config, "crun"),
        None,
        "the list replaced the built-in handlers, as it did"
    );
    assert_eq!(config.notices.len(), 1, "{:?}", config.notices);
    let notice = &config.notices[0];
    assert!(
        notice.contains(&file.display().to_string())
            && notice.contains("runtime.runtime_handlers")
            && notice.contains("[runtime.handlers.crun]"),
        "{notice}"
    );

    // A later layer's table adds to the converted list; the old form from a variable.
    write(
        dir.path(),
        "trellis.d/10-youki.toml",
        "[runtime.handlers.youki]\nbinary = \"youki\"\n",
    );
    let config = load(&file, &[], &[]).expect("list then table");
    assert_eq!(binary(&config, "youki"), Some("youki"));
    assert_eq!(binary(&config, "kata"), Some("/usr/bin/kata-runtime"));
    let config = load(
        &file,
        &[("TRELLIS_RUNTIME_RUNTIME_HANDLERS", "gvisor=runsc")],
        &[],
    )
    .expect("old list from a variable");
    assert_eq!(binary(&config, "gvisor"), Some("runsc"));
    assert_eq!(binary(&config, "youki"), None);
    assert!(
        config
            .notices
            .iter()
            .any(|n| n.contains("environment variable TRELLIS_RUNTIME_RUNTIME_HANDLERS")),
        "{:?}",
        config.notices
    );

    for entry in ["kata", "=runsc", "kata=", "Kata=runsc"] {
        let file = write(
            dir.path(),
            "trellis.toml",
            &format!("[runtime]\nruntime_handlers = [\"{entry}\"]\n"),
        );
        let message = error(load(&file, &[], &[]));
        assert!(
            message.contains(&file.display().to_string())
                && message.contains("runtime.runtime_handlers")
                && message.contains("name=binary"),
            "{entry}: {message}"
        );
    }
}

#[test]
fn dropped_key_is_accepted_with_a_notice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[runtime]\ndefault_stop_timeout_seconds = 30\nconmon = \"/usr/bin/conmon\"\n",
    );
    let config = load(&file, &[], &[]).expect("an old file loads");
    assert_eq!(config.runtime.conmon, "/usr/bin/conmon");
    assert_eq!(config.notices.len(), 1, "{:?}", config.notices);
    assert!(
        config.notices[0].contains("runtime.default_stop_timeout_seconds")
            && config.notices[0].contains("ignored"),
        "{:?}",
        config.notices
    );
    let config =
        load(&file, &[], &["runtime.default_stop_timeout_seconds=5"]).expect("and from a flag");
    assert_eq!(config.notices.len(), 2, "{:?}", config.notices);

    // Beside an old key, the file's other keys are still checked, each by name.
    let file = write(
        dir.path(),
        "trellis.toml",
        "[runtime]\ndefault_stop_timeout_seconds = 30\nconmon = 5\n",
    );
    let message = error(load(&file, &[], &[]));
    assert!(
        message.contains(&file.display().to_string())
            && message.contains("runtime.conmon")
            && message.contains("expected a string"),
        "{message}"
    );
    let file = write(
        dir.path(),
        "trellis.toml",
        "[runtime]\ndefault_stop_timeout_seconds = 30\n[gateway]\nsokcet = \"/x\"\n",
    );
    let message = error(load(&file, &[], &[]));
    assert!(
        message.contains("unknown field `sokcet`") && message.contains("`socket`"),
        "{message}"
    );
}

#[test]
fn socket_modes_are_parsed_at_load_and_bad_ones_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[storage]\nsocket_mode = \"0640\"\n[image]\nsocket_mode = \"0o620\"\n",
    );
    let config = load(&file, &[], &[]).expect("load");
    assert_eq!(config.endpoint(ServiceKind::Storage).socket_mode, 0o640);
    assert_eq!(config.endpoint(ServiceKind::Image).socket_mode, 0o620);
    assert_eq!(config.storage.socket_mode.to_string(), "0640");
    for mode in ["0999", "1777", "-600", "+600", "", "rw-------"] {
        let file = write(
            dir.path(),
            "trellis.toml",
            &format!("[storage]\nsocket_mode = \"{mode}\"\n"),
        );
        let message = error(load(&file, &[], &[]));
        assert!(
            message.contains(&file.display().to_string())
                && message.contains("socket_mode")
                && message.contains("octal file mode"),
            "{mode}: {message}"
        );
    }
    let file = write(dir.path(), "trellis.toml", "");
    let message = error(load(
        &file,
        &[("TRELLIS_RUNTIME_SOCKET_MODE", "01000")],
        &[],
    ));
    assert!(
        message.contains("TRELLIS_RUNTIME_SOCKET_MODE")
            && message.contains("runtime.socket_mode")
            && message.contains("at most 0777"),
        "{message}"
    );
}

#[test]
fn mirrors_are_parsed_at_load_and_bad_ones_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(
        dir.path(),
        "trellis.toml",
        "[image]\nmirrors = [\"docker.io=http://127.0.0.1:5000\", \"quay.io=https://m.example/quay/\", \"docker.io=https://b\"]\n",
    );
    let config = load(&file, &[], &[]).expect("load");
    let docker = config.image.mirrors_of("docker.io");
    assert_eq!(docker.len(), 2);
    assert_eq!(
        docker[0],
        MirrorEndpoint {
            plain_http: true,
            host: "127.0.0.1:5000".into(),
            prefix: String::new()
        }
    );
    assert_eq!(config.image.mirrors_of("quay.io")[0].prefix, "quay");
    assert_eq!(
        String::from(config.image.mirrors[1].clone()),
        "quay.io=https://m.example/quay"
    );
    let message = error(load(
        &file,
        &[("TRELLIS_IMAGE_MIRRORS", "docker.io=ftp://x")],
        &[],
    ));
    assert!(
        message.contains("TRELLIS_IMAGE_MIRRORS")
            && message.contains("image.mirrors")
            && message.contains("registry=http://host"),
        "{message}"
    );
    for entry in [
        "docker.io",
        "=http://m",
        "docker.io=http://",
        "docker.io=m.example",
        "docker.io=http://m example",
        "docker.io=http://m\\u0007",
    ] {
        let file = write(
            dir.path(),
            "trellis.toml",
            &format!("[image]\nmirrors = [\"{entry}\"]\n"),
        );
        let message = error(load(&file, &[], &[]));
        assert!(
            message.contains(&file.display().to_string())
                && message.contains("image.mirrors")
                && message.contains("registry=http://host")
                && !message.contains('\u{7}'),
            "{entry}: {message}"
        );
    }
}
