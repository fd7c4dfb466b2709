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

/// A SYN_STREAM whose header block is `block`, compressed as a peer would.
fn syn_stream_with_block(block: &[u8]) -> Vec<u8> {
    let mut deflate = Compress::new(Compression::default(), true);
    deflate
        .set_dictionary(HEADER_DICTIONARY)
        .expect("dictionary");
    let mut compressed = Vec::with_capacity(block.len() + 1024);
    deflate
        .compress_vec(block, &mut compressed, FlushCompress::Finish)
        .expect("compress");
    let mut payload = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&compressed);
    let mut frame = vec![0x80, 0x03, 0x00, 0x01];
    push_length(&mut frame, 0, payload.len());
    frame.extend_from_slice(&payload);
    frame
}

/// A header block of one name with one value.
fn block_of(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut block = 1u32.to_be_bytes().to_vec();
    for part in [name, value] {
        block.extend_from_slice(&(part.len() as u32).to_be_bytes());
        block.extend_from_slice(part);
    }
    block
}

#[test]
fn a_header_block_that_inflates_past_the_cap_is_refused() {
    // 4 MiB of zeros compress to a few KiB: a zip bomb in a header block.
    let bomb = syn_stream_with_block(&block_of(b"x", &vec![0u8; 4 << 20]));
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    assert!(matches!(
        Decoder::default().decode(&bomb),
        Err(StreamingError::Compression(_))
    ));
    // Just past the cap, from a payload large enough that the first guess at the
    // inflated size already holds all of it.
    let mut noise = vec![0u8; MAX_HEADER_BLOCK];
    let mut seed = 0x2545_f491_u32;
    for byte in &mut noise {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        *byte = seed as u8;
    }
    let over = syn_stream_with_block(&block_of(b"x", &noise));
    assert!(matches!(
        Decoder::default().decode(&over),
        Err(StreamingError::Compression(_))
    ));
    // At the cap it is still read.
    let at_cap = syn_stream_with_block(&block_of(b"x", &vec![b'a'; MAX_HEADER_BLOCK - 13]));
    assert!(matches!(Decoder::default().decode(&at_cap), Ok(Some(_))));
}

#[test]
fn a_value_of_many_empty_parts_cannot_multiply_a_long_name() {
    // A 5 KiB block: a 1 KiB name and 4 Ki NULs, as headers 4 Ki copies of the name
    // (over 4 MiB). Small enough that a decoder without the limit only fails here.
    let block = block_of(&[b'n'; 1024], &[0u8; 4096]);
    assert!(block.len() < 8 * 1024);
    assert!(matches!(
        Decoder::default().decode(&syn_stream_with_block(&block)),
        Err(StreamingError::Protocol(_))
    ));
}

#[test]
fn a_header_block_cut_short_or_lying_about_lengths_is_refused() {
    let mut count_only = 3u32.to_be_bytes().to_vec();
    count_only.extend_from_slice(&[0, 0, 0, 1, b'a']);
    let mut too_long = 1u32.to_be_bytes().to_vec();
    too_long.extend_from_slice(&u32::MAX.to_be_bytes());
    let not_utf8 = block_of(&[0xff, 0xfe], b"v");
    for block in [vec![], vec![0, 0], count_only, too_long, not_utf8] {
        assert!(matches!(
            Decoder::default().decode(&syn_stream_with_block(&block)),
            Err(StreamingError::Protocol(_))
        ));
    }
    // Bytes that are no zlib stream at all.
    let mut frame = vec![0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x10];
    frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2]);
    assert!(matches!(
        Decoder::default().decode(&frame),
        Err(StreamingError::Compression(_))
    ));
}

#[test]
fn settings_that_count_more_entries_than_they_carry_are_refused() {
    let mut frame = vec![0x80, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x0c];
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 100]);
    assert!(matches!(
        Decoder::default().decode(&frame),
        Err(StreamingError::Protocol(_))
    ));
}

#[test]
fn an_unknown_control_frame_is_skipped_whole() {
    let mut bytes = vec![0x80, 0x03, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x03, 1, 2, 3];
    Encoder::new()
        .expect("encoder")
        .encode(&Frame::Ping { id: 9 }, &mut bytes)
        .expect("encode");
    let mut decoder = Decoder::default();
    let (frame, used) = decoder.decode(&bytes).expect("decode").expect("frame");
    assert_eq!((frame, used), (Frame::Unknown { kind: 10 }, 11));
    let (frame, _) = decoder
        .decode(&bytes[used..])
        .expect("decode")
        .expect("frame");
    assert_eq!(frame, Frame::Ping { id: 9 });
}

#[test]
fn what_a_frame_cannot_carry_is_refused_when_sending() {
    let mut encoder = Encoder::new().expect("encoder");
    let mut bytes = Vec::new();
    let too_long = Frame::Data {
        stream_id: 1,
        fin: false,
        data: vec![0; MAX_PAYLOAD + 1],
    };
    assert!(matches!(
        encoder.encode(&too_long, &mut bytes),
        Err(StreamingError::Protocol(_))
    ));
    assert!(matches!(
        encoder.encode(&Frame::Unknown { kind: 10 }, &mut bytes),
        Err(StreamingError::Protocol(_))
    ));
    assert!(bytes.is_empty());
    let largest = Frame::Data {
        stream_id: 1,
        fin: true,
        data: vec![7; MAX_PAYLOAD],
    };
    encoder.encode(&largest, &mut bytes).expect("the largest");
    assert_eq!(
        Decoder::default().decode(&bytes).expect("decode"),
        Some((largest, 8 + MAX_PAYLOAD))
    );
}

/// Every control type, every short length, and random bytes: an answer each time
/// (a frame, an error, or "more bytes"), never a panic.
#[test]
fn short_and_random_frames_never_panic() {
    let mut seed = 0x9e37_79b9_u32;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for kind in 0..=12u8 {
        for length in 0..=24u8 {
            let mut frame = vec![0x80, 0x03, 0x00, kind, random() as u8, 0x00, 0x00, length];
            frame.extend((0..length).map(|_| random() as u8));
            let _ = Decoder::default().decode(&frame);
        }
    }
    for _ in 0..20_000 {
        let length = (random() % 64) as usize;
        let mut bytes: Vec<u8> = (0..length).map(|_| random() as u8).collect();
        if let Some(first) = bytes.first_mut() {
            // Half of them control frames of our version, to get past the first check.
            if random() % 2 == 0 {
                *first = 0x80;
                if let Some(version) = bytes.get_mut(1) {
                    *version = 0x03;
                }
            }
        }
        let _ = Decoder::default().decode(&bytes);
    }
}
