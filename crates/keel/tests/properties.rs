//! Property tests.
//!
//! - A key-value state machine driven through a real single-node [`Node`] (with snapshots and a
//!   restart) and directly through [`SmStore`] (apply, build a snapshot, install it elsewhere) always
//!   agrees with a `BTreeMap` model.
//! - Every decoder of on-disk bytes (framed WAL records, postcard metadata, snapshot files, WAL
//!   chunks) returns `Ok` or `Err` on arbitrary input, never panics; damaged snapshot files are
//!   always rejected, and a damaged WAL never yields entries that were not written.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use keel::codec;
use keel::config::LogConfig;
use keel::config::StateMachineConfig;
use keel::openraft::entry::RaftEntry;
use keel::openraft::storage::EntryResponder;
use keel::openraft::storage::IOFlushed;
use keel::openraft::storage::RaftLogStorage;
use keel::openraft::storage::RaftStateMachine;
use keel::openraft::testing::log_id;
use keel::openraft::testing::membership_ent;
use keel::openraft::type_config::TypeConfigExt;
use keel::openraft::RaftLogReader;
use keel::openraft::RaftSnapshotBuilder;
use keel::redb::ReadTransaction;
use keel::redb::ReadableTable;
use keel::redb::TableDefinition;
use keel::redb::TableError;
use keel::redb::WriteTransaction;
use keel::storage::log_store::WalLogId;
use keel::storage::log_store::WalPayload;
use keel::storage::log_store::WalVote;
use keel::storage::snapshot::verify_file;
use keel::storage::snapshot::SnapshotFile;
use keel::storage::snapshot::SnapshotReader;
use keel::storage::snapshot::SnapshotWriter;
use keel::storage::LogStore;
use keel::storage::SmStore;
use keel::types::Command;
use keel::types::Entry;
use keel::types::EntryPayload;
use keel::types::KeelTypes;
use keel::types::LogId;
use keel::types::Membership;
use keel::types::RaftMetrics;
use keel::types::SnapshotMeta;
use keel::types::StoredMembership;
use keel::types::Vote;
use keel::Config;
use keel::InProcessRouter;
use keel::Node;
use keel::NodeInfo;
use keel::StateMachine;
use keel::StateMachineError;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use raft_log::codeq::Decode;
use rand::RngCore;
use rand::SeedableRng;
use serde::Deserialize;
use serde::Serialize;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Turns any error into a proptest failure that names what was being done.
trait OrFail<T> {
    fn or_fail(self, what: &str) -> Result<T, TestCaseError>;
}

impl<T, E: Debug> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Result<T, TestCaseError> {
        self.map_err(|e| TestCaseError::fail(format!("{what}: {e:?}")))
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build a tokio runtime")
}

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

fn lid(index: u64) -> LogId {
    log_id::<KeelTypes>(1, 1, index)
}

fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

/// A damage done to a byte string.
#[derive(Clone, Debug)]
enum Damage {
    /// XOR the byte at `at` with a non-zero mask.
    Flip { at: Index, mask: u8 },
    /// Cut the bytes from `at` on.
    Truncate { at: Index },
    /// Overwrite the bytes from `at` on with zeros (a file extended but never written).
    ZeroTail { at: Index },
    /// Append bytes at the end.
    Append { bytes: Vec<u8> },
}

fn damage_strategy() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<Index>(), 1..=255u8).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        2 => any::<Index>().prop_map(|at| Damage::Truncate { at }),
        1 => any::<Index>().prop_map(|at| Damage::ZeroTail { at }),
        1 => vec(any::<u8>(), 1..16).prop_map(|bytes| Damage::Append { bytes }),
    ]
}

impl Damage {
    /// Applies the damage; returns false if it left `bytes` unchanged (e.g. zeroing zeros).
    fn apply(&self, bytes: &mut Vec<u8>) -> bool {
        let before = bytes.clone();
        match self {
            Damage::Flip { at, mask } if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            Damage::Flip { .. } => {}
            Damage::Truncate { at } if !bytes.is_empty() => bytes.truncate(at.index(bytes.len())),
            Damage::Truncate { .. } => {}
            Damage::ZeroTail { at } if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i..].fill(0);
            }
            Damage::ZeroTail { .. } => {}
            Damage::Append { bytes: extra } => bytes.extend_from_slice(extra),
        }
        *bytes != before
    }
}

// ---------------------------------------------------------------------------------------------
// A key-value state machine and its model
// ---------------------------------------------------------------------------------------------

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum KvCmd {
    /// Sets `key`; answers the previous value.
    Put { key: String, value: Vec<u8> },
    /// Removes `key`; answers the previous value.
    Delete { key: String },
    /// Adds `delta` (wrapping) to counter `key`; answers the new value.
    Add { key: String, delta: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum KvResp {
    Previous(Option<Vec<u8>>),
    Counter(u64),
}

/// All state lives in the `kv` and `counters` tables.
struct Kv;

impl StateMachine for Kv {
    type Command = KvCmd;
    type Response = KvResp;

    fn apply(&self, txn: &WriteTransaction, cmds: Vec<KvCmd>) -> Result<Vec<KvResp>, StateMachineError> {
        let mut kv = txn.open_table(KV)?;
        let mut counters = txn.open_table(COUNTERS)?;
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            out.push(match cmd {
                KvCmd::Put { key, value } => {
                    KvResp::Previous(kv.insert(key.as_str(), value.as_slice())?.map(|v| v.value().to_vec()))
                }
                KvCmd::Delete { key } => {
                    KvResp::Previous(kv.remove(key.as_str())?.map(|v| v.value().to_vec()))
                }
                KvCmd::Add { key, delta } => {
                    let new = counters.get(key.as_str())?.map_or(0, |v| v.value()).wrapping_add(delta);
                    counters.insert(key.as_str(), new)?;
                    KvResp::Counter(new)
                }
            });
        }
        Ok(out)
    }

    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError> {
        keel::dump_table(txn, KV, out)?;
        keel::dump_table(txn, COUNTERS, out)
    }

    fn restore(&self, txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError> {
        keel::load_table(txn, KV, input)?;
        keel::load_table(txn, COUNTERS, input)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    kv: BTreeMap<String, Vec<u8>>,
    counters: BTreeMap<String, u64>,
}

impl Model {
    fn apply(&mut self, cmd: &KvCmd) -> KvResp {
        match cmd {
            KvCmd::Put { key, value } => KvResp::Previous(self.kv.insert(key.clone(), value.clone())),
            KvCmd::Delete { key } => KvResp::Previous(self.kv.remove(key)),
            KvCmd::Add { key, delta } => {
                let v = self.counters.entry(key.clone()).or_insert(0);
                *v = v.wrapping_add(*delta);
                KvResp::Counter(*v)
            }
        }
    }
}

/// Reads both tables of [`Kv`] into a [`Model`].
fn read_model(txn: &ReadTransaction) -> Result<Model, String> {
    let mut model = Model::default();
    match txn.open_table(KV) {
        Ok(table) => {
            for row in table.iter().map_err(|e| e.to_string())? {
                let (k, v) = row.map_err(|e| e.to_string())?;
                model.kv.insert(k.value().to_string(), v.value().to_vec());
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    match txn.open_table(COUNTERS) {
        Ok(table) => {
            for row in table.iter().map_err(|e| e.to_string())? {
                let (k, v) = row.map_err(|e| e.to_string())?;
                model.counters.insert(k.value().to_string(), v.value());
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(model)
}

fn key_strategy() -> impl Strategy<Value = String> {
    // Few keys, so that commands often hit the same key.
    (0u8..6).prop_map(|i| format!("k{i}"))
}

fn cmd_strategy() -> impl Strategy<Value = KvCmd> {
    prop_oneof![
        3 => (key_strategy(), vec(any::<u8>(), 0..24)).prop_map(|(key, value)| KvCmd::Put { key, value }),
        1 => key_strategy().prop_map(|key| KvCmd::Delete { key }),
        2 => (key_strategy(), prop_oneof![0u64..10, any::<u64>()]).prop_map(|(key, delta)| KvCmd::Add { key, delta }),
    ]
}

// ---------------------------------------------------------------------------------------------
// 1a. Through a real single-node `Node`
// ---------------------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(30);
const SNAPSHOT_EVERY: u64 = 20;

fn node_config(dir: &Path) -> Config {
    let mut c = Config::new(1, dir);
    c.raft.heartbeat_interval_ms = 50;
    c.raft.election_timeout_min_ms = 150;
    c.raft.election_timeout_max_ms = 300;
    c.raft.snapshot_every = SNAPSHOT_EVERY;
    c.raft.logs_to_keep_after_snapshot = 5;
    c
}

async fn start_node(dir: &Path, router: &InProcessRouter) -> Result<Node<Kv>, TestCaseError> {
    let node = Node::start(node_config(dir), Kv, router.network(1)).await.or_fail("start node")?;
    router.register(1, node.service());
    Ok(node)
}

async fn stop_node(node: Node<Kv>, router: &InProcessRouter) -> Result<(), TestCaseError> {
    // The registered service holds the state machine database open: drop it too.
    router.unregister(1);
    node.shutdown().await.or_fail("shut the node down")
}

async fn read_linearizable(node: &Node<Kv>) -> Result<Model, TestCaseError> {
    node.read(|_, txn| read_model(txn)).await.or_fail("linearizable read")?.or_fail("read the tables")
}

/// Starts the node on a data dir another instance just shut down: `Node::shutdown` returns only
/// once storage is released, so this must succeed at once.
async fn start_node_again(dir: &Path, router: &InProcessRouter) -> Result<Node<Kv>, TestCaseError> {
    start_node(dir, router).await
}

/// Shuts the node down, starts it again on the same data dir, and checks the state survived.
async fn restart(
    node: Node<Kv>,
    router: &InProcessRouter,
    dir: &Path,
    model: &Model,
) -> Result<Node<Kv>, TestCaseError> {
    let before = read_linearizable(&node).await?;
    prop_assert_eq!(&before, model, "state before restart");
    stop_node(node, router).await?;
    let node = start_node_again(dir, router).await?;
    node.wait_for_leader(WAIT, None).await.or_fail("election after restart")?;
    let after = read_linearizable(&node).await?;
    prop_assert_eq!(&after, model, "state after restart");
    Ok(node)
}

/// `Node::shutdown` "closes storage": the same data dir opens again as soon as it returns (openraft's
/// state machine worker outlives `Raft::shutdown` briefly; `Node::shutdown` waits it out).
#[test]
fn node_restarts_immediately_after_shutdown() {
    init_tracing();
    for round in 0..30u64 {
        let dir = tempfile::tempdir().expect("temp dir");
        multi_thread_runtime().block_on(async {
            let router = InProcessRouter::new();
            let node = start_node(dir.path(), &router).await.expect("start");
            node.initialize(BTreeMap::from([(1, NodeInfo::default())])).await.expect("initialize");
            node.wait_for_leader(WAIT, None).await.expect("election");
            for delta in 0..round % 4 * 7 {
                node.propose(KvCmd::Add { key: "k".into(), delta }).await.expect("propose");
            }
            router.unregister(1);
            node.shutdown().await.unwrap_or_else(|e| panic!("round {round}: {e}"));
            let node = Node::start(node_config(dir.path()), Kv, router.network(1))
                .await
                .unwrap_or_else(|e| panic!("round {round}: restart right after shutdown failed: {e}"));
            node.shutdown().await.expect("shutdown");
        });
    }
}

/// A snapshot published by a run that stopped before purging behind it (here: one that kept the
/// whole log) is purged behind at the next start, not only when the next snapshot is built. (The
/// property test below once waited forever for that purge: an automatic snapshot raced a restart.)
#[test]
fn restart_purges_behind_the_snapshot_on_disk() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    multi_thread_runtime().block_on(async {
        let router = InProcessRouter::new();
        let mut keep_all = node_config(dir.path());
        keep_all.raft.snapshot_every = 10_000;
        keep_all.raft.logs_to_keep_after_snapshot = 1_000;
        let node = Node::start(keep_all, Kv, router.network(1)).await.expect("start");
        router.register(1, node.service());
        node.initialize(BTreeMap::from([(1, NodeInfo::default())])).await.expect("initialize");
        node.wait_for_leader(WAIT, None).await.expect("election");
        for delta in 0..30 {
            node.propose(KvCmd::Add { key: "k".into(), delta }).await.expect("propose");
        }
        let last = node.metrics().last_log_index.expect("a log");
        node.raft().trigger().snapshot().await.expect("trigger a snapshot");
        let m = node
            .wait_for(WAIT, "snapshot of the whole log", |m| m.snapshot.is_some_and(|s| s.index == last))
            .await
            .expect("snapshot");
        assert_eq!(m.purged, None, "1000 entries are kept behind a snapshot");
        stop_node(node, &router).await.expect("stop");

        let node = start_node_again(dir.path(), &router).await.expect("restart");
        let m = node
            .wait_for(WAIT, "log purged behind the snapshot", |m| m.purged.is_some())
            .await
            .expect("purge at start");
        assert_eq!(m.purged.map(|p| p.index), Some(last - 5), "purged up to 5 entries behind the snapshot");
        let state = read_linearizable(&node).await.expect("read");
        assert_eq!(state.counters.get("k"), Some(&(0..30).sum::<u64>()));
        stop_node(node, &router).await.expect("stop");
    });
}

/// Installs `snap` (a file of another store) into a fresh [`SmStore`] and returns the state it holds
/// and the applied log id the store then records.
async fn load_snapshot_file(snap: &Path) -> Result<(SnapshotMeta, Model, Option<LogId>), TestCaseError> {
    let (meta, _) = SnapshotReader::open(snap).or_fail("open the snapshot")?;
    let scratch = tempfile::tempdir().or_fail("temp dir")?;
    let mut store =
        SmStore::open(scratch.path(), 99, &StateMachineConfig::default(), Kv).or_fail("open store")?;
    let incoming = scratch.path().join("snapshots").join("incoming-copy.tmp");
    std::fs::copy(snap, &incoming).or_fail("copy the snapshot")?;
    store
        .install_snapshot(&meta, SnapshotFile::open(&incoming).or_fail("open copy")?)
        .await
        .or_fail("install the snapshot")?;
    let state = store.read(|_, txn| read_model(txn)).or_fail("read")?.or_fail("read the tables")?;
    let applied = store.applied().or_fail("applied state")?.last_applied;
    Ok((meta, state, applied))
}

fn snapshot_files(data_dir: &Path) -> Result<Vec<PathBuf>, TestCaseError> {
    let mut snaps = Vec::new();
    for entry in std::fs::read_dir(data_dir.join("snapshots")).or_fail("list snapshots")? {
        let path = entry.or_fail("list snapshots")?.path();
        if path.extension().is_some_and(|e| e == "snap") {
            snaps.push(path);
        }
    }
    Ok(snaps)
}

fn node_matches_model(cmds: Vec<KvCmd>, restart_at: usize) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().or_fail("temp dir")?;
    let rt = multi_thread_runtime();
    rt.block_on(async {
        let router = InProcessRouter::new();
        let mut node = start_node(dir.path(), &router).await?;
        node.initialize(BTreeMap::from([(1, NodeInfo::default())])).await.or_fail("initialize")?;
        node.wait_for_leader(WAIT, None).await.or_fail("first election")?;

        let mut model = Model::default();
        for (i, cmd) in cmds.iter().enumerate() {
            if i == restart_at {
                node = restart(node, &router, dir.path(), &model).await?;
            }
            let got = node.propose(cmd.clone()).await.or_fail(&format!("propose command #{i} {cmd:?}"))?;
            let want = model.apply(cmd);
            prop_assert_eq!(got, want, "response to command #{} {:?}", i, cmd);
        }
        if restart_at >= cmds.len() {
            node = restart(node, &router, dir.path(), &model).await?;
        }
        prop_assert_eq!(read_linearizable(&node).await?, model.clone(), "final state");

        // Enough entries were applied for openraft to have built a snapshot on its own.
        if cmds.len() as u64 > 2 * SNAPSHOT_EVERY {
            node.wait_for(WAIT, "an automatic snapshot", |m| m.snapshot.is_some())
                .await
                .or_fail("wait for an automatic snapshot")?;
        }
        // Then one of everything applied, so that the snapshot file must equal the final state.
        let m = snapshot_everything(&node).await?;
        stop_node(node, &router).await?;

        let snaps = snapshot_files(dir.path())?;
        prop_assert_eq!(snaps.len(), 1, "snapshot files: {:?}", snaps);
        let (meta, state, applied) = load_snapshot_file(&snaps[0]).await?;
        prop_assert_eq!(meta.last_log_id, m.last_applied, "snapshot meta");
        prop_assert_eq!(applied, m.last_applied, "applied after installing the snapshot");
        prop_assert_eq!(state, model, "state in the snapshot");
        Ok(())
    })
}

/// Has the node build a snapshot of everything in its log, and waits until it is done (and the log
/// purged behind it). Retries the trigger: one is ignored while another build runs.
///
/// `last_applied` must be compared with the log's end, not taken as it is: a proposal returns
/// as soon as its entry is applied, before the metrics say so.
async fn snapshot_everything(node: &Node<Kv>) -> Result<RaftMetrics, TestCaseError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        node.raft().trigger().snapshot().await.or_fail("trigger a snapshot")?;
        let done = node
            .wait_for(Duration::from_secs(1), "snapshot of everything applied", |m| {
                // openraft purges up to `logs_to_keep_after_snapshot` (5) entries behind it.
                let purged = |s: LogId| s.index < 5 || m.purged.is_some_and(|p| p.index + 5 == s.index);
                let all_applied = m.last_applied.map(|l| l.index) == m.last_log_index;
                all_applied
                    && m.snapshot.is_some()
                    && m.snapshot == m.last_applied
                    && m.snapshot.is_some_and(purged)
            })
            .await;
        match done {
            Ok(m) => return Ok(m),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).or_fail("snapshot everything")
            }
            Err(_) => {}
        }
    }
}

proptest! {
    // A failing case can take WAIT per shrink step: shrinking is bounded in time as well as steps.
    #![proptest_config(ProptestConfig {
        cases: 16,
        max_shrink_iters: 64,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn node_agrees_with_model(
        (cmds, restart) in (vec(cmd_strategy(), 1..200), any::<Index>())
    ) {
        init_tracing();
        let restart_at = restart.index(cmds.len() + 1);
        node_matches_model(cmds, restart_at)?;
    }
}

// ---------------------------------------------------------------------------------------------
// 1b. Directly through `SmStore`: apply, build a snapshot, install it into another store
// ---------------------------------------------------------------------------------------------

/// `None` is a blank entry (a new leader's first entry), `Some` a command.
type Batch = Vec<Option<KvCmd>>;

fn batches_strategy(max_batches: usize) -> impl Strategy<Value = Vec<Batch>> {
    let item = prop_oneof![1 => Just(None), 9 => cmd_strategy().prop_map(Some)];
    vec(vec(item, 1..16), 0..max_batches)
}

/// Applies `batch` at log indexes from `*next` on.
async fn apply_batch(store: &mut SmStore<Kv>, next: &mut u64, batch: &Batch) -> Result<(), TestCaseError> {
    let mut entries: Vec<io::Result<EntryResponder<KeelTypes>>> = Vec::new();
    for item in batch {
        let log_id = lid(*next);
        *next += 1;
        let entry = match item {
            None => Entry::new_blank(log_id),
            Some(cmd) => {
                Entry::new(log_id, EntryPayload::Normal(Command(codec::to_bytes(cmd).or_fail("encode")?)))
            }
        };
        entries.push(Ok((entry, None)));
    }
    store.apply(futures_util::stream::iter(entries)).await.or_fail("apply")
}

fn model_after(model: &mut Model, batches: &[Batch]) {
    for cmd in batches.iter().flatten().flatten() {
        model.apply(cmd);
    }
}

fn store_state(store: &SmStore<Kv>) -> Result<Model, TestCaseError> {
    store.read(|_, txn| read_model(txn)).or_fail("read")?.or_fail("read the tables")
}

fn membership_entry(index: u64, voters: &[u64]) -> Entry {
    membership_ent::<KeelTypes>(1, 1, index, vec![voters.iter().copied().collect()])
}

async fn sm_store_matches_model(
    prefix: Vec<Batch>,
    junk: Vec<Batch>,
    tail: Vec<Batch>,
) -> Result<(), TestCaseError> {
    let dir_a = tempfile::tempdir().or_fail("temp dir")?;
    let dir_b = tempfile::tempdir().or_fail("temp dir")?;
    let config = StateMachineConfig::default();
    let mut a = SmStore::open(dir_a.path(), 1, &config, Kv).or_fail("open store a")?;
    let mut b = SmStore::open(dir_b.path(), 2, &config, Kv).or_fail("open store b")?;

    // Store a: a membership entry, then the prefix.
    let membership = membership_entry(0, &[1, 2, 3]);
    let stored_membership = StoredMembership::new(
        Some(lid(0)),
        Membership::new_with_defaults(vec![BTreeSet::from([1, 2, 3])], []),
    );
    a.apply(futures_util::stream::iter(vec![Ok((membership, None))])).await.or_fail("apply membership")?;
    let mut next_a = 1;
    for batch in &prefix {
        apply_batch(&mut a, &mut next_a, batch).await?;
    }
    let mut model = Model::default();
    model_after(&mut model, &prefix);
    prop_assert_eq!(store_state(&a)?, model.clone(), "store a after the prefix");
    let applied = a.applied().or_fail("applied")?;
    prop_assert_eq!(applied.last_applied, Some(lid(next_a - 1)));
    prop_assert_eq!(&applied.membership, &stored_membership);

    // Snapshot of a.
    let snap = a.get_snapshot_builder().await.build_snapshot().await.or_fail("build snapshot")?;
    prop_assert_eq!(snap.meta.last_log_id, Some(lid(next_a - 1)));
    prop_assert_eq!(&snap.meta.last_membership, &stored_membership);
    let snap_path = snap.snapshot.path.clone();
    prop_assert_eq!(verify_file(&snap_path).or_fail("verify snapshot file")?, snap.meta.clone());
    let current = a.get_current_snapshot().await.or_fail("current snapshot")?;
    prop_assert_eq!(current.map(|s| s.meta), Some(snap.meta.clone()));
    let model_at_snapshot = model.clone();

    // Store b: unrelated state first (which the install must replace), then a's snapshot, copied
    // into b's snapshot directory the way a transport receives one.
    let mut next_b = 0;
    for batch in &junk {
        apply_batch(&mut b, &mut next_b, batch).await?;
    }
    let incoming = dir_b.path().join("snapshots").join("incoming-test.tmp");
    std::fs::copy(&snap_path, &incoming).or_fail("copy snapshot")?;
    b.install_snapshot(&snap.meta, SnapshotFile::open(&incoming).or_fail("open copy")?)
        .await
        .or_fail("install snapshot into b")?;
    prop_assert!(!incoming.exists(), "the installed temp file was left behind");
    prop_assert_eq!(store_state(&b)?, model.clone(), "store b after install");
    let applied = b.applied().or_fail("applied")?;
    prop_assert_eq!(applied.last_applied, snap.meta.last_log_id);
    prop_assert_eq!(&applied.membership, &stored_membership);
    let current = b.get_current_snapshot().await.or_fail("current snapshot")?;
    prop_assert_eq!(current.map(|s| s.meta), Some(snap.meta.clone()));

    // Both go on applying the same entries.
    let mut next_b = next_a;
    for batch in &tail {
        apply_batch(&mut a, &mut next_a, batch).await?;
        apply_batch(&mut b, &mut next_b, batch).await?;
    }
    model_after(&mut model, &tail);
    prop_assert_eq!(store_state(&a)?, model.clone(), "store a after the tail");
    prop_assert_eq!(store_state(&b)?, model.clone(), "store b after the tail");

    // b reopens with the same state and position.
    let b_applied = b.applied().or_fail("applied")?.last_applied;
    drop(b);
    let b = SmStore::open(dir_b.path(), 2, &config, Kv).or_fail("reopen store b")?;
    prop_assert_eq!(store_state(&b)?, model.clone(), "store b after reopen");
    prop_assert_eq!(b.applied().or_fail("applied")?.last_applied, b_applied);

    // a re-installs its own current snapshot: back to the snapshot's state and position.
    let current = a.get_current_snapshot().await.or_fail("current snapshot")?;
    let current = current.ok_or_else(|| TestCaseError::fail("store a lost its snapshot"))?;
    a.install_snapshot(&current.meta, current.snapshot).await.or_fail("re-install own snapshot")?;
    prop_assert_eq!(store_state(&a)?, model_at_snapshot, "store a after re-installing its snapshot");
    prop_assert_eq!(a.applied().or_fail("applied")?.last_applied, snap.meta.last_log_id);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn sm_store_snapshot_install_agrees_with_model(
        prefix in batches_strategy(8),
        junk in batches_strategy(3),
        tail in batches_strategy(4),
    ) {
        init_tracing();
        current_thread_runtime().block_on(sm_store_matches_model(prefix, junk, tail))?;
    }
}

// ---------------------------------------------------------------------------------------------
// 2a. Framed and postcard decoders
// ---------------------------------------------------------------------------------------------

fn sample_membership() -> StoredMembership {
    let m = Membership::new_with_defaults(vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([3, 4])], [5, 6]);
    StoredMembership::new(Some(log_id::<KeelTypes>(7, 2, 41)), m)
}

/// Valid encodings of every decoded type, to damage: reaches deeper into the decoders than
/// uniformly random bytes.
fn sample_encodings() -> Vec<Vec<u8>> {
    let payloads = [
        EntryPayload::Blank,
        EntryPayload::Normal(Command(b"hello world".to_vec())),
        EntryPayload::Membership(sample_membership().membership().clone()),
    ];
    let mut out = Vec::new();
    let mut framed = |write: &dyn Fn(&mut Vec<u8>) -> io::Result<usize>| {
        let mut buf = Vec::new();
        write(&mut buf).expect("encode a sample");
        out.push(buf);
    };
    for p in &payloads {
        framed(&|buf| codec::write_framed(p, buf));
    }
    framed(&|buf| codec::write_framed(&log_id::<KeelTypes>(3, 9, 1 << 40), buf));
    framed(&|buf| codec::write_framed(&Vote::new(12, 3), buf));
    framed(&|buf| codec::write_framed(&Vote::new_committed(12, 3), buf));
    let meta = SnapshotMeta { last_log_id: Some(lid(99)), last_membership: sample_membership() };
    out.push(codec::to_bytes(&meta).expect("encode"));
    out.push(codec::to_bytes(&Some(lid(5))).expect("encode"));
    out.push(codec::to_bytes(&sample_membership()).expect("encode"));
    out
}

/// Random bytes, a random body behind a correct length prefix, or a damaged valid encoding.
fn decoder_input() -> impl Strategy<Value = Vec<u8>> {
    let samples = sample_encodings();
    prop_oneof![
        vec(any::<u8>(), 0..300),
        vec(any::<u8>(), 0..300).prop_map(|body| {
            let mut v = (body.len() as u32).to_le_bytes().to_vec();
            v.extend(body);
            v
        }),
        (prop::sample::select(samples), vec(damage_strategy(), 1..4)).prop_map(|(mut bytes, damages)| {
            for d in damages {
                d.apply(&mut bytes);
            }
            bytes
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn framed_decoders_never_panic(bytes in decoder_input()) {
        let _ = codec::read_framed::<LogId, _>(&bytes[..]);
        let _ = codec::read_framed::<EntryPayload, _>(&bytes[..]);
        let _ = codec::read_framed::<Vote, _>(&bytes[..]);
        let _ = WalLogId::decode(&bytes[..]);
        let _ = WalPayload::decode(&bytes[..]);
        let _ = WalVote::decode(&bytes[..]);
    }

    #[test]
    fn postcard_decoders_never_panic(bytes in decoder_input()) {
        let _ = codec::from_bytes::<SnapshotMeta>(&bytes);
        let _ = codec::from_bytes::<Option<LogId>>(&bytes);
        let _ = codec::from_bytes::<StoredMembership>(&bytes);
        let _ = codec::from_bytes::<EntryPayload>(&bytes);
        let _ = codec::from_bytes::<KvCmd>(&bytes);
    }

    #[test]
    fn framed_codec_round_trips(term in any::<u64>(), node in any::<u64>(), index in any::<u64>(), data in vec(any::<u8>(), 0..64)) {
        let id = log_id::<KeelTypes>(term, node, index);
        let mut buf = Vec::new();
        codec::write_framed(&id, &mut buf).or_fail("encode")?;
        prop_assert_eq!(WalLogId::decode(&buf[..]).or_fail("decode")?.0, id);
        let payload = EntryPayload::Normal(Command(data));
        let mut buf = Vec::new();
        let n = codec::write_framed(&payload, &mut buf).or_fail("encode")?;
        prop_assert_eq!(n, buf.len());
        let back = WalPayload::decode(&buf[..]).or_fail("decode")?.0;
        prop_assert_eq!(codec::to_bytes(&back).or_fail("encode")?, codec::to_bytes(&payload).or_fail("encode")?);
    }
}

// ---------------------------------------------------------------------------------------------
// 2b. Snapshot files
// ---------------------------------------------------------------------------------------------

const SNAP_MAGIC: &[u8; 8] = b"KEELSNAP";
const KIND_META: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_END: u8 = 3;

fn snapshot_header() -> Vec<u8> {
    let mut h = SNAP_MAGIC.to_vec();
    h.push(1);
    h.extend([0u8; 7]);
    h
}

fn meta_strategy() -> impl Strategy<Value = SnapshotMeta> {
    (
        prop::option::of((0u64..100, 1u64..10, 0u64..100_000)),
        prop::collection::btree_set(1u64..10, 1..5),
        prop::collection::btree_set(1u64..20, 0..3),
    )
        .prop_map(|(last, voters, learners)| SnapshotMeta {
            last_log_id: last.map(|(t, n, i)| log_id::<KeelTypes>(t, n, i)),
            last_membership: StoredMembership::new(
                last.map(|(t, n, i)| log_id::<KeelTypes>(t, n, i / 2)),
                Membership::new_with_defaults(vec![voters], learners),
            ),
        })
}

/// Reads a snapshot the way a restore does (`Read` to the end) and the way `verify_file` does.
/// Both must agree; returns the meta and data, or the error.
fn read_snapshot_bytes(bytes: &[u8]) -> Result<Result<(SnapshotMeta, Vec<u8>), String>, TestCaseError> {
    let path = Path::new("test.snap");
    let read = SnapshotReader::new(bytes, path).map_err(|e| e.to_string()).and_then(|(meta, mut r)| {
        let mut data = Vec::new();
        r.read_to_end(&mut data).map_err(|e| e.to_string())?;
        Ok((meta, data))
    });
    let verified = SnapshotReader::new(bytes, path)
        .map_err(|e| e.to_string())
        .and_then(|(_, r)| r.verify_to_end().map_err(|e| e.to_string()));
    match (&read, &verified) {
        (Ok((_, data)), Ok(total)) => prop_assert_eq!(data.len() as u64, *total),
        (Err(_), Err(_)) => {}
        _ => prop_assert!(false, "read_to_end gave {:?} but verify_to_end gave {:?}", read, verified),
    }
    Ok(read)
}

/// One frame of a hand-built snapshot file.
#[derive(Clone, Debug)]
struct RawFrame {
    kind: u8,
    /// For META: use a valid encoded meta; for END: use the correct data total.
    valid_body: bool,
    body: Vec<u8>,
    bad_crc: bool,
}

/// Random frame sequences, and well-formed ones (META, DATA*, END) with the odd damaged frame, so
/// that both answers of the reader are exercised.
fn frames_strategy() -> impl Strategy<Value = Vec<RawFrame>> {
    let well_formed = vec((vec(any::<u8>(), 0..64), prop::bool::weighted(0.03)), 0..6).prop_map(|data| {
        let frame = |kind, body, bad_crc| RawFrame { kind, valid_body: true, body, bad_crc };
        let mut frames = vec![frame(KIND_META, Vec::new(), false)];
        frames.extend(data.into_iter().map(|(body, bad_crc)| frame(KIND_DATA, body, bad_crc)));
        frames.push(frame(KIND_END, Vec::new(), false));
        frames
    });
    prop_oneof![vec(raw_frame_strategy(), 0..8), well_formed]
}

fn raw_frame_strategy() -> impl Strategy<Value = RawFrame> {
    let kind = prop_oneof![2 => Just(KIND_META), 6 => Just(KIND_DATA), 2 => Just(KIND_END), 1 => any::<u8>()];
    (kind, prop::bool::weighted(0.8), vec(any::<u8>(), 0..64), prop::bool::weighted(0.05))
        .prop_map(|(kind, valid_body, body, bad_crc)| RawFrame { kind, valid_body, body, bad_crc })
}

fn frame_crc(kind: u8, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&(body.len() as u32).to_le_bytes());
    h.update(body);
    h.finalize()
}

/// Builds the file bytes, and what a correct reader must make of them.
fn build_snapshot_bytes(
    meta: &SnapshotMeta,
    frames: &[RawFrame],
    trailing: &[u8],
) -> (Vec<u8>, Option<(SnapshotMeta, Vec<u8>)>) {
    let mut bytes = snapshot_header();
    let mut data_total = 0u64;
    let mut parsed: Vec<(u8, Vec<u8>, bool)> = Vec::new();
    for f in frames {
        let body = match (f.kind, f.valid_body) {
            (KIND_META, true) => codec::to_bytes(meta).expect("encode meta"),
            (KIND_END, true) => data_total.to_le_bytes().to_vec(),
            _ => f.body.clone(),
        };
        if f.kind == KIND_DATA {
            data_total += body.len() as u64;
        }
        let mut crc = frame_crc(f.kind, &body);
        if f.bad_crc {
            crc ^= 0x5555_5555;
        }
        bytes.push(f.kind);
        bytes.extend((body.len() as u32).to_le_bytes());
        bytes.extend(crc.to_le_bytes());
        bytes.extend(&body);
        parsed.push((f.kind, body, !f.bad_crc));
    }
    bytes.extend(trailing);

    // The format: META (decodes), DATA*, END (8-byte LE total of DATA), end of file; every CRC ok.
    let expected = (|| {
        let mut it = parsed.iter();
        let (kind, body, crc_ok) = it.next()?;
        if *kind != KIND_META || !crc_ok {
            return None;
        }
        let meta: SnapshotMeta = codec::from_bytes(body).ok()?;
        let mut data = Vec::new();
        for (kind, body, crc_ok) in it.by_ref() {
            if !crc_ok {
                return None;
            }
            match *kind {
                KIND_DATA => data.extend(body),
                KIND_END => {
                    let total = u64::from_le_bytes(<[u8; 8]>::try_from(body.as_slice()).ok()?);
                    return (total == data.len() as u64 && it.next().is_none() && trailing.is_empty())
                        .then_some((meta, data));
                }
                _ => return None,
            }
        }
        None
    })();
    (bytes, expected)
}

fn write_snapshot(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let mut w = SnapshotWriter::create(path, meta)?;
    w.write_all(data)?;
    w.finish()
}

fn snapshot_data_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Sizes around the 64 KiB frame boundary and a few frames long.
    prop_oneof![0usize..300, 65_530usize..65_545, 0usize..200_000]
        .prop_flat_map(|len| any::<u64>().prop_map(move |seed| pseudo_random_bytes(len, seed)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn snapshot_reader_never_panics_on_random_bytes(
        body in vec(any::<u8>(), 0..400),
        with_header in any::<bool>(),
    ) {
        let mut bytes = if with_header { snapshot_header() } else { Vec::new() };
        bytes.extend(body);
        let _outcome = read_snapshot_bytes(&bytes)?;
    }

    #[test]
    fn snapshot_reader_accepts_exactly_well_formed_frames(
        meta in meta_strategy(),
        frames in frames_strategy(),
        trailing in prop_oneof![4 => Just(Vec::new()), 1 => vec(any::<u8>(), 1..10)],
    ) {
        let (bytes, expected) = build_snapshot_bytes(&meta, &frames, &trailing);
        let got = read_snapshot_bytes(&bytes)?;
        match (got, expected) {
            (Ok(got), Some(want)) => prop_assert_eq!(got, want),
            (Err(_), None) => {}
            (got, want) => prop_assert!(false, "reader gave {:?}, the format says {:?}", got, want),
        }
    }
}

/// Bytes 9..16 of the header are "7 zero bytes" in the format.
const RESERVED_HEADER: std::ops::Range<usize> = 9..16;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn damaged_snapshot_file_is_rejected(
        meta in meta_strategy(),
        data in snapshot_data_strategy(),
        damage in damage_strategy(),
    ) {
        let dir = tempfile::tempdir().or_fail("temp dir")?;
        let path = dir.path().join("s.snap");
        write_snapshot(&path, &meta, &data).or_fail("write snapshot")?;
        let mut bytes = std::fs::read(&path).or_fail("read snapshot")?;

        // The intact file reads back exactly.
        let (got_meta, got_data) = read_snapshot_bytes(&bytes)?.or_fail("read intact snapshot")?;
        prop_assert_eq!(&got_meta, &meta);
        prop_assert!(got_data == data, "intact snapshot data differs");
        prop_assert_eq!(verify_file(&path).or_fail("verify intact file")?, meta.clone());

        if let Damage::Flip { at, .. } = &damage {
            // Known gap, tested on its own below.
            prop_assume!(!RESERVED_HEADER.contains(&at.index(bytes.len())));
        }
        if !damage.apply(&mut bytes) {
            return Ok(());
        }
        std::fs::write(&path, &bytes).or_fail("write damaged file")?;
        let got = read_snapshot_bytes(&bytes)?;
        prop_assert!(got.is_err(), "damaged snapshot ({:?}) read without error", damage);
        prop_assert!(verify_file(&path).is_err(), "damaged snapshot ({:?}) verified", damage);
        let opened = SnapshotReader::open(&path);
        if let Ok((_, mut reader)) = opened {
            prop_assert!(io::copy(&mut reader, &mut io::sink()).is_err(), "damaged snapshot read via open()");
        }
    }
}

/// The header's reserved bytes are "7 zero bytes" per the format, but the reader does not check
/// them: a flipped bit there goes unnoticed (no frame CRC covers the header).
#[test]
fn snapshot_with_nonzero_reserved_header_byte_is_rejected() {
    let meta = SnapshotMeta { last_log_id: Some(lid(3)), last_membership: sample_membership() };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("s.snap");
    write_snapshot(&path, &meta, b"data").expect("write snapshot");
    let mut bytes = std::fs::read(&path).expect("read snapshot");
    for i in RESERVED_HEADER {
        let saved = bytes[i];
        bytes[i] ^= 1;
        assert!(
            SnapshotReader::new(&bytes[..], &path).is_err(),
            "header byte {i} flipped, snapshot still opens"
        );
        bytes[i] = saved;
    }
}

// ---------------------------------------------------------------------------------------------
// 2c. The WAL
// ---------------------------------------------------------------------------------------------

/// Group commit never strands an append: every flush callback fires, whether the append finds
/// the log idle, a flush running, or appends already waiting, and however its timing falls
/// against the previous flush's completion (which runs on another thread). A stranded append
/// would hang openraft; here it fails the wait.
#[test]
fn every_append_is_reported_flushed_under_group_commit() {
    let dir = tempfile::tempdir().expect("temp dir");
    multi_thread_runtime().block_on(async {
        let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("open log");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut waits = Vec::new();
        for index in 1..=3000u64 {
            let entry = Entry::new(lid(index), EntryPayload::Normal(Command(vec![1; 64])));
            let (tx, rx) = KeelTypes::oneshot();
            log.append([entry], IOFlushed::signal(tx)).await.expect("append");
            waits.push(rx);
            // Sometimes wait for everything so far (the next append finds the log idle or just
            // going idle), sometimes spin a little, mostly go straight on (appends pile up).
            match rand::Rng::gen_range(&mut rng, 0..10) {
                0 => {
                    for rx in waits.drain(..) {
                        tokio::time::timeout(WAIT, rx)
                            .await
                            .expect("flushed in time")
                            .expect("sender")
                            .expect("ok");
                    }
                }
                1 => (0..rand::Rng::gen_range(&mut rng, 0..20_000)).for_each(|_| std::hint::spin_loop()),
                _ => {}
            }
        }
        for rx in waits {
            tokio::time::timeout(WAIT, rx).await.expect("flushed in time").expect("sender").expect("ok");
        }
    });
}

fn wal_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list the log dir")
        .map(|e| e.expect("list the log dir").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    files.sort();
    files
}

async fn append_and_wait(log: &mut LogStore, entries: Vec<Entry>) -> io::Result<()> {
    let (tx, rx) = KeelTypes::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.map_err(|e| io::Error::other(format!("flush callback dropped: {e:?}")))?
}

/// Everything a reopened log holds: (vote, committed, entries).
async fn read_back(log: &mut LogStore) -> io::Result<(Option<Vote>, Option<LogId>, Vec<Entry>)> {
    let (vote, purged, last, committed) = log.state();
    let entries = match last {
        Some(last) => log.try_get_log_entries(purged.map_or(0, |p| p.index + 1)..=last.index).await?,
        None => Vec::new(),
    };
    Ok((vote, committed, entries))
}

fn same_entry(a: &Entry, b: &Entry) -> bool {
    let bytes = |e: &Entry| codec::to_bytes(&e.payload).expect("encode payload");
    a.log_id == b.log_id && bytes(a) == bytes(b)
}

/// The name of the first WAL chunk file of a fresh log (e.g. `r-00_000_000_000_000_000_000.wal`).
fn first_chunk_name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        current_thread_runtime().block_on(async {
            let mut log = LogStore::open(dir.path(), &LogConfig::default()).expect("open log");
            append_and_wait(&mut log, vec![Entry::new_blank(lid(0))]).await.expect("append");
        });
        let files = wal_files(dir.path());
        assert_eq!(1, files.len(), "one chunk after one append: {files:?}");
        files[0].file_name().and_then(|n| n.to_str()).expect("utf-8 name").to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn log_open_on_random_chunk_never_panics(bytes in vec(any::<u8>(), 0..2048)) {
        let dir = tempfile::tempdir().or_fail("temp dir")?;
        std::fs::write(dir.path().join(first_chunk_name()), &bytes).or_fail("write chunk")?;
        if let Ok(mut log) = LogStore::open(dir.path(), &LogConfig::default()) {
            current_thread_runtime().block_on(read_back(&mut log)).or_fail("read an opened log")?;
        }
    }

    #[test]
    fn damaged_log_never_yields_unwritten_entries(
        batches in vec(vec(vec(any::<u8>(), 0..200), 1..8), 1..5),
        damage in damage_strategy(),
    ) {
        current_thread_runtime().block_on(damaged_log_case(batches, damage))?;
    }
}

/// Drops `log` and waits until the WAL is closed: the last handle may be dropped by the log's own
/// committer thread a moment later, and until then the directory stays locked.
async fn close(log: LogStore, closed: tokio::sync::oneshot::Receiver<()>) -> Result<(), TestCaseError> {
    drop(log);
    // The sender is dropped, never used: the receiver completing (with `RecvError`) is the signal.
    let _ = closed.await;
    Ok(())
}

async fn damaged_log_case(batches: Vec<Vec<Vec<u8>>>, damage: Damage) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().or_fail("temp dir")?;
    let config = LogConfig::default();
    let vote = Vote::new_committed(1, 1);
    let mut written = Vec::new();
    {
        let (mut log, closed) = LogStore::open_with_close_signal(dir.path(), &config).or_fail("open log")?;
        log.save_vote(&vote).await.or_fail("save vote")?;
        for batch in batches {
            let first = written.len() as u64;
            let entries: Vec<Entry> = (first..)
                .zip(batch)
                .map(|(index, data)| Entry::new(lid(index), EntryPayload::Normal(Command(data))))
                .collect();
            written.extend(entries.iter().cloned());
            append_and_wait(&mut log, entries).await.or_fail("append")?;
        }
        log.save_committed(Some(lid(written.len() as u64 - 1))).await.or_fail("save committed")?;
        // save_committed does not sync; a vote save does, and carries it to disk.
        log.save_vote(&vote).await.or_fail("save vote")?;
        let (v, c, e) = read_back(&mut log).await.or_fail("read back")?;
        prop_assert_eq!(v, Some(vote));
        prop_assert_eq!(c, Some(lid(written.len() as u64 - 1)));
        prop_assert_eq!(e.len(), written.len());
        close(log, closed).await?;
    }

    let files = wal_files(dir.path());
    prop_assert_eq!(files.len(), 1, "expected one chunk: {:?}", files);
    let mut bytes = std::fs::read(&files[0]).or_fail("read chunk")?;
    if !damage.apply(&mut bytes) {
        return Ok(());
    }
    std::fs::write(&files[0], &bytes).or_fail("write damaged chunk")?;

    // A short tail is what a crash leaves: the contract is that it is cut off, not an error.
    let torn = matches!(damage, Damage::Truncate { .. });
    let (mut log, closed) = match LogStore::open_with_close_signal(dir.path(), &config) {
        Ok(opened) => opened,
        // A torn tail is what a crash leaves: the contract is that it is cut off, not an error.
        Err(e) if torn => {
            return Err(TestCaseError::fail(format!("torn log ({damage:?}) does not open: {e}")))
        }
        Err(_) => return Ok(()),
    };
    let (got_vote, got_committed, got) = read_back(&mut log).await.or_fail("read a reopened log")?;
    prop_assert!(got_vote.is_none() || got_vote == Some(vote), "vote {:?} was never written", got_vote);
    prop_assert!(
        got_committed.is_none() || got_committed == Some(lid(written.len() as u64 - 1)),
        "committed {:?} was never written",
        got_committed
    );
    prop_assert!(got.len() <= written.len(), "{} entries read back, {} written", got.len(), written.len());
    for (i, (g, w)) in got.iter().zip(&written).enumerate() {
        prop_assert!(same_entry(g, w), "entry {} differs after {:?}: {:?} vs {:?}", i, damage, g, w);
    }

    // The log goes on from what survived, and what it appends survives another reopen (a cut-off
    // tail must really be gone, not left in front of the new records).
    let next = got.len() as u64;
    let extra = Entry::new(log_id::<KeelTypes>(2, 1, next), EntryPayload::Normal(Command(b"after".to_vec())));
    append_and_wait(&mut log, vec![extra.clone()]).await.or_fail("append after reopen")?;
    close(log, closed).await?;
    let mut log = LogStore::open(dir.path(), &config).or_fail("reopen after append")?;
    let (_, _, again) = read_back(&mut log).await.or_fail("read back after append")?;
    prop_assert_eq!(again.len(), got.len() + 1, "entries after append and reopen");
    for (g, w) in again.iter().zip(got.iter().chain([&extra])) {
        prop_assert!(same_entry(g, w), "entry differs after append and reopen: {:?} vs {:?}", g, w);
    }
    Ok(())
}

/// The log's contract: a torn last record is cut off when short, and when its head reached the disk
/// but its tail reads as zeros to the end of the file, its CRC included (ext4 `data=writeback`
/// after power loss: `keel::storage::wal_repair`). Never returns wrong data.
#[test]
fn log_with_zero_filled_torn_record_is_cut_to_what_came_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = LogConfig::default();
    let vote = Vote::new_committed(1, 1);
    let (after_vote, after_entry) = current_thread_runtime().block_on(async {
        let (mut log, closed) = LogStore::open_with_close_signal(dir.path(), &config).expect("open");
        log.save_vote(&vote).await.expect("save vote");
        let after_vote = std::fs::metadata(&wal_files(dir.path())[0]).expect("stat").len();
        let entry = Entry::new(lid(0), EntryPayload::Normal(Command(vec![7; 15])));
        append_and_wait(&mut log, vec![entry]).await.expect("append");
        let after_entry = std::fs::metadata(&wal_files(dir.path())[0]).expect("stat").len();
        close(log, closed).await.expect("close the log");
        (after_vote, after_entry)
    });
    let chunk = &wal_files(dir.path())[0];
    let mut bytes = std::fs::read(chunk).expect("read chunk");
    assert_eq!(after_entry, bytes.len() as u64);
    // The entry record's first half landed, its second half reads as zeros.
    let mid = (after_vote + (after_entry - after_vote) / 2) as usize;
    bytes[mid..].fill(0);
    std::fs::write(chunk, &bytes).expect("write chunk");
    let log = LogStore::open(dir.path(), &config).expect("a torn record with zeros to the end is cut");
    let (got_vote, _, last, _) = log.state();
    assert_eq!((Some(vote), None), (got_vote, last), "exactly what came before the torn record is kept");
    assert_eq!(
        after_vote,
        std::fs::metadata(chunk).expect("stat").len(),
        "the file ends where the record began"
    );
}
