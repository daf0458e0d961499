//! Damaged files: a flipped byte anywhere Keel reads at start-up stops the node with an error that
//! names the file; a torn last log record is cut off and everything before it kept.

mod support;

use std::path::Path;
use std::path::PathBuf;

use keel::InProcessRouter;
use keel::Node;
use keel::NodeInfo;
use keel::StartError;
use support::read_ledger;
use support::test_config;
use support::Append;
use support::Ledger;
use support::WAIT;

/// Ids with a distinctive bit pattern, so their bytes can be found in the database file.
const ID_BASE: u64 = 0x5EED_CAFE_0000_0000;

fn config(dir: &Path, snapshot_every: u64) -> keel::Config {
    let mut c = test_config(1, dir);
    c.raft.snapshot_every = snapshot_every;
    c.raft.logs_to_keep_after_snapshot = 10;
    c
}

async fn start(dir: &Path, snapshot_every: u64) -> Result<Node<Ledger>, StartError> {
    // A single node never sends to peers, so it needs no router registration.
    Node::start(config(dir, snapshot_every), Ledger, InProcessRouter::new().network(1)).await
}

/// Writes `n` commands through a single node, shuts it down, returns the ledger it held.
async fn populate(dir: &Path, n: u64, snapshot_every: u64) -> Vec<u64> {
    support::init_tracing();
    let node = start(dir, snapshot_every).await.expect("fresh node starts");
    node.initialize([(1, NodeInfo::default())].into()).await.expect("initialize");
    node.wait_for_leader(WAIT, None).await.expect("leader");
    for i in 0..n {
        node.propose(Append(ID_BASE + i)).await.expect("propose");
    }
    let (rows, _, _) = node.read(|_, t| read_ledger(t)).await.expect("read");
    node.shutdown().await.expect("shutdown");
    rows
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[offset] ^= 0x5A;
    std::fs::write(path, bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_the_log_stops_the_node_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("temp dir");
    populate(dir.path(), 200, 100_000).await;
    let wal = files_with_suffix(&dir.path().join("log"), ".wal").pop().expect("a WAL chunk");
    let len = std::fs::metadata(&wal).expect("stat").len() as usize;
    flip_byte(&wal, len / 2);

    let err = start(dir.path(), 100_000).await.err().expect("node must refuse a damaged log");
    let msg = err.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(matches!(err, StartError::Log(_)), "{msg}");
    assert!(msg.contains(&dir.path().join("log").display().to_string()), "names the log dir: {msg}");
    assert!(msg.contains("offset"), "names the offset: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_log_record_is_cut_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rows = populate(dir.path(), 200, 100_000).await;
    let wal = files_with_suffix(&dir.path().join("log"), ".wal").pop().expect("a WAL chunk");
    let len = std::fs::metadata(&wal).expect("stat").len();
    // Cut into the middle of the last record, as a crash during its write would.
    std::fs::OpenOptions::new().write(true).open(&wal).expect("open").set_len(len - 3).expect("truncate");

    let node = start(dir.path(), 100_000).await.expect("a torn tail is recoverable");
    node.wait_for_leader(WAIT, None).await.expect("leader");
    let (after, count, sum) = node.read(|_, t| read_ledger(t)).await.expect("read");
    support::check_ledger(&after, count, sum);
    assert_eq!(rows, after, "everything before the torn record is kept");
    // And it still takes writes.
    node.propose(Append(1)).await.expect("propose after recovery");
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_a_snapshot_stops_the_node_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("temp dir");
    populate(dir.path(), 200, 50).await;
    let snap = files_with_suffix(&dir.path().join("snapshots"), ".snap").pop().expect("a snapshot");
    let len = std::fs::metadata(&snap).expect("stat").len() as usize;
    flip_byte(&snap, len / 2);

    let err = start(dir.path(), 50).await.err().expect("node must refuse a damaged snapshot");
    let msg = err.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(msg.contains(&snap.display().to_string()), "names the file: {msg}");
    assert!(msg.contains("offset") && msg.contains("checksum"), "names offset and cause: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_the_state_machine_stop_the_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    populate(dir.path(), 200, 100_000).await;
    let db = dir.path().join("state.redb");
    let mut bytes = std::fs::read(&db).expect("read");
    // Damage every copy of one stored value (copy-on-write leaves stale copies; one is live).
    let needle = (ID_BASE + 100).to_le_bytes();
    let hits: Vec<usize> =
        bytes.windows(8).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
    assert!(!hits.is_empty(), "the value is stored in the file");
    for i in hits {
        bytes[i + 3] ^= 0xFF;
    }
    std::fs::write(&db, bytes).expect("write");

    let err = start(dir.path(), 100_000).await.err().expect("node must refuse a damaged state machine");
    let msg = err.to_string();
    eprintln!("refused as expected: {msg}");
    assert!(matches!(err, StartError::StateMachine(_)), "{msg}");
    assert!(msg.contains(&db.display().to_string()), "names the file: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_of_another_node_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    populate(dir.path(), 1, 100_000).await;
    let router = InProcessRouter::new();
    let err =
        Node::start(test_config(2, dir.path()), Ledger, router.network(2)).await.err().expect("refused");
    assert!(err.to_string().contains("belongs to node 1"), "{err}");
}
