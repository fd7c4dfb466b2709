//! `trellis up`'s own Prometheus metrics, when `supervisor.metrics_listen` is set:
//! restarts per child and why, and the supervisor's process. Kept in one place the
//! supervision loop reports to (as `restarts` keeps the counts `trellis status` reads).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use trellis_common::ServiceKind;
use trellis_common::metrics::{MetricsError, precreate};

/// Why a child was restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// It exited with a failure of its own.
    Exited,
    /// A signal killed it (SIGKILL, the OOM killer, a crash).
    Killed,
    /// Its health stayed NOT_SERVING for too long (trellis up stopped it).
    Unhealthy,
    /// It exited cleanly without trellis up asking: someone stopped it (an operator's
    /// SIGTERM).
    Operator,
}

impl RestartReason {
    const ALL: [RestartReason; 4] = [Self::Exited, Self::Killed, Self::Unhealthy, Self::Operator];

    fn name(self) -> &'static str {
        match self {
            Self::Exited => "exited",
            Self::Killed => "killed",
            Self::Unhealthy => "unhealthy",
            Self::Operator => "operator",
        }
    }

    /// The reason for a child that ended with `status` (not asked to by trellis up).
    pub fn of(status: &std::io::Result<std::process::ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(status) if status.success() => Self::Operator,
            Ok(status) if status.signal().is_some() => Self::Killed,
            _ => Self::Exited,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    service: String,
    reason: &'static str,
}

static RESTARTS: OnceLock<Family<RestartLabels, Counter>> = OnceLock::new();

/// The children `trellis up` may run: the five services and a private NATS.
fn children() -> impl Iterator<Item = &'static str> {
    ServiceKind::START_ORDER
        .into_iter()
        .map(ServiceKind::name)
        .chain(["nats"])
}

fn registry() -> (Registry, Family<RestartLabels, Counter>) {
    let mut registry = Registry::with_prefix("trellis");
    trellis_common::metrics::process::register_process(
        &mut registry,
        "supervisor",
        trellis_common::service::VERSION,
    );
    let restarts = Family::<RestartLabels, Counter>::default();
    registry.register(
        "supervisor_restarts",
        "Children restarted by trellis up, by child and reason (exited, killed, unhealthy, operator)",
        restarts.clone(),
    );
    precreate(
        &restarts,
        children().flat_map(|service| {
            RestartReason::ALL.map(|reason| RestartLabels {
                service: service.to_string(),
                reason: reason.name(),
            })
        }),
    );
    (registry, restarts)
}

/// Serves the metrics on `address` (none: only counted, for nobody).
pub async fn start(address: Option<SocketAddr>) -> Result<Option<SocketAddr>, MetricsError> {
    let (registry, restarts) = registry();
    let _ = RESTARTS.set(restarts);
    match address {
        Some(address) => Ok(Some(
            trellis_common::metrics::serve(address, Arc::new(registry)).await?,
        )),
        None => Ok(None),
    }
}

/// Counts one restart of `child` for `reason`.
pub fn restarted(child: &str, reason: RestartReason) {
    if let Some(restarts) = RESTARTS.get() {
        restarts
            .get_or_create(&RestartLabels {
                service: child.to_string(),
                reason: reason.name(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every child has a series for every reason at 0 before any restart.
    #[test]
    fn every_child_and_reason_exists_at_zero() {
        let (registry, restarts) = registry();
        restarts
            .get_or_create(&RestartLabels {
                service: "runtime".into(),
                reason: "killed",
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for child in children() {
            for reason in RestartReason::ALL {
                let value = if (child, reason) == ("runtime", RestartReason::Killed) {
                    1
                } else {
                    0
                };
                let series = format!(
                    "trellis_supervisor_restarts_total{{service=\"{child}\",reason=\"{}\"}} {value}",
                    reason.name()
                );
                assert!(text.contains(&series), "{series} missing from\n{text}");
            }
        }
        assert!(text.contains("trellis_build_info{service=\"supervisor\""));
    }

    #[test]
    fn reasons_follow_how_the_child_ended() {
        use std::os::unix::process::ExitStatusExt;
        let status = |raw| Ok(std::process::ExitStatus::from_raw(raw));
        assert_eq!(RestartReason::of(&status(0)), RestartReason::Operator);
        assert_eq!(RestartReason::of(&status(9)), RestartReason::Killed);
        assert_eq!(RestartReason::of(&status(1 << 8)), RestartReason::Exited);
        assert_eq!(
            RestartReason::of(&Err(std::io::Error::other("wait failed"))),
            RestartReason::Exited
        );
    }
}
