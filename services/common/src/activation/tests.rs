use std::os::fd::AsFd;

use super::*;

const ME: u32 = 4242;

fn ok(pid: Option<&str>, count: Option<&str>, names: Option<&str>) -> Option<Vec<Passed>> {
    parse(pid, count, names, ME).expect("valid variables")
}

#[test]
fn sockets_passed_to_this_process_are_read_with_their_names() {
    let passed = ok(Some("4242"), Some("2"), Some("runtime:extra")).expect("passed");
    assert_eq!(
        passed,
        vec![
            Passed {
                fd: 3,
                name: "runtime".into()
            },
            Passed {
                fd: 4,
                name: "extra".into()
            },
        ]
    );
    let unnamed = ok(Some("4242"), Some("1"), None).expect("passed");
    assert_eq!(unnamed[0].name, "unknown");
}

#[test]
fn nothing_is_taken_without_variables_or_for_another_process() {
    assert_eq!(ok(None, None, None), None);
    assert_eq!(ok(None, Some("1"), None), None, "no LISTEN_PID: not ours");
    assert_eq!(
        ok(Some("1"), Some("1"), Some("gateway")),
        None,
        "an ancestor's LISTEN_PID"
    );
    assert_eq!(ok(Some("4242"), Some("0"), None), None);
}

#[test]
fn hostile_values_are_refused() {
    for pid in [
        "",
        "-4242",
        "+4242",
        " 4242",
        "0x1092",
        "4242abc",
        "99999999999999999999999",
    ] {
        assert!(
            matches!(
                parse(Some(pid), Some("1"), None, ME),
                Err(ActivationError::BadPid { .. })
            ),
            "pid {pid:?}"
        );
    }
    for count in [
        "",
        "-1",
        "17",
        "1000000",
        "1 ",
        "one",
        "18446744073709551617",
    ] {
        assert!(
            matches!(
                parse(Some("4242"), Some(count), None, ME),
                Err(ActivationError::BadCount { .. })
            ),
            "count {count:?}"
        );
    }
    assert!(matches!(
        parse(Some("4242"), Some("2"), Some("gateway"), ME),
        Err(ActivationError::NamesMismatch {
            names: 1,
            count: 2,
            ..
        })
    ));
    assert!(matches!(
        parse(Some("4242"), Some("1"), Some("a:b:c"), ME),
        Err(ActivationError::NamesMismatch { .. })
    ));
    let long = "x".repeat(256);
    for names in ["", "run\ntime", long.as_str()] {
        assert!(
            matches!(
                parse(Some("4242"), Some("1"), Some(names), ME),
                Err(ActivationError::BadName { .. })
            ),
            "names {names:?}"
        );
    }
    let quoted = parse(Some("\u{1b}[31m"), Some("1"), None, ME)
        .expect_err("escape sequence")
        .to_string();
    assert!(!quoted.contains('\u{1b}'), "quoted escaped: {quoted}");
}

#[test]
fn only_a_listening_unix_stream_socket_is_served_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listening =
        std::os::unix::net::UnixListener::bind(dir.path().join("ok.sock")).expect("bind");
    assert_eq!(check_listener(listening.as_fd()), Ok(()));

    let file = std::fs::File::create(dir.path().join("file")).expect("file");
    assert_eq!(
        check_listener(file.as_fd()),
        Err("not a socket".to_string())
    );

    let (connected, _peer) = std::os::unix::net::UnixStream::pair().expect("pair");
    assert_eq!(
        check_listener(connected.as_fd()),
        Err("not listening".to_string())
    );

    let datagram =
        std::os::unix::net::UnixDatagram::bind(dir.path().join("dgram.sock")).expect("dgram");
    assert!(
        check_listener(datagram.as_fd())
            .expect_err("datagram")
            .contains("not a stream"),
    );

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    assert!(
        check_listener(tcp.as_fd())
            .expect_err("tcp")
            .contains("not a Unix one"),
    );
}

#[test]
fn a_process_without_the_variables_binds_its_own() {
    // The test process was not socket-activated: nothing is taken, nothing sealed.
    if std::env::var_os("LISTEN_FDS").is_none() {
        assert_eq!(take_listener("runtime").map(|l| l.is_some()), Ok(false));
    }
}
