//! The client end of a SPDY connection for the crate's own tests: frames written and
//! read by hand over an in-memory pipe, so a test says exactly what a client (or an
//! attacker) sends and sees exactly what the server answers.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::frame::{Decoder, Encoder, Frame, Headers};
use crate::spdy::Connection;

/// How long a test waits for a frame it expects.
const PATIENCE: Duration = Duration::from_secs(10);

pub struct Client {
    socket: DuplexStream,
    encoder: Encoder,
    decoder: Decoder,
    buffer: Vec<u8>,
    next_id: u32,
}

/// A server connection and the client talking to it.
pub fn connect() -> (Client, Connection) {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let (read, write) = tokio::io::split(server);
    let connection = Connection::start(read, write, Vec::new()).expect("server connection");
    let client = Client {
        socket: client,
        encoder: Encoder::new().expect("encoder"),
        decoder: Decoder::default(),
        buffer: Vec::new(),
        next_id: 1,
    };
    (client, connection)
}

pub fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

impl Client {
    pub async fn send(&mut self, frame: Frame) {
        let mut bytes = Vec::new();
        self.encoder.encode(&frame, &mut bytes).expect("encode");
        self.send_raw(&bytes).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("send");
    }

    /// Opens a stream (the next odd id); returns its id.
    pub async fn open(&mut self, pairs: &[(&str, &str)]) -> u32 {
        let stream_id = self.next_id;
        self.next_id += 2;
        self.send(Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers(pairs),
        })
        .await;
        stream_id
    }

    pub async fn data(&mut self, stream_id: u32, data: &[u8], fin: bool) {
        self.send(Frame::Data {
            stream_id,
            fin,
            data: data.to_vec(),
        })
        .await;
    }

    /// The next frame from the server; `None` once it closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(PATIENCE, self.read_frame())
            .await
            .expect("the server answers in time")
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((frame, used)) = self.decoder.decode(&self.buffer).expect("decode") {
                self.buffer.drain(..used);
                return Some(frame);
            }
            match self.socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads past SYN_REPLYs and other streams' frames to the next one `wanted` takes.
    pub async fn next_where(&mut self, wanted: impl Fn(&Frame) -> bool) -> Frame {
        loop {
            match self.next().await {
                Some(frame) if wanted(&frame) => return frame,
                Some(_) => {}
                None => panic!("the server closed the connection"),
            }
        }
    }

    /// What the server sends on a stream, until it closes it.
    pub async fn read_stream(&mut self, id: u32) -> Vec<u8> {
        let mut received = Vec::new();
        loop {
            match self
                .next_where(
                    |frame| matches!(frame, Frame::Data { stream_id, .. } if *stream_id == id),
                )
                .await
            {
                Frame::Data { data, fin, .. } => {
                    received.extend_from_slice(&data);
                    if fin {
                        return received;
                    }
                }
                _ => unreachable!("only data frames are taken"),
            }
        }
    }
}
