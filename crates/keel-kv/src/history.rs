//! Every revision of every key, until compacted: what `Range` at a past revision and `Watch`
//! read, and what compaction removes.
//!
//! The current version of each key stays in the `kv` table ([`crate::store`]), so reads at the
//! current revision touch nothing here. Two more tables hold the past (`docs/formats.md`):
//!
//! - `kv_events`: `(revision u64, sub u32)` → `kind u8 | prev_mod i64 LE | key`. One row per key a
//!   write changed, in revision order (`sub` counts the changes within one revision). `kind` is
//!   [`EventKind`]; `prev_mod` is the `mod_revision` of the version the change replaced (0: the
//!   key did not exist). A watch replays this table; compaction walks it.
//! - `kv_old`: `(key, mod_revision u64)` → `end i64 LE | record`. Every version that is no longer
//!   current: the record as `kv` held it, and `end`, the revision of the put or delete that
//!   replaced it. A version is visible at revision `r` when `mod_revision ≤ r < end`.
//!
//! A put event's value is the version `(key, revision)`: in `kv` while current, in `kv_old`
//! after. A delete event has no value. Its `prev_mod` names the version in `kv_old` that
//! `prev_kv` answers.
//!
//! Compaction to `c` (`KvCommand::Compact`, through Raft) only records `c`: reads below it are
//! refused from then on. Each node then removes, in bounded steps of its own ([`compact_step`],
//! run through `keel::Node::maintain`), every event below `c` and every version whose `end ≤ c`
//! (each is named by the event that ended it). Those rows are invisible to any read at or above
//! `c` (visibility checks `end`), so a half-done compaction changes no answer.

use std::io;
use std::sync::Arc;

use keel::redb::ReadTransaction;
use keel::redb::ReadableTable;
use keel::redb::Table;
use keel::redb::TableDefinition;
use keel::redb::WriteTransaction;
use keel::StateMachineError;

use crate::store::KeyValue;
use crate::store::Record;

pub(crate) const EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("kv_events");
pub(crate) const OLD: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("kv_old");

/// What a change did to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

impl EventKind {
    fn code(self) -> u8 {
        match self {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(EventKind::Put),
            1 => Some(EventKind::Delete),
            _ => None,
        }
    }
}

/// One change to one key, as a watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// A put: the key's new version. A delete: the key, with `mod_revision` the delete's revision
    /// and every other field zero (as etcd sends it).
    pub kv: KeyValue,
    /// The version the change replaced, if there was one (and it is not compacted away).
    pub prev_kv: Option<KeyValue>,
}

/// The changes one revision made, in the order its request made them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    pub revision: i64,
    pub events: Vec<Arc<Event>>,
}

fn corrupt(what: String) -> StateMachineError {
    StateMachineError::Io(io::Error::new(io::ErrorKind::InvalidData, what))
}

pub(crate) fn event_row(kind: EventKind, prev_mod: i64, key: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(9 + key.len());
    row.push(kind.code());
    row.extend_from_slice(&prev_mod.to_le_bytes());
    row.extend_from_slice(key);
    row
}

/// `(kind, prev_mod, key)` of an event row.
pub(crate) fn parse_event(row: &[u8]) -> Result<(EventKind, i64, &[u8]), StateMachineError> {
    let kind = row.first().and_then(|&c| EventKind::from_code(c));
    let prev = row.get(1..9).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes);
    match (kind, prev) {
        (Some(kind), Some(prev)) => Ok((kind, prev, &row[9..])),
        _ => Err(corrupt(format!("kv_events row of {} bytes does not parse", row.len()))),
    }
}

pub(crate) fn old_row(end: i64, record: &Record) -> Vec<u8> {
    let mut row = end.to_le_bytes().to_vec();
    row.extend_from_slice(&record.encode());
    row
}

/// `(end, record)` of a `kv_old` row.
pub(crate) fn parse_old(row: &[u8]) -> Result<(i64, Record), StateMachineError> {
    let end = row.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes);
    match end {
        Some(end) => Ok((end, Record::decode(&row[8..]).map_err(StateMachineError::Io)?)),
        None => Err(corrupt(format!("kv_old row of {} bytes does not parse", row.len()))),
    }
}

fn rev_key(revision: i64) -> u64 {
    revision.max(0) as u64
}

/// Records a write's changes to history; one per apply of a request (one revision).
pub(crate) struct Recorder<'a, 't> {
    pub events: &'a mut Table<'t, (u64, u32), &'static [u8]>,
    pub old: &'a mut Table<'t, (&'static [u8], u64), &'static [u8]>,
    revision: i64,
    /// The keys this revision changed so far, with their event's `sub` and `prev_mod`: a key
    /// changed twice in one revision (a txn) is one event, the last change, replacing the first
    /// version (which no revision ever shows).
    touched: Vec<(Vec<u8>, u32, i64)>,
    /// The events, for the watchers, when someone is watching.
    pub collected: Option<Vec<Arc<Event>>>,
}

impl<'a, 't> Recorder<'a, 't> {
    pub fn new(
        events: &'a mut Table<'t, (u64, u32), &'static [u8]>,
        old: &'a mut Table<'t, (&'static [u8], u64), &'static [u8]>,
        revision: i64,
        collect: bool,
    ) -> Self {
        Self { events, old, revision, touched: Vec::new(), collected: collect.then(Vec::new) }
    }

    /// Records that `key` was put (`now` its new version) or deleted (`now` None), replacing
    /// `prev`.
    pub fn change(
        &mut self,
        key: &[u8],
        prev: Option<&Record>,
        now: Option<&Record>,
    ) -> Result<(), StateMachineError> {
        let kind = if now.is_some() { EventKind::Put } else { EventKind::Delete };
        let earlier = self.touched.iter().position(|(k, _, _)| k == key);
        let (sub, prev_mod) = match earlier {
            // Changed again in this revision: the version it replaces was never visible.
            Some(i) => (self.touched[i].1, self.touched[i].2),
            None => {
                let prev_mod = prev.map_or(0, |p| p.mod_revision);
                if let Some(p) = prev {
                    self.old.insert((key, rev_key(p.mod_revision)), old_row(self.revision, p).as_slice())?;
                }
                let sub = self.touched.len() as u32;
                self.touched.push((key.to_vec(), sub, prev_mod));
                (sub, prev_mod)
            }
        };
        self.events.insert((rev_key(self.revision), sub), event_row(kind, prev_mod, key).as_slice())?;
        if let Some(collected) = &mut self.collected {
            let kv = match now {
                Some(r) => r.clone().into_kv(key.to_vec(), false),
                None => KeyValue { key: key.to_vec(), mod_revision: self.revision, ..KeyValue::default() },
            };
            let prev_kv = if earlier.is_some() {
                // The first change's prev_kv is the one that stands.
                collected.iter().find(|e| e.kv.key == key).and_then(|e| e.prev_kv.clone())
            } else {
                prev.map(|p| p.clone().into_kv(key.to_vec(), false))
            };
            let event = Arc::new(Event { kind, kv, prev_kv });
            match collected.iter().position(|e| e.kv.key == key) {
                Some(i) => collected[i] = event,
                None => collected.push(event),
            }
        }
        Ok(())
    }
}

/// The version of `key` that was current at revision `at`, from `kv_old` (the caller has
/// already ruled out the current version in `kv`).
pub(crate) fn old_version_at<T: ReadableTable<(&'static [u8], u64), &'static [u8]>>(
    old: &T,
    key: &[u8],
    at: i64,
) -> Result<Option<Record>, StateMachineError> {
    let mut rows = old.range::<(&[u8], u64)>((key, 0)..=(key, rev_key(at)))?;
    match rows.next_back() {
        Some(row) => {
            let (_, v) = row?;
            let (end, record) = parse_old(v.value())?;
            Ok((end > at).then_some(record))
        }
        None => Ok(None),
    }
}

/// Reads whole revisions of events from `from` on, stopping after the revision in which the
/// count reaches `max_events`; answers them and the last revision read (`from - 1` if none).
/// `with_prev` also looks up each event's replaced version.
pub fn read_events(
    txn: &ReadTransaction,
    from: i64,
    max_events: usize,
    with_prev: bool,
) -> Result<(Vec<Revision>, i64), StateMachineError> {
    let current = crate::store::revision(txn)?;
    let (events, old, kv) =
        match (txn.open_table(EVENTS), txn.open_table(OLD), txn.open_table(crate::store::KV)) {
            (Ok(e), Ok(o), Ok(k)) => (e, o, k),
            _ => return Ok((Vec::new(), current)), // nothing ever written
        };
    let mut out: Vec<Revision> = Vec::new();
    let mut truncated = false;
    for (count, row) in events.range::<(u64, u32)>((rev_key(from), 0)..)?.enumerate() {
        let (k, v) = row?;
        let rev = k.value().0 as i64;
        if count >= max_events && out.last().is_some_and(|r| r.revision != rev) {
            truncated = true;
            break;
        }
        let (kind, prev_mod, key) = parse_event(v.value())?;
        let kv_now = match kind {
            EventKind::Delete => KeyValue { key: key.to_vec(), mod_revision: rev, ..KeyValue::default() },
            EventKind::Put => put_version(&kv, &old, key, rev)?.into_kv(key.to_vec(), false),
        };
        let prev_kv = if with_prev && prev_mod > 0 {
            match old.get((key, rev_key(prev_mod)))? {
                Some(r) => Some(parse_old(r.value())?.1.into_kv(key.to_vec(), false)),
                None => None, // compacted away
            }
        } else {
            None
        };
        let event = Arc::new(Event { kind, kv: kv_now, prev_kv });
        match out.last_mut() {
            Some(r) if r.revision == rev => r.events.push(event),
            _ => out.push(Revision { revision: rev, events: vec![event] }),
        }
    }
    // Not cut short: every revision up to the current one has been read.
    let last = match out.last() {
        Some(r) if truncated => r.revision,
        _ => current.max(from - 1),
    };
    Ok((out, last))
}

/// The version a put at `rev` wrote: current in `kv`, or replaced since and in `kv_old`.
fn put_version<K, O>(kv: &K, old: &O, key: &[u8], rev: i64) -> Result<Record, StateMachineError>
where
    K: ReadableTable<&'static [u8], &'static [u8]>,
    O: ReadableTable<(&'static [u8], u64), &'static [u8]>,
{
    if let Some(r) = kv.get(key)? {
        let record = Record::decode(r.value()).map_err(StateMachineError::Io)?;
        if record.mod_revision == rev {
            return Ok(record);
        }
    }
    match old.get((key, rev_key(rev)))? {
        Some(r) => Ok(parse_old(r.value())?.1),
        None => Err(corrupt(format!(
            "history: the put of {:?} at revision {rev} has no version",
            String::from_utf8_lossy(key)
        ))),
    }
}

/// How far a node's physical compaction has gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactProgress {
    /// The compaction revision recorded through Raft.
    pub target: i64,
    /// Up to which revision history has been physically removed on this node.
    pub physical: i64,
}

impl CompactProgress {
    pub fn done(&self) -> bool {
        self.physical >= self.target
    }
}

/// One bounded step of physical compaction: removes at most `max_events` events below the
/// compaction revision and the versions they ended; answers the progress after it.
pub fn compact_step(txn: &WriteTransaction, max_events: usize) -> Result<CompactProgress, StateMachineError> {
    let mut meta = txn.open_table(crate::store::META)?;
    let target = meta.get(crate::store::COMPACT_REVISION)?.map_or(0, |v| v.value());
    let physical = meta.get(crate::store::COMPACT_PHYSICAL)?.map_or(0, |v| v.value());
    if physical >= target {
        return Ok(CompactProgress { target, physical });
    }
    let mut events = txn.open_table(EVENTS)?;
    let mut old = txn.open_table(OLD)?;
    // Events below `target` go, with the versions they replaced. Events at `target` stay (a
    // watch from `target` replays them), but the versions they replaced end at `target` and go:
    // those are walked from a cursor, since the events stay.
    let cursor_at = meta.get(crate::store::COMPACT_CURSOR_AT)?.map_or(0, |v| v.value());
    let at_target = match cursor_at == target {
        true => meta.get(crate::store::COMPACT_CURSOR)?.map_or(0, |v| v.value()) as u32,
        false => 0, // a cursor left by an earlier target
    };
    let mut below: Vec<((u64, u32), i64, Vec<u8>)> = Vec::new();
    if at_target == 0 {
        for row in events.range::<(u64, u32)>(..(rev_key(target), 0))? {
            let (k, v) = row?;
            let (_, prev_mod, key) = parse_event(v.value())?;
            below.push((k.value(), prev_mod, key.to_vec()));
            if below.len() >= max_events {
                break;
            }
        }
    }
    let mut room = max_events - below.len();
    let mut replaced: Vec<(i64, Vec<u8>)> = below.iter().map(|(_, p, k)| (*p, k.clone())).collect();
    let mut cursor = at_target;
    let mut finished = false;
    if room > 0 {
        let mut rows =
            events.range::<(u64, u32)>((rev_key(target), at_target)..=(rev_key(target), u32::MAX))?;
        loop {
            if room == 0 {
                break;
            }
            let Some(row) = rows.next() else {
                finished = true;
                break;
            };
            let (k, v) = row?;
            let (_, prev_mod, key) = parse_event(v.value())?;
            replaced.push((prev_mod, key.to_vec()));
            cursor = k.value().1.saturating_add(1);
            room -= 1;
        }
    }
    for (prev_mod, key) in &replaced {
        if *prev_mod > 0 {
            old.remove((key.as_slice(), rev_key(*prev_mod)))?;
        }
    }
    for (k, _, _) in &below {
        events.remove(*k)?;
    }
    let physical = if finished { target } else { physical };
    meta.insert(crate::store::COMPACT_CURSOR, if finished { 0 } else { i64::from(cursor) })?;
    meta.insert(crate::store::COMPACT_CURSOR_AT, target)?;
    meta.insert(crate::store::COMPACT_PHYSICAL, physical)?;
    Ok(CompactProgress { target, physical })
}

/// The compaction progress in `txn`.
pub fn compact_progress(txn: &ReadTransaction) -> Result<CompactProgress, StateMachineError> {
    match txn.open_table(crate::store::META) {
        Ok(meta) => Ok(CompactProgress {
            target: meta.get(crate::store::COMPACT_REVISION)?.map_or(0, |v| v.value()),
            physical: meta.get(crate::store::COMPACT_PHYSICAL)?.map_or(0, |v| v.value()),
        }),
        Err(keel::redb::TableError::TableDoesNotExist(_)) => Ok(CompactProgress { target: 0, physical: 0 }),
        Err(e) => Err(e.into()),
    }
}
