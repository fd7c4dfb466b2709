//! The network service's one error type, and how each error is told to a caller.

use trellis_common::store::StoreError;

use crate::cni::CniExecError;
use crate::cni::result::CODE_TRY_AGAIN_LATER;
use crate::cni_config::CniError;
use crate::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("the network service is stopping")]
    ShuttingDown,
    #[error("the pod network is not ready ({reason}): {source}")]
    NotReady {
        reason: &'static str,
        #[source]
        source: CniError,
    },
    #[error(transparent)]
    Plugin(#[from] CniExecError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("record of sandbox {sandbox_id} in table {table} is unreadable: {problem}")]
    Record {
        sandbox_id: String,
        table: &'static str,
        problem: String,
    },
    #[error("sandbox {sandbox_id}: the CNI result of network {network} is unusable: {message}")]
    BadResult {
        sandbox_id: String,
        network: String,
        message: String,
    },
    /// A fail point set by a test (debug builds only).
    #[error(transparent)]
    FailPoint(#[from] trellis_common::failpoint::FailPointError),
    #[error("sandbox {0} has no pod network")]
    NotFound(String),
    #[error(
        "{error}; rolling back sandbox {sandbox_id} also failed: {rollback} (TearDownPod retries it)"
    )]
    RollbackFailed {
        sandbox_id: String,
        error: Box<NetworkError>,
        rollback: Box<NetworkError>,
    },
}

impl NetworkError {
    pub fn not_ready(source: CniError) -> Self {
        Self::NotReady {
            reason: source.reason(),
            source,
        }
    }

    /// The plugin that failed, for the failure counter.
    pub fn plugin(&self) -> &str {
        match self {
            Self::Plugin(error) => error.plugin(),
            Self::RollbackFailed { error, .. } => error.plugin(),
            Self::Netns(_) => "netns",
            _ => "",
        }
    }

    pub fn code(&self) -> tonic::Code {
        if trellis_common::error::is_out_of_space(self) {
            return tonic::Code::ResourceExhausted;
        }
        match self {
            Self::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Self::NotReady { .. } => tonic::Code::FailedPrecondition,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::ShuttingDown => tonic::Code::Unavailable,
            Self::Plugin(error) if error.cni_code() == Some(CODE_TRY_AGAIN_LATER) => {
                tonic::Code::Unavailable
            }
            Self::RollbackFailed { error, .. } => error.code(),
            Self::Store(error) => error.code(),
            _ => tonic::Code::Internal,
        }
    }
}

impl From<NetworkError> for tonic::Status {
    fn from(error: NetworkError) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_space_is_resource_exhausted_and_a_store_being_reopened_unavailable() {
        let records = NetworkError::Store(StoreError::Engine {
            path: "/var/lib/trellis/network/db".into(),
            table: "pods".into(),
            source: sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        });
        assert_eq!(records.code(), tonic::Code::ResourceExhausted);
        assert!(records.to_string().contains("/var/lib/trellis/network/db"));
        let netns = NetworkError::Netns(NetnsError::Sys {
            sandbox_id: "x".into(),
            what: "pin",
            path: "/run/trellis/netns/x".into(),
            source: nix::errno::Errno::ENOSPC,
        });
        assert_eq!(netns.code(), tonic::Code::ResourceExhausted);
        let broken = NetworkError::Store(StoreError::Broken {
            path: "/var/lib/trellis/network/db".into(),
            source: sled::Error::Io(std::io::Error::from(std::io::ErrorKind::Other)),
        });
        assert_eq!(broken.code(), tonic::Code::Unavailable);
    }
}
