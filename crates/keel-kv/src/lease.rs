//! Leases, as etcd has them: a lease is replicated state (granted and revoked through Raft, in the
//! `leases` and `lease_keys` tables of [`crate::store`]); its *timer* is not. Only the leader
//! keeps time, in this node's [`Lessor`], and when a lease runs out it proposes the revoke, which
//! deletes the lease's keys in one revision on every replica.
//!
//! # The timing guarantee
//!
//! A lease never expires earlier than its TTL after the last keep-alive the leader acknowledged:
//!
//! - The leader answers a keep-alive only after it has set the lease's expiry to `now + TTL` and
//!   then confirmed, with a heartbeat round to a quorum ([`keel::Node::confirm_leader`]), that
//!   it was still the leader *after* that moment. A later leader can only be elected by voters
//!   that refused this leader's heartbeats from then on, so it is elected after the refresh.
//! - A new leader starts no timer before it has applied every entry an earlier leader committed
//!   (revokes included), and then sets every lease's expiry to `now + TTL + election timeout`
//!   (etcd's refresh on promotion): later than any expiry an earlier leader acknowledged.
//!   Remaining TTLs are therefore never cut short by a leader change or a restart; they are
//!   extended instead (a lease may outlive its TTL by up to `TTL + election timeout` after a
//!   leader change). Keel does not checkpoint remaining TTLs (etcd's `--experimental-enable-
//!   lease-checkpoint`, off by default in 3.4): a cluster that changes leader more often than a
//!   lease's TTL keeps that lease alive.
//! - A lease whose expiry has passed is never extended: a keep-alive for it answers TTL 0 while its
//!   revoke is on its way.
//!
//! The minimum TTL is etcd's: 1.5 election timeouts (rounded up to whole seconds), so that a lease
//! outlives one election. Shorter TTLs are raised to it, as etcd does.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use keel::openraft::async_runtime::WatchReceiver;
use keel::openraft::ServerState;
use keel::StateMachineError;

use crate::api::ApiError;
use crate::api::KvApi;
use crate::etcd::pb::etcdserverpb as rpc;
use crate::store;
use crate::store::KvCommand;
use crate::store::KvError;
use crate::store::OpResult;

/// How often the leader looks for expired leases and for a change of its own leadership.
const TICK: Duration = Duration::from_millis(100);
/// At most this many revokes are proposed per tick (etcd revokes at most 1,000 leases a second).
const REVOKES_PER_TICK: usize = 100;
/// A revoke proposed this long ago without being applied is proposed again.
const REVOKE_RETRY: Duration = Duration::from_secs(3);
/// The TTL a `Lock` or `Campaign` without a lease gets (etcd's session default).
pub const SESSION_TTL: i64 = 60;

/// An applied change to the set of leases, as [`store::KvStore::apply`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    Granted { id: i64, ttl: i64 },
    Revoked { id: i64 },
}

#[derive(Clone, Copy, Debug)]
struct Timer {
    ttl: i64,
    expiry: Instant,
    /// When this node proposed its revoke, if it did.
    revoking: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether `timers` holds every lease of the state (loaded at the first apply after start).
    loaded: bool,
    /// Whether this node is the leader and its timers count (see [`Lessor::promote`]).
    primary: bool,
    timers: HashMap<i64, Timer>,
}

impl Inner {
    /// Every lease of the state, each with a timer from now.
    fn load(&mut self, rows: Vec<(i64, i64)>) {
        let now = Instant::now();
        self.timers = rows.into_iter().map(|(id, ttl)| (id, timer(ttl, now))).collect();
        self.loaded = true;
    }
}

/// What [`Lessor::renew`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Extended: the lease's granted TTL.
    Renewed(i64),
    /// No such lease, or its time is up (its revoke is on its way).
    Gone,
    /// This node does not keep the timers (it is not the leader, or not yet).
    NotPrimary,
}

/// What [`Lessor::remaining`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remaining {
    /// The granted TTL, and the time left.
    Left { ttl: i64, left: Duration },
    /// No such lease, or its time is up.
    Gone,
    /// This node does not keep the timers.
    NotPrimary,
}

/// This node's lease timers: every lease the state holds, with an expiry that only the leader's
/// copy means anything by. Kept in step with the state by the state machine's apply.
#[derive(Debug, Default)]
pub struct Lessor {
    inner: Mutex<Inner>,
    /// The planted `lease-early-expiry` (debug builds only; see `keel::faults`).
    early_expiry: AtomicBool,
    /// Wakes keep-alives waiting for this node to take up its timers.
    promoted: tokio::sync::Notify,
}

impl Lessor {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("lessor mutex poisoned by an earlier panic")
    }

    /// Plants `lease-early-expiry` (see `keel::faults`).
    pub fn plant_early_expiry(&self) {
        self.early_expiry.store(true, Ordering::Relaxed);
    }

    /// Loads every lease from the state, once: `rows` reads `(id, ttl)` from the same state the
    /// next apply starts from.
    pub fn load_once(
        &self,
        rows: impl FnOnce() -> Result<Vec<(i64, i64)>, StateMachineError>,
    ) -> Result<(), StateMachineError> {
        let mut inner = self.lock();
        if !inner.loaded {
            inner.load(rows()?);
        }
        Ok(())
    }

    /// Takes in what an apply changed.
    pub fn applied(&self, changes: &[LeaseChange]) {
        if changes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let now = Instant::now();
        for change in changes {
            match *change {
                LeaseChange::Granted { id, ttl } => {
                    inner.timers.insert(id, timer(ttl, now));
                }
                LeaseChange::Revoked { id } => {
                    inner.timers.remove(&id);
                }
            }
        }
    }

    /// Replaces every timer with the leases of a restored snapshot.
    pub fn reset(&self, rows: Vec<(i64, i64)>) {
        self.lock().load(rows);
    }

    /// This node became the leader and has applied everything earlier leaders committed: every
    /// lease gets its whole TTL again, plus `extend` (etcd's refresh on promotion). `rows` loads
    /// the leases if no apply has yet. Answers how many leases there are.
    pub fn promote(
        &self,
        extend: Duration,
        rows: impl FnOnce() -> Result<Vec<(i64, i64)>, StateMachineError>,
    ) -> Result<usize, StateMachineError> {
        // `rows` reads the state, which waits for an apply in progress; an apply takes this lock
        // (`load_once`, `applied`) while it holds the state: reading under the lock deadlocked a
        // node that became leader during its first apply (it never answered again). So read
        // first, unlocked. An apply that loads or applies meanwhile makes the rows redundant or
        // re-applies a change they hold (a timer set again to its whole TTL): never one lost.
        let rows = if self.lock().loaded { None } else { Some(rows()?) };
        let mut inner = self.lock();
        if let (false, Some(rows)) = (inner.loaded, rows) {
            inner.load(rows);
        }
        let now = Instant::now();
        for t in inner.timers.values_mut() {
            t.expiry = now + secs(t.ttl) + extend;
            t.revoking = None;
        }
        inner.primary = true;
        let n = inner.timers.len();
        drop(inner);
        self.promoted.notify_waiters();
        Ok(n)
    }

    /// This node is no longer the leader: its timers stop counting.
    pub fn demote(&self) {
        self.lock().primary = false;
    }

    pub fn is_primary(&self) -> bool {
        self.lock().primary
    }

    /// Waits (at most `timeout`) until this node keeps the timers; false if it does not by then.
    pub async fn wait_primary(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let promoted = self.promoted.notified();
            if self.is_primary() {
                return true;
            }
            if tokio::time::timeout_at(deadline, promoted).await.is_err() {
                return self.is_primary();
            }
        }
    }

    /// A keep-alive: on the leader, the lease's expiry becomes `now + TTL` (never for a lease
    /// whose time is already up). The caller must confirm leadership before answering.
    pub fn renew(&self, id: i64) -> Renewal {
        let mut inner = self.lock();
        if !inner.primary {
            return Renewal::NotPrimary;
        }
        let early = self.early_expiry.load(Ordering::Relaxed);
        let Some(t) = inner.timers.get_mut(&id) else { return Renewal::Gone };
        let now = Instant::now();
        if t.expiry <= now {
            return Renewal::Gone;
        }
        // Planted bug: acknowledged, not extended.
        if !early {
            t.expiry = now + secs(t.ttl);
        }
        Renewal::Renewed(t.ttl)
    }

    /// On the leader: lease `id`'s granted TTL and the time it has left.
    pub fn remaining(&self, id: i64) -> Remaining {
        let inner = self.lock();
        if !inner.primary {
            return Remaining::NotPrimary;
        }
        let now = Instant::now();
        match inner.timers.get(&id).filter(|t| t.expiry > now) {
            Some(t) => Remaining::Left { ttl: t.ttl, left: t.expiry.saturating_duration_since(now) },
            None => Remaining::Gone,
        }
    }

    /// On the leader: up to `max` leases whose time is up and whose revoke is not already on its
    /// way, marked as being revoked.
    fn expired(&self, max: usize) -> Vec<i64> {
        let mut inner = self.lock();
        if !inner.primary {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, t) in inner.timers.iter_mut() {
            if out.len() >= max {
                break;
            }
            let retry = t.revoking.is_none_or(|at| now.duration_since(at) >= REVOKE_RETRY);
            if t.expiry <= now && retry {
                t.revoking = Some(now);
                out.push(*id);
            }
        }
        out
    }

    /// Number of leases this node knows.
    pub fn len(&self) -> usize {
        self.lock().timers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

fn timer(ttl: i64, now: Instant) -> Timer {
    Timer { ttl, expiry: now + secs(ttl), revoking: None }
}

/// The leader's lease clock: waits until this node leads, takes up the timers once it has
/// applied everything its predecessors committed, proposes the revoke of every lease whose time
/// is up, and lets the timers go the moment it stops leading. Runs until the node stops.
pub async fn keep_time(api: KvApi) {
    let lessor = api.node.state_machine().lessor().clone();
    let extend = Duration::from_millis(api.node.config().raft.election_timeout_max_ms);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Woken as soon as this node leads (or after a tick, to retry a failed confirmation).
        let _ = api.node.wait_for(TICK, "leadership", |m| m.state == ServerState::Leader).await;
        let Some(term) = leading(&api) else { continue };
        if let Err(e) = api.node.confirm_leader().await {
            tracing::debug!("lease timers wait: leadership not confirmed yet: {e}");
            tick.tick().await;
            continue;
        }
        if leading(&api) != Some(term) {
            continue;
        }
        let load = || {
            api.node
                .read_local(|_, txn| store::leases(txn))
                .map_err(|e| StateMachineError::Io(std::io::Error::other(e.to_string())))?
        };
        match lessor.promote(extend, load) {
            Ok(n) => {
                tracing::info!(term, leases = n, "leading: lease timers taken up, each with its whole TTL")
            }
            Err(e) => {
                tracing::error!("leading, but the leases cannot be read: {e}");
                continue;
            }
        }
        while leading(&api) == Some(term) {
            for id in lessor.expired(REVOKES_PER_TICK) {
                let api = api.clone();
                tokio::spawn(async move {
                    // Never forwarded: if this node no longer leads, its clock decided nothing
                    // (the leader after it refreshed every lease when it took over).
                    match api.node.propose_here(KvCommand::LeaseRevoke { id }).await {
                        Ok(r) => match r.result {
                            Ok(_) => tracing::debug!(lease = id, "lease expired and revoked"),
                            Err(KvError::LeaseNotFound) => {}
                            Err(e) => tracing::warn!(lease = id, "revoking an expired lease: {e}"),
                        },
                        // Retried after REVOKE_RETRY while this node still leads.
                        Err(e) => tracing::debug!(lease = id, "revoking an expired lease: {e}"),
                    }
                });
            }
            tick.tick().await;
        }
        lessor.demote();
        tracing::info!(term, "no longer leading: lease timers let go");
    }
}

/// This node's term if it is the leader.
fn leading(api: &KvApi) -> Option<u64> {
    let m = api.node.raft().metrics();
    let m = m.borrow_watched();
    (m.state == ServerState::Leader && m.current_leader == Some(m.id)).then_some(m.current_term)
}

/// A lease as `LeaseTimeToLive` answers it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TimeToLive {
    pub id: i64,
    /// Whole seconds left; -1 if there is no such lease.
    pub ttl: i64,
    pub granted_ttl: i64,
    pub keys: Vec<Vec<u8>>,
}

impl KvApi {
    /// etcd's minimum TTL: 1.5 election timeouts, in whole seconds rounded up.
    pub fn min_lease_ttl(&self) -> i64 {
        let ms = self.node.config().raft.election_timeout_max_ms.saturating_mul(3) / 2;
        ms.div_ceil(1000).max(1) as i64
    }

    /// Grants a lease of `ttl` seconds (raised to the minimum) under `id`, or under an id the
    /// cluster picks when `id` is 0. Answers the revision, the id and the TTL granted.
    pub async fn lease_grant(&self, ttl: i64, id: i64) -> Result<(i64, i64, i64), ApiError> {
        if ttl > store::MAX_LEASE_TTL {
            return Err(ApiError::LeaseTtlTooLarge);
        }
        let ttl = ttl.max(self.min_lease_ttl());
        // A chosen id that exists is refused; a picked one that happens to exist is picked anew.
        let picked = id == 0;
        for _ in 0..8 {
            let id = if picked { rand::random::<i64>() & i64::MAX } else { id };
            if id == 0 {
                continue;
            }
            match self.write(KvCommand::LeaseGrant { id, ttl }).await {
                Ok((revision, OpResult::LeaseGranted { id, ttl })) => return Ok((revision, id, ttl)),
                Ok((_, other)) => return Err(ApiError::Internal(format!("lease grant answered {other:?}"))),
                Err(ApiError::Kv(KvError::LeaseExists)) if picked => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Internal("no free lease id found".into()))
    }

    /// Revokes lease `id`, deleting its keys; answers the revision after.
    pub async fn lease_revoke(&self, id: i64) -> Result<i64, ApiError> {
        let (revision, _) = self.write(KvCommand::LeaseRevoke { id }).await?;
        Ok(revision)
    }

    /// Every lease id (a linearizable read of this node's state).
    pub async fn lease_list(&self) -> Result<Vec<i64>, ApiError> {
        self.node.linearize().await?;
        Ok(self.node.read_local(|_, txn| store::leases(txn))??.into_iter().map(|(id, _)| id).collect())
    }

    /// A keep-alive, on the leader: the lease's granted TTL, or 0 if it is gone. A follower's
    /// caller forwards it instead (`Ok(None)`): only the leader keeps the timers.
    pub async fn lease_keep_alive_here(&self, id: i64) -> Result<Option<i64>, ApiError> {
        let lessor = self.node.state_machine().lessor();
        let mut renewal = lessor.renew(id);
        if renewal == Renewal::NotPrimary && self.node.is_leader() {
            // Just elected: the timers are taken up once its first entry is applied.
            let wait = Duration::from_millis(self.node.config().raft.election_timeout_max_ms);
            if lessor.wait_primary(wait).await {
                renewal = lessor.renew(id);
            }
        }
        match renewal {
            Renewal::NotPrimary => Ok(None),
            Renewal::Gone => Ok(Some(0)),
            Renewal::Renewed(ttl) => {
                // Acknowledged only once this node is known to have led after the refresh.
                self.node.confirm_leader().await?;
                Ok(Some(ttl))
            }
        }
    }

    /// `LeaseTimeToLive` on the leader (`Ok(None)` on a follower: forward it).
    pub async fn lease_time_to_live_here(&self, id: i64, keys: bool) -> Result<Option<TimeToLive>, ApiError> {
        let lessor = self.node.state_machine().lessor();
        if !lessor.is_primary() {
            if !self.node.is_leader() {
                return Ok(None);
            }
            let wait = Duration::from_millis(self.node.config().raft.election_timeout_max_ms);
            if !lessor.wait_primary(wait).await {
                return Err(ApiError::NoLeader("the leader has not taken up its lease timers yet".into()));
            }
        }
        self.node.confirm_leader().await?;
        let (granted_ttl, left) = match lessor.remaining(id) {
            Remaining::Left { ttl, left } => (ttl, left),
            Remaining::Gone => return Ok(Some(TimeToLive { id, ttl: -1, ..TimeToLive::default() })),
            Remaining::NotPrimary => return Ok(None),
        };
        let info = self.node.read_local(|_, txn| store::lease(txn, id, keys))??;
        let keys = info.map(|i| i.keys).unwrap_or_default();
        Ok(Some(TimeToLive { id, ttl: left.as_secs() as i64, granted_ttl, keys }))
    }
}

/// The gRPC metadata that marks a request one member forwarded to the leader: the leader never
/// forwards it again (a leader that has not taken up its timers answers "no leader" instead).
pub const FORWARDED: &str = "keel-forwarded";

impl KvApi {
    /// A keep-alive: answered by the leader, forwarded to it from a follower (unless `forwarded`
    /// already). The lease's granted TTL, or 0 if it is gone.
    pub async fn lease_keep_alive(&self, id: i64, forwarded: bool) -> Result<i64, ApiError> {
        if let Some(ttl) = self.lease_keep_alive_here(id).await? {
            return Ok(ttl);
        }
        if forwarded {
            return Err(ApiError::NoLeader("this member is not the leader any more".into()));
        }
        let mut client = rpc::lease_client::LeaseClient::new(self.leader_channel()?);
        let request = rpc::LeaseKeepAliveRequest { id };
        let mut stream = client
            .lease_keep_alive(forwarded_request(futures_util::stream::iter([request])))
            .await
            .map_err(forward_error)?
            .into_inner();
        match stream.message().await.map_err(forward_error)? {
            Some(resp) => Ok(resp.ttl),
            None => Err(ApiError::Unavailable("the leader ended the keep-alive stream".into())),
        }
    }

    /// `LeaseTimeToLive`: answered by the leader, forwarded to it from a follower.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
        forwarded: bool,
    ) -> Result<TimeToLive, ApiError> {
        if let Some(ttl) = self.lease_time_to_live_here(id, keys).await? {
            return Ok(ttl);
        }
        if forwarded {
            return Err(ApiError::NoLeader("this member is not the leader any more".into()));
        }
        let mut client = rpc::lease_client::LeaseClient::new(self.leader_channel()?);
        let resp = client
            .lease_time_to_live(forwarded_request(rpc::LeaseTimeToLiveRequest { id, keys }))
            .await
            .map_err(forward_error)?
            .into_inner();
        Ok(TimeToLive { id: resp.id, ttl: resp.ttl, granted_ttl: resp.granted_ttl, keys: resp.keys })
    }

    /// A channel to the leader's client port (cached while the leader stays).
    fn leader_channel(&self) -> Result<tonic::transport::Channel, ApiError> {
        // Borrowed, not copied: this runs for every forwarded keep-alive.
        let metrics = self.node.raft().metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader.ok_or_else(|| ApiError::NoLeader("no leader known".into()))?;
        if leader == self.member_id() {
            return Err(ApiError::NoLeader(
                "this member was just elected and is taking up its lease timers".into(),
            ));
        }
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.client_addr.clone())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                ApiError::NoLeader(format!("leader {leader} has not published its client address"))
            })?;
        let mut cached = self.leader_channel.lock().expect("leader channel mutex poisoned");
        if let Some((a, channel)) = cached.as_ref() {
            if *a == addr {
                return Ok(channel.clone());
            }
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ApiError::Internal(format!("leader client address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2));
        let channel = match &self.tls.member_grpc {
            None => endpoint.connect_lazy(),
            Some(Ok(tls)) => endpoint.connect_with_connector_lazy(keel::tls::TlsConnector::new(
                tls.clone(),
                Duration::from_secs(2) + keel::tls::HANDSHAKE_TIMEOUT,
            )),
            Some(Err(why)) => {
                return Err(ApiError::Unavailable(format!("cannot reach the leader's client port: {why}")))
            }
        };
        *cached = Some((addr, channel.clone()));
        Ok(channel)
    }
}

fn forwarded_request<T>(msg: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(msg);
    request.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request.set_timeout(Duration::from_secs(5));
    request
}

/// A forwarded request's failure, as this member answers it: whatever the leader said, or "no
/// leader" when it could not be reached (a keep-alive or a read: safe to retry).
fn forward_error(status: tonic::Status) -> ApiError {
    match status.code() {
        tonic::Code::NotFound => ApiError::Kv(KvError::LeaseNotFound),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            ApiError::NoLeader(format!("forwarding to the leader: {}", status.message()))
        }
        _ => ApiError::Unavailable(format!("forwarding to the leader: {}", status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(rows: Vec<(i64, i64)>) -> Lessor {
        let l = Lessor::default();
        l.promote(Duration::ZERO, || Ok(rows)).expect("promotes");
        l
    }

    #[test]
    fn only_the_primary_renews_and_a_lease_whose_time_is_up_stays_gone() {
        let l = Lessor::default();
        l.load_once(|| Ok(vec![(1, 10)])).expect("loads");
        assert_eq!(Renewal::NotPrimary, l.renew(1));
        let l = primary(vec![(1, 10), (2, 0)]);
        assert_eq!(Renewal::Renewed(10), l.renew(1));
        assert_eq!(Renewal::Gone, l.renew(3), "no such lease");
        // TTL 0: its expiry is now, so it is already up and never renewed.
        assert_eq!(Renewal::Gone, l.renew(2));
        assert_eq!(vec![2], l.expired(10));
        assert!(l.expired(10).is_empty(), "a revoke on its way is not proposed twice at once");
        l.demote();
        assert_eq!(Renewal::NotPrimary, l.renew(1));
        assert!(l.expired(10).is_empty());
    }

    #[test]
    fn promotion_gives_every_lease_its_whole_ttl_and_the_extension() {
        let l = primary(vec![(7, 5)]);
        let Remaining::Left { ttl, left } = l.remaining(7) else { panic!("lease 7 is there") };
        assert_eq!(5, ttl);
        assert!(left > Duration::from_secs(4) && left <= Duration::from_secs(5));
        l.promote(Duration::from_secs(1), || unreachable!("already loaded")).expect("promotes");
        let Remaining::Left { left, .. } = l.remaining(7) else { panic!("lease 7 is there") };
        assert!(left > Duration::from_secs(5), "{left:?}");
    }

    #[test]
    fn applied_grants_and_revokes_keep_the_timers_in_step() {
        let l = primary(Vec::new());
        l.applied(&[LeaseChange::Granted { id: 1, ttl: 3 }, LeaseChange::Granted { id: 2, ttl: 3 }]);
        l.applied(&[LeaseChange::Revoked { id: 1 }]);
        assert_eq!(1, l.len());
        assert_eq!(Renewal::Gone, l.renew(1));
        assert_eq!(Renewal::Renewed(3), l.renew(2));
        l.reset(vec![(9, 4)]);
        assert_eq!(Renewal::Renewed(4), l.renew(9));
        assert_eq!(Renewal::Gone, l.renew(2));
    }
}
