//! Asking a running service how it is, over its socket.

use std::path::Path;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis_common::transport::unix_channel;
use trellis_proto::service::v1::InfoResponse;
use trellis_proto::service::v1::service_info_client::ServiceInfoClient;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The overall health of the server on `socket`, or why it could not be asked.
pub async fn health(socket: &Path) -> Result<ServingStatus, String> {
    let mut client = HealthClient::new(unix_channel(socket));
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(PROBE_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner().status()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

pub async fn info(socket: &Path) -> Result<InfoResponse, String> {
    let mut client = ServiceInfoClient::new(unix_channel(socket));
    match tokio::time::timeout(
        PROBE_TIMEOUT,
        client.info(trellis_proto::service::v1::InfoRequest {}),
    )
    .await
    {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}
