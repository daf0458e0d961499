//! What the watch checks report: one [`WatchViolation`] per broken promise, naming the watcher, the
//! revision, the key, the record that shows it and which guarantee it breaks.

use std::fmt;

use serde::Serialize;

use super::history::{Effect, EventType, Revision};

/// The etcd watch guarantee a violation breaks (etcd's API guarantees, plus the events' agreement
/// with the writes and with each other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Events are delivered in revision order, never older than one already delivered.
    Ordered,
    /// No event is delivered twice to one watcher.
    Unique,
    /// All events of one revision come in one response.
    Atomic,
    /// After a progress notification at revision P, no event of revision ≤ P comes.
    Bookmarkable,
    /// A stream delivers nothing before its start revision, so a watcher resumes from its last
    /// revision + 1 without duplicates.
    Resumable,
    /// Only keys in the watched range, only event types not filtered out.
    Filtered,
    /// No event missing between a stream's start revision and the last revision it observed; and
    /// by the end of the run every watcher caught up.
    Reliable,
    /// Events agree with the acknowledged writes and with each other, were written by someone,
    /// and their versions and create revisions follow on from the key's previous event.
    Consistent,
    /// `prev_kv`, when asked for, is the key's state just before the event.
    PrevKv,
}

impl fmt::Display for Guarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Guarantee::Ordered => "ordered",
            Guarantee::Unique => "unique",
            Guarantee::Atomic => "atomic",
            Guarantee::Bookmarkable => "bookmarkable",
            Guarantee::Resumable => "resumable",
            Guarantee::Filtered => "filtered",
            Guarantee::Reliable => "reliable",
            Guarantee::Consistent => "consistent",
            Guarantee::PrevKv => "prev_kv",
        })
    }
}

/// An event as a report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A delivered put's (create revision, version); unknown for a write no watcher delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<(Revision, i64)>,
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Effect { kind: self.kind, key: &self.key, value: self.value.as_deref() }.fmt(f)?;
        match self.meta {
            Some((create, version)) => write!(f, " (version {version}, created at {create})"),
            None => Ok(()),
        }
    }
}

/// Who showed that an event happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Witness {
    /// An acknowledged write (`record`: its index in the history's records).
    Write { record: usize, client: u64 },
    /// A watcher delivered it in the response at `record`.
    Watcher { watcher: u64, record: usize },
}

impl fmt::Display for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Witness::Write { record, client } => {
                write!(f, "acknowledged write of client {client} (record #{record})")
            }
            Witness::Watcher { watcher, record } => {
                write!(f, "delivered to watcher {watcher} (record #{record})")
            }
        }
    }
}

/// What exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Delivered after an event of the later revision `after`.
    OutOfOrder { after: Revision },
    /// An event newer than its own response's header revision.
    AboveHeader { header: Revision },
    /// Already delivered to this watcher in the response at `first_record`.
    Duplicate { first_record: usize },
    /// Other events of the same revision came in the earlier response at `first_record`.
    SplitRevision { first_record: usize },
    /// Delivered after a progress notification at `progress` (record `progress_record`).
    AfterProgress { progress: Revision, progress_record: usize },
    /// Older than the start revision of the stream opened at `stream_record`.
    BeforeStart { start: Revision, stream_record: usize },
    /// The key is outside the watched range.
    OutOfRange { range: String },
    /// The watch filters out events of this type.
    FilteredType { event: EventType },
    /// The stream opened at `stream_record` observed every revision in `from..=to` but not this
    /// event, which `witness` shows.
    Missing { event: Seen, witness: Witness, stream_record: usize, from: Revision, to: Revision },
    /// By the end of the run (cluster at `end`) the watcher had observed only up to `reached`; the
    /// event at the violation's revision, which `witness` shows, never came.
    Stalled { reached: Revision, end: Revision, event: Seen, witness: Witness },
    /// The revision was acknowledged for another write of the key.
    WrongEvent { delivered: Seen, acknowledged: Seen, write_record: usize },
    /// Another watcher delivered a different event for the same revision and key.
    Disagree { delivered: Seen, other: Seen, other_watcher: u64, other_record: usize },
    /// The value's only write was acknowledged at another revision.
    WrongRevision { value: String, acknowledged: Revision, write_record: usize },
    /// The value, written once, was also delivered for another revision.
    DeliveredTwice { value: String, other_revision: Revision },
    /// No write of the value to the key was attempted (`failed_writes` empty), or only writes
    /// that certainly failed.
    Phantom { value: String, failed_writes: Vec<usize> },
    /// Two writes of the key were acknowledged with the same revision.
    ConflictingAcks { write_record: usize, other_record: usize },
    /// The event's version or create revision does not follow from itself or from the key's
    /// previous event (at `previous`, when known).
    Metadata { problem: String, previous: Option<Revision> },
    /// `prev_kv` is wrong.
    PrevKv { problem: String },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::OutOfOrder { after } => write!(f, "delivered after an event of revision {after}"),
            Finding::AboveHeader { header } => {
                write!(f, "newer than its response's header revision {header}")
            }
            Finding::Duplicate { first_record } => {
                write!(f, "delivered twice; first in record #{first_record}")
            }
            Finding::SplitRevision { first_record } => write!(
                f,
                "the revision is split over two responses: other events of it came in record #{first_record}"
            ),
            Finding::AfterProgress { progress, progress_record } => write!(
                f,
                "delivered after a progress notification at revision {progress} (record #{progress_record})"
            ),
            Finding::BeforeStart { start, stream_record } => write!(
                f,
                "older than start revision {start} of the stream opened at record #{stream_record}"
            ),
            Finding::OutOfRange { range } => write!(f, "the key is outside the watched range {range}"),
            Finding::FilteredType { event } => {
                write!(f, "the watch filters out {} events", if *event == EventType::Put { "PUT" } else { "DELETE" })
            }
            Finding::Missing { event, witness, stream_record, from, to } => write!(
                f,
                "missing {event} ({witness}); the stream opened at record #{stream_record} observed revisions {from}..={to}"
            ),
            Finding::Stalled { reached, end, event, witness } => write!(
                f,
                "never delivered {event} ({witness}): by the end (cluster at revision {end}) the watcher had observed only up to revision {reached}"
            ),
            Finding::WrongEvent { delivered, acknowledged, write_record } => write!(
                f,
                "delivered {delivered}, but the revision was acknowledged for {acknowledged} (write record #{write_record})"
            ),
            Finding::Disagree { delivered, other, other_watcher, other_record } => write!(
                f,
                "delivered {delivered}, but watcher {other_watcher} got {other} for it (record #{other_record})"
            ),
            Finding::WrongRevision { value, acknowledged, write_record } => write!(
                f,
                "delivered {value:?}, whose only write was acknowledged at revision {acknowledged} (record #{write_record})"
            ),
            Finding::DeliveredTwice { value, other_revision } => write!(
                f,
                "delivered {value:?}, written once, which was also delivered for revision {other_revision}"
            ),
            Finding::Phantom { value, failed_writes } if failed_writes.is_empty() => {
                write!(f, "delivered {value:?}, which no client ever wrote to the key")
            }
            Finding::Phantom { value, failed_writes } => write!(
                f,
                "delivered {value:?}, written only by writes that failed (records {})",
                crate::phantom::list(failed_writes)
            ),
            Finding::ConflictingAcks { write_record, other_record } => write!(
                f,
                "writes at records #{write_record} and #{other_record} were both acknowledged at this revision"
            ),
            Finding::Metadata { problem, previous: Some(p) } => {
                write!(f, "{problem} (the key's previous event is at revision {p})")
            }
            Finding::Metadata { problem, previous: None } => f.write_str(problem),
            Finding::PrevKv { problem } => f.write_str(problem),
        }
    }
}

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchViolation {
    pub guarantee: Guarantee,
    /// `None` only for findings about the writes alone.
    pub watcher: Option<u64>,
    pub revision: Revision,
    pub key: String,
    /// The record (0-based index in the history's records) that shows it: the response with the
    /// event, or for a missing event the last response of the stream that should have had it.
    pub record: usize,
    pub finding: Finding,
}

impl fmt::Display for WatchViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.guarantee)?;
        if let Some(w) = self.watcher {
            write!(f, "watcher {w}, ")?;
        }
        write!(
            f,
            "revision {}, key {:?} (record #{}): {}",
            self.revision, self.key, self.record, self.finding
        )
    }
}
