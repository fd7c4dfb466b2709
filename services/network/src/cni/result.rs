//! What CNI plugins answer on stdout: a result after ADD (spec 0.3.x, 0.4.0 and 1.0.0
//! share one shape; 0.4.0 marks each IP with a "version", 1.0.0 dropped it) and an
//! error object after a failure.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The parts of an ADD result that Trellis uses. The raw JSON is kept beside it
/// (`prevResult` chaining and DEL/CHECK must hand plugins what they answered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<CniInterface>,
    #[serde(default)]
    pub ips: Vec<CniIp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// The namespace path the interface lives in; empty for host-side interfaces.
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniIp {
    /// CIDR notation: the address and the subnet's prefix length.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

/// One pod address taken from a result.
#[derive(Debug, Clone, PartialEq)]
pub struct PodAddress {
    pub ip: IpAddr,
    pub prefix_length: u8,
    pub gateway: Option<IpAddr>,
}

impl CniResult {
    pub fn parse(json: &serde_json::Value) -> Result<Self, String> {
        serde_json::from_value(json.clone()).map_err(|e| format!("not a CNI result: {e}"))
    }

    /// The pod's addresses on `pod_interface`, in the plugin's order (its first is the
    /// primary), then addresses not tied to an interface. Host-side interfaces (the
    /// bridge, the veth's host end) are left out.
    pub fn pod_addresses(&self, pod_interface: &str) -> Result<Vec<PodAddress>, String> {
        let on_pod = |ip: &&CniIp| match ip.interface.and_then(|index| self.interfaces.get(index)) {
            Some(interface) => interface.name == pod_interface && !interface.sandbox.is_empty(),
            None => true,
        };
        self.ips.iter().filter(on_pod).map(parse_address).collect()
    }
}

fn parse_address(ip: &CniIp) -> Result<PodAddress, String> {
    let (address, prefix) = ip
        .address
        .split_once('/')
        .ok_or_else(|| format!("address {:?} is not in CIDR notation", ip.address))?;
    let parsed: IpAddr = address
        .parse()
        .map_err(|e| format!("address {:?}: {e}", ip.address))?;
    let prefix_length: u8 = prefix
        .parse()
        .map_err(|e| format!("prefix of {:?}: {e}", ip.address))?;
    let max = if parsed.is_ipv4() { 32 } else { 128 };
    if prefix_length > max {
        return Err(format!("prefix of {:?} is longer than {max}", ip.address));
    }
    let gateway = match ip.gateway.as_deref().filter(|g| !g.is_empty()) {
        Some(gateway) => Some(
            gateway
                .parse()
                .map_err(|e| format!("gateway {gateway:?}: {e}"))?,
        ),
        None => None,
    };
    Ok(PodAddress {
        ip: parsed,
        prefix_length,
        gateway,
    })
}

/// The error object a failing plugin prints (spec: "Error" section).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CniErrorReply {
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// Spec's code 11: "try again later"; the caller may retry the whole operation.
pub const CODE_TRY_AGAIN_LATER: u32 = 11;

impl CniErrorReply {
    /// The error object in `stdout`, if the plugin printed one.
    pub fn parse(stdout: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(stdout)
            .ok()
            .filter(|reply| reply.code != 0 || !reply.msg.is_empty())
    }
}

impl std::fmt::Display for CniErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CNI error code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULT_1_0_0: &str = r#"{
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
            {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:02"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/trellis/netns/pod1"}
        ],
        "ips": [
            {"address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 2},
            {"address": "fd00:88::7/64", "gateway": "fd00:88::1", "interface": 2},
            {"address": "10.88.0.1/16", "interface": 0}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    }"#;

    const RESULT_0_4_0: &str = r#"{
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [{"version": "4", "address": "192.168.1.5/24", "gateway": "192.168.1.1", "interface": 0}],
        "dns": {"nameservers": ["8.8.8.8"]}
    }"#;

    #[test]
    fn result_1_0_0_gives_pod_addresses_primary_first_without_host_side() {
        let result =
            CniResult::parse(&serde_json::from_str(RESULT_1_0_0).expect("json")).expect("result");
        assert_eq!(result.cni_version, "1.0.0");
        let addresses = result.pod_addresses("eth0").expect("addresses");
        assert_eq!(addresses.len(), 2, "{addresses:?}");
        assert_eq!(addresses[0].ip, "10.88.0.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(addresses[0].prefix_length, 16);
        assert_eq!(addresses[0].gateway, Some("10.88.0.1".parse().expect("ip")));
        assert_eq!(addresses[1].ip, "fd00:88::7".parse::<IpAddr>().expect("ip"));
        assert_eq!(addresses[1].prefix_length, 64);
    }

    #[test]
    fn result_0_4_0_with_ip_versions_parses() {
        let result =
            CniResult::parse(&serde_json::from_str(RESULT_0_4_0).expect("json")).expect("result");
        assert_eq!(result.cni_version, "0.4.0");
        let addresses = result.pod_addresses("eth0").expect("addresses");
        assert_eq!(
            addresses,
            vec![PodAddress {
                ip: "192.168.1.5".parse().expect("ip"),
                prefix_length: 24,
                gateway: Some("192.168.1.1".parse().expect("ip"))
            }]
        );
    }

    #[test]
    fn addresses_without_interface_count_and_bad_ones_are_named() {
        let result = CniResult::parse(
            &serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.2.3/8"}]}),
        )
        .expect("result");
        assert_eq!(
            result.pod_addresses("eth0").expect("addresses")[0].prefix_length,
            8
        );
        let bad = CniResult::parse(&serde_json::json!({"ips": [{"address": "10.1.2.3"}]}))
            .expect("result");
        assert!(
            bad.pod_addresses("eth0")
                .expect_err("no prefix")
                .contains("10.1.2.3")
        );
        let bad = CniResult::parse(&serde_json::json!({"ips": [{"address": "10.1.2.3/40"}]}))
            .expect("result");
        assert!(bad.pod_addresses("eth0").is_err());
        assert!(CniResult::parse(&serde_json::json!({"ips": "nope"})).is_err());
    }

    #[test]
    fn error_reply_parses_with_and_without_details() {
        let reply = CniErrorReply::parse(
            br#"{"cniVersion":"1.0.0","code":7,"msg":"failed to allocate","details":"range full"}"#,
        )
        .expect("reply");
        assert_eq!(
            reply,
            CniErrorReply {
                code: 7,
                msg: "failed to allocate".into(),
                details: "range full".into()
            }
        );
        assert_eq!(
            reply.to_string(),
            "failed to allocate (CNI error code 7): range full"
        );
        let reply = CniErrorReply::parse(br#"{"code":11,"msg":"busy"}"#).expect("reply");
        assert_eq!(reply.code, CODE_TRY_AGAIN_LATER);
        assert_eq!(reply.to_string(), "busy (CNI error code 11)");
        assert_eq!(CniErrorReply::parse(b"panic: runtime error"), None);
        assert_eq!(CniErrorReply::parse(b""), None);
    }
}
