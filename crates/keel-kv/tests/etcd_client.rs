//! The Rust `etcd-client` crate, unmodified, as the client of a 3-node Keel cluster: KV with etcd's
//! revision semantics, transactions, errors etcd clients recognise, cluster and maintenance calls,
//! and writes and reads through followers.

mod support;

use etcd_client::Client;
use etcd_client::Compare;
use etcd_client::CompareOp;
use etcd_client::DeleteOptions;
use etcd_client::GetOptions;
use etcd_client::PutOptions;
use etcd_client::Txn;
use etcd_client::TxnOp;
use etcd_client::TxnOpResponse;
use support::Cluster;

async fn client(c: &Cluster, id: u64) -> Client {
    Client::connect([c.endpoint(id)], None).await.expect("connect")
}

fn code(e: etcd_client::Error) -> (tonic::Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_revisions_txn_and_errors_through_any_node() {
    let c = Cluster::start(3, |_| {}).await;
    // Talk to a follower only: writes and linearizable reads are forwarded to the leader.
    let mut kv = client(&c, c.follower()).await;

    let r1 = kv.put("a", "1", None).await.expect("put a").header().expect("header").revision();
    assert_eq!(2, r1, "an empty store is at revision 1 and the first write makes 2, as in etcd");
    let r2 = kv.put("a", "2", Some(PutOptions::new().with_prev_key())).await.expect("put a again");
    assert_eq!(r1 + 1, r2.header().expect("header").revision(), "every put bumps the revision by one");
    assert_eq!(Some(&b"1"[..]), r2.prev_key().map(|kv| kv.value()), "prev_kv is the old value");
    kv.put("b", "3", None).await.expect("put b");

    let got = kv.get("a", None).await.expect("get a");
    let a = &got.kvs()[0];
    assert_eq!((r1, r1 + 1, 2, &b"2"[..]), (a.create_revision(), a.mod_revision(), a.version(), a.value()));
    let header = got.header().expect("header");
    assert_eq!(r1 + 2, header.revision(), "a read answers the store's current revision");
    assert_eq!(c.follower(), header.member_id(), "the header names the member that answered");
    assert!(header.cluster_id() != 0 && header.raft_term() >= 1);

    for k in ["p/1", "p/2", "p/3", "q"] {
        kv.put(k, k, None).await.expect("put");
    }
    let all = kv.get("p/", Some(GetOptions::new().with_prefix())).await.expect("prefix");
    assert_eq!(
        vec!["p/1", "p/2", "p/3"],
        all.kvs().iter().map(|kv| kv.key_str().expect("utf8")).collect::<Vec<_>>()
    );
    let limited = kv.get("p/", Some(GetOptions::new().with_prefix().with_limit(2))).await.expect("limit");
    assert_eq!((2, 3, true), (limited.kvs().len(), limited.count(), limited.more()));
    let counted = kv.get("p/", Some(GetOptions::new().with_prefix().with_count_only())).await.expect("count");
    assert_eq!((0, 3), (counted.kvs().len(), counted.count()));
    let keys = kv.get("p/", Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("keys");
    assert!(keys.kvs().iter().all(|kv| kv.value().is_empty()), "keys_only answers no values");
    let stale_ok = kv.get("a", Some(GetOptions::new().with_serializable())).await.expect("serializable");
    assert_eq!(1, stale_ok.kvs().len());

    // Transactions: compare on value / version / mod revision; then either branch.
    let txn = Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "2"), Compare::version("b", CompareOp::Greater, 0)])
        .and_then([TxnOp::put("a", "3", None), TxnOp::get("a", None)])
        .or_else([TxnOp::put("failed", "yes", None)]);
    let t = kv.txn(txn).await.expect("txn");
    assert!(t.succeeded());
    match &t.op_responses()[1] {
        TxnOpResponse::Get(g) => {
            assert_eq!(b"3", g.kvs()[0].value(), "a read in a txn sees its earlier write")
        }
        other => panic!("expected a get response, got {other:?}"),
    }
    let txn = Txn::new()
        .when([Compare::mod_revision("a", CompareOp::Less, 1)])
        .and_then([TxnOp::put("never", "x", None)])
        .or_else([TxnOp::delete("q", None)]);
    let t = kv.txn(txn).await.expect("txn");
    assert!(!t.succeeded());
    assert!(kv.get("never", None).await.expect("get").kvs().is_empty());
    assert!(kv.get("q", None).await.expect("get").kvs().is_empty(), "the failure branch ran");

    let del =
        kv.delete("p/", Some(DeleteOptions::new().with_prefix().with_prev_key())).await.expect("delete");
    assert_eq!((3, 3), (del.deleted(), del.prev_kvs().len()));
    let before = kv.get("a", None).await.expect("get").header().expect("header").revision();
    let none = kv.delete("nothing-here", None).await.expect("delete nothing");
    assert_eq!(
        (0, before),
        (none.deleted(), none.header().expect("header").revision()),
        "a no-op delete keeps the revision"
    );

    // Errors etcd clients know, and the node keeps serving after each.
    let old =
        kv.get("a", Some(GetOptions::new().with_revision(r1))).await.expect("a read at a past revision");
    assert_eq!(b"1", old.kvs()[0].value(), "history is kept until compacted");
    kv.compact(r1 + 1, None).await.expect("compact");
    let (code_, msg) =
        code(kv.get("a", Some(GetOptions::new().with_revision(r1))).await.expect_err("old revision"));
    assert_eq!(tonic::Code::OutOfRange, code_);
    assert!(msg.contains("required revision has been compacted"), "{msg}");
    let (code_, msg) =
        code(kv.get("a", Some(GetOptions::new().with_revision(before + 100))).await.expect_err("future"));
    assert_eq!(tonic::Code::OutOfRange, code_);
    assert!(msg.contains("future revision"), "{msg}");
    let (code_, msg) =
        code(kv.put("l", "v", Some(PutOptions::new().with_lease(7))).await.expect_err("lease"));
    assert_eq!((tonic::Code::NotFound, true), (code_, msg.contains("lease not found")), "{msg}");
    let (code_, msg) = code(kv.put(vec![b'k'; 9000], "v", None).await.expect_err("key too large"));
    assert_eq!(tonic::Code::InvalidArgument, code_);
    assert!(msg.contains("key is too large"), "{msg}");
    let (code_, msg) =
        code(kv.put("big", vec![0u8; 1600 * 1024], None).await.expect_err("request too large"));
    assert_eq!(tonic::Code::InvalidArgument, code_);
    assert!(msg.contains("request is too large"), "{msg}");
    let (code_, _) = code(kv.put("huge", vec![0u8; 3 << 20], None).await.expect_err("over the gRPC limit"));
    assert_eq!(tonic::Code::OutOfRange, code_, "tonic refuses a message over the decoding limit");
    let (code_, msg) = code(kv.put("", "v", None).await.expect_err("empty key"));
    assert_eq!((tonic::Code::InvalidArgument, true), (code_, msg.contains("key is not provided")), "{msg}");
    let dup = Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]);
    let (code_, msg) = code(kv.txn(dup).await.expect_err("duplicate key"));
    assert_eq!((tonic::Code::InvalidArgument, true), (code_, msg.contains("duplicate key")), "{msg}");
    kv.put("still", "serving", None).await.expect("the node still serves after bad requests");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_and_maintenance_calls() {
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.leader();
    let follower = c.follower();
    let mut cl = client(&c, follower).await;

    let members = cl.member_list().await.expect("member list");
    let mut ids: Vec<u64> = members.members().iter().map(|m| m.id()).collect();
    ids.sort_unstable();
    assert_eq!(vec![1, 2, 3], ids);
    for m in members.members() {
        let s = &c.servers[&m.id()];
        assert_eq!([format!("http://{}", s.peer_addr)], m.peer_urls());
        assert_eq!([format!("http://{}", s.client_addr)], m.client_urls());
        assert!(!m.is_learner());
    }

    let status = cl.status().await.expect("status");
    assert_eq!(leader, status.leader());
    assert!(status.raft_index() >= status.raft_applied_index().min(status.raft_index()));
    assert!(status.version().starts_with("3.5.0-keel"));

    // Unknown members are refused with etcd's error, and nothing changes.
    let (code_, msg) = code(cl.member_remove(77).await.expect_err("unknown member"));
    assert_eq!((tonic::Code::NotFound, true), (code_, msg.contains("member not found")), "{msg}");
    let (code_, _) = code(cl.member_promote(77).await.expect_err("unknown member"));
    assert_eq!(tonic::Code::NotFound, code_);
    let (code_, msg) = code(cl.member_promote(leader).await.expect_err("a voter"));
    assert_eq!(
        (tonic::Code::FailedPrecondition, true),
        (code_, msg.contains("can only promote a learner")),
        "{msg}"
    );

    // A learner added by peer URL gets the next id and shows as an unstarted learner.
    let peer = format!("http://127.0.0.1:{}", support::free_port());
    let added = cl
        .member_add([peer.clone()], Some(etcd_client::MemberAddOptions::new().with_is_learner()))
        .await
        .expect("member add");
    let m = added.member().expect("the added member");
    assert_eq!((4, true, "", vec![peer.clone()]), (m.id(), m.is_learner(), m.name(), m.peer_urls().to_vec()));
    let (code_, msg) = code(cl.member_promote(4).await.expect_err("learner not caught up"));
    assert_eq!(tonic::Code::FailedPrecondition, code_, "{msg}");
    assert_eq!("etcdserver: can only promote a learner member which is in sync with leader", msg);
    cl.member_remove(4).await.expect("remove the learner");
    assert_eq!(3, cl.member_list().await.expect("list").members().len());

    // Leadership moves where asked, through any member.
    let target = *c.servers.keys().find(|id| **id != leader && **id != follower).expect("a third node");
    cl.move_leader(target).await.expect("move leader");
    assert_eq!(Some(target), c.servers[&leader].node().leader());

    // Every replica hashes to the same value once it has applied the same writes.
    let mut kv = client(&c, target).await;
    let rev = kv.put("h", "1", None).await.expect("put").header().expect("header").revision();
    let mut hashes = Vec::new();
    for id in c.servers.keys() {
        let mut m = client(&c, *id).await;
        let index = c.servers[&target].node().metrics().last_log_index.expect("log index");
        c.servers[id].node().wait_applied(index, support::WAIT).await.expect("applied");
        let h = m.hash_kv(0).await.expect("hash kv");
        assert_eq!(rev, h.header().expect("header").revision());
        hashes.push(h.hash());
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "replicas differ: {hashes:?}");
    c.shutdown().await;
}

/// Sends raw bytes as a gRPC message body (to send what no well-behaved client would).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes_buf::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes_buf::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

mod bytes_buf {
    pub use prost::bytes::Buf;
    pub use prost::bytes::BufMut;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_protobuf_is_refused_and_the_node_keeps_serving() {
    let c = Cluster::start(1, |_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(c.endpoint(1))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    for method in [
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Txn",
        "/etcdserverpb.Cluster/MemberAdd",
    ] {
        grpc.ready().await.expect("ready");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
        // Field 1 claims a 1000-byte length that is not there.
        let garbage = vec![0x0a, 0xe8, 0x07, 0x01];
        let status = grpc
            .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(garbage), path, RawCodec)
            .await
            .expect_err("garbage is refused");
        assert_eq!(tonic::Code::Internal, status.code(), "{method}: {status:?}");
        assert!(status.message().contains("decode"), "{method}: {}", status.message());
    }
    // The same on a watch stream: the stream fails with the decoding error (as grpc-go fails
    // etcd's), rather than ending as if the client had closed it.
    grpc.ready().await.expect("ready");
    let garbage = futures_util::stream::iter(vec![vec![0x0a, 0xe8, 0x07, 0x01]]);
    let answer = grpc
        .streaming::<_, Vec<u8>, Vec<u8>, _>(
            tonic::Request::new(garbage),
            tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
            RawCodec,
        )
        .await;
    let status = match answer {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            let end = tokio::time::timeout(support::WAIT, stream.message()).await.expect("the stream ends");
            end.expect_err("garbage on a watch stream is refused")
        }
    };
    assert_eq!(tonic::Code::Internal, status.code(), "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
    let mut kv = client(&c, 1).await;
    kv.put("after", "garbage", None).await.expect("the node still serves");
    c.shutdown().await;
}
