use tonic::Status;
use trellis_common::store::StoreError;

use crate::extract::ExtractError;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// A full disk or quota met while writing under `path` (a layer being unpacked).
    #[error("no space left to write {path}: {source}")]
    OutOfSpace {
        path: std::path::PathBuf,
        #[source]
        source: Box<StorageError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pulling {image}: blob {digest} does not match its digest (got {actual})")]
    DigestMismatch {
        image: String,
        digest: String,
        actual: String,
    },
    #[error("pulling {image}: blob {digest} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        image: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "pulling {image}: layer {digest} unpacks to {actual}, the image config says {expected}"
    )]
    DiffIdMismatch {
        image: String,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("pulling {image}: layer {digest} refused: {reason}")]
    TooLarge {
        image: String,
        digest: String,
        reason: String,
    },
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A blocking task (unpack, mount, walk) panicked or was cancelled.
    #[error("storage worker stopped: {0}")]
    Worker(String),
    #[error("image {image} is in use by container {container}")]
    InUse { image: String, container: String },
    /// A fail point set by a test (debug builds only).
    #[error(transparent)]
    FailPoint(#[from] trellis_common::failpoint::FailPointError),
    #[error("cannot {action} {target}: {source}")]
    Mount {
        action: &'static str,
        target: String,
        #[source]
        source: nix::Error,
    },
}

impl StorageError {
    /// Whether the file system or the record store failed, rather than the request
    /// or the content being refused.
    pub fn is_write_failure(&self) -> bool {
        matches!(
            self,
            Self::Io { .. }
                | Self::OutOfSpace { .. }
                | Self::Store(_)
                | Self::Worker(_)
                | Self::Mount { .. }
        )
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<StorageError> for Status {
    fn from(error: StorageError) -> Self {
        let message = error.to_string();
        // A full disk or quota: the caller may retry once space is freed.
        if trellis_common::error::is_out_of_space(&error) {
            return Status::resource_exhausted(message);
        }
        match error {
            StorageError::TooLarge { .. } => Status::resource_exhausted(message),
            // An entry that would reach out of its layer: the image is unacceptable.
            StorageError::Extract(ExtractError::Refused { .. }) => {
                Status::invalid_argument(message)
            }
            StorageError::InvalidArgument(_) => Status::invalid_argument(message),
            StorageError::NotFound(_) => Status::not_found(message),
            StorageError::FailedPrecondition(_) => Status::failed_precondition(message),
            StorageError::InUse { .. } => Status::failed_precondition(message),
            StorageError::Store(error) => Status::new(error.code(), message),
            // Bad content from a registry: the caller's input was wrong, not us.
            StorageError::DigestMismatch { .. }
            | StorageError::SizeMismatch { .. }
            | StorageError::DiffIdMismatch { .. }
            | StorageError::Extract(_)
            | StorageError::Corrupt(_) => Status::data_loss(message),
            _ => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32)
    }

    #[test]
    fn out_of_space_is_resource_exhausted_never_data_loss_or_internal() {
        let unpack = StorageError::OutOfSpace {
            path: "/var/lib/trellis/storage/layers/tmp-1".into(),
            source: Box::new(StorageError::Extract(ExtractError::Io {
                entry: "bin/busybox".into(),
                source: enospc(),
            })),
        };
        let status = Status::from(unpack);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("/var/lib/trellis/storage/layers/tmp-1"),
            "{status:?}"
        );
        for error in [
            StorageError::Extract(ExtractError::Io {
                entry: "etc".into(),
                source: enospc(),
            }),
            StorageError::io(
                "cannot create /var/lib/trellis/storage/containers/x",
                enospc(),
            ),
            StorageError::Mount {
                action: "mount",
                target: "/var/lib/trellis/storage/containers/x/merged".into(),
                source: nix::errno::Errno::ENOSPC,
            },
            StorageError::Store(trellis_common::store::StoreError::Engine {
                path: "/var/lib/trellis/storage/db".into(),
                table: "images".into(),
                source: sled::Error::Io(std::io::Error::from(std::io::ErrorKind::QuotaExceeded)),
            }),
        ] {
            let message = error.to_string();
            assert_eq!(
                Status::from(error).code(),
                tonic::Code::ResourceExhausted,
                "{message}"
            );
        }
        // Bad content stays DataLoss.
        let garbage = StorageError::Extract(ExtractError::Tar("bad header".into()));
        assert_eq!(Status::from(garbage).code(), tonic::Code::DataLoss);
    }
}
