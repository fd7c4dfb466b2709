//! Accepting gRPC clients that dial a Unix socket path.
//!
//! grpc-go, and so the kubelet, crictl and critest, sends the socket path (for
//! example `/run/trellis/trellis.sock`) as the HTTP/2 `:authority` when it dials a
//! bare path. That is not a valid authority, and the `h2` server under tonic resets
//! every such stream with PROTOCOL_ERROR. This shim sits between the socket and the
//! server: it decodes each header block the client sends, replaces an authority that
//! is not a valid host with `localhost`, and re-encodes the block without using the
//! HPACK dynamic table (so the server's decoding state never depends on the client's).
//! Every other frame, and everything the server sends, passes through untouched.
//!
//! The shim is a wrapper around the connection, not a task of its own copying through
//! a pipe: the server's reads parse the client's frames in place and its writes go
//! straight to the socket. A client whose first header block carries a valid
//! authority (Rust clients, Trellis's own services) is not one the shim is for: from
//! then on its bytes pass unparsed and unchanged, so that the HPACK decoding of every
//! call is done once, by the server. (Its first block is passed as it came too, so the
//! server's HPACK state is the client's. A later invalid authority from such a
//! client is refused by the server, as it would be without the shim.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The HTTP/2 default SETTINGS_MAX_FRAME_SIZE, which the server keeps.
const MAX_FRAME_LEN: usize = 16_384;
/// Largest frame accepted from a client (the protocol's ceiling is 2^24 - 1).
const MAX_ACCEPTED_FRAME_LEN: usize = 1 << 24;
/// Largest header block accepted across HEADERS and CONTINUATION frames.
const MAX_HEADER_BLOCK_LEN: usize = 1 << 24;
const FALLBACK_AUTHORITY: &[u8] = b"localhost";
/// Bytes read from the client at once.
const READ_CHUNK: usize = 16 * 1024;

/// Wraps an accepted connection; the result is what the gRPC server reads and writes.
pub fn normalize<S>(client: S) -> Normalized<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    Normalized {
        inner: client,
        rewriter: Rewriter::default(),
        scratch: Vec::new(),
        out: Vec::new(),
        out_pos: 0,
        eof: false,
    }
}

/// A client connection whose header blocks carry a valid authority (see the module).
pub struct Normalized<S> {
    inner: S,
    rewriter: Rewriter,
    /// Where reads from the client land before they are parsed.
    scratch: Vec<u8>,
    /// Parsed and rewritten bytes not yet handed to the server, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Normalized<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.mode == Mode::Passthrough {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if this.scratch.len() < READ_CHUNK {
                this.scratch.resize(READ_CHUNK, 0);
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            this.rewriter
                .feed(&this.scratch[..n], &mut this.out)
                .inspect_err(|error| {
                    tracing::debug!(%error, "client connection ended with an HTTP/2 framing error");
                })?;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Normalized<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Normalized<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Where the parse of the client's bytes stands.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Bytes of the connection preface still to come.
    Preface(usize),
    /// Collecting a frame header.
    FrameHeader,
    /// Payload bytes of a frame that passes unchanged.
    Passthrough(usize),
    /// Payload bytes of a HEADERS or CONTINUATION frame still to collect.
    HeaderPayload {
        kind: u8,
        flags: u8,
        stream: u32,
        left: usize,
    },
}

/// What the shim does with a connection's header blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Until the first header block is whole: it decides.
    Deciding,
    /// The client's authority was valid: every byte passes unchanged.
    Passthrough,
    /// Every header block is decoded and written again (see the module).
    Rewrite,
}

/// The client-to-server byte stream, parsed as it arrives in pieces of any size.
struct Rewriter {
    mode: Mode,
    /// The frames of the first header block as they came, while deciding.
    first_block: Vec<u8>,
    stage: Stage,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    /// A header block being collected: (stream id, END_STREAM flag, fragments so far).
    block: Option<(u32, u8, Vec<u8>)>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self {
            mode: Mode::Deciding,
            first_block: Vec::new(),
            stage: Stage::Preface(PREFACE_LEN),
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload: Vec::new(),
            decoder: loona_hpack::Decoder::new(),
            block: None,
        }
    }
}

impl Rewriter {
    /// Parses `input`, appending what the server is to read to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        while !input.is_empty() {
            if self.mode == Mode::Passthrough {
                out.extend_from_slice(input);
                return Ok(());
            }
            match self.stage {
                Stage::Preface(left) | Stage::Passthrough(left) => {
                    let n = left.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.stage = match (self.stage, left - n) {
                        (_, 0) => Stage::FrameHeader,
                        (Stage::Preface(_), left) => Stage::Preface(left),
                        (_, left) => Stage::Passthrough(left),
                    };
                }
                Stage::FrameHeader => {
                    let n = (FRAME_HEADER_LEN - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len == FRAME_HEADER_LEN {
                        self.header_len = 0;
                        self.frame_header(out)?;
                    }
                }
                Stage::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    left,
                } => {
                    let n = left.min(input.len());
                    self.payload.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.stage = Stage::HeaderPayload {
                        kind,
                        flags,
                        stream,
                        left: left - n,
                    };
                    if left == n {
                        self.header_frame(kind, flags, stream, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn frame_header(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let header = self.header;
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        if len > MAX_ACCEPTED_FRAME_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes"),
            ));
        }
        if kind == HEADERS || kind == CONTINUATION {
            if self.mode == Mode::Deciding {
                self.first_block.extend_from_slice(&header);
            }
            self.payload.clear();
            self.stage = Stage::HeaderPayload {
                kind,
                flags,
                stream,
                left: len,
            };
            if len == 0 {
                self.header_frame(kind, flags, stream, out)?;
            }
        } else {
            out.extend_from_slice(&header);
            self.stage = if len == 0 {
                Stage::FrameHeader
            } else {
                Stage::Passthrough(len)
            };
        }
        Ok(())
    }

    /// A whole HEADERS or CONTINUATION frame is in `payload`.
    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.stage = Stage::FrameHeader;
        let payload = std::mem::take(&mut self.payload);
        if self.mode == Mode::Deciding {
            self.first_block.extend_from_slice(&payload);
        }
        if kind == HEADERS {
            let fragment = header_fragment(&payload, flags)?;
            self.block = Some((stream, flags & END_STREAM, fragment.to_vec()));
        } else {
            match self.block.as_mut() {
                Some((_, _, fragments))
                    if fragments.len() + payload.len() <= MAX_HEADER_BLOCK_LEN =>
                {
                    fragments.extend_from_slice(&payload)
                }
                Some(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "header block too large",
                    ));
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "CONTINUATION without HEADERS",
                    ));
                }
            }
        }
        // The payload's buffer is kept for the next frame, emptied.
        self.payload = payload;
        self.payload.clear();
        if flags & END_HEADERS != 0
            && let Some((stream, end_stream, fragments)) = self.block.take()
        {
            let headers = self
                .decoder
                .decode(&fragments)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
            if self.mode == Mode::Deciding {
                let invalid = headers.iter().any(|(name, value)| {
                    name == b":authority"
                        && http::uri::Authority::try_from(value.as_slice()).is_err()
                });
                if !invalid {
                    self.mode = Mode::Passthrough;
                    out.extend_from_slice(&std::mem::take(&mut self.first_block));
                    return Ok(());
                }
                self.mode = Mode::Rewrite;
                self.first_block = Vec::new();
            }
            write_header_block(out, stream, end_stream, &encode_plain(headers));
        }
        Ok(())
    }
}

/// The header block fragment of a HEADERS frame, without padding and priority.
fn header_fragment(payload: &[u8], flags: u8) -> io::Result<&[u8]> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed HEADERS frame");
    let mut fragment = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = fragment.split_first().ok_or_else(malformed)?;
        fragment = rest
            .get(
                ..rest
                    .len()
                    .checked_sub(usize::from(pad))
                    .ok_or_else(malformed)?,
            )
            .ok_or_else(malformed)?;
    }
    if flags & PRIORITY != 0 {
        fragment = fragment.get(5..).ok_or_else(malformed)?;
    }
    Ok(fragment)
}

/// Every header as a literal without indexing (RFC 7541 §6.2.2), strings raw.
fn encode_plain(headers: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let value =
            if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                FALLBACK_AUTHORITY.to_vec()
            } else {
                value
            };
        out.push(0x00);
        for string in [&name, &value] {
            // Writing into a Vec cannot fail.
            let _ = loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, &mut out);
            out.extend_from_slice(string);
        }
    }
    out
}

fn write_header_block(out: &mut Vec<u8>, stream: u32, end_stream: u8, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME_LEN).peekable();
    let mut kind = HEADERS;
    let mut flags = end_stream;
    if chunks.peek().is_none() {
        return write_frame(out, HEADERS, flags | END_HEADERS, stream, &[]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        write_frame(
            out,
            kind,
            if last { flags | END_HEADERS } else { flags },
            stream,
            chunk,
        );
        kind = CONTINUATION;
        flags = 0;
    }
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len().to_be_bytes();
    out.extend_from_slice(&len[len.len() - 3..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests;
