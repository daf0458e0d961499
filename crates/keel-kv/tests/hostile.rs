//! A hostile peer: messages forged on the peer port of a real 3-node keeld cluster, each of which
//! broke a cluster before the edge checks (`keel::network::guard`, the leader's command checks).
//!
//! After every attack the cluster must still have one leader, serve writes and linearizable
//! reads on every node, hold every write acknowledged before, keep its term where no real
//! election moved it, and keep each node's memory under a budget. The client-port side (idle and
//! slow connections, huge ranges) and disk full are covered by their own test files.

mod procs;

use std::collections::BTreeMap;
use std::time::Duration;
use std::time::Instant;

use keel::forward::ForwardFailure;
use keel::forward::ForwardReply;
use keel::forward::ForwardRequest;
use keel::network::grpc::proto::raft_peer_client::RaftPeerClient;
use keel::network::grpc::proto::snapshot_chunk::Item;
use keel::network::grpc::proto::PeerRequest;
use keel::network::grpc::proto::SnapshotChunk;
use keel::network::grpc::proto::SnapshotHeader;
use keel::openraft::raft::AppendEntriesRequest;
use keel::openraft::raft::VoteRequest;
use keel::openraft::vote::RaftLeaderId;
use keel::types::Command;
use keel::types::KeelTypes;
use keel::types::LogId;
use keel::types::Vote;
use keel_kv::store::KvCommand;
use keel_kv::store::Put;
use procs::assert_all_present;
use procs::http;
use procs::wait_until;
use procs::Procs;
use procs::DEADLINE;
use tonic::transport::Channel;

const CONFIG: &str = "
max_snapshot_bytes = 16777216
[raft]
heartbeat_interval_ms = 100
election_timeout_min_ms = 500
election_timeout_max_ms = 1000
";
const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
const ALL: [u64; 3] = [1, 2, 3];
const CLUSTER: &str = "keel";
/// A node id that is no member of the cluster.
const STRANGER: u64 = 99;
/// What a debug-built keeld may use after any attack (it idles at ~30 MB).
const RSS_BUDGET_BYTES: u64 = 400 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn peer(c: &Procs, id: u64) -> RaftPeerClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", c.node(id).peer))
        .expect("a peer URL")
        .connect()
        .await
        .expect("connect to the peer port");
    RaftPeerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

fn request(target: u64, from: u64, payload: &impl serde::Serialize) -> PeerRequest {
    let payload = keel::codec::to_bytes(payload).expect("encodes");
    PeerRequest { target_id: target, cluster: CLUSTER.into(), payload, from_id: from }
}

fn vote(term: u64, node: u64) -> Vote {
    Vote::new(term, node)
}

fn log_id(term: u64, node: u64, index: u64) -> LogId {
    let leader = <keel::openraft::alias::LeaderIdOf<KeelTypes> as RaftLeaderId>::new(term, node);
    LogId::new(leader.to_committed(), index)
}

/// A status field of node `id`.
fn status_u64(c: &Procs, id: u64, field: &str) -> u64 {
    let st = wait_until(&format!("status of node {id}"), DEADLINE, || c.status(id));
    st[field].as_u64().unwrap_or_else(|| panic!("node {id} has no {field}: {st}"))
}

/// Each node's term.
fn terms(c: &Procs) -> BTreeMap<u64, u64> {
    ALL.iter().map(|&id| (id, status_u64(c, id, "term"))).collect()
}

/// The cluster survived: every node runs within its memory budget, one leader is named by all,
/// a write through every node is acknowledged, and every node serves every acknowledged write in
/// a linearizable read.
#[track_caller]
fn assert_serving(c: &mut Procs, acked: &mut BTreeMap<String, String>, round: &str) {
    for id in ALL {
        if let Some(status) = c.exited(id) {
            panic!("after {round}: keeld {id} exited: {status}");
        }
        let rss = procs::proc_status_bytes(c.pid(id), "VmRSS");
        assert!(rss < RSS_BUDGET_BYTES, "after {round}: keeld {id} uses {} MiB", rss >> 20);
    }
    c.wait_leader(&ALL, DEADLINE);
    for id in ALL {
        let (key, value) = (format!("hostile/{round}/{id}"), format!("v{id}"));
        wait_until(&format!("a write through node {id} after {round}"), DEADLINE, || {
            match http(&c.client(id), "PUT", &format!("/v1/kv/{key}"), value.as_bytes(), DEADLINE)? {
                (200, _) => Ok(()),
                (code, body) => Err(format!("{code} {body}")),
            }
        });
        acked.insert(key, value);
    }
    for id in ALL {
        assert_all_present(c, id, "hostile/", acked, false);
    }
}

/// The term every node holds stays at `before` for three election timeouts: nothing the attack
/// did started an election or moved leadership.
#[track_caller]
fn assert_term_holds(c: &Procs, before: &BTreeMap<u64, u64>, leader: u64) {
    let until = Instant::now() + 3 * ELECTION_TIMEOUT;
    while Instant::now() < until {
        assert_eq!(before, &terms(c), "an election happened");
        assert_eq!(
            Some(leader),
            c.status(leader).ok().and_then(|s| s["leader"].as_u64()),
            "leadership moved"
        );
        std::thread::sleep(Duration::from_millis(100)); // sampling the window, not synchronizing
    }
}

fn followers(leader: u64) -> Vec<u64> {
    ALL.into_iter().filter(|&id| id != leader).collect()
}

#[test]
fn forward_writes_that_do_not_decode_or_break_the_limits_are_refused() {
    let mut c = Procs::start(3, 0, CONFIG);
    let mut acked = BTreeMap::new();
    assert_serving(&mut c, &mut acked, "start");
    let leader = c.wait_leader(&ALL, DEADLINE);
    let member = followers(leader)[0];
    let rt = runtime();
    let mut client = rt.block_on(peer(&c, leader));

    let put = |key: Vec<u8>, value: Vec<u8>| {
        let cmd = KvCommand::Put(Put { key, value, ..Put::default() });
        Command(keel::codec::to_bytes(&cmd).expect("encodes"))
    };
    // KvCommand::Txn, then 500,000 levels of "no compares, one success op: a txn" (under the size
    // limit).
    let mut deep = vec![2u8];
    for _ in 0..500_000 {
        deep.extend_from_slice(&[0, 1, 3]);
    }
    let refused = [
        ("bytes that are no command", Command(vec![0xff; 16]), "does not decode"),
        ("a 100 KiB key", put(vec![b'k'; 100 << 10], b"v".to_vec()), "key is 102400 bytes"),
        ("a value over the command limit", put(b"k".to_vec(), vec![0; 2560 << 10]), "max_command_bytes"),
        ("a txn nested 500,000 deep", Command(deep), "does not decode"),
    ];
    for (what, cmd, why) in refused {
        let reply = rt
            .block_on(client.forward(request(leader, member, &ForwardRequest::Write(cmd))))
            .unwrap_or_else(|s| panic!("{what}: the leader answers, got {s:?}"));
        let reply: ForwardReply = keel::codec::from_bytes(&reply.into_inner().payload).expect("decodes");
        match reply {
            ForwardReply::Failed(ForwardFailure::Invalid(m)) => assert!(m.contains(why), "{what}: {m}"),
            other => panic!("{what} must be refused before it is proposed, got {other:?}"),
        }
    }
    // Larger than any peer message: refused by the transport before it is read whole.
    let huge = ForwardRequest::Write(put(b"k".to_vec(), vec![0; 20 << 20]));
    let status = rt.block_on(client.forward(request(leader, member, &huge))).expect_err("too large");
    assert!(matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{status:?}");
    // From a node that is no member: refused whatever it carries.
    let ok = ForwardRequest::Write(put(b"hostile/x".to_vec(), b"y".to_vec()));
    let status = rt.block_on(client.forward(request(leader, STRANGER, &ok))).expect_err("not a member");
    assert_eq!(tonic::Code::PermissionDenied, status.code(), "{status:?}");
    assert_serving(&mut c, &mut acked, "forwards");

    // Nothing poisonous reached the log: the whole cluster restarts and serves.
    c.kill_and_restart_all();
    assert_serving(&mut c, &mut acked, "restart");
}

#[test]
fn forged_votes_neither_wrap_the_term_nor_move_leadership() {
    let mut c = Procs::start(3, 0, CONFIG);
    let mut acked = BTreeMap::new();
    assert_serving(&mut c, &mut acked, "start");
    let leader = c.wait_leader(&ALL, DEADLINE);
    let member = followers(leader)[0];
    let before = terms(&c);
    let rt = runtime();

    for id in ALL {
        let mut client = rt.block_on(peer(&c, id));
        // The term at the top of the range: granted, the next election would wrap it to 0.
        let mut top =
            VoteRequest::<KeelTypes>::new(vote(u64::MAX, member), Some(log_id(u64::MAX, member, u64::MAX)));
        top.leadership_transfer = true;
        let status = rt.block_on(client.vote(request(id, member, &top))).expect_err("out of reach");
        assert_eq!(tonic::Code::PermissionDenied, status.code(), "node {id}: {status:?}");
        assert!(status.message().contains("no real election reaches it"), "{status:?}");
        let status = rt.block_on(client.pre_vote(request(id, member, &top))).expect_err("out of reach");
        assert_eq!(tonic::Code::PermissionDenied, status.code(), "node {id}: {status:?}");

        // A reachable term from a member, claiming a leadership transfer the leader never
        // announced: judged as an ordinary vote, which the leader lease refuses.
        let term = before[&id] + 1;
        let mut forged =
            VoteRequest::<KeelTypes>::new(vote(term, member), Some(log_id(term, member, u64::MAX >> 1)));
        forged.leadership_transfer = true;
        if id != member {
            let reply = rt.block_on(client.vote(request(id, member, &forged))).expect("judged by raft");
            let reply: keel::openraft::raft::VoteResponse<KeelTypes> =
                keel::codec::from_bytes(&reply.into_inner().payload).expect("decodes");
            assert!(
                !reply.is_granted_to(&forged.vote),
                "node {id} granted a forged transfer vote: {reply:?}"
            );
        }

        // From a node that is no member: refused before raft sees it.
        let stranger = VoteRequest::<KeelTypes>::new(vote(before[&id] + 1, STRANGER), None);
        let status = rt.block_on(client.vote(request(id, STRANGER, &stranger))).expect_err("stranger");
        assert_eq!(tonic::Code::PermissionDenied, status.code(), "{status:?}");
    }
    assert_term_holds(&c, &before, leader);
    assert_serving(&mut c, &mut acked, "votes");

    // No term was stored that a restart cannot elect from.
    c.kill_and_restart_all();
    assert_serving(&mut c, &mut acked, "restart");
}

#[test]
fn a_vote_flood_from_a_non_member_changes_nothing() {
    let mut c = Procs::start(3, 0, CONFIG);
    let mut acked = BTreeMap::new();
    assert_serving(&mut c, &mut acked, "start");
    let leader = c.wait_leader(&ALL, DEADLINE);
    let before = terms(&c);
    let load = procs::Load::start(c.clients(ALL), 2, "hostile/load/");
    load.wait_more(50, DEADLINE);
    let rt = runtime();
    let refused = rt.block_on(async {
        let mut clients = Vec::new();
        for id in ALL {
            clients.push((id, peer(&c, id).await));
        }
        let mut refused = 0;
        for n in 1..=700u64 {
            for (id, client) in &mut clients {
                // A stranger that claims no entries this node lacks (one that does passes the
                // edge: this node may be the one behind; the leader lease then refuses it).
                let mut req = VoteRequest::<KeelTypes>::new(vote(before[id] + n, STRANGER), None);
                req.leadership_transfer = n % 2 == 0;
                let pre = client.pre_vote(request(*id, STRANGER, &req)).await;
                let real = client.vote(request(*id, STRANGER, &req)).await;
                for answer in [pre, real] {
                    match answer {
                        Err(s) if s.code() == tonic::Code::PermissionDenied => refused += 1,
                        other => panic!("a stranger's vote must be refused, got {other:?}"),
                    }
                }
            }
        }
        refused
    });
    assert_eq!(700 * 3 * 2, refused);
    load.wait_more(50, DEADLINE);
    assert_term_holds(&c, &before, leader);
    let report = load.stop();
    report.assert_no_failures();
    acked.extend(report.acked);
    assert_serving(&mut c, &mut acked, "flood");
}

#[test]
fn forged_append_entries_are_refused() {
    let mut c = Procs::start(3, 0, CONFIG);
    let mut acked = BTreeMap::new();
    assert_serving(&mut c, &mut acked, "start");
    let leader = c.wait_leader(&ALL, DEADLINE);
    let before = terms(&c);
    let rt = runtime();
    let garbage = || {
        let entry = keel::types::Entry {
            log_id: log_id(before[&leader], STRANGER, 1_000_000),
            payload: keel::types::EntryPayload::Normal(Command(vec![0xff; 32])),
        };
        vec![entry]
    };
    for id in followers(leader) {
        let mut client = rt.block_on(peer(&c, id));
        let cases = [
            ("from a stranger", vote(before[&id], STRANGER), STRANGER),
            ("from a member at an unreachable term", vote(u64::MAX - 1, leader), leader),
        ];
        for (what, v, from) in cases {
            let rpc = AppendEntriesRequest::<KeelTypes> {
                vote: v,
                prev_log_id: None,
                entries: garbage(),
                leader_commit: Some(log_id(v.leader_id().term(), from, 1_000_000)),
            };
            let status = rt.block_on(client.append_entries(request(id, from, &rpc))).expect_err(what);
            assert_eq!(tonic::Code::PermissionDenied, status.code(), "{what}: {status:?}");
            let stream = futures_util::stream::iter([request(id, from, &rpc)]);
            let answer = rt.block_on(async {
                let mut replies = client.stream_append(stream).await?.into_inner();
                replies.message().await
            });
            assert!(!matches!(answer, Ok(Some(_))), "{what}: a refused stream answers nothing: {answer:?}");
        }
    }
    assert_term_holds(&c, &before, leader);
    assert_serving(&mut c, &mut acked, "append-entries");
}

#[test]
fn an_install_snapshot_from_a_non_leader_writes_nothing() {
    let mut c = Procs::start(3, 0, CONFIG);
    let mut acked = BTreeMap::new();
    assert_serving(&mut c, &mut acked, "start");
    let leader = c.wait_leader(&ALL, DEADLINE);
    let target = followers(leader)[0];
    let term = status_u64(&c, leader, "term");
    let rt = runtime();
    let mut client = rt.block_on(peer(&c, target));
    let snapshots = c.node(target).data_dir.join("snapshots");
    let incoming = || -> Vec<String> {
        std::fs::read_dir(&snapshots)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|name: &String| name.starts_with("incoming"))
            .collect()
    };
    let meta = keel::types::SnapshotMeta {
        last_log_id: Some(log_id(term, leader, 1_000_000)),
        last_membership: Default::default(),
    };
    // 100 MiB of chunks after the header; the sender stops when the receiver answers.
    let send = |client: &mut RaftPeerClient<Channel>, sender: Vote| {
        let header = SnapshotHeader {
            target_id: target,
            cluster: CLUSTER.into(),
            vote: keel::codec::to_bytes(&sender).expect("encodes"),
            meta: keel::codec::to_bytes(&meta).expect("encodes"),
        };
        let chunks = std::iter::once(Item::Header(header))
            .chain((0..100).map(|_| Item::Data(vec![0x5a; 1 << 20])))
            .map(|item| SnapshotChunk { item: Some(item) });
        rt.block_on(client.install_snapshot(futures_util::stream::iter(chunks)))
    };

    let cases = [
        ("from a stranger", vote(term, STRANGER), tonic::Code::PermissionDenied),
        (
            "from a member at an older term",
            vote(term.saturating_sub(1), leader),
            tonic::Code::PermissionDenied,
        ),
        ("from a member at an unreachable term", vote(u64::MAX, leader), tonic::Code::PermissionDenied),
    ];
    for (what, sender, code) in cases {
        let status = send(&mut client, sender).expect_err(what);
        assert_eq!(code, status.code(), "{what}: {status:?}");
        assert!(incoming().is_empty(), "{what}: a refused sender left {:?}", incoming());
    }
    // The leader's own vote (anyone who can reach the port can forge it until peer TLS): the
    // transfer is cut off at max_snapshot_bytes (16 MiB here) and leaves nothing behind.
    let leader_vote = Vote::new_committed(term, leader);
    let status = send(&mut client, leader_vote).expect_err("over the size limit");
    assert!(status.message().contains("max_snapshot_bytes"), "{status:?}");
    assert!(incoming().is_empty(), "a cut-off transfer left {:?}", incoming());
    assert_serving(&mut c, &mut acked, "snapshots");
}
