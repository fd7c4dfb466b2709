//! A CNI client written against the spec (0.4.0 and 1.0.0; 0.3.x lists work too, with
//! no CHECK): a network configuration list run plugin by plugin, ADD in order with
//! each result chained into the next plugin's `prevResult`, DEL in reverse.

pub mod exec;
pub mod result;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tracing::Instrument;

pub use exec::{CniCommand, CniExecError, Plugins};
use exec::{Invocation, run_plugin};

/// The interface every pod gets inside its namespace.
pub const POD_INTERFACE: &str = "eth0";

/// Everything that decides what the plugins are told about one pod. It is recorded
/// with the pod, so a DEL (even after a restart, even after the directory changed)
/// hands the plugins exactly what ADD did.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub sandbox_id: String,
    pub netns: PathBuf,
    /// `CNI_ARGS`.
    pub args: String,
    /// The configuration list used, as `cni_config` normalised it.
    pub network: Value,
    /// Values for the capabilities plugins may ask for (libcni's names: portMappings,
    /// bandwidth, ipRanges, dns); a plugin gets those its `capabilities` list.
    pub runtime_config: Map<String, Value>,
}

impl Attachment {
    fn invocation<'a>(
        &'a self,
        command: CniCommand,
        netns: &'a Path,
        interface: &'a str,
        plugins: &'a Plugins,
    ) -> Invocation<'a> {
        Invocation {
            command,
            sandbox_id: &self.sandbox_id,
            netns,
            interface,
            args: &self.args,
            plugins,
        }
    }

    fn version(&self) -> Version {
        Version::parse(
            self.network
                .get("cniVersion")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        )
    }
}

/// `CNI_ARGS` as Kubernetes runtimes set it.
pub fn kubernetes_args(
    pod_namespace: &str,
    pod_name: &str,
    sandbox_id: &str,
    pod_uid: &str,
) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_namespace};K8S_POD_NAME={pod_name};K8S_POD_INFRA_CONTAINER_ID={sandbox_id};K8S_POD_UID={pod_uid}"
    )
}

/// ADD through the whole list; the last plugin's result.
pub async fn add(attachment: &Attachment, plugins: &Plugins) -> Result<Value, CniExecError> {
    add_chain(attachment, POD_INTERFACE, plugins).await
}

async fn add_chain(
    attachment: &Attachment,
    interface: &str,
    plugins: &Plugins,
) -> Result<Value, CniExecError> {
    let invocation = attachment.invocation(CniCommand::Add, &attachment.netns, interface, plugins);
    let mut previous: Option<Value> = None;
    for plugin in listed_plugins(&attachment.network) {
        let plugin_type = plugin_type(plugin);
        let stdin = plugin_stdin(
            &attachment.network,
            plugin,
            previous.as_ref(),
            &attachment.runtime_config,
        );
        let answer = run_step(plugin_type, &invocation, &attachment.network, &stdin).await?;
        previous = answer;
    }
    Ok(previous.unwrap_or(Value::Null))
}

/// DEL through the whole list in reverse. Every plugin is asked even when one fails,
/// so that each frees what it can; the first failure is returned. `result` is the
/// ADD result when there was one; `netns_exists` false clears `CNI_NETNS`, which
/// tells the plugins the namespace (and what was in it) is already gone.
pub async fn del(
    attachment: &Attachment,
    result: Option<&Value>,
    netns_exists: bool,
    plugins: &Plugins,
) -> Result<(), CniExecError> {
    let netns = if netns_exists {
        attachment.netns.as_path()
    } else {
        Path::new("")
    };
    let invocation = attachment.invocation(CniCommand::Del, netns, POD_INTERFACE, plugins);
    // prevResult on DEL came with 0.4.0; older plugins do not expect it.
    let previous = result.filter(|r| !r.is_null() && attachment.version() >= Version::V0_4_0);
    let mut first_error = None;
    for plugin in listed_plugins(&attachment.network).iter().rev() {
        let stdin = plugin_stdin(
            &attachment.network,
            plugin,
            previous,
            &attachment.runtime_config,
        );
        let ran = run_step(
            plugin_type(plugin),
            &invocation,
            &attachment.network,
            &stdin,
        );
        if let Err(error) = ran.await {
            tracing::warn!(sandbox_id = %attachment.sandbox_id, %error, "CNI DEL failed; asking the other plugins anyway");
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// CHECK through the whole list (0.4.0 and later, unless the list sets
/// `disableCheck`); `Ok(false)` when the version or the list rules CHECK out.
pub async fn check(
    attachment: &Attachment,
    result: &Value,
    plugins: &Plugins,
) -> Result<bool, CniExecError> {
    let disabled = attachment
        .network
        .get("disableCheck")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if disabled || attachment.version() < Version::V0_4_0 {
        return Ok(false);
    }
    let invocation =
        attachment.invocation(CniCommand::Check, &attachment.netns, POD_INTERFACE, plugins);
    for plugin in listed_plugins(&attachment.network) {
        let stdin = plugin_stdin(
            &attachment.network,
            plugin,
            Some(result),
            &attachment.runtime_config,
        );
        run_step(
            plugin_type(plugin),
            &invocation,
            &attachment.network,
            &stdin,
        )
        .await?;
    }
    Ok(true)
}

/// One plugin run, as a step of its own in the call's trace (`cni.add`, `cni.del`,
/// `cni.check`): which plugin of a chain is slow is what a slow pod network asks.
async fn run_step(
    plugin: &str,
    invocation: &Invocation<'_>,
    network: &Value,
    stdin: &[u8],
) -> Result<Option<Value>, CniExecError> {
    let network_name = network
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let span = trellis_common::step_span!(
        "cni",
        otel.name = invocation.command.span_name(),
        cni.plugin = %plugin,
        cni.network = %network_name
    );
    run_plugin(plugin, invocation, stdin).instrument(span).await
}

fn listed_plugins(network: &Value) -> &[Value] {
    network
        .get("plugins")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn plugin_type(plugin: &Value) -> &str {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A plugin's stdin: its own configuration with the list's `name` and `cniVersion`,
/// the previous result, and the runtime values its `capabilities` ask for.
fn plugin_stdin(
    network: &Value,
    plugin: &Value,
    previous: Option<&Value>,
    runtime_config: &Map<String, Value>,
) -> Vec<u8> {
    let mut config = plugin.as_object().cloned().unwrap_or_default();
    for key in ["name", "cniVersion"] {
        if let Some(value) = network.get(key) {
            config.insert(key.to_string(), value.clone());
        }
    }
    if let Some(previous) = previous {
        config.insert("prevResult".into(), previous.clone());
    }
    let wanted = plugin.get("capabilities").and_then(Value::as_object);
    let granted: Map<String, Value> = runtime_config
        .iter()
        .filter(|(capability, _)| {
            wanted
                .and_then(|w| w.get(capability.as_str()))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .map(|(capability, value)| (capability.clone(), value.clone()))
        .collect();
    if !granted.is_empty() {
        config.insert("runtimeConfig".into(), Value::Object(granted));
    }
    serde_json::to_vec(&Value::Object(config)).unwrap_or_default()
}

/// A CNI spec version; an unreadable one sorts as the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u32, u32, u32);

impl Version {
    const V0_4_0: Version = Version(0, 4, 0);

    fn parse(text: &str) -> Version {
        let mut parts = text.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        Version(
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stdin_carries_name_version_previous_result_and_only_wanted_capabilities() {
        let network = json!({"cniVersion": "1.0.0", "name": "net", "plugins": []});
        let portmap =
            json!({"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}});
        let mut runtime = Map::new();
        runtime.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        runtime.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let previous = json!({"cniVersion": "1.0.0", "ips": []});
        let stdin: Value =
            serde_json::from_slice(&plugin_stdin(&network, &portmap, Some(&previous), &runtime))
                .expect("json");
        assert_eq!(stdin["name"], "net");
        assert_eq!(stdin["cniVersion"], "1.0.0");
        assert_eq!(stdin["prevResult"], previous);
        assert_eq!(
            stdin["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );

        let bridge = json!({"type": "bridge"});
        let stdin: Value =
            serde_json::from_slice(&plugin_stdin(&network, &bridge, None, &runtime)).expect("json");
        assert!(
            stdin.get("runtimeConfig").is_none() && stdin.get("prevResult").is_none(),
            "{stdin}"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(Version::parse("1.0.0") > Version::V0_4_0);
        assert!(Version::parse("0.3.1") < Version::V0_4_0);
        assert!(Version::parse("0.10.0") > Version::V0_4_0);
        assert!(Version::parse("") < Version::V0_4_0);
    }

    #[test]
    fn kubernetes_args_in_cri_o_order() {
        assert_eq!(
            kubernetes_args("ns", "pod", "abc", "u1"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1"
        );
    }
}
