//! Exec, Attach, PortForward: each answers the URL of a streaming session that the
//! streaming server then serves.

use k8s_cri::v1::*;
use tonic::Status;

use super::streaming::StreamingServer;

pub async fn exec(
    streaming: &StreamingServer,
    request: ExecRequest,
) -> Result<ExecResponse, Status> {
    let url = streaming.exec(request).await?;
    Ok(ExecResponse { url })
}

pub async fn attach(
    streaming: &StreamingServer,
    request: AttachRequest,
) -> Result<AttachResponse, Status> {
    let url = streaming.attach(request).await?;
    Ok(AttachResponse { url })
}

pub async fn port_forward(
    streaming: &StreamingServer,
    request: PortForwardRequest,
) -> Result<PortForwardResponse, Status> {
    let url = streaming.port_forward(request).await?;
    Ok(PortForwardResponse { url })
}
