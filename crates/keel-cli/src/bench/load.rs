//! The load itself: gRPC connections, finding the leader, the preload, and the clients, each a task
//! sending one request at a time on one of the connections. The measured loop is shared by every
//! load whose clients send one request (or one pair) at a time: puts and gets here, the lease and
//! lock loads in `lease.rs` and `lock.rs`.

use std::future::Future;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use keel_kv::etcd::pb::etcdserverpb::kv_client::KvClient;
use keel_kv::etcd::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_kv::etcd::pb::etcdserverpb::{PutRequest, RangeRequest, StatusRequest};
use rand::rngs::StdRng;
use rand::SeedableRng as _;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint as GrpcEndpoint};

use super::report::{ErrorTally, Row, Tally};
use super::{
    error_chain, key, pick_leader, random_key, random_value, spread, BenchError, Consistency, MemberView, Op,
    Plan, PRELOAD_CLIENTS,
};
use crate::client::Endpoint;
use crate::tls::{self, Connector};

/// A client that got an error waits this long before its next request, so that an endpoint that
/// refuses at once (down, no leader) is not hammered in a tight loop that starves the others.
pub(super) const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Runs `plan` against `endpoints`; `timeout` bounds each connect and each request. Notes on
/// progress go to stderr; the result is the row (printed by the caller) and the errors.
pub async fn run(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
) -> Result<(Row, ErrorTally), BenchError> {
    let (channels, plan) = prepare(endpoints, timeout, plan).await?;

    let serializable = plan.consistency == Consistency::Serializable;
    let clients = (0..plan.clients)
        .filter_map(|client| channels.get(spread(client, channels.len())))
        .map(|channel| {
            let mut rng = StdRng::from_entropy();
            let value = random_value(&mut rng, plan.value_size);
            KvRequests {
                kv: KvClient::new(channel.clone()),
                plan: Arc::clone(&plan),
                serializable,
                value,
                rng,
            }
        })
        .collect();
    let (total, elapsed) = measure(clients, &plan).await;
    let row = Row::new(&plan, &total, elapsed);
    Ok((row, total.errors))
}

/// One client's requests, as the measured loop sends them: one at a time.
pub(super) trait Requests: Send + 'static {
    /// Sends the next request (or the next pair that counts as one op, such as a grant and its
    /// revoke) and awaits the answer; on failure, the error as counted.
    fn next(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Runs every client, each a task sending its requests one at a time through `plan`'s warm-up and
/// then the measured window. Returns the merged tally and the measured time: from the window's
/// start to the last measured answer.
pub(super) async fn measure<R: Requests>(clients: Vec<R>, plan: &Plan) -> (Tally, Duration) {
    let window = Arc::new(Window::after_warmup(plan));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(client_loop(client, plan.ops, Arc::clone(&window))))
        .collect();
    let mut total = Tally::default();
    let mut finished = window.start;
    for task in tasks {
        match task.await {
            Ok((tally, done)) => {
                total.merge(&tally);
                finished = finished.max(done);
            }
            Err(e) => total.errors.add(format!("client task failed: {e}")),
        }
    }
    (total, finished.saturating_duration_since(window.start))
}

/// A client of puts and gets: each request a random key of the key space.
struct KvRequests {
    kv: KvClient<Channel>,
    plan: Arc<Plan>,
    serializable: bool,
    /// Sent with every put of this client.
    value: Vec<u8>,
    rng: StdRng,
}

impl Requests for KvRequests {
    async fn next(&mut self) -> Result<(), String> {
        let op = self.plan.workload.next_op(&mut self.rng);
        let key = random_key(&mut self.rng, self.plan.key_space);
        send(&mut self.kv, op, key, &self.value, self.serializable).await.map_err(|s| describe(&s))
    }
}

/// What every load does first: find its targets, open `plan.conns` connections spread over them,
/// and run `--preload` if asked for.
pub(super) async fn prepare(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
) -> Result<(Vec<Channel>, Arc<Plan>), BenchError> {
    let targets = targets(endpoints, timeout, &plan).await?;
    let channels = connect_spread(&targets, plan.conns, timeout).await?;
    let plan = Arc::new(plan);
    preload_noted(&channels, &plan).await;
    Ok((channels, plan))
}

/// The endpoints the run sends to: the leader alone with `--target-leader`, else all of them.
pub(super) async fn targets(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: &Plan,
) -> Result<Vec<Endpoint>, BenchError> {
    if plan.target_leader {
        let leader = find_leader(endpoints, timeout).await?;
        note(&format!("leader: {leader}"));
        Ok(vec![leader])
    } else {
        Ok(endpoints.to_vec())
    }
}

/// `count` connections, connection `j` to target `j mod targets`.
pub(super) async fn connect_spread(
    targets: &[Endpoint],
    count: usize,
    timeout: Duration,
) -> Result<Vec<Channel>, BenchError> {
    let mut channels = Vec::with_capacity(count);
    for conn in 0..count {
        // spread() is below len() for a non-empty list; clap guarantees at least one endpoint.
        if let Some(endpoint) = targets.get(spread(conn, targets.len())) {
            channels.push(connect(endpoint, timeout).await?);
        }
    }
    Ok(channels)
}

/// `--preload`, if asked for, saying on stderr how long it took and what failed.
pub(super) async fn preload_noted(channels: &[Channel], plan: &Arc<Plan>) {
    if plan.preload == 0 {
        return;
    }
    let started = Instant::now();
    let errors = preload(channels, plan).await;
    let keys = if plan.preload > plan.key_space {
        format!("{} puts over keys 0..{}", plan.preload, plan.key_space)
    } else {
        format!("keys 0..{}", plan.preload)
    };
    note(&format!("preloaded {keys} in {:.1}s ({} errors)", started.elapsed().as_secs_f64(), errors.total));
    if errors.total > 0 {
        note(&errors.describe());
    }
}

pub(super) fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{}", text.trim_end());
}

/// The measured window, shared by the clients.
pub(super) struct Window {
    /// Requests sent before this are warm-up: sent, not measured.
    pub start: Instant,
    /// No request is sent at or after this.
    pub end: Instant,
    /// Measured requests sent so far; none is sent once it reaches `plan.ops`.
    issued: AtomicU64,
}

impl Window {
    /// The window of `plan`, its warm-up starting now.
    pub fn after_warmup(plan: &Plan) -> Window {
        let start = Instant::now() + plan.warmup;
        Window { start, end: start + plan.duration, issued: AtomicU64::new(0) }
    }

    /// Whether a request may be sent now, and if so whether it is measured (counting it against
    /// `ops`, the most measured requests).
    pub fn admit(&self, ops: u64) -> Option<bool> {
        let now = Instant::now();
        if now >= self.end {
            return None;
        }
        let measured = now >= self.start;
        if measured && self.issued.fetch_add(1, Ordering::Relaxed) >= ops {
            return None;
        }
        Some(measured)
    }
}

/// One client: send, await the answer, record, repeat until the window ends or the measured
/// request count is reached. Returns the tally and when its last answer came.
async fn client_loop<R: Requests>(mut client: R, ops: u64, window: Arc<Window>) -> (Tally, Instant) {
    let mut tally = Tally::default();
    while let Some(measured) = window.admit(ops) {
        let sent = Instant::now();
        let result = client.next().await;
        let took = sent.elapsed();
        match result {
            Ok(()) if measured => tally.record(took),
            Ok(()) => {}
            Err(error) => {
                if measured {
                    tally.errors.add(error);
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    (tally, Instant::now())
}

pub(super) async fn send(
    kv: &mut KvClient<Channel>,
    op: Op,
    key: Vec<u8>,
    value: &[u8],
    serializable: bool,
) -> Result<(), tonic::Status> {
    match op {
        Op::Put => kv.put(PutRequest { key, value: value.to_vec(), ..Default::default() }).await.map(drop),
        Op::Get => kv.range(RangeRequest { key, serializable, ..Default::default() }).await.map(drop),
    }
}

/// An error as counted: gRPC code and message (etcd's and Keel's messages are stable texts).
pub(super) fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Puts keys `0..plan.preload` (key `i mod key_space`: past the key space, each put overwrites,
/// adding a revision of history) with `PRELOAD_CLIENTS` (or `--clients`, if more) in flight, spread
/// over the connections. Failed puts are counted, not retried: a missing key only makes a get
/// find nothing.
async fn preload(channels: &[Channel], plan: &Arc<Plan>) -> ErrorTally {
    let next = Arc::new(AtomicU64::new(0));
    let workers = PRELOAD_CLIENTS.max(plan.clients).min(usize::try_from(plan.preload).unwrap_or(usize::MAX));
    let mut tasks = Vec::with_capacity(workers);
    for worker in 0..workers {
        let Some(channel) = channels.get(spread(worker, channels.len())) else { break };
        let mut kv = KvClient::new(channel.clone());
        let (next, plan) = (Arc::clone(&next), Arc::clone(plan));
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::from_entropy();
            let value = random_value(&mut rng, plan.value_size);
            let mut errors = ErrorTally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.preload {
                    break;
                }
                if let Err(status) = send(&mut kv, Op::Put, key(i % plan.key_space), &value, false).await {
                    errors.add(describe(&status));
                }
            }
            errors
        }));
    }
    let mut errors = ErrorTally::default();
    for task in tasks {
        match task.await {
            Ok(e) => errors.merge(&e),
            Err(e) => errors.add(format!("preload task failed: {e}")),
        }
    }
    errors
}

/// One HTTP/2 connection to `endpoint`, made now so that an unreachable endpoint fails the run
/// before it starts; `timeout` bounds the connect and, later, every request on it. A check
/// first ([`tls::check_h2`], [`tls::check_h2_plaintext`]): HTTP/2 would hide why a server
/// refused the handshake, or refused plaintext on a TLS port.
pub(crate) async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Channel, BenchError> {
    let failed = |why: String| BenchError::Connect { endpoint: endpoint.to_string(), why };
    match endpoint.tls() {
        Some(client_tls) => tls::check_h2(endpoint.authority(), client_tls, timeout).await.map_err(failed)?,
        None => tls::check_h2_plaintext(endpoint.authority(), timeout).await.map_err(failed)?,
    }
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    let connector = Connector::grpc(tcp, endpoint.tls().cloned());
    GrpcEndpoint::from_shared(format!("http://{}", endpoint.authority()))
        .map_err(|e| failed(error_chain(&e)))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|e| failed(tls::explain(&e).unwrap_or_else(|| error_chain(&e))))
}

/// Asks every endpoint (all at once) for its Maintenance.Status and returns the one that leads.
async fn find_leader(endpoints: &[Endpoint], timeout: Duration) -> Result<Endpoint, BenchError> {
    let mut queries = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let endpoint = endpoint.clone();
        queries.push(tokio::spawn(async move {
            let channel = connect(&endpoint, timeout).await.map_err(|e| match e {
                BenchError::Connect { why, .. } => format!("cannot connect: {why}"),
                other => other.to_string(),
            })?;
            let status = MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
                .map_err(|s| describe(&s))?
                .into_inner();
            let member_id = status.header.map_or(0, |h| h.member_id);
            Ok::<_, String>(MemberView { member_id, leader: status.leader })
        }));
    }
    let mut views = Vec::with_capacity(endpoints.len());
    for (endpoint, query) in endpoints.iter().zip(queries) {
        let view = query.await.unwrap_or_else(|e| Err(format!("status query failed: {e}")));
        views.push((endpoint.clone(), view));
    }
    pick_leader(&views)
}
