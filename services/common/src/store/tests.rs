//! The record store: records, typed tables, and healing after a failed write.

use super::*;

#[test]
fn records_and_ids_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first_id;
    {
        let store = SledStore::open(dir.path()).expect("open");
        let table = store.table("t").expect("table");
        table.put(&2u64.to_be_bytes(), b"two").expect("put");
        table.put(&1u64.to_be_bytes(), b"one").expect("put");
        first_id = store.next_id().expect("id");
    }
    let store = SledStore::open(dir.path()).expect("reopen");
    let table = store.table("t").expect("table");
    assert_eq!(table.len(), 2);
    assert_eq!(
        table.first().expect("first"),
        Some((1u64.to_be_bytes().to_vec(), b"one".to_vec()))
    );
    table.delete(&1u64.to_be_bytes()).expect("delete");
    assert_eq!(
        table.get(&2u64.to_be_bytes()).expect("get"),
        Some(b"two".to_vec())
    );
    assert!(
        store.next_id().expect("id") > first_id,
        "ids keep growing across restarts"
    );
}

#[derive(Clone, PartialEq, prost::Message)]
struct Note {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint64, tag = "2")]
    count: u64,
}

fn note(text: &str, count: u64) -> Note {
    Note {
        text: text.into(),
        count,
    }
}

#[test]
fn typed_records_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = SledStore::open(dir.path()).expect("open");
        let notes = Records::<Note>::open(&store, "notes").expect("table");
        notes.put("b", &note("bee", 2)).expect("put");
        notes.put("a", &note("ay", 1)).expect("put");
        notes.put("c", &note("sea", 3)).expect("put");
        notes.delete("c").expect("delete");
        assert!(notes.contains("b").expect("contains") && !notes.contains("c").expect("contains"));
        notes
            .delete("never")
            .expect("deleting a missing record is no error");
    }
    let store = SledStore::open(dir.path()).expect("reopen");
    let notes = Records::<Note>::open(&store, "notes").expect("table");
    assert_eq!(notes.get("b").expect("get"), Some(note("bee", 2)));
    assert_eq!(notes.get("c").expect("get"), None);
    assert_eq!(
        notes.all().expect("all"),
        vec![note("ay", 1), note("bee", 2)],
        "in key order"
    );
    assert_eq!(notes.first_key().expect("first"), Some("a".into()));
    assert_eq!((notes.len(), notes.name()), (2, "notes"));
}

#[test]
fn an_unreadable_record_is_named_by_table_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    // A length-delimited field that claims more bytes than there are.
    store
        .table("notes")
        .expect("raw table")
        .put(b"bad\nkey", &[0x0a, 0x7f, b'x'])
        .expect("put");
    let notes = Records::<Note>::open(&store, "notes").expect("table");
    for error in [
        notes.get("bad\nkey").expect_err("undecodable"),
        notes.all().expect_err("undecodable"),
    ] {
        assert!(matches!(error, StoreError::Decode { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("table notes") && message.contains("record bad\\nkey"),
            "{message}"
        );
    }
}

#[test]
fn second_open_of_a_live_store_fails_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _store = SledStore::open(dir.path()).expect("open");
    let message = SledStore::open(dir.path())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        message.contains(&dir.path().display().to_string())
            && message.contains("is another instance using it?"),
        "{message}"
    );
}

fn wait_out_the_retry_interval() {
    std::thread::sleep(sled_store::RETRY_INTERVAL + std::time::Duration::from_millis(50));
}

/// A write that fails as sled's do on a full disk breaks the engine: the error is
/// ResourceExhausted naming the store, later calls fail fast with the same cause, and
/// once writing works the store reopens by itself, with the records flushed before
/// intact and the table handles taken before working again.
#[test]
fn a_store_whose_write_failed_heals_in_place_once_writing_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let store = SledStore::open(&path).expect("open");
    let notes = Records::<Note>::open(&store, "notes").expect("table");
    notes.put("kept", &note("flushed before", 1)).expect("put");
    store.check().expect("a fresh store can write");

    store.inject_failure(Some(std::io::ErrorKind::StorageFull));
    let error = notes
        .put("lost", &note("never written", 2))
        .expect_err("disk full");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "names the store: {error}"
    );
    // Broken: every call fails at once with the cause, without touching the engine.
    let error = notes.get("kept").expect_err("broken");
    assert!(matches!(error, StoreError::Record { .. }), "{error:?}");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");
    let error = store.check().expect_err("broken");
    assert!(matches!(error, StoreError::Broken { .. }), "{error:?}");
    // A retry while the disk is still full fails, and keeps the store broken.
    wait_out_the_retry_interval();
    let error = store.check().expect_err("still full");
    assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");

    store.inject_failure(None);
    // Not before the retry interval is over: a full disk is not hammered.
    assert!(store.check().is_err(), "retried too soon");
    wait_out_the_retry_interval();
    store.check().expect("reopened once writing works");
    assert_eq!(
        notes.get("kept").expect("get"),
        Some(note("flushed before", 1))
    );
    assert_eq!(notes.get("lost").expect("get"), None);
    notes
        .put("after", &note("written after the heal", 3))
        .expect("put");
    let outbox = store.table("outbox").expect("a new table after the heal");
    outbox.put(b"k", b"v").expect("put");
    drop((notes, outbox));
    drop(store);

    // What was flushed, before and after the failure, is on disk.
    let store = SledStore::open(&path).expect("reopen");
    let notes = Records::<Note>::open(&store, "notes").expect("table");
    assert_eq!(
        notes.all().expect("all"),
        vec![note("written after the heal", 3), note("flushed before", 1)]
    );
}

/// The first call after the retry interval reopens the store itself: no health check
/// is needed for a service to heal.
#[test]
fn a_broken_store_reopens_on_the_next_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let table = store.table("t").expect("table");
    store.inject_failure(Some(std::io::ErrorKind::Other));
    let error = table.put(b"a", b"1").expect_err("I/O error");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(store.next_id().is_err(), "broken for every table");
    store.inject_failure(None);
    wait_out_the_retry_interval();
    table.put(b"a", b"1").expect("reopened by this call");
    assert!(store.next_id().is_ok());
    store.check().expect("healthy");
}
