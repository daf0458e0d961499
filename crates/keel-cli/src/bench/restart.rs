//! What `bench/lease-restart.sh` needs from the bench: `--op lease-load` fills a store with
//! leases, each with one key attached, many at once; `--op lease-ready` waits, polling, until a
//! restarted store serves again, and says when (wall-clock time, which the script compares with
//! the moment it started the server).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_kv::etcd::pb::etcdserverpb::kv_client::KvClient;
use keel_kv::etcd::pb::etcdserverpb::lease_client::LeaseClient;
use keel_kv::etcd::pb::etcdserverpb::{LeaseTimeToLiveRequest, PutRequest, RangeRequest};
use rand::rngs::StdRng;
use rand::SeedableRng as _;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::lease::{grant, in_parallel};
use super::load::{connect, connect_spread, describe, note, targets};
use super::report::{ErrorTally, ReadyRow, Row, Tally};
use super::{key, random_value, BenchError, Plan};
use crate::client::Endpoint;

/// How long `--op lease-ready` waits between two attempts that failed: short against the
/// restart times it measures (0.1 s and up), long enough not to busy a starting server.
const READY_RETRY: Duration = Duration::from_millis(10);

/// `--op lease-load`: grants `leases` leases of `plan.ttl` seconds, `plan.clients` at once, and
/// under lease `i` puts `key(i)` (a `plan.value_size`-byte value). One op (and one latency
/// sample) is the grant and its put. The row's `sample_lease` is lease 0's id, for
/// `--op lease-ready`; it is absent if lease 0 failed.
pub async fn load(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: Plan,
    leases: u64,
) -> Result<(Row, ErrorTally), BenchError> {
    let targets = targets(endpoints, timeout, &plan).await?;
    let channels = connect_spread(&targets, plan.conns, timeout).await?;
    let value = Arc::new(random_value(&mut StdRng::from_entropy(), plan.value_size));
    let ttl = plan.ttl;
    let started = Instant::now();
    // At most MAX_LEASES, which fits any usize.
    let count = usize::try_from(leases).unwrap_or(usize::MAX);
    let results = in_parallel(&channels, count, plan.clients, move |channel, i| {
        let value = Arc::clone(&value);
        async move {
            let sent = Instant::now();
            let lease = grant(&mut LeaseClient::new(channel.clone()), ttl).await?;
            let put = PutRequest { key: key(i as u64), value: value.to_vec(), lease, ..Default::default() };
            KvClient::new(channel).put(put).await.map_err(|s| format!("Put: {}", describe(&s)))?;
            Ok((lease, sent.elapsed()))
        }
    })
    .await;
    let elapsed = started.elapsed();
    let sample_lease = results.first().and_then(|r| r.as_ref().ok()).map(|&(lease, _)| lease);
    let mut tally = Tally::default();
    for result in results {
        match result {
            Ok((_, took)) => tally.record(took),
            Err(e) => tally.errors.add(e),
        }
    }
    note(&format!(
        "loaded {} leases with a key each in {:.1}s",
        tally.latency_us.len(),
        elapsed.as_secs_f64()
    ));
    let mut row = Row::new(&plan, &tally, elapsed);
    row.leases = Some(leases);
    row.sample_lease = sample_lease;
    Ok((row, tally.errors))
}

/// Why one readiness attempt did not succeed.
enum NotReady {
    /// Not serving yet (refused, no leader, the lease not known yet): try again.
    Yet(String),
    /// Serving, without what was written before the restart: give up.
    Lost(String),
}

/// `--op lease-ready`: until `plan.duration` has passed, asks the first endpoint for a
/// linearizable Range of `key(0)`, which must hold the key attached to `lease_id`, and then (on
/// the same or a later attempt) LeaseTimeToLive of `lease_id`, which must answer a TTL above 0;
/// `READY_RETRY` after each failed attempt. The row says when each first succeeded; what the
/// server answered meanwhile is counted on stderr.
pub async fn ready(
    endpoints: &[Endpoint],
    timeout: Duration,
    plan: &Plan,
    lease_id: i64,
) -> Result<ReadyRow, BenchError> {
    let began = Instant::now();
    let deadline = began + plan.duration;
    let Some(endpoint) = endpoints.first() else {
        return Err(BenchError::NotReady { waited: Duration::ZERO, last: "no endpoint".to_owned() });
    };
    let mut channel = None;
    let mut range_at = None;
    let mut attempts = 0;
    // What the server answered while not ready: said on stderr at the end.
    let mut not_yet = ErrorTally::default();
    loop {
        attempts += 1;
        match attempt(&mut channel, endpoint, timeout, lease_id, &mut range_at).await {
            Ok(ttl) => {
                let ready_at = unix_us(SystemTime::now());
                if not_yet.total > 0 {
                    note(&format!("not ready before, {}", not_yet.describe()));
                }
                return Ok(ReadyRow::new(
                    lease_id,
                    ttl,
                    attempts,
                    range_at.unwrap_or(ready_at),
                    ready_at,
                    began.elapsed(),
                ));
            }
            Err(NotReady::Lost(what)) => return Err(BenchError::Lost(what)),
            Err(NotReady::Yet(why)) => {
                if Instant::now() + READY_RETRY >= deadline {
                    note(&not_yet.describe());
                    return Err(BenchError::NotReady { waited: began.elapsed(), last: why });
                }
                not_yet.add(why);
            }
        }
        tokio::time::sleep(READY_RETRY).await;
    }
}

/// One attempt: connect if not connected, the Range unless it already succeeded (then
/// `range_at` is when), the LeaseTimeToLive. The TTL it answered.
async fn attempt(
    channel: &mut Option<Channel>,
    endpoint: &Endpoint,
    timeout: Duration,
    lease_id: i64,
    range_at: &mut Option<u64>,
) -> Result<i64, NotReady> {
    let conn = match channel {
        Some(conn) => conn.clone(),
        None => {
            let conn = connect(endpoint, timeout).await.map_err(|e| NotReady::Yet(e.to_string()))?;
            channel.insert(conn).clone()
        }
    };
    if range_at.is_none() {
        let answer = KvClient::new(conn.clone())
            .range(RangeRequest { key: key(0), ..Default::default() })
            .await
            .map_err(|s| NotReady::Yet(format!("Range: {}", describe(&s))))?
            .into_inner();
        let name = String::from_utf8_lossy(&key(0)).into_owned();
        match answer.kvs.first() {
            Some(kv) if kv.lease == lease_id => {}
            Some(kv) => {
                return Err(NotReady::Lost(format!(
                    "{name} is attached to lease {}, not {lease_id}",
                    kv.lease
                )))
            }
            None => {
                return Err(NotReady::Lost(format!(
                    "{name} is missing (lost, or deleted with lease {lease_id})"
                )))
            }
        }
        *range_at = Some(unix_us(SystemTime::now()));
    }
    let answer = LeaseClient::new(conn)
        .lease_time_to_live(LeaseTimeToLiveRequest { id: lease_id, keys: false })
        .await
        .map_err(|s| NotReady::Yet(format!("LeaseTimeToLive: {}", describe(&s))))?
        .into_inner();
    if answer.ttl > 0 {
        Ok(answer.ttl)
    } else {
        Err(NotReady::Yet(format!("LeaseTimeToLive of lease {lease_id} answered TTL {}", answer.ttl)))
    }
}

/// Microseconds since the Unix epoch (0 for a clock set before it).
fn unix_us(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
