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
    #[error("{what} timed out after {seconds} s")]
    Timeout { what: String, seconds: u64 },
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

    pub fn storage(status: Status) -> Self {
        Self::Backend {
            service: "storage",
            status,
        }
    }

    pub fn network(status: Status) -> Self {
        Self::Backend {
            service: "network",
            status,
        }
    }
}

impl From<RuntimeError> for Status {
    fn from(error: RuntimeError) -> Self {
        let message = error.to_string();
        match error {
            RuntimeError::InvalidArgument(_) => Status::invalid_argument(message),
            RuntimeError::NotFound(_) => Status::not_found(message),
            RuntimeError::AlreadyExists(_) => Status::already_exists(message),
            RuntimeError::FailedPrecondition(_) => Status::failed_precondition(message),
            RuntimeError::Backend { status, .. } => Status::new(status.code(), message),
            RuntimeError::Unreachable { .. } => Status::unavailable(message),
            RuntimeError::NoAnswer { .. } => Status::deadline_exceeded(message),
            RuntimeError::Timeout { .. } => Status::deadline_exceeded(message),
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
