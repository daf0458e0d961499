//! Watches: each node serves its own watchers from its own applied state (etcd's model).
//!
//! Every watcher belongs to a stream (one gRPC `Watch` call, or one HTTP watch) and reaches it
//! through that stream's bounded channel of [`Delivery`]s. A watcher is either
//!
//! - **synced**: it has every event up to the newest applied revision. The state machine hands
//!   each applied batch's events to [`WatchHub::publish`], which puts the matching ones straight
//!   into the watcher's channel; or
//! - **unsynced**: it is behind (it asked for an old revision, its stream's channel was full, or
//!   a snapshot replaced the state). [`WatchHub::run_sync`] reads history for all of them at once,
//!   in bounded chunks of whole revisions, delivers each its part, and moves each back to synced
//!   once it has caught up with the newest revision.
//!
//! So a slow stream never makes the node buffer more than its channel: its watchers fall back to
//! reading history, and they lose nothing, since an unsynced watcher's next revision moves only
//! with what it was actually given. Each watcher tracks its next revision, so events come in
//! revision order, never twice, never with a gap, and all events of one revision in one delivery.
//! A watcher whose next revision has been compacted away is canceled with the compaction
//! revision, as etcd does.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::Notify;

use crate::history::CompactProgress;
use crate::history::Event;
use crate::history::EventKind;
use crate::history::Revision;

/// How many deliveries a stream's channel holds before its watchers fall back to history.
pub const STREAM_CHANNEL: usize = 1024;
/// How many events one catch-up read takes from history (whole revisions, so maybe more).
const SYNC_CHUNK_EVENTS: usize = 1000;
/// How soon the catch-up loop retries watchers whose channel was full.
const SYNC_RETRY: Duration = Duration::from_millis(50);

/// Which changes a watcher wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub key: Vec<u8>,
    /// As in a range read: empty for `key` alone, `[0]` for every key from `key` on.
    pub range_end: Vec<u8>,
    pub no_put: bool,
    pub no_delete: bool,
}

impl Filter {
    pub fn matches(&self, event: &Event) -> bool {
        let wanted = match event.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        };
        wanted && self.covers(&event.kv.key)
    }

    fn covers(&self, key: &[u8]) -> bool {
        match self.range_end.as_slice() {
            [] => key == self.key.as_slice(),
            [0] => key >= self.key.as_slice(),
            end => key >= self.key.as_slice() && key < end,
        }
    }
}

/// What a stream receives for one of its watchers.
#[derive(Clone, Debug)]
pub enum Delivery {
    /// Events in revision order, whole revisions; `revision` is the store's revision they bring
    /// the watcher to.
    Events { watcher: WatcherKey, watch_id: i64, revision: i64, events: Vec<Arc<Event>> },
    /// The watcher's next revision was compacted away: it is canceled.
    Compacted { watcher: WatcherKey, watch_id: i64, compact_revision: i64 },
    /// Every event up to `revision` has been delivered (to one watcher, or with `watch_id` -1 to
    /// every watcher of the stream).
    Progress { watch_id: i64, revision: i64 },
}

pub type DeliveryTx = mpsc::Sender<Delivery>;

/// A watcher, as the hub knows it.
struct Watcher {
    filter: Filter,
    watch_id: i64,
    /// The first revision it has not been given yet.
    next_rev: i64,
    tx: DeliveryTx,
}

/// Identifies a registered watcher to the hub.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatcherKey(u64);

#[derive(Default)]
struct Inner {
    /// The newest revision applied (and published) on this node.
    revision: i64,
    /// The compaction revision: no watcher may start below it.
    compacted: i64,
    next_key: u64,
    synced: HashMap<WatcherKey, Watcher>,
    unsynced: HashMap<WatcherKey, Watcher>,
    /// Live deliveries so far (for the planted `watch-drop-event`).
    delivered: u64,
}

/// This node's watchers, and its compaction progress.
pub struct WatchHub {
    inner: Mutex<Inner>,
    /// Whether any watcher is synced: only then does applying collect events for [`publish`].
    collecting: AtomicBool,
    /// Wakes the catch-up loop: a watcher fell behind.
    behind: Notify,
    /// The planted `watch-drop-event` (debug builds only; see `keel::faults`).
    drop_events: AtomicBool,
    /// The compaction revision applied here, and how far this node has removed history below it
    /// (the compactor's progress; `Compact` with `physical` waits on it).
    compaction: tokio::sync::watch::Sender<CompactProgress>,
    /// Set when the node stops serving: every watch stream ends.
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            collecting: AtomicBool::new(false),
            behind: Notify::new(),
            drop_events: AtomicBool::new(false),
            compaction: tokio::sync::watch::channel(CompactProgress { target: 0, physical: 0 }).0,
            closed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("WatchHub")
            .field("revision", &inner.revision)
            .field("synced", &inner.synced.len())
            .field("unsynced", &inner.unsynced.len())
            .finish()
    }
}

/// Unregisters a watcher when dropped (its stream or its waiter went away).
pub struct Watching(pub Arc<WatchHub>, pub WatcherKey);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.cancel(self.1);
    }
}

/// What registering a watcher answered.
#[derive(Debug)]
pub struct Registered {
    pub key: WatcherKey,
    /// The first revision it will be given (the start revision, or for 0 the next revision).
    pub start_revision: i64,
}

impl WatchHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("watch hub mutex poisoned by an earlier panic")
    }

    /// Ends every watch stream (the node is stopping): streams wait on [`closed`](Self::closed).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Completes once the node stops serving watches.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.subscribe();
        async move {
            let _ = closed.wait_for(|c| *c).await;
        }
    }

    /// Plants `watch-drop-event` (see `keel::faults`).
    pub fn plant_drop_event(&self) {
        self.drop_events.store(true, Ordering::Relaxed);
    }

    /// Whether applying should collect events for [`publish`](Self::publish).
    pub fn collecting(&self) -> bool {
        self.collecting.load(Ordering::Acquire)
    }

    /// The newest revision this node has applied, as far as watchers go.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Learns the store's revision and compaction progress at start-up.
    pub fn observe(&self, revision: i64, progress: CompactProgress) {
        let mut inner = self.lock();
        inner.revision = inner.revision.max(revision);
        inner.compacted = inner.compacted.max(progress.target);
        self.compaction.send_modify(|p| {
            p.target = p.target.max(progress.target);
            p.physical = p.physical.max(progress.physical);
        });
    }

    /// The compaction progress: the compactor waits for a new target, `Compact` with `physical`
    /// for the history to be gone.
    pub fn compaction(&self) -> tokio::sync::watch::Receiver<CompactProgress> {
        self.compaction.subscribe()
    }

    /// The compactor reports how far it has removed history.
    pub fn compacted_physically(&self, progress: CompactProgress) {
        self.compaction.send_if_modified(|p| {
            let before = *p;
            p.target = p.target.max(progress.target);
            p.physical = p.physical.max(progress.physical);
            *p != before
        });
    }

    fn compaction_target(&self, target: i64) {
        self.compaction.send_if_modified(|p| {
            let raised = target > p.target;
            p.target = p.target.max(target);
            raised
        });
    }

    /// Hands the watchers what one applied batch changed: `changes` are its revisions' events
    /// (None if they were not collected, because no watcher was synced when the batch began),
    /// `revision` the store's revision after it.
    pub fn publish(&self, changes: Option<Vec<Revision>>, revision: i64, compacted: i64) {
        self.compaction_target(compacted);
        let mut inner = self.lock();
        inner.compacted = inner.compacted.max(compacted);
        if revision <= inner.revision {
            return;
        }
        let inner = &mut *inner;
        let mut behind = Vec::new();
        match changes {
            None => {
                behind.extend(inner.synced.iter().filter(|(_, w)| w.next_rev <= revision).map(|(k, _)| *k))
            }
            Some(changes) => {
                let drop_events = self.drop_events.load(Ordering::Relaxed);
                for (key, w) in inner.synced.iter_mut() {
                    let from = w.next_rev;
                    for rev in changes.iter().filter(|r| r.revision >= from) {
                        let mut events: Vec<Arc<Event>> =
                            rev.events.iter().filter(|e| w.filter.matches(e)).cloned().collect();
                        if !events.is_empty() {
                            inner.delivered += 1;
                            if drop_events && inner.delivered.is_multiple_of(keel::faults::WATCH_DROP_EVERY) {
                                events.remove(0);
                            }
                            let d = Delivery::Events {
                                watcher: *key,
                                watch_id: w.watch_id,
                                revision: rev.revision,
                                events,
                            };
                            match w.tx.try_send(d) {
                                Ok(()) => {}
                                Err(_) => {
                                    // Full (or closed: its stream unregisters it): it reads
                                    // history from this revision on.
                                    behind.push(*key);
                                    break;
                                }
                            }
                        }
                        w.next_rev = rev.revision + 1;
                    }
                }
            }
        }
        for key in behind {
            if let Some(w) = inner.synced.remove(&key) {
                inner.unsynced.insert(key, w);
            }
        }
        for w in inner.synced.values_mut() {
            w.next_rev = w.next_rev.max(revision + 1);
        }
        inner.revision = revision;
        self.collecting.store(!inner.synced.is_empty(), Ordering::Release);
        if !inner.unsynced.is_empty() {
            self.behind.notify_one();
        }
    }

    /// A snapshot replaced the state: every watcher catches up from the restored history.
    pub fn reset(&self, revision: i64, compacted: i64) {
        let mut inner = self.lock();
        inner.revision = revision;
        inner.compacted = compacted;
        self.compaction_target(compacted);
        let synced: Vec<_> = inner.synced.drain().collect();
        inner.unsynced.extend(synced);
        self.collecting.store(false, Ordering::Release);
        self.behind.notify_one();
    }

    /// Registers a watcher from `start_revision` (0: the next revision). A start below the
    /// compaction revision is answered by a [`Delivery::Compacted`] on `tx` (by the catch-up loop).
    pub fn watch(&self, filter: Filter, start_revision: i64, watch_id: i64, tx: DeliveryTx) -> Registered {
        let mut inner = self.lock();
        let key = WatcherKey(inner.next_key);
        inner.next_key += 1;
        let next_rev = if start_revision <= 0 { inner.revision + 1 } else { start_revision };
        let w = Watcher { filter, watch_id, next_rev, tx };
        if next_rev > inner.revision {
            inner.synced.insert(key, w);
            self.collecting.store(true, Ordering::Release);
        } else {
            inner.unsynced.insert(key, w);
            self.behind.notify_one();
        }
        Registered { key, start_revision: next_rev }
    }

    /// Unregisters a watcher; false if it was not registered (canceled by compaction).
    pub fn cancel(&self, key: WatcherKey) -> bool {
        let mut inner = self.lock();
        let found = inner.synced.remove(&key).or_else(|| inner.unsynced.remove(&key)).is_some();
        self.collecting.store(!inner.synced.is_empty(), Ordering::Release);
        found
    }

    /// Sends a [`Delivery::Progress`] for `watch_id` on `tx` if every watcher in `keys` is synced
    /// (so every event up to the revision it names has gone out on `tx` before it); false if not
    /// (or the channel is full): ask again later.
    pub fn progress(&self, keys: &[WatcherKey], watch_id: i64, tx: &DeliveryTx) -> bool {
        let inner = self.lock();
        if !keys.iter().all(|k| inner.synced.contains_key(k)) {
            return false;
        }
        tx.try_send(Delivery::Progress { watch_id, revision: inner.revision }).is_ok()
    }

    /// Every watcher as `(watch_id, next revision, synced)`, for diagnostics.
    pub fn watchers(&self) -> Vec<(i64, i64, bool)> {
        let inner = self.lock();
        let synced = inner.synced.values().map(|w| (w.watch_id, w.next_rev, true));
        let unsynced = inner.unsynced.values().map(|w| (w.watch_id, w.next_rev, false));
        let mut all: Vec<_> = synced.chain(unsynced).collect();
        all.sort_unstable();
        all
    }

    /// How many watchers are registered: (synced, unsynced).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.synced.len(), inner.unsynced.len())
    }

    /// The catch-up loop: forever, reads history for the unsynced watchers and delivers it.
    /// `read(from, max_events)` answers whole revisions of events from `from` on (with their
    /// replaced versions), the last revision it covers, and the compaction revision, all from one
    /// read of this node's applied state.
    pub async fn run_sync<R>(self: Arc<Self>, read: R)
    where
        R: Fn(i64, usize) -> Result<(Vec<Revision>, i64, i64), String> + Send + Sync + Clone + 'static,
    {
        loop {
            let woken = self.behind.notified();
            // From the furthest behind that can take a delivery now: one whose stream is not
            // reading must not hold the others back.
            let (from, behind) = {
                let inner = self.lock();
                let ready = inner.unsynced.values().filter(|w| w.tx.capacity() > 0);
                (ready.map(|w| w.next_rev).min(), !inner.unsynced.is_empty())
            };
            let Some(from) = from else {
                if behind {
                    // Every watcher behind has a full channel: nothing tells when its stream
                    // reads, so look again shortly.
                    let _ = tokio::time::timeout(SYNC_RETRY, woken).await;
                } else {
                    woken.await;
                }
                continue;
            };
            let read = read.clone();
            let chunk = tokio::task::spawn_blocking(move || read(from, SYNC_CHUNK_EVENTS)).await;
            let progressed = match chunk {
                Ok(Ok((revisions, last, compacted))) => {
                    self.deliver_history(from, &revisions, last, compacted)
                }
                Ok(Err(e)) => {
                    tracing::warn!("watch: reading history failed (retrying): {e}");
                    false
                }
                Err(e) => {
                    tracing::warn!("watch: history reader panicked (retrying): {e}");
                    false
                }
            };
            if !progressed {
                let _ = tokio::time::timeout(SYNC_RETRY, woken).await;
            }
        }
    }

    /// Gives each unsynced watcher its part of `revisions` (which cover every revision from `from`
    /// to `last`); answers whether any watcher moved. A watcher whose next revision is before
    /// `from` (its channel was full when the chunk was chosen) waits for a chunk that covers it.
    fn deliver_history(&self, from: i64, revisions: &[Revision], last: i64, compacted: i64) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.compacted = inner.compacted.max(compacted);
        let mut moved = false;
        let mut done = Vec::new();
        let mut caught_up = Vec::new();
        for (key, w) in inner.unsynced.iter_mut() {
            if w.next_rev < inner.compacted {
                let d = Delivery::Compacted {
                    watcher: *key,
                    watch_id: w.watch_id,
                    compact_revision: inner.compacted,
                };
                if w.tx.try_send(d).is_ok() || w.tx.is_closed() {
                    done.push(*key);
                    moved = true;
                }
                continue;
            }
            if w.next_rev < from {
                continue;
            }
            if w.next_rev > last {
                // Nothing read for it yet (it is ahead of this chunk); or the chunk is older.
                if w.next_rev > inner.revision {
                    caught_up.push(*key);
                }
                continue;
            }
            let events: Vec<Arc<Event>> = revisions
                .iter()
                .filter(|r| r.revision >= w.next_rev)
                .flat_map(|r| r.events.iter())
                .filter(|e| w.filter.matches(e))
                .cloned()
                .collect();
            if !events.is_empty() {
                let d = Delivery::Events { watcher: *key, watch_id: w.watch_id, revision: last, events };
                if w.tx.try_send(d).is_err() {
                    continue; // full: next round
                }
            }
            w.next_rev = last + 1;
            moved = true;
            if w.next_rev > inner.revision {
                caught_up.push(*key);
            }
        }
        for key in done {
            inner.unsynced.remove(&key);
        }
        for key in caught_up {
            if let Some(w) = inner.unsynced.remove(&key) {
                inner.synced.insert(key, w);
            }
        }
        self.collecting.store(!inner.synced.is_empty(), Ordering::Release);
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyValue;

    fn put(key: &str, rev: i64) -> Arc<Event> {
        Arc::new(Event {
            kind: EventKind::Put,
            kv: KeyValue { key: key.into(), mod_revision: rev, ..KeyValue::default() },
            prev_kv: None,
        })
    }

    fn prefix(p: &str) -> Filter {
        Filter { key: p.into(), range_end: crate::store::prefix_range_end(p.as_bytes()), ..Filter::default() }
    }

    #[test]
    fn filters_cover_one_key_a_range_or_everything_from_a_key() {
        let one = Filter { key: b"a".to_vec(), ..Filter::default() };
        assert!(one.covers(b"a") && !one.covers(b"ab"));
        let from = Filter { key: b"b".to_vec(), range_end: vec![0], ..Filter::default() };
        assert!(from.covers(b"b") && from.covers(b"zzz") && !from.covers(b"a"));
        let p = prefix("a/");
        assert!(p.covers(b"a/") && p.covers(b"a/x") && !p.covers(b"a0") && !p.covers(b"a"));
        let no_put = Filter { no_put: true, ..p.clone() };
        assert!(!no_put.matches(&put("a/x", 2)));
    }

    #[test]
    fn a_full_channel_makes_the_watcher_unsynced_at_the_first_revision_it_missed() {
        let hub = WatchHub::default();
        hub.observe(1, CompactProgress { target: 0, physical: 0 });
        let (tx, mut rx) = mpsc::channel(1);
        hub.watch(prefix("k"), 0, 7, tx);
        assert!(hub.collecting());
        let rev = |r: i64| Revision { revision: r, events: vec![put("k1", r)] };
        hub.publish(Some(vec![rev(2), rev(3)]), 3, 0);
        assert_eq!((0, 1), hub.counts(), "the second revision did not fit");
        match rx.try_recv().expect("revision 2 delivered") {
            Delivery::Events { watch_id: 7, revision: 2, events, .. } => assert_eq!(1, events.len()),
            other => panic!("{other:?}"),
        }
        // History then brings revision 3 (and 4), and the watcher is synced again.
        let history = vec![rev(3), rev(4)];
        hub.publish(None, 4, 0);
        assert!(hub.deliver_history(3, &history, 4, 0));
        assert_eq!((1, 0), hub.counts());
        match rx.try_recv().expect("history delivered") {
            Delivery::Events { revision: 4, events, .. } => {
                let revs: Vec<i64> = events.iter().map(|e| e.kv.mod_revision).collect();
                assert_eq!(vec![3, 4], revs);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_watcher_below_the_compaction_is_canceled_with_the_compaction_revision() {
        let hub = WatchHub::default();
        hub.observe(10, CompactProgress { target: 5, physical: 5 });
        let (tx, mut rx) = mpsc::channel(4);
        let r = hub.watch(prefix("k"), 3, 1, tx);
        assert!(hub.deliver_history(3, &[], 10, 5));
        assert!(matches!(rx.try_recv(), Ok(Delivery::Compacted { watch_id: 1, compact_revision: 5, .. })));
        assert!(!hub.cancel(r.key), "already gone");
    }
}
