use tonic::{Code, Status};
use trellis_common::reference::ReferenceError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("pulling {image}: {failures}")]
    Registry {
        image: String,
        failures: String,
        code: Code,
    },
    #[error(
        "pulling {image}: nothing received for {seconds} s while fetching {digest} from {source_name}; cancelled"
    )]
    Stalled {
        image: String,
        digest: String,
        source_name: String,
        seconds: u64,
    },
    #[error("pulling {image}: image config {digest} is not usable: {reason}")]
    BadConfig {
        image: String,
        digest: String,
        reason: String,
    },
    #[error("storage service: {}", .0.message())]
    Storage(Status),
    /// Storage was down or stuck during the pull: no source is at fault.
    #[error("pulling {image}: {message}")]
    StorageDown {
        image: String,
        message: String,
        code: Code,
    },
    #[error("credentials file {path}: {reason}")]
    Credentials { path: String, reason: String },
}

impl From<Status> for ImageError {
    fn from(status: Status) -> Self {
        Self::Storage(status)
    }
}

impl From<ImageError> for Status {
    fn from(error: ImageError) -> Self {
        let message = error.to_string();
        match error {
            ImageError::Reference(_) | ImageError::InvalidArgument(_) => {
                Status::invalid_argument(message)
            }
            ImageError::Registry { code, .. } => Status::new(code, message),
            ImageError::Stalled { .. } => Status::deadline_exceeded(message),
            ImageError::BadConfig { .. } => Status::data_loss(message),
            ImageError::Storage(status) => Status::new(status.code(), message),
            ImageError::StorageDown { code, .. } => Status::new(code, message),
            ImageError::Credentials { .. } => Status::failed_precondition(message),
        }
    }
}
