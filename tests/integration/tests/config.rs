//! A bad configuration stops a service at start, with a message naming the file,
//! the key and what is expected.

use std::process::Command;

fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(trellis_integration::binary(binary))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_names_file_key_and_known_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("trellis.toml");
    std::fs::write(&file, "[gateway]\nsokcet = \"/run/x.sock\"\n").expect("write");
    for binary in ["trellis-gateway", "trellis-runtime", "trellis"] {
        let args: Vec<&str> = if binary == "trellis" {
            vec!["--config", file.to_str().expect("utf-8"), "status"]
        } else {
            vec!["--config", file.to_str().expect("utf-8")]
        };
        let (ok, stderr) = run(binary, &args, &[]);
        assert!(!ok, "{binary} must exit non-zero");
        assert!(
            stderr.contains(&file.display().to_string()),
            "{binary}: {stderr}"
        );
        assert!(
            stderr.contains("unknown field `sokcet`")
                && stderr.contains("expected one of")
                && stderr.contains("`socket`"),
            "{binary}: {stderr}"
        );
    }
}

#[test]
fn wrong_type_in_a_dropin_names_the_dropin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("trellis.toml");
    std::fs::write(&file, "").expect("write");
    std::fs::create_dir(dir.path().join("trellis.d")).expect("mkdir");
    let dropin = dir.path().join("trellis.d/50-retry.toml");
    std::fs::write(&dropin, "[gateway]\nbackend_retry_ms = \"ten\"\n").expect("write");
    let (ok, stderr) = run(
        "trellis-storage",
        &["--config", file.to_str().expect("utf-8")],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains(&dropin.display().to_string())
            && stderr.contains("backend_retry_ms")
            && stderr.contains("u64"),
        "{stderr}"
    );
}

#[test]
fn bad_values_from_environment_and_flags_name_their_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("trellis.toml");
    std::fs::write(&file, "").expect("write");
    let config = file.to_str().expect("utf-8");
    let (ok, stderr) = run(
        "trellis-network",
        &["--config", config],
        &[("TRELLIS_NETWORK_SOCKET_MODE", "rw-rw----")],
    );
    assert!(!ok);
    assert!(
        stderr.contains("TRELLIS_NETWORK_SOCKET_MODE")
            && stderr.contains("network.socket_mode")
            && stderr.contains("octal"),
        "{stderr}"
    );
    let (ok, stderr) = run(
        "trellis-image",
        &["--config", config, "--set", "telemetry.log_format=xml"],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("--set telemetry.log_format=xml") && stderr.contains("`text` or `json`"),
        "{stderr}"
    );
}

/// A node's file from an older release (the handler list, a key nothing reads any
/// more) still loads after an upgrade: the process says what to write instead.
#[test]
fn an_old_file_loads_with_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("trellis.toml");
    std::fs::write(
        &file,
        format!(
            "[node]\nrun_dir = \"{}\"\n[runtime]\nruntime_handlers = [\"runc=runc\", \"crun=crun\"]\ndefault_stop_timeout_seconds = 10\n",
            dir.path().join("run").display()
        ),
    )
    .expect("write");
    let output = Command::new(trellis_integration::binary("trellis"))
        .args(["--config", file.to_str().expect("utf-8"), "status"])
        .output()
        .expect("run");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    // Nothing runs there: status reports every service down, at the file's run_dir.
    assert!(
        stdout.contains(&dir.path().join("run/trellis.sock").display().to_string()),
        "the file must load: {stdout}{stderr}"
    );
    for key in [
        "runtime.runtime_handlers` is deprecated",
        "runtime.default_stop_timeout_seconds` is no longer read",
    ] {
        assert!(
            stderr.contains("warning: configuration file") && stderr.contains(key),
            "{key}: {stderr}"
        );
    }
}
