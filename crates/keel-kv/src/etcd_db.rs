//! Keel's KV state as etcd 3.4's backend database (its bbolt buckets), and back: what
//! `Maintenance.Snapshot` streams ([`write_db`]) and what `keel snapshot restore` of an etcd
//! snapshot loads ([`import`]). The file format is [`crate::bbolt`]'s; `docs/formats.md` (Backup
//! files) gives the mapping.
//!
//! # The buckets (etcd 3.4)
//!
//! | bucket | key → value |
//! |---|---|
//! | `alarm` | `AlarmMember` protobuf → empty |
//! | `auth` | `authEnabled` → `[0]`/`[1]`; `authRevision` → u64 BE |
//! | `authRoles`, `authUsers` | name → `authpb.Role` / `authpb.User` (the password is the bcrypt hash) |
//! | `cluster` | `clusterVersion` → `3.4.0` |
//! | `key` | revision bytes (main u64 BE, `_`, sub u64 BE; a tombstone adds `t`) → `mvccpb.KeyValue` |
//! | `lease` | id u64 BE → `leasepb.Lease { ID, TTL }` |
//! | `members`, `members_removed` | member id in hex → etcd's member JSON |
//! | `meta` | `consistent_index` → u64 BE; `scheduledCompactRev`, `finishedCompactRev` → revision bytes |
//!
//! # History
//!
//! Keel keeps, after compacting to `c`, every event from `c` on and, per key, the version visible
//! at `c`. The `key` bucket holds each event at its own revision (a put: the version it wrote; a
//! delete: a tombstone), and each version visible at `c` that is older than `c` at revision
//! `(c - 1, n)`, `n` counting them: etcd serves no read and no watch below `c`, so no answer can
//! tell that position from the version's own `mod_revision` (which its `KeyValue` keeps), and the
//! writer needs no sort. Going in, [`import`] replays the bucket in revision order as puts and
//! deletes, so Keel holds the same versions, events and `prev_kv`s.

use std::io::Write;

use keel::redb::ReadTransaction;
use keel::redb::ReadableTable;
use keel::redb::WriteTransaction;
use keel::StateMachineError;
use prost::Message;

use crate::auth;
use crate::auth::PermType;
use crate::auth::Permission;
use crate::auth::RoleRecord;
use crate::auth::UserRecord;
use crate::bbolt::DbReader;
use crate::bbolt::DbWriter;
use crate::bbolt::Layout;
use crate::etcd::pb::authpb;
use crate::etcd::pb::etcdserverpb;
use crate::etcd::pb::mvccpb;
use crate::history;
use crate::history::EventKind;
use crate::store;
use crate::store::Record;

/// The cluster version a Keel snapshot claims: the etcd release its API follows.
pub const CLUSTER_VERSION: &str = "3.4.0";

/// Why Keel's state could not be written as an etcd database.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    State(#[from] StateMachineError),
    #[error(transparent)]
    Write(#[from] crate::bbolt::WriteError),
    #[error("the state is inconsistent: {0}")]
    Inconsistent(String),
}

impl From<keel::redb::StorageError> for ExportError {
    fn from(e: keel::redb::StorageError) -> Self {
        ExportError::State(e.into())
    }
}

/// Why an etcd database could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Read(#[from] crate::bbolt::ReadError),
    #[error("writing the state: {0}")]
    State(#[from] StateMachineError),
    #[error("bucket {bucket:?}, key {key:?}: {why}")]
    Bad { bucket: &'static str, key: String, why: String },
    #[error("there is no {0:?} bucket: not an etcd database")]
    Missing(&'static str),
}

impl From<keel::redb::StorageError> for ImportError {
    fn from(e: keel::redb::StorageError) -> Self {
        ImportError::State(e.into())
    }
}
impl From<keel::redb::TableError> for ImportError {
    fn from(e: keel::redb::TableError) -> Self {
        ImportError::State(e.into())
    }
}

fn bad(bucket: &'static str, key: &[u8], why: impl Into<String>) -> ImportError {
    ImportError::Bad {
        bucket,
        key: String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned(),
        why: why.into(),
    }
}

/// etcd's revision bytes: main u64 BE, `_`, sub u64 BE, and `t` for a tombstone.
pub fn rev_bytes(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(18);
    b.extend_from_slice(&main.to_be_bytes());
    b.push(b'_');
    b.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        b.push(b't');
    }
    b
}

/// Parses revision bytes: `(main, sub, tombstone)`.
pub fn parse_rev(b: &[u8]) -> Option<(i64, i64, bool)> {
    let tombstone = match b.len() {
        17 => false,
        18 if b[17] == b't' => true,
        _ => return None,
    };
    if b[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(b[..8].try_into().ok()?);
    let sub = i64::from_be_bytes(b[9..17].try_into().ok()?);
    Some((main, sub, tombstone))
}

/// A protobuf varint field (wire type 0); zero is omitted, as proto3 does.
fn varint_field(out: &mut Vec<u8>, field: u32, value: i64) {
    if value != 0 {
        prost::encoding::int64::encode(field, &value, out);
    }
}

/// etcd's `leasepb.Lease { ID = 1, TTL = 2 }`.
fn lease_pb(id: i64, ttl: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    varint_field(&mut out, 1, id);
    varint_field(&mut out, 2, ttl);
    out
}

/// Parses `leasepb.Lease`: `(ID, TTL)`; other fields (`RemainingTTL`) are skipped.
fn parse_lease_pb(mut b: &[u8]) -> Option<(i64, i64)> {
    let (mut id, mut ttl) = (0i64, 0i64);
    while !b.is_empty() {
        let tag = prost::encoding::decode_varint(&mut b).ok()?;
        let value = match tag & 7 {
            0 => prost::encoding::decode_varint(&mut b).ok()?,
            2 => {
                let len = usize::try_from(prost::encoding::decode_varint(&mut b).ok()?).ok()?;
                b = b.get(len..)?;
                continue;
            }
            _ => return None,
        };
        match tag >> 3 {
            1 => id = value as i64,
            2 => ttl = value as i64,
            _ => {}
        }
    }
    Some((id, ttl))
}

fn perm_type(t: PermType) -> i32 {
    match t {
        PermType::Read => authpb::permission::Type::Read as i32,
        PermType::Write => authpb::permission::Type::Write as i32,
        PermType::ReadWrite => authpb::permission::Type::Readwrite as i32,
    }
}

fn kv_pb(key: &[u8], r: &Record) -> Vec<u8> {
    mvccpb::KeyValue {
        key: key.to_vec(),
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        version: r.version,
        value: r.value.clone(),
        lease: r.lease,
    }
    .encode_to_vec()
}

// ---------------------------------------------------------------------------------------------
// Keel → etcd

/// Writes the state in `txn` as etcd 3.4's database onto `out` (see [`DbWriter`] for `layout`:
/// None on the first of the two passes). Reads the tables in key order, holding one page per
/// tree level and the (few) alarms and members.
pub fn write_db<W: Write>(
    txn: &ReadTransaction,
    out: W,
    layout: Option<Layout>,
) -> Result<(Layout, W), ExportError> {
    let mut db = DbWriter::new(out, layout)?;
    let applied = keel::storage::sm_store::applied_state_in(txn).map_err(StateMachineError::Io)?;

    let mut alarms: Vec<Vec<u8>> = store::alarms(txn)?
        .into_iter()
        .map(|a| {
            etcdserverpb::AlarmMember {
                member_id: a.member_id,
                alarm: etcdserverpb::AlarmType::Nospace as i32,
            }
            .encode_to_vec()
        })
        .collect();
    alarms.sort();
    db.begin_bucket(b"alarm")?;
    for a in &alarms {
        db.put(a, b"")?;
    }

    let view = auth::AuthView::open(txn)?;
    let status = view.status()?;
    db.begin_bucket(b"auth")?;
    db.put(b"authEnabled", &[u8::from(status.enabled)])?;
    db.put(b"authRevision", &status.revision.to_be_bytes())?;
    db.begin_bucket(b"authRoles")?;
    if let Some(roles) = open(txn, auth::AUTH_ROLES)? {
        for row in roles.iter()? {
            let (name, v) = row?;
            let record: RoleRecord = auth::decode_record("auth_roles", name.value(), v.value())?;
            let role = authpb::Role {
                name: name.value().as_bytes().to_vec(),
                key_permission: record
                    .perms
                    .iter()
                    .map(|p| authpb::Permission {
                        perm_type: perm_type(p.perm_type),
                        key: p.key.clone(),
                        range_end: p.range_end.clone(),
                    })
                    .collect(),
            };
            db.put(name.value().as_bytes(), &role.encode_to_vec())?;
        }
    }
    db.begin_bucket(b"authUsers")?;
    if let Some(users) = open(txn, auth::AUTH_USERS)? {
        for row in users.iter()? {
            let (name, v) = row?;
            let record: UserRecord = auth::decode_record("auth_users", name.value(), v.value())?;
            let user = authpb::User {
                name: name.value().as_bytes().to_vec(),
                password: record.password_hash.clone().unwrap_or_default().into_bytes(),
                roles: record.roles.clone(),
                options: record
                    .password_hash
                    .is_none()
                    .then_some(authpb::UserAddOptions { no_password: true }),
            };
            db.put(name.value().as_bytes(), &user.encode_to_vec())?;
        }
    }

    db.begin_bucket(b"cluster")?;
    db.put(b"clusterVersion", CLUSTER_VERSION.as_bytes())?;

    db.begin_bucket(b"key")?;
    let compacted = store::compact_revision(txn)?;
    write_history(txn, &mut db, compacted)?;

    db.begin_bucket(b"lease")?;
    if let Some(leases) = open(txn, store::LEASES)? {
        // etcd's keys are the ids' big-endian bytes: the non-negative ids sort first.
        for range in [leases.range(0i64..)?, leases.range(..0i64)?] {
            for row in range {
                let (id, ttl) = row?;
                let (id, ttl) = (id.value(), store::parse_lease_row(id.value(), ttl.value())?);
                db.put(&id.to_be_bytes(), &lease_pb(id, ttl))?;
            }
        }
    }

    let mut members: Vec<(String, Vec<u8>)> = applied
        .membership
        .membership()
        .nodes()
        .map(|(id, info)| {
            let url = |a: &str| if a.is_empty() { vec![] } else { vec![format!("http://{a}")] };
            let json = serde_json::json!({
                "id": id, "peerURLs": url(&info.peer_addr), "name": format!("keel{id}"),
                "clientURLs": url(&info.client_addr),
            });
            (format!("{id:x}"), json.to_string().into_bytes())
        })
        .collect();
    members.sort();
    db.begin_bucket(b"members")?;
    for (id, json) in &members {
        db.put(id.as_bytes(), json)?;
    }
    db.begin_bucket(b"members_removed")?;

    db.begin_bucket(b"meta")?;
    let index = applied.last_applied.map_or(0, |l| l.index);
    db.put(b"consistent_index", &index.to_be_bytes())?;
    if compacted > 0 {
        db.put(b"finishedCompactRev", &rev_bytes(compacted, 0, false))?;
        db.put(b"scheduledCompactRev", &rev_bytes(compacted, 0, false))?;
    }
    Ok(db.finish()?)
}

fn open<K: keel::redb::Key + 'static, V: keel::redb::Value + 'static>(
    txn: &ReadTransaction,
    def: keel::redb::TableDefinition<K, V>,
) -> Result<Option<keel::redb::ReadOnlyTable<K, V>>, StateMachineError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The `key` bucket: the versions visible at `compacted` that are older than it, at
/// `(compacted - 1, n)`, then every event from `compacted` on (see the module docs).
fn write_history<W: Write>(
    txn: &ReadTransaction,
    db: &mut DbWriter<W>,
    compacted: i64,
) -> Result<(), ExportError> {
    let (Some(kv), Some(old), Some(events)) =
        (open(txn, store::KV)?, open(txn, history::OLD)?, open(txn, history::EVENTS)?)
    else {
        return Ok(());
    };
    if compacted >= 2 {
        let mut n = 0i64;
        for row in old.iter()? {
            let (k, v) = row?;
            let (key, mod_rev) = k.value();
            let (end, record) = history::parse_old(v.value())?;
            if (mod_rev as i64) < compacted && end > compacted {
                db.put(&rev_bytes(compacted - 1, n, false), &kv_pb(key, &record))?;
                n += 1;
            }
        }
        for row in kv.iter()? {
            let (k, v) = row?;
            let record = Record::decode(v.value()).map_err(StateMachineError::Io)?;
            if record.mod_revision < compacted {
                db.put(&rev_bytes(compacted - 1, n, false), &kv_pb(k.value(), &record))?;
                n += 1;
            }
        }
    }
    let from = compacted.max(0) as u64;
    for row in events.range((from, 0u32)..)? {
        let (k, v) = row?;
        let (revision, sub) = k.value();
        let (kind, _, key) = history::parse_event(v.value())?;
        let (main, sub) = (revision as i64, i64::from(sub));
        match kind {
            EventKind::Delete => {
                let tombstone = mvccpb::KeyValue { key: key.to_vec(), ..Default::default() };
                db.put(&rev_bytes(main, sub, true), &tombstone.encode_to_vec())?;
            }
            EventKind::Put => {
                let current = kv
                    .get(key)?
                    .map(|v| Record::decode(v.value()))
                    .transpose()
                    .map_err(StateMachineError::Io)?;
                let record = match current {
                    Some(r) if r.mod_revision == main => r,
                    _ => match old.get((key, revision))? {
                        Some(v) => history::parse_old(v.value())?.1,
                        None => {
                            return Err(ExportError::Inconsistent(format!(
                                "the put at revision {main} has no version in kv or kv_old"
                            )))
                        }
                    },
                };
                db.put(&rev_bytes(main, sub, false), &kv_pb(key, &record))?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// etcd → Keel

/// What [`import`] found besides the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    /// etcd's `consistent_index`: the Raft index the database had applied.
    pub consistent_index: u64,
    /// The member ids in the `members` bucket.
    pub members: Vec<u64>,
}

/// What [`each`] calls for each `(key, value)`.
type Row<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), ImportError> + 'a;

/// The top-level bucket `name`'s entries, in key order, each handed to `visit`.
fn each(db: &DbReader, name: &'static str, required: bool, visit: &mut Row<'_>) -> Result<(), ImportError> {
    let Some(bucket) = db.bucket(name.as_bytes())? else {
        return if required { Err(ImportError::Missing(name)) } else { Ok(()) };
    };
    let mut failed = None;
    db.for_each(&bucket, &mut |k, v, is_bucket| {
        let result = if is_bucket { Err(bad(name, k, "a nested bucket")) } else { visit(k, v) };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                failed = Some(e);
                Err(crate::bbolt::ReadError::Check("stopped".into()))
            }
        }
    })
    .map_err(|e| failed.take().unwrap_or(ImportError::Read(e)))?;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(())
}

fn be_u64(bucket: &'static str, k: &[u8], v: &[u8]) -> Result<u64, ImportError> {
    v.try_into().map(u64::from_be_bytes).map_err(|_| bad(bucket, k, format!("{} bytes, not 8", v.len())))
}

/// Loads etcd's database `db` into Keel's tables in `txn` (which must be empty): keys with their
/// history from etcd's compaction revision on, leases, users, roles, the auth switch, alarms.
pub fn import(db: &DbReader, txn: &WriteTransaction) -> Result<Imported, ImportError> {
    let mut imported = Imported::default();
    let (mut scheduled, mut finished) = (0i64, 0i64);
    each(db, "meta", true, &mut |k, v| {
        match k {
            b"consistent_index" => imported.consistent_index = be_u64("meta", k, v)?,
            b"scheduledCompactRev" | b"finishedCompactRev" => {
                let (main, _, _) = parse_rev(v).ok_or_else(|| bad("meta", k, "not a revision"))?;
                *if k == b"scheduledCompactRev" { &mut scheduled } else { &mut finished } = main;
            }
            _ => {}
        }
        Ok(())
    })?;
    // etcd finishes a scheduled compaction when it starts: Keel's compactor does the same.
    let compacted = scheduled.max(finished).max(0);

    let mut revision = 1i64;
    {
        let mut kv = txn.open_table(store::KV)?;
        let mut old = txn.open_table(history::OLD)?;
        let mut events = txn.open_table(history::EVENTS)?;
        each(db, "key", true, &mut |k, v| {
            let (main, sub, tombstone) = parse_rev(k).ok_or_else(|| bad("key", k, "not a revision"))?;
            if main < revision {
                return Err(bad("key", k, "revisions go backwards"));
            }
            revision = main;
            let pb = mvccpb::KeyValue::decode(v).map_err(|e| bad("key", k, format!("KeyValue: {e}")))?;
            let sub = u32::try_from(sub).map_err(|_| bad("key", k, "sub-revision out of range"))?;
            let current = kv
                .get(pb.key.as_slice())?
                .map(|r| Record::decode(r.value()))
                .transpose()
                .map_err(StateMachineError::Io)?;
            let prev_mod = current.as_ref().map_or(0, |r| r.mod_revision);
            // A version replaced at or below the compaction revision is compacted away.
            if let Some(prev) = current.as_ref().filter(|_| main > compacted) {
                old.insert(
                    (pb.key.as_slice(), prev.mod_revision as u64),
                    history::old_row(main, prev).as_slice(),
                )?;
            }
            let kind = if tombstone {
                kv.remove(pb.key.as_slice())?;
                EventKind::Delete
            } else {
                let record = Record {
                    create_revision: pb.create_revision,
                    mod_revision: pb.mod_revision,
                    version: pb.version,
                    lease: pb.lease,
                    value: pb.value,
                };
                if record.mod_revision != main && main >= compacted {
                    return Err(bad(
                        "key",
                        k,
                        format!("mod_revision {} at revision {main}", record.mod_revision),
                    ));
                }
                kv.insert(pb.key.as_slice(), record.encode().as_slice())?;
                EventKind::Put
            };
            // Events below the compaction revision are compacted away, as Keel would have.
            if main >= compacted {
                events.insert((main as u64, sub), history::event_row(kind, prev_mod, &pb.key).as_slice())?;
            }
            Ok(())
        })?;
    }
    let revision = revision.max(compacted).max(1);

    {
        let mut leases = txn.open_table(store::LEASES)?;
        each(db, "lease", false, &mut |k, v| {
            let (id, ttl) = parse_lease_pb(v).ok_or_else(|| bad("lease", k, "not a Lease"))?;
            if k.len() != 8 || i64::from_be_bytes(k.try_into().expect("8 bytes")) != id {
                return Err(bad("lease", k, format!("the key is not lease {id}'s id")));
            }
            leases.insert(id, store::lease_row(ttl).as_slice())?;
            Ok(())
        })?;
        let kv = txn.open_table(store::KV)?;
        let mut lease_keys = txn.open_table(store::LEASE_KEYS)?;
        for row in kv.iter()? {
            let (k, v) = row?;
            let record = Record::decode(v.value()).map_err(StateMachineError::Io)?;
            // etcd attaches a key to its lease if the lease exists (and warns otherwise).
            if record.lease != 0 && leases.get(record.lease)?.is_some() {
                lease_keys.insert((record.lease, k.value()), ())?;
            }
        }
    }

    import_auth(db, txn)?;

    {
        let mut meta = txn.open_table(store::META)?;
        each(db, "alarm", false, &mut |k, _| {
            let a = etcdserverpb::AlarmMember::decode(k).map_err(|e| bad("alarm", k, e.to_string()))?;
            // Keel raises only NOSPACE; etcd's CORRUPT stops a Keel node instead of an alarm.
            if a.alarm == etcdserverpb::AlarmType::Nospace as i32 {
                let member = store::AlarmMember { member_id: a.member_id, alarm: store::AlarmKind::NoSpace };
                meta.insert(store::alarm_row_key(member).as_str(), a.member_id as i64)?;
            }
            Ok(())
        })?;
        meta.insert(store::REVISION, revision)?;
        if compacted > 0 {
            meta.insert(store::COMPACT_REVISION, compacted)?;
            // Nothing below it was loaded: the compaction is done.
            meta.insert(store::COMPACT_PHYSICAL, compacted)?;
        }
    }

    each(db, "members", false, &mut |k, _| {
        let id = std::str::from_utf8(k).ok().and_then(|s| u64::from_str_radix(s, 16).ok());
        imported.members.push(id.ok_or_else(|| bad("members", k, "not a member id in hex"))?);
        Ok(())
    })?;
    Ok(imported)
}

/// Users, roles and the auth switch. A token key is drawn from what the auth buckets hold (the
/// users' bcrypt hashes carry random salts), so every member restored from one file has the same.
fn import_auth(db: &DbReader, txn: &WriteTransaction) -> Result<(), ImportError> {
    let mut key = ring::digest::Context::new(&ring::digest::SHA256);
    key.update(b"keel: token key of an imported etcd database\0");
    let (mut enabled, mut revision) = (false, 1u64);
    each(db, "auth", false, &mut |k, v| {
        key.update(k);
        key.update(v);
        match k {
            b"authEnabled" => enabled = v == [1],
            b"authRevision" => revision = be_u64("auth", k, v)?,
            _ => {}
        }
        Ok(())
    })?;
    let revision = revision.max(1);
    {
        let mut users = txn.open_table(auth::AUTH_USERS)?;
        each(db, "authUsers", false, &mut |k, v| {
            key.update(k);
            key.update(v);
            let u = authpb::User::decode(v).map_err(|e| bad("authUsers", k, e.to_string()))?;
            let name = std::str::from_utf8(k).map_err(|_| bad("authUsers", k, "the name is not UTF-8"))?;
            let no_password = u.options.is_some_and(|o| o.no_password) || u.password.is_empty();
            let hash =
                String::from_utf8(u.password).map_err(|_| bad("authUsers", k, "the hash is not UTF-8"))?;
            let mut roles = u.roles;
            roles.sort();
            roles.dedup();
            let record = UserRecord {
                password_hash: (!no_password).then_some(hash),
                roles,
                password_revision: revision,
            };
            users.insert(name, auth::encode_record(&record).as_slice())?;
            Ok(())
        })?;
        let mut roles = txn.open_table(auth::AUTH_ROLES)?;
        each(db, "authRoles", false, &mut |k, v| {
            let r = authpb::Role::decode(v).map_err(|e| bad("authRoles", k, e.to_string()))?;
            let name = std::str::from_utf8(k).map_err(|_| bad("authRoles", k, "the name is not UTF-8"))?;
            let mut perms = Vec::with_capacity(r.key_permission.len());
            for p in r.key_permission {
                let perm_type = match authpb::permission::Type::try_from(p.perm_type) {
                    Ok(authpb::permission::Type::Read) => PermType::Read,
                    Ok(authpb::permission::Type::Write) => PermType::Write,
                    Ok(authpb::permission::Type::Readwrite) => PermType::ReadWrite,
                    Err(_) => return Err(bad("authRoles", k, format!("permission type {}", p.perm_type))),
                };
                perms.push(Permission { perm_type, key: p.key, range_end: p.range_end });
            }
            perms.sort_by(|a, b| a.key.cmp(&b.key));
            roles.insert(name, auth::encode_record(&RoleRecord { perms }).as_slice())?;
            Ok(())
        })?;
    }
    let mut meta = txn.open_table(auth::AUTH_META)?;
    meta.insert(auth::ENABLED, [u8::from(enabled)].as_slice())?;
    meta.insert(auth::REVISION, revision.to_le_bytes().as_slice())?;
    if enabled {
        meta.insert(auth::ENABLED_REVISION, revision.to_le_bytes().as_slice())?;
        meta.insert(auth::SECRET, key.finish().as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_bytes_round_trip_and_sort_as_revisions() {
        for (m, s, t) in [(1, 0, false), (2, 3, true), (1 << 40, 7, false)] {
            assert_eq!(Some((m, s, t)), parse_rev(&rev_bytes(m, s, t)));
        }
        assert!(rev_bytes(2, 0, false) < rev_bytes(2, 1, false));
        assert!(rev_bytes(2, 9, true) < rev_bytes(3, 0, false));
        assert_eq!(None, parse_rev(b"short"));
        let mut bad = rev_bytes(2, 0, false);
        bad[8] = b'x';
        assert_eq!(None, parse_rev(&bad));
    }

    #[test]
    fn lease_protobuf_round_trips_and_garbage_is_refused() {
        assert_eq!(Some((7, 60)), parse_lease_pb(&lease_pb(7, 60)));
        assert_eq!(Some((-5, 1)), parse_lease_pb(&lease_pb(-5, 1)));
        assert_eq!(None, parse_lease_pb(&[0x08]));
        assert_eq!(None, parse_lease_pb(&[0x0d, 1, 2, 3, 4]));
        assert_eq!(None, parse_lease_pb(&[0x12, 200, 1]));
    }

    /// A small etcd-shaped database: keys with puts and deletes, a lease, a user, the meta.
    fn etcd_shaped() -> Vec<u8> {
        let pass = |layout| {
            let mut db = DbWriter::new(Vec::new(), layout).expect("new");
            db.begin_bucket(b"auth").expect("bucket");
            db.put(b"authEnabled", &[1]).expect("put");
            db.put(b"authRevision", &5u64.to_be_bytes()).expect("put");
            db.begin_bucket(b"authUsers").expect("bucket");
            let user = authpb::User {
                name: b"root".to_vec(),
                password: b"$2a$10$x".to_vec(),
                roles: vec!["root".into()],
                options: None,
            };
            db.put(b"root", &user.encode_to_vec()).expect("put");
            db.begin_bucket(b"key").expect("bucket");
            for rev in 2..200i64 {
                let key = format!("k{}", rev % 7).into_bytes();
                let kv = mvccpb::KeyValue {
                    key,
                    create_revision: 2,
                    mod_revision: rev,
                    version: 1,
                    value: vec![b'v'; 30],
                    lease: 7,
                };
                db.put(&rev_bytes(rev, 0, rev % 5 == 0), &kv.encode_to_vec()).expect("put");
            }
            db.begin_bucket(b"lease").expect("bucket");
            db.put(&7i64.to_be_bytes(), &lease_pb(7, 60)).expect("put");
            db.begin_bucket(b"meta").expect("bucket");
            db.put(b"consistent_index", &9u64.to_be_bytes()).expect("put");
            db.put(b"scheduledCompactRev", &rev_bytes(20, 0, false)).expect("put");
            db.finish().expect("finish")
        };
        let (layout, _) = pass(None);
        pass(Some(layout)).1
    }

    fn import_bytes(bytes: &[u8]) -> Result<Imported, String> {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(bytes).expect("write");
        let db = DbReader::open(file, bytes.len() as u64).map_err(|e| e.to_string())?;
        db.check().map_err(|e| e.to_string())?;
        let state = keel::redb::Database::builder()
            .create_with_backend(keel::redb::backends::InMemoryBackend::new())
            .expect("in-memory db");
        let txn = state.begin_write().expect("write txn");
        import(&db, &txn).map_err(|e| e.to_string())
    }

    #[test]
    fn damaged_etcd_databases_are_errors_never_panics() {
        let bytes = etcd_shaped();
        assert_eq!(Ok(9), import_bytes(&bytes).map(|i| i.consistent_index));
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        for _ in 0..300 {
            let mut damaged = bytes.clone();
            for _ in 0..rand::Rng::gen_range(&mut rng, 1..6) {
                let at = rand::Rng::gen_range(&mut rng, crate::bbolt::PAGE_SIZE * 3..damaged.len());
                damaged[at] = rand::Rng::gen(&mut rng);
            }
            let _ = import_bytes(&damaged);
        }
    }
}
