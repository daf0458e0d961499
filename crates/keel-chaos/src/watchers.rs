//! The watchers: etcd watch streams over the workload's keys, beside the register clients, every
//! response recorded for `keel-check watch`. A stream that breaks (error, end, cancel) is reopened
//! on the next member, from the revision after the last one the watcher observed (its last event or
//! progress notification), as etcd's own client does; a stream canceled because its start was
//! compacted resumes from the compact revision. Whichever member a watcher is on, what it gets must
//! follow etcd's watch guarantees.
//!
//! Watchers differ in what they watch, so the filtered and prev_kv checks have work: by index
//! modulo 4, the key prefix with prev_kv, the prefix without, one key with prev_kv, a range of keys
//! without. All ask for progress notifications; with `watch_progress_every` they also request them
//! (a `WatchProgressRequest`) that often.
//!
//! At the end of the run, once the cluster is healed, [`Watchers::catch_up`] gives each watcher a
//! bounded time to observe everything in its range; the `end` record then tells the checker that
//! any watcher still behind never caught up.

use std::sync::Arc;
use std::time::Duration;

use keel_check::watch::{
    EndRecord, Event, EventType, KeyValue, Revision, StreamClosed, WatchRecord, WatchResponse, WatchStart,
};
use keel_kv::etcd::pb::etcdserverpb as rpc;
use keel_kv::etcd::pb::mvccpb;
use rpc::kv_client::KvClient;
use rpc::watch_client::WatchClient;
use rpc::watch_request::RequestUnion;
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::cluster::channel;
use crate::workload::key;
use crate::workload::Recorder;
use crate::workload::Workload;

/// How long to wait before reopening a stream, so that a dead member is not hammered; doubled
/// after each stream that got no response at all (every member down), up to the maximum.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
const RECONNECT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A connection for long-lived streams: no per-request timeout (it would cut the stream), but
/// HTTP/2 keepalive, so that a stream to a member that stopped answering (SIGSTOP) breaks and the
/// watcher moves on. etcd refuses pings more often than every 5 s (`too_many_pings`).
pub(crate) fn stream_channel(addr: &str, connect_timeout: Duration) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("http://IP:PORT is a valid URI")
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// What one watcher watches.
#[derive(Debug, Clone)]
struct Range {
    key: String,
    range_end: String,
    prev_kv: bool,
}

impl Range {
    /// Watcher `id`'s range over `keys` registers.
    fn of(id: u64, keys: usize) -> Range {
        // "k" is the prefix of every key (`workload::key`); its range end is "l".
        let prefix = |prev_kv| Range { key: "k".into(), range_end: "l".into(), prev_kv };
        match id % 4 {
            0 => prefix(true),
            1 => prefix(false),
            2 => Range { key: key(0), range_end: String::new(), prev_kv: true },
            _ => Range { key: key(1), range_end: key((keys / 2).max(2)), prev_kv: false },
        }
    }
}

/// The running watchers.
pub struct Watchers {
    tasks: Vec<JoinHandle<()>>,
    ranges: Vec<Range>,
    /// Each watcher's highest observed revision (events and progress notifications).
    observed: Vec<signal::Receiver<Revision>>,
    stop: signal::Sender<bool>,
    recorder: Arc<Recorder>,
}

impl Watchers {
    /// Starts the workload's watchers over its keys, watcher `i` first on member `i % n`.
    /// Times are microseconds since `epoch`.
    pub fn start(
        workload: &Workload,
        endpoints: Vec<String>,
        epoch: Instant,
        recorder: Arc<Recorder>,
    ) -> Watchers {
        let (stop, stop_rx) = signal::channel(false);
        let mut tasks = Vec::new();
        let mut ranges = Vec::new();
        let mut observed = Vec::new();
        for i in 0..workload.watchers {
            let id = i as u64;
            let range = Range::of(id, workload.keys);
            let (seen_tx, seen_rx) = signal::channel(0);
            let w = Watcher {
                id,
                range: range.clone(),
                endpoints: endpoints.clone(),
                at: i % endpoints.len(),
                timeout: workload.timeout,
                progress_every: workload.watch_progress_every,
                epoch,
                recorder: recorder.clone(),
                next_start: 1,
                responses: 0,
                observed: seen_tx,
            };
            tasks.push(tokio::spawn(w.run(stop_rx.clone())));
            ranges.push(range);
            observed.push(seen_rx);
        }
        Watchers { tasks, ranges, observed, stop, recorder }
    }

    /// Waits, at most `within`, until every watcher has observed the latest revision of its range
    /// as the member at `addr` answers it (linearizably). Returns the watchers still behind, with
    /// what they observed and what they should have.
    pub async fn catch_up(&mut self, addr: &str, within: Duration) -> Vec<(u64, Revision, Revision)> {
        let deadline = Instant::now() + within;
        let mut behind = Vec::new();
        for (i, range) in self.ranges.iter().enumerate() {
            let target = match latest_revision(addr, range).await {
                Ok(r) => r,
                Err(e) => {
                    behind.push((i as u64, *self.observed[i].borrow(), -1));
                    eprintln!("keel-chaos: watcher {i}: cannot read its range's latest revision: {e}");
                    continue;
                }
            };
            let rx = &mut self.observed[i];
            let reached = matches!(
                tokio::time::timeout_at(deadline, rx.wait_for(|&seen| seen >= target)).await,
                Ok(Ok(_))
            );
            if !reached {
                behind.push((i as u64, *rx.borrow(), target));
            }
        }
        behind
    }

    /// Stops every watcher, waits for them, and records the end of the run at `end` (`None`: the
    /// cluster did not converge, so no revision can be promised).
    pub async fn stop(self, end: Option<Revision>) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(revision) = end {
            self.recorder.push_watch(WatchRecord::End(EndRecord { revision }));
        }
    }
}

/// The highest mod revision of the keys in `range` (the workload never deletes, so the revision
/// of the range's last event).
async fn latest_revision(addr: &str, range: &Range) -> Result<Revision, String> {
    let mut kv = KvClient::new(channel(addr, Duration::from_secs(5)));
    let req = rpc::RangeRequest {
        key: range.key.clone().into_bytes(),
        range_end: range.range_end.clone().into_bytes(),
        serializable: false,
        ..Default::default()
    };
    let resp = kv.range(req).await.map_err(|s| s.message().to_string())?.into_inner();
    Ok(resp.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0))
}

struct Watcher {
    id: u64,
    range: Range,
    endpoints: Vec<String>,
    /// The member the next stream goes to.
    at: usize,
    timeout: Duration,
    /// How often to ask the stream for a progress notification, if at all.
    progress_every: Option<Duration>,
    epoch: Instant,
    recorder: Arc<Recorder>,
    /// The start revision of the next stream: one past everything observed.
    next_start: Revision,
    /// Responses received so far, over all streams.
    responses: u64,
    observed: signal::Sender<Revision>,
}

/// Why a stream ended.
enum Ended {
    Broken(String),
    Stopped,
}

impl Watcher {
    async fn run(mut self, mut stop: signal::Receiver<bool>) {
        let mut pause = RECONNECT_PAUSE;
        loop {
            let responses_before = self.responses;
            match self.stream(&mut stop).await {
                Ended::Stopped => {
                    self.closed("end of run".into());
                    return;
                }
                Ended::Broken(reason) => self.closed(reason),
            }
            self.at = (self.at + 1) % self.endpoints.len();
            // Stopping is the only thing to wait for here; the pause only paces reconnects.
            pause = match self.responses > responses_before {
                true => RECONNECT_PAUSE,
                false => (pause * 2).min(RECONNECT_PAUSE_MAX),
            };
            if tokio::time::timeout(pause, stop.wait_for(|&s| s)).await.is_ok() {
                return;
            }
        }
    }

    /// One stream, until it breaks or the run stops.
    async fn stream(&mut self, stop: &mut signal::Receiver<bool>) -> Ended {
        if *stop.borrow() {
            return Ended::Stopped;
        }
        let addr = self.endpoints[self.at].clone();
        let create = rpc::WatchCreateRequest {
            key: self.range.key.clone().into_bytes(),
            range_end: self.range.range_end.clone().into_bytes(),
            start_revision: self.next_start,
            progress_notify: true,
            prev_kv: self.range.prev_kv,
            ..Default::default()
        };
        self.recorder.push_watch(WatchRecord::Watch(WatchStart {
            watcher: self.id,
            key: self.range.key.clone(),
            range_end: self.range.range_end.clone(),
            start_revision: self.next_start,
            filters: vec![],
            prev_kv: self.range.prev_kv,
            progress_notify: true,
            node: Some(addr.clone()),
            at_us: Some(self.micros()),
        }));
        // The request stream stays open (dropping `_requests` would half-close it) for as long as
        // the watch runs.
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let first = rpc::WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
        requests.try_send(first).expect("a new channel of capacity 1 has room for its first message");
        let mut client = WatchClient::new(stream_channel(&addr, self.timeout));
        let opened = tokio::select! {
            r = tokio::time::timeout(self.timeout, client.watch(ReceiverStream::new(rx))) => r,
            _ = stop.wait_for(|&s| s) => return Ended::Stopped,
        };
        let mut responses = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Ended::Broken(format!("open: {}", status.message())),
            Err(_) => return Ended::Broken("open: timed out".into()),
        };
        let mut progress = self.progress_every.map(|every| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            let message = tokio::select! {
                m = responses.message() => m,
                _ = stop.wait_for(|&s| s) => return Ended::Stopped,
                _ = async { progress.as_mut()?.tick().await; Some(()) }, if progress.is_some() => {
                    let ask = rpc::WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(rpc::WatchProgressRequest {})),
                    };
                    // A full queue already holds a request; a closed one means the stream is ending.
                    let _ = requests.try_send(ask);
                    continue;
                }
            };
            match message {
                Ok(Some(resp)) => {
                    if let Some(ended) = self.received(resp) {
                        return ended;
                    }
                }
                Ok(None) => return Ended::Broken("the server ended the stream".into()),
                Err(status) => return Ended::Broken(format!("{:?}: {}", status.code(), status.message())),
            }
        }
    }

    /// Records a response and moves the resume point on; `Some` if it ended the stream.
    fn received(&mut self, resp: rpc::WatchResponse) -> Option<Ended> {
        self.responses += 1;
        let header = resp.header.as_ref().map_or(0, |h| h.revision);
        let record = WatchResponse {
            watcher: self.id,
            revision: header,
            events: resp.events.iter().map(event).collect(),
            created: resp.created,
            canceled: resp.canceled,
            compact_revision: resp.compact_revision,
            cancel_reason: resp.cancel_reason.clone(),
            at_us: Some(self.micros()),
        };
        let observed = if record.is_progress_notify() {
            Some(header)
        } else {
            record.events.last().map(|e| e.mod_revision)
        };
        self.recorder.push_watch(WatchRecord::Response(record));
        if let Some(r) = observed.filter(|&r| r >= self.next_start) {
            self.next_start = r + 1;
            self.observed.send_replace(r);
        }
        if resp.canceled {
            if resp.compact_revision > 0 {
                // Everything before it is gone: resume from the oldest revision still there.
                self.next_start = self.next_start.max(resp.compact_revision);
            }
            return Some(Ended::Broken(format!("canceled: {}", resp.cancel_reason)));
        }
        None
    }

    fn closed(&self, reason: String) {
        self.recorder.push_watch(WatchRecord::Closed(StreamClosed {
            watcher: self.id,
            reason,
            at_us: Some(self.micros()),
        }));
    }

    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn event(e: &mvccpb::Event) -> Event {
    let kv = e.kv.clone().unwrap_or_default();
    let kind =
        if e.r#type == mvccpb::event::EventType::Delete as i32 { EventType::Delete } else { EventType::Put };
    Event {
        kind,
        key: text(&kv.key),
        value: (kind == EventType::Put).then(|| text(&kv.value)),
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        version: kv.version,
        prev_kv: e.prev_kv.as_ref().map(|p| KeyValue {
            key: text(&p.key),
            value: text(&p.value),
            mod_revision: p.mod_revision,
            create_revision: p.create_revision,
            version: p.version,
        }),
    }
}
