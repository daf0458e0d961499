//! Three-node in-process clusters: election, replication, leader loss, snapshot catch-up.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use keel::InProcessRouter;
use keel::Node;
use keel::NodeInfo;
use keel::ProposeError;
use support::check_ledger;
use support::read_ledger;
use support::test_config;
use support::Append;
use support::Ledger;
use support::WAIT;

struct Cluster {
    router: InProcessRouter,
    nodes: BTreeMap<u64, Node<Ledger>>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(n: u64, tune: impl Fn(&mut keel::Config)) -> Cluster {
        support::init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let router = InProcessRouter::new();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let node = start_node(&router, id, dir.path(), &tune).await;
            nodes.insert(id, node);
        }
        let members = (1..=n).map(|id| (id, NodeInfo::default())).collect();
        nodes[&1].initialize(members).await.expect("initialize");
        Cluster { router, nodes, dir }
    }

    async fn leader(&self, not: Option<u64>) -> u64 {
        let any = self.nodes.values().find(|n| Some(n.id()) != not).expect("a live node");
        any.wait_for_leader(WAIT, not).await.expect("leader elected")
    }

    async fn stop(&mut self, id: u64) {
        self.router.unregister(id);
        self.nodes.remove(&id).expect("running").shutdown().await.expect("clean shutdown");
    }

    /// Waits until every running node applied `index` (from `propose_indexed`), then returns
    /// each node's ledger.
    async fn converge(&self, index: u64) -> BTreeMap<u64, Vec<u64>> {
        let mut out = BTreeMap::new();
        for (id, node) in &self.nodes {
            node.wait_applied(index, WAIT).await.expect("caught up");
            let (rows, count, sum) = node.read_local(|_, t| read_ledger(t)).expect("read");
            check_ledger(&rows, count, sum);
            out.insert(*id, rows);
        }
        out
    }
}

async fn start_node(
    router: &InProcessRouter,
    id: u64,
    dir: &Path,
    tune: &impl Fn(&mut keel::Config),
) -> Node<Ledger> {
    let mut config = test_config(id, &dir.join(format!("n{id}")));
    tune(&mut config);
    let node = Node::start(config, Ledger, router.network(id)).await.expect("node starts");
    router.register(id, node.service());
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_and_answer_linearizable_reads() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader(None).await;
    let mut last = 0;
    for i in 0..100 {
        let (seq, index) = c.nodes[&leader].propose_indexed(Append(i)).await.expect("propose");
        last = index;
        assert_eq!(i, seq, "each command lands at the next ledger slot");
    }
    let (rows, _, _) = c.nodes[&leader].read(|_, t| read_ledger(t)).await.expect("linearizable read");
    assert_eq!((0..100).collect::<Vec<_>>(), rows);

    let all = c.converge(last).await;
    assert!(all.values().all(|r| r == &rows), "replicas diverge: {all:?}");

    // Any node accepts writes and linearizable reads: a follower forwards them to the leader, and
    // its read waits for the leader's read index, so it sees the write it just made.
    let follower = *c.nodes.keys().find(|&&id| id != leader).expect("a follower");
    let (seq, _) = c.nodes[&follower].propose_indexed(Append(1000)).await.expect("forwarded propose");
    assert_eq!(100, seq, "the forwarded command lands at the next slot, once");
    let (rows, _, _) = c.nodes[&follower].read(|_, t| read_ledger(t)).await.expect("follower read");
    assert_eq!(101, rows.len(), "a linearizable read on a follower sees the latest write");
    assert_eq!(Some(&1000), rows.last());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_forwarding_off_a_follower_names_the_leader() {
    let c = Cluster::start(3, |config| config.raft.forward_timeout_ms = 0).await;
    let leader = c.leader(None).await;
    let follower = *c.nodes.keys().find(|&&id| id != leader).expect("a follower");
    match c.nodes[&follower].propose(Append(1)).await {
        Err(ProposeError::NotLeader(nl)) => assert_eq!(Some(leader), nl.leader_id),
        other => panic!("follower propose should be NotLeader, got {other:?}"),
    }
    assert!(c.nodes[&follower].read(|_, t| read_ledger(t)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_elects_a_new_leader_and_the_old_one_catches_up() {
    let mut c = Cluster::start(3, |_| {}).await;
    let first = c.leader(None).await;
    for i in 0..50 {
        c.nodes[&first].propose(Append(i)).await.expect("propose");
    }
    c.stop(first).await;

    let second = c.leader(Some(first)).await;
    assert_ne!(first, second);
    let mut last = 0;
    for i in 50..100 {
        last = c.nodes[&second].propose_indexed(Append(i)).await.expect("propose on new leader").1;
    }

    // The old leader restarts from its data dir and catches up.
    let node = start_node(&c.router, first, c.dir.path(), &|_| {}).await;
    c.nodes.insert(first, node);
    let all = c.converge(last).await;
    for rows in all.values() {
        assert_eq!(&(0..100).collect::<Vec<_>>(), rows);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_node_catches_up_by_snapshot() {
    let tune = |c: &mut keel::Config| {
        c.raft.snapshot_every = 50;
        c.raft.logs_to_keep_after_snapshot = 10;
    };
    let c = Cluster::start(3, tune).await;
    let leader = c.leader(None).await;
    let lagging = *c.nodes.keys().find(|&&id| id != leader).expect("a follower");
    c.router.isolate(lagging);

    let mut last = 0;
    for i in 0..400 {
        last = c.nodes[&leader].propose_indexed(Append(i)).await.expect("propose with one node cut off").1;
    }
    // The leader has snapshotted and purged past everything the lagging node has.
    let lag_last = c.nodes[&lagging].metrics().last_log_index.unwrap_or(0);
    let m = c.nodes[&leader]
        .wait_for(WAIT, "leader purged past the lagging node", |m| {
            m.purged.is_some_and(|p| p.index > lag_last + 1)
        })
        .await
        .expect("snapshot and purge on the leader");
    assert!(m.snapshot.is_some());

    c.router.heal(lagging);
    let all = c.converge(last).await;
    assert_eq!(all[&lagging], (0..400).collect::<Vec<_>>());
    let snap = c.nodes[&lagging].metrics().snapshot.expect("lagging node installed a snapshot");
    assert!(snap.index > lag_last, "caught up by a snapshot beyond its own log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_grows_from_one_node_and_shrinks() {
    support::init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let router = InProcessRouter::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, start_node(&router, id, dir.path(), &|_| {}).await);
    }
    nodes[&1].initialize([(1, NodeInfo::default())].into()).await.expect("single-node cluster");
    nodes[&1].wait_for_leader(WAIT, None).await.expect("leader");
    for i in 0..20 {
        nodes[&1].propose(Append(i)).await.expect("propose");
    }

    // Learners catch up before they vote; then they become voters.
    for id in [2, 3] {
        nodes[&1].add_learner(id, NodeInfo::default(), true).await.expect("add learner");
    }
    nodes[&1].change_membership([1, 2, 3].into()).await.expect("promote");
    let (_, index) = nodes[&1].propose_indexed(Append(20)).await.expect("propose in 3-node cluster");
    for node in nodes.values() {
        node.wait_applied(index, WAIT).await.expect("caught up");
        let (rows, _, _) = node.read_local(|_, t| read_ledger(t)).expect("read");
        assert_eq!((0..=20).collect::<Vec<_>>(), rows);
    }

    // Remove node 3: the others carry on; the voter set no longer names it.
    nodes[&1].change_membership([1, 2].into()).await.expect("remove node 3");
    let (_, index) = nodes[&1].propose_indexed(Append(21)).await.expect("propose after removal");
    nodes[&2].wait_applied(index, WAIT).await.expect("node 2 applies");
    let voters: Vec<u64> = nodes[&1].metrics().membership_config.membership().voter_ids().collect();
    assert_eq!(vec![1, 2], voters);

    // An unknown node cannot be made a voter.
    let err = nodes[&1].change_membership([1, 2, 9].into()).await.expect_err("9 was never added");
    assert!(matches!(err, keel::AdminError::Rejected(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_committed_entry_that_does_not_decode_is_refused_alike_and_the_cluster_goes_on() {
    let mut c = Cluster::start(3, |_| {}).await;
    let leader = c.leader(None).await;
    c.nodes[&leader].propose(Append(1)).await.expect("propose");
    // What an older or broken leader could have put in the log: bytes that are no command. (A
    // Keel leader refuses them before proposing: see the next test.)
    let garbage = keel::types::Command(vec![0xff; 9]);
    let written = c.nodes[&leader].raft().client_write(garbage).await.expect("committed");
    assert!(
        matches!(&written.data, keel::types::Reply::Refused(why) if why.contains("cannot decode")),
        "{:?}",
        written.data
    );
    let (seq, index) = c.nodes[&leader].propose_indexed(Append(2)).await.expect("the log goes on");
    assert_eq!(1, seq, "the refused entry took no ledger slot");
    let all = c.converge(index).await;
    assert!(all.values().all(|rows| rows == &vec![1, 2]), "replicas diverge: {all:?}");

    // A restart re-applies the entry the same way.
    let follower = *c.nodes.keys().find(|&&id| id != leader).expect("a follower");
    c.stop(follower).await;
    let node = start_node(&c.router, follower, c.dir.path(), &|_: &mut keel::Config| {}).await;
    c.nodes.insert(follower, node);
    let all = c.converge(index).await;
    assert_eq!(Some(&vec![1, 2]), all.get(&follower));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_refuses_what_validate_refuses_whichever_path_it_came_by() {
    let c = Cluster::start(3, |config| config.limits.max_command_bytes = 1024).await;
    let leader = c.leader(None).await;
    let follower = *c.nodes.keys().find(|&&id| id != leader).expect("a follower");
    for id in [leader, follower] {
        match c.nodes[&id].propose(Append(support::RESERVED_ID)).await {
            Err(ProposeError::InvalidCommand(why)) => assert!(why.contains("reserved"), "{why}"),
            other => panic!("node {id}: a refused command must not be proposed, got {other:?}"),
        }
        let garbage = keel::types::Command(vec![0xff; 9]);
        match c.nodes[&id].propose_bytes(garbage).await {
            Err(ProposeError::InvalidCommand(why)) => assert!(why.contains("does not decode"), "{why}"),
            other => panic!("node {id}: undecodable bytes must not be proposed, got {other:?}"),
        }
        let large = keel::types::Command(vec![0; 2048]);
        match c.nodes[&id].propose_bytes(large).await {
            Err(ProposeError::InvalidCommand(why)) => assert!(why.contains("max_command_bytes"), "{why}"),
            other => panic!("node {id}: an oversized command must not be proposed, got {other:?}"),
        }
    }

    // A forwarded write is checked by the leader itself, as a peer could send anything.
    let service = c.nodes[&leader].service();
    let reserved = keel::codec::to_bytes(&Append(support::RESERVED_ID)).expect("encodes");
    let req = keel::forward::ForwardRequest::Write(keel::types::Command(reserved));
    match service.forward(follower, req.clone()).await {
        Ok(keel::forward::ForwardReply::Failed(keel::forward::ForwardFailure::Invalid(why))) => {
            assert!(why.contains("reserved"), "{why}")
        }
        other => panic!("the leader must refuse a forwarded invalid command, got {other:?}"),
    }
    // ...and only from a member.
    match service.forward(99, req).await {
        Err(keel::network::ServiceError::Refused(why)) => {
            assert!(why.to_string().contains("node 99"), "{why}")
        }
        other => panic!("a forward from a non-member must be refused, got {other:?}"),
    }

    let index = c.nodes[&follower].propose_indexed(Append(7)).await.expect("valid commands go on").1;
    let all = c.converge(index).await;
    assert!(all.values().all(|rows| rows == &vec![7]), "nothing refused was applied: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_snapshot_is_received_at_a_time_and_a_cancelled_one_leaves_no_file() {
    use futures_util::StreamExt;
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader(None).await;
    let follower = *c.nodes.keys().find(|&&id| id != leader).expect("a follower");
    let vote = c.nodes[&follower].metrics().vote;
    let meta = keel::types::SnapshotMeta::default();
    let snapshots = c.dir.path().join(format!("n{follower}")).join("snapshots");
    let incoming = || {
        std::fs::read_dir(&snapshots)
            .expect("snapshot dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("incoming"))
            .count()
    };
    let service = c.nodes[&follower].service();

    // A transfer that sends one chunk and then stalls, as a slow or malicious sender would.
    let stalled: keel::network::SnapshotChunks =
        Box::pin(futures_util::stream::iter([Ok(vec![1u8; 1024])]).chain(futures_util::stream::pending()));
    let first = tokio::spawn({
        let service = service.clone();
        let meta = meta.clone();
        async move { service.install_snapshot(vote, meta, stalled).await }
    });
    let deadline = tokio::time::Instant::now() + support::WAIT;
    while incoming() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first transfer never started writing");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await; // polling a condition
    }
    let second: keel::network::SnapshotChunks = Box::pin(futures_util::stream::iter([Ok(vec![2u8; 1024])]));
    match service.install_snapshot(vote, meta, second).await {
        Err(keel::network::ServiceError::Refused(why)) => {
            assert!(why.to_string().contains("another snapshot"), "{why}")
        }
        other => panic!("a second snapshot at once must be refused, got {other:?}"),
    }
    first.abort();
    assert!(first.await.expect_err("aborted").is_cancelled());
    assert_eq!(0, incoming(), "a cancelled transfer removes its temp file");
}
