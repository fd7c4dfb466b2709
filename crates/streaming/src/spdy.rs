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
                        Err(_) => Some(Frame::RstStream {
                            stream_id,
                            status: RST_REFUSED_STREAM,
                        }),
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
mod tests {
    use crate::frame::*;

    fn round_trip(frames: &[Frame]) {
        let (mut encoder, mut decoder) = (Encoder::new().expect("encoder"), Decoder::default());
        let mut bytes = Vec::new();
        for frame in frames {
            encoder.encode(frame, &mut bytes).expect("encode");
        }
        let mut at = 0;
        for frame in frames {
            // Fed a byte short, the decoder waits for more.
            let size = frame_size(&bytes[at..]);
            assert!(
                Decoder::default()
                    .decode(&bytes[at..at + size - 1])
                    .expect("partial")
                    .is_none()
            );
            let (decoded, used) = decoder
                .decode(&bytes[at..])
                .expect("decode")
                .expect("whole frame");
            assert_eq!(&decoded, frame);
            at += used;
        }
        assert_eq!(at, bytes.len());
    }

    /// The size of the frame at the front (from its header).
    fn frame_size(bytes: &[u8]) -> usize {
        8 + u32::from_be_bytes([0, bytes[5], bytes[6], bytes[7]]) as usize
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_frame_type_round_trips_with_shared_header_compression() {
        round_trip(&[
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers(&[("streamtype", "error")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 7,
                flags: FLAG_FIN,
                headers: headers(&[("streamtype", "stdout"), ("port", "80"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 3,
                fin: true,
                headers: headers(&[("a", "1"), ("a", "2")]),
            },
            Frame::Data {
                stream_id: 3,
                fin: true,
                data: b"hello".to_vec(),
            },
            Frame::Data {
                stream_id: 5,
                fin: false,
                data: Vec::new(),
            },
            Frame::RstStream {
                stream_id: 3,
                status: 5,
            },
            Frame::Settings {
                entries: vec![(0, 4, 100), (1, 7, 65536)],
            },
            Frame::Ping { id: 1 },
            Frame::GoAway {
                last_good_stream_id: 5,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 4096,
            },
        ]);
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(HEADER_DICTIONARY.len(), 1423);
        // Adler-32, as zlib's FDICT field names it.
        let (mut a, mut b) = (1u32, 0u32);
        for byte in HEADER_DICTIONARY {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    /// A SYN_STREAM whose header block zlib itself compressed (Python's zlib with the
    /// dictionary, as Go's compress/zlib writes it): `streamtype: error`.
    #[test]
    fn reads_a_header_block_compressed_by_zlib() {
        let block = include_bytes!("testdata/syn_stream_error.bin");
        let (frame, used) = Decoder::default()
            .decode(block)
            .expect("decode")
            .expect("frame");
        assert_eq!(used, block.len());
        assert_eq!(
            frame,
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers(&[("streamtype", "error")])
            }
        );
    }

    #[test]
    fn multiple_values_travel_nul_separated() {
        let mut encoder = Encoder::new().expect("encoder");
        let mut bytes = Vec::new();
        let sent = headers(&[
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
            ("x-stream-protocol-version", "channel.k8s.io"),
        ]);
        encoder
            .encode(
                &Frame::SynReply {
                    stream_id: 1,
                    fin: false,
                    headers: sent.clone(),
                },
                &mut bytes,
            )
            .expect("encode");
        let (frame, _) = Decoder::default()
            .decode(&bytes)
            .expect("decode")
            .expect("frame");
        assert_eq!(
            frame,
            Frame::SynReply {
                stream_id: 1,
                fin: false,
                headers: sent
            }
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut bad = vec![0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0e];
        bad.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
        assert!(Decoder::default().decode(&bad).is_err());
        let wrong_version = [0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1];
        assert!(Decoder::default().decode(&wrong_version).is_err());
        let short_ping = [0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x02, 0, 0];
        assert!(Decoder::default().decode(&short_ping).is_err());
    }
}
