//! History and watches against a model: random puts, deletes, txns and compactions, applied in
//! random batches, with physical compaction advancing in small random steps in between, and
//! watchers opened at random revisions with random key ranges and filters.
//!
//! Checked: every `Range` at every revision from the compaction revision to the current one
//! equals the model's state then (and below it answers `Compacted`, above it `FutureRevision`);
//! every watcher receives exactly the model's events from its start revision, in revision order,
//! each revision whole, with the right `prev_kv` — or, if compaction overtook it, a prefix of them
//! and then a cancellation naming a compaction revision above what it had seen. Watchers' channels
//! are tiny, so most of them fall behind and catch up from history (the hub's unsynced path).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use keel::redb::Database;
use keel::redb::ReadableDatabase;
use keel::StateMachine;
use keel_kv::history;
use keel_kv::history::EventKind;
use keel_kv::store::*;
use keel_kv::watch::Delivery;
use keel_kv::watch::Filter;
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq)]
struct Meta {
    create: i64,
    modified: i64,
    version: i64,
    value: Vec<u8>,
}

/// One change, as the model expects a watcher to see it.
#[derive(Clone, Debug, PartialEq)]
struct Change {
    revision: i64,
    kind: EventKind,
    key: Vec<u8>,
    /// A put's new version (a delete: None).
    now: Option<Meta>,
    prev: Option<Meta>,
}

struct Model {
    /// The state after each revision: `states[r]` for r ≥ 1 (index 0 unused).
    states: Vec<BTreeMap<Vec<u8>, Meta>>,
    changes: Vec<Change>,
    compacted: i64,
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        e => key >= start && key < e,
    }
}

impl Model {
    fn new() -> Self {
        Model { states: vec![BTreeMap::new(), BTreeMap::new()], changes: Vec::new(), compacted: 0 }
    }

    fn revision(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    /// Applies a write; answers whether the store's compaction revision may be set to `rev`.
    fn apply(&mut self, cmd: &KvCommand) {
        let before = self.states.last().expect("a state").clone();
        let rev = self.revision() + 1;
        let mut now = before.clone();
        let mut touched: Vec<Vec<u8>> = Vec::new();
        let put = |now: &mut BTreeMap<Vec<u8>, Meta>, touched: &mut Vec<Vec<u8>>, p: &Put| {
            let meta = match now.get(&p.key) {
                Some(m) => {
                    Meta { create: m.create, modified: rev, version: m.version + 1, value: p.value.clone() }
                }
                None => Meta { create: rev, modified: rev, version: 1, value: p.value.clone() },
            };
            now.insert(p.key.clone(), meta);
            if !touched.contains(&p.key) {
                touched.push(p.key.clone());
            }
        };
        let delete = |now: &mut BTreeMap<Vec<u8>, Meta>, touched: &mut Vec<Vec<u8>>, d: &DeleteRange| {
            let doomed: Vec<Vec<u8>> =
                now.keys().filter(|k| in_range(k, &d.key, &d.range_end)).cloned().collect();
            for k in doomed {
                now.remove(&k);
                if !touched.contains(&k) {
                    touched.push(k);
                }
            }
        };
        match cmd {
            KvCommand::Put(p) => put(&mut now, &mut touched, p),
            KvCommand::DeleteRange(d) => delete(&mut now, &mut touched, d),
            KvCommand::Txn(t) => {
                let ok = t.compare.iter().all(|c| match (&c.target, before.get(&c.key)) {
                    (CompareTarget::Value(v), Some(m)) => m.value == *v,
                    (CompareTarget::Value(_), None) => false,
                    (CompareTarget::Version(n), m) => m.map_or(0, |m| m.version) == *n,
                    _ => unreachable!("the generator makes value and version compares"),
                });
                for op in if ok { &t.success } else { &t.failure } {
                    match op {
                        Op::Put(p) => put(&mut now, &mut touched, p),
                        Op::DeleteRange(d) => delete(&mut now, &mut touched, d),
                        _ => unreachable!("the generator makes puts and deletes"),
                    }
                }
            }
            KvCommand::Compact { revision } => {
                if *revision > self.compacted && *revision <= self.revision() {
                    self.compacted = *revision;
                }
                return;
            }
            _ => unreachable!("the generator makes writes and compactions"),
        }
        if touched.is_empty() {
            return; // nothing changed: no revision
        }
        for key in touched {
            let after = now.get(&key).cloned();
            let kind = if after.is_some() { EventKind::Put } else { EventKind::Delete };
            self.changes.push(Change {
                revision: rev,
                kind,
                key: key.clone(),
                now: after,
                prev: before.get(&key).cloned(),
            });
        }
        self.states.push(now);
    }
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![b"a".to_vec(), b"ab".to_vec(), b"abc".to_vec(), b"b".to_vec(), b"c".to_vec()])
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..3)
}

fn delete() -> impl Strategy<Value = DeleteRange> {
    (key(), any::<bool>()).prop_map(|(key, prefix)| {
        let range_end = if prefix { prefix_range_end(&key) } else { Vec::new() };
        DeleteRange { key, range_end, prev_kv: false }
    })
}

fn put() -> impl Strategy<Value = Put> {
    (key(), value()).prop_map(|(key, value)| Put { key, value, ..Default::default() })
}

/// A write, or a compaction to a revision given as a fraction of the way from the start.
#[derive(Clone, Debug)]
enum Step {
    Write(KvCommand),
    /// Compact to `current * n / 8` (some of them at or below the last compaction: refused).
    Compact(i64),
}

fn step() -> impl Strategy<Value = Step> {
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
        prop::collection::vec(op(), 0..4),
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
    prop_oneof![
        4 => put().prop_map(|p| Step::Write(KvCommand::Put(p))),
        1 => delete().prop_map(|d| Step::Write(KvCommand::DeleteRange(d))),
        2 => txn.prop_map(Step::Write),
        1 => (1i64..=8).prop_map(Step::Compact),
    ]
}

/// A watcher to open before a batch: start as a fraction of the current revision (0: from now),
/// its keys, filters, and whether it wants prev_kv.
#[derive(Clone, Debug)]
struct WatchSpec {
    start_eighths: i64,
    keys: (Vec<u8>, u8),
    no_put: bool,
    no_delete: bool,
}

fn watch_spec() -> impl Strategy<Value = WatchSpec> {
    (0i64..=8, key(), 0u8..3, prop::bool::weighted(0.2), prop::bool::weighted(0.2)).prop_map(
        |(start_eighths, k, shape, no_put, no_delete)| WatchSpec {
            start_eighths,
            keys: (k, shape),
            no_put,
            no_delete,
        },
    )
}

fn filter_of(spec: &WatchSpec) -> Filter {
    let (key, shape) = &spec.keys;
    let (key, range_end) = match shape {
        0 => (key.clone(), Vec::new()),
        1 => (key.clone(), prefix_range_end(key)),
        _ => (vec![0], vec![0]),
    };
    Filter { key, range_end, no_put: spec.no_put, no_delete: spec.no_delete }
}

/// redb on its in-memory backend: the same engine and transactions, without fsync per case.
fn memory_db() -> Database {
    Database::builder()
        .create_with_backend(keel::redb::backends::InMemoryBackend::new())
        .expect("in-memory db")
}

fn meta_of(kv: &KeyValue) -> Meta {
    Meta {
        create: kv.create_revision,
        modified: kv.mod_revision,
        version: kv.version,
        value: kv.value.clone(),
    }
}

/// What one watcher received, in order.
#[derive(Default, Debug)]
struct Received {
    /// (revision of the delivery, events in it as changes).
    deliveries: Vec<Vec<Change>>,
    canceled: Option<i64>,
}

struct OpenWatch {
    spec: WatchSpec,
    filter: Filter,
    start: i64,
    got: Arc<Mutex<Received>>,
}

fn check_watch(model: &Model, w: &OpenWatch) -> Result<(), TestCaseError> {
    let got = w.got.lock().expect("received");
    let expected: Vec<&Change> = model
        .changes
        .iter()
        .filter(|c| c.revision >= w.start && in_range(&c.key, &w.filter.key, &w.filter.range_end))
        .filter(|c| {
            !((c.kind == EventKind::Put && w.spec.no_put)
                || (c.kind == EventKind::Delete && w.spec.no_delete))
        })
        .collect();
    let flat: Vec<&Change> = got.deliveries.iter().flatten().collect();
    // Each revision whole, in one delivery; deliveries in revision order.
    let mut last_rev = 0;
    for d in &got.deliveries {
        let first = d.first().map_or(last_rev, |c| c.revision);
        prop_assert!(first > last_rev, "revision {} after {} (or split across deliveries)", first, last_rev);
        for pair in d.windows(2) {
            prop_assert!(pair[0].revision <= pair[1].revision, "out of order in one delivery: {:?}", d);
        }
        last_rev = d.last().map_or(last_rev, |c| c.revision);
    }
    match got.canceled {
        None => prop_assert_eq!(
            expected.len(),
            flat.len(),
            "watcher {:?} from {}: got {:?}, expected {:?}",
            w.spec,
            w.start,
            flat,
            expected
        ),
        Some(compacted) => {
            prop_assert!(flat.len() <= expected.len());
            let next = flat.last().map_or(w.start, |c| c.revision + 1);
            prop_assert!(
                next < compacted,
                "canceled at compaction {} although its next revision {} was kept",
                compacted,
                next
            );
        }
    }
    for (want, got) in expected.iter().zip(&flat) {
        prop_assert_eq!(want.revision, got.revision);
        prop_assert_eq!(want.kind, got.kind);
        prop_assert_eq!(&want.key, &got.key);
        prop_assert_eq!(&want.now, &got.now);
        // prev_kv: exact, except that compaction may have removed a version ending at or below it.
        if got.prev.is_some() || want.revision > model.compacted {
            prop_assert_eq!(&want.prev, &got.prev, "prev_kv of {:?}", want);
        }
    }
    Ok(())
}

/// Runs one case; `drop_events` plants the hub's `watch-drop-event` fault (the negative control).
fn run_case(
    batches: Vec<(Vec<Step>, Vec<WatchSpec>, usize)>,
    drop_events: bool,
) -> Result<(), TestCaseError> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let db = Arc::new(memory_db());
    let store = KvStore::default();
    let hub = store.hub().clone();
    if drop_events {
        hub.plant_drop_event();
    }
    hub.observe(1, history::CompactProgress { target: 0, physical: 0 });
    let reader_db = db.clone();
    let reader = move |from: i64, max: usize| {
        let txn = reader_db.begin_read().map_err(|e| e.to_string())?;
        let (revisions, last) = history::read_events(&txn, from, max, true).map_err(|e| e.to_string())?;
        Ok((revisions, last, compact_revision(&txn).map_err(|e| e.to_string())?))
    };
    let _sync = rt.spawn(hub.clone().run_sync(reader));
    let mut model = Model::new();
    let mut watches: Vec<OpenWatch> = Vec::new();
    for (steps, specs, physical_steps) in batches {
        // Open the batch's watchers (at revisions the model knows; 0 = from now).
        for spec in specs {
            let current = model.revision();
            let start = if spec.start_eighths == 0 { 0 } else { (current * spec.start_eighths / 8).max(1) };
            let filter = filter_of(&spec);
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let registered = hub.watch(filter.clone(), start, watches.len() as i64, tx);
            let got = Arc::new(Mutex::new(Received::default()));
            let sink = got.clone();
            rt.spawn(async move {
                while let Some(d) = rx.recv().await {
                    let mut sink = sink.lock().expect("received");
                    match d {
                        Delivery::Events { events, .. } => sink.deliveries.push(
                            events
                                .iter()
                                .map(|e| Change {
                                    revision: e.kv.mod_revision,
                                    kind: e.kind,
                                    key: e.kv.key.clone(),
                                    now: (e.kind == EventKind::Put).then(|| meta_of(&e.kv)),
                                    prev: e.prev_kv.as_ref().map(meta_of),
                                })
                                .collect(),
                        ),
                        Delivery::Compacted { compact_revision, .. } => {
                            sink.canceled = Some(compact_revision)
                        }
                        Delivery::Progress { .. } => {}
                    }
                }
            });
            watches.push(OpenWatch { spec, filter, start: registered.start_revision, got });
        }
        let mut commands = Vec::new();
        for step in steps {
            let cmd = match step {
                Step::Write(cmd) => cmd,
                Step::Compact(eighths) => {
                    KvCommand::Compact { revision: (model.revision() * eighths / 8).max(1) }
                }
            };
            model.apply(&cmd);
            commands.push(cmd);
        }
        let txn = db.begin_write().expect("write txn");
        store.apply(&txn, commands).expect("apply");
        txn.commit().expect("commit");
        // Physical compaction advances a few small steps between batches.
        for _ in 0..physical_steps {
            let txn = db.begin_write().expect("write txn");
            let p = history::compact_step(&txn, 2).expect("compact step");
            txn.commit().expect("commit");
            hub.compacted_physically(p);
        }
        // Every revision still kept reads as the model says; others are refused.
        let read = db.begin_read().expect("read txn");
        let all = Range { key: vec![0], range_end: vec![0], ..Range::default() };
        for at in 1..=model.revision() + 1 {
            let (_, result) =
                range(&read, &Range { revision: at, ..all.clone() }, usize::MAX).expect("range");
            if at > model.revision() {
                prop_assert!(
                    matches!(result, Err(KvError::FutureRevision { .. })),
                    "at {}: {:?}",
                    at,
                    result
                );
            } else if at < model.compacted {
                prop_assert!(matches!(result, Err(KvError::Compacted { .. })), "at {}: {:?}", at, result);
            } else {
                let got: BTreeMap<Vec<u8>, Meta> =
                    result.expect("kept").kvs.iter().map(|kv| (kv.key.clone(), meta_of(kv))).collect();
                prop_assert_eq!(&model.states[at as usize], &got, "state at revision {}", at);
                // One key alone, at that revision, agrees too.
                for k in [b"a".as_slice(), b"ab", b"c"] {
                    let one = Range { key: k.to_vec(), revision: at, ..Range::default() };
                    let (_, r) = range(&read, &one, usize::MAX).expect("range");
                    let got = r.expect("kept").kvs.first().map(meta_of);
                    prop_assert_eq!(model.states[at as usize].get(k), got.as_ref(), "key {:?} at {}", k, at);
                }
            }
        }
    }
    // Every watcher gets all it is owed (or its cancellation), then is compared with the model.
    // The planted fault's watcher never gets all it is owed: its check runs after a short wait.
    let wait = if drop_events { Duration::from_secs(2) } else { Duration::from_secs(20) };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let done = watches.iter().all(|w| {
            let got = w.got.lock().expect("received");
            let owed = model
                .changes
                .iter()
                .filter(|c| {
                    c.revision >= w.start
                        && w.filter.matches(&history::Event {
                            kind: c.kind,
                            kv: KeyValue { key: c.key.clone(), ..KeyValue::default() },
                            prev_kv: None,
                        })
                })
                .count();
            got.canceled.is_some() || got.deliveries.iter().map(Vec::len).sum::<usize>() >= owed
        });
        if done {
            break;
        }
        if std::time::Instant::now() > deadline {
            let states: Vec<String> = watches
                .iter()
                .map(|w| {
                    let got = w.got.lock().expect("received");
                    let n: usize = got.deliveries.iter().map(Vec::len).sum();
                    format!("from {} {:?}: {} events, canceled {:?}", w.start, w.filter, n, got.canceled)
                })
                .collect();
            for w in &watches {
                check_watch(&model, w)?;
            }
            let txn = db.begin_read().expect("read");
            let stored = (revision(&txn).expect("rev"), compact_revision(&txn).expect("compact"));
            prop_assert!(
                false,
                "watchers did not catch up in 20 s: {:?}; model at {} compacted {}; stored {:?}; {:#?}",
                hub,
                model.revision(),
                model.compacted,
                stored,
                states
            );
        }
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
        // polling a condition, with a deadline
    }
    for w in &watches {
        check_watch(&model, w)?;
    }
    // Snapshot and restore keep the history: every kept revision reads the same.
    let read = db.begin_read().expect("read txn");
    let mut snap = Vec::new();
    store.snapshot(&read, &mut snap).expect("snapshot");
    let db2 = memory_db();
    let txn = db2.begin_write().expect("write txn");
    KvStore::default().restore(&txn, &mut snap.as_slice()).expect("restore");
    txn.commit().expect("commit");
    let read2 = db2.begin_read().expect("read txn");
    for at in model.compacted.max(1)..=model.revision() {
        let r = Range { key: vec![0], range_end: vec![0], revision: at, ..Range::default() };
        prop_assert_eq!(
            range(&read, &r, usize::MAX).expect("range"),
            range(&read2, &r, usize::MAX).expect("range")
        );
    }
    // Through etcd's database (what Maintenance.Snapshot streams) and back: it passes bbolt's
    // check, and every kept revision reads the same.
    let (layout, _) = keel_kv::etcd_db::write_db(&read, std::io::sink(), None).expect("size the db");
    let (_, bytes) = keel_kv::etcd_db::write_db(&read, Vec::new(), Some(layout)).expect("write the db");
    prop_assert_eq!(layout.bytes(), bytes.len() as u64);
    let mut file = tempfile::tempfile().expect("temp file");
    std::io::Write::write_all(&mut file, &bytes).expect("write");
    let bolt = keel_kv::bbolt::DbReader::open(file, bytes.len() as u64).expect("open the db");
    bolt.check().expect("bbolt's check");
    let db3 = memory_db();
    let txn = db3.begin_write().expect("write txn");
    keel_kv::etcd_db::import(&bolt, &txn).expect("import");
    txn.commit().expect("commit");
    let read3 = db3.begin_read().expect("read txn");
    for at in model.compacted.max(1)..=model.revision() {
        let r = Range { key: vec![0], range_end: vec![0], revision: at, ..Range::default() };
        prop_assert_eq!(
            range(&read, &r, usize::MAX).expect("range"),
            range(&read3, &r, usize::MAX).expect("range"),
            "at revision {} (compacted {})",
            at,
            model.compacted
        );
    }
    // Watches from after the compaction revision replay the same events with the same prev_kv
    // (at it, a half-done compaction may still hold what an event there replaced).
    let from = model.compacted + 1;
    prop_assert_eq!(
        history::read_events(&read, from, usize::MAX, true).expect("events"),
        history::read_events(&read3, from, usize::MAX, true).expect("events")
    );
    rt.shutdown_background();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn history_and_watches_agree_with_the_model(
        batches in prop::collection::vec(
            (prop::collection::vec(step(), 1..8), prop::collection::vec(watch_spec(), 0..3), 0usize..4),
            1..10,
        )
    ) {
        run_case(batches, false)?;
    }
}

/// The negative control: with the planted fault that drops one live event in 50, the same
/// checks fail.
#[test]
fn a_dropped_event_is_caught() {
    let watcher = WatchSpec { start_eighths: 0, keys: (b"a".to_vec(), 2), no_put: false, no_delete: false };
    let put =
        |i: u8| Step::Write(KvCommand::Put(Put { key: b"ab".to_vec(), value: vec![i], ..Put::default() }));
    let mut batches = vec![(vec![put(0)], vec![watcher], 0)];
    batches.extend((1..120).map(|i| (vec![put(i)], vec![], 0)));
    run_case(batches, true).expect_err("a dropped event must be caught");
}
