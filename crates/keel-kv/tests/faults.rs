//! The planted bugs of `KEEL_FAULT_INJECTION` (debug builds only), the negative controls of the
//! fault tests: each does what it says, none is on by default, and a misspelt name stops keeld.
//!
//! - `stale-reads`: an in-process three-node cluster with one follower cut off; the linearizable
//!   read goes through `KvApi::range`, the one path of etcd `Range` and HTTP `GET /v1/kv…`.
//! - `ack-before-fsync`: a real keeld, SIGKILLed right after it acknowledged a write.
#![cfg(debug_assertions)]

mod procs;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel::faults::Faults;
use keel::InProcessRouter;
use keel::Node;
use keel::NodeInfo;
use keel_kv::api::ApiError;
use keel_kv::api::KvApi;
use keel_kv::config::DEFAULT_MAX_KEY_BYTES;
use keel_kv::config::DEFAULT_MAX_REQUEST_BYTES;
use keel_kv::store::KvCommand;
use keel_kv::store::KvStore;
use keel_kv::store::Put;
use keel_kv::store::Range;
use keel_kv::store::RangeResult;
use procs::http;
use procs::wait_until;
use procs::Procs;

const WAIT: Duration = Duration::from_secs(20);
const KEY: &[u8] = b"k";

// ---------------------------------------------------------------------------------------------
// stale-reads
// ---------------------------------------------------------------------------------------------

/// Three in-process nodes (the in-process transport can cut one off), each behind the `KvApi`
/// that keeld's etcd and HTTP services call.
struct Cluster {
    router: InProcessRouter,
    apis: BTreeMap<u64, KvApi>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(faults: Faults) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let router = InProcessRouter::new();
        let mut apis = BTreeMap::new();
        for id in 1..=3 {
            let mut config = keel::Config::new(id, dir.path().join(format!("n{id}")));
            config.raft.heartbeat_interval_ms = 50;
            config.raft.election_timeout_min_ms = 300;
            config.raft.election_timeout_max_ms = 600;
            // A cut-off follower gives up forwarding after this long.
            config.raft.forward_timeout_ms = 1_000;
            config.state_machine.verify_on_start = false;
            config.faults = faults;
            let node =
                Node::start(config, KvStore::default(), router.network(id)).await.expect("node starts");
            router.register(id, node.service());
            let api = KvApi::new(
                Arc::new(node),
                NodeInfo::default(),
                DEFAULT_MAX_REQUEST_BYTES,
                DEFAULT_MAX_KEY_BYTES,
            );
            apis.insert(id, api);
        }
        let members = (1..=3).map(|id| (id, NodeInfo::default())).collect();
        apis[&1].node.initialize(members).await.expect("initialize");
        Cluster { router, apis, _dir: dir }
    }

    async fn put(&self, on: u64, value: &[u8]) -> (i64, u64) {
        let put = Put { key: KEY.to_vec(), value: value.to_vec(), ..Put::default() };
        let (resp, index) = self.apis[&on].node.propose_indexed(KvCommand::Put(put)).await.expect("put");
        (resp.revision, index)
    }

    /// Writes `v1` everywhere, cuts a follower off, writes `v2` through the leader and a quorum
    /// without it. Answers the follower, and the revision `v1` was written at.
    async fn cut_off_a_follower_behind_a_write(&self) -> (u64, i64) {
        let leader = self.apis[&1].node.wait_for_leader(WAIT, None).await.expect("a leader");
        let follower = *self.apis.keys().find(|id| **id != leader).expect("a follower");
        let (v1_revision, index) = self.put(leader, b"v1").await;
        self.apis[&follower].node.wait_applied(index, WAIT).await.expect("the follower applied v1");
        self.router.isolate(follower);
        let (v2_revision, _) = self.put(leader, b"v2").await;
        assert!(v2_revision > v1_revision);
        (follower, v1_revision)
    }

    async fn linearizable_read(&self, on: u64) -> Result<(i64, RangeResult), ApiError> {
        self.apis[&on].range(&Range { key: KEY.to_vec(), ..Range::default() }, false).await
    }
}

fn value(result: &RangeResult) -> &[u8] {
    &result.kvs.first().expect("the key exists").value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_serve_a_cut_off_follower_from_its_own_state() {
    let faults = Faults { stale_reads: true, ..Faults::default() };
    let c = Cluster::start(faults).await;
    let (follower, v1_revision) = c.cut_off_a_follower_behind_a_write().await;
    let (revision, result) = c.linearizable_read(follower).await.expect("answered from local state");
    assert_eq!(
        (b"v1".as_slice(), v1_revision),
        (value(&result), revision),
        "a linearizable read on the cut-off follower answers its stale state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_fault_a_cut_off_follower_reads_through_the_leader() {
    let c = Cluster::start(Faults::default()).await;
    let (follower, _) = c.cut_off_a_follower_behind_a_write().await;
    // Cut off, the follower cannot learn a read index from the leader: it refuses, never serves v1.
    match c.linearizable_read(follower).await {
        Err(e) => assert!(e.to_string().contains("leader"), "refused for want of the leader: {e}"),
        Ok((revision, result)) => panic!(
            "a cut-off follower answered a linearizable read: {:?} at revision {revision}",
            String::from_utf8_lossy(value(&result))
        ),
    }
    // Reconnected, it reads at the leader's read index: the latest write.
    c.router.heal(follower);
    let (_, result) = c.linearizable_read(follower).await.expect("read once reconnected");
    assert_eq!(b"v2".as_slice(), value(&result));
}

// ---------------------------------------------------------------------------------------------
// keeld: ack-before-fsync, and refusing names it does not know
// ---------------------------------------------------------------------------------------------

/// The state machine never fsyncs on its own (only on a clean close): after a SIGKILL it reverts
/// to its last durable commit and re-applies from the log, so the log alone decides what survives.
const NO_SM_SYNC: &str = "[state_machine]\nverify_on_start = false\nsync_interval_ms = 3600000\n\
                          sync_every_entries = 1000000\n";

/// Puts `key` on node 1, SIGKILLs it at once, restarts it; whether the acknowledged put survived.
fn put_kill_restart_survives(procs: &mut Procs, key: &str) -> bool {
    let client = procs.client(1);
    let path = format!("/v1/kv/{key}");
    let (status, body) = http(&client, "PUT", &path, b"acked", WAIT).expect("put answered");
    assert_eq!(200, status, "put acknowledged: {body}");
    procs.kill(1);
    procs.restart(1);
    procs.wait_ready(1);
    match http(&client, "GET", &path, b"", WAIT).expect("get answered") {
        (200, _) => true,
        (404, _) => false,
        (code, body) => panic!("GET {path}: {code} {body}"),
    }
}

#[test]
fn ack_before_fsync_lets_kill_9_lose_acknowledged_writes() {
    let mut procs = Procs::new(1, NO_SM_SYNC);
    procs.spawn(1, &["--id", "1"]);
    procs.wait_ready(1);
    // Off by default: an acknowledged write is in the log before the answer, and survives.
    assert!(put_kill_restart_survives(&mut procs, "control"), "a write acknowledged without faults was lost");
    let log = std::fs::read_to_string(&procs.node(1).log).expect("read keeld's log");
    assert!(
        !log.contains("FAULT INJECTION"),
        "no fault without the variable:
{log}"
    );

    procs.fault_injection = Some("ack-before-fsync".into());
    procs.kill(1);
    procs.restart(1);
    procs.wait_ready(1);
    let log = std::fs::read_to_string(&procs.node(1).log).expect("read keeld's log");
    assert!(
        log.contains("FAULT INJECTION ACTIVE") && log.contains("ack-before-fsync"),
        "keeld warns that the fault is planted:\n{log}"
    );
    // The entry waits 50 ms in keeld's memory after its acknowledgement; a SIGKILL sent right
    // after the answer almost always lands inside that window.
    const ATTEMPTS: usize = 5;
    let lost = (0..ATTEMPTS).find(|i| !put_kill_restart_survives(&mut procs, &format!("planted-{i}")));
    let Some(lost) = lost else {
        panic!("{ATTEMPTS} writes acknowledged under ack-before-fsync all survived kill -9");
    };
    eprintln!("kill -9 lost the write acknowledged in attempt {} of {ATTEMPTS}", lost + 1);
}

#[test]
fn an_unknown_fault_name_stops_keeld_with_the_name() {
    let mut procs = Procs::new(1, "");
    procs.fault_injection = Some("stale-reads,ack-before-sync".into());
    procs.spawn(1, &["--id", "1"]);
    let status = wait_until("keeld to exit", procs::DEADLINE, || procs.exited(1).ok_or_else(String::new));
    let log = std::fs::read_to_string(&procs.node(1).log).expect("read keeld's log");
    assert_eq!(Some(2), status.code(), "exit status {status}:\n{log}");
    assert!(
        log.contains("KEEL_FAULT_INJECTION") && log.contains("unknown fault \"ack-before-sync\""),
        "the error names the variable and the unknown fault:\n{log}"
    );
    assert!(!procs.node(1).data_dir.exists(), "refused before touching the data dir");
}
