//! The clients: concurrent etcd v3 clients doing get / put / compare-and-set (an etcd Txn) on a few
//! keys treated as registers, each operation recorded with its invoke and complete time and what
//! its client knows of its outcome.
//!
//! What counts as what (the checker relies on it):
//! - ok: the server answered. A Txn whose compare failed is a `fail` cas: it happened, as a read
//!   that saw something other than the expected value.
//! - unknown: any error or timeout of a put or cas. A put may have been committed even when the
//!   answer never arrived, so no error on a write is taken as "did not happen".
//! - a read that errs or times out tells nothing and is recorded as rejected (dropped).
//!
//! Every written value is unique (`c<client>-<n>`), which the cheap checks need.
//!
//! Each put and cas is also recorded as a write of the watch history (with the revision the server
//! answered, if it did), against which the watchers' events are checked.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use keel_check::watch::Revision;
use keel_check::watch::WatchRecord;
use keel_check::watch::WriteOp;
use keel_check::watch::WriteRecord;
use keel_check::Op;
use keel_check::Outcome;
use keel_kv::etcd::pb::etcdserverpb as rpc;
use rand::rngs::StdRng;
use rand::Rng as _;
use rand::SeedableRng as _;
use rpc::compare::CompareResult;
use rpc::compare::CompareTarget;
use rpc::compare::TargetUnion;
use rpc::kv_client::KvClient;
use rpc::request_op::Request as TxnRequestOp;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cluster::channel;

/// What the clients do.
#[derive(Debug, Clone)]
pub struct Workload {
    pub clients: usize,
    pub keys: usize,
    /// Operations per second over all clients.
    pub rate: u32,
    /// How long one request may take before its outcome is unknown.
    pub timeout: Duration,
    pub seed: u64,
    /// Watch streams beside the clients ([`crate::watchers`]); 0 for none.
    pub watchers: usize,
    /// How often each watcher asks for a progress notification, if at all.
    pub watch_progress_every: Option<Duration>,
    /// Clients contending for locks with leases ([`crate::locks`]); 0 for none.
    pub lock_clients: usize,
    /// Clients keeping leases alive with a key attached, then letting them lapse; 0 for none.
    pub lease_clients: usize,
}

/// The key names.
pub fn key(i: usize) -> String {
    format!("k{i}")
}

/// The recorded histories, shared by the clients and the watchers: the register operations, and
/// the watch history (the writes again, with their revisions, and every watch response).
#[derive(Debug, Default)]
pub struct Recorder {
    ops: Mutex<Vec<Op>>,
    watch: Mutex<Vec<WatchRecord>>,
}

impl Recorder {
    fn push(&self, op: Op) {
        self.ops.lock().expect("recorder lock poisoned by a panicking client").push(op);
    }

    /// Records a write of `op` (a put or cas; a failed cas certainly wrote nothing) in the watch
    /// history, and `op` itself.
    fn push_write(&self, op: Op, revision: Option<Revision>) {
        let write = WriteRecord {
            client: op.client,
            op: WriteOp::Put,
            key: op.key.clone(),
            value: op.value.clone(),
            outcome: op.outcome,
            revision: revision.filter(|_| op.outcome == Outcome::Ok),
        };
        self.push_watch(WatchRecord::Write(write));
        self.push(op);
    }

    pub(crate) fn push_watch(&self, record: WatchRecord) {
        self.watch.lock().expect("recorder lock poisoned by a panicking client").push(record);
    }

    pub fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().expect("recorder lock poisoned by a panicking client"))
    }

    /// The watch history so far, in the order recorded (each watcher's records in its own order).
    pub fn take_watch(&self) -> Vec<WatchRecord> {
        std::mem::take(&mut *self.watch.lock().expect("recorder lock poisoned by a panicking client"))
    }
}

/// Runs the clients against `endpoints` (client addresses) until `stop` turns true.
/// Times are microseconds since `epoch`.
pub async fn run(
    workload: Workload,
    endpoints: Vec<String>,
    epoch: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    recorder: Arc<Recorder>,
) {
    let mut tasks = Vec::new();
    let per_client = Duration::from_secs_f64(workload.clients as f64 / f64::from(workload.rate.max(1)));
    for c in 0..workload.clients {
        let w = workload.clone();
        let endpoints = endpoints.clone();
        let stop = stop.clone();
        let recorder = recorder.clone();
        tasks.push(tokio::spawn(async move {
            client(c as u64, w, endpoints, epoch, per_client, stop, recorder).await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn micros(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

async fn client(
    id: u64,
    w: Workload,
    endpoints: Vec<String>,
    epoch: Instant,
    period: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
    recorder: Arc<Recorder>,
) {
    let mut rng = StdRng::seed_from_u64(w.seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // Each client starts on its own node and moves to the next one after an error, so that a
    // dead or cut-off node does not stall it for the rest of the run.
    let mut at = id as usize % endpoints.len();
    let mut kv = KvClient::new(channel(&endpoints[at], w.timeout));
    let mut last_seen: Vec<Option<String>> = vec![None; w.keys];
    let mut n = 0u64;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        tick.tick().await;
        let k = rng.gen_range(0..w.keys);
        let roll: f64 = rng.gen();
        let ok = if roll < 0.5 {
            read(&mut kv, id, k, epoch, w.timeout, &recorder, &mut last_seen).await
        } else {
            n += 1;
            let value = format!("c{id}-{n}");
            if roll < 0.8 {
                put(&mut kv, id, k, value, epoch, w.timeout, &recorder).await
            } else {
                let expect = last_seen[k].clone();
                cas(&mut kv, id, k, expect, value, epoch, w.timeout, &recorder).await
            }
        };
        if !ok {
            at = (at + 1) % endpoints.len();
            kv = KvClient::new(channel(&endpoints[at], w.timeout));
        }
    }
}

async fn read(
    kv: &mut KvClient<Channel>,
    id: u64,
    k: usize,
    epoch: Instant,
    timeout: Duration,
    recorder: &Recorder,
    last_seen: &mut [Option<String>],
) -> bool {
    let op = Op::read(id, key(k), micros(epoch));
    let req = rpc::RangeRequest { key: key(k).into_bytes(), serializable: false, ..Default::default() };
    match tokio::time::timeout(timeout, kv.range(req)).await {
        Ok(Ok(resp)) => {
            let seen =
                resp.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            recorder.push(op.read_ok(micros(epoch), seen.as_deref()));
            last_seen[k] = seen;
            true
        }
        Ok(Err(status)) => {
            recorder.push(op.rejected(micros(epoch), status.message().to_string()));
            false
        }
        Err(_) => {
            recorder.push(op.rejected(micros(epoch), "timed out"));
            false
        }
    }
}

async fn put(
    kv: &mut KvClient<Channel>,
    id: u64,
    k: usize,
    value: String,
    epoch: Instant,
    timeout: Duration,
    recorder: &Recorder,
) -> bool {
    let op = Op::write(id, key(k), value.clone(), micros(epoch));
    let req = rpc::PutRequest { key: key(k).into_bytes(), value: value.into_bytes(), ..Default::default() };
    match tokio::time::timeout(timeout, kv.put(req)).await {
        Ok(Ok(resp)) => {
            let revision = resp.into_inner().header.map(|h| h.revision);
            recorder.push_write(op.ok(micros(epoch)), revision);
            true
        }
        _ => {
            recorder.push_write(op.unknown(), None);
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn cas(
    kv: &mut KvClient<Channel>,
    id: u64,
    k: usize,
    expect: Option<String>,
    value: String,
    epoch: Instant,
    timeout: Duration,
    recorder: &Recorder,
) -> bool {
    let op = Op::cas(id, key(k), expect.as_deref(), value.clone(), micros(epoch));
    let compare = match &expect {
        Some(v) => rpc::Compare {
            key: key(k).into_bytes(),
            target: CompareTarget::Value as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Value(v.clone().into_bytes())),
            ..Default::default()
        },
        // Absent: version 0.
        None => rpc::Compare {
            key: key(k).into_bytes(),
            target: CompareTarget::Version as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Version(0)),
            ..Default::default()
        },
    };
    let put = rpc::RequestOp {
        request: Some(TxnRequestOp::RequestPut(rpc::PutRequest {
            key: key(k).into_bytes(),
            value: value.into_bytes(),
            ..Default::default()
        })),
    };
    let req = rpc::TxnRequest { compare: vec![compare], success: vec![put], failure: vec![] };
    match tokio::time::timeout(timeout, kv.txn(req)).await {
        Ok(Ok(resp)) => {
            let done = micros(epoch);
            let resp = resp.into_inner();
            // A Txn's header revision is its own when it wrote (the compare succeeded).
            let revision = resp.header.map(|h| h.revision);
            recorder.push_write(if resp.succeeded { op.ok(done) } else { op.fail(done) }, revision);
            true
        }
        _ => {
            recorder.push_write(op.unknown(), None);
            false
        }
    }
}

/// Reads every key from node `addr` without going through the leader (serializable): what that
/// node's own state holds.
pub async fn read_all_local(addr: &str, keys: usize) -> Result<Vec<(String, Option<String>)>, String> {
    let mut kv = KvClient::new(channel(addr, Duration::from_secs(5)));
    let mut out = Vec::with_capacity(keys);
    for k in 0..keys {
        let req = rpc::RangeRequest { key: key(k).into_bytes(), serializable: true, ..Default::default() };
        let resp =
            kv.range(req).await.map_err(|s| format!("read {} from {addr}: {}", key(k), s.message()))?;
        let v = resp.into_inner().kvs.first().map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
        out.push((key(k), v));
    }
    Ok(out)
}
