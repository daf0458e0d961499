//! Clusters over the real gRPC peer transport on loopback: replication, snapshot catch-up, and
//! refusal of misaddressed or malformed messages.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use keel::network::grpc;
use keel::network::grpc::proto::raft_peer_client::RaftPeerClient;
use keel::network::grpc::proto::PeerRequest;
use keel::network::grpc::GrpcNetwork;
use keel::network::grpc::PeerServer;
use keel::openraft;
use keel::Node;
use keel::NodeInfo;
use support::check_ledger;
use support::read_ledger;
use support::test_config;
use support::Append;
use support::Ledger;
use support::WAIT;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CLUSTER: &str = "grpc-test";

/// A node and the gRPC server that serves it to its peers.
struct Peer {
    node: Node<Ledger>,
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Peer {
    fn info(&self) -> NodeInfo {
        NodeInfo::new(self.addr.to_string(), "")
    }

    /// Stops the server (it lets requests in flight finish), then the node.
    async fn shutdown(self) {
        let _ = self.stop.send(());
        self.server.await.expect("server task").expect("server stops cleanly");
        self.node.shutdown().await.expect("clean node shutdown");
    }
}

/// Binds a loopback listener on a free port, starts node `id` and serves it there.
async fn start_peer(id: u64, dir: &Path, tune: &impl Fn(&mut keel::Config)) -> Peer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let mut config = test_config(id, &dir.join(format!("n{id}")));
    tune(&mut config);
    let node = Node::start(config, Ledger, GrpcNetwork::new(CLUSTER, id)).await.expect("node starts");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = PeerServer::new(CLUSTER, id, node.service());
    let server = tokio::spawn(grpc::serve(listener, server, async {
        let _ = stopped.await;
    }));
    Peer { node, addr, stop, server }
}

struct Cluster {
    peers: BTreeMap<u64, Peer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes, each on its own listener, and initializes them as one cluster.
    async fn start(n: u64, tune: impl Fn(&mut keel::Config)) -> Cluster {
        support::init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut peers = BTreeMap::new();
        for id in 1..=n {
            peers.insert(id, start_peer(id, dir.path(), &tune).await);
        }
        let members = peers.iter().map(|(id, p)| (*id, p.info())).collect();
        peers[&1].node.initialize(members).await.expect("initialize");
        Cluster { peers, _dir: dir }
    }

    fn node(&self, id: u64) -> &Node<Ledger> {
        &self.peers[&id].node
    }

    async fn leader(&self) -> u64 {
        self.node(1).wait_for_leader(WAIT, None).await.expect("leader elected")
    }

    /// Waits until every node applied `index`, checks and returns each node's ledger.
    async fn converge(&self, index: u64) -> BTreeMap<u64, Vec<u64>> {
        let mut out = BTreeMap::new();
        for (id, p) in &self.peers {
            p.node.wait_applied(index, WAIT).await.expect("caught up");
            let (rows, count, sum) = p.node.read_local(|_, t| read_ledger(t)).expect("read");
            check_ledger(&rows, count, sum);
            out.insert(*id, rows);
        }
        out
    }

    async fn shutdown(self) {
        for (_, p) in self.peers {
            p.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_over_grpc() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let mut last = 0;
    for i in 0..100 {
        let (seq, index) = c.node(leader).propose_indexed(Append(i)).await.expect("propose");
        assert_eq!(i, seq);
        last = index;
    }
    let all = c.converge(last).await;
    for rows in all.values() {
        assert_eq!(&(0..100).collect::<Vec<_>>(), rows);
    }
    let (rows, _, _) = c.node(leader).read(|_, t| read_ledger(t)).await.expect("linearizable read");
    assert_eq!((0..100).collect::<Vec<_>>(), rows);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_forward_writes_reads_and_admin_to_the_leader() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let followers: Vec<u64> = c.peers.keys().copied().filter(|&id| id != leader).collect();
    for (i, &f) in followers.iter().cycle().take(20).enumerate() {
        let (seq, _) = c.node(f).propose_indexed(Append(i as u64)).await.expect("forwarded propose");
        assert_eq!(i as u64, seq, "each forwarded command is applied exactly once, in order");
        let (rows, _, _) = c.node(f).read(|_, t| read_ledger(t)).await.expect("follower read");
        assert_eq!(i + 1, rows.len(), "node {f} reads its own write linearizably");
    }
    // Membership changes from a follower reach the leader too.
    let dir = tempfile::tempdir().expect("temp dir");
    let learner = start_peer(4, dir.path(), &|_| {}).await;
    c.node(followers[0]).add_learner(4, learner.info(), true).await.expect("forwarded add_learner");
    let m = c.node(leader).metrics();
    assert!(m.membership_config.membership().get_node(&4).is_some(), "learner 4 is a member");
    c.node(followers[1]).transfer_leader(followers[0]).await.expect("forwarded transfer");
    assert_eq!(Some(followers[0]), c.node(leader).leader(), "leadership moved as asked");
    learner.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_node_catches_up_by_snapshot_over_grpc() {
    let tune = |c: &mut keel::Config| {
        c.raft.snapshot_every = 50;
        c.raft.logs_to_keep_after_snapshot = 10;
    };
    let mut c = Cluster::start(2, tune).await;
    let leader = c.leader().await;
    let mut last = 0;
    for i in 0..400 {
        last = c.node(leader).propose_indexed(Append(i)).await.expect("propose").1;
    }
    // The leader snapshotted and purged its log: a new node can only start from a snapshot.
    c.node(leader)
        .wait_for(WAIT, "leader purged its log", |m| m.purged.is_some_and(|p| p.index > 100))
        .await
        .expect("snapshot and purge on the leader");

    let new = start_peer(3, c._dir.path(), &tune).await;
    let info = new.info();
    c.peers.insert(3, new);
    c.node(leader).add_learner(3, info, true).await.expect("add learner");
    c.node(leader).change_membership([1, 2, 3].into()).await.expect("promote to voter");
    let (_, index) = c.node(leader).propose_indexed(Append(400)).await.expect("propose in 3-node cluster");
    last = last.max(index);

    let all = c.converge(last).await;
    assert_eq!(all[&3], (0..=400).collect::<Vec<_>>());
    assert!(all.values().all(|r| r == &all[&3]), "replicas diverge");
    let snap = c.node(3).metrics().snapshot.expect("node 3 installed a snapshot");
    assert!(snap.index > 100, "node 3 started from the leader's snapshot, got {snap:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misaddressed_and_malformed_messages_are_refused() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let follower = *c.peers.keys().find(|&&id| id != leader).expect("a follower");
    let addr = c.peers[&follower].addr;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connect");
    let mut client = RaftPeerClient::new(channel);

    // A real vote request, so only the addressing is wrong.
    let vote_req =
        openraft::raft::VoteRequest::<keel::types::KeelTypes>::new(c.node(follower).metrics().vote, None);
    let payload = keel::codec::to_bytes(&vote_req).expect("encode");

    let wrong_id = follower + 10;
    let status = client
        .vote(PeerRequest {
            target_id: wrong_id,
            cluster: CLUSTER.into(),
            payload: payload.clone(),
            from_id: 1,
        })
        .await
        .expect_err("wrong target id is refused");
    assert_eq!(tonic::Code::FailedPrecondition, status.code(), "{status:?}");
    let msg = status.message();
    assert!(msg.contains(&format!("node {follower}")) && msg.contains(&format!("node {wrong_id}")), "{msg}");
    assert!(msg.contains("ensure connection to the correct node"), "{msg}");

    let status = client
        .append_entries(PeerRequest {
            target_id: follower,
            cluster: "other".into(),
            payload: payload.clone(),
            from_id: 1,
        })
        .await
        .expect_err("wrong cluster is refused");
    assert_eq!(tonic::Code::FailedPrecondition, status.code(), "{status:?}");
    let msg = status.message();
    assert!(msg.contains(&format!("{CLUSTER:?}")) && msg.contains("\"other\""), "{msg}");

    let status = client
        .append_entries(PeerRequest {
            target_id: follower,
            cluster: CLUSTER.into(),
            payload: vec![0xff; 7],
            from_id: 1,
        })
        .await
        .expect_err("garbage payload is refused");
    assert_eq!(tonic::Code::InvalidArgument, status.code(), "{status:?}");

    // On the replication stream, a refused request is the stream's last word.
    for (target_id, payload, code) in [
        (wrong_id, payload.clone(), tonic::Code::FailedPrecondition),
        (follower, vec![0xff; 7], tonic::Code::InvalidArgument),
    ] {
        let request = PeerRequest { target_id, cluster: CLUSTER.into(), payload, from_id: 1 };
        let mut replies = client
            .stream_append(futures_util::stream::iter(vec![request]))
            .await
            .expect("the stream opens")
            .into_inner();
        let status = replies.message().await.expect_err("the request is refused");
        assert_eq!(code, status.code(), "{status:?}");
    }

    // The cluster keeps working, through the follower that saw the bad requests.
    let (_, index) = c.node(leader).propose_indexed(Append(1)).await.expect("propose after bad requests");
    c.converge(index).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_and_restart_on_the_same_address() {
    let mut c = Cluster::start(3, |_| {}).await;
    let first = c.leader().await;
    for i in 0..50 {
        c.node(first).propose(Append(i)).await.expect("propose");
    }
    let old = c.peers.remove(&first).expect("running");
    let addr = old.addr;
    old.shutdown().await;

    // The others find the old leader's address refusing connections, and elect a new leader.
    let any = *c.peers.keys().next().expect("a live node");
    let second = c.node(any).wait_for_leader(WAIT, Some(first)).await.expect("new leader");
    let mut last = 0;
    for i in 50..100 {
        last = c.node(second).propose_indexed(Append(i)).await.expect("propose on new leader").1;
    }

    // The old leader restarts from its data dir on its old address; the peers' lazy channels
    // reconnect on their own.
    let listener = TcpListener::bind(addr).await.expect("rebind the old address");
    let node = Node::start(test_config(first, &c._dir.path().join(format!("n{first}"))), Ledger, {
        GrpcNetwork::new(CLUSTER, first)
    })
    .await
    .expect("node restarts");
    let (stop, stopped) = oneshot::channel::<()>();
    let server =
        tokio::spawn(grpc::serve(listener, PeerServer::new(CLUSTER, first, node.service()), async {
            let _ = stopped.await;
        }));
    c.peers.insert(first, Peer { node, addr, stop, server });

    let all = c.converge(last).await;
    for rows in all.values() {
        assert_eq!(&(0..100).collect::<Vec<_>>(), rows);
    }
    c.shutdown().await;
}

#[tokio::test]
async fn bad_or_dead_addresses_are_unreachable() {
    use keel::openraft::errors::RPCError;
    use keel::openraft::network::v2::RaftNetworkV2;
    use keel::openraft::network::RPCOption;
    use keel::openraft::network::RaftNetworkFactory;
    use keel::openraft::raft::VoteRequest;
    use keel::types::KeelTypes;

    let req = || VoteRequest::<KeelTypes>::new(keel::types::Vote::new(1, 1), None);
    let option = RPCOption::new(std::time::Duration::from_secs(5));
    let mut network = GrpcNetwork::new(CLUSTER, 1);

    // No address at all: an invalid URI, refused without connecting.
    let mut conn = network.new_client(2, &NodeInfo::default()).await;
    let err = conn.vote(req(), option.clone()).await.expect_err("no address");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

    // A port nobody listens on: connection refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut conn = network.new_client(2, &NodeInfo::new(addr.to_string(), "")).await;
    let err = conn.vote(req(), option).await.expect_err("nobody listens");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
}

/// A fake node that records the snapshot chunks it receives; with an `append_delay`, it accepts
/// every AppendEntries that long after it arrived (a slow link); otherwise it is stopped.
#[derive(Default)]
struct SnapshotSink {
    chunks: std::sync::Mutex<Vec<usize>>,
    append_delay: Option<std::time::Duration>,
}

impl keel::network::RaftService for SnapshotSink {
    fn append_entries(
        &self,
        _: openraft::raft::AppendEntriesRequest<keel::types::KeelTypes>,
    ) -> keel::network::BoxFuture<
        '_,
        Result<openraft::raft::AppendEntriesResponse<keel::types::KeelTypes>, keel::network::ServiceError>,
    > {
        let delay = self.append_delay;
        Box::pin(async move {
            match delay {
                Some(d) => {
                    tokio::time::sleep(d).await;
                    Ok(openraft::raft::AppendEntriesResponse::Success)
                }
                None => Err(keel::network::ServiceError::Stopped("fake node".into())),
            }
        })
    }

    fn forward(
        &self,
        _: keel::NodeId,
        _: keel::forward::ForwardRequest,
    ) -> keel::network::BoxFuture<'_, Result<keel::forward::ForwardReply, keel::network::ServiceError>> {
        Box::pin(async { Err(keel::network::ServiceError::Stopped("fake node".into())) })
    }

    fn vote(
        &self,
        _: openraft::raft::VoteRequest<keel::types::KeelTypes>,
    ) -> keel::network::BoxFuture<
        '_,
        Result<openraft::raft::VoteResponse<keel::types::KeelTypes>, keel::network::ServiceError>,
    > {
        Box::pin(async { Err(keel::network::ServiceError::Stopped("fake node".into())) })
    }

    fn pre_vote(
        &self,
        _: openraft::raft::VoteRequest<keel::types::KeelTypes>,
    ) -> keel::network::BoxFuture<
        '_,
        Result<openraft::raft::VoteResponse<keel::types::KeelTypes>, keel::network::ServiceError>,
    > {
        Box::pin(async { Err(keel::network::ServiceError::Stopped("fake node".into())) })
    }

    fn install_snapshot(
        &self,
        vote: keel::types::Vote,
        _meta: keel::types::SnapshotMeta,
        mut chunks: keel::network::SnapshotChunks,
    ) -> keel::network::BoxFuture<
        '_,
        Result<openraft::raft::SnapshotResponse<keel::types::KeelTypes>, keel::network::ServiceError>,
    > {
        Box::pin(async move {
            use futures_util::StreamExt;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| keel::network::ServiceError::Snapshot(e.to_string()))?;
                self.chunks.lock().expect("lock").push(chunk.len());
            }
            Ok(openraft::raft::SnapshotResponse::new(vote))
        })
    }

    fn transfer_leader(
        &self,
        _: openraft::raft::TransferLeaderRequest<keel::types::KeelTypes>,
    ) -> keel::network::BoxFuture<
        '_,
        Result<openraft::raft::TransferLeaderResponse<keel::types::KeelTypes>, keel::network::ServiceError>,
    > {
        Box::pin(async { Err(keel::network::ServiceError::Stopped("fake node".into())) })
    }
}

/// Log id `index` of term 1's leader, node 1.
fn log_id(index: u64) -> keel::types::LogId {
    openraft::testing::log_id::<keel::types::KeelTypes>(1, 1, index)
}

/// An AppendEntries of leader 1 in term 1 after `prev`, with a command of `size` bytes per entry
/// for `indexes`.
fn append(
    prev: Option<u64>,
    indexes: impl IntoIterator<Item = u64>,
    size: usize,
) -> openraft::raft::AppendEntriesRequest<keel::types::KeelTypes> {
    use keel::types::Command;
    use keel::types::Entry;
    use keel::types::EntryPayload;
    let entries = indexes
        .into_iter()
        .map(|i| Entry { log_id: log_id(i), payload: EntryPayload::Normal(Command(vec![7; size])) })
        .collect();
    openraft::raft::AppendEntriesRequest {
        vote: keel::types::Vote::new_committed(1, 1),
        prev_log_id: prev.map(log_id),
        entries,
        leader_commit: None,
    }
}

/// Streams `requests` to `follower` as node 1 and collects the replies, none of which may be a
/// transport error.
async fn stream_to(
    follower: &Peer,
    requests: Vec<openraft::raft::AppendEntriesRequest<keel::types::KeelTypes>>,
) -> Vec<openraft::raft::StreamAppendResult<keel::types::KeelTypes>> {
    use keel::openraft::network::v2::RaftNetworkV2;
    use keel::openraft::network::RPCOption;
    use keel::openraft::network::RaftNetworkFactory;

    let mut conn = GrpcNetwork::new(CLUSTER, 1).new_client(2, &follower.info()).await;
    let option = RPCOption::new(std::time::Duration::from_secs(5));
    let replies =
        conn.stream_append(futures_util::stream::iter(requests), option).await.expect("stream opens");
    let replies: Vec<_> = futures_util::StreamExt::collect(replies).await;
    replies.into_iter().map(|r| r.expect("no transport error")).collect()
}

/// The replication stream over gRPC to a real node: a request larger than one message's worth
/// travels in pieces, and each request gets exactly one reply, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_stream_answers_each_request_once_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let follower = start_peer(2, dir.path(), &|_| {}).await;
    // Entry 0, then three entries of 700 KB (more than one message may carry: three pieces),
    // then a request with no entries (as a commit update is).
    let big = 700 << 10;
    assert!(2 * big > grpc::MAX_APPEND_BYTES, "the second request must be cut into pieces");
    let requests = vec![append(None, 0..=0, 10), append(Some(0), 1..=3, big), append(Some(3), [], 0)];
    let replies = stream_to(&follower, requests).await;
    assert_eq!(vec![Ok(Some(log_id(0))), Ok(Some(log_id(3))), Ok(Some(log_id(3)))], replies);

    let m = follower.node.metrics();
    assert_eq!(Some(3), m.last_log_index, "the follower stored every piece");
    follower.shutdown().await;
}

/// A follower that refuses a request (its log does not hold the request's predecessor) answers
/// it with the conflict, and the stream ends there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_stream_ends_at_a_conflict() {
    use keel::openraft::raft::StreamAppendError;

    let dir = tempfile::tempdir().expect("temp dir");
    let follower = start_peer(2, dir.path(), &|_| {}).await;
    let requests = vec![append(None, 0..=1, 10), append(Some(5), 6..=6, 10), append(Some(1), 2..=2, 10)];
    let replies = stream_to(&follower, requests).await;
    assert_eq!(vec![Ok(Some(log_id(1))), Err(StreamAppendError::Conflict(log_id(5)))], replies);
    follower.shutdown().await;
}

/// Stopping a peer server ends the replication streams open to it: a leader keeps its stream
/// open, and the server's graceful shutdown, which waits for requests in flight, must not wait
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_server_ends_open_replication_streams() {
    use futures_util::StreamExt;
    use keel::openraft::network::v2::RaftNetworkV2;
    use keel::openraft::network::RPCOption;
    use keel::openraft::network::RaftNetworkFactory;

    let dir = tempfile::tempdir().expect("temp dir");
    let follower = start_peer(2, dir.path(), &|_| {}).await;
    let mut conn = GrpcNetwork::new(CLUSTER, 1).new_client(2, &follower.info()).await;
    // One request, then the stream stays open, as a leader's does between writes.
    let requests =
        futures_util::stream::iter(vec![append(None, 0..=0, 10)]).chain(futures_util::stream::pending());
    let option = RPCOption::new(std::time::Duration::from_secs(5));
    let mut replies = conn.stream_append(Box::pin(requests), option).await.expect("stream opens");
    let first = replies.next().await.expect("a reply").expect("no transport error");
    assert_eq!(Ok(Some(log_id(0))), first);

    let Peer { node, stop, server, .. } = follower;
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("the server stops without waiting for the open stream")
        .expect("server task")
        .expect("server stops cleanly");
    let end =
        tokio::time::timeout(std::time::Duration::from_secs(5), replies.next()).await.expect("stream ends");
    assert!(!matches!(end, Some(Ok(_))), "no reply after the server stopped: {end:?}");
    node.shutdown().await.expect("clean node shutdown");
}

/// On a link whose round trip is longer than the deadline openraft gives an AppendEntries (its
/// heartbeat interval), entries are still delivered and acknowledged: the call is given the
/// append timeout. Without that, nothing could commit over such a link. A heartbeat keeps the
/// short deadline.
#[tokio::test]
async fn entries_are_acknowledged_over_a_link_slower_than_the_heartbeat() {
    use keel::openraft::errors::RPCError;
    use keel::openraft::network::v2::RaftNetworkV2;
    use keel::openraft::network::RPCOption;
    use keel::openraft::network::RaftNetworkFactory;
    use keel::openraft::raft::AppendEntriesRequest;
    use keel::types::Entry;
    use keel::types::EntryPayload;
    use std::time::Duration;

    let slow = std::sync::Arc::new(SnapshotSink {
        append_delay: Some(Duration::from_millis(300)),
        ..SnapshotSink::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(grpc::serve(listener, PeerServer::new(CLUSTER, 2, slow), async {
        let _ = stopped.await;
    }));

    let mut network = GrpcNetwork::new(CLUSTER, 1).with_append_timeout(Duration::from_secs(5));
    let mut conn = network.new_client(2, &NodeInfo::new(addr.to_string(), "")).await;
    let heartbeat_interval = RPCOption::new(Duration::from_millis(100));
    let vote = keel::types::Vote::new(1, 1);
    let entry = Entry {
        log_id: openraft::testing::log_id::<keel::types::KeelTypes>(1, 1, 1),
        payload: EntryPayload::Blank,
    };
    let with_entries =
        AppendEntriesRequest { vote, prev_log_id: None, entries: vec![entry], leader_commit: None };
    let reply = conn.append_entries(with_entries, heartbeat_interval.clone()).await;
    assert!(matches!(reply, Ok(openraft::raft::AppendEntriesResponse::Success)), "{reply:?}");

    let heartbeat = AppendEntriesRequest { vote, prev_log_id: None, entries: vec![], leader_commit: None };
    let err =
        conn.append_entries(heartbeat, heartbeat_interval.clone()).await.expect_err("a heartbeat times out");
    assert!(matches!(err, RPCError::Timeout(_)), "{err:?}");

    // The replication stream gives each request the same time.
    let stream = |n: u64| {
        let requests: Vec<_> = (0..n).map(|i| append(i.checked_sub(1), i..=i, 10)).collect();
        futures_util::stream::iter(requests)
    };
    let replies = conn.stream_append(stream(2), heartbeat_interval.clone()).await.expect("stream opens");
    let replies: Vec<_> = futures_util::StreamExt::collect(replies).await;
    assert!(matches!(replies[..], [Ok(Ok(_)), Ok(Ok(_))]), "{replies:?}");
    // With a floor below the link's delay, the stalled stream ends with a timeout.
    let mut hasty = GrpcNetwork::new(CLUSTER, 1).with_append_timeout(Duration::from_millis(50));
    let mut conn = hasty.new_client(2, &NodeInfo::new(addr.to_string(), "")).await;
    let replies = conn.stream_append(stream(2), heartbeat_interval).await.expect("stream opens");
    let replies: Vec<_> = futures_util::StreamExt::collect(replies).await;
    assert!(matches!(replies[..], [Err(RPCError::Timeout(_))]), "{replies:?}");

    let _ = stop.send(());
    server.await.expect("server task").expect("server stops cleanly");
}

#[tokio::test]
async fn snapshot_stream_is_checked_chunk_by_chunk() {
    use keel::network::grpc::proto::snapshot_chunk::Item;
    use keel::network::grpc::proto::SnapshotChunk;
    use keel::network::grpc::proto::SnapshotHeader;
    use keel::network::SNAPSHOT_CHUNK_BYTES;

    let sink = std::sync::Arc::new(SnapshotSink::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(grpc::serve(listener, PeerServer::new(CLUSTER, 7, sink.clone()), async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connect");
    let mut client = RaftPeerClient::new(channel).max_encoding_message_size(4 * SNAPSHOT_CHUNK_BYTES);

    let vote = keel::types::Vote::new(3, 1);
    let meta = keel::types::SnapshotMeta { last_log_id: None, last_membership: Default::default() };
    let header = |target_id| SnapshotChunk {
        item: Some(Item::Header(SnapshotHeader {
            target_id,
            cluster: CLUSTER.into(),
            vote: keel::codec::to_bytes(&vote).expect("encode"),
            meta: keel::codec::to_bytes(&meta).expect("encode"),
        })),
    };
    let data = |n| SnapshotChunk { item: Some(Item::Data(vec![7u8; n])) };

    // A header and three chunks arrive in order, as a stream.
    let msgs = vec![header(7), data(SNAPSHOT_CHUNK_BYTES), data(SNAPSHOT_CHUNK_BYTES), data(10)];
    let reply = client.install_snapshot(futures_util::stream::iter(msgs)).await.expect("snapshot accepted");
    let resp: openraft::raft::SnapshotResponse<keel::types::KeelTypes> =
        keel::codec::from_bytes(&reply.into_inner().payload).expect("decode reply");
    assert_eq!(vote, resp.vote);
    assert_eq!(vec![SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNK_BYTES, 10], *sink.chunks.lock().expect("lock"));

    // Wrong recipient, missing header, oversized chunk: refused, the stream is not installed.
    let status = client.install_snapshot(futures_util::stream::iter(vec![header(8), data(1)])).await;
    assert_eq!(tonic::Code::FailedPrecondition, status.expect_err("wrong node").code());
    let status = client.install_snapshot(futures_util::stream::iter(vec![data(1)])).await;
    assert_eq!(tonic::Code::InvalidArgument, status.expect_err("no header").code());
    let msgs = vec![header(7), data(SNAPSHOT_CHUNK_BYTES + 1)];
    let status = client.install_snapshot(futures_util::stream::iter(msgs)).await;
    assert_eq!(tonic::Code::DataLoss, status.expect_err("oversized chunk").code());

    // A stopped node answers Unavailable.
    let payload =
        keel::codec::to_bytes(&openraft::raft::VoteRequest::<keel::types::KeelTypes>::new(vote, None))
            .expect("encode");
    let status =
        client.vote(PeerRequest { target_id: 7, cluster: CLUSTER.into(), payload, from_id: 1 }).await;
    assert_eq!(tonic::Code::Unavailable, status.expect_err("stopped").code());

    let _ = stop.send(());
    server.await.expect("server task").expect("server stops cleanly");
}

/// A peer of a version before the replication stream: serves every `RaftPeer` call but
/// `StreamAppend`, which it answers "unimplemented", as tonic does for an unknown method.
#[derive(Clone)]
struct WithoutStreaming(grpc::proto::raft_peer_server::RaftPeerServer<PeerServer>);

impl tonic::server::NamedService for WithoutStreaming {
    const NAME: &'static str = "keel.peer.v1.RaftPeer";
}

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for WithoutStreaming {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path().ends_with("/StreamAppend") {
            return Box::pin(async { Ok(tonic::Status::unimplemented("no such method").into_http()) });
        }
        let mut inner = self.0.clone();
        Box::pin(async move { inner.call(req).await })
    }
}

/// Replicating to a peer that lacks the stream (an older version, during a rolling upgrade):
/// after its "unimplemented", the connection sends AppendEntries one call at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_without_the_stream_is_replicated_to_call_by_call() {
    use keel::openraft::errors::RPCError;
    use keel::openraft::network::v2::RaftNetworkV2;
    use keel::openraft::network::RPCOption;
    use keel::openraft::network::RaftNetworkFactory;

    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(test_config(2, &dir.path().join("n2")), Ledger, GrpcNetwork::new(CLUSTER, 2))
        .await
        .expect("node starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let old = WithoutStreaming(PeerServer::new(CLUSTER, 2, node.service()).into_service());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(old).serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }),
    );

    let mut conn = GrpcNetwork::new(CLUSTER, 1).new_client(2, &NodeInfo::new(addr.to_string(), "")).await;
    let option = RPCOption::new(std::time::Duration::from_secs(5));
    // A lone request (openraft's heartbeats come one to an input) travels as a call: no stream.
    let lone = vec![append(None, 0..=0, 10)];
    let replies = conn.stream_append(futures_util::stream::iter(lone), option.clone()).await.expect("a call");
    let replies: Vec<_> = futures_util::StreamExt::collect(replies).await;
    let replies: Vec<_> = replies.into_iter().map(|r| r.expect("no transport error")).collect();
    assert_eq!(vec![Ok(Some(log_id(0)))], replies);

    // More than one: a stream, which this peer refuses.
    let first = vec![append(None, 0..=0, 10), append(Some(0), 1..=1, 10)];
    let err = conn
        .stream_append(futures_util::stream::iter(first), option.clone())
        .await
        .err()
        .expect("the stream is refused");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

    let requests = vec![append(None, 0..=0, 10), append(Some(0), 1..=2, 10)];
    let replies =
        conn.stream_append(futures_util::stream::iter(requests), option).await.expect("call by call");
    let replies: Vec<_> = futures_util::StreamExt::collect(replies).await;
    let replies: Vec<_> = replies.into_iter().map(|r| r.expect("no transport error")).collect();
    assert_eq!(vec![Ok(Some(log_id(0))), Ok(Some(log_id(2)))], replies);
    assert_eq!(Some(2), node.metrics().last_log_index);

    let _ = stop.send(());
    server.await.expect("server task").expect("server stops cleanly");
    node.shutdown().await.expect("clean node shutdown");
}
