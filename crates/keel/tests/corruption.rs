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

// ---------------------------------------------------------------------------------------------
// A torn last WAL record: a record's head on disk, zeros to the end of the file
// ---------------------------------------------------------------------------------------------

mod torn_wal {
    use std::path::Path;

    use keel::config::LogConfig;
    use keel::openraft::entry::RaftEntry;
    use keel::openraft::storage::IOFlushed;
    use keel::openraft::storage::RaftLogStorage;
    use keel::openraft::testing::log_id;
    use keel::openraft::type_config::TypeConfigExt;
    use keel::openraft::RaftLogReader;
    use keel::storage::wal_repair;
    use keel::storage::LogStore;
    use keel::types::Command;
    use keel::types::Entry;
    use keel::types::EntryPayload;
    use keel::types::KeelTypes;

    /// Writes `n` entries through the log store, one fsync'ed append each; closes the log.
    async fn write_log(dir: &Path, n: u64) -> Vec<Entry> {
        let (mut log, closed) =
            LogStore::open_with_close_signal(dir, &LogConfig::default()).expect("open the log");
        let mut written = Vec::new();
        for i in 0..n {
            let entry = Entry::new(
                log_id::<KeelTypes>(1, 1, i),
                EntryPayload::Normal(Command(format!("entry {i}").into_bytes())),
            );
            let (tx, rx) = KeelTypes::oneshot();
            log.append(vec![entry.clone()], IOFlushed::signal(tx)).await.expect("append");
            rx.await.expect("flush callback").expect("flushed");
            written.push(entry);
        }
        drop(log);
        let _ = closed.await; // completes once the WAL is closed and its lock released
        written
    }

    /// The entries a reopened log holds.
    async fn read_all(log: &mut LogStore) -> Vec<Entry> {
        let (_, purged, last, _) = log.state();
        match last {
            Some(last) => log
                .try_get_log_entries(purged.map_or(0, |p| p.index + 1)..=last.index)
                .await
                .expect("read entries"),
            None => Vec::new(),
        }
    }

    fn same(a: &[Entry], b: &[Entry]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| format!("{x:?}") == format!("{y:?}"))
    }

    /// The last append record: its file and where it starts.
    fn last_append(dir: &Path) -> wal_repair::RecordInfo {
        let records = wal_repair::records(dir).expect("read the records");
        records.into_iter().rev().find(|r| r.appends.is_some()).expect("an append record")
    }

    /// Length of a record's header: its type (u32) and its framed log id (u32 length + bytes).
    fn header_len(bytes: &[u8], start: usize) -> usize {
        let id_len = u32::from_le_bytes(bytes[start + 4..start + 8].try_into().expect("4 bytes"));
        8 + id_len as usize
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_header_then_zeros_to_the_end_is_cut_and_earlier_entries_kept() {
        super::support::init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let written = write_log(dir.path(), 20).await;
        let last = last_append(dir.path());
        assert_eq!(Some(19), last.appends);
        let mut bytes = std::fs::read(&last.file).expect("read chunk");
        let start = last.offset as usize;
        // The header landed; the payload, the CRC and everything after read as zeros.
        let keep = start + header_len(&bytes, start);
        bytes[keep..].fill(0);
        std::fs::write(&last.file, &bytes).expect("write chunk");

        let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("a torn tail is cut");
        assert_eq!(
            last.offset,
            std::fs::metadata(&last.file).expect("stat").len(),
            "cut where the record began"
        );
        let got = read_all(&mut log).await;
        assert!(same(&written[..19], &got), "entries 0..=18 kept, 19 gone: {got:?}");
        // The log goes on, and what it appends survives a reopen.
        let next =
            Entry::new(log_id::<KeelTypes>(2, 1, 19), EntryPayload::Normal(Command(b"after".to_vec())));
        let (tx, rx) = KeelTypes::oneshot();
        log.append(vec![next.clone()], IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("flush callback").expect("flushed");
        drop(log);
        let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("reopen");
        let mut expected = written[..19].to_vec();
        expected.push(next);
        assert!(same(&expected, &read_all(&mut log).await));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_extended_with_zeros_opens_with_every_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = write_log(dir.path(), 20).await;
        let file = last_append(dir.path()).file;
        let len = std::fs::metadata(&file).expect("stat").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open")
            .set_len(len + 8192)
            .expect("extend");

        let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("zeros past the end are cut");
        assert_eq!(len, std::fs::metadata(&file).expect("stat").len());
        assert!(same(&written, &read_all(&mut log).await));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_last_record_whose_checksum_landed_still_stops_the_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_log(dir.path(), 20).await;
        let last = last_append(dir.path());
        let mut bytes = std::fs::read(&last.file).expect("read chunk");
        let start = last.offset as usize;
        // Zeros over the payload only: the CRC at the end is still there, so this is damage.
        let payload = start + header_len(&bytes, start);
        let crc = bytes.len() - 4;
        assert!(payload < crc, "the record has a payload");
        bytes[payload..crc].fill(0);
        std::fs::write(&last.file, &bytes).expect("write chunk");

        let err = LogStore::open(dir.path(), &LogConfig::default()).err().expect("damage is refused");
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()) && msg.contains("offset"), "{msg}");
        assert_eq!(bytes.len() as u64, std::fs::metadata(&last.file).expect("stat").len(), "nothing cut");
    }
}
