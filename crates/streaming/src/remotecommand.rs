//! The remotecommand subprotocol of exec and attach (k8s.io/apimachinery
//! `util/remotecommand`), over SPDY: the client opens one stream per channel, named by
//! its `streamType` header (error, stdin, stdout, stderr, resize). When the command is
//! over, stdout and stderr are closed, then the error stream says how it ended: from
//! v4 on as a JSON `metav1.Status` (Success, or Failure with reason NonZeroExitCode
//! and an ExitCode cause), before that as plain text. Resize events (v3 on, with a
//! TTY) are JSON `{"Width":w,"Height":h}` objects, one after another.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::StreamingError;
use crate::spdy::{Connection, StreamWriter};

pub const V4: &str = "v4.channel.k8s.io";
/// The versions served, most preferred first. (v5 only differs over WebSockets.)
pub const PROTOCOLS: [&str; 4] = [
    V4,
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// How long the client may take to open the streams it asked for (the kubelet's).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Which channels a session has, as the CRI request asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// The channels of one session. Receivers are taken by whoever reads them; the
/// writers stay here so that [`Streams::finish`] can close them all.
pub struct Streams {
    protocol: &'static str,
    error: StreamWriter,
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<StreamWriter>,
    pub stderr: Option<StreamWriter>,
    pub resize: Option<mpsc::Receiver<Vec<u8>>>,
    /// Streams the client only writes to (stdin, resize): closed at the end too, so
    /// the client's reader of them returns.
    inbound: Vec<StreamWriter>,
}

/// How a session ended, for the error stream.
#[derive(Debug)]
pub enum Outcome {
    Exited(i32),
    Failed(String),
}

/// Starts a session: the client's streams, or `None` (and the connection closed)
/// when they do not come.
pub async fn open(
    mut connection: Connection,
    protocol: &'static str,
    options: &Options,
) -> Option<(Connection, Streams)> {
    match accept_streams(&mut connection, protocol, options).await {
        Ok(streams) => Some((connection, streams)),
        Err(error) => {
            tracing::warn!(%error, "the client's streams did not arrive");
            connection.close().await;
            None
        }
    }
}

/// Ends a session: tells the client how it ended and closes the connection.
pub async fn close(connection: Connection, streams: Streams, outcome: Outcome) {
    if let Outcome::Failed(error) = &outcome {
        tracing::warn!(%error, "session failed");
    }
    tracing::debug!(?outcome, "session finished");
    streams.finish(outcome).await;
    connection.close().await;
}

/// Waits until the client has opened every stream the options call for.
pub async fn accept_streams(
    connection: &mut Connection,
    protocol: &'static str,
    options: &Options,
) -> Result<Streams, StreamingError> {
    let resize_wanted =
        options.tty && protocol != "v2.channel.k8s.io" && protocol != "channel.k8s.io";
    let wanted = |kind: &str| match kind {
        "error" => true,
        "stdin" => options.stdin,
        "stdout" => options.stdout,
        "stderr" => options.stderr,
        "resize" => resize_wanted,
        _ => false,
    };
    let expected = ["error", "stdin", "stdout", "stderr", "resize"]
        .into_iter()
        .filter(|k| wanted(k))
        .count();
    let (mut error, mut stdin, mut stdout, mut stderr, mut resize) = (None, None, None, None, None);
    let mut inbound = Vec::new();
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while received < expected {
        let stream = tokio::time::timeout_at(deadline, connection.next_stream())
            .await
            .map_err(|_| {
                StreamingError::Session(format!(
                    "the client opened {received} of {expected} streams in {} s",
                    STREAM_CREATION_TIMEOUT.as_secs()
                ))
            })?
            .ok_or_else(|| {
                StreamingError::Session("the client went away before opening its streams".into())
            })?;
        let kind = stream.header("streamtype").unwrap_or_default().to_string();
        let slot_taken = match kind.as_str() {
            "error" => error.replace(stream.writer).is_some(),
            "stdout" if options.stdout => stdout.replace(stream.writer).is_some(),
            "stderr" if options.stderr => stderr.replace(stream.writer).is_some(),
            "stdin" if options.stdin => {
                inbound.push(stream.writer);
                stdin.replace(stream.data).is_some()
            }
            "resize" if resize_wanted => {
                inbound.push(stream.writer);
                resize.replace(stream.data).is_some()
            }
            other => {
                // Closed at once rather than kept to the end: a client opening
                // streams nobody asked for must not grow the session.
                tracing::debug!(
                    stream_type = other,
                    "closing a stream the session did not ask for"
                );
                let _ = stream.writer.close().await;
                continue;
            }
        };
        if slot_taken {
            return Err(StreamingError::Session(format!(
                "the client opened two {kind} streams"
            )));
        }
        received += 1;
    }
    let error = error.ok_or_else(|| StreamingError::Session("no error stream".into()))?;
    Ok(Streams {
        protocol,
        error,
        stdin,
        stdout,
        stderr,
        resize,
        inbound,
    })
}

impl Streams {
    /// Closes output, says how the session ended on the error stream, closes the rest.
    pub async fn finish(self, outcome: Outcome) {
        for writer in [&self.stdout, &self.stderr].into_iter().flatten() {
            let _ = writer.close().await;
        }
        if let Some(message) = status_message(self.protocol, &outcome) {
            let _ = self.error.write(&message).await;
        }
        let _ = self.error.close().await;
        for writer in &self.inbound {
            let _ = writer.close().await;
        }
    }
}

/// What the error stream carries for an outcome (`None`: nothing, success before v4).
pub fn status_message(protocol: &str, outcome: &Outcome) -> Option<Vec<u8>> {
    if protocol == V4 {
        let status = match outcome {
            Outcome::Exited(0) => serde_json::json!({ "metadata": {}, "status": "Success" }),
            Outcome::Exited(code) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": { "causes": [{ "reason": "ExitCode", "message": code.clamp(&0, &255).to_string() }] },
            }),
            Outcome::Failed(message) => serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
                "details": { "causes": [{ "message": message }] },
                "code": 500,
            }),
        };
        return Some(status.to_string().into_bytes());
    }
    match outcome {
        Outcome::Exited(0) => None,
        Outcome::Exited(code) => Some(
            format!("command terminated with non-zero exit code: exit status {code}").into_bytes(),
        ),
        Outcome::Failed(message) => Some(message.clone().into_bytes()),
    }
}

/// A terminal size from the resize stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Turns the resize stream's bytes into sizes; ends with the stream or at garbage.
pub fn resize_events(mut data: mpsc::Receiver<Vec<u8>>) -> mpsc::Receiver<TerminalSize> {
    let (sizes, events) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut decoder = ResizeDecoder::default();
        while let Some(chunk) = data.recv().await {
            let Ok(decoded) = decoder.push(&chunk) else {
                tracing::debug!("the resize stream sent something that is not a terminal size");
                return;
            };
            for size in decoded {
                if sizes.send(size).await.is_err() {
                    return;
                }
            }
        }
    });
    events
}

/// Splits a byte stream into JSON terminal sizes, keeping an incomplete one for later.
#[derive(Default)]
pub struct ResizeDecoder {
    pending: Vec<u8>,
}

impl ResizeDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<TerminalSize>, serde_json::Error> {
        self.pending.extend_from_slice(bytes);
        let mut sizes = Vec::new();
        let mut values =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<TerminalSize>();
        let mut used = 0;
        loop {
            match values.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    used = values.byte_offset();
                }
                Some(Err(error)) if error.is_eof() => break,
                Some(Err(error)) => return Err(error),
                None => {
                    used = values.byte_offset();
                    break;
                }
            }
        }
        self.pending.drain(..used);
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use crate::testing::connect;

    #[test]
    fn v4_status_carries_the_exit_code_as_client_go_reads_it() {
        let success: serde_json::Value =
            serde_json::from_slice(&status_message(V4, &Outcome::Exited(0)).expect("status"))
                .expect("json");
        assert_eq!(success["status"], "Success");
        let failure: serde_json::Value =
            serde_json::from_slice(&status_message(V4, &Outcome::Exited(7)).expect("status"))
                .expect("json");
        assert_eq!(failure["status"], "Failure");
        assert_eq!(failure["reason"], "NonZeroExitCode");
        assert_eq!(failure["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failure["details"]["causes"][0]["message"], "7");
        assert_eq!(
            status_message("v2.channel.k8s.io", &Outcome::Exited(0)),
            None
        );
        assert!(status_message("v2.channel.k8s.io", &Outcome::Failed("boom".into())).is_some());
    }

    #[test]
    fn resize_events_split_across_chunks() {
        let mut decoder = ResizeDecoder::default();
        assert_eq!(
            decoder.push(br#"{"Width":80,"Hei"#).expect("partial"),
            vec![]
        );
        let sizes = decoder
            .push(br#"ght":24}{"Width":100,"Height":40}"#)
            .expect("two");
        assert_eq!(
            sizes,
            vec![
                TerminalSize {
                    width: 80,
                    height: 24
                },
                TerminalSize {
                    width: 100,
                    height: 40
                }
            ]
        );
        assert!(decoder.push(b"]").is_err());
    }

    fn options(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Options {
        Options {
            stdin,
            stdout,
            stderr,
            tty,
        }
    }

    #[tokio::test]
    async fn a_v4_session_gets_its_streams_and_ends_with_a_status() {
        let (mut client, connection) = connect();
        let error = client.open(&[("streamtype", "error")]).await;
        let stdin = client.open(&[("streamtype", "stdin")]).await;
        let stdout = client.open(&[("streamtype", "stdout")]).await;
        let stderr = client.open(&[("streamtype", "stderr")]).await;
        let (connection, mut streams) = open(connection, V4, &options(true, true, true, false))
            .await
            .expect("the session");
        assert!(streams.resize.is_none());
        client.data(stdin, b"input", true).await;
        let mut input = streams.stdin.take().expect("stdin");
        assert_eq!(input.recv().await.as_deref(), Some(&b"input"[..]));
        assert_eq!(input.recv().await, None);
        let out = streams.stdout.clone().expect("stdout");
        out.write(b"output").await.expect("write");
        let closing = tokio::spawn(close(connection, streams, Outcome::Exited(3)));

        assert_eq!(client.read_stream(stdout).await, b"output");
        assert!(client.read_stream(stderr).await.is_empty());
        let status: serde_json::Value =
            serde_json::from_slice(&client.read_stream(error).await).expect("a JSON status");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        assert!(client.read_stream(stdin).await.is_empty());
        client
            .next_where(|frame| matches!(frame, Frame::GoAway { .. }))
            .await;
        drop(client);
        closing.await.expect("close");
    }

    #[tokio::test]
    async fn resize_is_a_stream_from_v3_on_and_only_with_a_tty() {
        for (protocol, resize_wanted) in [
            (V4, true),
            ("v3.channel.k8s.io", true),
            ("v2.channel.k8s.io", false),
            ("channel.k8s.io", false),
        ] {
            let (mut client, mut connection) = connect();
            client.open(&[("streamtype", "error")]).await;
            let resize = client.open(&[("streamtype", "resize")]).await;
            client.open(&[("streamtype", "stdout")]).await;
            let streams = accept_streams(
                &mut connection,
                protocol,
                &options(false, true, false, true),
            )
            .await
            .expect("the session");
            assert_eq!(streams.resize.is_some(), resize_wanted, "{protocol}");
            if !resize_wanted {
                // Not asked for: closed at once, not at the end of the session.
                assert!(client.read_stream(resize).await.is_empty());
            }
        }
        let (mut client, mut connection) = connect();
        client.open(&[("streamtype", "error")]).await;
        client.open(&[("streamtype", "stdout")]).await;
        let streams = accept_streams(&mut connection, V4, &options(false, true, false, false))
            .await
            .expect("without a TTY, no resize stream is waited for");
        assert!(streams.resize.is_none());
    }

    #[tokio::test]
    async fn a_stream_opened_twice_or_never_fails_the_session() {
        let (mut client, mut connection) = connect();
        client.open(&[("streamtype", "error")]).await;
        client.open(&[("streamtype", "error")]).await;
        assert!(matches!(
            accept_streams(&mut connection, V4, &options(false, true, false, false)).await,
            Err(StreamingError::Session(_))
        ));

        let (mut client, mut connection) = connect();
        client.open(&[("streamtype", "error")]).await;
        drop(client);
        assert!(matches!(
            accept_streams(&mut connection, V4, &options(false, true, false, false)).await,
            Err(StreamingError::Session(_))
        ));
    }
}
