//! Locks and elections, served as etcd's server serves them (its `v3lock` and `v3election`
//! services run etcd's client recipes inside the server): plain keys, leases, txns and watches.
//!
//! A contender for `name` puts the key `name/<lease id in hex>` with its lease, if it is not there
//! yet. Contenders are ordered by their key's create revision: the oldest key holds the lock (or
//! leads the election), and each other waits until every key under `name/` with a smaller create
//! revision is deleted (by its owner's unlock or resignation, or with its lease). The holder's
//! create revision is a fencing token: it grows with every new holder, and a write guarded by
//! `create_revision(key) == token` succeeds only while the holder's key exists.
//!
//! A waiting contender that goes away (its request canceled, the node stopping) deletes its key,
//! so that it does not hold up those behind it.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::api::KvApi;
use crate::history::EventKind;
use crate::lease::SESSION_TTL;
use crate::store::prefix_range_end;
use crate::store::Compare;
use crate::store::CompareResult;
use crate::store::CompareTarget;
use crate::store::DeleteRange;
use crate::store::KeyValue;
use crate::store::KvCommand;
use crate::store::KvError;
use crate::store::Op;
use crate::store::OpResult;
use crate::store::Put;
use crate::store::Range;
use crate::store::SortOrder;
use crate::store::SortTarget;
use crate::store::Txn;
use crate::watch::Delivery;
use crate::watch::Filter;
use crate::watch::WatchHub;
use crate::watch::Watching;

/// One leadership of an election (etcd's `LeaderKey`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderKey {
    pub name: Vec<u8>,
    pub key: Vec<u8>,
    /// The key's create revision.
    pub rev: i64,
    pub lease: i64,
}

/// A contender's place in line.
struct Place {
    key: Vec<u8>,
    /// Its key's create revision.
    rev: i64,
    /// The revision the enqueueing txn answered.
    revision: i64,
    /// The key existed already (same lease): its value then.
    existing: Option<Vec<u8>>,
    /// The oldest contender's create revision.
    first: Option<i64>,
}

/// A failure after the contender's key was put: the key is being withdrawn, so the request must
/// not be retried as if nothing had happened (under the same lease, a retry could find its key
/// and then lose it to the withdrawal). Not retryable; a client starts over under a new lease.
fn queued(e: ApiError) -> ApiError {
    ApiError::Unknown(format!(
        "failed while waiting in line ({e}); this contender's key is withdrawn: start over under a new lease"
    ))
}

/// `name/`: where the contenders' keys live.
fn prefix(name: &[u8]) -> Vec<u8> {
    [name, b"/"].concat()
}

fn create_equals(key: &[u8], rev: i64) -> Compare {
    Compare {
        key: key.to_vec(),
        range_end: Vec::new(),
        result: CompareResult::Equal,
        target: CompareTarget::Create(rev),
    }
}

/// The oldest key under `prefix` (or with `max_create`, the newest one created at or before it).
fn oldest(prefix: &[u8]) -> Range {
    Range {
        key: prefix.to_vec(),
        range_end: prefix_range_end(prefix),
        limit: 1,
        sort_order: SortOrder::Ascend,
        sort_target: SortTarget::Create,
        ..Range::default()
    }
}

fn range_kvs(r: Option<&OpResult>) -> Option<&[KeyValue]> {
    match r {
        Some(OpResult::Range(r)) => Some(&r.kvs),
        _ => None,
    }
}

/// Deletes a contender's key if dropped armed: a waiter that goes away gives up its place.
struct Withdraw {
    api: Option<KvApi>,
    key: Vec<u8>,
}

impl Withdraw {
    fn disarm(mut self) {
        self.api = None;
    }
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            let key = std::mem::take(&mut self.key);
            let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
            rt.spawn(async move {
                let del = DeleteRange { key, ..DeleteRange::default() };
                if let Err(e) = api.write(KvCommand::DeleteRange(del)).await {
                    tracing::debug!("withdrawing a waiting contender's key: {e}");
                }
            });
        }
    }
}

impl KvApi {
    /// Puts `prefix<lease hex>` with `lease` and `value` unless it exists; answers the place.
    async fn enqueue(&self, prefix: &[u8], lease: i64, value: &[u8]) -> Result<Place, ApiError> {
        // etcd's `%x` of an int64: a negative id is `-` and the magnitude.
        let hex = if lease < 0 { format!("-{:x}", lease.unsigned_abs()) } else { format!("{lease:x}") };
        let key = [prefix, hex.as_bytes()].concat();
        let put = Put { key: key.clone(), value: value.to_vec(), lease, ..Put::default() };
        let mine = Range { key: key.clone(), ..Range::default() };
        let txn = Txn {
            compare: vec![create_equals(&key, 0)],
            success: vec![Op::Put(put), Op::Range(oldest(prefix))],
            failure: vec![Op::Range(mine), Op::Range(oldest(prefix))],
        };
        let (revision, result) = self.write(KvCommand::Txn(txn)).await?;
        let OpResult::Txn(t) = result else {
            return Err(ApiError::Internal(format!("a txn answered {result:?}")));
        };
        let first = range_kvs(t.responses.get(1)).and_then(|kvs| kvs.first()).map(|kv| kv.create_revision);
        if t.succeeded {
            return Ok(Place { key, rev: revision, revision, existing: None, first });
        }
        let Some(existing) = range_kvs(t.responses.first()).and_then(|kvs| kvs.first()) else {
            return Err(ApiError::Internal("an existing contender key was not read back".into()));
        };
        let (rev, value) = (existing.create_revision, existing.value.clone());
        Ok(Place { key, rev, revision, existing: Some(value), first })
    }

    /// Waits until no key under `prefix` was created at or before `max_create` (etcd's
    /// `waitDeletes`); answers the revision of the read that found none.
    async fn wait_deletes(&self, prefix: &[u8], max_create: i64) -> Result<i64, ApiError> {
        loop {
            let newest_before =
                Range { max_create_revision: max_create, sort_order: SortOrder::Descend, ..oldest(prefix) };
            let (revision, r) = self.range(&newest_before, false).await?;
            let Some(kv) = r.kvs.first() else { return Ok(revision) };
            self.wait_deleted(&kv.key, revision).await?;
        }
    }

    /// Waits until `key` is deleted after revision `after` (or history from there is compacted
    /// away: the caller reads again).
    async fn wait_deleted(&self, key: &[u8], after: i64) -> Result<(), ApiError> {
        let (tx, mut rx) = mpsc::channel(4);
        let hub: &Arc<WatchHub> = self.hub();
        let filter = Filter { key: key.to_vec(), no_put: true, ..Filter::default() };
        let registered = hub.watch(filter, after + 1, 0, tx);
        let _watching = Watching(hub.clone(), registered.key);
        let closed = hub.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                delivery = rx.recv() => match delivery {
                    Some(Delivery::Events { events, .. }) => {
                        if events.iter().any(|e| e.kind == EventKind::Delete) {
                            return Ok(());
                        }
                    }
                    Some(Delivery::Compacted { .. }) => return Ok(()),
                    Some(Delivery::Progress { .. }) => {}
                    None => return Err(ApiError::Unavailable("node stopping".into())),
                },
                () = &mut closed => return Err(ApiError::Unavailable("node stopping".into())),
            }
        }
    }

    /// Waits until `place` is first in line under `prefix`: answers None if it already was, else
    /// the revision of the read that found it first. Its key may have gone with its lease while
    /// it waited: then "requested lease not found". `withdraw` deletes the key if this fails.
    async fn wait_turn(
        &self,
        prefix: &[u8],
        place: &Place,
        withdraw: Withdraw,
    ) -> Result<Option<i64>, ApiError> {
        if place.first == Some(place.rev) {
            withdraw.disarm();
            return Ok(None);
        }
        let waited = self.wait_deletes(prefix, place.rev - 1).await.map_err(queued)?;
        let mine = Range { key: place.key.clone(), ..Range::default() };
        let (revision, r) = self.range(&mine, false).await.map_err(queued)?;
        withdraw.disarm();
        if r.kvs.is_empty() {
            return Err(ApiError::Kv(KvError::LeaseNotFound));
        }
        Ok(Some(revision.max(waited)))
    }

    /// `Lock`: waits until the caller holds lock `name` with `lease` (0: a new lease of
    /// [`SESSION_TTL`] seconds); answers the revision and the holder's key.
    pub async fn lock(&self, name: &[u8], lease: i64) -> Result<(i64, Vec<u8>), ApiError> {
        let lease = if lease == 0 { self.lease_grant(SESSION_TTL, 0).await?.1 } else { lease };
        let prefix = prefix(name);
        let place = self.enqueue(&prefix, lease, b"").await?;
        let withdraw = Withdraw { api: Some(self.clone()), key: place.key.clone() };
        let revision = self.wait_turn(&prefix, &place, withdraw).await?;
        Ok((revision.unwrap_or(place.revision), place.key))
    }

    /// `Unlock`: deletes the holder's key; answers the revision.
    pub async fn unlock(&self, key: &[u8]) -> Result<i64, ApiError> {
        let del = DeleteRange { key: key.to_vec(), ..DeleteRange::default() };
        Ok(self.write(KvCommand::DeleteRange(del)).await?.0)
    }

    /// `Campaign`: waits until the caller leads election `name` with `lease` (0: a new lease of
    /// [`SESSION_TTL`] seconds), its key holding `value`.
    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<(i64, LeaderKey), ApiError> {
        let lease = if lease == 0 { self.lease_grant(SESSION_TTL, 0).await?.1 } else { lease };
        let prefix = prefix(name);
        let place = self.enqueue(&prefix, lease, value).await?;
        let leader = LeaderKey { name: name.to_vec(), key: place.key.clone(), rev: place.rev, lease };
        let withdraw = Withdraw { api: Some(self.clone()), key: place.key.clone() };
        // Campaigning again with the same lease keeps the place and proclaims the new value.
        if place.existing.as_deref().is_some_and(|v| v != value) {
            self.proclaim(&leader, value).await.map_err(queued)?;
        }
        self.wait_turn(&prefix, &place, withdraw).await?;
        // etcd answers a campaign with the header of the txn that queued it, however long it
        // waited (a lock, with the read that found it free).
        Ok((place.revision, leader))
    }

    /// `Proclaim`: the leader's key gets `value`, if it still leads as `leader`.
    pub async fn proclaim(&self, leader: &LeaderKey, value: &[u8]) -> Result<i64, ApiError> {
        let put =
            Put { key: leader.key.clone(), value: value.to_vec(), lease: leader.lease, ..Put::default() };
        let txn = Txn {
            compare: vec![create_equals(&leader.key, leader.rev)],
            success: vec![Op::Put(put)],
            failure: vec![],
        };
        match self.write(KvCommand::Txn(txn)).await? {
            (revision, OpResult::Txn(t)) if t.succeeded => Ok(revision),
            _ => Err(ApiError::ElectionNotLeader),
        }
    }

    /// `Resign`: deletes the leader's key if it still leads as `leader`; answers the revision.
    pub async fn resign(&self, leader: &LeaderKey) -> Result<i64, ApiError> {
        let del = DeleteRange { key: leader.key.clone(), ..DeleteRange::default() };
        let txn = Txn {
            compare: vec![create_equals(&leader.key, leader.rev)],
            success: vec![Op::DeleteRange(del)],
            failure: vec![],
        };
        Ok(self.write(KvCommand::Txn(txn)).await?.0)
    }

    /// `Leader`: the current leader's key and value (a linearizable read).
    pub async fn election_leader(&self, name: &[u8]) -> Result<(i64, KeyValue), ApiError> {
        let (revision, r) = self.range(&oldest(&prefix(name)), false).await?;
        r.kvs.into_iter().next().map(|kv| (revision, kv)).ok_or(ApiError::ElectionNoLeader)
    }

    /// `Observe`: sends the leader of election `name` on `out` each time it (or its value)
    /// changes, starting with the current one, until `out` closes or the node stops.
    pub async fn observe(&self, name: &[u8], out: mpsc::Sender<Result<(i64, KeyValue), ApiError>>) {
        let prefix = prefix(name);
        let mut last: Option<(Vec<u8>, i64)> = None;
        let send_if_new = |revision: i64, kv: Option<KeyValue>, last: &mut Option<(Vec<u8>, i64)>| {
            let kv = kv?;
            let id = (kv.key.clone(), kv.mod_revision);
            if last.as_ref() == Some(&id) {
                return None;
            }
            *last = Some(id);
            Some((revision, kv))
        };
        let mut from = match self.range(&oldest(&prefix), false).await {
            Ok((revision, r)) => {
                if let Some(item) = send_if_new(revision, r.kvs.into_iter().next(), &mut last) {
                    if out.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                revision
            }
            Err(e) => {
                let _ = out.send(Err(e)).await;
                return;
            }
        };
        let hub: &Arc<WatchHub> = self.hub();
        let closed = hub.closed();
        tokio::pin!(closed);
        loop {
            let (tx, mut rx) = mpsc::channel(16);
            let filter =
                Filter { key: prefix.clone(), range_end: prefix_range_end(&prefix), ..Filter::default() };
            let registered = hub.watch(filter, from + 1, 0, tx);
            let _watching = Watching(hub.clone(), registered.key);
            loop {
                let delivery = tokio::select! {
                    d = rx.recv() => d,
                    () = &mut closed => return,
                    () = out.closed() => return,
                };
                match delivery {
                    Some(Delivery::Events { revision, .. }) => {
                        // This node has applied `revision`: its own state says who leads now.
                        let current = self.node.read_local(|_, txn| {
                            crate::store::range(txn, &oldest(&prefix), self.max_response_bytes)
                        });
                        let kv = match current {
                            Ok(Ok((_, Ok(r)))) => r.kvs.into_iter().next(),
                            _ => None,
                        };
                        if let Some(item) = send_if_new(revision, kv, &mut last) {
                            if out.send(Ok(item)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Delivery::Compacted { compact_revision, .. }) => {
                        from = compact_revision - 1;
                        break;
                    }
                    Some(Delivery::Progress { .. }) => {}
                    None => return,
                }
            }
        }
    }
}
