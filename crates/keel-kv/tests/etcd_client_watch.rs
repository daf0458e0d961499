//! etcd's Watch API through the Rust `etcd-client` crate, unmodified, against a 3-node cluster of
//! real keeld processes: history replayed then live, prev_kv, filters, watch ids, cancel,
//! progress requests and notifications, the cancel for a start below the compaction, watches on a
//! follower, order without gaps under concurrent writers, a revision's events in one response,
//! fragments, and a watcher that does not read while thousands of writes happen. And the HTTP
//! watch (server-sent events) over a plain TCP stream.
//!
//! The scenarios whose outcome etcd defines exactly run against etcd 3.4 first (Debian's
//! `etcd-server`, a single member; `scripts/test` installs it): what they assert is what etcd
//! answers, checked each time, and then asserted of keeld.

mod procs;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::Read as _;
use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use etcd_client::Client;
use etcd_client::CompactionOptions;
use etcd_client::EventType;
use etcd_client::GetOptions;
use etcd_client::PutOptions;
use etcd_client::Txn;
use etcd_client::TxnOp;
use etcd_client::WatchFilterType;
use etcd_client::WatchOptions;
use etcd_client::WatchResponse;
use etcd_client::WatchStream;
use procs::Etcd;
use procs::Procs;
use procs::DEADLINE;
use serde_json::Value;

const ALL: [u64; 3] = [1, 2, 3];

/// A system the scenarios run against: where to write, and the members to watch on (keeld's
/// leader and a follower; etcd's one member twice, so that both run the same steps).
struct Sys {
    name: &'static str,
    writer: String,
    watchers: Vec<String>,
}

impl Sys {
    fn etcd(e: &Etcd) -> Sys {
        let ep = format!("http://{}", e.client);
        Sys { name: "etcd", writer: ep.clone(), watchers: vec![ep.clone(), ep] }
    }

    fn keel(p: &mut Procs) -> Sys {
        let leader = p.wait_leader(&ALL, DEADLINE);
        let follower = ALL.into_iter().find(|id| *id != leader).expect("a follower");
        let ep = |id: u64| format!("http://{}", p.client(id));
        Sys { name: "keeld", writer: ep(leader), watchers: vec![ep(leader), ep(follower)] }
    }
}

/// keeld's default timing, and progress notifications every 300 ms (etcd's flag below).
const KEEL_CONFIG: &str = "watch_progress_notify_interval_ms = 300\n";
const ETCD_FLAGS: [&str; 1] = ["--experimental-watch-progress-notify-interval=300ms"];

fn start_keel() -> (Procs, Sys) {
    let mut p = Procs::start(3, 0, KEEL_CONFIG);
    let s = Sys::keel(&mut p);
    (p, s)
}

async fn connect(ep: &str) -> Client {
    Client::connect([ep], None).await.unwrap_or_else(|e| panic!("connect to {ep}: {e}"))
}

/// How long a test waits for one watch response.
const WAIT: Duration = Duration::from_secs(20);

/// The next response on `s`, or the test fails after [`WAIT`].
async fn next(s: &mut WatchStream, what: &str) -> WatchResponse {
    match tokio::time::timeout(WAIT, s.message()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => panic!("{what}: the watch stream ended"),
        Ok(Err(e)) => panic!("{what}: the watch stream failed: {e}"),
        Err(_) => panic!("{what}: no watch response in {WAIT:?}"),
    }
}

/// One event, as a test compares it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ev {
    rev: i64,
    kind: &'static str,
    key: String,
    value: String,
    /// prev_kv's value, if the event has one.
    prev: Option<String>,
}

fn ev(rev: i64, kind: &'static str, key: &str, value: &str, prev: Option<&str>) -> Ev {
    Ev { rev, kind, key: key.into(), value: value.into(), prev: prev.map(Into::into) }
}

fn events(r: &WatchResponse) -> Vec<Ev> {
    r.events()
        .iter()
        .map(|e| {
            let kv = e.kv().expect("an event has a kv");
            Ev {
                rev: kv.mod_revision(),
                kind: match e.event_type() {
                    EventType::Put => "PUT",
                    EventType::Delete => "DELETE",
                },
                key: kv.key_str().expect("utf8 key").to_string(),
                value: kv.value_str().expect("utf8 value").to_string(),
                prev: e.prev_kv().map(|p| p.value_str().expect("utf8 value").to_string()),
            }
        })
        .collect()
}

fn header_rev(r: &WatchResponse) -> i64 {
    r.header().expect("a header").revision()
}

/// The created response of a new watch: its id.
#[track_caller]
fn created(r: &WatchResponse, what: &str) -> i64 {
    assert!(
        r.created() && !r.canceled() && r.events().is_empty(),
        "{what}: expected a created response, got {r:?}"
    );
    r.watch_id()
}

/// The store's revision, as a linearizable read through `kv` answers it (and then the member
/// that answered has applied everything up to it).
async fn revision(kv: &mut Client) -> i64 {
    kv.get("revision-of-the-store", None).await.expect("get").header().expect("header").revision()
}

fn code(e: etcd_client::Error) -> (tonic::Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios whose answers etcd defines: run against etcd, then keeld
// ---------------------------------------------------------------------------------------------

/// A watch from an old revision replays history (with prev_kv), then goes on live; a watch from
/// now sees only what comes after its created response.
async fn history_then_live(s: &Sys) {
    let name = s.name;
    let mut kv = connect(&s.writer).await;
    let base = revision(&mut kv).await;
    kv.put("h/a", "1", None).await.expect("put"); // base + 1
    kv.put("h/b", "2", None).await.expect("put"); // 2
    kv.put("h/a", "3", None).await.expect("put"); // 3
    kv.delete("h/b", None).await.expect("delete"); // 4
    let txn = Txn::new().and_then([TxnOp::put("h/d", "4", None), TxnOp::put("h/c", "5", None)]);
    kv.txn(txn).await.expect("txn"); // 5: two keys, events in the order written
    let history = vec![
        ev(base + 1, "PUT", "h/a", "1", None),
        ev(base + 2, "PUT", "h/b", "2", None),
        ev(base + 3, "PUT", "h/a", "3", Some("1")),
        ev(base + 4, "DELETE", "h/b", "", Some("2")),
        ev(base + 5, "PUT", "h/d", "4", None),
        ev(base + 5, "PUT", "h/c", "5", None),
    ];

    let mut streams = Vec::new();
    for ep in &s.watchers {
        let what = format!("{name} at {ep}");
        let mut c = connect(ep).await;
        assert_eq!(base + 5, revision(&mut c).await, "{what}: has applied the writes");
        let opts = WatchOptions::new().with_prefix().with_start_revision(base + 1).with_prev_key();
        let mut w = c.watch("h/", Some(opts)).await.expect("watch");
        let r = next(&mut w, &what).await;
        assert_eq!(0, created(&r, &what), "{what}: the first watch id of a stream");
        assert_eq!(base + 5, header_rev(&r), "{what}: created at the store's revision");
        // The replay: every event from base + 1 on, in order, a revision never split.
        let mut got = Vec::new();
        while got.len() < history.len() {
            let r = next(&mut w, &what).await;
            assert_eq!((0, false), (r.watch_id(), r.canceled()), "{what}: {r:?}");
            let evs = events(&r);
            assert!(!evs.is_empty(), "{what}: an empty response during the replay: {r:?}");
            assert!(header_rev(&r) >= evs.last().expect("events").rev, "{what}: {r:?}");
            got.extend(evs);
        }
        assert_eq!(history, got, "{what}: the replay");
        // A second watch on the same stream, from now.
        w.watch("h/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        let r = next(&mut w, &what).await;
        assert_eq!(1, created(&r, &what), "{what}: the next id");
        assert_eq!(base + 5, header_rev(&r), "{what}");
        streams.push((what, w));
    }
    kv.put("h/e", "6", Some(PutOptions::new())).await.expect("put"); // 6
    for (what, w) in &mut streams {
        let mut by_id = BTreeMap::new();
        while by_id.len() < 2 {
            let r = next(w, what).await;
            assert_eq!(base + 6, header_rev(&r), "{what}: {r:?}");
            assert!(by_id.insert(r.watch_id(), events(&r)).is_none(), "{what}: twice for one watch: {r:?}");
        }
        let live = ev(base + 6, "PUT", "h/e", "6", None);
        let with_prev = live.clone(); // h/e is new: no prev_kv even where asked
        assert_eq!(BTreeMap::from([(0, vec![with_prev]), (1, vec![live])]), by_id, "{what}: live");
    }
}

/// Client-chosen and server-chosen watch ids, refused creates, filters, prev_kv, cancel, and a
/// progress request, on one stream.
async fn ids_filters_cancel_and_progress(s: &Sys) {
    let name = s.name;
    let mut kv = connect(&s.writer).await;
    for ep in &s.watchers {
        let what = format!("{name} at {ep}");
        let mut c = connect(ep).await;
        revision(&mut c).await; // this member has applied everything written so far
        let prefix = WatchOptions::new().with_prefix();
        let mut w = c.watch("f/", Some(prefix.clone().with_prev_key())).await.expect("watch");
        assert_eq!(0, created(&next(&mut w, &what).await, &what), "{what}");
        let no_put = prefix.clone().with_filters([WatchFilterType::NoPut]).with_watch_id(100);
        w.watch("f/", Some(no_put)).await.expect("watch");
        assert_eq!(100, created(&next(&mut w, &what).await, &what), "{what}: the id the client chose");
        w.watch("f/", Some(prefix.clone().with_filters([WatchFilterType::NoDelete]))).await.expect("watch");
        assert_eq!(1, created(&next(&mut w, &what).await, &what), "{what}: the next free id");

        // Refused: an id in use.
        w.watch("f/", Some(prefix.clone().with_watch_id(100))).await.expect("watch");
        let r = next(&mut w, &what).await;
        assert_eq!(
            (true, true, -1, "mvcc: duplicate watch ID provided on the WatchStream"),
            (r.created(), r.canceled(), r.watch_id(), r.cancel_reason()),
            "{what}: a duplicate id: {r:?}"
        );

        let base = revision(&mut kv).await;
        kv.put("f/a", "1", None).await.expect("put"); // base + 1
        kv.put("f/a", "2", None).await.expect("put"); // 2
        kv.delete("f/a", None).await.expect("delete"); // 3
        kv.put("f/b", "3", None).await.expect("put"); // 4
        let mut by_id: BTreeMap<i64, Vec<Ev>> = BTreeMap::new();
        let wanted = |m: &BTreeMap<i64, Vec<Ev>>| m.values().map(Vec::len).sum::<usize>() >= 4 + 1 + 3;
        while !wanted(&by_id) {
            let r = next(&mut w, &what).await;
            by_id.entry(r.watch_id()).or_default().extend(events(&r));
        }
        let all = vec![
            ev(base + 1, "PUT", "f/a", "1", None),
            ev(base + 2, "PUT", "f/a", "2", Some("1")),
            ev(base + 3, "DELETE", "f/a", "", Some("2")),
            ev(base + 4, "PUT", "f/b", "3", None),
        ];
        let no_prev = |e: &Ev| Ev { prev: None, ..e.clone() };
        let expected = BTreeMap::from([
            (0, all.clone()),
            (100, vec![no_prev(&all[2])]),
            (1, vec![no_prev(&all[0]), no_prev(&all[1]), no_prev(&all[3])]),
        ]);
        assert_eq!(expected, by_id, "{what}: prev_kv and filters");

        // Cancel: answered, and the watch sees nothing more.
        w.cancel(0).await.expect("cancel");
        let r = next(&mut w, &what).await;
        assert_eq!((0, true, false), (r.watch_id(), r.canceled(), r.created()), "{what}: cancel: {r:?}");
        w.cancel(1).await.expect("cancel");
        let r = next(&mut w, &what).await;
        assert_eq!((1, true), (r.watch_id(), r.canceled()), "{what}: cancel: {r:?}");
        w.watch("f/", Some(prefix.clone().with_watch_id(7))).await.expect("watch");
        let fresh = created(&next(&mut w, &what).await, &what);

        // A cancel of an id that is not there is not answered: the progress answer comes next.
        w.cancel(999).await.expect("cancel");
        w.request_progress().await.expect("progress");
        let r = next(&mut w, &what).await;
        assert_eq!(
            (-1, false, false, 0, base + 4),
            (r.watch_id(), r.created(), r.canceled(), r.events().len(), header_rev(&r)),
            "{what}: the progress answer: {r:?}"
        );

        kv.put("f/c", "4", None).await.expect("put"); // 5
        kv.delete("f/c", None).await.expect("delete"); // 6
        let mut by_id: BTreeMap<i64, Vec<Ev>> = BTreeMap::new();
        while by_id.values().map(Vec::len).sum::<usize>() < 3 {
            let r = next(&mut w, &what).await;
            by_id.entry(r.watch_id()).or_default().extend(events(&r));
        }
        let expected = BTreeMap::from([
            (100, vec![ev(base + 6, "DELETE", "f/c", "", None)]),
            (fresh, vec![ev(base + 5, "PUT", "f/c", "4", None), ev(base + 6, "DELETE", "f/c", "", None)]),
        ]);
        assert_eq!(expected, by_id, "{what}: the canceled watches see nothing");
        // Ids are not used again on a stream: the next one the server picks is 2, not 0 or 1,
        // which were canceled (a late event of the old watch would look like the new one's).
        w.watch("f/", Some(prefix.clone())).await.expect("watch");
        assert_eq!(
            2,
            created(&next(&mut w, &what).await, &what),
            "{what}: a canceled watch's id is not reused"
        );
        // The next round starts from the same keys: f/a and f/c are deleted, f/b goes too.
        drop(w);
        kv.delete("f/b", None).await.expect("delete");
    }
}

/// A watch whose start is below the compaction is created, then canceled with the compaction
/// revision; from the compaction revision on, history is there. Compact errors.
async fn compaction_cancels(s: &Sys) {
    let name = s.name;
    let mut kv = connect(&s.writer).await;
    let base = revision(&mut kv).await;
    for v in 1..=5 {
        kv.put("c/k", v.to_string(), None).await.expect("put"); // base + v
    }
    kv.compact(base + 3, None).await.expect("compact");
    for ep in &s.watchers {
        let what = format!("{name} at {ep}");
        let mut c = connect(ep).await;
        // A linearizable read at a compacted revision: refused, and this member has applied the
        // compaction.
        let (code_, msg) =
            code(c.get("c/k", Some(GetOptions::new().with_revision(base + 2))).await.expect_err("compacted"));
        assert_eq!(
            (tonic::Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
            (code_, msg.as_str()),
            "{what}"
        );
        let old =
            c.get("c/k", Some(GetOptions::new().with_revision(base + 3))).await.expect("get at compaction");
        assert_eq!(b"3", old.kvs()[0].value(), "{what}");

        let mut w = c
            .watch("c/", Some(WatchOptions::new().with_prefix().with_start_revision(base + 2)))
            .await
            .expect("watch");
        assert_eq!(0, created(&next(&mut w, &what).await, &what), "{what}");
        let r = next(&mut w, &what).await;
        assert_eq!(
            (0, true, base + 3, 0),
            (r.watch_id(), r.canceled(), r.compact_revision(), r.events().len()),
            "{what}: canceled with the compaction revision: {r:?}"
        );
        // The stream goes on: a watch from the compaction revision replays.
        w.watch("c/", Some(WatchOptions::new().with_prefix().with_start_revision(base + 3)))
            .await
            .expect("watch");
        let id = created(&next(&mut w, &what).await, &what);
        let mut got = Vec::new();
        while got.len() < 3 {
            let r = next(&mut w, &what).await;
            assert_eq!(id, r.watch_id(), "{what}: {r:?}");
            got.extend(events(&r));
        }
        let expected: Vec<Ev> = (3..=5).map(|v| ev(base + v, "PUT", "c/k", &v.to_string(), None)).collect();
        assert_eq!(expected, got, "{what}");
    }

    let physical = kv.compact(base + 5, Some(CompactionOptions::new().with_physical())).await;
    physical.expect("physical compaction");
    let (code_, msg) = code(kv.compact(base + 4, None).await.expect_err("below the compaction"));
    assert_eq!(
        (tonic::Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
        (code_, msg.as_str()),
        "{name}"
    );
    let (code_, msg) = code(kv.compact(base + 100, None).await.expect_err("future"));
    assert_eq!(
        (tonic::Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision"),
        (code_, msg.as_str()),
        "{name}"
    );
}

/// A watch that asked for progress notifications gets an empty response for it, with the
/// store's revision, while nothing happens (300 ms here).
async fn progress_notifications(s: &Sys) {
    let name = s.name;
    let mut kv = connect(&s.writer).await;
    for ep in &s.watchers {
        let what = format!("{name} at {ep}");
        let mut c = connect(ep).await;
        let base = revision(&mut c).await;
        let mut w = c
            .watch("n/", Some(WatchOptions::new().with_prefix().with_progress_notify()))
            .await
            .expect("watch");
        let id = created(&next(&mut w, &what).await, &what);
        let r = next(&mut w, &what).await;
        assert_eq!(
            (id, 0, false, base),
            (r.watch_id(), r.events().len(), r.canceled(), header_rev(&r)),
            "{what}: a notification: {r:?}"
        );
        kv.put("n/1", "x", None).await.expect("put");
        // The event, then notifications at its revision.
        let mut seen_event = false;
        loop {
            let r = next(&mut w, &what).await;
            assert_eq!(id, r.watch_id(), "{what}: {r:?}");
            if r.events().is_empty() {
                assert_eq!(if seen_event { base + 1 } else { base }, header_rev(&r), "{what}: {r:?}");
                if seen_event {
                    break;
                }
            } else {
                assert_eq!(vec![ev(base + 1, "PUT", "n/1", "x", None)], events(&r), "{what}");
                seen_event = true;
            }
        }
    }
}

/// A watch of an empty range (its end not after its key) is refused when created.
async fn empty_range_refused(s: &Sys) {
    let name = s.name;
    for ep in &s.watchers {
        let what = format!("{name} at {ep}");
        let mut c = connect(ep).await;
        let mut w = c.watch("z/b", Some(WatchOptions::new().with_range("z/a"))).await.expect("watch");
        let r = next(&mut w, &what).await;
        assert_eq!(
            (true, true, -1, "mvcc: watcher range is empty"),
            (r.created(), r.canceled(), r.watch_id(), r.cancel_reason()),
            "{what}: {r:?}"
        );
        // The stream goes on.
        w.watch("z/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        assert_eq!(0, created(&next(&mut w, &what).await, &what), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_range_refused_as_etcd() {
    let e = Etcd::start(&ETCD_FLAGS);
    empty_range_refused(&Sys::etcd(&e)).await;
    let (_p, s) = start_keel();
    empty_range_refused(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_then_live_as_etcd() {
    let e = Etcd::start(&ETCD_FLAGS);
    history_then_live(&Sys::etcd(&e)).await;
    let (_p, s) = start_keel();
    history_then_live(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_filters_cancel_and_progress_as_etcd() {
    let e = Etcd::start(&ETCD_FLAGS);
    ids_filters_cancel_and_progress(&Sys::etcd(&e)).await;
    let (_p, s) = start_keel();
    ids_filters_cancel_and_progress(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_cancels_as_etcd() {
    let e = Etcd::start(&ETCD_FLAGS);
    compaction_cancels(&Sys::etcd(&e)).await;
    let (_p, s) = start_keel();
    compaction_cancels(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_notifications_as_etcd() {
    let e = Etcd::start(&ETCD_FLAGS);
    progress_notifications(&Sys::etcd(&e)).await;
    let (_p, s) = start_keel();
    progress_notifications(&s).await;
}

/// A revision too big for one response: with `fragment`, its events come in pieces (each piece
/// one event here); without, in one response.
async fn fragments(s: &Sys) {
    let name = s.name;
    let mut kv = connect(&s.writer).await;
    let big = |c: char| c.to_string().repeat(700 * 1024);
    kv.put("fr/a", big('a'), None).await.expect("put");
    kv.put("fr/b", big('b'), None).await.expect("put");
    let base = revision(&mut kv).await;
    let mut streams = Vec::new();
    for ep in &s.watchers {
        let what = format!("{name} at {ep}");
        let mut c = connect(ep).await;
        // This member has applied the puts above: the watches from now start after them.
        assert_eq!(base, revision(&mut c).await, "{what}");
        let mut wc = c.watch_client().max_decoding_message_size(8 << 20);
        let opts = WatchOptions::new().with_prefix().with_prev_key();
        let mut whole = wc.watch("fr/", Some(opts.clone())).await.expect("watch");
        created(&next(&mut whole, &what).await, &what);
        let mut pieces = wc.watch("fr/", Some(opts.with_fragment())).await.expect("watch");
        created(&next(&mut pieces, &what).await, &what);
        streams.push((what, whole, pieces));
    }
    // Each event carries 1.4 MB (value and prev_kv): together over the 1.5 MB request limit.
    let txn = Txn::new().and_then([TxnOp::put("fr/a", big('A'), None), TxnOp::put("fr/b", big('B'), None)]);
    kv.txn(txn).await.expect("txn");
    let summary = |r: &WatchResponse| -> Vec<(i64, String, usize, usize)> {
        r.events()
            .iter()
            .map(|e| {
                let kv = e.kv().expect("kv");
                let prev = e.prev_kv().map_or(0, |p| p.value().len());
                (kv.mod_revision(), kv.key_str().expect("utf8").to_string(), kv.value().len(), prev)
            })
            .collect()
    };
    let a = (base + 1, "fr/a".to_string(), 700 * 1024, 700 * 1024);
    let b = (base + 1, "fr/b".to_string(), 700 * 1024, 700 * 1024);
    for (what, mut whole, mut pieces) in streams {
        let r = next(&mut whole, &what).await;
        assert_eq!(vec![a.clone(), b.clone()], summary(&r), "{what}: without fragment, one response");
        let first = next(&mut pieces, &what).await;
        let second = next(&mut pieces, &what).await;
        assert_eq!(
            (vec![a.clone()], vec![b.clone()]),
            (summary(&first), summary(&second)),
            "{what}: with fragment, one event a piece"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragments_as_etcd() {
    let e = Etcd::start(&ETCD_FLAGS);
    fragments(&Sys::etcd(&e)).await;
    let (_p, s) = start_keel();
    fragments(&s).await;
}

// ---------------------------------------------------------------------------------------------
// keeld under load
// ---------------------------------------------------------------------------------------------

/// What writers wrote: key → (revision, value).
type Written = BTreeMap<String, (i64, String)>;

/// `writers` tasks putting `count` keys `{prefix}{writer}/{i}` between them, through every
/// member in turn, values padded to `value_bytes`; what they wrote.
async fn write_concurrently(
    p: &Procs,
    prefix: &str,
    writers: usize,
    count: usize,
    value_bytes: usize,
) -> Written {
    let eps: Vec<String> = ALL.into_iter().map(|id| format!("http://{}", p.client(id))).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for wr in 0..writers {
        let ep = eps[wr % eps.len()].clone();
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            let mut c = connect(&ep).await;
            let mut wrote = Vec::new();
            for i in (wr..count).step_by(writers) {
                let key = format!("{prefix}{wr}/{i:06}");
                let mut value = format!("{i}:");
                value.extend(std::iter::repeat_n('x', value_bytes.saturating_sub(value.len())));
                let r = c
                    .put(key.clone(), value.clone(), None)
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                wrote.push((key, (r.header().expect("header").revision(), value)));
            }
            wrote
        });
    }
    let mut written = Written::new();
    while let Some(done) = tasks.join_next().await {
        written.extend(done.expect("a writer panicked"));
    }
    assert_eq!(count, written.len());
    written
}

/// Reads `w` until it has `n` events for watch `id`, or one at `last_rev` or later; asserts that
/// they come in revision order, each revision in one response, never twice; answers them.
async fn read_events(w: &mut WatchStream, id: i64, n: usize, last_rev: i64, what: &str) -> Vec<Ev> {
    let mut got: Vec<Ev> = Vec::new();
    while got.len() < n && got.last().is_none_or(|e| e.rev < last_rev) {
        let last = got.last().map(|e| (e.rev, e.key.as_str()));
        let so_far = format!("{what}, having read {} of {n} events (the last: {last:?})", got.len());
        let r = next(w, &so_far).await;
        assert_eq!((id, false), (r.watch_id(), r.canceled()), "{what}: {r:?}");
        let evs = events(&r);
        let first = evs.first().unwrap_or_else(|| panic!("{what}: a response without events: {r:?}"));
        if let Some(last) = got.last() {
            assert!(
                first.rev > last.rev,
                "{what}: revision {} after {} (out of order, repeated, or split across responses)",
                first.rev,
                last.rev
            );
        }
        assert!(evs.windows(2).all(|p| p[0].rev <= p[1].rev), "{what}: out of order in one response");
        got.extend(evs);
    }
    got
}

/// The events `written` makes, in revision order.
fn expected_events(written: &Written) -> Vec<Ev> {
    let mut evs: Vec<Ev> = written.iter().map(|(k, (rev, v))| ev(*rev, "PUT", k, v, None)).collect();
    evs.sort();
    evs
}

/// Asserts that `got` is exactly `expected`, saying where they part.
#[track_caller]
fn assert_same_events(expected: &[Ev], got: &[Ev], what: &str) {
    if let Some(i) = (0..expected.len().min(got.len())).find(|&i| expected[i] != got[i]) {
        panic!(
            "{what}: event {i} of {} is {:?} (revision {}), expected {:?} (revision {})",
            expected.len(),
            got[i].key,
            got[i].rev,
            expected[i].key,
            expected[i].rev
        );
    }
    assert_eq!(expected.len(), got.len(), "{what}: how many events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_in_order_without_gaps_under_concurrent_writers() {
    let (p, s) = start_keel();
    let mut streams = Vec::new();
    for ep in &s.watchers {
        let what = format!("keeld at {ep}");
        let mut c = connect(ep).await;
        let mut w = c.watch("c/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        let id = created(&next(&mut w, &what).await, &what);
        streams.push((what, id, w));
    }
    let mut kv = connect(&s.writer).await;
    let base = revision(&mut kv).await;
    // 500 puts from 5 writers, and 50 transactions of 3 keys each beside them.
    let txns = tokio::spawn({
        let ep = s.watchers[1].clone();
        async move {
            let mut c = connect(&ep).await;
            let mut wrote = Written::new();
            for i in 0..50 {
                let keys: Vec<String> = ["a", "b", "c"].iter().map(|k| format!("c/t/{i:03}/{k}")).collect();
                let txn = Txn::new()
                    .and_then(keys.iter().map(|k| TxnOp::put(k.clone(), "t", None)).collect::<Vec<_>>());
                let r = c.txn(txn).await.expect("txn");
                let rev = r.header().expect("header").revision();
                wrote.extend(keys.into_iter().map(|k| (k, (rev, "t".to_string()))));
            }
            wrote
        }
    });
    let mut written = write_concurrently(&p, "c/", 5, 500, 10).await;
    written.extend(txns.await.expect("the txn writer"));
    let expected = expected_events(&written);
    let revisions: BTreeSet<i64> = expected.iter().map(|e| e.rev).collect();
    assert_eq!((base + 1..=base + 550).collect::<BTreeSet<i64>>(), revisions, "nothing else was written");
    for (what, id, mut w) in streams {
        let last = expected.last().expect("events").rev;
        let got = read_events(&mut w, id, expected.len(), last, &what).await;
        // Events of one revision in one response: read_events fails on a revision split across
        // responses; in order within it, as the txn wrote them.
        assert_same_events(&expected, &got, &what);
    }
}

/// Watchers on the leader and a follower that are not read while thousands of writes happen,
/// then read with no more writes: every event arrives, in order (the server's fallback to
/// history, without a later write to wake it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_that_does_not_read_gets_every_event_later() {
    let (p, s) = start_keel();
    let mut streams = Vec::new();
    for ep in &s.watchers {
        let what = format!("keeld at {ep}");
        let mut c = connect(ep).await;
        let mut w = c.watch("s/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
        let id = created(&next(&mut w, &what).await, &what);
        streams.push((what, id, w));
    }
    // Not read while 4000 writes of 2 KiB happen: 8 MB of events, more than the stream's
    // buffers and HTTP/2 windows hold, so the server has to fall back to reading history.
    let written = write_concurrently(&p, "s/", 8, 4000, 2048).await;
    let expected = expected_events(&written);
    for (what, id, mut w) in streams {
        let last = expected.last().expect("events").rev;
        let got = read_events(&mut w, id, expected.len(), last, &what).await;
        assert_same_events(&expected, &got, &what);
    }
}

/// A watcher whose stream is not read falls behind; another stream's watcher then catches up
/// from a later revision. Catching the second one up must not move the first one past the
/// events it has not been given.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_behind_is_not_moved_past_its_events_by_another_catching_up() {
    let (p, s) = start_keel();
    let ep = &s.watchers[1];
    let what = format!("keeld at {ep}");
    let mut c1 = connect(ep).await;
    let mut slow = c1.watch("a/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
    let slow_id = created(&next(&mut slow, &what).await, &what);
    let mut written = write_concurrently(&p, "a/", 8, 4000, 2048).await;
    // Then writes the slow watcher does not want.
    let mut kv = connect(&s.writer).await;
    let first_b = kv.put("b/0", "0", None).await.expect("put").header().expect("header").revision();
    for i in 1..10 {
        kv.put(format!("b/{i}"), i.to_string(), None).await.expect("put");
    }
    // Another stream (its own connection) watches b/ from the first of them: history for it.
    let mut c2 = connect(ep).await;
    let opts = WatchOptions::new().with_prefix().with_start_revision(first_b);
    let mut other = c2.watch("b/", Some(opts)).await.expect("watch");
    let other_id = created(&next(&mut other, &what).await, &what);
    let b = read_events(&mut other, other_id, 10, first_b + 9, &what).await;
    assert_eq!((first_b, first_b + 9), (b[0].rev, b[9].rev), "{what}: the other watcher caught up");
    let end = kv.put("a/end", "end", None).await.expect("put").header().expect("header").revision();
    written.insert("a/end".into(), (end, "end".into()));
    let expected = expected_events(&written);
    // Writes outside a/ while the slow stream is read: a watcher that fell behind is caught up
    // only when something is written (what the test above finds), and this test is about which
    // events it gets, not when.
    let nudge = tokio::spawn({
        let ep = s.writer.clone();
        async move {
            let mut c = connect(&ep).await;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                // Errors only mean the test is over and the cluster gone.
                let _ = c.put("nudge", "x", None).await;
            }
        }
    });
    let got = read_events(&mut slow, slow_id, expected.len(), end, &what).await;
    nudge.abort();
    assert_same_events(&expected, &got, &what);
}

/// `n` puts of `{prefix}{i:06}`, `i` from `from` on, through `c`, one after another; a failed
/// put is tried again until `DEADLINE` (a leader change is under way).
async fn put_each(c: &mut Client, prefix: &str, from: usize, n: usize) -> Written {
    let mut written = Written::new();
    for i in from..from + n {
        let key = format!("{prefix}{i:06}");
        let start = Instant::now();
        let rev = loop {
            match c.put(key.clone(), i.to_string(), None).await {
                Ok(r) => break r.header().expect("header").revision(),
                Err(e) if start.elapsed() < DEADLINE => eprintln!("put {key}: {e}; again"),
                Err(e) => panic!("put {key}: still failing after {DEADLINE:?}: {e}"),
            }
        };
        written.insert(key, (rev, i.to_string()));
    }
    written
}

/// A watch on a follower goes on delivering, without a gap, when the leader is SIGKILLed and
/// another is elected: each member serves watches from what it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_on_a_follower_goes_on_when_the_leader_dies() {
    let mut p = Procs::start(3, 0, KEEL_CONFIG);
    let leader = p.wait_leader(&ALL, DEADLINE);
    let follower = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    let ep = format!("http://{}", p.client(follower));
    let what = format!("keeld {follower} at {ep}");
    let mut c = connect(&ep).await;
    let mut w = c.watch("l/", Some(WatchOptions::new().with_prefix())).await.expect("watch");
    let id = created(&next(&mut w, &what).await, &what);
    // Written through the follower, which forwards to whichever member leads.
    let mut written = put_each(&mut c, "l/", 0, 50).await;
    p.kill(leader);
    let survivors: Vec<u64> = ALL.into_iter().filter(|id| *id != leader).collect();
    let new_leader = p.wait_leader(&survivors, DEADLINE);
    assert_ne!(leader, new_leader);
    written.extend(put_each(&mut c, "l/", 50, 50).await);
    let expected = expected_events(&written);
    let last = expected.last().expect("events").rev;
    let got = read_events(&mut w, id, expected.len(), last, &what).await;
    assert_same_events(&expected, &got, &what);
}

/// A member restarted on its data dir still has the history: a client whose watch broke with the
/// member watches again from the revision after the last one it got, and misses nothing written
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_resumes_from_its_last_revision_after_the_member_restarts() {
    let mut p = Procs::start(3, 0, KEEL_CONFIG);
    let leader = p.wait_leader(&ALL, DEADLINE);
    let follower = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    let ep = format!("http://{}", p.client(follower));
    let what = format!("keeld {follower} at {ep}");
    let mut kv = connect(&format!("http://{}", p.client(leader))).await;
    let before = put_each(&mut kv, "r/", 0, 100).await;
    let first = before.values().map(|(rev, _)| *rev).min().expect("writes");
    let mut c = connect(&ep).await;
    let opts = WatchOptions::new().with_prefix().with_start_revision(first);
    let mut w = c.watch("r/", Some(opts)).await.expect("watch");
    let id = created(&next(&mut w, &what).await, &what);
    let expected = expected_events(&before);
    let last = expected.last().expect("events").rev;
    let got = read_events(&mut w, id, expected.len(), last, &what).await;
    assert_same_events(&expected, &got, &what);

    p.kill(follower);
    match tokio::time::timeout(WAIT, w.message()).await {
        Ok(Ok(None) | Err(_)) => {} // the stream ended with its member
        other => panic!("{what}: the watch of a killed member: {other:?}"),
    }
    let during = put_each(&mut kv, "r/", 100, 100).await;
    p.restart(follower);
    p.wait_ready(follower);
    let mut c = connect(&ep).await;
    let opts = WatchOptions::new().with_prefix().with_start_revision(last + 1);
    let mut w = c.watch("r/", Some(opts)).await.expect("watch again");
    let id = created(&next(&mut w, &what).await, &what);
    let expected = expected_events(&during);
    let end = expected.last().expect("events").rev;
    let got = read_events(&mut w, id, expected.len(), end, &what).await;
    assert_same_events(&expected, &got, &what);
    // And all of it from the first revision, after the restart.
    let opts = WatchOptions::new().with_prefix().with_start_revision(first);
    let mut w = c.watch("r/", Some(opts)).await.expect("watch from the start");
    let id = created(&next(&mut w, &what).await, &what);
    let mut all = before;
    all.extend(during);
    let expected = expected_events(&all);
    let got = read_events(&mut w, id, expected.len(), end, &what).await;
    assert_same_events(&expected, &got, &what);
}

/// `--auto-compaction-mode periodic --auto-compaction-retention 1s`: the leader compacts on its
/// own to the revision of a second ago; a read or a watch from before it is refused with the
/// compaction revision, on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn periodic_auto_compaction_cancels_a_watch_from_before_it() {
    let mut p =
        Procs::start(3, 0, "auto_compaction_mode = \"periodic\"\nauto_compaction_retention = \"1s\"\n");
    let s = Sys::keel(&mut p);
    let mut kv = connect(&s.writer).await;
    let first = kv.put("ac/k", "1", None).await.expect("put").header().expect("header").revision();
    let now = kv.put("ac/k", "2", None).await.expect("put").header().expect("header").revision();
    let start = Instant::now();
    loop {
        match kv.get("ac/k", Some(GetOptions::new().with_revision(first))).await {
            Err(e) => {
                let (code_, msg) = code(e);
                assert_eq!(
                    (tonic::Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
                    (code_, msg.as_str())
                );
                break;
            }
            Ok(_) => {
                assert!(start.elapsed() < DEADLINE, "no automatic compaction past {first} in {DEADLINE:?}")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the poll interval of this wait
    }
    for ep in &s.watchers {
        let what = format!("keeld at {ep}");
        let mut c = connect(ep).await;
        let old = c.get("ac/k", Some(GetOptions::new().with_revision(first))).await;
        assert!(old.is_err(), "{what}: a read at {first} after the compaction: {old:?}");
        let opts = WatchOptions::new().with_prefix().with_start_revision(first);
        let mut w = c.watch("ac/", Some(opts)).await.expect("watch");
        created(&next(&mut w, &what).await, &what);
        let r = next(&mut w, &what).await;
        let compacted = r.compact_revision();
        assert!(r.canceled() && compacted > first && compacted <= now, "{what}: {r:?}");
        let at = c.get("ac/k", Some(GetOptions::new().with_revision(compacted))).await.expect("read at it");
        assert_eq!(1, at.kvs().len(), "{what}");
        c.get("ac/k", Some(GetOptions::new().with_revision(compacted - 1))).await.expect_err("below it");
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP watch: server-sent events
// ---------------------------------------------------------------------------------------------

/// `GET /v1/watch?...` over HTTP/1.0 on a plain TCP stream: the body is the event stream until
/// the server closes it.
struct Sse {
    what: String,
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Sse {
    /// Opens the watch and reads the status line and headers: the status.
    fn open(addr: &str, path: &str) -> (u16, Sse) {
        let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the request");
        let mut sse = Sse { what: format!("GET {path} at {addr}"), stream, buf: Vec::new(), eof: false };
        let head = sse.until(b"\r\n\r\n");
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok());
        let status = status.unwrap_or_else(|| panic!("{}: no status in {head:?}", sse.what));
        (status, sse)
    }

    /// Reads until `end`; what came before it (the rest stays buffered).
    fn until(&mut self, end: &[u8]) -> String {
        let start = Instant::now();
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                let text = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + end.len());
                return text;
            }
            assert!(
                !self.eof,
                "{}: the stream ended; left: {:?}",
                self.what,
                String::from_utf8_lossy(&self.buf)
            );
            assert!(
                start.elapsed() < WAIT,
                "{}: nothing in {WAIT:?}; have {:?}",
                self.what,
                String::from_utf8_lossy(&self.buf)
            );
            self.fill();
        }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("{}: read: {e}", self.what),
        }
    }

    /// The next message: one event's `data:` lines as JSON (comments, the keep-alives, skipped).
    fn next(&mut self) -> Value {
        loop {
            let event = self.until(b"\n\n");
            let data: Vec<&str> =
                event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
            if data.is_empty() {
                continue;
            }
            let text = data.join("\n");
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text:?}", self.what));
        }
    }

    /// Messages until `n` events have come: (each message's revision, the events).
    fn events(&mut self, n: usize) -> Vec<(i64, Value)> {
        let mut got = Vec::new();
        while got.len() < n {
            let m = self.next();
            let rev = m["revision"].as_i64().unwrap_or_else(|| panic!("{}: {m}", self.what));
            let evs = m["events"].as_array().unwrap_or_else(|| panic!("{}: {m}", self.what));
            got.extend(evs.iter().map(|e| (rev, e.clone())));
        }
        got
    }

    /// Waits until the server ends the stream, with nothing more on it but keep-alives.
    fn ends(&mut self) {
        let start = Instant::now();
        while !self.eof {
            assert!(start.elapsed() < WAIT, "{}: still open after {WAIT:?}", self.what);
            self.fill();
        }
        let rest = String::from_utf8_lossy(&self.buf);
        assert!(
            rest.lines().all(|l| l.is_empty() || l.starts_with(':')),
            "{}: after the end: {rest:?}",
            self.what
        );
    }
}

/// (type, key, value, mod_revision, prev_kv's value) of an HTTP watch event.
fn http_event(e: &Value) -> (String, String, Option<String>, i64, Option<String>) {
    (
        e["type"].as_str().unwrap_or_default().to_string(),
        e["kv"]["key"].as_str().unwrap_or_default().to_string(),
        e["kv"]["value"].as_str().map(str::to_string),
        e["kv"]["mod_revision"].as_i64().unwrap_or_default(),
        e.get("prev_kv").map(|p| p["value"].as_str().unwrap_or_default().to_string()),
    )
}

#[test]
fn http_watch_as_server_sent_events() {
    let mut p = Procs::start(3, 0, "");
    let leader = p.wait_leader(&ALL, DEADLINE);
    let follower = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    let (l, f) = (p.client(leader), p.client(follower));
    let put = |k: &str, v: &str| -> i64 {
        let (code, body) = procs::http(&l, "PUT", &format!("/v1/kv/{k}"), v.as_bytes(), WAIT).expect("put");
        assert_eq!(200, code, "put {k}: {body}");
        serde_json::from_str::<Value>(&body).expect("json")["revision"].as_i64().expect("revision")
    };
    let list_rev = |addr: &str| {
        procs::get_json(addr, "/v1/kv?prefix=zz").expect("list")["revision"].as_i64().expect("revision")
    };
    let base = list_rev(&l);
    assert_eq!(base + 1, put("e/a", "1"));
    put("e/a", "2");
    let (code, _) = procs::http(&l, "DELETE", "/v1/kv/e/a", b"", WAIT).expect("delete");
    assert_eq!(200, code);
    put("e/b", "3"); // base + 4
    assert_eq!(base + 4, list_rev(&f), "the follower has applied the writes");

    let s = |t: &str, k: &str, v: Option<&str>, rev: i64, prev: Option<&str>| {
        (t.to_string(), k.to_string(), v.map(str::to_string), rev, prev.map(str::to_string))
    };
    // History, then live, with prev_kv, on the follower.
    let (code, mut w) =
        Sse::open(&f, &format!("/v1/watch?prefix=e/&start_revision={}&prev_kv=true", base + 1));
    assert_eq!(200, code);
    assert_eq!(serde_json::json!({"created": true, "revision": base + 4}), w.next());
    let got: Vec<_> = w.events(4).iter().map(|(_, e)| http_event(e)).collect();
    assert_eq!(
        vec![
            s("put", "e/a", Some("1"), base + 1, None),
            s("put", "e/a", Some("2"), base + 2, Some("1")),
            s("delete", "e/a", None, base + 3, Some("2")),
            s("put", "e/b", Some("3"), base + 4, None),
        ],
        got
    );
    // From now, and filters, and one key, and every key from one on.
    let (_, mut now) = Sse::open(&f, "/v1/watch?prefix=e/");
    assert_eq!(serde_json::json!({"created": true, "revision": base + 4}), now.next());
    let from = base + 1;
    let (_, mut no_put) = Sse::open(&l, &format!("/v1/watch?prefix=e/&start_revision={from}&no_put=true"));
    let (_, mut no_delete) = Sse::open(&f, &format!("/v1/watch?prefix=e/&start_revision={from}&no_delete"));
    let (_, mut one) = Sse::open(&f, &format!("/v1/watch?key=e/b&start_revision={from}"));
    let (_, mut from_b) = Sse::open(&l, &format!("/v1/watch?from=e/b&start_revision={from}"));
    for w in [&mut no_put, &mut no_delete, &mut one, &mut from_b] {
        assert_eq!(Some(true), w.next()["created"].as_bool(), "{}", w.what);
    }
    assert_eq!(base + 5, put("e/c", "4"));
    assert_eq!(base + 6, put("f", "5"));
    let live = w.events(1);
    assert_eq!((base + 5, s("put", "e/c", Some("4"), base + 5, None)), (live[0].0, http_event(&live[0].1)));
    let live = now.events(1);
    assert_eq!(s("put", "e/c", Some("4"), base + 5, None), http_event(&live[0].1));
    let kinds = |w: &mut Sse, n: usize| -> Vec<(String, String, i64)> {
        w.events(n).iter().map(|(_, e)| http_event(e)).map(|(t, k, _, r, _)| (t, k, r)).collect()
    };
    assert_eq!(vec![("delete".to_string(), "e/a".to_string(), base + 3)], kinds(&mut no_put, 1));
    let puts: Vec<(String, String, i64)> = [("e/a", 1), ("e/a", 2), ("e/b", 4), ("e/c", 5)]
        .iter()
        .map(|(k, r)| ("put".into(), k.to_string(), base + r))
        .collect();
    assert_eq!(puts, kinds(&mut no_delete, 4));
    assert_eq!(vec![("put".to_string(), "e/b".to_string(), base + 4)], kinds(&mut one, 1));
    let from_b_expected: Vec<(String, String, i64)> = [("e/b", 4), ("e/c", 5), ("f", 6)]
        .iter()
        .map(|(k, r)| ("put".into(), k.to_string(), base + r))
        .collect();
    assert_eq!(from_b_expected, kinds(&mut from_b, 3));

    // Compaction, physical, and reads and watches below it.
    let (code, body) =
        procs::http(&l, "POST", &format!("/v1/compact?revision={}&physical=true", base + 3), b"", WAIT)
            .expect("compact");
    assert_eq!(200, code, "{body}");
    assert_eq!(
        Some(base + 3),
        serde_json::from_str::<Value>(&body).expect("json")["compact_revision"].as_i64()
    );
    for addr in [&l, &f] {
        let (code, body) =
            procs::http(addr, "GET", &format!("/v1/kv/e/b?revision={}", base + 4), b"", WAIT).expect("get");
        assert_eq!(
            (200, Some("3")),
            (code, serde_json::from_str::<Value>(&body).expect("json")["value"].as_str()),
            "{body}"
        );
        let (code, body) =
            procs::http(addr, "GET", &format!("/v1/kv/e/a?revision={}", base + 2), b"", WAIT).expect("get");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!((400, Some("compacted")), (code, v["error"]["code"].as_str()), "{body}");
        let (_, mut below) = Sse::open(addr, &format!("/v1/watch?prefix=e/&start_revision={}", base + 2));
        assert_eq!(Some(true), below.next()["created"].as_bool());
        let m = below.next();
        assert_eq!(
            (Some(true), Some(base + 3)),
            (m["canceled"].as_bool(), m["compact_revision"].as_i64()),
            "{m}"
        );
        below.ends();
        let (_, mut at) = Sse::open(addr, &format!("/v1/watch?prefix=e/&start_revision={}", base + 3));
        assert_eq!(Some(true), at.next()["created"].as_bool());
        let evs: Vec<i64> = at.events(3).iter().map(|(_, e)| http_event(e).3).collect();
        assert_eq!(vec![base + 3, base + 4, base + 5], evs);
    }
    // Bad requests are refused before any stream.
    let (code, _) = procs::http(&f, "GET", "/v1/watch", b"", WAIT).expect("watch without keys");
    assert_eq!(400, code);
    let (code, _) =
        procs::http(&f, "GET", "/v1/watch?prefix=e/&start_revision=x", b"", WAIT).expect("bad revision");
    assert_eq!(400, code);
    drop(p);
}
