//! A small SPDY/3.1 client for the streaming server's URLs, as client-go's SPDY
//! executor and port-forwarder use them: an HTTP/1.1 upgrade, then streams the
//! client opens (odd ids), named by headers. It uses the runtime's frame codec
//! (`trellis-streaming`), so both ends of the tests speak through one implementation.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use trellis_streaming::frame::{self, Decoder, Encoder, Frame, Headers, header};

pub struct SpdyClient {
    socket: TcpStream,
    encoder: Encoder,
    decoder: Decoder,
    buffer: Vec<u8>,
    next_id: u32,
    /// The `X-Stream-Protocol-Version` the server chose.
    pub protocol: String,
}

/// What an HTTP request that was not upgraded got.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub head: String,
}

impl SpdyClient {
    /// POSTs to `url` (`http://host:port/path`) asking for SPDY/3.1 and `protocols`.
    pub async fn connect(url: &str, protocols: &[&str]) -> Result<SpdyClient, Refused> {
        let rest = url.strip_prefix("http://").expect("http URL");
        let (host, path) = rest
            .split_once('/')
            .map(|(h, p)| (h, format!("/{p}")))
            .unwrap_or((rest, "/".into()));
        let mut socket = TcpStream::connect(host)
            .await
            .expect("connect to the streaming server");
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
        );
        for protocol in protocols {
            request.push_str(&format!("X-Stream-Protocol-Version: {protocol}\r\n"));
        }
        request.push_str("\r\n");
        socket
            .write_all(request.as_bytes())
            .await
            .expect("send the upgrade request");
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = socket
                .read(&mut chunk)
                .await
                .expect("read the upgrade response");
            assert!(
                n > 0,
                "the server closed before answering: {}",
                String::from_utf8_lossy(&buffer)
            );
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..end]).to_string();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        if status != 101 {
            return Err(Refused { status, head });
        }
        let protocol = head
            .lines()
            .find_map(|line| {
                line.split_once(':')
                    .filter(|(name, _)| name.eq_ignore_ascii_case("x-stream-protocol-version"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        Ok(SpdyClient {
            socket,
            encoder: Encoder::new().expect("encoder"),
            decoder: Decoder::default(),
            buffer: buffer[end..].to_vec(),
            next_id: 1,
            protocol,
        })
    }

    pub async fn send_frame(&mut self, frame: Frame) {
        let mut bytes = Vec::new();
        self.encoder.encode(&frame, &mut bytes).expect("encode");
        self.socket.write_all(&bytes).await.expect("send a frame");
    }

    /// Opens a stream with these headers; returns its id.
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let stream_id = self.next_id;
        self.next_id += 2;
        let headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self.send_frame(Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await;
        stream_id
    }

    pub async fn send(&mut self, stream_id: u32, data: &[u8], fin: bool) {
        self.send_frame(Frame::Data {
            stream_id,
            fin,
            data: data.to_vec(),
        })
        .await;
    }

    /// The next frame from the server; `None` when it closed the connection.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((frame, used)) = self
                .decoder
                .decode(&self.buffer)
                .expect("a well-formed frame")
            {
                self.buffer.drain(..used);
                return Some(frame);
            }
            match self.socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames, answering pings, until `until` says so (given the data so far and
    /// the streams the server finished) or the connection ends; panics after `limit`.
    pub async fn read_until(
        &mut self,
        limit: Duration,
        until: impl FnMut(&HashMap<u32, Vec<u8>>, &[u32]) -> bool,
    ) -> Received {
        let received = self.read_for(limit, until).await;
        assert!(
            !received.timed_out,
            "timed out; so far: {:?}",
            received.printable()
        );
        received
    }

    /// As `read_until`, but gives up quietly after `limit` (`timed_out` set).
    pub async fn read_for(
        &mut self,
        limit: Duration,
        mut until: impl FnMut(&HashMap<u32, Vec<u8>>, &[u32]) -> bool,
    ) -> Received {
        let mut received = Received::default();
        let deadline = tokio::time::Instant::now() + limit;
        while !until(&received.data, &received.finished) {
            let Ok(frame) = tokio::time::timeout_at(deadline, self.next_frame()).await else {
                received.timed_out = true;
                break;
            };
            match frame {
                None => {
                    received.closed = true;
                    break;
                }
                Some(Frame::Data {
                    stream_id,
                    fin,
                    data,
                }) => {
                    received
                        .data
                        .entry(stream_id)
                        .or_default()
                        .extend_from_slice(&data);
                    if fin {
                        received.finished.push(stream_id);
                    }
                }
                Some(Frame::RstStream { stream_id, .. }) => received.finished.push(stream_id),
                Some(Frame::SynReply { stream_id, .. }) => received.replied.push(stream_id),
                Some(Frame::Ping { id }) => self.send_frame(Frame::Ping { id }).await,
                Some(Frame::GoAway { .. }) => received.goaway = true,
                Some(_) => {}
            }
        }
        received
    }
}

#[derive(Debug, Default)]
pub struct Received {
    pub data: HashMap<u32, Vec<u8>>,
    pub finished: Vec<u32>,
    pub replied: Vec<u32>,
    pub goaway: bool,
    pub closed: bool,
    pub timed_out: bool,
}

impl Received {
    pub fn text(&self, stream_id: u32) -> String {
        String::from_utf8_lossy(
            self.data
                .get(&stream_id)
                .map(Vec::as_slice)
                .unwrap_or_default(),
        )
        .to_string()
    }

    fn printable(&self) -> HashMap<u32, String> {
        self.data.keys().map(|id| (*id, self.text(*id))).collect()
    }
}
