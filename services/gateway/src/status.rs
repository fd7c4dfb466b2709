//! CRI Status, fanned in: RuntimeReady (and the verbose info) from the runtime
//! service, NetworkReady from the network service, asked at the same time. A service
//! that cannot be reached within the retry budget turns its condition false with a
//! reason, rather than failing the whole call.

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{RuntimeCondition, RuntimeStatus, StatusRequest, StatusResponse};
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use trellis_proto::network::v1::StatusRequest as NetworkStatusRequest;
use trellis_proto::network::v1::network_client::NetworkClient;

use crate::backend::{Backend, Backends, Retry, caller_deadline};

const RUNTIME_READY: &str = "RuntimeReady";
const NETWORK_READY: &str = "NetworkReady";

pub async fn fan_in(
    backends: &Backends,
    request: Request<StatusRequest>,
) -> Result<Response<StatusResponse>, Status> {
    let deadline = caller_deadline(&request, Instant::now());
    let message = request.into_inner();
    let (runtime, network) = tokio::join!(
            backends.call(
                &backends.runtime,
                Retry::Idempotent,
                deadline,
                message,
                |channel, request| async move {
                    RuntimeServiceClient::new(channel).status(request).await
                }
            ),
            backends.call(
                &backends.network,
                Retry::Idempotent,
                deadline,
                NetworkStatusRequest {},
                |channel, request| async move { NetworkClient::new(channel).status(request).await }
            ),
        );

    let mut response = match runtime {
        Ok(response) => response.into_inner(),
        Err(error) => StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![unreachable(
                    RUNTIME_READY,
                    "RuntimeServiceUnavailable",
                    &backends.runtime,
                    &error,
                )],
            }),
            ..Default::default()
        },
    };
    let network_condition = match network {
        Ok(status) => {
            let status = status.into_inner();
            RuntimeCondition {
                r#type: NETWORK_READY.into(),
                status: status.ready,
                reason: status.reason,
                message: status.message,
            }
        }
        Err(error) => unreachable(
            NETWORK_READY,
            "NetworkServiceUnavailable",
            &backends.network,
            &error,
        ),
    };
    let conditions = &mut response
        .status
        .get_or_insert_with(Default::default)
        .conditions;
    conditions.retain(|condition| condition.r#type != NETWORK_READY);
    conditions.push(network_condition);

    Ok(Response::new(response))
}

fn unreachable(
    condition: &str,
    reason: &str,
    backend: &Backend,
    error: &Status,
) -> RuntimeCondition {
    RuntimeCondition {
        r#type: condition.into(),
        status: false,
        reason: reason.into(),
        message: format!(
            "trellis-{} on {}: {}",
            backend.kind.name(),
            backend.socket().display(),
            error.message()
        ),
    }
}
