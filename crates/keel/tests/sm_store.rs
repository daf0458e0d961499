//! The state machine store keeps applied batches in one open redb write transaction until
//! something reads (or a bound is reached). These tests apply and then, with no read in between,
//! snapshot, close, install or fail: each must see, keep or refuse exactly what was applied.

mod support;

use std::io;
use std::time::Duration;

use keel::codec;
use keel::config::StateMachineConfig;
use keel::openraft::entry::RaftEntry;
use keel::openraft::storage::EntryResponder;
use keel::openraft::storage::RaftStateMachine;
use keel::openraft::RaftSnapshotBuilder;
use keel::redb::ReadTransaction;
use keel::redb::WriteTransaction;
use keel::storage::snapshot::SnapshotFile;
use keel::storage::SmStore;
use keel::types::Command;
use keel::types::Entry;
use keel::types::EntryPayload;
use keel::types::KeelTypes;
use keel::types::LogId;
use keel::StateMachine;
use keel::StateMachineError;
use support::read_ledger;
use support::Append;
use support::Ledger;

/// The id that makes [`Fussy`] fail.
const POISON: u64 = 666;

/// [`Ledger`], except that it cannot go on after the command [`POISON`].
struct Fussy;

impl StateMachine for Fussy {
    type Command = Append;
    type Response = u64;

    fn apply(&self, txn: &WriteTransaction, cmds: Vec<Append>) -> Result<Vec<u64>, StateMachineError> {
        if cmds.iter().any(|Append(id)| *id == POISON) {
            return Err(StateMachineError::other("poisoned command"));
        }
        Ledger.apply(txn, cmds)
    }

    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError> {
        Ledger.snapshot(txn, out)
    }

    fn restore(&self, txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError> {
        Ledger.restore(txn, input)
    }
}

fn lid(index: u64) -> LogId {
    keel::openraft::testing::log_id::<KeelTypes>(1, 1, index)
}

fn entry(index: u64, id: u64) -> Entry {
    let cmd = codec::to_bytes(&Append(id)).expect("encode");
    Entry::new(lid(index), EntryPayload::Normal(Command(cmd)))
}

/// Applies one single-entry batch per id, at log indexes `first..`.
async fn apply_each<SM: StateMachine>(store: &mut SmStore<SM>, first: u64, ids: &[u64]) -> io::Result<()> {
    for (i, id) in ids.iter().enumerate() {
        let batch: Vec<io::Result<EntryResponder<KeelTypes>>> =
            vec![Ok((entry(first + i as u64, *id), None))];
        store.apply(futures_util::stream::iter(batch)).await?;
    }
    Ok(())
}

fn ledger_of<SM: StateMachine>(store: &SmStore<SM>) -> Vec<u64> {
    store.read(|_, txn| read_ledger(txn).0).expect("read")
}

fn open<SM: StateMachine>(dir: &std::path::Path, sm: SM) -> SmStore<SM> {
    SmStore::open(dir, 1, &StateMachineConfig::default(), sm).expect("open store")
}

#[tokio::test]
async fn a_read_sees_every_batch_applied_before_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path(), Ledger);
    for id in 1..=20 {
        apply_each(&mut store, id, &[id]).await.expect("apply");
        assert_eq!(ledger_of(&store), (1..=id).collect::<Vec<_>>());
    }
    assert_eq!(store.applied().expect("applied").last_applied, Some(lid(20)));
}

#[tokio::test]
async fn a_snapshot_taken_right_after_applying_holds_every_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path(), Ledger);
    apply_each(&mut store, 1, &[10, 11, 12]).await.expect("apply");
    let snap = store.get_snapshot_builder().await.build_snapshot().await.expect("build snapshot");
    assert_eq!(snap.meta.last_log_id, Some(lid(3)));

    let other_dir = tempfile::tempdir().expect("temp dir");
    let mut other = open(other_dir.path(), Ledger);
    let incoming = other_dir.path().join("snapshots").join("incoming-test.tmp");
    std::fs::copy(&snap.snapshot.path, &incoming).expect("copy snapshot");
    other
        .install_snapshot(&snap.meta, SnapshotFile::open(&incoming).expect("open copy"))
        .await
        .expect("install");
    assert_eq!(ledger_of(&other), vec![10, 11, 12]);
}

#[tokio::test]
async fn a_clean_close_right_after_applying_keeps_every_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path(), Ledger);
    apply_each(&mut store, 1, &[7, 8, 9]).await.expect("apply");
    drop(store);

    let store = open(dir.path(), Ledger);
    assert_eq!(store.applied().expect("applied").last_applied, Some(lid(3)));
    assert_eq!(ledger_of(&store), vec![7, 8, 9]);
}

#[tokio::test]
async fn installing_a_snapshot_right_after_applying_replaces_the_open_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path(), Ledger);
    apply_each(&mut store, 1, &[1, 2]).await.expect("apply");
    let snap = store.get_snapshot_builder().await.build_snapshot().await.expect("build snapshot");
    apply_each(&mut store, 3, &[3, 4]).await.expect("apply");

    // The install needs the write lock the open transaction holds: it must not wait forever.
    let install = store.install_snapshot(&snap.meta, SnapshotFile::open(&snap.snapshot.path).expect("open"));
    tokio::time::timeout(Duration::from_secs(10), install).await.expect("install hung").expect("install");
    assert_eq!(ledger_of(&store), vec![1, 2]);
    assert_eq!(store.applied().expect("applied").last_applied, Some(lid(2)));

    // Applying goes on from the snapshot's position and state.
    apply_each(&mut store, 3, &[30]).await.expect("apply after install");
    assert_eq!(ledger_of(&store), vec![1, 2, 30]);
}

#[tokio::test]
async fn after_a_failed_apply_the_store_refuses_reads_and_applies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = open(dir.path(), Fussy);
    apply_each(&mut store, 1, &[1, 2]).await.expect("apply");
    // The failing batch takes the open transaction, and the two batches before it, down with it:
    // serving reads now would show a state that went back in time.
    let err = apply_each(&mut store, 3, &[POISON]).await.expect_err("the poisoned batch must fail");
    assert!(err.to_string().contains("poisoned"), "{err}");

    let read = store.read(|_, txn| read_ledger(txn).0);
    let read_err = read.expect_err("a read after a failed apply must be refused");
    assert!(read_err.to_string().contains("failed"), "{read_err}");
    let again = apply_each(&mut store, 4, &[4]).await.expect_err("an apply after a failure must be refused");
    assert!(again.to_string().contains("failed"), "{again}");
    drop(store);

    // Reopened, it is at its last commit (here: nothing), and openraft re-applies from the log.
    let mut store = open(dir.path(), Fussy);
    assert_eq!(store.applied().expect("applied").last_applied, None);
    apply_each(&mut store, 1, &[1, 2]).await.expect("re-apply");
    assert_eq!(ledger_of(&store), vec![1, 2]);
}
