//! Version, Status, RuntimeConfig, UpdateRuntimeConfig: what the runtime is and
//! whether it can run containers.

use std::collections::HashMap;

use k8s_cri::v1::*;
use tonic::Status;
use trellis_common::grpc::find_executable;
use trellis_common::service::VERSION;

use super::RuntimeService;

/// The CRI names this runtime to the kubelet.
pub const RUNTIME_NAME: &str = "trellis";
const CRI_API_VERSION: &str = "v1";
/// The `version` field of VersionResponse is the kubelet-facing API version.
const KUBELET_API_VERSION: &str = "0.1.0";

pub fn version() -> VersionResponse {
    VersionResponse {
        version: KUBELET_API_VERSION.into(),
        runtime_name: RUNTIME_NAME.into(),
        runtime_version: VERSION.into(),
        runtime_api_version: CRI_API_VERSION.into(),
    }
}

/// The kubelet (KubeletCgroupDriverFromCRI) takes its cgroup driver from here:
/// containers' cgroups are made by the OCI runtime through cgroupfs.
pub fn runtime_config() -> RuntimeConfigResponse {
    RuntimeConfigResponse {
        linux: Some(LinuxRuntimeConfiguration {
            cgroup_driver: CgroupDriver::Cgroupfs as i32,
        }),
    }
}

pub fn update_runtime_config(
    service: &RuntimeService,
    request: UpdateRuntimeConfigRequest,
) -> Result<UpdateRuntimeConfigResponse, Status> {
    let cidr = request
        .runtime_config
        .and_then(|c| c.network_config)
        .map(|n| n.pod_cidr)
        .unwrap_or_default();
    if !cidr.is_empty() && !is_cidr(&cidr) {
        return Err(Status::invalid_argument(format!(
            "pod CIDR `{}` is not an address range like 10.88.0.0/16",
            trellis_common::text::excerpt(&cidr)
        )));
    }
    tracing::info!(pod_cidr = %cidr, "the kubelet set the node's pod CIDR");
    if let Ok(mut current) = service.pod_cidr.lock() {
        *current = cidr;
    }
    Ok(UpdateRuntimeConfigResponse {})
}

pub fn status(service: &RuntimeService, request: StatusRequest) -> StatusResponse {
    let condition = runtime_condition(service);
    let mut info = HashMap::new();
    if request.verbose {
        let pod_cidr = service
            .pod_cidr
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        let config = serde_json::json!({ "ociRuntime": service.oci_runtime, "conmon": service.conmon, "podCIDR": pod_cidr, "cgroupDriver": "cgroupfs" });
        info.insert("config".to_string(), config.to_string());
    }
    // NetworkReady is the network service's to say; the gateway adds it.
    StatusResponse {
        status: Some(RuntimeStatus {
            conditions: vec![condition],
        }),
        info,
        ..Default::default()
    }
}

/// Ready when the programs every container needs are installed.
fn runtime_condition(service: &RuntimeService) -> RuntimeCondition {
    let missing: Vec<String> = [
        ("OCI runtime", &service.oci_runtime),
        ("conmon", &service.conmon),
    ]
    .into_iter()
    .filter(|(_, program)| find_executable(program).is_none())
    .map(|(what, program)| format!("{what} `{program}` not found"))
    .collect();
    RuntimeCondition {
        r#type: "RuntimeReady".into(),
        status: missing.is_empty(),
        reason: if missing.is_empty() {
            String::new()
        } else {
            "RuntimeBinaryMissing".into()
        },
        message: missing.join("; "),
    }
}

fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}
