//! The codec's tests: round trips, a block zlib itself wrote, and hostile input.

use super::*;

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
    let block = include_bytes!("../testdata/syn_stream_error.bin");
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
