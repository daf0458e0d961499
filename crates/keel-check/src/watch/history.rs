//! The watch history format: one JSON object per line, tagged by `"kind"`: the writes clients made
//! (with the revision the server answered), each watch stream a watcher opened, every response it
//! received, why a stream ended, and the cluster's revision once the run healed. The reader (with
//! line numbers in its errors) and the writer.
//!
//! ```text
//! {"kind":"write","client":3,"op":"put","key":"k1","value":"c3-17","outcome":"ok","revision":42}
//! {"kind":"write","client":4,"op":"put","key":"k2","value":"c4-9","outcome":"unknown"}
//! {"kind":"watch","watcher":1,"key":"k","range_end":"l","start_revision":1,"prev_kv":true,"node":"10.99.1.1:2379"}
//! {"kind":"response","watcher":1,"revision":41,"created":true}
//! {"kind":"response","watcher":1,"revision":42,"events":[{"type":"put","key":"k1","value":"c3-17","mod_revision":42,"create_revision":40,"version":2,"prev_kv":{"key":"k1","value":"c1-2","mod_revision":40,"create_revision":40,"version":1}}]}
//! {"kind":"closed","watcher":1,"reason":"transport error"}
//! {"kind":"watch","watcher":1,"key":"k","range_end":"l","start_revision":43,"prev_kv":true,"node":"10.99.1.2:2379"}
//! {"kind":"response","watcher":1,"revision":57}
//! {"kind":"end","revision":57}
//! ```
//!
//! Lines of different watchers may interleave; the lines of one watcher must be in the order it
//! opened its streams and received their responses: a response belongs to the watcher's latest
//! `watch` line. Writes may be anywhere.

use std::fmt;
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::history::Outcome;

/// An etcd store revision.
pub type Revision = i64;

/// One line of a watch history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WatchRecord {
    /// A write a client attempted.
    Write(WriteRecord),
    /// A watcher opened a watch stream: the first, or a reconnect.
    Watch(WatchStart),
    /// A response the watcher's current stream delivered.
    Response(WatchResponse),
    /// The watcher's current stream ended (error, cancel, end of run). Informational: the next
    /// `watch` line of the watcher starts a new stream either way.
    Closed(StreamClosed),
    /// Written once, after the faults were healed and the watchers given time to catch up: the
    /// cluster's revision then. Every watcher must by then have delivered every event in its range
    /// up to it.
    End(EndRecord),
}

/// What a write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteOp {
    /// A put, or the put of a transaction (an etcd Txn whose compare succeeded).
    Put,
    /// A delete of one key that existed (a delete of an absent key makes no revision: record it as
    /// `fail`).
    Delete,
}

/// A write some client attempted, and what it knows of its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRecord {
    pub client: u64,
    pub op: WriteOp,
    pub key: String,
    /// put: the value written (required); delete: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// ok: took effect at `revision`; fail: certainly did not take effect (a failed compare);
    /// unknown: took effect at some revision, or never.
    pub outcome: Outcome,
    /// ok only, required: the revision of the server's answer, the write's own revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
}

/// An etcd watch filter: events of that type are not delivered to the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    NoPut,
    NoDelete,
}

/// A watch stream opened by a watcher: the create request it sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchStart {
    pub watcher: u64,
    /// The watched key, or the start of the watched range.
    pub key: String,
    /// etcd's `range_end`: empty = `key` alone; `"\u0000"` = every key from `key` on; otherwise the
    /// range `[key, range_end)` (a prefix `p` is `[p, p with its last byte + 1)`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub range_end: String,
    /// The first revision to deliver; 0 = from the revision after the `created` response's header.
    pub start_revision: Revision,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Whether each event should carry the key's previous state.
    #[serde(default, skip_serializing_if = "is_false")]
    pub prev_kv: bool,
    /// Whether periodic progress notifications were asked for (informational).
    #[serde(default, skip_serializing_if = "is_false")]
    pub progress_notify: bool,
    /// The member the stream went to (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When it was sent, microseconds on the run's clock (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<u64>,
}

/// One response of a watch stream, as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchResponse {
    pub watcher: u64,
    /// The response header's revision.
    pub revision: Revision,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
    /// The response that acknowledged the create request.
    #[serde(default, skip_serializing_if = "is_false")]
    pub created: bool,
    /// The server closed the watch (the stream is over).
    #[serde(default, skip_serializing_if = "is_false")]
    pub canceled: bool,
    /// Canceled because `start_revision` was compacted: the oldest revision still available.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compact_revision: Revision,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cancel_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<u64>,
}

impl WatchResponse {
    /// A progress notification: no events and nothing else to say (as etcd's client decides),
    /// which promises that every event up to `revision` has been delivered.
    pub fn is_progress_notify(&self) -> bool {
        self.events.is_empty() && !self.created && !self.canceled && self.compact_revision == 0
    }
}

/// The type of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Put,
    Delete,
}

/// One event of a watch response: etcd's `mvccpb.Event`, keys and values as UTF-8 strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub key: String,
    /// put: the value written (required); delete: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The event's revision (for a delete, the deleting revision).
    pub mod_revision: Revision,
    /// put: the revision that created the key (0 for a delete).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub create_revision: Revision,
    /// put: the key's version after it, 1 on creation (0 for a delete).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: i64,
    /// The key before this event, when the watch asked for it and the key existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_kv: Option<KeyValue>,
}

/// A key's state, as in `prev_kv`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub mod_revision: Revision,
    pub create_revision: Revision,
    pub version: i64,
}

/// Why a watcher's stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamClosed {
    pub watcher: u64,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<u64>,
}

/// The cluster's revision after healing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndRecord {
    pub revision: Revision,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Why a line is not a valid record, beyond being JSON of the right shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("a put needs a \"value\"")]
    PutWithoutValue,
    #[error("a delete has no \"value\"")]
    DeleteWithValue,
    #[error("an ok write needs its \"revision\" (> 0)")]
    OkWithoutRevision,
    #[error("only an ok write has a \"revision\"")]
    RevisionNotOk,
    #[error("a response of watcher {watcher}, which has opened no stream before it")]
    ResponseWithoutWatch { watcher: u64 },
    #[error("a put event needs a \"value\"")]
    PutEventWithoutValue,
    #[error("a delete event has no \"value\"")]
    DeleteEventWithValue,
    #[error("a watch with a negative start_revision {0}")]
    NegativeStart(Revision),
    #[error("a second \"end\" record")]
    SecondEnd,
}

impl WatchRecord {
    /// Checks the fields of the record on its own.
    pub fn validate(&self) -> Result<(), InvalidRecord> {
        match self {
            WatchRecord::Write(w) => {
                match (w.op, &w.value) {
                    (WriteOp::Put, None) => return Err(InvalidRecord::PutWithoutValue),
                    (WriteOp::Delete, Some(_)) => return Err(InvalidRecord::DeleteWithValue),
                    _ => {}
                }
                match (w.outcome, w.revision) {
                    (Outcome::Ok, None) => Err(InvalidRecord::OkWithoutRevision),
                    (Outcome::Ok, Some(r)) if r <= 0 => Err(InvalidRecord::OkWithoutRevision),
                    (Outcome::Fail | Outcome::Unknown, Some(_)) => Err(InvalidRecord::RevisionNotOk),
                    _ => Ok(()),
                }
            }
            WatchRecord::Watch(w) if w.start_revision < 0 => {
                Err(InvalidRecord::NegativeStart(w.start_revision))
            }
            WatchRecord::Response(r) => {
                for e in &r.events {
                    match (e.kind, &e.value) {
                        (EventType::Put, None) => return Err(InvalidRecord::PutEventWithoutValue),
                        (EventType::Delete, Some(_)) => return Err(InvalidRecord::DeleteEventWithValue),
                        _ => {}
                    }
                }
                Ok(())
            }
            WatchRecord::Watch(_) | WatchRecord::Closed(_) | WatchRecord::End(_) => Ok(()),
        }
    }
}

/// A whole watch history, its records in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchHistory {
    pub records: Vec<WatchRecord>,
}

/// Why a watch history could not be read. `line` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum WatchHistoryError {
    #[error("line {line}: {source}")]
    Io { line: usize, source: std::io::Error },
    #[error("line {line}: not a valid watch record: {source}")]
    Json { line: usize, source: serde_json::Error },
    #[error("line {line}: {source}")]
    Invalid { line: usize, source: InvalidRecord },
}

/// A record the checks cannot work on, by its position in [`WatchHistory::records`] (0-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record #{index}: {source}")]
pub struct InvalidWatchHistory {
    pub index: usize,
    pub source: InvalidRecord,
}

impl WatchHistory {
    /// Reads JSON lines, one record per line; blank lines are skipped. Every record is validated
    /// ([`WatchRecord::validate`], and responses must follow a `watch` of their watcher); the first
    /// bad line is the error.
    pub fn read_from(mut reader: impl BufRead) -> Result<WatchHistory, WatchHistoryError> {
        let mut history = WatchHistory::default();
        let mut checker = Structure::default();
        let mut buf = String::new();
        let mut line = 0;
        loop {
            buf.clear();
            line += 1;
            let n = reader.read_line(&mut buf).map_err(|source| WatchHistoryError::Io { line, source })?;
            if n == 0 {
                return Ok(history);
            }
            let text = buf.trim();
            if text.is_empty() {
                continue;
            }
            let record: WatchRecord =
                serde_json::from_str(text).map_err(|source| WatchHistoryError::Json { line, source })?;
            checker.next(&record).map_err(|source| WatchHistoryError::Invalid { line, source })?;
            history.records.push(record);
        }
    }

    /// Writes the history in the format [`WatchHistory::read_from`] reads.
    pub fn write_to(&self, writer: impl Write) -> Result<(), WatchWriteError> {
        let mut out = std::io::BufWriter::new(writer);
        for record in &self.records {
            let mut bytes = serde_json::to_vec(record).map_err(WatchWriteError::Encode)?;
            bytes.push(b'\n');
            out.write_all(&bytes)?;
        }
        out.flush()?;
        Ok(())
    }

    /// Checks every record, as the reader does.
    pub fn validate(&self) -> Result<(), InvalidWatchHistory> {
        let mut checker = Structure::default();
        for (index, record) in self.records.iter().enumerate() {
            checker.next(record).map_err(|source| InvalidWatchHistory { index, source })?;
        }
        Ok(())
    }
}

/// What the records so far allow next.
#[derive(Default)]
struct Structure {
    watchers: std::collections::HashSet<u64>,
    ended: bool,
}

impl Structure {
    fn next(&mut self, record: &WatchRecord) -> Result<(), InvalidRecord> {
        record.validate()?;
        match record {
            WatchRecord::Watch(w) => {
                self.watchers.insert(w.watcher);
            }
            WatchRecord::Response(r) if !self.watchers.contains(&r.watcher) => {
                return Err(InvalidRecord::ResponseWithoutWatch { watcher: r.watcher });
            }
            WatchRecord::End(_) if self.ended => return Err(InvalidRecord::SecondEnd),
            WatchRecord::End(_) => self.ended = true,
            _ => {}
        }
        Ok(())
    }
}

/// Why a watch history could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WatchWriteError {
    #[error("writing the watch history: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding a watch record: {0}")]
    Encode(#[source] serde_json::Error),
}

/// `PUT "k1" = "v"` / `DELETE "k1"`: an event's effect, for reports.
pub(crate) struct Effect<'a> {
    pub(crate) kind: EventType,
    pub(crate) key: &'a str,
    pub(crate) value: Option<&'a str>,
}

impl fmt::Display for Effect<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.value) {
            (EventType::Put, Some(v)) => write!(f, "PUT {:?} = {v:?}", self.key),
            (EventType::Put, None) => write!(f, "PUT {:?}", self.key),
            (EventType::Delete, _) => write!(f, "DELETE {:?}", self.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_reads_and_round_trips() {
        let text = r#"
{"kind":"write","client":3,"op":"put","key":"k1","value":"c3-17","outcome":"ok","revision":42}
{"kind":"write","client":4,"op":"put","key":"k2","value":"c4-9","outcome":"unknown"}
{"kind":"watch","watcher":1,"key":"k","range_end":"l","start_revision":1,"prev_kv":true,"node":"10.99.1.1:2379"}
{"kind":"response","watcher":1,"revision":41,"created":true}
{"kind":"response","watcher":1,"revision":42,"events":[{"type":"put","key":"k1","value":"c3-17","mod_revision":42,"create_revision":40,"version":2,"prev_kv":{"key":"k1","value":"c1-2","mod_revision":40,"create_revision":40,"version":1}}]}
{"kind":"closed","watcher":1,"reason":"transport error"}
{"kind":"watch","watcher":1,"key":"k","range_end":"l","start_revision":43,"prev_kv":true,"node":"10.99.1.2:2379"}
{"kind":"response","watcher":1,"revision":57}
{"kind":"end","revision":57}
"#;
        let h = WatchHistory::read_from(text.as_bytes()).expect("valid");
        assert_eq!(h.records.len(), 9);
        let WatchRecord::Response(r) = &h.records[4] else { panic!("a response: {:?}", h.records[4]) };
        assert_eq!(r.events[0].prev_kv.as_ref().map(|p| p.mod_revision), Some(40));
        assert!(!r.is_progress_notify());
        let WatchRecord::Response(p) = &h.records[7] else { panic!("a response: {:?}", h.records[7]) };
        assert!(p.is_progress_notify());
        let mut bytes = Vec::new();
        h.write_to(&mut bytes).expect("in memory");
        assert_eq!(WatchHistory::read_from(bytes.as_slice()).expect("valid"), h);
    }

    #[test]
    fn bad_lines_are_named() {
        let err = |text: &str| WatchHistory::read_from(text.as_bytes()).expect_err("invalid");
        let e = err("{\"kind\":\"response\",\"watcher\":1,\"revision\":3}\n");
        assert!(matches!(
            e,
            WatchHistoryError::Invalid {
                line: 1,
                source: InvalidRecord::ResponseWithoutWatch { watcher: 1 }
            }
        ));
        let e = err("\n{\"kind\":\"write\",\"client\":1,\"op\":\"put\",\"key\":\"k\",\"value\":\"v\",\"outcome\":\"ok\"}\n");
        assert!(matches!(
            e,
            WatchHistoryError::Invalid { line: 2, source: InvalidRecord::OkWithoutRevision }
        ));
        let e = err("{\"kind\":\"write\",\"client\":1,\"op\":\"put\",\"key\":\"k\",\"value\":\"v\",\"outcome\":\"unknown\",\"revision\":4}\n");
        assert!(matches!(e, WatchHistoryError::Invalid { source: InvalidRecord::RevisionNotOk, .. }));
        let e = err("{\"kind\":\"nonsense\"}\n");
        assert!(matches!(e, WatchHistoryError::Json { line: 1, .. }));
        let e = err("{\"kind\":\"end\",\"revision\":3}\n{\"kind\":\"end\",\"revision\":4}\n");
        assert!(matches!(e, WatchHistoryError::Invalid { line: 2, source: InvalidRecord::SecondEnd }));
    }
}
