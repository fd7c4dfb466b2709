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

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

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
const FALLBACK_AUTHORITY: &[u8] = b"localhost";

/// Wraps an accepted connection; the returned stream is what the gRPC server reads.
pub fn normalize<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (server_side, shim_side) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut shim_read, mut shim_write) = tokio::io::split(shim_side);
        let upstream = async {
            let result = rewrite_client_frames(&mut client_read, &mut shim_write).await;
            let _ = shim_write.shutdown().await;
            result
        };
        let downstream = async {
            let result = tokio::io::copy(&mut shim_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
            result
        };
        let (up, _) = tokio::join!(upstream, downstream);
        if let Err(error) = up {
            tracing::debug!(%error, "client connection ended with an HTTP/2 framing error");
        }
    });
    server_side
}

async fn rewrite_client_frames<R, W>(client: &mut R, server: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE_LEN];
    if !read_or_eof(client, &mut preface).await? {
        return Ok(());
    }
    server.write_all(&preface).await?;

    let mut decoder = loona_hpack::Decoder::new();
    // A header block being collected: (stream id, END_STREAM flag, fragments so far).
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if !read_or_eof(client, &mut header).await? {
            return Ok(());
        }
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
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).await?;

        match kind {
            HEADERS => {
                let fragment = header_fragment(&payload, flags)?;
                block = Some((stream, flags & END_STREAM, fragment.to_vec()));
            }
            CONTINUATION => match block.as_mut() {
                Some((_, _, fragments)) => fragments.extend_from_slice(&payload),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "CONTINUATION without HEADERS",
                    ));
                }
            },
            _ => {
                server.write_all(&header).await?;
                server.write_all(&payload).await?;
                continue;
            }
        }
        if flags & END_HEADERS != 0
            && let Some((stream, end_stream, fragments)) = block.take()
        {
            let headers = decoder
                .decode(&fragments)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {e:?}")))?;
            write_header_block(server, stream, end_stream, &encode_plain(headers)).await?;
        }
    }
}

/// Reads exactly `buf.len()` bytes; false on a clean end of stream before any.
async fn read_or_eof<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
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

async fn write_header_block<W: AsyncWrite + Unpin>(
    server: &mut W,
    stream: u32,
    end_stream: u8,
    block: &[u8],
) -> io::Result<()> {
    let mut chunks = block.chunks(MAX_FRAME_LEN).peekable();
    let mut kind = HEADERS;
    let mut flags = end_stream;
    if chunks.peek().is_none() {
        return write_frame(server, HEADERS, flags | END_HEADERS, stream, &[]).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        write_frame(
            server,
            kind,
            if last { flags | END_HEADERS } else { flags },
            stream,
            chunk,
        )
        .await?;
        kind = CONTINUATION;
        flags = 0;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    server: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = payload.len().to_be_bytes();
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..3].copy_from_slice(&len[len.len() - 3..]);
    header[3] = kind;
    header[4] = flags;
    header[5..].copy_from_slice(&stream.to_be_bytes());
    server.write_all(&header).await?;
    server.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .expect("decodable")
    }

    #[test]
    fn path_authority_becomes_localhost_and_others_stay() {
        let headers = vec![
            (
                b":authority".to_vec(),
                b"/run/trellis/trellis.sock".to_vec(),
            ),
            (
                b":path".to_vec(),
                b"/runtime.v1.RuntimeService/Version".to_vec(),
            ),
            (b"grpc-timeout".to_vec(), b"1999m".to_vec()),
        ];
        let decoded = decode(&encode_plain(headers));
        assert_eq!(decoded[0], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(decoded[1].1, b"/runtime.v1.RuntimeService/Version".to_vec());
        assert_eq!(decoded[2].1, b"1999m".to_vec());
        let valid = decode(&encode_plain(vec![(
            b":authority".to_vec(),
            b"localhost:1234".to_vec(),
        )]));
        assert_eq!(valid[0].1, b"localhost:1234".to_vec());
    }

    #[test]
    fn padding_and_priority_are_stripped() {
        // pad length 2, priority (5 bytes), fragment "ab", 2 bytes padding
        let payload = [2u8, 0, 0, 0, 1, 16, b'a', b'b', 0, 0];
        assert_eq!(
            header_fragment(&payload, PADDED | PRIORITY).expect("fragment"),
            b"ab"
        );
        assert!(
            header_fragment(&[9u8, 1], PADDED).is_err(),
            "padding longer than the frame"
        );
    }

    #[tokio::test]
    async fn split_blocks_are_joined_and_large_blocks_split() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = vec![b'x'; 20_000];
        let headers: Vec<(&[u8], &[u8])> = vec![(b":authority", b"/tmp/s.sock"), (b"x-big", &big)];
        let block = encoder.encode(headers);
        let (first, rest) = block.split_at(100);
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let frame = |kind: u8, flags: u8, payload: &[u8]| {
            let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            f.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
            f.extend_from_slice(payload);
            f
        };
        input.extend(frame(HEADERS, END_STREAM, first));
        input.extend(frame(CONTINUATION, END_HEADERS, rest));
        input.extend(frame(0x0, END_STREAM, b"data"));

        let mut output = Vec::new();
        rewrite_client_frames(&mut input.as_slice(), &mut output)
            .await
            .expect("rewrite");
        assert_eq!(&output[..PREFACE_LEN], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut rest = &output[PREFACE_LEN..];
        let mut block = Vec::new();
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME_LEN);
            kinds.push((rest[3], rest[4]));
            if rest[3] != 0 {
                block.extend_from_slice(&rest[9..9 + len]);
            }
            rest = &rest[9 + len..];
        }
        assert_eq!(
            kinds,
            vec![
                (HEADERS, END_STREAM),
                (CONTINUATION, END_HEADERS),
                (0x0, END_STREAM)
            ]
        );
        let decoded = decode(&block);
        assert_eq!(decoded[0].1, b"localhost".to_vec());
        assert_eq!(decoded[1].1, big);
    }
}
