//! PortForward (`portforward.k8s.io`): for every connection the client accepts
//! locally it opens two streams, `streamType: error` and `streamType: data`, with the
//! same `requestID` and the pod's `port`. [`Forwards`] pairs them into a [`Forward`];
//! what the data stream is joined to (a socket in the pod) is the caller's business.
//! A failure is told as text on the error stream.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::error::StreamingError;
use crate::spdy::{Connection, Stream, StreamWriter, copy_from_stream, copy_to_stream};

pub const PROTOCOL: &str = "portforward.k8s.io";
/// Requests waiting for their other half, per connection. client-go opens a pair's
/// two streams back to back, so a few are ever pending; a client that only opens
/// halves would otherwise grow the table for as long as the connection lasts.
pub const MAX_UNPAIRED: usize = 256;
/// The headers of a port-forward stream (three short ones from client-go) may take
/// this many bytes; larger streams are refused rather than kept while unpaired.
pub const MAX_STREAM_HEADERS: usize = 4096;

/// One connection the client forwards.
pub struct Forward {
    /// What the client sends and receives; its headers say the port.
    pub data: Stream,
    /// Where a failure of this forward is told.
    pub error: StreamWriter,
}

impl Forward {
    /// The pod's port the client asked for: `None` when the header is missing or is
    /// not a port (1 to 65535).
    pub fn port(&self) -> Option<u16> {
        self.port_header()
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
    }

    /// The `port` header as sent (empty when missing), for messages.
    pub fn port_header(&self) -> &str {
        self.data.header("port").unwrap_or_default()
    }

    /// Copies both ways between the data stream and a connection to the target, until
    /// the target has nothing more to say. What the client sends keeps flowing to the
    /// target in a task of its own, until the client is done sending.
    pub async fn copy<R, W>(&mut self, from_target: R, to_target: W) -> Result<(), StreamingError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut upload = std::mem::replace(&mut self.data.data, mpsc::channel(1).1);
        tokio::spawn(async move { copy_from_stream(&mut upload, to_target).await });
        match copy_to_stream(from_target, &self.data.writer).await {
            // A server that closes with input unread resets: still an end.
            Err(StreamingError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Ends the forward: the data stream is closed, then the failure (if any) is told
    /// on the error stream, which is closed too.
    pub async fn finish(self, failure: Option<&str>) {
        let _ = self.data.writer.close().await;
        if let Some(failure) = failure {
            let _ = self.error.write(failure.as_bytes()).await;
        }
        let _ = self.error.close().await;
    }
}

#[derive(Default)]
struct Pair {
    error: Option<StreamWriter>,
    data: Option<Stream>,
}

/// The port-forward session of one connection: its streams, paired.
pub struct Forwards {
    connection: Connection,
    pending: HashMap<String, Pair>,
}

impl Forwards {
    pub fn new(connection: Connection) -> Self {
        Self {
            connection,
            pending: HashMap::new(),
        }
    }

    /// The next connection the client forwards, once both its streams are open;
    /// `None` once the client is gone.
    pub async fn next(&mut self) -> Option<Forward> {
        while let Some(stream) = self.connection.next_stream().await {
            if let Some(forward) = self.pair(stream).await {
                return Some(forward);
            }
        }
        None
    }

    async fn pair(&mut self, stream: Stream) -> Option<Forward> {
        let size: usize = stream
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum();
        let request = stream.header("requestid").unwrap_or_default();
        let refusal = if size > MAX_STREAM_HEADERS {
            Some("headers too large")
        } else if !matches!(stream.header("streamtype"), Some("error" | "data")) {
            Some("neither data nor error")
        } else if !self.pending.contains_key(request) && self.pending.len() >= MAX_UNPAIRED {
            Some("too many requests waiting for their other stream")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            tracing::debug!(refusal, "port-forward: refusing a stream");
            let _ = stream.writer.close().await;
            return None;
        }
        let request = request.to_string();
        let pair = self.pending.entry(request.clone()).or_default();
        if stream.header("streamtype") == Some("error") {
            pair.error = Some(stream.writer);
        } else {
            pair.data = Some(stream);
        }
        if pair.error.is_some()
            && pair.data.is_some()
            && let Some(Pair {
                error: Some(error),
                data: Some(data),
            }) = self.pending.remove(&request)
        {
            return Some(Forward { data, error });
        }
        None
    }

    /// Ends the session and closes the connection.
    pub async fn close(self) {
        self.connection.close().await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::frame::Frame;
    use crate::testing::connect;

    #[tokio::test]
    async fn streams_pair_by_request_id_in_any_order() {
        let (mut client, connection) = connect();
        let mut forwards = Forwards::new(connection);
        client
            .open(&[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "1"),
            ])
            .await;
        client
            .open(&[("streamtype", "data"), ("port", "80"), ("requestid", "2")])
            .await;
        client
            .open(&[("streamtype", "data"), ("port", "8080"), ("requestid", "1")])
            .await;
        client
            .open(&[("streamtype", "error"), ("port", "80"), ("requestid", "2")])
            .await;
        let first = forwards.next().await.expect("first pair");
        assert_eq!(first.port(), Some(8080));
        let second = forwards.next().await.expect("second pair");
        assert_eq!(second.port(), Some(80));
    }

    #[tokio::test]
    async fn a_port_must_be_1_to_65535() {
        let (mut client, connection) = connect();
        let mut forwards = Forwards::new(connection);
        for (request, port) in [("1", "0"), ("2", "65536"), ("3", "http"), ("4", " 80")] {
            client
                .open(&[("streamtype", "error"), ("requestid", request)])
                .await;
            client
                .open(&[
                    ("streamtype", "data"),
                    ("port", port),
                    ("requestid", request),
                ])
                .await;
            let forward = forwards.next().await.expect("pair");
            assert_eq!(forward.port(), None, "port {port:?}");
            assert_eq!(forward.port_header(), port);
        }
        client
            .open(&[("streamtype", "error"), ("requestid", "5")])
            .await;
        client
            .open(&[("streamtype", "data"), ("requestid", "5")])
            .await;
        let forward = forwards.next().await.expect("pair");
        assert_eq!((forward.port(), forward.port_header()), (None, ""));
    }

    #[tokio::test]
    async fn copy_joins_the_data_stream_to_the_target_and_finish_tells_the_failure() {
        let (mut client, connection) = connect();
        let mut forwards = Forwards::new(connection);
        let error = client
            .open(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")])
            .await;
        let data = client
            .open(&[("streamtype", "data"), ("port", "80"), ("requestid", "0")])
            .await;
        let mut forward = forwards.next().await.expect("pair");
        let (target, mut pod) = tokio::io::duplex(1024);
        let (from_target, to_target) = tokio::io::split(target);
        let copying = tokio::spawn(async move {
            forward.copy(from_target, to_target).await.expect("copy");
            forward
        });
        client.data(data, b"GET /", true).await;
        let mut request = Vec::new();
        pod.read_to_end(&mut request).await.expect("the pod reads");
        assert_eq!(request, b"GET /");
        pod.write_all(b"200 OK").await.expect("the pod answers");
        drop(pod);
        let forward = copying.await.expect("copy task");
        forward.finish(Some("connection refused")).await;
        assert_eq!(client.read_stream(data).await, b"200 OK");
        assert_eq!(client.read_stream(error).await, b"connection refused");
    }

    #[tokio::test]
    async fn streams_of_other_types_or_with_large_headers_are_closed_not_kept() {
        let (mut client, connection) = connect();
        let mut forwards = Forwards::new(connection);
        let bogus = client
            .open(&[("streamtype", "stdin"), ("requestid", "1")])
            .await;
        let padding = "x".repeat(MAX_STREAM_HEADERS);
        let large = client
            .open(&[
                ("streamtype", "data"),
                ("port", "80"),
                ("requestid", &padding),
            ])
            .await;
        client
            .open(&[("streamtype", "error"), ("requestid", "2")])
            .await;
        client
            .open(&[("streamtype", "data"), ("port", "22"), ("requestid", "2")])
            .await;
        let forward = forwards.next().await.expect("the good pair");
        assert_eq!(forward.port(), Some(22));
        assert!(client.read_stream(bogus).await.is_empty());
        assert!(client.read_stream(large).await.is_empty());
        assert!(forwards.pending.is_empty());
    }

    #[tokio::test]
    async fn requests_waiting_for_their_other_half_are_capped() {
        let (mut client, connection) = connect();
        let mut forwards = Forwards::new(connection);
        for request in 0..MAX_UNPAIRED {
            client
                .open(&[("streamtype", "error"), ("requestid", &request.to_string())])
                .await;
        }
        let refused = client
            .open(&[("streamtype", "error"), ("requestid", "one too many")])
            .await;
        // A pending request still gets its other half.
        client
            .open(&[("streamtype", "data"), ("port", "80"), ("requestid", "7")])
            .await;
        let forward = forwards.next().await.expect("pair");
        assert_eq!(forward.port(), Some(80));
        assert_eq!(forwards.pending.len(), MAX_UNPAIRED - 1);
        let closed = client
            .next_where(|frame| matches!(frame, Frame::Data { fin: true, .. }))
            .await;
        assert!(matches!(closed, Frame::Data { stream_id, .. } if stream_id == refused));
    }
}
