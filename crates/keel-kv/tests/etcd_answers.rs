//! Smaller corners of etcd's v3 API where Keel once answered differently, each run against etcd
//! 3.4 (Debian's `etcd-server`, one member) and then against a one-node keeld process, through
//! the Rust `etcd-client` crate, unmodified: what is asserted is what etcd answers, checked each
//! time, and then asserted of keeld. The alarm, compaction and `HashKV` revisions, `Range.count`
//! under revision filters, txn duplicate-key checks (nested txns, puts under a delete),
//! `ignore_value`/`ignore_lease` with a value/lease, the header-less `Alarm`, `Defragment` and
//! `MoveLeader` answers, and the `grpc.health.v1.Health` service.

mod procs;

use std::future::Future;

use etcd_client::AlarmAction;
use etcd_client::AlarmOptions;
use etcd_client::AlarmType;
use etcd_client::Client;
use etcd_client::DeleteOptions;
use etcd_client::GetOptions;
use etcd_client::PutOptions;
use etcd_client::Txn;
use etcd_client::TxnOp;
use procs::Etcd;
use procs::Procs;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Runs `scenario` against etcd, then against a fresh one-node keeld; it gets the endpoint
/// (`http://host:port`) and the system's name for messages.
async fn as_etcd<F, Fut>(scenario: F)
where
    F: Fn(String, &'static str) -> Fut,
    Fut: Future<Output = ()>,
{
    {
        let e = Etcd::start(&[]);
        scenario(format!("http://{}", e.client), "etcd").await;
    }
    let p = Procs::start(1, 0, "");
    scenario(format!("http://{}", p.client(1)), "keeld").await;
}

async fn connect(ep: &str) -> Client {
    Client::connect([ep], None).await.unwrap_or_else(|e| panic!("connect to {ep}: {e}"))
}

/// The gRPC code and message of a refused call.
fn refusal<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const DUPLICATE: &str = "etcdserver: duplicate key given in txn request";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_activated_by_hand_refuses_puts_until_deactivated() {
    as_etcd(|ep, sys| async move {
        let mut c = connect(&ep).await;
        let me = c.put("k", "v", None).await.expect("put").header().expect("header").member_id();
        let mut opts = AlarmOptions::new();
        opts.with_member(me);
        let raised = c.alarm(AlarmAction::Activate, AlarmType::Nospace, Some(opts)).await.expect("activate");
        let listed: Vec<_> = raised.alarms().iter().map(|a| (a.member_id(), a.alarm())).collect();
        assert_eq!(vec![(me, AlarmType::Nospace)], listed, "{sys}: activate answers the alarm raised");
        assert!(raised.header().is_none(), "{sys}: an alarm answer has no header");
        assert_eq!(
            (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded".to_string()),
            refusal(c.put("k", "w", None).await),
            "{sys}: a put while NOSPACE is raised"
        );
        let mut opts = AlarmOptions::new();
        opts.with_member(me);
        c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(opts)).await.expect("deactivate");
        c.put("k", "w", None)
            .await
            .unwrap_or_else(|e| panic!("{sys}: a put after the alarm is cleared: {e}"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_refuses_its_own_revision_again_and_serves_reads_at_it() {
    as_etcd(|ep, sys| async move {
        let mut c = connect(&ep).await;
        let fresh = c.hash_kv(0).await.expect("hash kv").compact_version();
        assert_eq!(-1, fresh, "{sys}: HashKV's compact_revision before any compaction");
        for i in 0..5 {
            c.put(format!("a{i}"), "v", None).await.expect("put");
        }
        let current = c.put("a0", "w", None).await.expect("put").header().expect("header").revision();
        let at = current - 2;
        c.compact(at, None).await.unwrap_or_else(|e| panic!("{sys}: compact: {e}"));
        for again in [at, at - 1] {
            assert_eq!(
                (Code::OutOfRange, COMPACTED.to_string()),
                refusal(c.compact(again, None).await),
                "{sys}: compacting at {again}, with {at} compacted"
            );
        }
        let past = GetOptions::new().with_prefix().with_count_only().with_revision(at);
        let r = c.get("a", Some(past)).await.unwrap_or_else(|e| panic!("{sys}: a read at {at}: {e}"));
        // a0..a4 were written at revisions 2..=6: four of them existed at `at` (5).
        assert_eq!(4, r.count(), "{sys}: the read at the compaction revision");
        let before = GetOptions::new().with_prefix().with_revision(at - 1);
        assert_eq!((Code::OutOfRange, COMPACTED.to_string()), refusal(c.get("a", Some(before)).await));

        let h = c.hash_kv(0).await.expect("hash kv");
        assert_eq!(at, h.compact_version(), "{sys}: HashKV's compact_revision is the compaction's");
        assert_eq!(current, h.header().expect("header").revision());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_count_is_the_whole_range_before_revision_filters() {
    as_etcd(|ep, sys| async move {
        let mut c = connect(&ep).await;
        let mut revs = Vec::new();
        for i in 0..5 {
            revs.push(c.put(format!("c{i}"), "v", None).await.expect("put").header().expect("h").revision());
        }
        let get = |o: GetOptions| {
            let mut c = c.clone();
            async move {
                let r = c.get("c", Some(o.with_prefix().with_keys_only())).await.expect("get");
                let keys: Vec<String> = r.kvs().iter().map(|kv| kv.key_str().expect("utf8").into()).collect();
                (keys, r.count(), r.more())
            }
        };
        let newest = revs[3];
        assert_eq!(
            (vec!["c3".to_string(), "c4".into()], 5, false),
            get(GetOptions::new().with_min_mod_revision(newest)).await,
            "{sys}: min_mod_revision"
        );
        assert_eq!(
            (vec!["c3".to_string()], 5, true),
            get(GetOptions::new().with_min_mod_revision(newest).with_limit(1)).await,
            "{sys}: min_mod_revision and a limit below the matches"
        );
        assert_eq!(
            (vec!["c0".to_string(), "c1".into()], 5, false),
            get(GetOptions::new().with_max_create_revision(revs[1])).await,
            "{sys}: max_create_revision"
        );
        assert_eq!(
            (vec![], 5, false),
            get(GetOptions::new().with_min_mod_revision(newest).with_count_only()).await,
            "{sys}: count_only with a filter counts the whole range"
        );
        assert_eq!(
            (vec![], 5, false),
            get(GetOptions::new().with_count_only().with_limit(2)).await,
            "{sys}: count_only answers no keys, so never `more`"
        );
    })
    .await;
}

fn put(k: &str) -> TxnOp {
    TxnOp::put(k, "v", None)
}

fn delete(k: &str, end: &str) -> TxnOp {
    TxnOp::delete(k, Some(DeleteOptions::new().with_range(end)))
}

fn nested(then: Vec<TxnOp>, otherwise: Vec<TxnOp>) -> TxnOp {
    TxnOp::txn(Txn::new().and_then(then).or_else(otherwise))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_duplicate_keys_are_found_in_nested_txns_and_under_deletes() {
    as_etcd(|ep, sys| async move {
        let c = connect(&ep).await;
        let cases: Vec<(&str, Vec<TxnOp>, bool)> = vec![
            ("two puts of a key", vec![put("d"), put("d")], true),
            ("a put and a nested txn's put", vec![put("d"), nested(vec![put("d")], vec![])], true),
            ("a put and a nested txn's else put", vec![put("d"), nested(vec![], vec![put("d")])], true),
            ("a delete range and a put in it", vec![delete("a", "b"), put("a1")], true),
            ("a put and a delete of the key", vec![put("a1"), TxnOp::delete("a1", None)], true),
            (
                "a put and a nested delete over it",
                vec![put("a1"), nested(vec![delete("a", "b")], vec![])],
                true,
            ),
            (
                "a nested delete, then a put under it",
                vec![nested(vec![delete("k", "m")], vec![]), put("l")],
                true,
            ),
            ("one key in both branches of a nested txn", vec![nested(vec![put("d")], vec![put("d")])], false),
            ("a put at a deleted range's end", vec![delete("k", "m"), put("m")], false),
            ("a put under a delete of every key from one on", vec![delete("a", "\0"), put("a1")], false),
            (
                "a nested put, then a nested delete over it",
                vec![nested(vec![put("l")], vec![]), nested(vec![delete("k", "m")], vec![])],
                false,
            ),
        ];
        for (what, ops, duplicate) in cases {
            let r = c.clone().txn(Txn::new().and_then(ops)).await;
            if duplicate {
                assert_eq!((Code::InvalidArgument, DUPLICATE.to_string()), refusal(r), "{sys}: {what}");
            } else {
                r.unwrap_or_else(|e| panic!("{sys}: {what}: {e}"));
            }
        }
        // The branches of the txn itself exclude each other.
        c.clone()
            .txn(Txn::new().and_then(vec![put("d")]).or_else(vec![put("d")]))
            .await
            .unwrap_or_else(|e| panic!("{sys}: one key in both branches: {e}"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_value_and_ignore_lease_refuse_a_value_and_a_lease() {
    as_etcd(|ep, sys| async move {
        let mut c = connect(&ep).await;
        c.put("k", "v", None).await.expect("put");
        let lease = c.lease_grant(60, None).await.expect("grant").id();
        assert_eq!(
            (Code::InvalidArgument, "etcdserver: value is provided".to_string()),
            refusal(c.put("k", "w", Some(PutOptions::new().with_ignore_value())).await),
            "{sys}"
        );
        assert_eq!(
            (Code::InvalidArgument, "etcdserver: lease is provided".to_string()),
            refusal(c.put("k", "v", Some(PutOptions::new().with_ignore_lease().with_lease(lease))).await),
            "{sys}"
        );
        let in_txn =
            Txn::new().and_then(vec![TxnOp::put("k", "w", Some(PutOptions::new().with_ignore_value()))]);
        assert_eq!(
            (Code::InvalidArgument, "etcdserver: value is provided".to_string()),
            refusal(c.txn(in_txn).await),
            "{sys}: in a txn"
        );
        c.put("k", "", Some(PutOptions::new().with_ignore_value().with_lease(lease)))
            .await
            .unwrap_or_else(|e| panic!("{sys}: ignore_value without a value: {e}"));
        assert_eq!(b"v", c.get("k", None).await.expect("get").kvs()[0].value(), "{sys}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragment_and_move_leader_answer_no_header() {
    as_etcd(|ep, sys| async move {
        let mut c = connect(&ep).await;
        let me = c.status().await.expect("status").header().expect("header").member_id();
        let d = c.defragment().await.unwrap_or_else(|e| panic!("{sys}: defragment: {e}"));
        assert!(d.header().is_none(), "{sys}: defragment's answer");
        let m = c.move_leader(me).await.unwrap_or_else(|e| panic!("{sys}: move leader to itself: {e}"));
        assert!(m.header().is_none(), "{sys}: move leader's answer");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_service_answers_serving() {
    as_etcd(|ep, sys| async move {
        let channel = tonic::transport::Channel::from_shared(ep).expect("an endpoint").connect().await;
        let mut h = HealthClient::new(channel.expect("connect"));
        let r = h.check(HealthCheckRequest { service: String::new() }).await;
        let status = r.unwrap_or_else(|e| panic!("{sys}: health check: {e}")).into_inner().status;
        assert_eq!(ServingStatus::Serving as i32, status, "{sys}");
        let unknown = h.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
        let e = unknown.expect_err("an unknown service");
        assert_eq!((Code::NotFound, "unknown service"), (e.code(), e.message()), "{sys}");
        let mut w = h.watch(HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
        let first = w.message().await.expect("a first answer").expect("not the end");
        assert_eq!(ServingStatus::Serving as i32, first.status, "{sys}: watch");
    })
    .await;
}
