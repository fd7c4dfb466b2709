use super::*;
use trellis_common::grpc::MAX_MESSAGE_BYTES;

#[tokio::test]
async fn exec_output_is_cut_to_fit_one_message_and_says_so() {
    let big = vec![b'x'; MAX_EXEC_OUTPUT + 1000];
    let captured = read_capped(Some(big.as_slice()), MAX_EXEC_OUTPUT).await;
    assert_eq!(
        (captured.kept.len(), captured.total),
        (MAX_EXEC_OUTPUT, big.len() as u64)
    );
    let small = read_capped(Some(&b"ok"[..]), MAX_EXEC_OUTPUT).await;
    assert_eq!((small.kept.as_slice(), small.total), (&b"ok"[..], 2));
    assert_eq!(
        cut_note(MAX_EXEC_OUTPUT as u64, 0),
        None,
        "nothing cut, nothing said"
    );
    let note = cut_note(20 << 20, 3).expect("a note");
    assert!(
        note.contains("stdout 20971520 bytes, first") && note.contains("stderr 3 bytes"),
        "{note}"
    );
    // Both streams at their limit plus the note, with the protobuf framing, fit.
    let response = k8s_cri::v1::ExecSyncResponse {
        stdout: captured.kept.clone(),
        stderr: [captured.kept, note.into_bytes()].concat(),
        exit_code: 0,
    };
    assert!(prost::Message::encoded_len(&response) < MAX_MESSAGE_BYTES);
}
