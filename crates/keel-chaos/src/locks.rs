//! The lock and lease workload: clients that hold etcd leases, contend for named locks with them
//! and write through fences, and clients that keep leases alive with a key attached and then let
//! them lapse; everything they do recorded for `keel-check lock` (`lock.jsonl`).
//!
//! **Lock clients** loop: grant a lease (TTL 3–5 s), keep it alive every TTL/3 on a
//! `LeaseKeepAlive` stream, and take one of [`LOCKS`] locks with etcd's client-side mutex recipe
//! (what `etcdctl lock` and Go's `concurrency.Mutex` do, written here from the recipe): put
//! `<lock>/<lease hex>` with the lease if its create revision is 0 (else read it back); the key's
//! create revision is the fencing token; then, until no key under the prefix has a smaller create
//! revision, watch the newest smaller one for its delete. Once the own key is still there and
//! nothing smaller is, the lock is held. The holder makes a few writes to the lock's resource,
//! each `if create_revision(lock key) == token then put(resource)`; then releases (deletes its
//! key, stops the keep-alives, revokes the lease), or, one time in five, walks away: stops
//! keeping the lease alive and leaves the key to expire. A holder stops acting once its lease may
//! have expired by what it knows (the last acknowledged keep-alive's send time + TTL).
//!
//! **Lease clients** loop: grant a lease, put `lease/c<id>-<n>` with it, keep it alive for one to
//! two TTLs, stop, and read the key (linearizably) every 200 ms until it is gone. After the run,
//! [`final_probes`] reads every key not yet seen gone until it is, within a bound.
//!
//! Every request goes to the client's current member and moves to the next one on an error or a
//! timeout, as the register clients do. No request is retried blindly: an unanswered keep-alive,
//! fenced write or release is recorded as unknown; the only retry is the mutex's own create, which
//! is idempotent (it reads the key back if it exists).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_check::lock::{
    Abandon, Acquire, Attach, Bounds, FaultRecord, Fenced, Grant, Keepalive, KeepaliveOutcome, LockRecord,
    Probe, Release, Revoke, Stop,
};
use keel_check::Outcome;
use keel_kv::etcd::pb::etcdserverpb as rpc;
use keel_kv::etcd::pb::mvccpb;
use rand::rngs::StdRng;
use rand::Rng as _;
use rand::SeedableRng as _;
use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
use rpc::kv_client::KvClient;
use rpc::lease_client::LeaseClient;
use rpc::range_request::{SortOrder, SortTarget};
use rpc::request_op::Request as TxnRequestOp;
use rpc::response_op::Response as TxnResponseOp;
use rpc::watch_client::WatchClient;
use rpc::watch_create_request::FilterType;
use rpc::watch_request::RequestUnion;
use tokio::sync::watch as signal;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::cluster::{channel, System};
use crate::watchers::stream_channel;
use crate::workload::Workload;

/// The locks the lock clients contend for.
pub const LOCKS: usize = 2;
/// Lease TTLs are drawn from this range (seconds): well above etcd's minimum of 2 s.
const TTL_SECS: std::ops::RangeInclusive<i64> = 3..=5;
/// How long a lock client waits for a lock before giving up on it (revoking its lease).
const ACQUIRE_LIMIT: Duration = Duration::from_secs(30);
/// How long one watch for a smaller key's delete may run before the lock is looked at again.
const WATCH_SLICE: Duration = Duration::from_secs(2);
/// A holder stops acting this long before its lease may expire.
const SAFETY_MARGIN: Duration = Duration::from_millis(300);
/// How often a lease client reads its key once it stopped the keep-alives.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// How soon a keep-alive that got no answer is followed by the next, on the next member.
const KEEPALIVE_RETRY: Duration = Duration::from_millis(250);
/// A pause after an error before the next request, so that a dead member is not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The allowances of the late-expiry check for `system` (`docs/lock-check.md`): its election
/// timeout (etcd's default 1 s; keeld's `raft.election_timeout_max_ms`, 1 s by default), 5 s for a
/// healed cluster to have a leader again (restarted processes included), 2 s of slack for the
/// leader's expiry sweep, the revoke's commit and the read that looks.
pub fn bounds(system: &System) -> Bounds {
    let election_timeout_ms = match system {
        System::Keel { .. } | System::Etcd { .. } => 1000,
    };
    Bounds { election_timeout_ms, recovery_ms: 5000, grace_ms: 2000 }
}

/// The lock history being recorded, on the run's clock.
pub struct LockRecorder {
    epoch: Instant,
    records: Mutex<Vec<LockRecord>>,
}

impl LockRecorder {
    pub fn new(epoch: Instant) -> LockRecorder {
        LockRecorder { epoch, records: Mutex::new(Vec::new()) }
    }

    pub fn push(&self, record: LockRecord) {
        self.records.lock().expect("lock recorder poisoned by a panicking client").push(record);
    }

    /// Microseconds since the run's epoch.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A fault that began at `at_us` (taken before it was injected).
    pub fn fault(&self, at_us: u64, what: &str) {
        self.push(LockRecord::Fault(FaultRecord { at_us, what: what.to_owned() }));
    }

    pub fn heal(&self, what: &str) {
        self.push(LockRecord::Heal(FaultRecord { at_us: self.now_us(), what: what.to_owned() }));
    }

    pub fn take(&self) -> Vec<LockRecord> {
        std::mem::take(&mut *self.records.lock().expect("lock recorder poisoned by a panicking client"))
    }

    /// The attached keys of leases whose keep-alives stopped, not yet read absent: (client, lease,
    /// key).
    fn unresolved(&self) -> Vec<(u64, i64, String)> {
        let records = self.records.lock().expect("lock recorder poisoned by a panicking client");
        let stopped: std::collections::HashSet<i64> = records
            .iter()
            .filter_map(|r| match r {
                LockRecord::Stop(s) => Some(s.lease),
                _ => None,
            })
            .collect();
        let gone: std::collections::HashSet<&str> = records
            .iter()
            .filter_map(|r| match r {
                LockRecord::Probe(p) if !p.present => Some(p.key.as_str()),
                _ => None,
            })
            .collect();
        records
            .iter()
            .filter_map(|r| match r {
                LockRecord::Attach(a) if stopped.contains(&a.lease) && !gone.contains(a.key.as_str()) => {
                    Some((a.client, a.lease, a.key.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

/// Runs the lock clients and the lease clients of `workload` against `endpoints` until `stop`
/// turns true. Client ids start at 1000 (lock clients) and 2000 (lease clients), apart from the
/// register clients'.
pub async fn run(
    workload: Workload,
    endpoints: Vec<String>,
    stop: signal::Receiver<bool>,
    recorder: Arc<LockRecorder>,
) {
    let mut tasks = Vec::new();
    for i in 0..workload.lock_clients {
        let c = Client::new(1000 + i as u64, &workload, &endpoints, i, recorder.clone(), stop.clone());
        tasks.push(tokio::spawn(c.lock_loop()));
    }
    for i in 0..workload.lease_clients {
        let c = Client::new(2000 + i as u64, &workload, &endpoints, i, recorder.clone(), stop.clone());
        tasks.push(tokio::spawn(c.lease_loop()));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Reads, through the member at `addr`, every attached key of a stopped lease not yet seen gone,
/// every 250 ms until all are gone or `within` has passed; every read is recorded.
pub async fn final_probes(recorder: &LockRecorder, addr: &str, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut kv = KvClient::new(channel(addr, Duration::from_secs(2)));
    loop {
        let left = recorder.unresolved();
        if left.is_empty() || Instant::now() >= deadline {
            return left.len();
        }
        for (client, lease, key) in left {
            let sent_us = recorder.now_us();
            let req = rpc::RangeRequest { key: key.clone().into_bytes(), ..Default::default() };
            if let Ok(resp) = kv.range(req).await {
                let present = !resp.into_inner().kvs.is_empty();
                let at_us = recorder.now_us();
                recorder.push(LockRecord::Probe(Probe { client, lease, key, sent_us, at_us, present }));
            }
        }
        // Pacing between rounds of reads, not synchronization: the loop ends on what they find.
        tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(250))).await;
    }
}

/// One client: its member, its randomness, its recorder.
struct Client {
    id: u64,
    endpoints: Vec<String>,
    at: usize,
    timeout: Duration,
    channel: Channel,
    rng: StdRng,
    recorder: Arc<LockRecorder>,
    stop: signal::Receiver<bool>,
    /// Rounds so far (names the lease clients' keys).
    round: u64,
}

/// What became of a try for the lock.
enum Attempt {
    Acquired {
        token: i64,
    },
    /// The lease (and so the key) is gone.
    Lost,
    /// Waited too long, or the run stopped.
    GaveUp,
}

impl Client {
    fn new(
        id: u64,
        w: &Workload,
        endpoints: &[String],
        i: usize,
        recorder: Arc<LockRecorder>,
        stop: signal::Receiver<bool>,
    ) -> Client {
        let at = i % endpoints.len();
        Client {
            id,
            endpoints: endpoints.to_vec(),
            at,
            timeout: w.timeout,
            channel: channel(&endpoints[at], w.timeout),
            rng: StdRng::seed_from_u64(w.seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            recorder,
            stop,
            round: 0,
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn now(&self) -> u64 {
        self.recorder.now_us()
    }

    /// Moves to the next member after an error, and pauses briefly (or until the run stops).
    async fn next_member(&mut self) {
        self.at = (self.at + 1) % self.endpoints.len();
        self.channel = channel(&self.endpoints[self.at], self.timeout);
        let mut stop = self.stop.clone();
        let _ = tokio::time::timeout(ERROR_PAUSE, stop.wait_for(|&s| s)).await;
    }

    /// Waits `d`, or until the run stops.
    async fn pace(&mut self, d: Duration) {
        let mut stop = self.stop.clone();
        let _ = tokio::time::timeout(d, stop.wait_for(|&s| s)).await;
    }

    fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel.clone())
    }

    /// A new lease: (id, TTL, when the grant was sent).
    async fn grant(&mut self) -> Option<(i64, i64, u64)> {
        let ttl = self.rng.gen_range(TTL_SECS);
        let sent_us = self.now();
        let mut lease = LeaseClient::new(self.channel.clone());
        let resp =
            tokio::time::timeout(self.timeout, lease.lease_grant(rpc::LeaseGrantRequest { ttl, id: 0 }))
                .await;
        match resp {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if r.id == 0 || r.ttl <= 0 || !r.error.is_empty() {
                    self.next_member().await;
                    return None;
                }
                let at_us = self.now();
                self.recorder.push(LockRecord::Grant(Grant {
                    client: self.id,
                    lease: r.id,
                    ttl: r.ttl,
                    sent_us,
                    at_us,
                }));
                Some((r.id, r.ttl, sent_us))
            }
            _ => {
                self.next_member().await;
                None
            }
        }
    }

    async fn revoke(&mut self, lease: i64) {
        let sent_us = self.now();
        let mut client = LeaseClient::new(self.channel.clone());
        let resp =
            tokio::time::timeout(self.timeout, client.lease_revoke(rpc::LeaseRevokeRequest { id: lease }))
                .await;
        let outcome = match resp {
            Ok(Ok(_)) => Outcome::Ok,
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => Outcome::Fail,
            _ => Outcome::Unknown,
        };
        let at_us = self.now();
        self.recorder.push(LockRecord::Revoke(Revoke { client: self.id, lease, sent_us, at_us, outcome }));
        if outcome == Outcome::Unknown {
            self.next_member().await;
        }
    }

    fn keep_alive(&self, lease: i64, ttl: i64, grant_sent_us: u64) -> KeepAlive {
        KeepAlive::start(KeepAliveTask {
            client: self.id,
            lease,
            ttl,
            endpoints: self.endpoints.clone(),
            at: self.at,
            timeout: self.timeout,
            recorder: self.recorder.clone(),
            floor: Arc::new(AtomicU64::new(grant_sent_us + ttl as u64 * 1_000_000)),
            gone: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn lock_loop(mut self) {
        while !self.stopped() {
            let Some((lease, ttl, grant_sent)) = self.grant().await else { continue };
            let kept = self.keep_alive(lease, ttl, grant_sent);
            let lock = format!("lk{}", self.rng.gen_range(0..LOCKS));
            let key = format!("{lock}/{lease:x}");
            let sent_us = self.now();
            match self.acquire(&lock, &key, lease, &kept).await {
                Attempt::Acquired { token } => {
                    let at_us = self.now();
                    self.recorder.push(LockRecord::Acquire(Acquire {
                        client: self.id,
                        lock: lock.clone(),
                        lease,
                        key: key.clone(),
                        token,
                        sent_us,
                        at_us,
                    }));
                    self.hold(&lock, &key, token, lease, kept).await;
                }
                Attempt::Lost | Attempt::GaveUp => {
                    kept.stop().await;
                    self.revoke(lease).await;
                }
            }
        }
    }

    /// The mutex recipe, from the create of the lock key to holding the lock.
    async fn acquire(&mut self, lock: &str, key: &str, lease: i64, kept: &KeepAlive) -> Attempt {
        let started = Instant::now();
        let give_up = |c: &Client| c.stopped() || started.elapsed() > ACQUIRE_LIMIT;
        // Create the key, or read it back if an earlier try (whose answer was lost) created it.
        let token = loop {
            if give_up(self) || kept.gone() {
                return Attempt::GaveUp;
            }
            let txn = rpc::TxnRequest {
                compare: vec![rpc::Compare {
                    key: key.as_bytes().to_vec(),
                    target: CompareTarget::Create as i32,
                    result: CompareResult::Equal as i32,
                    target_union: Some(TargetUnion::CreateRevision(0)),
                    ..Default::default()
                }],
                success: vec![rpc::RequestOp {
                    request: Some(TxnRequestOp::RequestPut(rpc::PutRequest {
                        key: key.as_bytes().to_vec(),
                        lease,
                        ..Default::default()
                    })),
                }],
                failure: vec![rpc::RequestOp {
                    request: Some(TxnRequestOp::RequestRange(rpc::RangeRequest {
                        key: key.as_bytes().to_vec(),
                        ..Default::default()
                    })),
                }],
            };
            match tokio::time::timeout(self.timeout, self.kv().txn(txn)).await {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    if resp.succeeded {
                        match resp.header {
                            Some(h) => break h.revision,
                            None => return Attempt::GaveUp,
                        }
                    }
                    let existing = resp.responses.iter().find_map(|r| match &r.response {
                        Some(TxnResponseOp::ResponseRange(range)) => {
                            range.kvs.first().map(|kv| kv.create_revision)
                        }
                        _ => None,
                    });
                    match existing {
                        Some(create) => break create,
                        // It existed at the compare and not at the read of the same revision:
                        // cannot be; treat as lost.
                        None => return Attempt::Lost,
                    }
                }
                // The put refers to a lease that no longer exists.
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => return Attempt::Lost,
                _ => self.next_member().await,
            }
        };
        // Wait until no key of the lock has a smaller create revision.
        let prefix = format!("{lock}/");
        let range_end = prefix_end(&prefix);
        loop {
            if give_up(self) || kept.gone() {
                return Attempt::GaveUp;
            }
            let req = rpc::RangeRequest {
                key: prefix.clone().into_bytes(),
                range_end: range_end.clone(),
                sort_order: SortOrder::Ascend as i32,
                sort_target: SortTarget::Create as i32,
                ..Default::default()
            };
            let resp = match tokio::time::timeout(self.timeout, self.kv().range(req)).await {
                Ok(Ok(r)) => r.into_inner(),
                _ => {
                    self.next_member().await;
                    continue;
                }
            };
            let mine = resp.kvs.iter().any(|kv| kv.key == key.as_bytes() && kv.create_revision == token);
            if !mine {
                return Attempt::Lost;
            }
            let newest_smaller =
                resp.kvs.iter().filter(|kv| kv.create_revision < token).max_by_key(|kv| kv.create_revision);
            let Some(waited) = newest_smaller else { return Attempt::Acquired { token } };
            let from = resp.header.map_or(0, |h| h.revision) + 1;
            let waited = waited.key.clone();
            self.wait_deleted(&waited, from).await;
        }
    }

    /// Watches `key` from revision `from` until it is deleted, the slice runs out, the stream
    /// breaks, or the run stops; the caller then looks at the lock again, so any of them is fine.
    async fn wait_deleted(&mut self, key: &[u8], from: i64) {
        let create = rpc::WatchCreateRequest {
            key: key.to_vec(),
            start_revision: from,
            filters: vec![FilterType::Noput as i32],
            ..Default::default()
        };
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let first = rpc::WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) };
        requests.try_send(first).expect("a new channel of capacity 1 has room for its first message");
        let mut client = WatchClient::new(stream_channel(&self.endpoints[self.at], self.timeout));
        let mut stop = self.stop.clone();
        let watch = async {
            let mut responses = client.watch(ReceiverStream::new(rx)).await.ok()?.into_inner();
            loop {
                let resp = responses.message().await.ok()??;
                let deleted = mvccpb::event::EventType::Delete as i32;
                if resp.canceled || resp.events.iter().any(|e| e.r#type == deleted) {
                    return Some(());
                }
            }
        };
        let ended = tokio::select! {
            r = tokio::time::timeout(WATCH_SLICE, watch) => r.ok().flatten().is_some(),
            _ = stop.wait_for(|&s| s) => true,
        };
        drop(requests);
        if !ended {
            // Timed out or broke: maybe this member is gone; the next look goes elsewhere.
            self.next_member().await;
        }
    }

    async fn hold(&mut self, lock: &str, key: &str, token: i64, lease: i64, kept: KeepAlive) {
        let writes = self.rng.gen_range(1..=8);
        let resource = format!("res-{lock}");
        let abandon = |c: &Client, reason: &str| {
            LockRecord::Abandon(Abandon {
                client: c.id,
                lock: lock.to_owned(),
                token,
                at_us: c.now(),
                reason: reason.to_owned(),
            })
        };
        for n in 0..writes {
            if self.stopped() {
                break;
            }
            if self.now() + SAFETY_MARGIN.as_micros() as u64 >= kept.floor_us() {
                // By what this holder knows, its lease may have expired: it holds nothing.
                self.recorder.push(abandon(self, "lease may have expired"));
                kept.stop().await;
                self.revoke(lease).await;
                return;
            }
            match self.fenced_write(lock, key, token, &resource, n).await {
                Outcome::Fail => {
                    self.recorder.push(abandon(self, "fenced write refused: lock key gone"));
                    kept.stop().await;
                    self.revoke(lease).await;
                    return;
                }
                Outcome::Ok | Outcome::Unknown => {}
            }
            let pause = Duration::from_millis(self.rng.gen_range(50..=150));
            self.pace(pause).await;
        }
        if !self.stopped() && self.rng.gen_bool(0.2) {
            // Walk away: the key goes when the lease expires.
            self.recorder.push(abandon(self, "walked away"));
            kept.stop().await;
            return;
        }
        self.release(lock, key, token).await;
        kept.stop().await;
        self.revoke(lease).await;
    }

    async fn fenced_write(&mut self, lock: &str, key: &str, token: i64, resource: &str, n: u32) -> Outcome {
        self.round += 1;
        let value = format!("c{}-{}-{n}", self.id, self.round);
        let txn = rpc::TxnRequest {
            compare: vec![rpc::Compare {
                key: key.as_bytes().to_vec(),
                target: CompareTarget::Create as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::CreateRevision(token)),
                ..Default::default()
            }],
            success: vec![rpc::RequestOp {
                request: Some(TxnRequestOp::RequestPut(rpc::PutRequest {
                    key: resource.as_bytes().to_vec(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                })),
            }],
            failure: vec![],
        };
        let sent_us = self.now();
        let resp = tokio::time::timeout(self.timeout, self.kv().txn(txn)).await;
        let at_us = self.now();
        let (outcome, revision) = match resp {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                match (r.succeeded, r.header) {
                    (true, Some(h)) => (Outcome::Ok, Some(h.revision)),
                    (true, None) => (Outcome::Unknown, None),
                    (false, _) => (Outcome::Fail, None),
                }
            }
            _ => (Outcome::Unknown, None),
        };
        self.recorder.push(LockRecord::Fenced(Fenced {
            client: self.id,
            lock: lock.to_owned(),
            token,
            resource: resource.to_owned(),
            value,
            sent_us,
            at_us,
            outcome,
            revision,
        }));
        if outcome == Outcome::Unknown {
            self.next_member().await;
        }
        outcome
    }

    async fn release(&mut self, lock: &str, key: &str, token: i64) {
        let sent_us = self.now();
        let req = rpc::DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        let resp = tokio::time::timeout(self.timeout, self.kv().delete_range(req)).await;
        let at_us = self.now();
        let (outcome, revision) = match resp {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                match (r.deleted, r.header) {
                    (0, _) => (Outcome::Fail, None),
                    (_, Some(h)) => (Outcome::Ok, Some(h.revision)),
                    (_, None) => (Outcome::Unknown, None),
                }
            }
            _ => (Outcome::Unknown, None),
        };
        self.recorder.push(LockRecord::Release(Release {
            client: self.id,
            lock: lock.to_owned(),
            token,
            sent_us,
            at_us,
            outcome,
            revision,
        }));
        if outcome == Outcome::Unknown {
            self.next_member().await;
        }
    }

    async fn lease_loop(mut self) {
        while !self.stopped() {
            let Some((lease, ttl, grant_sent)) = self.grant().await else { continue };
            self.round += 1;
            let key = format!("lease/c{}-{}", self.id, self.round);
            let sent_us = self.now();
            let req = rpc::PutRequest {
                key: key.clone().into_bytes(),
                value: b"x".to_vec(),
                lease,
                ..Default::default()
            };
            let revision = match tokio::time::timeout(self.timeout, self.kv().put(req)).await {
                Ok(Ok(r)) => r.into_inner().header.map(|h| h.revision),
                _ => None,
            };
            let Some(revision) = revision else {
                // In doubt: the key may or may not exist; it says nothing either way.
                self.next_member().await;
                self.revoke(lease).await;
                continue;
            };
            let at_us = self.now();
            self.recorder.push(LockRecord::Attach(Attach {
                client: self.id,
                lease,
                key: key.clone(),
                sent_us,
                at_us,
                revision,
            }));
            let kept = self.keep_alive(lease, ttl, grant_sent);
            let hold = Duration::from_millis(self.rng.gen_range(1000..=2000) * ttl as u64);
            self.pace(hold).await;
            kept.stop().await;
            // Read the key until it is gone (or the run stops: `final_probes` takes over).
            let limit = Instant::now() + Duration::from_secs(ttl as u64 + 30);
            while !self.stopped() && Instant::now() < limit {
                let sent_us = self.now();
                let req = rpc::RangeRequest { key: key.clone().into_bytes(), ..Default::default() };
                match tokio::time::timeout(self.timeout, self.kv().range(req)).await {
                    Ok(Ok(r)) => {
                        let present = !r.into_inner().kvs.is_empty();
                        let at_us = self.now();
                        let probe =
                            Probe { client: self.id, lease, key: key.clone(), sent_us, at_us, present };
                        self.recorder.push(LockRecord::Probe(probe));
                        if !present {
                            break;
                        }
                        self.pace(PROBE_EVERY).await;
                    }
                    _ => self.next_member().await,
                }
            }
        }
    }
}

/// The range end of every key starting with `prefix`: its last byte + 1.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// A lease being kept alive by its own task.
struct KeepAlive {
    stop: signal::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    floor: Arc<AtomicU64>,
    gone: Arc<AtomicBool>,
}

struct KeepAliveTask {
    client: u64,
    lease: i64,
    ttl: i64,
    endpoints: Vec<String>,
    at: usize,
    timeout: Duration,
    recorder: Arc<LockRecorder>,
    /// The earliest the lease may expire by what the client knows (microseconds).
    floor: Arc<AtomicU64>,
    gone: Arc<AtomicBool>,
}

impl KeepAlive {
    fn start(task: KeepAliveTask) -> KeepAlive {
        let (stop, stop_rx) = signal::channel(false);
        let floor = task.floor.clone();
        let gone = task.gone.clone();
        KeepAlive { stop, task: tokio::spawn(task.run(stop_rx)), floor, gone }
    }

    fn floor_us(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }

    fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// Stops the keep-alives; returns once the task recorded its `stop` (no keep-alive is sent
    /// after it).
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

type KeepAliveStream =
    (tokio::sync::mpsc::Sender<rpc::LeaseKeepAliveRequest>, tonic::Streaming<rpc::LeaseKeepAliveResponse>);

impl KeepAliveTask {
    async fn run(mut self, mut stop: signal::Receiver<bool>) {
        let period = Duration::from_millis(self.ttl as u64 * 1000 / 3);
        let mut stream: Option<KeepAliveStream> = None;
        let mut next = Instant::now() + period;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|&s| s) => break,
            }
            let sent_us = self.recorder.now_us();
            let deadline = Instant::now() + self.timeout;
            let answer = self.one(&mut stream, deadline).await;
            let at_us = self.recorder.now_us();
            let (outcome, ttl) = match answer {
                Some(t) if t > 0 => (KeepaliveOutcome::Ok, Some(t)),
                Some(_) => (KeepaliveOutcome::Gone, None),
                None => (KeepaliveOutcome::Unknown, None),
            };
            self.recorder.push(LockRecord::Keepalive(Keepalive {
                client: self.client,
                lease: self.lease,
                sent_us,
                at_us,
                outcome,
                ttl,
            }));
            match outcome {
                KeepaliveOutcome::Ok => {
                    let floor = sent_us + ttl.unwrap_or(0) as u64 * 1_000_000;
                    self.floor.fetch_max(floor, Ordering::SeqCst);
                    next += period;
                }
                KeepaliveOutcome::Gone => {
                    self.gone.store(true, Ordering::SeqCst);
                    break;
                }
                KeepaliveOutcome::Unknown => {
                    // A fresh stream on the next member, soon (etcd's client waits 500 ms; a
                    // shorter pause keeps a 3 s lease alive through one failed member).
                    stream = None;
                    self.at = (self.at + 1) % self.endpoints.len();
                    next = Instant::now() + KEEPALIVE_RETRY;
                }
            }
        }
        let at_us = self.recorder.now_us();
        self.recorder.push(LockRecord::Stop(Stop { client: self.client, lease: self.lease, at_us }));
    }

    /// Sends one keep-alive on the stream (opened with it if there is none) and waits for its
    /// answer until `deadline`: the TTL it carries, or `None`.
    async fn one(&self, stream: &mut Option<KeepAliveStream>, deadline: Instant) -> Option<i64> {
        let req = rpc::LeaseKeepAliveRequest { id: self.lease };
        if stream.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            // The request goes first: a server may send the response headers only with the
            // first answer.
            tx.try_send(req).expect("a new channel of capacity 1 has room for its first message");
            let mut client = LeaseClient::new(stream_channel(&self.endpoints[self.at], self.timeout));
            let opened =
                tokio::time::timeout_at(deadline, client.lease_keep_alive(ReceiverStream::new(rx))).await;
            let inbound = opened.ok()?.ok()?.into_inner();
            *stream = Some((tx, inbound));
        } else {
            let (tx, _) = stream.as_ref().expect("checked above");
            tokio::time::timeout_at(deadline, tx.send(req)).await.ok()?.ok()?;
        }
        let (_, inbound) = stream.as_mut().expect("opened above");
        let resp = tokio::time::timeout_at(deadline, inbound.message()).await.ok()?.ok()??;
        Some(resp.ttl)
    }
}
