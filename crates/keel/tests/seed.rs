//! Seeding data dirs from a snapshot (`keel::storage::seed`, behind `keel snapshot restore`):
//! every member seeded from one snapshot holds the same Raft state, and nodes started on them form
//! a new cluster that serves the snapshot's state and goes on from it; used data dirs and member
//! lists without the member are refused.

mod support;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use keel::config::StateMachineConfig;
use keel::openraft::entry::RaftEntry;
use keel::openraft::storage::EntryResponder;
use keel::openraft::storage::RaftStateMachine;
use keel::openraft::RaftSnapshotBuilder;
use keel::storage::seed::seed_data_dir;
use keel::storage::seed::seed_log_id;
use keel::storage::seed::SeedError;
use keel::storage::LogStore;
use keel::storage::SmStore;
use keel::types::Command;
use keel::types::Entry;
use keel::types::EntryPayload;
use keel::types::KeelTypes;
use keel::InProcessRouter;
use keel::Node;
use keel::NodeInfo;
use support::read_ledger;
use support::test_config;
use support::Append;
use support::Ledger;
use support::WAIT;

/// A snapshot file of a ledger holding `ids`, applied at log indexes 1..; answers its path.
async fn ledger_snapshot(dir: &Path, ids: &[u64]) -> std::path::PathBuf {
    let mut store = SmStore::open(dir, 9, &StateMachineConfig::default(), Ledger).expect("open store");
    for (i, id) in ids.iter().enumerate() {
        let log_id = keel::openraft::testing::log_id::<KeelTypes>(3, 9, i as u64 + 1);
        let cmd = keel::codec::to_bytes(&Append(*id)).expect("encode");
        let entry = Entry::new(log_id, EntryPayload::Normal(Command(cmd)));
        let batch: Vec<io::Result<EntryResponder<KeelTypes>>> = vec![Ok((entry, None))];
        store.apply(futures_util::stream::iter(batch)).await.expect("apply");
    }
    store.get_snapshot_builder().await.build_snapshot().await.expect("build snapshot").snapshot.path
}

fn members(ids: &[u64]) -> BTreeMap<u64, NodeInfo> {
    ids.iter().map(|id| (*id, NodeInfo::default())).collect()
}

/// Seeds member `id` of `ids` under `dir` (blocking, as the CLI calls it: off the runtime).
fn seed(dir: &Path, id: u64, snapshot: &Path, ids: &[u64]) -> Result<keel::storage::seed::Seeded, SeedError> {
    let config = test_config(id, &dir.join(format!("n{id}")));
    let input = std::fs::File::open(snapshot).expect("open the snapshot");
    tokio::task::block_in_place(|| {
        seed_data_dir(&config, Ledger, io::BufReader::new(input), snapshot, members(ids))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_seeded_from_one_snapshot_agree_and_form_a_new_cluster_with_its_state() {
    support::init_tracing();
    let source = tempfile::tempdir().expect("temp dir");
    let snapshot = ledger_snapshot(source.path(), &[5, 6, 7]).await;
    let dir = tempfile::tempdir().expect("temp dir");

    let seeded: Vec<_> =
        (1..=3).map(|id| seed(dir.path(), id, &snapshot, &[1, 2, 3]).expect("seed")).collect();
    let last = seed_log_id(3);
    for s in &seeded {
        assert_eq!(s.meta, seeded[0].meta, "every member holds the same snapshot META");
        assert_eq!(s.meta.last_log_id, Some(last));
        assert_eq!(s.source.last_log_id.map(|l| l.index), Some(3));
    }
    for id in 1..=3u64 {
        let data_dir = dir.path().join(format!("n{id}"));
        let store = SmStore::open(&data_dir, id, &StateMachineConfig::default(), Ledger).expect("open");
        let applied = store.applied().expect("applied");
        assert_eq!(applied.last_applied, Some(last));
        assert_eq!(applied.membership.voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(store.read(|_, t| read_ledger(t).0).expect("read"), vec![5, 6, 7]);
        drop(store);
        let log = LogStore::open(&data_dir.join("log"), &Default::default()).expect("open log");
        let (vote, purged, last_log, _) = log.state();
        assert_eq!((vote, purged), (None, Some(last)));
        assert!(last_log.is_none_or(|l| l == last), "{last_log:?}");
    }

    // Started, the members elect a leader among themselves, serve the state and go on from it.
    let router = InProcessRouter::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        let config = test_config(id, &dir.path().join(format!("n{id}")));
        let node = Node::start(config, Ledger, router.network(id)).await.expect("node starts");
        router.register(id, node.service());
        nodes.insert(id, node);
    }
    let leader = nodes[&1].wait_for_leader(WAIT, None).await.expect("a leader");
    assert!((1..=3).contains(&leader));
    let (_, index) =
        nodes[&2].propose_indexed(Append(8)).await.expect("propose through a follower or the leader");
    assert!(index > 3, "the new cluster's log goes on after the snapshot: {index}");
    for node in nodes.values() {
        node.wait_applied(index, WAIT).await.expect("applied");
        assert_eq!(node.read_local(|_, t| read_ledger(t).0).expect("read"), vec![5, 6, 7, 8]);
    }
    for (_, node) in nodes {
        node.shutdown().await.expect("clean shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_data_dir_and_a_list_without_the_member_are_refused() {
    let source = tempfile::tempdir().expect("temp dir");
    let snapshot = ledger_snapshot(source.path(), &[1]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("n1")).expect("mkdir");
    std::fs::write(dir.path().join("n1").join("keep"), "x").expect("write");
    assert!(matches!(seed(dir.path(), 1, &snapshot, &[1, 2]), Err(SeedError::NotEmpty(_))));
    assert!(matches!(seed(dir.path(), 3, &snapshot, &[1, 2]), Err(SeedError::Members(_))));
    assert!(!dir.path().join("n3").exists(), "a refused seed created the data dir");
    // A damaged snapshot fails the seed.
    let mut bytes = std::fs::read(&snapshot).expect("read");
    let at = bytes.len() - 20;
    bytes[at] ^= 1;
    let damaged = dir.path().join("damaged.snap");
    std::fs::write(&damaged, bytes).expect("write");
    assert!(matches!(seed(dir.path(), 2, &damaged, &[2]), Err(SeedError::Snapshot(_))));
    assert!(!dir.path().join("n2").exists(), "a failed seed left a data dir behind");
    // An empty data dir is used, and left empty by a failed seed.
    std::fs::create_dir_all(dir.path().join("n4")).expect("mkdir");
    assert!(matches!(seed(dir.path(), 4, &damaged, &[4]), Err(SeedError::Snapshot(_))));
    assert_eq!(std::fs::read_dir(dir.path().join("n4")).expect("the dir is kept").count(), 0);
    seed(dir.path(), 4, &snapshot, &[4]).expect("an empty data dir is seeded");
}
