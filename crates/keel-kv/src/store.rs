//! The KV state machine: etcd's data model on redb.
//!
//! Keys and values are bytes. A cluster-wide `revision` counts write transactions: every request
//! that changes something (a put, a delete that deletes, a txn with such an op) bumps it by one,
//! and every key it touches gets that revision as `mod_revision` (and `create_revision` when the
//! key is created; `version` counts puts since creation and resets on delete). Every revision is
//! kept until compacted ([`crate::history`]): a read at any revision from the compaction revision
//! on answers the state then; below it, [`KvError::Compacted`].
//!
//! Tables (in the database Keel hands the state machine):
//! - `kv`: key → [`Record`] (`create_revision | mod_revision | version | lease`, 8 bytes each LE,
//!   then the value): the current version of every key.
//! - `kv_events`, `kv_old`: the history (see [`crate::history`]).
//! - `leases`: lease id (i64) → the TTL it was granted (i64 LE, seconds); `lease_keys`:
//!   `(lease id, key)` → `()`, every key attached to a lease (the `lease` field of its record).
//!   A lease's timer is not state: the leader keeps it ([`crate::lease`]).
//! - `kv_meta`: `"revision"`, `"compact_revision"` (through Raft), `"compact_physical"`,
//!   `"compact_cursor"`, `"compact_cursor_at"` (this node's progress removing history below it),
//!   and `"last_member_id"` → i64; and one row per raised alarm,
//!   `"alarm/<TYPE>/<member id, 20 digits>"` → the member id (see [`AlarmKind`]).
//! - `auth_users`, `auth_roles`, `auth_meta`: users, roles, the auth switch (see [`crate::auth`]).
//!
//! Alarms: while a `NOSPACE` alarm is raised (by any member), every replica refuses puts and txns
//! with a put ([`KvError::NoSpace`]), deterministically at apply, as etcd's capped applier does;
//! reads, deletes and compaction keep working.

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel::redb::ReadTransaction;
use keel::redb::ReadableTable;
use keel::redb::TableDefinition;
use keel::redb::WriteTransaction;
use keel::Refusal;
use keel::StateMachine;
use keel::StateMachineError;
use serde::Deserialize;
use serde::Serialize;

use crate::auth;
use crate::auth::AuthCommand;
use crate::auth::AuthError;
use crate::auth::Caller;
use crate::history;
use crate::history::Recorder;
use crate::history::EVENTS;
use crate::history::OLD;
use crate::lease::LeaseChange;
use crate::lease::Lessor;
use crate::limits::Limits;
use crate::watch::WatchHub;

pub(crate) const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
pub(crate) const META: TableDefinition<&str, i64> = TableDefinition::new("kv_meta");
pub(crate) const REVISION: &str = "revision";
pub(crate) const COMPACT_REVISION: &str = "compact_revision";
pub(crate) const COMPACT_PHYSICAL: &str = "compact_physical";
pub(crate) const COMPACT_CURSOR: &str = "compact_cursor";
pub(crate) const COMPACT_CURSOR_AT: &str = "compact_cursor_at";
const LAST_MEMBER_ID: &str = "last_member_id";
/// Leases: id → the TTL it was granted, seconds (`i64` LE; later fields may follow).
pub(crate) const LEASES: TableDefinition<i64, &[u8]> = TableDefinition::new("leases");
/// The keys attached to each lease: `(lease id, key)` → nothing.
pub(crate) const LEASE_KEYS: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("lease_keys");
/// etcd's largest TTL (`MaxLeaseTTL`), seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// An empty store is at revision 1, as in etcd: the first write makes revision 2.
const FIRST_REVISION: i64 = 1;

// ---------------------------------------------------------------------------------------------
// Requests and responses (the Raft log carries `KvCommand`s; keep them backward compatible)

/// A write, as proposed through Raft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvCommand {
    Put(Put),
    DeleteRange(DeleteRange),
    Txn(Txn),
    Compact {
        revision: i64,
    },
    /// Hands out a member id never used before in this cluster: above every id handed out so far
    /// and above `above` (the largest id in the current membership). Not a KV write.
    AllocateMemberId {
        above: u64,
    },
    /// Raises or clears an alarm (etcd's `Alarm` ACTIVATE / DEACTIVATE). Not a KV write: the
    /// revision does not move.
    Alarm(AlarmChange),
    /// Grants a lease (etcd's `LeaseGrant`): `id` chosen by the node that proposes it (never 0),
    /// `ttl` in seconds, already raised to the cluster's minimum. The revision does not move.
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// Revokes a lease (a client's `LeaseRevoke`, or the leader's decision that it expired) and
    /// deletes every key attached to it, all in one revision.
    LeaseRevoke {
        id: i64,
    },
    /// Changes users, roles or the auth switch ([`crate::auth`]). Not a KV write: the revision
    /// does not move; the auth revision does.
    Auth(AuthCommand),
    /// `cmd` on behalf of `caller` (None: a request without credentials), sent while auth is on:
    /// applied only if the user may, judged at apply on the state then (etcd's auth applier),
    /// else refused alike on every replica with [`KvError::Auth`]. `cmd` is never itself an
    /// `AsUser` (`validate` refuses it).
    AsUser {
        caller: Option<Caller>,
        cmd: Box<KvCommand>,
    },
}

/// An alarm etcd's API knows. Keel raises only `NoSpace` (a corruption stops the node instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AlarmKind {
    /// The state machine database reached `quota_backend_bytes`.
    NoSpace,
}

impl AlarmKind {
    /// etcd's name for it (`AlarmType`), as `etcdctl alarm list` prints it.
    pub fn name(self) -> &'static str {
        match self {
            AlarmKind::NoSpace => "NOSPACE",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "NOSPACE" => Some(AlarmKind::NoSpace),
            _ => None,
        }
    }
}

/// One raised alarm: which member raised it, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AlarmMember {
    pub member_id: u64,
    pub alarm: AlarmKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlarmAction {
    Activate,
    Deactivate,
}

/// [`KvCommand::Alarm`]: as etcd, activating a raised alarm and deactivating an absent one change
/// nothing and answer no alarm; otherwise the answer lists the alarm raised or cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmChange {
    pub action: AlarmAction,
    pub member: AlarmMember,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Put {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
    pub prev_kv: bool,
    /// Keep the current value (the key must exist).
    pub ignore_value: bool,
    /// Keep the current lease (the key must exist).
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeleteRange {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Empty: just `key`; `[0]`: every key ≥ `key`; otherwise the range `[key, range_end)`.
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Range {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// At most this many keys (0: no limit).
    pub limit: i64,
    /// 0 or the current revision; anything older is compacted, anything newer is in the future.
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// As in [`DeleteRange::range_end`]: the compare must hold for every key in the range.
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub result: CompareResult,
    pub target: CompareTarget,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Range(Range),
    Put(Put),
    DeleteRange(DeleteRange),
    Txn(Txn),
}

/// Decodes as its fields would with a derived `Deserialize`, but counts the nesting: a txn nested
/// deeper than [`MAX_TXN_DEPTH`](crate::limits::MAX_TXN_DEPTH) does not decode (see
/// [`DecodeDepth`](crate::limits::DecodeDepth)).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl<'de> Deserialize<'de> for Txn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The same fields, derived.
        #[derive(Deserialize)]
        #[serde(rename = "Txn")]
        struct Fields {
            compare: Vec<Compare>,
            success: Vec<Op>,
            failure: Vec<Op>,
        }
        let Some(_level) = crate::limits::DecodeDepth::enter() else {
            return Err(serde::de::Error::custom(crate::limits::LimitError::TooDeep));
        };
        let Fields { compare, success, failure } = Fields::deserialize(deserializer)?;
        Ok(Txn { compare, success, failure })
    }
}

/// A key and its metadata, as reads and `prev_kv` answer it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Keys in the range beyond `limit`.
    pub more: bool,
    /// Keys in the range (before `limit`).
    pub count: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Range(RangeResult),
    Put {
        prev_kv: Option<KeyValue>,
    },
    DeleteRange {
        deleted: i64,
        prev_kvs: Vec<KeyValue>,
    },
    Txn(TxnResult),
    /// The answer to [`KvCommand::AllocateMemberId`].
    MemberId(u64),
    /// The answer to [`KvCommand::Alarm`]: the alarm raised or cleared, if any.
    Alarms(Vec<AlarmMember>),
    /// The answer to [`KvCommand::LeaseGrant`].
    LeaseGranted {
        id: i64,
        ttl: i64,
    },
    /// The answer to [`KvCommand::LeaseRevoke`]: how many keys it deleted.
    LeaseRevoked {
        deleted: i64,
    },
    /// The answer to [`KvCommand::Auth`]: the auth revision after it.
    Auth {
        auth_revision: u64,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    pub succeeded: bool,
    pub responses: Vec<OpResult>,
}

/// What applying a [`KvCommand`] answered, with the store's revision after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvResponse {
    pub revision: i64,
    pub result: Result<OpResult, KvError>,
}

/// A request the store refused. Refused requests change nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KvError {
    #[error("mvcc: required revision {requested} has been compacted (compacted up to {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("mvcc: required revision {requested} is a future revision (current is {current})")]
    FutureRevision { requested: i64, current: i64 },
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("key not found (ignore_value / ignore_lease need an existing key)")]
    KeyNotFound,
    #[error("{0}")]
    InvalidRequest(String),
    /// A `NOSPACE` alarm is raised: writes that may grow the database are refused until it is
    /// cleared. The message is etcd's (`ErrNoSpace`).
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A range whose answer would exceed `max_response_bytes` (counted as
    /// [`answer_bytes`] per key). Only reads refuse it; ranges inside a txn have no budget.
    #[error("range answer is over the {limit} byte limit (max_response_bytes): read it in pages with limit, or ask for count_only or keys_only")]
    ResponseTooLarge { limit: u64 },
    #[error("lease already exists")]
    LeaseExists,
    /// An auth change refused by etcd's rules (an unknown user, a duplicate role, ...).
    #[error("{0}")]
    Auth(AuthError),
}

/// Bytes one key counts toward a range's answer budget besides its key and value: its metadata
/// as etcd's protobuf encodes it (three revisions, lease, field tags and lengths), rounded up.
pub const KV_OVERHEAD_BYTES: usize = 32;

/// What a key in a range answer counts toward `max_response_bytes`.
pub fn answer_bytes(kv: &KeyValue) -> usize {
    kv.key.len() + kv.value.len() + KV_OVERHEAD_BYTES
}

// ---------------------------------------------------------------------------------------------
// On-disk record

/// A key's metadata and value as stored in the `kv` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
}

const RECORD_HEADER: usize = 32;

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_HEADER + self.value.len());
        for n in [self.create_revision, self.mod_revision, self.version, self.lease] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&self.value);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> io::Result<Self> {
        let field = |i: usize| -> io::Result<i64> {
            bytes.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).ok_or_else(
                || io::Error::new(io::ErrorKind::InvalidData, "kv record shorter than its header"),
            )
        };
        Ok(Record {
            create_revision: field(0)?,
            mod_revision: field(1)?,
            version: field(2)?,
            lease: field(3)?,
            value: bytes[RECORD_HEADER..].to_vec(),
        })
    }

    pub(crate) fn into_kv(self, key: Vec<u8>, keys_only: bool) -> KeyValue {
        KeyValue {
            key,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: if keys_only { Vec::new() } else { self.value },
            lease: self.lease,
        }
    }
}

fn corrupt(e: io::Error) -> StateMachineError {
    StateMachineError::Io(e)
}

// ---------------------------------------------------------------------------------------------
// Key ranges

/// The keys `[key, range_end)` as etcd means them.
enum KeyRange<'a> {
    One(&'a [u8]),
    From(&'a [u8]),
    Between(&'a [u8], &'a [u8]),
}

fn key_range<'a>(key: &'a [u8], range_end: &'a [u8]) -> KeyRange<'a> {
    match range_end {
        [] => KeyRange::One(key),
        [0] => KeyRange::From(key),
        end => KeyRange::Between(key, end),
    }
}

/// The `range_end` that selects every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix, or all 0xff: every key from `prefix` on.
    vec![0]
}

/// Visits the rows of `range` in key order; `visit` returns false to stop.
fn scan<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    range: KeyRange<'_>,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StateMachineError>,
) -> Result<(), StateMachineError> {
    let iter = match range {
        KeyRange::One(key) => {
            if let Some(v) = table.get(key)? {
                visit(key, v.value())?;
            }
            return Ok(());
        }
        KeyRange::From(start) => table.range::<&[u8]>(start..)?,
        KeyRange::Between(start, end) => {
            if start >= end {
                return Ok(());
            }
            table.range::<&[u8]>(start..end)?
        }
    };
    for row in iter {
        let (k, v) = row?;
        if !visit(k.value(), v.value())? {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The state machine

/// etcd's data model as a Keel state machine. Holds no state itself: everything is in the tables;
/// its limits are what the leader checks before proposing a write, its watch hub is where
/// applied changes go out to this node's watchers, and its lessor is where applied grants and
/// revokes go for the leader's expiry clock.
#[derive(Clone, Debug, Default)]
pub struct KvStore {
    limits: Limits,
    hub: Arc<WatchHub>,
    lessor: Arc<Lessor>,
    /// Moves after every batch that applied an auth change, and after a restore: what the client
    /// APIs cached of the auth state (whether auth is on) is stale once it moves.
    auth_epoch: Arc<AtomicU64>,
}

impl KvStore {
    pub fn new(limits: Limits) -> Self {
        Self { limits, hub: Arc::default(), lessor: Arc::default(), auth_epoch: Arc::default() }
    }

    /// See [`KvStore`]'s `auth_epoch`. It moves only after the batch's `apply` returned, so a
    /// reader that sees the new value and then reads the state (which first commits the batches
    /// applied) sees the change.
    pub fn auth_epoch(&self) -> u64 {
        self.auth_epoch.load(Ordering::SeqCst)
    }

    /// This node's watchers.
    pub fn hub(&self) -> &Arc<WatchHub> {
        &self.hub
    }

    /// This node's lease clocks.
    pub fn lessor(&self) -> &Arc<Lessor> {
        &self.lessor
    }
}

impl StateMachine for KvStore {
    type Command = KvCommand;
    type Response = KvResponse;

    fn validate(&self, cmd: &KvCommand) -> Result<(), Refusal> {
        self.limits.check(cmd).map_err(|e| Refusal::new(e.to_string()))
    }

    fn apply(
        &self,
        txn: &WriteTransaction,
        cmds: Vec<KvCommand>,
    ) -> Result<Vec<KvResponse>, StateMachineError> {
        let mut kv = txn.open_table(KV)?;
        let mut meta = txn.open_table(META)?;
        let mut events = txn.open_table(EVENTS)?;
        let mut old = txn.open_table(OLD)?;
        let mut leases = txn.open_table(LEASES)?;
        let mut lease_keys = txn.open_table(LEASE_KEYS)?;
        self.lessor.load_once(|| lease_rows(&leases))?;
        let mut revision = meta.get(REVISION)?.map_or(FIRST_REVISION, |v| v.value());
        let mut compacted = meta.get(COMPACT_REVISION)?.map_or(0, |v| v.value());
        let mut capped = alarm_rows(&meta)?.iter().any(|a| a.alarm == AlarmKind::NoSpace);
        // Collected for the watchers only while some are live (the rest read history).
        let collect = self.hub.collecting();
        let mut changes = Vec::new();
        let mut lease_changes = Vec::new();
        let mut out = Vec::with_capacity(cmds.len());
        let mut auth_changed = false;
        for cmd in cmds {
            // etcd's auth applier: the user's permissions on the state as it is now.
            let cmd = match cmd {
                KvCommand::AsUser { caller, cmd } => {
                    let lease = match &*cmd {
                        KvCommand::Put(p) if p.lease != 0 => Some(p.lease),
                        KvCommand::LeaseRevoke { id } => Some(*id),
                        _ => None,
                    };
                    let on_lease = match lease {
                        Some(id) => attached_keys(&lease_keys, id)?,
                        None => Vec::new(),
                    };
                    let need = auth::needs(&cmd, &mut |_| on_lease.clone());
                    match auth::AuthView::in_write(txn)?.refusal(caller.as_ref(), &need)? {
                        None => *cmd,
                        Some(e) => {
                            out.push(KvResponse { revision, result: Err(KvError::Auth(e)) });
                            continue;
                        }
                    }
                }
                cmd => cmd,
            };
            let history = Recorder::new(&mut events, &mut old, revision + 1, collect);
            let mut w = Writer {
                kv: &mut kv,
                history,
                leases: &mut leases,
                lease_keys: &mut lease_keys,
                revision: revision + 1,
                wrote: false,
                compacted,
            };
            let result = match cmd {
                // etcd's capped applier: refused on every replica alike while NOSPACE is raised.
                KvCommand::Put(_) | KvCommand::LeaseGrant { .. } if capped => Ok(Err(KvError::NoSpace)),
                KvCommand::Txn(t) if capped && txn_cost(&t) > 0 => Ok(Err(KvError::NoSpace)),
                KvCommand::Put(put) => w.put(&put),
                KvCommand::DeleteRange(del) => w.delete(&del),
                KvCommand::Txn(t) => w.txn(&t),
                // etcd: a revision at or below the last compaction, or above the current one, is
                // refused. History below it is removed later, by each node in steps.
                KvCommand::Compact { revision: target } => {
                    if target > revision {
                        Ok(Err(KvError::FutureRevision { requested: target, current: revision }))
                    } else if target <= compacted {
                        Ok(Err(KvError::Compacted { requested: target, compacted }))
                    } else {
                        compacted = target;
                        meta.insert(COMPACT_REVISION, target)?;
                        Ok(Ok(OpResult::Txn(TxnResult::default())))
                    }
                }
                KvCommand::AllocateMemberId { above } => {
                    let last = meta.get(LAST_MEMBER_ID)?.map_or(0, |v| v.value());
                    let id = (last.max(0) as u64).max(above) + 1;
                    meta.insert(LAST_MEMBER_ID, id as i64)?;
                    Ok(Ok(OpResult::MemberId(id)))
                }
                KvCommand::Alarm(change) => {
                    let changed = change_alarm(&mut meta, change)?;
                    capped = alarm_rows(&meta)?.iter().any(|a| a.alarm == AlarmKind::NoSpace);
                    Ok(Ok(OpResult::Alarms(changed.into_iter().collect())))
                }
                KvCommand::LeaseGrant { id, ttl } => {
                    let granted = w.grant(id, ttl)?;
                    if granted.is_ok() {
                        lease_changes.push(LeaseChange::Granted { id, ttl });
                    }
                    Ok(granted)
                }
                KvCommand::Auth(change) => {
                    auth_changed = true;
                    auth::apply(txn, change)
                }
                KvCommand::AsUser { .. } => {
                    Ok(Err(KvError::InvalidRequest("a request on behalf of a user nested in another".into())))
                }
                KvCommand::LeaseRevoke { id } => {
                    let revoked = w.revoke(id)?;
                    if revoked.is_ok() {
                        lease_changes.push(LeaseChange::Revoked { id });
                    }
                    Ok(revoked)
                }
            }?;
            if w.wrote {
                revision += 1;
                if let Some(events) = w.history.collected.take() {
                    changes.push(history::Revision { revision, events });
                }
            }
            out.push(KvResponse { revision, result });
        }
        meta.insert(REVISION, revision)?;
        self.hub.publish(collect.then_some(changes), revision, compacted);
        if auth_changed {
            self.auth_epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.lessor.applied(&lease_changes);
        Ok(out)
    }

    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError> {
        keel::dump_table(txn, META, out)?;
        keel::dump_table(txn, KV, out)?;
        keel::dump_table(txn, EVENTS, out)?;
        keel::dump_table(txn, OLD, out)?;
        keel::dump_table(txn, LEASES, out)?;
        keel::dump_table(txn, LEASE_KEYS, out)?;
        auth::dump(txn, out)
    }

    fn restore(&self, txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError> {
        keel::load_table(txn, META, input)?;
        keel::load_table(txn, KV, input)?;
        keel::load_table(txn, EVENTS, input)?;
        keel::load_table(txn, OLD, input)?;
        keel::load_table(txn, LEASES, input)?;
        keel::load_table(txn, LEASE_KEYS, input)?;
        auth::load(txn, input)?;
        let meta = txn.open_table(META)?;
        let revision = meta.get(REVISION)?.map_or(FIRST_REVISION, |v| v.value());
        let compacted = meta.get(COMPACT_REVISION)?.map_or(0, |v| v.value());
        // Every watcher catches up from the restored history.
        self.hub.reset(revision, compacted);
        self.lessor.reset(lease_rows(&txn.open_table(LEASES)?)?);
        self.auth_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// What a snapshot of the KV state holds, read from the bytes [`KvStore`]'s `snapshot` wrote
/// without loading them into a database (`keel snapshot status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotSummary {
    pub revision: i64,
    pub compact_revision: i64,
    /// Keys that exist at `revision`.
    pub keys: u64,
    /// Key changes kept in the history (`kv_events` rows).
    pub history_events: u64,
    /// Versions no longer current kept for reads at past revisions (`kv_old` rows).
    pub old_versions: u64,
    pub leases: u64,
}

/// What the state in `txn` holds, as [`snapshot_summary`] counts it in a snapshot.
pub fn summary(txn: &ReadTransaction) -> Result<SnapshotSummary, StateMachineError> {
    use keel::redb::ReadableTableMetadata;
    fn rows<K: keel::redb::Key + 'static, V: keel::redb::Value + 'static>(
        txn: &ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> Result<u64, StateMachineError> {
        match txn.open_table(def) {
            Ok(t) => Ok(t.len()?),
            Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
    Ok(SnapshotSummary {
        revision: revision(txn)?,
        compact_revision: compact_revision(txn)?,
        keys: rows(txn, KV)?,
        history_events: rows(txn, EVENTS)?,
        old_versions: rows(txn, OLD)?,
        leases: rows(txn, LEASES)?,
    })
}

/// Reads the tables [`KvStore`]'s `snapshot` writes, in its order, and counts them; the auth
/// tables after them are left unread.
pub fn snapshot_summary(input: &mut dyn io::Read) -> Result<SnapshotSummary, StateMachineError> {
    let mut s = SnapshotSummary { revision: FIRST_REVISION, ..Default::default() };
    keel::scan_table(input, |k, v| {
        let value = || {
            <[u8; 8]>::try_from(v).map(i64::from_le_bytes).map_err(|_| {
                corrupt(io::Error::new(io::ErrorKind::InvalidData, "kv_meta value is not 8 bytes"))
            })
        };
        if k == REVISION.as_bytes() {
            s.revision = value()?;
        } else if k == COMPACT_REVISION.as_bytes() {
            s.compact_revision = value()?;
        }
        Ok(())
    })?;
    s.keys = keel::scan_table(input, |_, _| Ok(()))?;
    s.history_events = keel::scan_table(input, |_, _| Ok(()))?;
    s.old_versions = keel::scan_table(input, |_, _| Ok(()))?;
    s.leases = keel::scan_table(input, |_, _| Ok(()))?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Leases

pub(crate) fn lease_row(ttl: i64) -> [u8; 8] {
    ttl.to_le_bytes()
}

pub(crate) fn parse_lease_row(id: i64, row: &[u8]) -> Result<i64, StateMachineError> {
    row.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).ok_or_else(|| {
        corrupt(io::Error::new(io::ErrorKind::InvalidData, format!("leases row {id} of {} bytes", row.len())))
    })
}

/// Every lease and the TTL it was granted, in id order.
fn lease_rows<T: ReadableTable<i64, &'static [u8]>>(
    leases: &T,
) -> Result<Vec<(i64, i64)>, StateMachineError> {
    let mut out = Vec::new();
    for row in leases.iter()? {
        let (id, ttl) = row?;
        out.push((id.value(), parse_lease_row(id.value(), ttl.value())?));
    }
    Ok(out)
}

/// The keys attached to lease `id`, in key order.
fn attached_keys<T: ReadableTable<(i64, &'static [u8]), ()>>(
    lease_keys: &T,
    id: i64,
) -> Result<Vec<Vec<u8>>, StateMachineError> {
    let mut keys = Vec::new();
    for row in lease_keys.range::<(i64, &[u8])>((id, &[][..])..)? {
        let (k, _) = row?;
        let (lease, key) = k.value();
        if lease != id {
            break;
        }
        keys.push(key.to_vec());
    }
    Ok(keys)
}

/// A lease as the state holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: i64,
    /// The TTL it was granted, seconds.
    pub ttl: i64,
    /// The keys attached to it, in key order (only when asked for).
    pub keys: Vec<Vec<u8>>,
}

/// Lease `id` in `txn`, with its keys if `keys`; None if there is no such lease.
pub fn lease(txn: &ReadTransaction, id: i64, keys: bool) -> Result<Option<LeaseInfo>, StateMachineError> {
    let leases = match txn.open_table(LEASES) {
        Ok(t) => t,
        Err(keel::redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(row) = leases.get(id)? else { return Ok(None) };
    let ttl = parse_lease_row(id, row.value())?;
    let mut info = LeaseInfo { id, ttl, keys: Vec::new() };
    if keys {
        info.keys = attached_keys(&txn.open_table(LEASE_KEYS)?, id)?;
    }
    Ok(Some(info))
}

/// Every lease in `txn` and its granted TTL, in id order.
pub fn leases(txn: &ReadTransaction) -> Result<Vec<(i64, i64)>, StateMachineError> {
    match txn.open_table(LEASES) {
        Ok(t) => lease_rows(&t),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Alarms and the space quota

const ALARM_PREFIX: &str = "alarm/";

pub(crate) fn alarm_row_key(a: AlarmMember) -> String {
    format!("{ALARM_PREFIX}{}/{:020}", a.alarm.name(), a.member_id)
}

/// The raised alarms, from their `kv_meta` rows (ordered by type, then member id).
fn alarm_rows<T: ReadableTable<&'static str, i64>>(meta: &T) -> Result<Vec<AlarmMember>, StateMachineError> {
    // '0' is the character after '/': the range is every key starting with "alarm/".
    let mut out = Vec::new();
    for row in meta.range::<&str>("alarm/".."alarm0")? {
        let (key, member) = row?;
        let alarm = key.value().strip_prefix(ALARM_PREFIX).and_then(|k| k.split_once('/'));
        let Some(alarm) = alarm.and_then(|(kind, _)| AlarmKind::from_name(kind)) else {
            return Err(corrupt(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("kv_meta row {:?} is not an alarm", key.value()),
            )));
        };
        out.push(AlarmMember { member_id: member.value() as u64, alarm });
    }
    Ok(out)
}

/// Raises or clears one alarm; answers it if that changed anything (etcd's `AlarmStore`).
fn change_alarm(
    meta: &mut keel::redb::Table<'_, &'static str, i64>,
    change: AlarmChange,
) -> Result<Option<AlarmMember>, StateMachineError> {
    let key = alarm_row_key(change.member);
    // Member ids are stored as i64 (the table's value type); the cast is a bijection.
    let member = change.member.member_id as i64;
    let changed = match change.action {
        AlarmAction::Activate => meta.insert(key.as_str(), member)?.is_none(),
        AlarmAction::Deactivate => meta.remove(key.as_str())?.is_some(),
    };
    Ok(changed.then_some(change.member))
}

/// The raised alarms in `txn`.
pub fn alarms(txn: &ReadTransaction) -> Result<Vec<AlarmMember>, StateMachineError> {
    match txn.open_table(META) {
        Ok(t) => alarm_rows(&t),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// etcd's per-key overhead in its space estimate (`kvOverhead`).
const KV_OVERHEAD: u64 = 256;

/// What a write may add to the database, as etcd estimates it (`storage/quota.go`): a put costs
/// its key and value plus 256 bytes; a txn the larger of its two branches; everything else 0.
/// A request of cost 0 is never refused for space.
pub fn cost(cmd: &KvCommand) -> u64 {
    match cmd {
        KvCommand::Put(p) => put_cost(p),
        KvCommand::Txn(t) => txn_cost(t),
        KvCommand::DeleteRange(_)
        | KvCommand::Compact { .. }
        | KvCommand::AllocateMemberId { .. }
        | KvCommand::Alarm(_)
        | KvCommand::LeaseGrant { .. }
        | KvCommand::LeaseRevoke { .. }
        | KvCommand::Auth(_) => 0,
        KvCommand::AsUser { cmd, .. } => cost(cmd),
    }
}

fn put_cost(p: &Put) -> u64 {
    KV_OVERHEAD + p.key.len() as u64 + p.value.len() as u64
}

fn txn_cost(t: &Txn) -> u64 {
    let branch = |ops: &[Op]| -> u64 {
        ops.iter()
            .map(|op| match op {
                Op::Put(p) => put_cost(p),
                Op::Txn(inner) => txn_cost(inner),
                Op::Range(_) | Op::DeleteRange(_) => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// Applies one write request at revision `revision`; `wrote` records whether it changed anything
/// (only then does the store's revision move).
struct Writer<'a, 'h, 't> {
    kv: &'a mut keel::redb::Table<'t, &'static [u8], &'static [u8]>,
    history: Recorder<'h, 't>,
    leases: &'a mut keel::redb::Table<'t, i64, &'static [u8]>,
    lease_keys: &'a mut keel::redb::Table<'t, (i64, &'static [u8]), ()>,
    revision: i64,
    wrote: bool,
    /// The compaction revision: reads inside a txn below it are refused.
    compacted: i64,
}

type Applied = Result<Result<OpResult, KvError>, StateMachineError>;

impl Writer<'_, '_, '_> {
    fn get(&self, key: &[u8]) -> Result<Option<Record>, StateMachineError> {
        match self.kv.get(key)? {
            Some(v) => Ok(Some(Record::decode(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    fn lease_exists(&self, id: i64) -> Result<bool, StateMachineError> {
        Ok(self.leases.get(id)?.is_some())
    }

    /// Moves `key` from lease `from` to lease `to` (0: none) in `lease_keys`.
    fn attach(&mut self, key: &[u8], from: i64, to: i64) -> Result<(), StateMachineError> {
        if from == to {
            return Ok(());
        }
        if from != 0 {
            self.lease_keys.remove((from, key))?;
        }
        if to != 0 {
            self.lease_keys.insert((to, key), ())?;
        }
        Ok(())
    }

    fn grant(&mut self, id: i64, ttl: i64) -> Applied {
        // `validate` refuses these on the leader; a forged entry is answered alike everywhere.
        if id == 0 || !(1..=MAX_LEASE_TTL).contains(&ttl) {
            return Ok(Err(KvError::InvalidRequest(format!("lease {id} with TTL {ttl} cannot be granted"))));
        }
        if self.lease_exists(id)? {
            return Ok(Err(KvError::LeaseExists));
        }
        self.leases.insert(id, lease_row(ttl).as_slice())?;
        Ok(Ok(OpResult::LeaseGranted { id, ttl }))
    }

    /// Deletes every key attached to lease `id` (one revision, if there are any) and the lease.
    fn revoke(&mut self, id: i64) -> Applied {
        if !self.lease_exists(id)? {
            return Ok(Err(KvError::LeaseNotFound));
        }
        let mut deleted = 0;
        for key in attached_keys(&*self.lease_keys, id)? {
            let del = DeleteRange { key, ..DeleteRange::default() };
            if let Ok(OpResult::DeleteRange { deleted: n, .. }) = self.delete(&del)? {
                deleted += n;
            }
        }
        self.leases.remove(id)?;
        Ok(Ok(OpResult::LeaseRevoked { deleted }))
    }

    fn put(&mut self, put: &Put) -> Applied {
        if put.lease != 0 && !put.ignore_lease && !self.lease_exists(put.lease)? {
            return Ok(Err(KvError::LeaseNotFound));
        }
        let prev = self.get(&put.key)?;
        if (put.ignore_value || put.ignore_lease) && prev.is_none() {
            return Ok(Err(KvError::KeyNotFound));
        }
        let record = match &prev {
            Some(p) => Record {
                create_revision: p.create_revision,
                mod_revision: self.revision,
                version: p.version + 1,
                lease: if put.ignore_lease { p.lease } else { put.lease },
                value: if put.ignore_value { p.value.clone() } else { put.value.clone() },
            },
            None => Record {
                create_revision: self.revision,
                mod_revision: self.revision,
                version: 1,
                lease: put.lease,
                value: put.value.clone(),
            },
        };
        self.kv.insert(put.key.as_slice(), record.encode().as_slice())?;
        self.attach(&put.key, prev.as_ref().map_or(0, |p| p.lease), record.lease)?;
        self.history.change(&put.key, prev.as_ref(), Some(&record))?;
        self.wrote = true;
        let prev_kv = if put.prev_kv { prev.map(|p| p.into_kv(put.key.clone(), false)) } else { None };
        Ok(Ok(OpResult::Put { prev_kv }))
    }

    fn delete(&mut self, del: &DeleteRange) -> Applied {
        let mut doomed = Vec::new();
        scan(&*self.kv, key_range(&del.key, &del.range_end), |k, v| {
            doomed.push((k.to_vec(), Record::decode(v).map_err(corrupt)?));
            Ok(true)
        })?;
        let mut prev_kvs = Vec::new();
        for (key, prev) in &doomed {
            self.kv.remove(key.as_slice())?;
            self.attach(key, prev.lease, 0)?;
            self.history.change(key, Some(prev), None)?;
            if del.prev_kv {
                prev_kvs.push(prev.clone().into_kv(key.clone(), false));
            }
        }
        if !doomed.is_empty() {
            self.wrote = true;
        }
        Ok(Ok(OpResult::DeleteRange { deleted: doomed.len() as i64, prev_kvs }))
    }

    fn txn(&mut self, t: &Txn) -> Applied {
        // As etcd: the compares of the txn and of every nested txn on the branches taken are all
        // judged on the state before the txn, before any op runs (a nested compare does not see
        // the outer txn's writes).
        let mut path = Vec::new();
        self.choose_branches(t, &mut path)?;
        self.txn_on(t, &mut path.into_iter())
    }

    /// Whether each txn, `t` and its nested ones on the branches taken, succeeds, in the order
    /// `txn_on` meets them (depth first).
    fn choose_branches(&self, t: &Txn, path: &mut Vec<bool>) -> Result<(), StateMachineError> {
        let mut succeeded = true;
        for cmp in &t.compare {
            if !self.compare(cmp)? {
                succeeded = false;
                break;
            }
        }
        path.push(succeeded);
        for op in if succeeded { &t.success } else { &t.failure } {
            if let Op::Txn(inner) = op {
                self.choose_branches(inner, path)?;
            }
        }
        Ok(())
    }

    fn txn_on(&mut self, t: &Txn, path: &mut std::vec::IntoIter<bool>) -> Applied {
        // choose_branches walked the same txns in the same order.
        let succeeded = path.next().expect("a branch was chosen for every txn on the path");
        let ops = if succeeded { &t.success } else { &t.failure };
        // Refuse before writing anything: a refused request must change nothing.
        let before = Revisions { current: self.revision - 1, compacted: self.compacted };
        if let Some(err) = self.check_ops(ops, before)? {
            return Ok(Err(err));
        }
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let r = match op {
                Op::Range(r) => {
                    // Reads inside a txn see the txn's earlier writes; the revision is the new one.
                    let current = if self.wrote { self.revision } else { self.revision - 1 };
                    let at = Revisions { current, compacted: self.compacted };
                    range_table(&*self.kv, &*self.history.old, r, at, usize::MAX)?
                }
                Op::Put(p) => self.put(p)?,
                Op::DeleteRange(d) => self.delete(d)?,
                Op::Txn(inner) => self.txn_on(inner, path)?,
            };
            match r {
                Ok(r) => responses.push(r),
                // check_ops rules out refusals after a write; one here is a bug, not a client
                // error. Every replica meets it alike (the ops before it stay applied on each), so
                // it is answered, not a reason to stop.
                Err(e) => return Ok(Err(KvError::InvalidRequest(format!("txn op refused mid-way: {e}")))),
            }
        }
        Ok(Ok(OpResult::Txn(TxnResult { succeeded, responses })))
    }

    /// Why a txn's ops would be refused, judged on the state before the txn (as etcd does): a put
    /// with a lease that does not exist, `ignore_value`/`ignore_lease` on a missing key, a read at a revision other
    /// than the current one. Checked before any op runs, so a refused txn writes nothing.
    fn check_ops(&self, ops: &[Op], current: Revisions) -> Result<Option<KvError>, StateMachineError> {
        for op in ops {
            let refused = match op {
                Op::Put(p) if p.lease != 0 && !p.ignore_lease && !self.lease_exists(p.lease)? => {
                    Some(KvError::LeaseNotFound)
                }
                Op::Put(p) if (p.ignore_value || p.ignore_lease) && self.get(&p.key)?.is_none() => {
                    Some(KvError::KeyNotFound)
                }
                Op::Range(r) => check_revision(r.revision, current).err(),
                Op::Txn(t) => match self.check_ops(&t.success, current)? {
                    Some(e) => Some(e),
                    None => self.check_ops(&t.failure, current)?,
                },
                _ => None,
            };
            if refused.is_some() {
                return Ok(refused);
            }
        }
        Ok(None)
    }

    fn compare(&self, cmp: &Compare) -> Result<bool, StateMachineError> {
        let mut all = true;
        let mut any = false;
        let mut check = |rec: Option<Record>| {
            any = true;
            all &= compare_one(rec.as_ref(), cmp);
        };
        match key_range(&cmp.key, &cmp.range_end) {
            KeyRange::One(key) => check(self.get(key)?),
            range => scan(&*self.kv, range, |_, v| {
                check(Some(Record::decode(v).map_err(corrupt)?));
                Ok(true)
            })?,
        }
        // etcd: a compare on an empty range holds only if it would hold for a missing key.
        if !any {
            return Ok(compare_one(None, cmp));
        }
        Ok(all)
    }
}

fn compare_one(rec: Option<&Record>, cmp: &Compare) -> bool {
    use std::cmp::Ordering;
    let ord = match (&cmp.target, rec) {
        (CompareTarget::Value(v), Some(r)) => r.value.as_slice().cmp(v.as_slice()),
        // A missing key has no value: no value compare holds (etcd).
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Version(n), r) => r.map_or(0, |r| r.version).cmp(n),
        (CompareTarget::Create(n), r) => r.map_or(0, |r| r.create_revision).cmp(n),
        (CompareTarget::Mod(n), r) => r.map_or(0, |r| r.mod_revision).cmp(n),
        (CompareTarget::Lease(n), r) => r.map_or(0, |r| r.lease).cmp(n),
    };
    match cmp.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

/// What a read may ask for: the current revision, and the compaction revision (history below it
/// is gone).
#[derive(Clone, Copy, Debug)]
struct Revisions {
    current: i64,
    compacted: i64,
}

/// The revision a read asking for `requested` (0: the current one) reads at, or why it cannot.
fn check_revision(requested: i64, at: Revisions) -> Result<i64, KvError> {
    if requested <= 0 {
        Ok(at.current)
    } else if requested > at.current {
        Err(KvError::FutureRevision { requested, current: at.current })
    } else if requested < at.compacted {
        Err(KvError::Compacted { requested, compacted: at.compacted })
    } else {
        Ok(requested)
    }
}

/// A row a range visits: straight from `kv` (decoded only if needed), or a past version.
enum Row<'a> {
    Raw(&'a [u8]),
    Decoded(Record),
}

impl Row<'_> {
    fn decode(self) -> Result<Record, StateMachineError> {
        match self {
            Row::Raw(bytes) => Record::decode(bytes).map_err(corrupt),
            Row::Decoded(r) => Ok(r),
        }
    }
}

/// Visits, in key order, each key of `range` as it was at revision `at` (< the current revision):
/// the current version where it is not newer than `at`, else the version in `kv_old` then visible.
fn scan_at<K, O>(
    kv: &K,
    old: &O,
    range: KeyRange<'_>,
    at: i64,
    mut visit: impl FnMut(&[u8], Row<'_>) -> Result<bool, StateMachineError>,
) -> Result<(), StateMachineError>
where
    K: ReadableTable<&'static [u8], &'static [u8]>,
    O: ReadableTable<(&'static [u8], u64), &'static [u8]>,
{
    let version_at = |key: &[u8], current: Option<Record>| -> Result<Option<Record>, StateMachineError> {
        match current {
            Some(r) if r.mod_revision <= at => Ok(Some(r)),
            _ => history::old_version_at(old, key, at),
        }
    };
    if let KeyRange::One(key) = range {
        let current = match kv.get(key)? {
            Some(v) => Some(Record::decode(v.value()).map_err(corrupt)?),
            None => None,
        };
        if let Some(r) = version_at(key, current)? {
            visit(key, Row::Decoded(r))?;
        }
        return Ok(());
    }
    // Every key that has a version in either table, in order: merge the two scans.
    let (start, end): (&[u8], Option<&[u8]>) = match range {
        KeyRange::From(start) => (start, None),
        KeyRange::Between(start, end) if start < end => (start, Some(end)),
        _ => return Ok(()),
    };
    let mut current = match end {
        Some(end) => kv.range::<&[u8]>(start..end)?,
        None => kv.range::<&[u8]>(start..)?,
    }
    .peekable();
    let mut past = match end {
        Some(end) => old.range::<(&[u8], u64)>((start, 0)..(end, 0))?,
        None => old.range::<(&[u8], u64)>((start, 0)..)?,
    }
    .peekable();
    loop {
        let next_current = match current.peek() {
            Some(Ok((k, _))) => Some(k.value().to_vec()),
            Some(Err(_)) => {
                return Err(current.next().and_then(Result::err).expect("peeked an error").into())
            }
            None => None,
        };
        let next_past = match past.peek() {
            Some(Ok((k, _))) => Some(k.value().0.to_vec()),
            Some(Err(_)) => return Err(past.next().and_then(Result::err).expect("peeked an error").into()),
            None => None,
        };
        let key = match (next_current, next_past) {
            (None, None) => return Ok(()),
            (Some(c), None) => c,
            (None, Some(p)) => p,
            (Some(c), Some(p)) => c.min(p),
        };
        let mut record = None;
        if let Some(Ok((k, v))) = current.peek() {
            if k.value() == key.as_slice() {
                let r = Record::decode(v.value()).map_err(corrupt)?;
                record = (r.mod_revision <= at).then_some(r);
                current.next();
            }
        }
        // The key's past versions, oldest first: the last one at or before `at` is the candidate.
        let mut candidate: Option<(i64, Record)> = None;
        while let Some(Ok((k, v))) = past.peek() {
            let (k_key, k_mod) = k.value();
            if k_key != key.as_slice() {
                break;
            }
            if record.is_none() && (k_mod as i64) <= at {
                candidate = Some(history::parse_old(v.value())?);
            }
            past.next();
        }
        let record = record.or(candidate.filter(|(end, _)| *end > at).map(|(_, r)| r));
        if let Some(r) = record {
            if !visit(&key, Row::Decoded(r))? {
                return Ok(());
            }
        }
    }
}

/// Reads a range at `r.revision` (0: current). `budget` bounds the answer (bytes per
/// [`answer_bytes`]): past it the scan stops and the range is refused, so a read holds at most
/// `budget` bytes of rows, however large the range. Sorting by anything but the key, ascending,
/// must hold every row of the range before cutting at `limit`, so the whole range counts then.
fn range_table<K, O>(kv: &K, old: &O, r: &Range, revisions: Revisions, budget: usize) -> Applied
where
    K: ReadableTable<&'static [u8], &'static [u8]>,
    O: ReadableTable<(&'static [u8], u64), &'static [u8]>,
{
    let at = match check_revision(r.revision, revisions) {
        Ok(at) => at,
        Err(e) => return Ok(Err(e)),
    };
    let filtered = r.min_mod_revision > 0
        || r.max_mod_revision > 0
        || r.min_create_revision > 0
        || r.max_create_revision > 0;
    let sorted = r.sort_target != SortTarget::Key || r.sort_order == SortOrder::Descend;
    let limit = usize::try_from(r.limit).ok().filter(|&l| l > 0);
    let mut result = RangeResult::default();
    let keep = |rec: &Record| {
        (r.min_mod_revision <= 0 || rec.mod_revision >= r.min_mod_revision)
            && (r.max_mod_revision <= 0 || rec.mod_revision <= r.max_mod_revision)
            && (r.min_create_revision <= 0 || rec.create_revision >= r.min_create_revision)
            && (r.max_create_revision <= 0 || rec.create_revision <= r.max_create_revision)
    };
    let mut held = 0usize;
    let mut over_budget = false;
    // etcd's `count` is the whole range's, before the revision filters (and `limit`) cut the
    // answer; `more` says whether the filtered answer went past `limit`, so it is never set
    // for `count_only`, which answers no keys.
    let mut matched = 0usize;
    let mut visit = |k: &[u8], row: Row<'_>| {
        result.count += 1;
        if r.count_only {
            return Ok(true);
        }
        if !filtered && !sorted && limit.is_some_and(|l| result.kvs.len() >= l) {
            matched += 1; // past the answer: counted, not decoded
            return Ok(true);
        }
        let rec = row.decode()?;
        if filtered && !keep(&rec) {
            return Ok(true);
        }
        matched += 1;
        // Without sorting, stop collecting at the limit but keep counting.
        if sorted || limit.is_none_or(|l| result.kvs.len() < l) {
            let kv = rec.into_kv(k.to_vec(), r.keys_only);
            held = held.saturating_add(answer_bytes(&kv));
            if held > budget {
                over_budget = true;
                return Ok(false);
            }
            result.kvs.push(kv);
        }
        Ok(true)
    };
    let range = key_range(&r.key, &r.range_end);
    if at == revisions.current {
        scan(kv, range, |k, v| visit(k, Row::Raw(v)))?;
    } else {
        scan_at(kv, old, range, at, visit)?;
    }
    if over_budget {
        return Ok(Err(KvError::ResponseTooLarge { limit: budget as u64 }));
    }
    if sorted {
        let key = |kv: &KeyValue| -> (Vec<u8>, i64) {
            match r.sort_target {
                SortTarget::Key => (kv.key.clone(), 0),
                SortTarget::Version => (Vec::new(), kv.version),
                SortTarget::Create => (Vec::new(), kv.create_revision),
                SortTarget::Mod => (Vec::new(), kv.mod_revision),
                SortTarget::Value => (kv.value.clone(), 0),
            }
        };
        result.kvs.sort_by_key(|kv| key(kv));
        if r.sort_order == SortOrder::Descend {
            result.kvs.reverse();
        }
        if let Some(l) = limit {
            result.kvs.truncate(l);
        }
    }
    result.more = limit.is_some_and(|l| matched > l);
    Ok(Ok(OpResult::Range(result)))
}

/// The store's current revision in `txn` (1 before the first write, as in etcd).
pub fn revision(txn: &ReadTransaction) -> Result<i64, StateMachineError> {
    match txn.open_table(META) {
        Ok(t) => Ok(t.get(REVISION)?.map_or(FIRST_REVISION, |v| v.value())),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(FIRST_REVISION),
        Err(e) => Err(e.into()),
    }
}

/// The number of keys in `txn`.
pub fn key_count(txn: &ReadTransaction) -> Result<u64, StateMachineError> {
    use keel::redb::ReadableTableMetadata;
    match txn.open_table(KV) {
        Ok(t) => Ok(t.len()?),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Visits every key and its metadata in `txn`, in key order, without holding them.
pub fn for_each_kv(
    txn: &ReadTransaction,
    mut visit: impl FnMut(&KeyValue),
) -> Result<i64, StateMachineError> {
    let current = revision(txn)?;
    let table = match txn.open_table(KV) {
        Ok(t) => t,
        Err(keel::redb::TableError::TableDoesNotExist(_)) => return Ok(current),
        Err(e) => return Err(e.into()),
    };
    scan(&table, KeyRange::From(&[0]), |k, v| {
        visit(&Record::decode(v).map_err(corrupt)?.into_kv(k.to_vec(), false));
        Ok(true)
    })?;
    Ok(current)
}

/// Serves a range read from `txn`, at the current or a past revision, refusing one whose answer
/// is over `budget` bytes (see [`answer_bytes`]); answers the store's revision with the result.
pub fn range(
    txn: &ReadTransaction,
    r: &Range,
    budget: usize,
) -> Result<(i64, Result<RangeResult, KvError>), StateMachineError> {
    let current = revision(txn)?;
    let compacted = compact_revision(txn)?;
    let revisions = Revisions { current, compacted };
    let (kv, old) = match (txn.open_table(KV), txn.open_table(OLD)) {
        (Ok(kv), Ok(old)) => (kv, old),
        (Err(keel::redb::TableError::TableDoesNotExist(_)), _)
        | (_, Err(keel::redb::TableError::TableDoesNotExist(_))) => {
            return Ok((current, check_revision(r.revision, revisions).map(|_| RangeResult::default())))
        }
        (Err(e), _) | (_, Err(e)) => return Err(e.into()),
    };
    let result = range_table(&kv, &old, r, revisions, budget)?.map(|op| match op {
        OpResult::Range(r) => r,
        _ => RangeResult::default(),
    });
    Ok((current, result))
}

/// The compaction revision in `txn` (0: never compacted).
pub fn compact_revision(txn: &ReadTransaction) -> Result<i64, StateMachineError> {
    match txn.open_table(META) {
        Ok(t) => Ok(t.get(COMPACT_REVISION)?.map_or(0, |v| v.value())),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_increments_the_last_byte_below_0xff() {
        assert_eq!(b"abd".to_vec(), prefix_range_end(b"abc"));
        assert_eq!(b"b".to_vec(), prefix_range_end(b"a\xff"));
        assert_eq!(vec![0], prefix_range_end(b"\xff\xff"));
        assert_eq!(vec![0], prefix_range_end(b""));
    }

    #[test]
    fn cost_counts_puts_as_etcd_does_and_deletes_as_nothing() {
        let put = |k: &str, v: &str| Put { key: k.into(), value: v.into(), ..Put::default() };
        assert_eq!(256 + 1 + 2, cost(&KvCommand::Put(put("k", "vv"))));
        let del = DeleteRange { key: b"k".to_vec(), ..DeleteRange::default() };
        assert_eq!(0, cost(&KvCommand::DeleteRange(del.clone())));
        assert_eq!(0, cost(&KvCommand::Compact { revision: 3 }));
        let reads_and_deletes =
            Txn { success: vec![Op::DeleteRange(del), Op::Range(Range::default())], ..Txn::default() };
        assert_eq!(0, cost(&KvCommand::Txn(reads_and_deletes.clone())));
        // The larger branch counts; a nested txn counts its own larger branch.
        let nested = Txn { failure: vec![Op::Put(put("a", "12345"))], ..Txn::default() };
        let t = Txn {
            success: vec![Op::Put(put("a", "1")), Op::Txn(reads_and_deletes)],
            failure: vec![Op::Txn(nested)],
            ..Txn::default()
        };
        assert_eq!(256 + 1 + 5, cost(&KvCommand::Txn(t)));
    }

    #[test]
    fn record_round_trips_and_short_records_are_errors() {
        let r = Record { create_revision: 3, mod_revision: 9, version: 4, lease: 0, value: b"v".to_vec() };
        assert_eq!(r, Record::decode(&r.encode()).expect("decodes"));
        assert!(Record::decode(&[1, 2, 3]).is_err());
    }
}
