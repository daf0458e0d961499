//! The lease loads: `--op lease` (LeaseGrant then LeaseRevoke, one pair per op, through the
//! measured loop of `load.rs`) and `--op keepalive` (leases granted before the run, then kept
//! alive over one LeaseKeepAlive stream per client, pipelined). Also the grants and revokes in
//! bulk that the keep-alive and lock loads hold their leases with.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_kv::etcd::pb::etcdserverpb::lease_client::LeaseClient;
use keel_kv::etcd::pb::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::load::{describe, measure, note, prepare, Requests, Window, ERROR_PAUSE};
use super::report::{ErrorTally, Row, Tally};
use super::{spread, BenchError, KeepAliveSpec, Plan, PRELOAD_CLIENTS};
use crate::client::Endpoint;

/// `--op lease`: each client grants a lease of `plan.ttl` and revokes it, in a loop; one op (and
/// one latency sample) is the pair.
pub async fn grant_revoke(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
) -> Result<(Row, ErrorTally), BenchError> {
    let (channels, plan) = prepare(endpoints, timeout, plan).await?;
    let clients = (0..plan.clients)
        .filter_map(|client| channels.get(spread(client, channels.len())))
        .map(|channel| GrantRevoke { leases: LeaseClient::new(channel.clone()), ttl: plan.ttl })
        .collect();
    let (total, elapsed) = measure(clients, &plan).await;
    Ok((Row::new(&plan, &total, elapsed), total.errors))
}

struct GrantRevoke {
    leases: LeaseClient<Channel>,
    ttl: i64,
}

impl Requests for GrantRevoke {
    async fn next(&mut self) -> Result<(), String> {
        let id = grant(&mut self.leases, self.ttl).await?;
        revoke(&mut self.leases, id).await
    }
}

/// Grants a lease of `ttl` seconds; its id. An answer with an error text or without an id is an
/// error (etcd reports some refusals in the `error` field rather than the status).
pub(super) async fn grant(leases: &mut LeaseClient<Channel>, ttl: i64) -> Result<i64, String> {
    let answer = leases
        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
        .await
        .map_err(|s| format!("LeaseGrant: {}", describe(&s)))?
        .into_inner();
    match (answer.id, answer.error.as_str()) {
        (id, "") if id != 0 => Ok(id),
        (_, "") => Err("LeaseGrant: answered lease id 0".to_owned()),
        (_, error) => Err(format!("LeaseGrant: {error}")),
    }
}

pub(super) async fn revoke(leases: &mut LeaseClient<Channel>, id: i64) -> Result<(), String> {
    match leases.lease_revoke(LeaseRevokeRequest { id }).await {
        Ok(_) => Ok(()),
        Err(status) => Err(format!("LeaseRevoke: {}", describe(&status))),
    }
}

/// Runs `work(channel, i)` for every `i` in `0..count`, `workers` at a time, worker `w` on channel
/// `w mod channels`. The results, in order of `i`.
pub(super) async fn in_parallel<T, F, Fut>(
    channels: &[Channel],
    count: usize,
    workers: usize,
    work: F,
) -> Vec<Result<T, String>>
where
    T: Send + 'static,
    F: Fn(Channel, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, String>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let workers = workers.min(count);
    let mut tasks = Vec::with_capacity(workers);
    for worker in 0..workers {
        let Some(channel) = channels.get(spread(worker, channels.len())) else { break };
        let (channel, next, work) = (channel.clone(), Arc::clone(&next), Arc::clone(&work));
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                done.push((i, work(channel.clone(), i).await));
            }
            done
        }));
    }
    let mut results: Vec<Option<Result<T, String>>> = (0..count).map(|_| None).collect();
    for task in tasks {
        match task.await {
            Ok(done) => {
                for (i, result) in done {
                    results[i] = Some(result);
                }
            }
            // Its indices stay `None`, reported below.
            Err(e) => note(&format!("a worker task failed: {e}")),
        }
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| Err("its worker task failed".to_owned()))).collect()
}

/// Grants `count` leases of `ttl` seconds, `PRELOAD_CLIENTS` at once. If any grant fails, revokes those granted
/// and fails: a run with fewer leases than asked would measure something else.
pub(super) async fn grant_all(channels: &[Channel], count: usize, ttl: i64) -> Result<Vec<i64>, BenchError> {
    let started = Instant::now();
    let results = in_parallel(channels, count, PRELOAD_CLIENTS, move |channel, _| async move {
        grant(&mut LeaseClient::new(channel), ttl).await
    })
    .await;
    let mut granted = Vec::with_capacity(count);
    let mut errors = ErrorTally::default();
    for result in results {
        match result {
            Ok(id) => granted.push(id),
            Err(e) => errors.add(e),
        }
    }
    if let Some((first, _)) = errors.first.first() {
        let why = first.clone();
        note(&errors.describe());
        let n = granted.len();
        revoke_all(channels, granted).await;
        return Err(BenchError::Grant { granted: n, wanted: count, why });
    }
    note(&format!("granted {count} leases (TTL {ttl}s) in {:.1}s", started.elapsed().as_secs_f64()));
    Ok(granted)
}

/// Revokes `ids`, `PRELOAD_CLIENTS` at once, saying on stderr how it went: the run's own leases, so that they
/// do not linger for their TTL (with their keys) after it.
pub(super) async fn revoke_all(channels: &[Channel], ids: Vec<i64>) {
    let started = Instant::now();
    let count = ids.len();
    let ids = Arc::new(ids);
    let results = in_parallel(channels, count, PRELOAD_CLIENTS, move |channel, i| {
        let id = ids[i];
        async move { revoke(&mut LeaseClient::new(channel), id).await }
    })
    .await;
    let mut errors = ErrorTally::default();
    for error in results.into_iter().filter_map(Result::err) {
        errors.add(error);
    }
    note(&format!(
        "revoked {} of {count} leases in {:.1}s",
        count - errors.total as usize,
        started.elapsed().as_secs_f64()
    ));
    if errors.total > 0 {
        note(&errors.describe());
    }
}

/// `--op keepalive`: grants `spec.leases` leases, then each client keeps its share (lease `i` is
/// client `i mod clients`'s) alive over one LeaseKeepAlive stream, sending requests for its leases
/// in turn with at most `spec.window` unanswered. One op is an answer with a TTL above 0; one
/// with TTL 0 says the lease is gone, an error. The leases are revoked after the run.
pub async fn keepalive(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
    spec: KeepAliveSpec,
) -> Result<(Row, ErrorTally), BenchError> {
    let (channels, plan) = prepare(endpoints, timeout, plan).await?;
    let leases = grant_all(&channels, spec.leases, plan.ttl).await?;

    let window = Arc::new(Window::after_warmup(&plan));
    let mut tasks = Vec::with_capacity(plan.clients);
    for client in 0..plan.clients {
        let Some(channel) = channels.get(spread(client, channels.len())) else { break };
        let share: Vec<i64> = leases.iter().copied().skip(client).step_by(plan.clients).collect();
        let stream = KeepAliveStream {
            leases: LeaseClient::new(channel.clone()),
            window: spec.window.min(share.len()),
            share,
            timeout,
        };
        tasks.push(tokio::spawn(stream.run(plan.ops, Arc::clone(&window))));
    }
    let mut total = Tally::default();
    let mut finished = window.start;
    for task in tasks {
        match task.await {
            Ok((tally, done)) => {
                total.merge(&tally);
                finished = finished.max(done);
            }
            Err(e) => total.errors.add(format!("keep-alive task failed: {e}")),
        }
    }
    revoke_all(&channels, leases).await;
    let mut row = Row::new(&plan, &total, finished.saturating_duration_since(window.start));
    row.leases = Some(spec.leases as u64);
    Ok((row, total.errors))
}

/// One client of `--op keepalive`: its leases, and the stream it keeps them alive on.
struct KeepAliveStream {
    leases: LeaseClient<Channel>,
    /// The leases this client keeps alive, in the order it sends their requests (round robin).
    share: Vec<i64>,
    /// Most unanswered requests: at most `share.len()`, so no lease is asked for twice at once
    /// and each answer (found by its lease id) times exactly one request.
    window: usize,
    /// No answer for this long breaks the stream.
    timeout: Duration,
}

/// A request sent and not yet answered.
#[derive(Clone, Copy)]
struct Pending {
    sent: Instant,
    measured: bool,
}

impl KeepAliveStream {
    /// Keeps the share alive until the window ends or `ops` measured requests are sent, then
    /// waits for the answers still due. A broken stream is counted as one error (its unanswered
    /// requests are dropped) and opened again after `ERROR_PAUSE`. Returns the tally and when
    /// its last answer came.
    async fn run(mut self, ops: u64, window: Arc<Window>) -> (Tally, Instant) {
        let mut tally = Tally::default();
        let mut next = 0;
        loop {
            match self.stream(&mut next, ops, &window, &mut tally).await {
                Ok(()) => break,
                Err(error) => {
                    if Instant::now() >= window.start {
                        tally.errors.add(error);
                    }
                    if Instant::now() >= window.end {
                        break;
                    }
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
        (tally, Instant::now())
    }

    /// One stream, from its opening to the end of the run (`Ok`) or its failure (`Err`). `next`
    /// is the position in the share of the next lease to ask for.
    async fn stream(
        &mut self,
        next: &mut usize,
        ops: u64,
        window: &Window,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let (requests, outgoing) = mpsc::channel(self.window);
        let mut pending: HashMap<i64, Pending> = HashMap::with_capacity(self.window);
        let mut sending = true;
        // The first requests go before the call is made: the call returns with the response's
        // headers, which etcd sends with its first answer.
        self.fill(&requests, &mut pending, &mut sending, next, ops, window)?;
        if pending.is_empty() {
            return Ok(());
        }
        let mut answers = self
            .leases
            .lease_keep_alive(ReceiverStream::new(outgoing))
            .await
            .map_err(|s| format!("LeaseKeepAlive: {}", describe(&s)))?
            .into_inner();
        while !pending.is_empty() {
            let answer = match tokio::time::timeout(self.timeout, answers.message()).await {
                Ok(Ok(Some(answer))) => answer,
                Ok(Ok(None)) => return Err("LeaseKeepAlive: the server ended the stream".to_owned()),
                Ok(Err(status)) => return Err(format!("LeaseKeepAlive: {}", describe(&status))),
                Err(_) => {
                    return Err(format!(
                        "LeaseKeepAlive: no answer within {}s (--timeout)",
                        self.timeout.as_secs_f64()
                    ))
                }
            };
            match pending.remove(&answer.id) {
                None => tally
                    .errors
                    .add(format!("LeaseKeepAlive: an answer for lease {} not asked for", answer.id)),
                Some(Pending { measured: false, .. }) => {}
                Some(Pending { sent, measured: true }) if answer.ttl > 0 => tally.record(sent.elapsed()),
                Some(Pending { measured: true, .. }) => {
                    tally.errors.add("LeaseKeepAlive: answered TTL 0 (the lease is gone)".to_owned())
                }
            }
            self.fill(&requests, &mut pending, &mut sending, next, ops, window)?;
        }
        Ok(())
    }

    /// Sends requests until `window` are unanswered, or the run says to stop sending (then
    /// `sending` becomes false). Never waits: the channel holds `window` requests.
    fn fill(
        &self,
        requests: &mpsc::Sender<LeaseKeepAliveRequest>,
        pending: &mut HashMap<i64, Pending>,
        sending: &mut bool,
        next: &mut usize,
        ops: u64,
        window: &Window,
    ) -> Result<(), String> {
        while *sending && pending.len() < self.window {
            let Some(measured) = window.admit(ops) else {
                *sending = false;
                break;
            };
            // pending.len() < window <= share.len(): some lease of the share is not pending.
            let mut id = self.share[*next % self.share.len()];
            while pending.contains_key(&id) {
                *next += 1;
                id = self.share[*next % self.share.len()];
            }
            *next += 1;
            requests.try_send(LeaseKeepAliveRequest { id }).map_err(|e| match e {
                mpsc::error::TrySendError::Closed(_) => {
                    "LeaseKeepAlive: the request stream closed".to_owned()
                }
                mpsc::error::TrySendError::Full(_) => {
                    "LeaseKeepAlive: more requests than the window".to_owned()
                }
            })?;
            pending.insert(id, Pending { sent: Instant::now(), measured });
        }
        Ok(())
    }
}
