//! The session against a hand-driven client: what a well-behaved client gets, and
//! what a misbehaving one cannot make the server do.

use super::*;
use crate::testing::{Client, connect, headers};

/// Hands every stream the client opens to the test, keeping the connection read.
fn collect_streams(mut connection: Connection) -> mpsc::Receiver<Stream> {
    let (streams, collected) = mpsc::channel(MAX_OPEN_STREAMS + 16);
    tokio::spawn(async move {
        while let Some(stream) = connection.next_stream().await {
            if streams.send(stream).await.is_err() {
                break;
            }
        }
        connection.close().await;
    });
    collected
}

async fn reset_of(client: &mut Client, id: u32) -> u32 {
    match client
        .next_where(|frame| matches!(frame, Frame::RstStream { stream_id, .. } if *stream_id == id))
        .await
    {
        Frame::RstStream { status, .. } => status,
        other => panic!("not a reset: {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_is_answered_and_carries_data_both_ways() {
    let (mut client, mut connection) = connect();
    let id = client.open(&[("streamtype", "stdout"), ("a", "1")]).await;
    let mut stream = connection.next_stream().await.expect("the stream");
    assert_eq!(
        stream.headers,
        headers(&[("streamtype", "stdout"), ("a", "1")])
    );
    assert_eq!(stream.header("streamtype"), Some("stdout"));
    let reply = client.next().await.expect("a reply");
    assert!(matches!(reply, Frame::SynReply { stream_id, .. } if stream_id == id));

    client.data(id, b"abc", false).await;
    client.data(id, b"", false).await;
    client.data(id, b"def", true).await;
    assert_eq!(stream.data.recv().await.as_deref(), Some(&b"abc"[..]));
    assert_eq!(stream.data.recv().await.as_deref(), Some(&b"def"[..]));
    assert_eq!(stream.data.recv().await, None);

    let sent: Vec<u8> = (0..2 * CHUNK + 10).map(|i| i as u8).collect();
    stream.writer.write(&sent).await.expect("write");
    stream.writer.close().await.expect("close");
    let mut received = Vec::new();
    loop {
        match client.next().await.expect("data") {
            Frame::Data { data, fin, .. } => {
                assert!(data.len() <= CHUNK);
                received.extend_from_slice(&data);
                if fin {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, sent);
}

#[tokio::test]
async fn pings_are_echoed_and_settings_ignored() {
    let (mut client, _connection) = connect();
    client
        .send(Frame::Settings {
            entries: vec![(0, 7, 1 << 20)],
        })
        .await;
    client
        .send(Frame::WindowUpdate {
            stream_id: 0,
            delta: 1,
        })
        .await;
    client.send(Frame::Ping { id: 41 }).await;
    assert_eq!(client.next().await, Some(Frame::Ping { id: 41 }));
}

#[tokio::test]
async fn stream_ids_must_be_odd_and_increasing() {
    let (mut client, connection) = connect();
    let mut streams = collect_streams(connection);
    let syn = |stream_id| Frame::SynStream {
        stream_id,
        associated_to: 0,
        priority: 0,
        flags: 0,
        headers: Headers::new(),
    };
    client.send(syn(2)).await;
    assert_eq!(reset_of(&mut client, 2).await, RST_PROTOCOL_ERROR);
    client.send(syn(5)).await;
    client.send(syn(3)).await;
    client.send(syn(5)).await;
    assert_eq!(reset_of(&mut client, 3).await, RST_PROTOCOL_ERROR);
    assert_eq!(reset_of(&mut client, 5).await, RST_PROTOCOL_ERROR);
    let stream = streams.recv().await.expect("stream 5");
    assert_eq!(stream.writer.id, 5);
    assert!(streams.try_recv().is_err());
}

#[tokio::test]
async fn open_streams_are_capped_and_finished_ones_free_their_place() {
    let (mut client, connection) = connect();
    let mut streams = collect_streams(connection);
    let mut ids = Vec::new();
    for _ in 0..MAX_OPEN_STREAMS {
        ids.push(client.open(&[]).await);
    }
    let refused = client.open(&[]).await;
    assert_eq!(reset_of(&mut client, refused).await, RST_REFUSED_STREAM);
    // One finishes sending: there is room for one more.
    client.data(ids[0], b"", true).await;
    let admitted = client.open(&[]).await;
    client.send(Frame::Ping { id: 1 }).await;
    client
        .next_where(|frame| match frame {
            Frame::RstStream { stream_id, .. } => {
                panic!("stream {stream_id} refused")
            }
            frame => *frame == Frame::Ping { id: 1 },
        })
        .await;
    for id in &ids {
        assert_eq!(streams.recv().await.map(|s| s.writer.id), Some(*id));
    }
    assert_eq!(streams.recv().await.map(|s| s.writer.id), Some(admitted));
}

#[tokio::test]
async fn a_broken_frame_ends_the_connection() {
    let (mut client, mut connection) = connect();
    let gone = connection.gone();
    // A PING of SPDY version 2.
    client
        .send_raw(&[0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1])
        .await;
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("the connection is gone");
    assert!(connection.next_stream().await.is_none());
}

#[tokio::test]
async fn a_goaway_from_the_client_ends_the_connection() {
    let (mut client, connection) = connect();
    let gone = connection.gone();
    client
        .send(Frame::GoAway {
            last_good_stream_id: 0,
            status: 0,
        })
        .await;
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("the connection is gone");
}

#[tokio::test]
async fn close_flushes_says_goaway_and_closes_the_socket() {
    let (mut client, mut connection) = connect();
    let id = client.open(&[]).await;
    let stream = connection.next_stream().await.expect("stream");
    stream.writer.write(b"last words").await.expect("write");
    let closing = tokio::spawn(connection.close());
    let mut before_goaway = Vec::new();
    loop {
        match client.next().await.expect("frames, then GOAWAY") {
            Frame::GoAway { .. } => break,
            frame => before_goaway.push(frame),
        }
    }
    assert!(before_goaway.contains(&Frame::Data {
        stream_id: id,
        fin: false,
        data: b"last words".to_vec()
    }));
    assert_eq!(client.next().await, None);
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .expect("close returns once the client is gone")
        .expect("close task");
    // The writer outlived the connection: writing is an error, not a hang.
    assert!(matches!(
        stream.writer.write(b"more").await,
        Err(StreamingError::Closed)
    ));
}
