//! What the runtime service refuses before acting on a request.
//!
//! The CRI fields of a pod end up in files the containers read (`/etc/hosts`,
//! `/etc/hostname`, `resolv.conf`), in `CNI_ARGS` (`K8S_POD_NAME=…;…`, where a `;` or
//! `=` would add keys), in the network plugins' port mappings and in error messages.
//! A newline in a hostname or a DNS server would write lines of the caller's choosing
//! into those files, so every such value is checked against what the kubelet sends,
//! and anything else is refused with `InvalidArgument` naming the field.

use std::net::IpAddr;

use k8s_cri::v1::{DnsConfig, PodSandboxConfig, PodSandboxMetadata, PortMapping, Protocol};
use trellis_common::text::excerpt;

use crate::error::RuntimeError;

/// The length of the ids this service hands out (64 hex characters); a lookup may use
/// a prefix, never more.
pub const ID_CHARS: usize = 64;
/// The longest hostname the kernel takes (HOST_NAME_MAX).
const MAX_HOSTNAME: usize = 64;
/// A DNS label, and a whole DNS name (RFC 1123).
const MAX_LABEL: usize = 63;
const MAX_DOMAIN: usize = 253;
/// A Kubernetes object name (a DNS subdomain) and namespace (a DNS label).
const MAX_NAME: usize = 253;
const MAX_NAMESPACE: usize = 63;
/// What the kubelet passes at most (it drops the rest): glibc reads three
/// nameservers; the kubelet keeps 32 search domains of 2048 characters in all.
const MAX_DNS_SERVERS: usize = 3;
const MAX_DNS_SEARCHES: usize = 32;
const MAX_DNS_SEARCH_CHARS: usize = 2048;
const MAX_DNS_OPTIONS: usize = 32;
const MAX_DNS_OPTION: usize = 64;

fn invalid(message: String) -> RuntimeError {
    RuntimeError::InvalidArgument(message)
}

/// An id or id prefix given to a lookup: ids longer than this service's own are
/// refused before they are searched for or quoted back.
pub fn lookup_id(what: &str, id: &str) -> Result<(), RuntimeError> {
    if id.is_empty() {
        return Err(invalid(format!("{what} id is empty")));
    }
    if id.len() > ID_CHARS {
        return Err(invalid(format!(
            "{what} id `{}` is longer than an id ({ID_CHARS} hex characters)",
            excerpt(id)
        )));
    }
    Ok(())
}

/// Names as Kubernetes makes them (pod and container names, namespaces, uids),
/// which also keeps `;`, `=`, whitespace and control characters out of `CNI_ARGS`.
fn name(field: &str, value: &str, max: usize, required: bool) -> Result<(), RuntimeError> {
    if value.is_empty() {
        return if required {
            Err(invalid(format!("{field} is empty")))
        } else {
            Ok(())
        };
    }
    if value.len() > max {
        return Err(invalid(format!(
            "{field} `{}` is longer than {max} characters",
            excerpt(value)
        )));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(invalid(format!(
            "{field} `{}` may only hold letters, digits, `-`, `.` and `_`",
            excerpt(value)
        )));
    }
    Ok(())
}

pub fn container_name(value: &str) -> Result<(), RuntimeError> {
    name("ContainerConfig.metadata.name", value, MAX_NAME, true)
}

fn metadata(config: &PodSandboxConfig) -> Result<&PodSandboxMetadata, RuntimeError> {
    let metadata = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("PodSandboxConfig.metadata is missing".into()))?;
    name(
        "PodSandboxConfig.metadata.name",
        &metadata.name,
        MAX_NAME,
        true,
    )?;
    name(
        "PodSandboxConfig.metadata.namespace",
        &metadata.namespace,
        MAX_NAMESPACE,
        true,
    )?;
    name(
        "PodSandboxConfig.metadata.uid",
        &metadata.uid,
        MAX_NAME,
        false,
    )?;
    Ok(metadata)
}

/// A DNS label of letters, digits and inner hyphens (RFC 1123), plus `_` when
/// `underscore` (search domains such as `_tcp.example.com` exist).
fn label_ok(label: &str, underscore: bool) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || (underscore && c == '_'))
}

/// A host name as the kernel takes it: dot-separated labels of at most 63 characters,
/// 64 in all. RFC 1123 letters, digits and inner `-`, and `_` too: containerd and
/// CRI-O take it, and crictl's own sample pod is `crictl_host`.
pub fn hostname(value: &str) -> Result<(), RuntimeError> {
    if value.len() > MAX_HOSTNAME || !value.split('.').all(|label| label_ok(label, true)) {
        return Err(invalid(format!(
            "PodSandboxConfig.hostname `{}` is not a host name (dot-separated labels of letters, digits, `_` and inner `-`, at most {MAX_LABEL} each and {MAX_HOSTNAME} in all)",
            excerpt(value)
        )));
    }
    Ok(())
}

/// A nameserver: an IP address, IPv6 with an optional `%zone` (an interface name).
fn dns_server(value: &str) -> bool {
    let (address, zone) = value
        .split_once('%')
        .map_or((value, None), |(a, z)| (a, Some(z)));
    let zone_ok = zone.is_none_or(|z| {
        !z.is_empty()
            && z.len() < 16
            && z.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    });
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => zone.is_none(),
        Ok(IpAddr::V6(_)) => zone_ok,
        Err(_) => false,
    }
}

/// A search domain: a DNS name, with or without its final dot.
fn dns_search(value: &str) -> bool {
    let name = value.strip_suffix('.').unwrap_or(value);
    name.len() <= MAX_DOMAIN && name.split('.').all(|label| label_ok(label, true))
}

/// A resolv.conf option: `name` or `name:value` (`ndots:5`, `edns0`, `single-request-reopen`).
fn dns_option(value: &str) -> bool {
    let token = |part: &str, extra: &[char]| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(&c))
    };
    let (name, argument) = value
        .split_once(':')
        .map_or((value, None), |(n, v)| (n, Some(v)));
    value.len() <= MAX_DNS_OPTION && token(name, &[]) && argument.is_none_or(|v| token(v, &['.']))
}

/// One list of a DnsConfig: its field, values, most entries taken, the check of an
/// entry and what an entry must be.
type DnsList<'a> = (
    &'static str,
    &'a [String],
    usize,
    fn(&str) -> bool,
    &'static str,
);

fn dns(config: &DnsConfig) -> Result<(), RuntimeError> {
    let lists: [DnsList<'_>; 3] = [
        (
            "servers",
            &config.servers,
            MAX_DNS_SERVERS,
            dns_server,
            "an IP address",
        ),
        (
            "searches",
            &config.searches,
            MAX_DNS_SEARCHES,
            dns_search,
            "a domain name",
        ),
        (
            "options",
            &config.options,
            MAX_DNS_OPTIONS,
            dns_option,
            "a resolv.conf option like ndots:5",
        ),
    ];
    for (field, values, max, check, expected) in lists {
        if values.len() > max {
            return Err(invalid(format!(
                "PodSandboxConfig.dns_config.{field} holds {} entries; at most {max} are taken",
                values.len()
            )));
        }
        if let Some((index, bad)) = values.iter().enumerate().find(|(_, value)| !check(value)) {
            return Err(invalid(format!(
                "PodSandboxConfig.dns_config.{field}[{index}] `{}` is not {expected}",
                excerpt(bad)
            )));
        }
    }
    let search_chars: usize = config.searches.iter().map(|s| s.len() + 1).sum();
    if search_chars > MAX_DNS_SEARCH_CHARS {
        return Err(invalid(format!(
            "PodSandboxConfig.dns_config.searches are {search_chars} characters long; at most {MAX_DNS_SEARCH_CHARS} are taken"
        )));
    }
    Ok(())
}

fn port_mapping(index: usize, mapping: &PortMapping) -> Result<(), RuntimeError> {
    let field = |name: &str| format!("PodSandboxConfig.port_mappings[{index}].{name}");
    if Protocol::try_from(mapping.protocol).is_err() {
        return Err(invalid(format!(
            "{} {} is not TCP, UDP or SCTP",
            field("protocol"),
            mapping.protocol
        )));
    }
    for (name, port) in [
        ("container_port", mapping.container_port),
        ("host_port", mapping.host_port),
    ] {
        if !(0..=65535).contains(&port) {
            return Err(invalid(format!(
                "{} {port} is not a port (0 to 65535)",
                field(name)
            )));
        }
    }
    if !mapping.host_ip.is_empty() && mapping.host_ip.parse::<IpAddr>().is_err() {
        return Err(invalid(format!(
            "{} `{}` is not an IP address",
            field("host_ip"),
            excerpt(&mapping.host_ip)
        )));
    }
    Ok(())
}

/// Checks a RunPodSandbox config; its metadata when it may be used.
pub fn pod_config(config: &PodSandboxConfig) -> Result<&PodSandboxMetadata, RuntimeError> {
    let metadata = metadata(config)?;
    if !config.hostname.is_empty() {
        hostname(&config.hostname)?;
    }
    if let Some(config) = &config.dns_config {
        dns(config)?;
    }
    for (index, mapping) in config.port_mappings.iter().enumerate() {
        port_mapping(index, mapping)?;
    }
    if !config.log_directory.is_empty()
        && !std::path::Path::new(&config.log_directory).is_absolute()
    {
        return Err(invalid(format!(
            "PodSandboxConfig.log_directory `{}` must be an absolute path",
            excerpt(&config.log_directory)
        )));
    }
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::PodSandboxMetadata;

    use super::*;

    fn pod() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "PodSandbox-for-create-container-1b4e28ba-2fa1".into(),
                namespace: "default".into(),
                uid: "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
                attempt: 3,
            }),
            hostname: "web-0".into(),
            dns_config: Some(DnsConfig {
                servers: vec!["10.96.0.10".into(), "fe80::1%eth0".into()],
                searches: vec![
                    "default.svc.cluster.local".into(),
                    "_tcp.example.com.".into(),
                ],
                options: vec![
                    "ndots:5".into(),
                    "single-request-reopen".into(),
                    "timeout:1.5".into(),
                ],
            }),
            port_mappings: vec![PortMapping {
                protocol: Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            }],
            log_directory: "/var/log/pods/default_web-0".into(),
            ..Default::default()
        }
    }

    fn refused(config: &PodSandboxConfig, field: &str) {
        match pod_config(config) {
            Err(RuntimeError::InvalidArgument(message)) => {
                assert!(message.contains(field), "names {field}: {message}");
                assert!(
                    message.len() < 300 && !message.contains('\n'),
                    "short, one line: {message}"
                );
            }
            other => panic!("{field}: expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn what_the_kubelet_sends_is_taken() {
        pod_config(&pod()).expect("a kubelet's pod");
        hostname(&format!("{}.{}", "a".repeat(31), "b".repeat(32))).expect("64 characters in all");
        hostname("crictl_host").expect("crictl's sample pod");
        let bare = PodSandboxConfig {
            metadata: pod().metadata,
            ..Default::default()
        };
        pod_config(&bare).expect("nothing optional");
    }

    #[test]
    fn line_breaks_and_spaces_never_reach_the_pod_files() {
        for bad in [
            "web\n10.0.0.1 evil",
            "web 0",
            "web\t",
            "-web",
            "web-",
            "a..b",
            "",
            "web/0",
            &"a".repeat(64),
            &format!("{}.{}", "a".repeat(32), "b".repeat(32)),
        ] {
            let config = PodSandboxConfig {
                hostname: bad.into(),
                ..pod()
            };
            if bad.is_empty() {
                pod_config(&config).expect("no hostname: the pod's name");
            } else {
                refused(&config, "hostname");
            }
        }
        let with = |servers: &[&str], searches: &[&str], options: &[&str]| PodSandboxConfig {
            dns_config: Some(DnsConfig {
                servers: servers.iter().map(|s| s.to_string()).collect(),
                searches: searches.iter().map(|s| s.to_string()).collect(),
                options: options.iter().map(|s| s.to_string()).collect(),
            }),
            ..pod()
        };
        for server in [
            "8.8.8.8\nnameserver 6.6.6.6",
            "8.8.8.8 ",
            "dns.example",
            "10.0.0.1%eth0",
            "fe80::1%",
            "fe80::1%a b",
        ] {
            refused(&with(&[server], &[], &[]), "dns_config.servers[0]");
        }
        refused(
            &with(&["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"], &[], &[]),
            "dns_config.servers",
        );
        for search in [
            "example.com\noptions debug",
            "a b",
            "",
            "..",
            "-a.com",
            &format!("{}.com", "a".repeat(64)),
        ] {
            refused(&with(&[], &[search], &[]), "dns_config.searches[0]");
        }
        refused(
            &with(&[], &vec!["a.example"; 33], &[]),
            "dns_config.searches",
        );
        refused(
            &with(
                &[],
                &vec![format!("{}.example", "a".repeat(60)).as_str(); 32],
                &[],
            ),
            "dns_config.searches",
        );
        for option in [
            "ndots:5\nnameserver 6.6.6.6",
            "ndots: 5",
            "",
            ":5",
            "ndots:",
            "a=b",
        ] {
            refused(&with(&[], &[], &[option]), "dns_config.options[0]");
        }
    }

    #[test]
    fn pod_metadata_cannot_add_cni_arguments() {
        let with = |change: fn(&mut PodSandboxMetadata)| {
            let mut config = pod();
            change(config.metadata.as_mut().expect("metadata"));
            config
        };
        refused(
            &with(|m| m.name = "web;K8S_POD_NAMESPACE=kube-system".into()),
            "metadata.name",
        );
        refused(&with(|m| m.name = "web=1".into()), "metadata.name");
        refused(&with(|m| m.name = String::new()), "metadata.name");
        refused(&with(|m| m.name = "a".repeat(254)), "metadata.name");
        refused(
            &with(|m| m.namespace = "kube system".into()),
            "metadata.namespace",
        );
        refused(
            &with(|m| m.namespace = "a".repeat(64)),
            "metadata.namespace",
        );
        refused(&with(|m| m.uid = "u\n1".into()), "metadata.uid");
        pod_config(&with(|m| m.uid = String::new())).expect("a uid is optional");
        refused(
            &PodSandboxConfig {
                metadata: None,
                ..pod()
            },
            "metadata",
        );
        assert!(container_name("container-for-test_1.a").is_ok());
        assert!(
            matches!(container_name("c;x"), Err(RuntimeError::InvalidArgument(m)) if m.contains("ContainerConfig.metadata.name"))
        );
    }

    #[test]
    fn port_mappings_are_ports_and_addresses() {
        let with = |mapping: PortMapping| PodSandboxConfig {
            port_mappings: vec![
                PortMapping {
                    protocol: 0,
                    container_port: 80,
                    host_port: 8080,
                    host_ip: String::new(),
                },
                mapping,
            ],
            ..pod()
        };
        pod_config(&with(PortMapping {
            container_port: 0,
            host_port: 65535,
            ..Default::default()
        }))
        .expect("the whole range");
        refused(
            &with(PortMapping {
                container_port: 65536,
                ..Default::default()
            }),
            "port_mappings[1].container_port",
        );
        refused(
            &with(PortMapping {
                host_port: -1,
                ..Default::default()
            }),
            "port_mappings[1].host_port",
        );
        refused(
            &with(PortMapping {
                protocol: 7,
                ..Default::default()
            }),
            "port_mappings[1].protocol",
        );
        refused(
            &with(PortMapping {
                host_ip: "127.0.0.1;rm".into(),
                ..Default::default()
            }),
            "port_mappings[1].host_ip",
        );
        refused(
            &PodSandboxConfig {
                log_directory: "relative/logs".into(),
                ..pod()
            },
            "log_directory",
        );
    }

    #[test]
    fn ids_are_at_most_an_id_long_and_quoted_short() {
        lookup_id("container", &"a".repeat(64)).expect("a whole id");
        lookup_id("container", "3f2").expect("a prefix");
        assert!(matches!(
            lookup_id("container", ""),
            Err(RuntimeError::InvalidArgument(_))
        ));
        match lookup_id("container", &"f".repeat(20_000)) {
            Err(RuntimeError::InvalidArgument(message)) => assert!(
                message.len() < 200 && message.contains("20000 bytes"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
