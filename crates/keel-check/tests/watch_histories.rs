//! The watch checker on generated histories: a simulated etcd store whose watchers get exactly what
//! etcd promises must pass; each planted fault (an event dropped, reordered, duplicated, split over
//! two responses, outside the range or the filters, at the wrong revision, a wrong prev_kv, a
//! watcher that never catches up, ...) must be reported with the guarantee, watcher, revision and
//! key it concerns. Every bad history is the good one with one change, so each test is also its
//! own negative control: the unchanged history passes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use keel_check::watch::{
    check_watch, EndRecord, Event, EventType, Filter, Finding, Guarantee, KeyValue, Revision, StreamClosed,
    WatchHistory, WatchRecord, WatchReport, WatchResponse, WatchStart, WatchVerdict, WatchViolation, WriteOp,
    WriteRecord,
};
use keel_check::Outcome;

/// A simulated store: applies writes, assigns revisions, keeps every revision's events.
struct Sim {
    rev: Revision,
    /// key -> (value, create revision, version, mod revision)
    keys: BTreeMap<String, (String, Revision, i64, Revision)>,
    /// Every revision's events (with prev_kv), in order.
    revisions: Vec<(Revision, Vec<Event>)>,
    records: Vec<WatchRecord>,
}

enum Write<'a> {
    Put(&'a str, &'a str),
    Delete(&'a str),
}

impl Sim {
    fn new() -> Sim {
        Sim { rev: 1, keys: BTreeMap::new(), revisions: Vec::new(), records: Vec::new() }
    }

    /// Applies `ops` as one revision; records each as a write of `outcome` (ok ones with the
    /// revision). Returns the revision.
    fn apply(&mut self, client: u64, ops: &[Write<'_>], outcome: Outcome) -> Revision {
        self.rev += 1;
        let rev = self.rev;
        let mut events = Vec::new();
        for op in ops {
            let (key, value) = match op {
                Write::Put(k, v) => (*k, Some(*v)),
                Write::Delete(k) => (*k, None),
            };
            let prev = self.keys.get(key).map(|(v, c, ver, m)| KeyValue {
                key: key.to_owned(),
                value: v.clone(),
                mod_revision: *m,
                create_revision: *c,
                version: *ver,
            });
            let event = match value {
                Some(v) => {
                    let (create, version) =
                        prev.as_ref().map_or((rev, 1), |p| (p.create_revision, p.version + 1));
                    self.keys.insert(key.to_owned(), (v.to_owned(), create, version, rev));
                    Event {
                        kind: EventType::Put,
                        key: key.to_owned(),
                        value: Some(v.to_owned()),
                        mod_revision: rev,
                        create_revision: create,
                        version,
                        prev_kv: prev,
                    }
                }
                None => {
                    self.keys.remove(key);
                    Event {
                        kind: EventType::Delete,
                        key: key.to_owned(),
                        value: None,
                        mod_revision: rev,
                        create_revision: 0,
                        version: 0,
                        prev_kv: prev,
                    }
                }
            };
            events.push(event);
            self.records.push(WatchRecord::Write(WriteRecord {
                client,
                op: if value.is_some() { WriteOp::Put } else { WriteOp::Delete },
                key: key.to_owned(),
                value: value.map(str::to_owned),
                outcome,
                revision: (outcome == Outcome::Ok).then_some(rev),
            }));
        }
        self.revisions.push((rev, events));
        rev
    }

    fn put(&mut self, client: u64, key: &str, value: &str) -> Revision {
        self.apply(client, &[Write::Put(key, value)], Outcome::Ok)
    }

    /// A write the client never heard back about, and which did not happen.
    fn lost(&mut self, client: u64, key: &str, value: &str, outcome: Outcome) {
        self.records.push(WatchRecord::Write(WriteRecord {
            client,
            op: WriteOp::Put,
            key: key.to_owned(),
            value: Some(value.to_owned()),
            outcome,
            revision: None,
        }));
    }

    /// Records one stream of `watcher`: the request, its created response, one response per
    /// revision with events in `from..=to`, and a progress notification at `to` if asked.
    fn stream(&mut self, request: WatchStart, to: Revision, progress: bool) {
        let watcher = request.watcher;
        let from =
            if request.start_revision > 0 { request.start_revision } else { self.rev_at_creation(to) + 1 };
        self.records.push(WatchRecord::Watch(request.clone()));
        self.records.push(WatchRecord::Response(response(watcher, from - 1, vec![], true)));
        for (rev, events) in &self.revisions {
            if *rev < from || *rev > to {
                continue;
            }
            let delivered: Vec<Event> = events
                .iter()
                .filter(|e| watches(&request, &e.key) && !filtered(&request, e.kind))
                .map(|e| Event {
                    prev_kv: if request.prev_kv { e.prev_kv.clone() } else { None },
                    ..e.clone()
                })
                .collect();
            if !delivered.is_empty() {
                self.records.push(WatchRecord::Response(response(watcher, *rev, delivered, false)));
            }
        }
        if progress {
            self.records.push(WatchRecord::Response(response(watcher, to, vec![], false)));
        }
    }

    /// For "from now" watches in these tests: created just before revision 6.
    fn rev_at_creation(&self, _to: Revision) -> Revision {
        5
    }

    fn closed(&mut self, watcher: u64) {
        self.records.push(WatchRecord::Closed(StreamClosed {
            watcher,
            reason: "connection reset".into(),
            at_us: None,
        }));
    }

    fn history(&self) -> WatchHistory {
        WatchHistory { records: self.records.clone() }
    }
}

fn response(watcher: u64, revision: Revision, events: Vec<Event>, created: bool) -> WatchResponse {
    WatchResponse {
        watcher,
        revision,
        events,
        created,
        canceled: false,
        compact_revision: 0,
        cancel_reason: String::new(),
        at_us: None,
    }
}

fn watches(w: &WatchStart, key: &str) -> bool {
    match w.range_end.as_str() {
        "" => key == w.key,
        "\0" => key >= w.key.as_str(),
        end => key >= w.key.as_str() && key < end,
    }
}

fn filtered(w: &WatchStart, kind: EventType) -> bool {
    w.filters.contains(&match kind {
        EventType::Put => Filter::NoPut,
        EventType::Delete => Filter::NoDelete,
    })
}

fn watch(watcher: u64, key: &str, range_end: &str, start_revision: Revision) -> WatchStart {
    WatchStart {
        watcher,
        key: key.into(),
        range_end: range_end.into(),
        start_revision,
        filters: vec![],
        prev_kv: true,
        progress_notify: false,
        node: None,
        at_us: None,
    }
}

/// The good history every test starts from. Revisions:
/// 2 k0=a, 3 k1=b, 4 k2=c, 5 k0=d, 6 txn{k1=e, k2=f}, 7 delete k1, 8 k1=g (re-created),
/// 9 k0=u (unknown outcome, happened), 10 k2=h, 11 k0=i. Also an unknown write of k1=lost and a
/// failed write of k2=nope that never happened.
///
/// Watchers: 1 watches prefix "k" from 1 and reconnects after revision 6 (from 7), ending with a
/// progress notification; 2 watches "k1" alone from 1; 3 watches ["k0", "k2") from 1 without
/// deletes and without prev_kv; 4 watches everything from "now" (revision 6 on).
fn good() -> Sim {
    let mut s = Sim::new();
    s.put(1, "k0", "a");
    s.put(2, "k1", "b");
    s.put(3, "k2", "c");
    s.put(1, "k0", "d");
    s.apply(2, &[Write::Put("k1", "e"), Write::Put("k2", "f")], Outcome::Ok);
    s.apply(3, &[Write::Delete("k1")], Outcome::Ok);
    s.put(1, "k1", "g");
    s.apply(2, &[Write::Put("k0", "u")], Outcome::Unknown);
    s.put(3, "k2", "h");
    s.put(1, "k0", "i");
    s.lost(2, "k1", "lost", Outcome::Unknown);
    s.lost(3, "k2", "nope", Outcome::Fail);
    let end = s.rev;
    assert_eq!(end, 11);

    s.stream(watch(1, "k", "l", 1), 6, false);
    s.closed(1);
    s.stream(WatchStart { node: Some("n2".into()), ..watch(1, "k", "l", 7) }, end, true);
    s.stream(watch(2, "k1", "", 1), 8, false);
    s.stream(
        WatchStart { filters: vec![Filter::NoDelete], prev_kv: false, ..watch(3, "k0", "k2", 1) },
        end,
        false,
    );
    s.stream(watch(4, "k", "\0", 0), end, false);
    s.records.push(WatchRecord::End(EndRecord { revision: end }));
    s
}

fn check(h: &WatchHistory) -> WatchReport {
    check_watch(h).expect("a valid history")
}

fn assert_valid(h: &WatchHistory) {
    let report = check(h);
    assert_eq!(report.verdict, WatchVerdict::Valid, "{report}");
    assert!(report.violations.is_empty());
}

/// Asserts that a violation of `guarantee` about (watcher, revision, key) is reported, that its
/// message names all three, and returns it.
fn assert_caught(
    h: &WatchHistory,
    guarantee: Guarantee,
    watcher: u64,
    revision: Revision,
    key: &str,
) -> WatchViolation {
    let report = check(h);
    assert_eq!(report.verdict, WatchVerdict::Invalid, "{report}");
    let v = report
        .violations
        .iter()
        .find(|v| {
            v.guarantee == guarantee && v.watcher == Some(watcher) && v.revision == revision && v.key == key
        })
        .unwrap_or_else(|| {
            panic!("no {guarantee} violation for watcher {watcher} at {revision} {key:?}:\n{report}")
        })
        .clone();
    let text = v.to_string();
    for needle in [
        format!("{guarantee}:"),
        format!("watcher {watcher}"),
        format!("revision {revision}"),
        format!("{key:?}"),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in {text:?}");
    }
    assert!(report.to_string().contains(&text), "the text report shows it:\n{report}");
    v
}

/// Guarantees reported, with their counts.
fn guarantees(h: &WatchHistory) -> BTreeMap<Guarantee, usize> {
    check(h).counts()
}

/// The index of the response of `watcher` that holds the event (revision, key).
fn response_with(h: &WatchHistory, watcher: u64, revision: Revision, key: &str) -> usize {
    h.records
        .iter()
        .position(|r| match r {
            WatchRecord::Response(resp) => {
                resp.watcher == watcher
                    && resp.events.iter().any(|e| e.mod_revision == revision && e.key == key)
            }
            _ => false,
        })
        .unwrap_or_else(|| panic!("watcher {watcher} got no event ({revision}, {key:?})"))
}

fn resp_mut(h: &mut WatchHistory, i: usize) -> &mut WatchResponse {
    match &mut h.records[i] {
        WatchRecord::Response(r) => r,
        other => panic!("record #{i} is not a response: {other:?}"),
    }
}

/// Removes the event (revision, key) from watcher's response; drops the response if it empties.
fn drop_event(h: &mut WatchHistory, watcher: u64, revision: Revision, key: &str) {
    let i = response_with(h, watcher, revision, key);
    let r = resp_mut(h, i);
    r.events.retain(|e| !(e.mod_revision == revision && e.key == key));
    if r.events.is_empty() {
        h.records.remove(i);
    }
}

#[test]
fn the_good_history_passes() {
    let h = good().history();
    let report = check(&h);
    assert_eq!(report.verdict, WatchVerdict::Valid, "{report}");
    let s = &report.summary;
    assert_eq!((s.watchers, s.streams, s.progress_notifications), (4, 5, 1));
    assert_eq!(s.known_events, 11);
    assert_eq!((s.acknowledged, s.unknown, s.failed, s.unknown_writes_seen), (10, 2, 1, 1));
    assert!(report.to_string().contains("verdict: WATCH VALID"), "{report}");
}

#[test]
fn a_history_survives_the_file_format() {
    let h = good().history();
    let mut bytes = Vec::new();
    h.write_to(&mut bytes).expect("in memory");
    let back = WatchHistory::read_from(bytes.as_slice()).expect("valid");
    assert_eq!(back, h);
}

#[test]
fn no_watchers_and_no_writes_pass() {
    assert_valid(&WatchHistory::default());
}

#[test]
fn dropped_event_is_missing() {
    let mut h = good().history();
    drop_event(&mut h, 1, 10, "k2");
    let v = assert_caught(&h, Guarantee::Reliable, 1, 10, "k2");
    // Every other watcher of k2 got it, and the write was acknowledged: the witness is the write.
    assert!(matches!(v.finding, Finding::Missing { from: 7, to: 11, .. }), "{v}");
    assert!(v.to_string().contains("missing PUT \"k2\" = \"h\""), "{v}");
    assert!(v.to_string().contains("acknowledged write of client 3"), "{v}");
}

#[test]
fn dropped_event_of_an_unknown_write_is_missing_by_another_watchers_witness() {
    // Revision 9 is an unknown write only watchers know of.
    let mut h = good().history();
    drop_event(&mut h, 4, 9, "k0");
    let v = assert_caught(&h, Guarantee::Reliable, 4, 9, "k0");
    assert!(v.to_string().contains("delivered to watcher"), "{v}");
}

#[test]
fn event_every_watcher_missed_is_caught_by_its_acknowledged_write() {
    let mut h = good().history();
    // Watcher 4 started after it.
    for w in [1, 3] {
        drop_event(&mut h, w, 5, "k0");
    }
    for w in [1, 3] {
        let v = assert_caught(&h, Guarantee::Reliable, w, 5, "k0");
        assert!(v.to_string().contains("acknowledged write of client 1"), "{v}");
    }
}

#[test]
fn missing_first_event_after_a_reconnect() {
    // The stream resumed from 7 but its first event is 8: revision 7 (delete k1) is missing.
    let mut h = good().history();
    drop_event(&mut h, 1, 7, "k1");
    let v = assert_caught(&h, Guarantee::Reliable, 1, 7, "k1");
    assert!(v.to_string().contains("missing DELETE \"k1\""), "{v}");
}

#[test]
fn dropped_last_event_is_caught_by_the_progress_notification() {
    // Nothing after revision 11 in the stream would show it missing, but the progress
    // notification at 11 promises it was delivered.
    let mut h = good().history();
    drop_event(&mut h, 1, 11, "k0");
    assert_caught(&h, Guarantee::Reliable, 1, 11, "k0");
}

#[test]
fn reordered_responses() {
    let mut h = good().history();
    let a = response_with(&h, 4, 8, "k1");
    let b = response_with(&h, 4, 10, "k2");
    h.records.swap(a, b);
    assert_caught(&h, Guarantee::Ordered, 4, 8, "k1");
}

#[test]
fn reordered_events_within_a_response() {
    let mut h = good().history();
    let a = response_with(&h, 2, 3, "k1");
    let b = response_with(&h, 2, 6, "k1");
    let later = resp_mut(&mut h, b).events.remove(0);
    resp_mut(&mut h, a).events.insert(0, later);
    h.records.remove(b);
    assert_caught(&h, Guarantee::Ordered, 2, 3, "k1");
}

#[test]
fn duplicate_event() {
    let mut h = good().history();
    let i = response_with(&h, 3, 5, "k0");
    let copy = h.records[i].clone();
    h.records.insert(i + 1, copy);
    let v = assert_caught(&h, Guarantee::Unique, 3, 5, "k0");
    assert_eq!(v.finding, Finding::Duplicate { first_record: i });
}

#[test]
fn duplicate_after_a_reconnect_that_resumed_correctly() {
    // Watcher 1 resumed from 7; the new stream delivers 6 again.
    let mut h = good().history();
    let old = response_with(&h, 1, 6, "k1");
    let replay = h.records[old].clone();
    let first_new = response_with(&h, 1, 7, "k1");
    h.records.insert(first_new, replay);
    assert_caught(&h, Guarantee::Unique, 1, 6, "k1");
    assert_caught(&h, Guarantee::Resumable, 1, 6, "k1");
}

#[test]
fn a_stream_that_starts_early_may_deliver_again() {
    // A runner that resumes from an older revision gets the events again: not a duplicate.
    let mut s = good();
    s.closed(2);
    s.stream(watch(2, "k1", "", 6), 8, false);
    assert_valid(&s.history());
}

#[test]
fn split_revision() {
    // Revision 6 wrote k1 and k2 in one txn; the watcher gets them in two responses.
    let mut h = good().history();
    let i = response_with(&h, 4, 6, "k2");
    let second = resp_mut(&mut h, i).events.remove(1);
    assert_eq!(second.key, "k2");
    h.records.insert(i + 1, WatchRecord::Response(response(4, 6, vec![second], false)));
    let v = assert_caught(&h, Guarantee::Atomic, 4, 6, "k2");
    assert_eq!(v.finding, Finding::SplitRevision { first_record: i });
}

#[test]
fn filtered_event_type_delivered() {
    // Watcher 3 filters out deletes; give it the delete of k1 at 7.
    let mut h = good().history();
    let delete = {
        let i = response_with(&h, 4, 7, "k1");
        resp_mut(&mut h, i).events[0].clone()
    };
    let at = response_with(&h, 3, 8, "k1");
    h.records
        .insert(at, WatchRecord::Response(response(3, 7, vec![Event { prev_kv: None, ..delete }], false)));
    let v = assert_caught(&h, Guarantee::Filtered, 3, 7, "k1");
    assert!(v.to_string().contains("filters out DELETE events"), "{v}");
}

#[test]
fn key_outside_the_range() {
    // Watcher 3 watches ["k0", "k2"): give it k2's event at 10 in its own response.
    let mut h = good().history();
    let event = {
        let i = response_with(&h, 4, 10, "k2");
        resp_mut(&mut h, i).events[0].clone()
    };
    let at = response_with(&h, 3, 11, "k0");
    h.records
        .insert(at, WatchRecord::Response(response(3, 10, vec![Event { prev_kv: None, ..event }], false)));
    let v = assert_caught(&h, Guarantee::Filtered, 3, 10, "k2");
    assert!(v.to_string().contains("outside the watched range [\"k0\", \"k2\")"), "{v}");
}

#[test]
fn single_key_watch_gets_another_key() {
    let mut h = good().history();
    let i = response_with(&h, 2, 3, "k1");
    resp_mut(&mut h, i).events[0].key = "k10".into();
    let v = assert_caught(&h, Guarantee::Filtered, 2, 3, "k10");
    assert!(v.to_string().contains("outside the watched range \"k1\""), "{v}");
    // And k1's own event at 3 is now missing from it.
    assert_caught(&h, Guarantee::Reliable, 2, 3, "k1");
}

#[test]
fn event_before_the_start_revision() {
    let mut s = good();
    s.closed(2);
    s.stream(watch(2, "k1", "", 9), 11, true);
    let mut h = s.history();
    // The last stream started at 9; slip in k1's event at 8 first.
    let old = response_with(&h, 2, 8, "k1");
    let replay = h.records[old].clone();
    let at = h.records.len() - 1; // after the last stream's created response, before its progress
    h.records.insert(at, replay);
    let v = assert_caught(&h, Guarantee::Resumable, 2, 8, "k1");
    assert!(matches!(v.finding, Finding::BeforeStart { start: 9, .. }), "{v}");
}

#[test]
fn event_after_a_progress_notification_that_covered_it() {
    let mut h = good().history();
    // Watcher 3 is told "everything up to 8 delivered" before its event at 5.
    let i = response_with(&h, 3, 5, "k0");
    h.records.insert(i, WatchRecord::Response(response(3, 8, vec![], false)));
    let v = assert_caught(&h, Guarantee::Bookmarkable, 3, 5, "k0");
    assert!(matches!(v.finding, Finding::AfterProgress { progress: 8, .. }), "{v}");
}

#[test]
fn event_with_the_wrong_value_for_an_acknowledged_revision() {
    let mut h = good().history();
    let i = response_with(&h, 4, 10, "k2");
    resp_mut(&mut h, i).events[0].value = Some("f".into());
    let v = assert_caught(&h, Guarantee::Consistent, 4, 10, "k2");
    assert!(v.to_string().contains("acknowledged for PUT \"k2\" = \"h\""), "{v}");
}

#[test]
fn watchers_disagree_on_an_unacknowledged_revision() {
    // Revision 9 is an unknown write; watcher 4 says it wrote another value than watcher 1 saw.
    let mut h = good().history();
    let i = response_with(&h, 4, 9, "k0");
    resp_mut(&mut h, i).events[0].value = Some("lost".into());
    let report = check(&h);
    assert!(
        report.violations.iter().any(|v| v.guarantee == Guarantee::Consistent
            && matches!(v.finding, Finding::Disagree { .. } | Finding::Phantom { .. })),
        "{report}"
    );
}

#[test]
fn phantom_value() {
    let mut h = good().history();
    for w in [1, 3, 4] {
        let i = response_with(&h, w, 11, "k0");
        resp_mut(&mut h, i).events[0].value = Some("never-written".into());
    }
    // The acknowledged write of 11 says otherwise too.
    let v = assert_caught(&h, Guarantee::Consistent, 1, 11, "k0");
    assert!(v.to_string().contains("acknowledged for PUT \"k0\" = \"i\""), "{v}");
}

#[test]
fn phantom_value_at_an_unacknowledged_revision() {
    // An extra revision 12 nobody wrote, delivered to watcher 4 only.
    let mut s = good();
    s.records.retain(|r| !matches!(r, WatchRecord::End(_)));
    let event = Event {
        kind: EventType::Put,
        key: "k2".into(),
        value: Some("nope".into()),
        mod_revision: 12,
        create_revision: 4,
        version: 4,
        prev_kv: None,
    };
    s.records.push(WatchRecord::Response(response(4, 12, vec![event], false)));
    let v = assert_caught(&s.history(), Guarantee::Consistent, 4, 12, "k2");
    assert!(v.to_string().contains("written only by writes that failed"), "{v}");
}

#[test]
fn acknowledged_value_delivered_at_another_revision() {
    let mut h = good().history();
    // Watcher 2 says k1=g happened at 8 ... and again at 9.
    let i = response_with(&h, 2, 8, "k1");
    let mut again = match &h.records[i] {
        WatchRecord::Response(r) => r.clone(),
        _ => unreachable!(),
    };
    again.revision = 9;
    again.events[0].mod_revision = 9;
    again.events[0].version = 2;
    again.events[0].prev_kv = None;
    h.records.insert(i + 1, WatchRecord::Response(again));
    let v = assert_caught(&h, Guarantee::Consistent, 2, 9, "k1");
    assert!(matches!(v.finding, Finding::WrongRevision { acknowledged: 8, .. }), "{v}");
}

#[test]
fn version_that_does_not_follow() {
    let mut h = good().history();
    let i = response_with(&h, 4, 10, "k2");
    resp_mut(&mut h, i).events[0].version = 7;
    let report = check(&h);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.guarantee == Guarantee::Consistent && v.revision == 10 && v.key == "k2"),
        "{report}"
    );
}

#[test]
fn wrong_prev_kv() {
    let mut h = good().history();
    let i = response_with(&h, 1, 5, "k0");
    let prev = resp_mut(&mut h, i).events[0].prev_kv.as_mut().expect("requested");
    prev.value = "zzz".into();
    let v = assert_caught(&h, Guarantee::PrevKv, 1, 5, "k0");
    assert!(v.to_string().contains("prev_kv holds \"zzz\" from revision 2, which wrote \"a\""), "{v}");
}

#[test]
fn stale_prev_kv() {
    let mut h = good().history();
    // k0 at 11: prev_kv should be revision 9 (k0=u), not revision 5.
    let i = response_with(&h, 4, 11, "k0");
    let prev = resp_mut(&mut h, i).events[0].prev_kv.as_mut().expect("requested");
    *prev = KeyValue { key: "k0".into(), value: "d".into(), mod_revision: 5, create_revision: 2, version: 3 };
    let v = assert_caught(&h, Guarantee::PrevKv, 4, 11, "k0");
    assert!(v.to_string().contains("the key changed after it, at revision 9"), "{v}");
}

#[test]
fn missing_prev_kv_on_a_delete() {
    let mut h = good().history();
    let i = response_with(&h, 2, 7, "k1");
    resp_mut(&mut h, i).events[0].prev_kv = None;
    assert_caught(&h, Guarantee::PrevKv, 2, 7, "k1");
}

#[test]
fn prev_kv_on_a_create() {
    let mut h = good().history();
    let i = response_with(&h, 2, 8, "k1");
    resp_mut(&mut h, i).events[0].prev_kv = Some(KeyValue {
        key: "k1".into(),
        value: "e".into(),
        mod_revision: 6,
        create_revision: 3,
        version: 2,
    });
    assert_caught(&h, Guarantee::PrevKv, 2, 8, "k1");
}

#[test]
fn watcher_that_never_caught_up() {
    // Watcher 3's stream stops after k1's event at 8; the run ended at 11, with k0 written at 9 and 11.
    let mut h = good().history();
    drop_event(&mut h, 3, 11, "k0");
    drop_event(&mut h, 3, 9, "k0");
    let v = assert_caught(&h, Guarantee::Reliable, 3, 9, "k0");
    assert!(matches!(v.finding, Finding::Stalled { reached: 8, end: 11, .. }), "{v}");
    // Without the end record nothing shows it: the stream observed up to 8 and has everything.
    h.records.retain(|r| !matches!(r, WatchRecord::End(_)));
    assert_valid(&h);
}

#[test]
fn unknown_writes_may_or_may_not_show_up() {
    // The good history has one unknown write delivered (9) and one never seen; also fine: an
    // unknown write that shows up only at the end.
    let mut s = good();
    s.records.retain(|r| !matches!(r, WatchRecord::End(_)));
    s.apply(2, &[Write::Put("k1", "late")], Outcome::Unknown);
    s.stream(watch(5, "k", "l", 1), s.rev, false);
    assert_valid(&s.history());
}

#[test]
fn a_compacted_stream_and_its_resume_are_fine() {
    let mut s = good();
    s.records.retain(|r| !matches!(r, WatchRecord::End(_)));
    s.records.push(WatchRecord::Watch(watch(6, "k", "l", 2)));
    s.records.push(WatchRecord::Response(WatchResponse {
        canceled: true,
        compact_revision: 9,
        cancel_reason: "required revision has been compacted".into(),
        ..response(6, 11, vec![], false)
    }));
    s.stream(watch(6, "k", "l", 9), 11, false);
    s.records.push(WatchRecord::End(EndRecord { revision: 11 }));
    let report = check(&s.history());
    assert_eq!(report.verdict, WatchVerdict::Valid, "{report}");
    assert_eq!(report.summary.compacted, 1);
}

#[test]
fn the_json_report_names_the_guarantee() {
    let mut h = good().history();
    drop_event(&mut h, 2, 6, "k1");
    let report = check(&h);
    let json = serde_json::to_value(&report).expect("serializable");
    assert_eq!(json["verdict"], "invalid");
    let v = &json["violations"][0];
    assert_eq!(v["guarantee"], "reliable");
    assert_eq!(v["watcher"], 2);
    assert_eq!(v["revision"], 6);
    assert_eq!(v["key"], "k1");
    assert_eq!(v["finding"]["kind"], "missing");
    assert_eq!(guarantees(&h), BTreeMap::from([(Guarantee::Reliable, 1)]));
}

// ---- the binary: `keel-check watch FILE` -------------------------------------------------------

fn watch_file(name: &str, h: &WatchHistory) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keel-check-watch");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    let mut bytes = Vec::new();
    h.write_to(&mut bytes).expect("in memory");
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

fn keel_check_watch(path: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-check")).arg("watch").arg(path).args(extra).output().expect("runs")
}

#[test]
fn cli_valid_watch_history_exits_0() {
    let out = keel_check_watch(&watch_file("good.jsonl", &good().history()), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("violations: none"), "{stdout}");
    assert!(stdout.contains("verdict: WATCH VALID"), "{stdout}");
}

#[test]
fn cli_dropped_event_exits_1_and_names_it() {
    let mut h = good().history();
    drop_event(&mut h, 1, 10, "k2");
    let path = watch_file("dropped.jsonl", &h);
    let out = keel_check_watch(&path, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("reliable: watcher 1, revision 10, key \"k2\""), "{stdout}");
    assert!(stdout.contains("verdict: WATCH INVALID"), "{stdout}");
    let out = keel_check_watch(&path, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["violations"][0]["finding"]["kind"], "missing");
}

#[test]
fn cli_bad_watch_history_exits_2_naming_the_line() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keel-check-watch");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"kind\":\"watch\",\"watcher\":1,\"key\":\"k\",\"start_revision\":1}\n{\"kind\":\"response\",\"watcher\":1,\"revision\":2,\"events\":[{\"type\":\"put\",\"key\":\"k\",\"mod_revision\":2}]}\n",
    )
    .expect("scratch file");
    let out = keel_check_watch(&path, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2: a put event needs a \"value\""), "{stderr}");
}
