use crate::bus::BusError;
use crate::config::ConfigError;
use crate::metrics::MetricsError;
use crate::store::StoreError;
use crate::telemetry::TelemetryError;
use crate::transport::TransportError;

/// Everything the shared service machinery can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("socket activation: {0}")]
    Activation(#[from] crate::activation::ActivationError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the service: {0}")]
    Build(Box<dyn std::error::Error + Send + Sync>),
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

/// Whether `error`, or any error it was caused by, is a full filesystem or an exhausted
/// disk quota: something the caller may retry once space is freed (gRPC
/// `ResourceExhausted`), never lost or corrupt data.
///
/// The cause may be several layers down (an unpack error around an `io::Error`, a
/// record store error around sled's), and sled keeps only the error's kind when it
/// passes an I/O failure on, so both the OS error number and the kind are looked at.
pub fn is_out_of_space(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let io = error.downcast_ref::<std::io::Error>().or_else(|| {
            match error.downcast_ref::<sled::Error>() {
                Some(sled::Error::Io(io)) => Some(io),
                _ => None,
            }
        });
        if let Some(io) = io {
            if io_is_out_of_space(io) {
                return true;
            }
            // A custom I/O error (`io::Error::other`) hides its inner error from
            // `source()`.
            if let Some(inner) = io.get_ref()
                && is_out_of_space(inner)
            {
                return true;
            }
        }
        if let Some(errno) = error.downcast_ref::<nix::errno::Errno>()
            && matches!(errno, nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// [`is_out_of_space`] for one I/O error.
pub fn io_is_out_of_space(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        error.raw_os_error(),
        Some(code) if code == Errno::ENOSPC as i32 || code == Errno::EDQUOT as i32
    ) || matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("unpacking {path}: {source}")]
    struct Wrapper {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn full_disks_and_quotas_are_found_however_deep() {
        let enospc = || std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
        let edquot = std::io::Error::from_raw_os_error(nix::errno::Errno::EDQUOT as i32);
        assert!(is_out_of_space(&enospc()));
        assert!(is_out_of_space(&edquot));
        assert!(is_out_of_space(&std::io::Error::from(
            std::io::ErrorKind::StorageFull
        )));
        assert!(is_out_of_space(&Wrapper {
            path: "/x".into(),
            source: enospc()
        }));
        assert!(is_out_of_space(&std::io::Error::other(Wrapper {
            path: "/x".into(),
            source: enospc()
        })));
        // sled passes an I/O failure on with its kind only.
        let sled_error = sled::Error::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (os error 28)",
        ));
        assert!(is_out_of_space(&sled_error));
        assert!(is_out_of_space(&nix::errno::Errno::ENOSPC));
        for other in [
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32),
            std::io::Error::other("no space, says the message, but it is no ENOSPC"),
        ] {
            assert!(!is_out_of_space(&other), "{other}");
        }
    }
}
