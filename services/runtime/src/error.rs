//! The runtime crate's errors, each with the gRPC code the kubelet gets.

use tonic::Status;
use trellis_common::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    System {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The service answered with an error: its code and words are passed on.
    #[error("{service} service: {}", status.message())]
    Backend {
        service: &'static str,
        status: Status,
    },
    /// The service was not reached, or dropped the call: that service, not this one,
    /// is down.
    /// (`trellis_common::upstream::unreached_message` words it.)
    #[error("{message}")]
    Unreachable {
        service: &'static str,
        message: String,
    },
    /// The service took the call but did not answer within what the caller's
    /// deadline left (`trellis_common::upstream::no_answer_message`).
    #[error("{message}")]
    NoAnswer {
        service: &'static str,
        message: String,
    },
    #[error("{0}")]
    Oci(String),
    /// The OCI runtime was asked to start a container it had started already and that
    /// still runs: an earlier start whose record was lost to a kill.
    #[error("container {0} was started already")]
    AlreadyStarted(String),
    #[error("{what} timed out after {seconds} s")]
    Timeout { what: String, seconds: u64 },
    /// A fail point set by a test (debug builds only).
    #[error(transparent)]
    FailPoint(#[from] trellis_common::failpoint::FailPointError),
    /// The clean-up of a failed set-up could not finish yet; it keeps the code of
    /// what stopped it (a backend Unavailable, a full disk) so the caller can retry.
    #[error("{what}: {source}")]
    Unfinished {
        what: String,
        #[source]
        source: Box<RuntimeError>,
    },
    /// A streaming (exec, attach, port-forward) session failed.
    #[error("streaming: {0}")]
    Streaming(String),
}

impl RuntimeError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub fn system(what: impl Into<String>, source: nix::Error) -> Self {
        Self::System {
            what: what.into(),
            source,
        }
    }
}

impl From<RuntimeError> for Status {
    fn from(error: RuntimeError) -> Self {
        let message = error.to_string();
        // A full disk (a pod directory, a log, a record) is retried once space is
        // freed: never Internal.
        if trellis_common::error::is_out_of_space(&error) {
            return Status::resource_exhausted(message);
        }
        match error {
            RuntimeError::InvalidArgument(_) => Status::invalid_argument(message),
            RuntimeError::NotFound(_) => Status::not_found(message),
            RuntimeError::AlreadyExists(_) => Status::already_exists(message),
            RuntimeError::FailedPrecondition(_) | RuntimeError::AlreadyStarted(_) => {
                Status::failed_precondition(message)
            }
            RuntimeError::Backend { status, .. } => Status::new(status.code(), message),
            RuntimeError::Unreachable { .. } => Status::unavailable(message),
            RuntimeError::NoAnswer { .. } => Status::deadline_exceeded(message),
            RuntimeError::Timeout { .. } => Status::deadline_exceeded(message),
            RuntimeError::Unfinished { source, .. } => {
                Status::new(Status::from(*source).code(), message)
            }
            RuntimeError::Store(error) => Status::new(error.code(), message),
            _ => Status::internal(message),
        }
    }
}

impl From<trellis_streaming::StreamingError> for RuntimeError {
    fn from(error: trellis_streaming::StreamingError) -> Self {
        match error {
            trellis_streaming::StreamingError::Io { what, source } => {
                RuntimeError::io(what, source)
            }
            other => RuntimeError::Streaming(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32)
    }

    #[test]
    fn out_of_space_is_resource_exhausted_naming_the_path_never_internal() {
        let log = RuntimeError::io("cannot create the log /var/log/pods/x/c.log", enospc());
        let status = Status::from(log);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("/var/log/pods/x/c.log"),
            "{status:?}"
        );

        let record = RuntimeError::Store(StoreError::Engine {
            path: PathBuf::from("/var/lib/trellis/runtime/db"),
            table: "pods".into(),
            source: sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        });
        let status = Status::from(record);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("/var/lib/trellis/runtime/db"),
            "{status:?}"
        );

        let quota = RuntimeError::system(
            "cannot write /run/trellis/runtime/pods/x/hosts",
            nix::errno::Errno::EDQUOT,
        );
        assert_eq!(Status::from(quota).code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn a_store_being_reopened_is_unavailable_and_other_io_errors_internal() {
        let broken = RuntimeError::Store(StoreError::Broken {
            path: PathBuf::from("/var/lib/trellis/runtime/db"),
            source: sled::Error::Io(std::io::Error::from(std::io::ErrorKind::Other)),
        });
        assert_eq!(Status::from(broken).code(), tonic::Code::Unavailable);
        let denied = RuntimeError::io(
            "cannot open /x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(Status::from(denied).code(), tonic::Code::Internal);
    }
}
