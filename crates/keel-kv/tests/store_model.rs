//! The KV state machine against a model of etcd's semantics: random puts, deletes (single and
//! prefix) and transactions, applied in random batches, must give the same answers, revisions and
//! final state as a `BTreeMap` that follows etcd's rules, including the `NOSPACE` alarm's cap on
//! puts.

use std::collections::BTreeMap;

use keel::redb::Database;
use keel::redb::ReadableDatabase;
use keel::StateMachine;
use keel_kv::store::*;
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq)]
struct Meta {
    create: i64,
    modified: i64,
    version: i64,
    value: Vec<u8>,
}

#[derive(Default)]
struct Model {
    kv: BTreeMap<Vec<u8>, Meta>,
    revision: i64,
    last_member_id: u64,
    /// Members with a raised NOSPACE alarm.
    nospace: std::collections::BTreeSet<u64>,
}

impl Model {
    fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
        match end {
            [] => key == start,
            [0] => key >= start,
            e => key >= start && key < e,
        }
    }

    fn put(&mut self, rev: i64, key: &[u8], value: &[u8]) -> Option<Meta> {
        let prev = self.kv.get(key).cloned();
        let meta = match &prev {
            Some(p) => {
                Meta { create: p.create, modified: rev, version: p.version + 1, value: value.to_vec() }
            }
            None => Meta { create: rev, modified: rev, version: 1, value: value.to_vec() },
        };
        self.kv.insert(key.to_vec(), meta);
        prev
    }

    fn delete(&mut self, start: &[u8], end: &[u8]) -> i64 {
        let doomed: Vec<Vec<u8>> =
            self.kv.keys().filter(|k| Self::in_range(k, start, end)).cloned().collect();
        for k in &doomed {
            self.kv.remove(k);
        }
        doomed.len() as i64
    }

    /// Applies `cmd`; answers (revision after, a summary of the result).
    fn apply(&mut self, cmd: &KvCommand) -> (i64, String) {
        let rev = self.revision + 1;
        let mut wrote = false;
        let capped = !self.nospace.is_empty();
        let summary = match cmd {
            KvCommand::Put(_) if capped => "Err(NoSpace)".to_string(),
            KvCommand::Txn(t)
                if capped && t.success.iter().chain(&t.failure).any(|o| matches!(o, Op::Put(_))) =>
            {
                "Err(NoSpace)".to_string()
            }
            KvCommand::Alarm(change) => {
                let id = change.member.member_id;
                let changed = match change.action {
                    AlarmAction::Activate => self.nospace.insert(id),
                    AlarmAction::Deactivate => self.nospace.remove(&id),
                };
                format!("alarms {:?}", changed.then_some(id).into_iter().collect::<Vec<_>>())
            }
            KvCommand::Put(p) => {
                wrote = true;
                format!("put prev={:?}", self.put(rev, &p.key, &p.value).map(|m| m.value))
            }
            KvCommand::DeleteRange(d) => {
                let n = self.delete(&d.key, &d.range_end);
                wrote = n > 0;
                format!("deleted {n}")
            }
            KvCommand::Txn(t) => {
                let ok = t.compare.iter().all(|c| {
                    let m = self.kv.get(&c.key);
                    match (&c.target, m) {
                        (CompareTarget::Value(v), Some(m)) => m.value == *v,
                        (CompareTarget::Value(_), None) => false,
                        (CompareTarget::Version(n), m) => m.map_or(0, |m| m.version) == *n,
                        _ => unreachable!("the generator only makes value and version compares"),
                    }
                });
                let ops = if ok { &t.success } else { &t.failure };
                let mut parts = vec![format!("txn {ok}")];
                for op in ops {
                    match op {
                        Op::Put(p) => {
                            wrote = true;
                            self.put(rev, &p.key, &p.value);
                            parts.push("put".into());
                        }
                        Op::DeleteRange(d) => {
                            let n = self.delete(&d.key, &d.range_end);
                            wrote |= n > 0;
                            parts.push(format!("deleted {n}"));
                        }
                        _ => unreachable!(),
                    }
                }
                parts.join(",")
            }
            KvCommand::AllocateMemberId { above } => {
                self.last_member_id = self.last_member_id.max(*above) + 1;
                format!("member id {}", self.last_member_id)
            }
            // Compaction and leases have models of their own (history_model.rs, lease_model.rs).
            // Not generated (auth has its own model: auth_model.rs).
            KvCommand::Compact { .. }
            | KvCommand::LeaseGrant { .. }
            | KvCommand::LeaseRevoke { .. }
            | KvCommand::Auth(_)
            | KvCommand::AsUser { .. } => unreachable!(),
        };
        if wrote {
            self.revision = rev;
        }
        (self.revision, summary)
    }
}

fn summarize(r: &KvResponse) -> (i64, String) {
    let s = match &r.result {
        Ok(OpResult::Put { prev_kv }) => {
            format!("put prev={:?}", prev_kv.as_ref().map(|kv| kv.value.clone()))
        }
        Ok(OpResult::DeleteRange { deleted, .. }) => format!("deleted {deleted}"),
        Ok(OpResult::Txn(t)) => {
            let mut parts = vec![format!("txn {}", t.succeeded)];
            for r in &t.responses {
                parts.push(match r {
                    OpResult::Put { .. } => "put".into(),
                    OpResult::DeleteRange { deleted, .. } => format!("deleted {deleted}"),
                    other => format!("{other:?}"),
                });
            }
            parts.join(",")
        }
        Ok(OpResult::MemberId(id)) => format!("member id {id}"),
        Ok(OpResult::Alarms(a)) => format!("alarms {:?}", a.iter().map(|a| a.member_id).collect::<Vec<_>>()),
        Err(e) => format!("Err({e:?})"),
        other => format!("{other:?}"),
    };
    (r.revision, s)
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    // A small key space with shared prefixes, so ops collide and prefixes matter.
    prop::sample::select(vec![
        b"a".to_vec(),
        b"ab".to_vec(),
        b"abc".to_vec(),
        b"b".to_vec(),
        b"b\xff".to_vec(),
        b"c".to_vec(),
    ])
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..4)
}

fn delete() -> impl Strategy<Value = DeleteRange> {
    (key(), any::<bool>()).prop_map(|(key, prefix)| {
        let range_end = if prefix { prefix_range_end(&key) } else { Vec::new() };
        DeleteRange { key, range_end, prev_kv: true }
    })
}

fn put() -> impl Strategy<Value = Put> {
    (key(), value()).prop_map(|(key, value)| Put { key, value, prev_kv: true, ..Default::default() })
}

fn command() -> impl Strategy<Value = KvCommand> {
    let op = || prop_oneof![put().prop_map(Op::Put), delete().prop_map(Op::DeleteRange)];
    let compare = (
        key(),
        prop_oneof![value().prop_map(CompareTarget::Value), (0i64..3).prop_map(CompareTarget::Version)],
    )
        .prop_map(|(key, target)| Compare {
            key,
            range_end: Vec::new(),
            result: CompareResult::Equal,
            target,
        });
    let txn = (
        prop::collection::vec(compare, 0..2),
        prop::collection::vec(op(), 0..3),
        prop::collection::vec(op(), 0..3),
    )
        .prop_filter("a txn may not put one key twice", |(_, s, f)| {
            [s, f].iter().all(|ops| {
                let keys: Vec<&Vec<u8>> =
                    ops.iter().filter_map(|o| if let Op::Put(p) = o { Some(&p.key) } else { None }).collect();
                keys.iter().collect::<std::collections::BTreeSet<_>>().len() == keys.len()
            })
        })
        .prop_map(|(compare, success, failure)| KvCommand::Txn(Txn { compare, success, failure }));
    let alarm = (any::<bool>(), 1u64..3).prop_map(|(activate, member_id)| {
        let action = if activate { AlarmAction::Activate } else { AlarmAction::Deactivate };
        KvCommand::Alarm(AlarmChange { action, member: AlarmMember { member_id, alarm: AlarmKind::NoSpace } })
    });
    prop_oneof![1 => alarm, 1 => (0u64..6).prop_map(|above| KvCommand::AllocateMemberId { above }), 3 => put().prop_map(KvCommand::Put), 1 => delete().prop_map(KvCommand::DeleteRange), 2 => txn]
}

/// redb on its in-memory backend: the same engine and transactions, without fsync per case.
fn memory_db() -> Database {
    Database::builder()
        .create_with_backend(keel::redb::backends::InMemoryBackend::new())
        .expect("in-memory db")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn store_agrees_with_model(batches in prop::collection::vec(prop::collection::vec(command(), 1..8), 1..12)) {
        let db = memory_db();
        let mut model = Model { revision: 1, ..Model::default() };
        for batch in batches {
            let expected: Vec<(i64, String)> = batch.iter().map(|c| model.apply(c)).collect();
            let txn = db.begin_write().expect("write txn");
            let got = KvStore::default().apply(&txn, batch).expect("apply");
            txn.commit().expect("commit");
            prop_assert_eq!(expected, got.iter().map(summarize).collect::<Vec<_>>());
        }
        let read = db.begin_read().expect("read txn");
        let all = Range { key: vec![0], range_end: vec![0], ..Range::default() };
        let (revision, result) = range(&read, &all, usize::MAX).expect("range");
        let result = result.expect("current revision");
        prop_assert_eq!(model.revision, revision);
        let got: Vec<(Vec<u8>, Meta)> = result.kvs.into_iter().map(|kv| (kv.key, Meta { create: kv.create_revision, modified: kv.mod_revision, version: kv.version, value: kv.value })).collect();
        prop_assert_eq!(model.kv.into_iter().collect::<Vec<_>>(), got);
        let raised: Vec<u64> = alarms(&read).expect("alarms").iter().map(|a| a.member_id).collect();
        prop_assert_eq!(model.nospace.into_iter().collect::<Vec<_>>(), raised);
        // Snapshot and restore reproduce the same state.
        let mut snap = Vec::new();
        KvStore::default().snapshot(&read, &mut snap).expect("snapshot");
        let db2 = memory_db();
        let txn = db2.begin_write().expect("write txn");
        KvStore::default().restore(&txn, &mut snap.as_slice()).expect("restore");
        txn.commit().expect("commit");
        let read2 = db2.begin_read().expect("read txn");
        prop_assert_eq!(range(&read, &all, usize::MAX).expect("range"), range(&read2, &all, usize::MAX).expect("range"));
        // Alarms are in the snapshot too.
        prop_assert_eq!(alarms(&read).expect("alarms"), alarms(&read2).expect("alarms"));
    }
}

/// The answer budget: a range whose keys, values and metadata (`answer_bytes`) exceed it is
/// refused, however it is sorted; a page under it, a count and the keys alone are served.
#[test]
fn a_range_over_the_budget_is_refused_and_pages_counts_and_keys_are_not() {
    let db = memory_db();
    let txn = db.begin_write().expect("write txn");
    let puts = (0..100u32)
        .map(|i| {
            KvCommand::Put(Put {
                key: format!("k{i:03}").into_bytes(),
                value: vec![7; 1000],
                ..Put::default()
            })
        })
        .collect();
    KvStore::default().apply(&txn, puts).expect("apply");
    txn.commit().expect("commit");
    let read = db.begin_read().expect("read txn");
    let all = Range { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Range::default() };
    let one = 4 + 1000 + KV_OVERHEAD_BYTES; // what each key counts
    let (_, whole) = range(&read, &all, 100 * one).expect("range");
    assert_eq!(100, whole.expect("exactly the budget is served").kvs.len());
    for r in [all.clone(), Range { sort_order: SortOrder::Descend, limit: 1, ..all.clone() }] {
        let (_, over) = range(&read, &r, 100 * one - 1).expect("range");
        let e = over.expect_err("one byte over the budget");
        assert_eq!(KvError::ResponseTooLarge { limit: (100 * one - 1) as u64 }, e);
        assert!(e.to_string().contains("limit"), "{e}");
    }
    let budget = 10 * one;
    let (_, page) = range(&read, &Range { limit: 10, ..all.clone() }, budget).expect("range");
    let page = page.expect("a page under the budget");
    assert_eq!((10, 100, true), (page.kvs.len(), page.count, page.more));
    let (_, count) = range(&read, &Range { count_only: true, ..all.clone() }, budget).expect("range");
    assert_eq!(100, count.expect("count only").count);
    let (_, keys) = range(&read, &Range { keys_only: true, ..all }, budget).expect("range");
    assert_eq!(100, keys.expect("keys only: 4 + 32 bytes a key").kvs.len());
}

/// etcd judges the compares of nested txns with the outer txn's, on the state before any op
/// runs: a nested compare does not see a write earlier in the same txn (found by the grpc-gateway
/// comparison with etcd 3.4, `tests/gateway.rs`).
#[test]
fn nested_txn_compares_are_judged_before_the_outer_txn_writes() {
    let db = memory_db();
    let put = |k: &str| Op::Put(Put { key: k.into(), value: b"v".to_vec(), ..Put::default() });
    let version_is = |k: &str, v: i64| Compare {
        key: k.into(),
        range_end: vec![],
        result: CompareResult::Equal,
        target: CompareTarget::Version(v),
    };
    // t is missing before the txn: the nested compare "version(t) == 1" fails even though the
    // outer txn puts t first, and the nested txn takes its failure branch.
    let nested =
        Txn { compare: vec![version_is("t", 1)], success: vec![put("yes")], failure: vec![put("no")] };
    let outer =
        Txn { compare: vec![version_is("t", 0)], success: vec![put("t"), Op::Txn(nested)], failure: vec![] };
    let txn = db.begin_write().expect("write txn");
    let got = KvStore::default().apply(&txn, vec![KvCommand::Txn(outer)]).expect("apply");
    txn.commit().expect("commit");
    assert_eq!(
        vec![(
            2,
            "txn true,put,Txn(TxnResult { succeeded: false, responses: [Put { prev_kv: None }] })"
                .to_string()
        )],
        got.iter().map(summarize).collect::<Vec<_>>()
    );
    let read = db.begin_read().expect("read txn");
    let all = Range { key: vec![0], range_end: vec![0], keys_only: true, ..Range::default() };
    let (_, result) = range(&read, &all, usize::MAX).expect("range");
    let keys: Vec<Vec<u8>> = result.expect("current revision").kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(vec![b"no".to_vec(), b"t".to_vec()], keys);
}
