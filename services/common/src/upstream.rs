//! Saying which service failed.
//!
//! A client of another Trellis service gets a failed call's status in one of two
//! ways: the service answered it (its message says what failed, maybe further down: a
//! registry, a CNI plugin, a disk), or the client made it itself because the service
//! could not be reached or dropped the connection under the call. Only the second may
//! be reported as that service "not answering"; the first keeps its code and its
//! words, so that a kubelet reads the part that failed, not the first service on the
//! way to it.

use std::path::Path;

use tonic::Status;

/// Whether the client made `status` because the call got no answer: no connection,
/// or the connection lost under the call.
///
/// A status the server sent carries no source; one the client made from a transport
/// failure keeps the failure as its source (tonic's `ConnectError`, hyper's or h2's
/// error). A connection that closes under a call in flight (the server was killed
/// after accepting it) comes back as `Cancelled` or `Unknown` with such a source,
/// which is a transport failure too. The client's own deadline (`TimeoutExpired`) is
/// not the server's fault: it says nothing of whether the server was there.
pub fn not_reached(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    let transport = source.is_some();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return false;
        }
        source = error.source();
    }
    transport
}

/// Words for a call to `service` on `socket` that got no answer (see
/// [`not_reached`]): `<service> service unavailable: not answering on <socket>: <why>`.
pub fn unreached_message(service: &str, socket: &Path, status: &Status) -> String {
    format!(
        "{service} service unavailable: not answering on {}: {}",
        socket.display(),
        reason(status)
    )
}

/// What went wrong with the connection, for a message: the status's own words, or
/// the innermost cause when tonic's words are only "transport error".
fn reason(status: &Status) -> String {
    let mut innermost = None;
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        innermost = Some(error.to_string());
        source = error.source();
    }
    match innermost {
        Some(cause) if !status.message().contains(&cause) => {
            format!("{} ({cause})", status.message())
        }
        _ => status.message().to_string(),
    }
}

/// A failed call to `service` as the status to pass on: one that got no answer is
/// `Unavailable` with [`unreached_message`]'s words; one the service answered keeps
/// its code, its words prefixed with `<service> service: `.
pub fn pass_on(service: &str, socket: &Path, status: &Status) -> Status {
    if not_reached(status) {
        Status::unavailable(unreached_message(service, socket, status))
    } else {
        Status::new(
            status.code(),
            format!("{service} service: {}", status.message()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::unix_channel;
    use tonic::Code;

    /// A socket nobody listens on: the status is the client's own, and says so.
    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_not_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("storage.sock");
        let mut client = tonic_health::pb::health_client::HealthClient::new(unix_channel(&socket));
        let status = client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect_err("nobody listens");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(not_reached(&status), "{status:?}");
        let passed = pass_on("storage", &socket, &status);
        assert_eq!(passed.code(), Code::Unavailable);
        assert!(
            passed.message().starts_with(&format!(
                "storage service unavailable: not answering on {}: ",
                socket.display()
            )) && passed.message().contains("No such file or directory"),
            "{}",
            passed.message()
        );
    }

    #[test]
    fn an_answer_keeps_its_code_and_words() {
        for status in [
            Status::unavailable("registry 127.0.0.1:5000: 503 Service Unavailable"),
            Status::not_found("registry 127.0.0.1:5000: manifest unknown"),
            Status::resource_exhausted("no space left on /var/lib/trellis"),
        ] {
            assert!(!not_reached(&status), "{status:?}");
            let passed = pass_on("image", Path::new("/run/trellis/image.sock"), &status);
            assert_eq!(passed.code(), status.code());
            assert_eq!(
                passed.message(),
                format!("image service: {}", status.message())
            );
        }
        let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(!not_reached(&timeout), "our own deadline: {timeout:?}");
    }
}
