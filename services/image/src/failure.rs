//! How a pull source or the storage service failed, in the code and the words the
//! kubelet gets.
//!
//! A registry's answer keeps its meaning: a manifest or blob it does not know is
//! `NotFound`, a refusal of credentials `Unauthenticated`, a 5xx or a connection
//! that broke `Unavailable`, bytes that do not match their digest `DataLoss`; the
//! words name the registry (the caller puts the source's label in front) and the
//! blob. A storage service that could not be reached is said to be that, not a fault
//! of the registry the pull was reading from.

use std::path::Path;

use oci_client::errors::{DigestError, OciDistributionError, OciEnvelope, OciErrorCode};
use tonic::{Code, Status};
use trellis_common::text::excerpt_to;
use trellis_common::upstream::{no_answer_message, not_reached, unreached_message};

/// How much of a registry's own error text a message quotes.
pub const REGISTRY_TEXT_CHARS: usize = 300;

/// A source (or storage, while pulling from it) failed; `code` says how, for the
/// final answer.
#[derive(Debug)]
pub struct SourceFailure {
    pub message: String,
    pub code: Code,
    /// Bad content rather than an unreachable or empty source: stop, do not try others.
    pub fatal: bool,
    /// The storage service failed, not the source: the message is not put under the
    /// source's name, and no other source is tried.
    pub storage_down: bool,
}

impl SourceFailure {
    pub fn new(code: Code, message: String) -> Self {
        Self {
            message,
            code,
            fatal: false,
            storage_down: false,
        }
    }

    /// The storage service on `socket` took a call of the pull (or a layer's bytes)
    /// and did nothing with it for `waited`, the pull's progress timeout.
    pub fn storage_stuck(socket: &Path, waited: std::time::Duration) -> Self {
        Self {
            message: format!(
                "{} (image.pull_progress_timeout_seconds)",
                no_answer_message("storage", socket, waited)
            ),
            code: Code::DeadlineExceeded,
            fatal: true,
            storage_down: true,
        }
    }

    /// A failed call to the storage service on `socket`.
    pub fn storage(socket: &Path, status: Status) -> Self {
        if not_reached(&status) {
            return Self {
                message: unreached_message("storage", socket, &status),
                code: Code::Unavailable,
                fatal: true,
                storage_down: true,
            };
        }
        // Storage refusing the content (bad bytes, unsafe entries, over its size
        // limits) would refuse it from any source; the source served it.
        let refused = matches!(status.code(), Code::DataLoss | Code::InvalidArgument);
        let message = if refused {
            format!("refused by storage: {}", status.message())
        } else {
            format!("storage service: {}", status.message())
        };
        Self {
            fatal: refused || status.code() == Code::ResourceExhausted,
            code: status.code(),
            message,
            storage_down: false,
        }
    }
}

/// The code for a registry's HTTP status, when its body said nothing more precise.
fn http_code(status: u16) -> Code {
    match status {
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        429 => Code::ResourceExhausted,
        _ => Code::Unavailable,
    }
}

/// The code for the errors a registry listed (OCI distribution spec error codes).
fn envelope_code(envelope: &OciEnvelope) -> Code {
    let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
    let any = |wanted: &[OciErrorCode]| codes.iter().any(|code| wanted.contains(code));
    if any(&[OciErrorCode::Unauthorized]) {
        Code::Unauthenticated
    } else if any(&[OciErrorCode::Denied]) {
        Code::PermissionDenied
    } else if any(&[
        OciErrorCode::ManifestUnknown,
        OciErrorCode::BlobUnknown,
        OciErrorCode::ManifestBlobUnknown,
        OciErrorCode::NameUnknown,
        OciErrorCode::NotFound,
    ]) {
        Code::NotFound
    } else if any(&[OciErrorCode::Toomanyrequests]) {
        Code::ResourceExhausted
    } else if any(&[OciErrorCode::NameInvalid, OciErrorCode::TagInvalid]) {
        Code::InvalidArgument
    } else {
        Code::Unavailable
    }
}

/// The part of a registry URL a message needs: `/v2/…` (the source's label already
/// names the host).
fn url_path(url: &str) -> &str {
    url.find("/v2/").map_or(url, |at| &url[at..])
}

/// An error and its causes, joined: reqwest's own words ("error sending request")
/// hide the one that matters ("Connection refused").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = source.and_then(std::error::Error::source);
    }
    text
}

/// A failure of the registry client, as a source failure.
pub fn classify(error: OciDistributionError) -> SourceFailure {
    let (code, text) = match &error {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            (Code::Unauthenticated, error.to_string())
        }
        OciDistributionError::ImageManifestNotFoundError(_) => (Code::NotFound, error.to_string()),
        OciDistributionError::DigestError(_) => (Code::DataLoss, error.to_string()),
        OciDistributionError::RegistryError { envelope, url } => {
            let said: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| match (&e.code, e.message.is_empty()) {
                    (OciErrorCode::Other(code), true) => code.clone(),
                    (code, true) => format!("{code:?}"),
                    (_, false) => e.message.clone(),
                })
                .collect();
            (
                envelope_code(envelope),
                format!("{} ({})", said.join("; "), url_path(url)),
            )
        }
        OciDistributionError::ServerError { code, url, message } => {
            let reason = http::StatusCode::from_u16(*code)
                .ok()
                .and_then(|status| status.canonical_reason())
                .unwrap_or("");
            (
                http_code(*code),
                format!(
                    "HTTP {code} {reason} ({}): {message}",
                    url_path(url),
                    message = message.trim()
                ),
            )
        }
        _ => (Code::Unavailable, with_causes(&error)),
    };
    // The text can hold whatever a registry or token endpoint chose to answer.
    SourceFailure {
        fatal: code == Code::DataLoss,
        code,
        message: excerpt_to(&text, REGISTRY_TEXT_CHARS),
        storage_down: false,
    }
}

/// A download of blob `digest` that broke part-way: bytes that do not match the
/// digest are bad content, anything else (the connection reset or closed) a source
/// that went away.
pub fn broken_download(digest: &str, error: &std::io::Error) -> SourceFailure {
    let bad_bytes = error
        .get_ref()
        .is_some_and(|inner| inner.is::<DigestError>());
    let code = if bad_bytes {
        Code::DataLoss
    } else {
        Code::Unavailable
    };
    SourceFailure {
        fatal: bad_bytes,
        code,
        message: excerpt_to(
            &format!("downloading {digest}: {}", with_causes(error)),
            REGISTRY_TEXT_CHARS,
        ),
        storage_down: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_client::errors::OciError;

    fn registry_error(code: OciErrorCode, message: &str) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: message.into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://127.0.0.1:5000/v2/tests/app/manifests/missing".into(),
        }
    }

    #[test]
    fn registry_answers_keep_their_meaning() {
        let cases = [
            (
                registry_error(OciErrorCode::ManifestUnknown, "manifest unknown"),
                Code::NotFound,
                "manifest unknown (/v2/tests/app/manifests/missing)",
            ),
            (
                registry_error(OciErrorCode::BlobUnknown, "blob unknown to registry"),
                Code::NotFound,
                "blob unknown to registry",
            ),
            (
                registry_error(OciErrorCode::NameUnknown, ""),
                Code::NotFound,
                "NameUnknown",
            ),
            (
                registry_error(OciErrorCode::Denied, "requested access is denied"),
                Code::PermissionDenied,
                "denied",
            ),
            (
                registry_error(OciErrorCode::Toomanyrequests, "slow down"),
                Code::ResourceExhausted,
                "slow down",
            ),
            (
                OciDistributionError::ServerError {
                    code: 503,
                    url: "http://127.0.0.1:5000/v2/tests/app/blobs/sha256:ab".into(),
                    message: "upstream down\n".into(),
                },
                Code::Unavailable,
                "HTTP 503 Service Unavailable (/v2/tests/app/blobs/sha256:ab): upstream down",
            ),
            (
                OciDistributionError::ServerError {
                    code: 404,
                    url: "http://127.0.0.1:5000/v2/x/manifests/y".into(),
                    message: "404 page not found".into(),
                },
                Code::NotFound,
                "HTTP 404 Not Found",
            ),
            (
                OciDistributionError::ServerError {
                    code: 500,
                    url: "http://127.0.0.1:5000/v2/x/manifests/y".into(),
                    message: String::new(),
                },
                Code::Unavailable,
                "HTTP 500 Internal Server Error",
            ),
        ];
        for (error, code, words) in cases {
            let failure = classify(error);
            assert_eq!(failure.code, code, "{}", failure.message);
            assert!(failure.message.contains(words), "{}", failure.message);
            assert!(
                !failure.fatal && !failure.storage_down,
                "{}",
                failure.message
            );
        }
    }

    #[test]
    fn registry_text_is_quoted_short() {
        let failure = classify(OciDistributionError::AuthenticationFailure(format!(
            "denied\n{}",
            "x".repeat(20_000)
        )));
        assert_eq!(failure.code, Code::Unauthenticated);
        assert!(
            failure.message.len() < REGISTRY_TEXT_CHARS + 60 && !failure.message.contains('\n'),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_broken_download_is_unavailable_and_bad_bytes_are_data_loss() {
        let reset = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        );
        let failure = broken_download("sha256:ab", &reset);
        assert_eq!(failure.code, Code::Unavailable);
        assert!(!failure.fatal, "another source may have it");
        assert!(
            failure.message.starts_with("downloading sha256:ab: ")
                && failure.message.contains("connection reset"),
            "{}",
            failure.message
        );
        let mismatch = std::io::Error::other(DigestError::VerificationError {
            expected: "sha256:ab".into(),
            actual: "sha256:cd".into(),
        });
        let failure = broken_download("sha256:ab", &mismatch);
        assert_eq!(failure.code, Code::DataLoss);
        assert!(failure.fatal);
    }

    #[test]
    fn storage_refusing_the_content_ends_the_pull_with_its_code() {
        let socket = Path::new("/run/trellis/storage.sock");
        for code in [
            Code::DataLoss,
            Code::InvalidArgument,
            Code::ResourceExhausted,
        ] {
            let failure =
                SourceFailure::storage(socket, Status::new(code, "layer over the size limit"));
            assert!(failure.fatal, "{code:?}: no other source is tried");
            assert_eq!(failure.code, code, "passed through");
            assert!(
                failure.message.ends_with(": layer over the size limit"),
                "{}",
                failure.message
            );
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Internal] {
            let failure = SourceFailure::storage(socket, Status::new(code, "down"));
            assert!(!failure.fatal, "{code:?}: another source may do");
            assert!(!failure.storage_down, "storage answered");
        }
        let stuck = SourceFailure::storage_stuck(socket, std::time::Duration::from_secs(2));
        assert_eq!(stuck.code, Code::DeadlineExceeded);
        assert!(stuck.storage_down && stuck.fatal, "no source is at fault");
        assert_eq!(
            stuck.message,
            "storage service did not answer within 2.0s on /run/trellis/storage.sock (image.pull_progress_timeout_seconds)"
        );
    }
}
