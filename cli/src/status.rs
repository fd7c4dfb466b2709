//! `trellis status`: one line per service, or one JSON document for scripts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic_health::pb::health_check_response::ServingStatus;
use trellis_common::config::{Config, ServiceKind};
use trellis_proto::service::v1::InfoResponse;

use crate::output::outln;
use crate::probe;

/// What `trellis status` learnt of one service.
#[derive(Debug, Default, serde::Serialize)]
pub struct ServiceStatus {
    /// The service, or one of its replicas (`image-2`).
    pub service: String,
    /// SERVING, NOT_SERVING, UNKNOWN... or DOWN when its socket did not answer.
    pub health: String,
    /// Why the service says it cannot do its job; empty while SERVING.
    pub not_serving_reason: String,
    pub socket: String,
    pub pid: Option<u32>,
    pub version: Option<String>,
    pub uptime_seconds: Option<u64>,
    /// `host:port` of its Prometheus endpoint; none when it exports no metrics.
    pub metrics_address: Option<String>,
    pub bus: Option<BusStatus>,
    /// Restarts of the service by `trellis up`; none when no `trellis up` runs it.
    pub restarts: Option<u64>,
    /// Why the service's info could not be read, when it could not.
    pub error: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct BusStatus {
    /// Empty when no bus is configured.
    pub url: String,
    pub connected: bool,
    pub outbox_pending: u64,
    pub outbox_dropped: u64,
}

/// Prints the table (or, with `json`, one document); true when every service is serving.
pub async fn run(config: &Config, json: bool) -> bool {
    let restarts = crate::restarts::read(&config.node.run_dir);
    let mut services = Vec::new();
    for kind in ServiceKind::START_ORDER {
        // Gateway replicas share the CRI socket: whichever answers stands for them.
        for (index, socket) in config.replica_sockets(kind).into_iter().enumerate() {
            let name = trellis_common::config::replica_name(kind, index as u32 + 1);
            let mut status = ask(&name, socket).await;
            status.restarts = restarts
                .as_ref()
                .map(|counts| counts.get(&name).copied().unwrap_or(0));
            services.push(status);
        }
    }
    let all_serving = services.iter().all(|s| s.health == "SERVING");
    if json {
        let document = serde_json::json!({
            "all_serving": all_serving,
            "services": services,
        });
        outln!("{document:#}");
    } else {
        print_table(&services);
    }
    all_serving
}

async fn ask(name: &str, socket: std::path::PathBuf) -> ServiceStatus {
    let health = match probe::health(&socket).await {
        Ok(status) => status.as_str_name().to_string(),
        Err(_) => "DOWN".to_string(),
    };
    let mut status = ServiceStatus {
        service: name.to_string(),
        health,
        not_serving_reason: String::new(),
        socket: socket.display().to_string(),
        ..Default::default()
    };
    match probe::info(&socket).await {
        Ok(info) => fill(&mut status, info, now_unix_seconds()),
        Err(error) => status.error = Some(error),
    }
    status
}

fn now_unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn fill(status: &mut ServiceStatus, info: InfoResponse, now: i64) {
    status.pid = Some(info.pid);
    status.version = Some(info.version);
    // A start "in the future" (a clock set back) is no negative uptime.
    status.uptime_seconds = (info.started_unix_seconds > 0)
        .then(|| now.saturating_sub(info.started_unix_seconds).max(0) as u64);
    status.metrics_address = Some(info.metrics_address).filter(|a| !a.is_empty());
    status.bus = info.bus.map(|bus| BusStatus {
        url: bus.url,
        connected: bus.connected,
        outbox_pending: bus.outbox_pending,
        outbox_dropped: bus.outbox_dropped,
    });
    if status.health != ServingStatus::Serving.as_str_name() {
        status.not_serving_reason = info.not_serving_reason;
    }
}

fn print_table(services: &[ServiceStatus]) {
    outln!(
        "{:<8} {:<12} {:>8} {:<8} {:>9} {:>8} {:<21} {:<34} BUS",
        "SERVICE",
        "HEALTH",
        "PID",
        "VERSION",
        "UPTIME",
        "RESTARTS",
        "METRICS",
        "SOCKET"
    );
    for status in services {
        let bus = match (&status.bus, &status.error) {
            (_, Some(error)) => trellis_common::text::excerpt_to(error, 200),
            (Some(bus), None) if bus.url.is_empty() => "none configured".to_string(),
            (Some(bus), None) => format!(
                "{} {}, {} pending{}",
                bus.url,
                if bus.connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                bus.outbox_pending,
                if bus.outbox_dropped > 0 {
                    format!(", {} dropped", bus.outbox_dropped)
                } else {
                    String::new()
                }
            ),
            (None, None) => "-".to_string(),
        };
        outln!(
            "{:<8} {:<12} {:>8} {:<8} {:>9} {:>8} {:<21} {:<34} {}",
            status.service,
            status.health,
            status.pid.map_or("-".to_string(), |pid| pid.to_string()),
            status.version.as_deref().unwrap_or("-"),
            status
                .uptime_seconds
                .map_or("-".to_string(), |s| uptime(Duration::from_secs(s))),
            status.restarts.map_or("-".to_string(), |n| n.to_string()),
            status.metrics_address.as_deref().unwrap_or("-"),
            status.socket,
            bus
        );
        if !status.not_serving_reason.is_empty() {
            outln!(
                "{:<8} why: {}",
                "",
                trellis_common::text::excerpt_to(&status.not_serving_reason, 400)
            );
        }
    }
}

/// `42s`, `5m07s`, `3h02m`, `4d03h`: short enough for a column, exact enough to see
/// a restart.
fn uptime(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use trellis_proto::service::v1::BusInfo;

    use super::*;

    #[test]
    fn uptime_is_short_and_readable() {
        assert_eq!(uptime(Duration::from_secs(42)), "42s");
        assert_eq!(uptime(Duration::from_secs(307)), "5m07s");
        assert_eq!(uptime(Duration::from_secs(3 * 3600 + 120)), "3h02m");
        assert_eq!(uptime(Duration::from_secs(4 * 86400 + 3 * 3600)), "4d03h");
    }

    #[test]
    fn info_fills_uptime_metrics_and_bus() {
        let mut status = ServiceStatus {
            service: "runtime".into(),
            health: "NOT_SERVING".into(),
            not_serving_reason: String::new(),
            socket: "/run/trellis/runtime.sock".into(),
            ..Default::default()
        };
        let info = InfoResponse {
            pid: 42,
            version: "0.1.0".into(),
            started_unix_seconds: 1_000,
            metrics_address: String::new(),
            not_serving_reason: "disk full".into(),
            bus: Some(BusInfo {
                url: "nats://127.0.0.1:4222".into(),
                connected: true,
                outbox_pending: 3,
                outbox_dropped: 0,
            }),
            ..Default::default()
        };
        fill(&mut status, info, 1_090);
        assert_eq!(status.uptime_seconds, Some(90));
        assert_eq!(status.metrics_address, None, "none exported");
        assert_eq!(status.not_serving_reason, "disk full");
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["bus"]["outbox_pending"], 3);
        assert_eq!(json["pid"], 42);
        assert!(json["restarts"].is_null());
    }
}
