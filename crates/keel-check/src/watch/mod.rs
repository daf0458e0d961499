//! The watch checker: decides whether what etcd-style watchers received is what etcd's watch API
//! promises, given the writes clients made, and names the watcher, revision and key of every broken
//! promise.
//!
//! A runner records, as JSON lines ([`WatchHistory`]): every write with its outcome (ok with the
//! revision the server answered, failed, or unknown); each watch stream a watcher opened (range,
//! start revision, filters, prev_kv) and every response it received; and, once the faults are
//! healed and the watchers had time to catch up, the cluster's revision. [`check_watch`] then checks:
//!
//! - per watcher, across its reconnects (`stream`): **ordered** (revisions never go back),
//!   **unique** (no (revision, key) twice), **atomic** (a revision's events in one response),
//!   **bookmarkable** (nothing at or below a progress notification's revision after it),
//!   **resumable** (nothing before a stream's start revision), **filtered** (only keys in range,
//!   only types not filtered out);
//! - against the merged history of every event known to have happened (acknowledged writes and
//!   all deliveries), **consistent**: each delivered event agrees with the acknowledged write of
//!   its revision and key and with every other watcher's, its value was written by a write that may
//!   have taken effect (unknown outcomes may or may not show up, but only once and at one
//!   revision), and its version and create revision follow on from the key's previous event;
//! - **reliable**: each stream delivered every known event of its range between its start revision
//!   and the last revision it observed (its last event or progress notification), and by the end
//!   every watcher caught up;
//! - **prev_kv**, where asked for: the key's state just before the event.
//!
//! Like the linearizability checks, it relies on the runner writing each value at most once per
//! key: a value written twice cannot be traced to one write, and is not.
//!
//! # Layout
//!
//! - [`history`]: the JSON-lines format, its reader (errors name the line) and writer
//! - `index`: each watcher's streams, the span of revisions each observed, who wrote each value
//! - `merged`: the merged event history and the consistency checks made while building it
//! - `stream`: the per-watcher checks
//! - `reliable`: missing events, and watchers that never caught up
//! - `prev_kv`: the previous key-values
//! - [`violation`]: what a finding says

pub mod history;
mod index;
mod merged;
mod prev_kv;
mod reliable;
mod stream;
pub mod violation;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

pub use history::{
    EndRecord, Event, EventType, Filter, InvalidRecord, InvalidWatchHistory, KeyValue, Revision,
    StreamClosed, WatchHistory, WatchHistoryError, WatchRecord, WatchResponse, WatchStart, WatchWriteError,
    WriteOp, WriteRecord,
};
pub use violation::{Finding, Guarantee, Seen, WatchViolation, Witness};

use crate::history::Outcome;
use index::Indexed;

/// At most this many violations of each guarantee are printed (all are in the JSON report).
const SHOWN_PER_GUARANTEE: usize = 20;

/// Counts over a watch history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WatchSummary {
    pub writes: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub unknown: usize,
    pub watchers: usize,
    /// Watch streams opened (a watcher's first, and each reconnect).
    pub streams: usize,
    pub responses: usize,
    /// Events delivered, over all watchers.
    pub events: usize,
    pub progress_notifications: usize,
    /// Streams the server canceled because their start revision was compacted.
    pub compacted: usize,
    /// Distinct (revision, key) events known from the writes and the deliveries.
    pub known_events: usize,
    /// Of the known events, how many were written by writes of unknown outcome.
    pub unknown_writes_seen: usize,
    /// The cluster's revision at the end, if recorded.
    pub end_revision: Option<Revision>,
}

/// The answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchVerdict {
    Valid,
    Invalid,
}

impl fmt::Display for WatchVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WatchVerdict::Valid => "WATCH VALID",
            WatchVerdict::Invalid => "WATCH INVALID",
        })
    }
}

/// Everything the watch checks found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchReport {
    pub summary: WatchSummary,
    /// Sorted by guarantee, watcher, revision, key.
    pub violations: Vec<WatchViolation>,
    pub verdict: WatchVerdict,
}

impl WatchReport {
    /// The number of violations of each guarantee broken.
    pub fn counts(&self) -> BTreeMap<Guarantee, usize> {
        let mut out = BTreeMap::new();
        for v in &self.violations {
            *out.entry(v.guarantee).or_insert(0) += 1;
        }
        out
    }
}

/// Runs every watch check.
pub fn check_watch(history: &WatchHistory) -> Result<WatchReport, InvalidWatchHistory> {
    history.validate()?;
    let index = Indexed::new(history);
    let mut violations = Vec::new();
    stream::check_watchers(&index, &mut violations);
    let merged = merged::merge(&index, &mut violations);
    reliable::check_reliable(&index, &merged, &mut violations);
    prev_kv::check_prev_kv(&index, &merged, &mut violations);
    violations.sort_by(|a, b| {
        (a.guarantee, a.watcher, a.revision, &a.key, a.record).cmp(&(
            b.guarantee,
            b.watcher,
            b.revision,
            &b.key,
            b.record,
        ))
    });
    let verdict = if violations.is_empty() { WatchVerdict::Valid } else { WatchVerdict::Invalid };
    Ok(WatchReport { summary: summary(&index, &merged), violations, verdict })
}

fn summary(index: &Indexed<'_>, merged: &merged::Merged<'_>) -> WatchSummary {
    let mut s = WatchSummary {
        writes: index.writes.len(),
        watchers: index.watchers.len(),
        streams: index.streams.len(),
        known_events: merged.events.len(),
        end_revision: index.end,
        ..WatchSummary::default()
    };
    for (_, w) in &index.writes {
        match w.outcome {
            Outcome::Ok => s.acknowledged += 1,
            Outcome::Fail => s.failed += 1,
            Outcome::Unknown => s.unknown += 1,
        }
    }
    for stream in &index.streams {
        for (_, r) in &stream.responses {
            s.responses += 1;
            s.events += r.events.len();
            s.progress_notifications += usize::from(r.is_progress_notify());
            s.compacted += usize::from(r.canceled && r.compact_revision > 0);
        }
    }
    let unknown_seen: BTreeSet<(&str, &str)> = merged
        .events
        .iter()
        .filter(|(_, k)| matches!(k.witness, Witness::Watcher { .. }))
        .filter_map(|((_, key), k)| Some((*key, k.value?)))
        .filter(|&(key, value)| {
            index.effective_writers(key, value).iter().any(|&i| index.write(i).outcome == Outcome::Unknown)
        })
        .collect();
    s.unknown_writes_seen = unknown_seen.len();
    s
}

impl fmt::Display for WatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        writeln!(
            f,
            "writes: {} ({} acknowledged, {} failed, {} unknown, {} of the unknown ones delivered)",
            s.writes, s.acknowledged, s.failed, s.unknown, s.unknown_writes_seen
        )?;
        writeln!(
            f,
            "watchers: {}, streams {}, responses {}, events {}, progress notifications {}, compacted {}; {} distinct events known{}",
            s.watchers,
            s.streams,
            s.responses,
            s.events,
            s.progress_notifications,
            s.compacted,
            s.known_events,
            match s.end_revision {
                Some(r) => format!("; end at revision {r}"),
                None => "; no end record (catching up not checked)".to_owned(),
            }
        )?;
        let counts = self.counts();
        if counts.is_empty() {
            writeln!(f, "violations: none")?;
        } else {
            let list: Vec<String> = counts.iter().map(|(g, n)| format!("{g} {n}")).collect();
            writeln!(f, "violations: {}", list.join(", "))?;
        }
        for (&guarantee, &n) in &counts {
            for v in self.violations.iter().filter(|v| v.guarantee == guarantee).take(SHOWN_PER_GUARANTEE) {
                writeln!(f, "  {v}")?;
            }
            if n > SHOWN_PER_GUARANTEE {
                writeln!(
                    f,
                    "  ... and {} more {guarantee} violations (all in --json)",
                    n - SHOWN_PER_GUARANTEE
                )?;
            }
        }
        writeln!(f, "verdict: {}", self.verdict)
    }
}
