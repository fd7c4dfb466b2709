//! Readiness for whoever started the process, with systemd's notify protocol
//! (sd_notify(3)): `READY=1` once the service serves, `STOPPING=1` when it drains.
//!
//! Its socket is shared with a process that may still be serving (a gateway's
//! successor starts before it drains), so "the socket answers" cannot tell the
//! starter that *this* process is ready; the message can. `trellis up` waits for it
//! before it lets the old process go, and systemd does for `Type=notify` units.
//!
//! The variable must not reach the programs a service starts: runc takes
//! `NOTIFY_SOCKET` as a request to relay a container's notifications and would mount
//! the socket into the container. Commands that run other programs remove it
//! ([`ENV`]); the service cannot unset its own environment (that is `unsafe` once
//! threads run).

use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// The variable that names the starter's datagram socket.
pub const ENV: &str = "NOTIFY_SOCKET";

/// Sent once the service takes calls.
pub const READY: &str = "READY=1";
/// Sent when the service stops taking calls and drains the accepted ones.
pub const STOPPING: &str = "STOPPING=1";

/// Tells the starter `state`, when one asked (`NOTIFY_SOCKET` set). A starter that
/// asked and cannot be told is logged, never fatal: the service serves all the same.
pub fn tell(state: &str) {
    let Some(target) = std::env::var_os(ENV) else {
        return;
    };
    let message = format!("{state}\nMAINPID={}\n", std::process::id());
    if let Err(error) = send(Path::new(&target), message.as_bytes()) {
        tracing::warn!(socket = %Path::new(&target).display(), %error, state, "cannot tell the starter (NOTIFY_SOCKET)");
    }
}

/// Sends one datagram to `target`: a path, or `@name` for an abstract socket.
fn send(target: &Path, message: &[u8]) -> std::io::Result<usize> {
    let socket = UnixDatagram::unbound()?;
    let text = target.to_string_lossy();
    match text.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(message, &address)
        }
        None => socket.send_to(message, target),
    }
}

/// The states in one notify datagram, as `KEY=value` lines (`READY=1`, `MAINPID=…`).
pub fn states(datagram: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(datagram)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_socket_and_reads_back_as_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        send(&path, b"READY=1\nMAINPID=42\n").expect("send");
        let mut buffer = [0u8; 256];
        let n = receiver.recv(&mut buffer).expect("recv");
        let got: Vec<_> = states(&buffer[..n]).collect();
        assert_eq!(got, ["READY=1", "MAINPID=42"]);
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("trellis-notify-test-{}", std::process::id());
        let address =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let receiver = UnixDatagram::bind_addr(&address).expect("bind");
        send(Path::new(&format!("@{name}")), READY.as_bytes()).expect("send");
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).expect("recv");
        assert_eq!(states(&buffer[..n]).collect::<Vec<_>>(), [READY]);
    }

    #[test]
    fn a_datagram_that_is_not_text_holds_no_state() {
        assert_eq!(states(&[0xff, 0xfe, b'\n']).count(), 0);
    }
}
