//! The server end of a SPDY/3.1 connection, over a socket already upgraded from HTTP.
//!
//! Only the client opens streams (as client-go does): each SYN_STREAM is answered at
//! once with a SYN_REPLY and handed to the caller as a [`Stream`]: its headers, a
//! channel of the data the client sends (closed by the client's FIN or RST_STREAM,
//! or when the connection ends) and a [`StreamWriter`] for the data sent back.
//! PINGs are echoed; SETTINGS and WINDOW_UPDATE are read and ignored, as
//! moby/spdystream (the client) ignores flow control too.
//!
//! One task reads and dispatches frames, one writes them: a stream whose reader is
//! slow holds up the connection's reading (TCP pushes back on the client), so callers
//! drop the receivers of streams they do not read.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::StreamingError;
use crate::frame::{
    Decoder, Encoder, FLAG_FIN, Frame, Headers, RST_PROTOCOL_ERROR, RST_REFUSED_STREAM, header,
};

/// Data frames sent are cut to this size.
const CHUNK: usize = 32 * 1024;
/// Frames queued for the writer before senders wait.
const OUT_QUEUE: usize = 256;
/// Data chunks queued per stream before the reader waits.
const STREAM_QUEUE: usize = 64;
/// After closing, how long the client may take to close its end.
const LINGER: Duration = Duration::from_secs(5);
/// Streams the client may have open (not yet finished sending) at once; more are
/// refused. Each holds a queue here, and a port-forward keeps one open per
/// forwarded connection, so this is far above what kubectl needs and far below
/// what a client could make us hold.
pub const MAX_OPEN_STREAMS: usize = 4096;

/// See [`Connection::gone`].
pub type Gone = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

enum Out {
    Frame(Frame),
    /// Say GOAWAY, flush and close the socket's write side.
    Close,
}

/// A stream the client opened.
pub struct Stream {
    pub headers: Headers,
    /// What the client sends on the stream; `None` once it is done sending.
    pub data: mpsc::Receiver<Vec<u8>>,
    pub writer: StreamWriter,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Sends data on one stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Out>,
}

impl StreamWriter {
    pub async fn write(&self, data: &[u8]) -> Result<(), StreamingError> {
        for chunk in data.chunks(CHUNK) {
            self.send(Frame::Data {
                stream_id: self.id,
                fin: false,
                data: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Half-closes the stream: FIN, nothing more is sent on it.
    pub async fn close(&self) -> Result<(), StreamingError> {
        self.send(Frame::Data {
            stream_id: self.id,
            fin: true,
            data: Vec::new(),
        })
        .await
    }

    async fn send(&self, frame: Frame) -> Result<(), StreamingError> {
        self.out
            .send(Out::Frame(frame))
            .await
            .map_err(|_| StreamingError::Closed)
    }
}

pub struct Connection {
    incoming: mpsc::Receiver<Stream>,
    out: mpsc::Sender<Out>,
    /// Its sender lives in the reader task: dropped when the client is gone.
    gone: watch::Receiver<()>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Connection {
    /// Starts serving SPDY on an upgraded socket; `buffered` is what was read past the
    /// HTTP request.
    pub fn start<R, W>(read: R, write: W, buffered: Vec<u8>) -> Result<Self, StreamingError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let encoder = Encoder::new()?;
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (incoming_tx, incoming) = mpsc::channel(16);
        let (alive, gone) = watch::channel(());
        let reader = tokio::spawn(read_frames(read, buffered, out.clone(), incoming_tx, alive));
        let writer = tokio::spawn(write_frames(write, encoder, out_rx));
        Ok(Self {
            incoming,
            out,
            gone,
            reader,
            writer,
        })
    }

    /// Resolves once the client has closed the connection (or it broke).
    pub fn gone(&self) -> Gone {
        let mut gone = self.gone.clone();
        Box::pin(async move { while gone.changed().await.is_ok() {} })
    }

    /// The next stream the client opens; `None` once the connection is gone.
    pub async fn next_stream(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Ends the connection: what was queued is sent, then GOAWAY and the socket's
    /// write side is closed; the client gets a moment to close its side.
    pub async fn close(mut self) {
        self.incoming.close();
        let _ = self.out.send(Out::Close).await;
        let _ = tokio::time::timeout(LINGER, &mut self.writer).await;
        if tokio::time::timeout(LINGER, &mut self.reader)
            .await
            .is_err()
        {
            self.reader.abort();
        }
        self.writer.abort();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut write: W,
    mut encoder: Encoder,
    mut out: mpsc::Receiver<Out>,
) {
    let mut bytes = Vec::with_capacity(CHUNK + 64);
    while let Some(first) = out.recv().await {
        let mut close = false;
        let mut next = Some(first);
        // Batch what is queued into one write.
        while let Some(item) = next.take() {
            match item {
                Out::Frame(frame) => {
                    if let Err(error) = encoder.encode(&frame, &mut bytes) {
                        tracing::warn!(%error, "cannot encode a SPDY frame");
                    }
                }
                Out::Close => {
                    close = true;
                    break;
                }
            }
            if bytes.len() < 4 * CHUNK {
                next = out.try_recv().ok();
            }
        }
        if close {
            let _ = encoder.encode(
                &Frame::GoAway {
                    last_good_stream_id: 0,
                    status: 0,
                },
                &mut bytes,
            );
        }
        if write.write_all(&bytes).await.is_err() || write.flush().await.is_err() {
            return;
        }
        bytes.clear();
        if close {
            let _ = write.shutdown().await;
            return;
        }
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut read: R,
    mut buffer: Vec<u8>,
    out: mpsc::Sender<Out>,
    incoming: mpsc::Sender<Stream>,
    _alive: watch::Sender<()>,
) {
    let mut decoder = Decoder::default();
    let mut streams: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut last_id = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let frame = match decoder.decode(&buffer) {
            Ok(Some((frame, used))) => {
                buffer.drain(..used);
                frame
            }
            Ok(None) => match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buffer.extend_from_slice(&chunk[..n]);
                    continue;
                }
            },
            Err(error) => {
                tracing::debug!(%error, "dropping the SPDY connection");
                return;
            }
        };
        let reply = match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                if stream_id % 2 == 0 || stream_id <= last_id {
                    Some(Frame::RstStream {
                        stream_id,
                        status: RST_PROTOCOL_ERROR,
                    })
                } else if flags & FLAG_FIN == 0 && streams.len() >= MAX_OPEN_STREAMS {
                    last_id = stream_id;
                    Some(Frame::RstStream {
                        stream_id,
                        status: RST_REFUSED_STREAM,
                    })
                } else {
                    last_id = stream_id;
                    let (data_tx, data) = mpsc::channel(STREAM_QUEUE);
                    if flags & FLAG_FIN == 0 {
                        streams.insert(stream_id, data_tx);
                    }
                    let writer = StreamWriter {
                        id: stream_id,
                        out: out.clone(),
                    };
                    if out
                        .send(Out::Frame(Frame::SynReply {
                            stream_id,
                            fin: false,
                            headers: Headers::new(),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    match incoming
                        .send(Stream {
                            headers,
                            data,
                            writer,
                        })
                        .await
                    {
                        Ok(()) => None,
                        Err(_) => {
                            streams.remove(&stream_id);
                            Some(Frame::RstStream {
                                stream_id,
                                status: RST_REFUSED_STREAM,
                            })
                        }
                    }
                }
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                if let Some(stream) = streams.get(&stream_id)
                    && !data.is_empty()
                    && stream.send(data).await.is_err()
                {
                    // Nobody reads this stream: what comes is dropped.
                }
                if fin {
                    streams.remove(&stream_id);
                }
                None
            }
            Frame::RstStream { stream_id, .. } => {
                streams.remove(&stream_id);
                None
            }
            Frame::Ping { id } => Some(Frame::Ping { id }),
            Frame::GoAway { .. } => return,
            Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => None,
        };
        if let Some(reply) = reply
            && out.send(Out::Frame(reply)).await.is_err()
        {
            return;
        }
    }
}

/// Copies what a reader gives to a stream, until the reader ends.
pub async fn copy_to_stream<R: AsyncRead + Unpin>(
    mut from: R,
    to: &StreamWriter,
) -> Result<(), StreamingError> {
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let n = from
            .read(&mut buffer)
            .await
            .map_err(|source| StreamingError::Io {
                what: "cannot read output for the client",
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        to.write(&buffer[..n]).await?;
    }
}

/// Copies what the client sends on a stream to a writer, then shuts the writer down.
pub async fn copy_from_stream<W: AsyncWrite + Unpin>(
    from: &mut mpsc::Receiver<Vec<u8>>,
    mut to: W,
) -> Result<(), StreamingError> {
    while let Some(chunk) = from.recv().await {
        to.write_all(&chunk)
            .await
            .map_err(|source| StreamingError::Io {
                what: "cannot pass on what the client sent",
                source,
            })?;
    }
    to.shutdown().await.map_err(|source| StreamingError::Io {
        what: "cannot close the input",
        source,
    })
}

#[cfg(test)]
mod tests;
