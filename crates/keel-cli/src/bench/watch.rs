//! `--op watch`: watchers on one prefix, multiplexed over a few Watch streams and connections, and
//! puts under that prefix at a fixed rate on a connection of their own. Measures how many events
//! reach the watchers per second, how late each watcher gets each put's event, and whether every
//! watcher got every acknowledged put.
//!
//! Each put's key carries its sequence number and the moment it was sent, so a watch stream's task
//! needs nothing shared to time an event: one task per stream reads the responses of all its
//! watchers (no task or channel per watcher), decoded by `wire.rs` without copying the values,
//! which keeps 10,000 watchers cheap for the client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_kv::etcd::pb::etcdserverpb::kv_client::KvClient;
use keel_kv::etcd::pb::etcdserverpb::PutRequest;
use rand::rngs::StdRng;
use rand::SeedableRng as _;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use super::load::{connect_spread, describe, note, preload_noted, targets};
use super::report::{ErrorTally, Tally, WatchRow};
use super::wire::{create_request_frame, open_watch, put_key, WatchBatch};
use super::{random_value, spread, BenchError, Plan, WatchFailure, WatchSpec};
use crate::client::Endpoint;

/// How often the drain checks whether every watcher has every event.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// The drain gives up this long after the last put was answered, even if events still trickle
/// in: a server that far behind has shown what it can do.
const MAX_DRAIN: Duration = Duration::from_secs(60);

/// Runs a watch fan-out: `timeout` bounds each connect, each put, the watchers' creation, and the
/// wait for the last events (no event for that long ends the wait). Notes on progress go to stderr.
pub async fn run(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
    spec: WatchSpec,
) -> Result<(WatchRow, ErrorTally), BenchError> {
    let targets = targets(endpoints, timeout, &plan).await?;
    let channels = connect_spread(&targets, plan.conns, timeout).await?;
    // The puts go on a connection of their own, as etcd's `benchmark watch-latency` sends them,
    // so that no put waits behind event traffic on a shared connection.
    let put_conn = connect_spread(&targets, 1, timeout).await?;
    let plan = Arc::new(plan);
    preload_noted(&channels, &plan).await;

    let prefix = run_prefix(&mut StdRng::from_entropy());
    let created = Instant::now();
    let streams = open_streams(&channels, &prefix, spec, timeout).await?;
    note(&format!(
        "watching {} with {} watchers on {} streams over {} conns (created in {:.2}s)",
        String::from_utf8_lossy(&prefix),
        spec.watchers,
        spec.streams,
        plan.conns,
        created.elapsed().as_secs_f64()
    ));

    // Every time in a key is nanoseconds since `base`.
    let base = Instant::now();
    let start = base + plan.warmup;
    let clock = Clock { base, measured_from: nanos(plan.warmup) };
    let progress = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);
    let mut readers = Vec::with_capacity(streams.len());
    for (responses, ids) in streams {
        readers.push(tokio::spawn(read_events(
            responses,
            ids,
            clock,
            Arc::clone(&progress),
            stopped.clone(),
        )));
    }

    let (puts, put_tally) =
        send_puts(put_conn.first(), &plan, spec, &prefix, base, start, start + plan.duration).await;
    let expected = puts.sent * spec.watchers as u64;
    drain(&progress, expected, timeout).await;
    // Nobody waits on a closed channel: the readers are still running, each holding a receiver.
    let _ = stop.send(true);

    let (mut latency, mut last_event) = (Tally::default(), None);
    let mut received = Vec::with_capacity(spec.watchers);
    for reader in readers {
        match reader.await {
            Ok(tally) => {
                latency.merge(&tally.latency);
                last_event = last_event.max(tally.last_event);
                received.extend(tally.received);
            }
            Err(e) => latency.errors.add(format!("watch stream task failed: {e}")),
        }
    }
    let missed = Missed::count(&puts.acked, &received, spec.watchers);
    if missed.events > 0 {
        note(&format!(
            "missed events: {} ({} of {} watchers missed at least one of {} acknowledged puts)",
            missed.events,
            missed.watchers,
            spec.watchers,
            puts.acked.len()
        ));
    }
    let mut errors = put_tally.errors.clone();
    errors.merge(&latency.errors);
    // Events per second over the measurement, stretched by a server that fell behind; a server
    // that stopped answering does not shorten it to when it stopped.
    let last = last_event.unwrap_or(start).max(puts.last_sent).max(start);
    let row = WatchRow::new(
        &plan,
        spec,
        &put_tally,
        &latency,
        missed.events,
        errors.total,
        last.saturating_duration_since(start),
    );
    Ok((row, errors))
}

/// `watch-<16 hex digits>/`: a prefix no other run (and no preloaded key) writes under.
pub fn run_prefix(rng: &mut impl rand::Rng) -> Vec<u8> {
    format!("watch-{:016x}/", rng.gen::<u64>()).into_bytes()
}

/// The end of a prefix's range: the prefix with its last byte incremented (`/` becomes `0`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    // run_prefix() ends in '/', far below 0xff, so the last byte increments without carry.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// A growable set of small numbers (put sequence numbers): one bit each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    /// Adds `i`; false if it was already there.
    pub fn insert(&mut self, i: u64) -> bool {
        let (word, bit) = (usize::try_from(i / 64).unwrap_or(usize::MAX), 1u64 << (i % 64));
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.len += u64::from(new);
        new
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// How many of `self` are not in `other`.
    pub fn missing_from(&self, other: &Bits) -> u64 {
        let word = |i: usize| other.words.get(i).copied().unwrap_or(0);
        self.words.iter().enumerate().map(|(i, w)| u64::from((w & !word(i)).count_ones())).sum()
    }
}

/// The events the watchers should have received and did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Missed {
    /// For each watcher, the acknowledged puts whose event it did not get, summed.
    pub events: u64,
    /// Watchers that missed at least one.
    pub watchers: usize,
}

impl Missed {
    /// `received` holds what each watcher got; a watcher without an entry (its stream's reader
    /// failed) got nothing.
    pub fn count(acked: &Bits, received: &[Bits], watchers: usize) -> Missed {
        let absent = watchers.saturating_sub(received.len());
        let mut missed = Missed { events: absent as u64 * acked.len(), watchers: absent };
        for got in received {
            let n = acked.missing_from(got);
            missed.events += n;
            missed.watchers += usize::from(n > 0);
        }
        missed
    }
}

/// How many of `watchers` go on stream `stream` of `streams` (watcher `w` on stream `w mod
/// streams`).
pub fn watchers_on(stream: usize, watchers: usize, streams: usize) -> usize {
    let streams = streams.max(1);
    watchers / streams + usize::from(stream < watchers % streams)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// When the keys' times count from, and from which time on a put is measured.
#[derive(Clone, Copy, Debug)]
struct Clock {
    base: Instant,
    /// Puts sent this many ns after `base` or later are measured (the warm-up's end).
    measured_from: u64,
}

/// One watch stream: its responses, and its watchers by the id the server gave each.
type OpenStream = (Streaming<WatchBatch>, HashMap<i64, usize>);

/// Opens every stream (all at once) and creates its watchers; returns once the server has
/// confirmed each, or the first failure: a server without Watch fails here, before any put.
async fn open_streams(
    channels: &[Channel],
    prefix: &[u8],
    spec: WatchSpec,
    timeout: Duration,
) -> Result<Vec<OpenStream>, BenchError> {
    let mut opening = Vec::with_capacity(spec.streams);
    for stream in 0..spec.streams {
        let Some(channel) = channels.get(spread(stream, channels.len())) else { break };
        let watchers = watchers_on(stream, spec.watchers, spec.streams);
        opening.push(tokio::spawn(open_stream(channel.clone(), prefix.to_vec(), watchers, timeout)));
    }
    let mut streams = Vec::with_capacity(opening.len());
    let mut created = 0;
    let mut failure = None;
    for task in opening {
        match task.await {
            Ok(Ok(stream)) => {
                created += stream.1.len();
                streams.push(stream);
            }
            Ok(Err((n, why))) => {
                created += n;
                failure.get_or_insert(why);
            }
            Err(e) => {
                failure.get_or_insert(WatchFailure::Task(e.to_string()));
            }
        }
    }
    match failure {
        None => Ok(streams),
        Some(why) => Err(BenchError::Watch { created, wanted: spec.watchers, why }),
    }
}

/// One stream with `watchers` watchers on `prefix`: every create request is sent at once, and
/// the stream's request side stays open (a closed one ends the stream on etcd). On failure, the
/// number created so far and why.
async fn open_stream(
    mut channel: Channel,
    prefix: Vec<u8>,
    watchers: usize,
    timeout: Duration,
) -> Result<OpenStream, (usize, WatchFailure)> {
    let creates = vec![create_request_frame(&prefix, &prefix_end(&prefix)); watchers];
    let mut responses = match tokio::time::timeout(timeout, open_watch(&mut channel, creates, prefix)).await {
        Ok(Ok(responses)) => responses,
        Ok(Err(status)) => return Err((0, WatchFailure::Refused(status))),
        Err(_) => return Err((0, WatchFailure::TimedOut(timeout))),
    };
    let mut ids = HashMap::with_capacity(watchers);
    while ids.len() < watchers {
        let n = ids.len();
        match tokio::time::timeout(timeout, responses.message()).await {
            Err(_) => return Err((n, WatchFailure::TimedOut(timeout))),
            Ok(Err(status)) => return Err((n, WatchFailure::Refused(status))),
            Ok(Ok(None)) => return Err((n, WatchFailure::Ended)),
            Ok(Ok(Some(r))) if r.canceled => return Err((n, WatchFailure::Canceled(r.cancel_reason))),
            Ok(Ok(Some(r))) if r.created => {
                if ids.insert(r.watch_id, n).is_some() {
                    return Err((n, WatchFailure::DuplicateId(r.watch_id)));
                }
            }
            // No put is sent before every watcher exists, so there is nothing else to read.
            Ok(Ok(Some(_))) => {}
        }
    }
    Ok((responses, ids))
}

/// What one stream's reader counted.
#[derive(Debug, Default)]
struct StreamTally {
    /// Put sent → event received, for measured puts; one sample per watcher and event. Its
    /// errors are the stream's.
    latency: Tally,
    /// When the last measured event arrived.
    last_event: Option<Instant>,
    /// Per watcher of the stream (in creation order), the puts whose event it got.
    received: Vec<Bits>,
}

/// Reads one stream's events until told to stop: times each measured event, records which
/// watcher got which put, and counts every new event in `progress` (for the drain).
async fn read_events(
    mut responses: Streaming<WatchBatch>,
    ids: HashMap<i64, usize>,
    clock: Clock,
    progress: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> StreamTally {
    let mut tally = StreamTally { received: vec![Bits::default(); ids.len()], ..StreamTally::default() };
    loop {
        let response = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            response = responses.message() => response,
        };
        let response = match response {
            Ok(Some(r)) => r,
            Ok(None) => {
                tally.latency.errors.add("watch stream ended by the server".to_owned());
                break;
            }
            Err(status) => {
                tally.latency.errors.add(format!("watch stream: {}", describe(&status)));
                break;
            }
        };
        let now = Instant::now();
        let since_base = nanos(now.saturating_duration_since(clock.base));
        let Some(&watcher) = ids.get(&response.watch_id) else {
            tally.latency.errors.add("a response for a watch id never created".to_owned());
            continue;
        };
        if response.canceled {
            tally.latency.errors.add(format!("watcher canceled by the server: {}", response.cancel_reason));
            continue;
        }
        if response.others > 0 {
            tally.latency.errors.add("an event that is not one of this run's puts".to_owned());
        }
        let mut new = 0;
        for &(seq, sent) in &response.puts {
            if !tally.received[watcher].insert(seq) {
                tally.latency.errors.add("an event received twice by one watcher".to_owned());
                continue;
            }
            new += 1;
            if sent >= clock.measured_from {
                tally.latency.record(Duration::from_nanos(since_base.saturating_sub(sent)));
                tally.last_event = Some(now);
            }
        }
        progress.fetch_add(new, Ordering::Relaxed);
    }
    tally
}

/// What the puts did.
struct Puts {
    /// Puts sent, acknowledged or not (warm-up included).
    sent: u64,
    /// The sequence numbers of the puts the server acknowledged (warm-up included).
    acked: Bits,
    /// When the last put was sent.
    last_sent: Instant,
}

/// Sends puts under `prefix` on schedule, `spec.rate` per second from `base`, at most
/// `plan.clients` in flight (a put whose turn comes while all are busy waits, and the schedule
/// catches up after). Those sent from `start` on are measured; none is sent at or after `end`, nor
/// after `plan.ops` measured ones. Returns the puts and the measured puts' tally. Without a
/// connection (no endpoint, which clap refuses) it sends nothing.
async fn send_puts(
    conn: Option<&Channel>,
    plan: &Plan,
    spec: WatchSpec,
    prefix: &[u8],
    base: Instant,
    start: Instant,
    end: Instant,
) -> (Puts, Tally) {
    let mut puts = Puts { sent: 0, acked: Bits::default(), last_sent: base };
    let mut tally = Tally::default();
    let Some(conn) = conn else { return (puts, tally) };
    let kv = KvClient::new(conn.clone());
    let value = random_value(&mut StdRng::from_entropy(), plan.value_size);
    let in_flight = Arc::new(Semaphore::new(plan.clients));
    let mut answers = JoinSet::new();
    let mut measured = 0;
    let interval = 1.0 / spec.rate as f64;
    for seq in 0u64.. {
        let due = base + Duration::from_secs_f64(seq as f64 * interval);
        if due >= end || measured >= plan.ops {
            break;
        }
        tokio::time::sleep_until(due).await;
        // The semaphore is never closed, so acquiring fails only if it were.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { break };
        while let Some(answer) = answers.try_join_next() {
            collect(answer, &mut puts, &mut tally);
        }
        let sent = Instant::now();
        // A put that waited for a free client past the end is not sent: with a stalled server,
        // catching up the whole schedule would take a timeout per --clients puts.
        if sent >= end {
            break;
        }
        if sent >= start {
            measured += 1;
        }
        let request = PutRequest {
            key: put_key(prefix, seq, nanos(sent.saturating_duration_since(base))),
            value: value.clone(),
            ..Default::default()
        };
        let mut kv = kv.clone();
        answers.spawn(async move {
            let result = kv.put(request).await.map(drop);
            drop(permit);
            PutAnswer { seq, measured: sent >= start, took: sent.elapsed(), result }
        });
        puts.sent += 1;
        puts.last_sent = sent;
    }
    while let Some(answer) = answers.join_next().await {
        collect(answer, &mut puts, &mut tally);
    }
    (puts, tally)
}

struct PutAnswer {
    seq: u64,
    measured: bool,
    took: Duration,
    result: Result<(), tonic::Status>,
}

fn collect(answer: Result<PutAnswer, tokio::task::JoinError>, puts: &mut Puts, tally: &mut Tally) {
    match answer {
        Ok(PutAnswer { seq, measured, took, result: Ok(()) }) => {
            puts.acked.insert(seq);
            if measured {
                tally.record(took);
            }
        }
        Ok(PutAnswer { result: Err(status), .. }) => tally.errors.add(format!("put: {}", describe(&status))),
        Err(e) => tally.errors.add(format!("put task failed: {e}")),
    }
}

/// Waits until the watchers have received `expected` events, or none has arrived for `idle`, or
/// `MAX_DRAIN` has passed.
async fn drain(progress: &AtomicU64, expected: u64, idle: Duration) {
    let began = Instant::now();
    let (mut seen, mut moved) = (progress.load(Ordering::Relaxed), began);
    loop {
        let now = Instant::now();
        let received = progress.load(Ordering::Relaxed);
        if received >= expected {
            return;
        }
        if received != seen {
            (seen, moved) = (received, now);
        }
        if now - moved >= idle || now - began >= MAX_DRAIN {
            note(&format!(
                "stopped waiting for events: {} of {expected} received, none for {:.1}s, {:.1}s after the last put",
                received,
                (now - moved).as_secs_f64(),
                (now - began).as_secs_f64()
            ));
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_put_key_is_inside_the_watched_prefix() {
        let prefix = run_prefix(&mut StdRng::seed_from_u64(1));
        assert!(prefix.starts_with(b"watch-") && prefix.ends_with(b"/") && prefix.len() == 23);
        assert_eq!(prefix_end(b"watch-00/"), b"watch-000");
        for key in [put_key(&prefix, 0, 0), put_key(&prefix, u64::MAX, u64::MAX)] {
            assert!(key.starts_with(&prefix) && key.as_slice() < prefix_end(&prefix).as_slice());
        }
    }

    #[test]
    fn bits_count_what_one_set_misses_of_another() {
        let mut acked = Bits::default();
        for i in [0, 1, 63, 64, 200] {
            assert!(acked.insert(i));
        }
        assert!(!acked.insert(64));
        assert_eq!(acked.len(), 5);
        let mut got = Bits::default();
        for i in [0, 63, 200, 500] {
            got.insert(i);
        }
        // 1 and 64 missing; 500 (a put whose answer was lost) is not a miss.
        assert_eq!(acked.missing_from(&got), 2);
        // Four watchers: two missed, none, all five, and one whose reader failed (all five).
        let received = [got.clone(), acked.clone(), Bits::default()];
        assert_eq!(Missed::count(&acked, &received, 4), Missed { events: 2 + 5 + 5, watchers: 3 });
        assert_eq!(Missed::count(&acked, &[acked.clone()], 1), Missed { events: 0, watchers: 0 });
    }

    #[test]
    fn watchers_spread_evenly_over_the_streams() {
        let counts: Vec<usize> = (0..3).map(|s| watchers_on(s, 10, 3)).collect();
        assert_eq!(counts, [4, 3, 3]);
        assert_eq!((0..8).map(|s| watchers_on(s, 10_000, 8)).sum::<usize>(), 10_000);
        assert_eq!(watchers_on(0, 1, 1), 1);
    }
}
