//! The shim against hand-made HTTP/2 bytes and a real server.
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

#[test]
fn split_blocks_are_joined_and_large_blocks_split() {
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

    // Whole, and in pieces of every size the socket might hand over.
    let mut output = Vec::new();
    Rewriter::default()
        .feed(&input, &mut output)
        .expect("rewrite");
    for piece in [1, 7, 9, 100, 4096] {
        let mut pieces = Vec::new();
        let mut rewriter = Rewriter::default();
        for chunk in input.chunks(piece) {
            rewriter.feed(chunk, &mut pieces).expect("rewrite");
        }
        assert_eq!(pieces, output, "fed {piece} bytes at a time");
    }
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

#[test]
fn a_client_with_a_valid_authority_passes_unchanged() {
    let mut encoder = loona_hpack::Encoder::new();
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend(frame(0x4, 0, 0, &[]));
    let first: Vec<(&[u8], &[u8])> = vec![(b":authority", b"localhost"), (b":path", b"/a.B/C")];
    input.extend(frame(HEADERS, END_HEADERS, 1, &encoder.encode(first)));
    input.extend(frame(0x0, END_STREAM, 1, b"data"));
    // Later blocks are not looked at, whatever they hold.
    let later: Vec<(&[u8], &[u8])> = vec![(b":authority", b"/a/path.sock")];
    input.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &encoder.encode(later),
    ));
    for piece in [1, 5, 9, 64, 4096] {
        let mut output = Vec::new();
        let mut rewriter = Rewriter::default();
        for chunk in input.chunks(piece) {
            rewriter.feed(chunk, &mut output).expect("feed");
        }
        assert_eq!(output, input, "fed {piece} bytes at a time");
        assert_eq!(rewriter.mode, Mode::Passthrough);
    }
}

/// A client frame as bytes.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, kind, flags, stream, payload);
    out
}

/// A health check as grpc-go sends it when it dials a socket path, written on
/// `client`; the kinds of the frames the server answers on stream 1.
async fn health_check_with_path_authority(mut client: tokio::io::DuplexStream) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(frame(0x4, 0, 0, &[]));
    let headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/grpc.health.v1.Health/Check"),
        (b":authority", b"/run/trellis/trellis.sock"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    let block = loona_hpack::Encoder::new().encode(headers);
    request.extend(frame(HEADERS, END_HEADERS, 1, &block));
    request.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
    client.write_all(&request).await.expect("send");
    let mut answered = Vec::new();
    let mut input = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    // Until the stream ends (END_STREAM on HEADERS) or is reset.
    loop {
        while input.len() >= FRAME_HEADER_LEN {
            let len =
                usize::from(input[0]) << 16 | usize::from(input[1]) << 8 | usize::from(input[2]);
            if input.len() < FRAME_HEADER_LEN + len {
                break;
            }
            let (kind, flags) = (input[3], input[4]);
            let stream = u32::from_be_bytes([input[5], input[6], input[7], input[8]]);
            input.drain(..FRAME_HEADER_LEN + len);
            if stream == 1 {
                answered.push(kind);
                if kind == 0x3 || (kind == HEADERS && flags & END_STREAM != 0) {
                    return answered;
                }
            }
        }
        let read = tokio::time::timeout_at(deadline, client.read(&mut buffer))
            .await
            .expect("the server answers in time")
            .expect("read");
        assert!(read > 0, "the server closed the connection: {answered:?}");
        input.extend_from_slice(&buffer[..read]);
    }
}

fn serve(connection: tokio::io::DuplexStream, shimmed: bool) {
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let routes = tonic::service::Routes::new(health);
        let server = tonic::transport::Server::builder().add_routes(routes);
        let _ = if shimmed {
            let incoming = tokio_stream::once(Ok::<_, io::Error>(normalize(connection)));
            server.serve_with_incoming(incoming).await
        } else {
            let incoming = tokio_stream::once(Ok::<_, io::Error>(connection));
            server.serve_with_incoming(incoming).await
        };
    });
}

#[tokio::test]
async fn a_socket_path_authority_is_served_through_the_shim_and_reset_without_it() {
    const RST_STREAM: u8 = 0x3;
    let (client, server) = tokio::io::duplex(64 * 1024);
    serve(server, true);
    let answered = health_check_with_path_authority(client).await;
    assert!(
        answered.contains(&HEADERS) && !answered.contains(&RST_STREAM),
        "answered with frames {answered:?}"
    );

    let (client, server) = tokio::io::duplex(64 * 1024);
    serve(server, false);
    let answered = health_check_with_path_authority(client).await;
    assert_eq!(answered, vec![RST_STREAM], "the bare server refuses it");
}
