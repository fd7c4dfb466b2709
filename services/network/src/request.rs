//! Checking what a caller asks for and turning it into the CNI's terms.

use std::net::IpAddr;

use serde_json::{Map, Value, json};
use trellis_proto::network::v1::{DnsConfig, PortMapping, SetUpPodRequest, port_mapping};

use crate::error::NetworkError;

const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";

/// Sandbox ids name files and go into `CNI_CONTAINERID`: `[A-Za-z0-9_.-]{1,128}`,
/// and not `.` or `..`.
pub fn validate_sandbox_id(sandbox_id: &str) -> Result<(), NetworkError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if sandbox_id.is_empty()
        || sandbox_id.len() > 128
        || !sandbox_id.chars().all(allowed)
        || sandbox_id == "."
        || sandbox_id == ".."
    {
        return Err(NetworkError::InvalidArgument(format!(
            "sandbox id {sandbox_id:?} must be 1 to 128 of A-Z a-z 0-9 _ . - (and not . or ..)"
        )));
    }
    Ok(())
}

/// Pod name, namespace and uid go into `CNI_ARGS`, whose separators they must not hold.
fn validate_cni_arg(what: &str, value: &str) -> Result<(), NetworkError> {
    if value.contains([';', '=']) || value.chars().any(char::is_control) {
        return Err(NetworkError::InvalidArgument(format!(
            "{what} {value:?} may not contain ';', '=' or control characters"
        )));
    }
    Ok(())
}

/// Checks the request; the values for the plugins' capabilities.
pub fn runtime_config(request: &SetUpPodRequest) -> Result<Map<String, Value>, NetworkError> {
    validate_sandbox_id(&request.sandbox_id)?;
    validate_cni_arg("pod name", &request.pod_name)?;
    validate_cni_arg("pod namespace", &request.pod_namespace)?;
    validate_cni_arg("pod uid", &request.pod_uid)?;
    let mut config = Map::new();
    let mappings = request
        .port_mappings
        .iter()
        .filter(|m| m.host_port != 0)
        .map(port_mapping)
        .collect::<Result<Vec<_>, _>>()?;
    if !mappings.is_empty() {
        config.insert("portMappings".into(), Value::Array(mappings));
    }
    if let Some(bandwidth) = bandwidth(request)? {
        config.insert("bandwidth".into(), bandwidth);
    }
    if !request.ip_ranges.is_empty() {
        let ranges = request
            .ip_ranges
            .iter()
            .map(|cidr| subnet(cidr).map(|subnet| json!([{ "subnet": subnet }])))
            .collect::<Result<Vec<_>, _>>()?;
        config.insert("ipRanges".into(), Value::Array(ranges));
    }
    if let Some(dns) = request
        .dns
        .as_ref()
        .filter(|dns| *dns != &DnsConfig::default())
    {
        config.insert(
            "dns".into(),
            json!({ "servers": dns.servers, "searches": dns.searches, "options": dns.options }),
        );
    }
    Ok(config)
}

fn port_mapping(mapping: &PortMapping) -> Result<Value, NetworkError> {
    let bad = |message: String| {
        NetworkError::InvalidArgument(format!("port mapping {mapping:?}: {message}"))
    };
    let in_range = |port: i32| (1..=65535).contains(&port);
    if !in_range(mapping.container_port) || !in_range(mapping.host_port) {
        return Err(bad("ports must be 1 to 65535".into()));
    }
    if !mapping.host_ip.is_empty() {
        mapping
            .host_ip
            .parse::<IpAddr>()
            .map_err(|e| bad(format!("host_ip: {e}")))?;
    }
    let protocol = match port_mapping::Protocol::try_from(mapping.protocol) {
        Ok(port_mapping::Protocol::Tcp) => "tcp",
        Ok(port_mapping::Protocol::Udp) => "udp",
        Ok(port_mapping::Protocol::Sctp) => "sctp",
        Err(_) => return Err(bad("unknown protocol".into())),
    };
    Ok(
        json!({ "hostPort": mapping.host_port, "containerPort": mapping.container_port, "protocol": protocol, "hostIP": mapping.host_ip }),
    )
}

fn subnet(cidr: &str) -> Result<&str, NetworkError> {
    let bad = || NetworkError::InvalidArgument(format!("ip range {cidr:?} is not a CIDR subnet"));
    let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let address: IpAddr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > if address.is_ipv4() { 32 } else { 128 } {
        return Err(bad());
    }
    Ok(cidr)
}

/// The bandwidth plugin's limits from the pod's annotations (bits per second); the
/// burst is left as large as the plugin allows, as CRI-O does.
fn bandwidth(request: &SetUpPodRequest) -> Result<Option<Value>, NetworkError> {
    let rate = |key: &str| -> Result<Option<u64>, NetworkError> {
        request
            .annotations
            .get(key)
            .map(|text| {
                quantity(text).ok_or_else(|| {
                    NetworkError::InvalidArgument(format!(
                        "annotation {key}: {text:?} is not a quantity such as 10M"
                    ))
                })
            })
            .transpose()
    };
    let (ingress, egress) = (rate(INGRESS_BANDWIDTH)?, rate(EGRESS_BANDWIDTH)?);
    if ingress.is_none() && egress.is_none() {
        return Ok(None);
    }
    let mut limits = Map::new();
    let burst = u64::from(u32::MAX);
    if let Some(rate) = ingress {
        limits.insert("ingressRate".into(), rate.into());
        limits.insert("ingressBurst".into(), burst.into());
    }
    if let Some(rate) = egress {
        limits.insert("egressRate".into(), rate.into());
        limits.insert("egressBurst".into(), burst.into());
    }
    Ok(Some(Value::Object(limits)))
}

/// A Kubernetes quantity such as `10M`, `1Gi` or `500k`, as a whole number.
fn quantity(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> SetUpPodRequest {
        SetUpPodRequest {
            sandbox_id: "abc-1.2_3".into(),
            pod_name: "web".into(),
            pod_namespace: "default".into(),
            pod_uid: "u-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn sandbox_ids_are_checked() {
        for good in ["a", "abc-1.2_3", &"x".repeat(128)] {
            assert!(validate_sandbox_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129), "é"] {
            assert!(
                matches!(
                    validate_sandbox_id(bad),
                    Err(NetworkError::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn capabilities_from_the_request() {
        let mut request = request();
        request.port_mappings = vec![
            PortMapping {
                protocol: port_mapping::Protocol::Udp.into(),
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            },
            PortMapping {
                protocol: 0,
                container_port: 80,
                host_port: 0,
                host_ip: String::new(),
            },
        ];
        request
            .annotations
            .insert(INGRESS_BANDWIDTH.into(), "10M".into());
        request.ip_ranges = vec!["10.9.0.0/24".into()];
        let config = runtime_config(&request).expect("valid");
        assert_eq!(
            config["portMappings"],
            json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}])
        );
        assert_eq!(config["bandwidth"]["ingressRate"], 10_000_000);
        assert!(config["bandwidth"].get("egressRate").is_none());
        assert_eq!(config["ipRanges"], json!([[{"subnet": "10.9.0.0/24"}]]));
        assert!(config.get("dns").is_none());
    }

    #[test]
    fn bad_values_are_invalid_arguments() {
        let mut bad_port = request();
        bad_port.port_mappings = vec![PortMapping {
            protocol: 0,
            container_port: 70000,
            host_port: 80,
            host_ip: String::new(),
        }];
        let mut bad_name = request();
        bad_name.pod_name = "a;b".into();
        let mut bad_range = request();
        bad_range.ip_ranges = vec!["10.0.0.0".into()];
        let mut bad_bandwidth = request();
        bad_bandwidth
            .annotations
            .insert(EGRESS_BANDWIDTH.into(), "fast".into());
        for request in [bad_port, bad_name, bad_range, bad_bandwidth] {
            assert!(
                matches!(
                    runtime_config(&request),
                    Err(NetworkError::InvalidArgument(_))
                ),
                "{request:?}"
            );
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("1Gi"), Some(1 << 30));
        assert_eq!(quantity("500k"), Some(500_000));
        assert_eq!(quantity("7"), Some(7));
        assert_eq!(quantity("1.5M"), None);
        assert_eq!(quantity("M"), None);
    }
}
