//! `trellis status`: one line per service.

use tonic_health::pb::health_check_response::ServingStatus;
use trellis_common::config::{Config, ServiceKind};

use crate::probe;

/// Prints the table; true when every service is serving.
pub async fn run(config: &Config) -> bool {
    println!(
        "{:<8} {:<12} {:>8} {:<8} {:<34} BUS",
        "SERVICE", "HEALTH", "PID", "VERSION", "SOCKET"
    );
    let mut all_serving = true;
    for kind in ServiceKind::START_ORDER {
        let socket = config.endpoint(kind).socket;
        let health = match probe::health(&socket).await {
            Ok(ServingStatus::Serving) => "SERVING".to_string(),
            Ok(other) => other.as_str_name().to_string(),
            Err(_) => "DOWN".to_string(),
        };
        all_serving &= health == "SERVING";
        let mut not_serving_reason = String::new();
        let (pid, version, bus) = match probe::info(&socket).await {
            Ok(info) => {
                let bus = match info.bus {
                    Some(bus) if bus.url.is_empty() => "none configured".to_string(),
                    Some(bus) => format!(
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
                    None => "-".to_string(),
                };
                not_serving_reason = info.not_serving_reason;
                (info.pid.to_string(), info.version, bus)
            }
            Err(error) => ("-".into(), "-".into(), error),
        };
        println!(
            "{:<8} {:<12} {:>8} {:<8} {:<34} {}",
            kind.name(),
            health,
            pid,
            version,
            socket.display(),
            bus
        );
        if health != "SERVING" && !not_serving_reason.is_empty() {
            println!(
                "{:<8} why: {}",
                "",
                trellis_common::text::excerpt_to(&not_serving_reason, 400)
            );
        }
    }
    all_serving
}
