//! The `ack-before-fsync` planted bug (`KEEL_FAULT_INJECTION`, debug builds only) does what it
//! says at the log level, and the log keeps its contract when the bug is not planted.
#![cfg(debug_assertions)]

use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use keel::config::LogConfig;
use keel::faults::Faults;
use keel::openraft::entry::RaftEntry;
use keel::openraft::storage::IOFlushed;
use keel::openraft::storage::RaftLogStorage;
use keel::openraft::testing::log_id;
use keel::openraft::type_config::TypeConfigExt;
use keel::storage::LogStore;
use keel::types::Command;
use keel::types::Entry;
use keel::types::EntryPayload;
use keel::types::KeelTypes;

const MARKER: &[u8] = b"planted-bug-marker:ack-before-fsync";

/// Whether any WAL chunk file in `dir` holds `needle`: what a `kill -9` right now would leave.
fn on_disk(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .expect("list the log dir")
        .map(|e| e.expect("list the log dir").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .any(|p| std::fs::read(&p).expect("read a chunk").windows(needle.len()).any(|w| w == needle))
}

/// Appends one entry carrying [`MARKER`] and returns once openraft's flush callback reported Ok.
async fn append_until_acknowledged(log: &mut LogStore) {
    let entry = Entry::new(log_id::<KeelTypes>(1, 1, 0), EntryPayload::Normal(Command(MARKER.to_vec())));
    let (tx, rx) = KeelTypes::oneshot();
    log.append(vec![entry], IOFlushed::signal(tx)).await.expect("append");
    rx.await.expect("the flush callback fired").expect("the flush callback reported success");
}

#[test]
fn no_fault_is_planted_by_default() {
    assert!(!keel::Config::default().faults.any());
    assert_eq!(Faults::default(), keel::Config::default().faults);
}

#[tokio::test]
async fn without_the_fault_an_acknowledged_entry_is_already_on_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("open log");
    append_until_acknowledged(&mut log).await;
    assert!(on_disk(dir.path(), MARKER), "the callback fired before the entry was written");
}

#[tokio::test]
async fn ack_before_fsync_acknowledges_entries_before_they_are_on_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("open log");
    // Longer than keeld's 50 ms, so that a busy test machine cannot make the first check late.
    let hold = Duration::from_secs(1);
    log.plant_ack_before_fsync(hold).expect("plant the fault");

    let appended = Instant::now();
    append_until_acknowledged(&mut log).await;
    assert!(
        !on_disk(dir.path(), MARKER),
        "the entry is in the WAL file when the callback fired: the fault is not planted"
    );

    // The real flush still happens, `hold` later.
    let deadline = appended + Duration::from_secs(20);
    while !on_disk(dir.path(), MARKER) {
        assert!(Instant::now() < deadline, "the late flush never wrote the entry");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval of a condition wait
    }
    let landed = appended.elapsed();
    assert!(landed >= hold, "the entry reached the file after {landed:?}, before the {hold:?} hold");
}
