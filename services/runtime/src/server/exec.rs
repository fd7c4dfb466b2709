//! Exec, Attach, PortForward: each answers the URL of a streaming session that the
//! streaming server then serves.

use k8s_cri::v1::*;
use tonic::Status;

use super::attributes;
use super::streaming::StreamingServer;

pub async fn exec(
    streaming: &StreamingServer,
    request: ExecRequest,
) -> Result<ExecResponse, Status> {
    attributes::container(&request.container_id);
    let url = streaming.exec(request).await?;
    Ok(ExecResponse { url })
}

pub async fn attach(
    streaming: &StreamingServer,
    request: AttachRequest,
) -> Result<AttachResponse, Status> {
    attributes::container(&request.container_id);
    let url = streaming.attach(request).await?;
    Ok(AttachResponse { url })
}

pub async fn port_forward(
    streaming: &StreamingServer,
    request: PortForwardRequest,
) -> Result<PortForwardResponse, Status> {
    attributes::pod(&request.pod_sandbox_id);
    let url = streaming.port_forward(request).await?;
    Ok(PortForwardResponse { url })
}
