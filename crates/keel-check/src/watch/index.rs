//! The view of a watch history every watch check starts from: each watcher's streams with the
//! responses they delivered and the span of revisions each observed, and who wrote each value.

use std::collections::{BTreeMap, HashMap};

use super::history::{
    EventType, Filter, Revision, WatchHistory, WatchRecord, WatchResponse, WatchStart, WriteOp, WriteRecord,
};
use crate::history::Outcome;

/// One watch stream: a `watch` record and the responses of its watcher until the next one.
pub(crate) struct Stream<'h> {
    pub(crate) watcher: u64,
    /// The `watch` record's index.
    pub(crate) record: usize,
    pub(crate) request: &'h WatchStart,
    /// (record index, response), in the order received.
    pub(crate) responses: Vec<(usize, &'h WatchResponse)>,
}

/// The revisions a stream observed completely: it must have delivered every event in its range
/// with a revision in `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) from: Revision,
    pub(crate) to: Revision,
    /// The response that shows `to`: its last event, or a progress notification.
    pub(crate) to_record: usize,
}

impl Stream<'_> {
    /// The first revision the stream had to deliver: its start revision; for a watch "from now"
    /// (start 0), the revision after the `created` response's header (etcd takes the store's
    /// revision when it creates the watcher); without one, its first event (nothing is known about
    /// what came before).
    pub(crate) fn from(&self) -> Option<Revision> {
        if self.request.start_revision > 0 {
            return Some(self.request.start_revision);
        }
        let created = self.responses.iter().find(|(_, r)| r.created).map(|(_, r)| r.revision + 1);
        created.or_else(|| self.responses.iter().flat_map(|(_, r)| &r.events).map(|e| e.mod_revision).next())
    }

    /// The last revision the stream observed completely, and the record showing it: the highest of
    /// its events' revisions (all events of a revision come in one response, and none is skipped)
    /// and of its progress notifications (which promise that everything up to them was delivered).
    ///
    /// The header revision of a response with events is not used: etcd sends a watcher that is
    /// catching up its events in batches of at most 1000 revisions, each under the store's current
    /// revision, so the header does not promise that everything up to it was delivered.
    pub(crate) fn observed_to(&self) -> Option<(Revision, usize)> {
        let mut best: Option<(Revision, usize)> = None;
        for &(record, r) in &self.responses {
            let rev = if r.is_progress_notify() {
                Some(r.revision)
            } else {
                r.events.last().map(|e| e.mod_revision)
            };
            if let Some(rev) = rev {
                if best.is_none_or(|(b, _)| rev >= b) {
                    best = Some((rev, record));
                }
            }
        }
        best
    }

    /// `from..=to`, if the stream observed anything from its start on.
    pub(crate) fn span(&self) -> Option<Span> {
        let from = self.from()?;
        let (to, to_record) = self.observed_to()?;
        (to >= from).then_some(Span { from, to, to_record })
    }

    /// Whether `key` is in the watched range.
    pub(crate) fn watches(&self, key: &str) -> bool {
        in_range(self.request, key)
    }

    /// Whether events of this type pass the watch's filters.
    pub(crate) fn delivers(&self, kind: EventType) -> bool {
        let filter = match kind {
            EventType::Put => Filter::NoPut,
            EventType::Delete => Filter::NoDelete,
        };
        !self.request.filters.contains(&filter)
    }

    /// Whether the watch sees every event of its keys (no filter).
    pub(crate) fn sees_everything(&self) -> bool {
        self.request.filters.is_empty()
    }

    /// The last record of the stream: its last response, or the `watch` record itself.
    pub(crate) fn last_record(&self) -> usize {
        self.responses.last().map_or(self.record, |(i, _)| *i)
    }
}

/// Whether `key` is in the range of the watch `w` (etcd's `range_end` rules; keys compare as bytes).
pub(crate) fn in_range(w: &WatchStart, key: &str) -> bool {
    match w.range_end.as_str() {
        "" => key == w.key,
        "\0" => key >= w.key.as_str(),
        end => key >= w.key.as_str() && key < end,
    }
}

/// The watched range, for reports: `"k1"`, `["k", "l")`, `["k", ∞)`.
pub(crate) fn range_text(w: &WatchStart) -> String {
    match w.range_end.as_str() {
        "" => format!("{:?}", w.key),
        "\0" => format!("[{:?}, ∞)", w.key),
        end => format!("[{:?}, {end:?})", w.key),
    }
}

pub(crate) struct Indexed<'h> {
    pub(crate) history: &'h WatchHistory,
    /// Every stream, in the order opened.
    pub(crate) streams: Vec<Stream<'h>>,
    /// `spans[i]` is `streams[i].span()`.
    pub(crate) spans: Vec<Option<Span>>,
    /// Each watcher's streams (indices into `streams`), in the order opened.
    pub(crate) watchers: BTreeMap<u64, Vec<usize>>,
    /// (record index, write) for every write record.
    pub(crate) writes: Vec<(usize, &'h WriteRecord)>,
    /// Per key, per value: the record indices of every put of it, whatever its outcome.
    pub(crate) writers: HashMap<&'h str, HashMap<&'h str, Vec<usize>>>,
    /// The cluster's revision at the end, if recorded.
    pub(crate) end: Option<Revision>,
}

impl<'h> Indexed<'h> {
    /// Indexes a history that passed [`WatchHistory::validate`].
    pub(crate) fn new(history: &'h WatchHistory) -> Indexed<'h> {
        let mut streams: Vec<Stream<'h>> = Vec::new();
        let mut watchers: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut writes = Vec::new();
        let mut writers: HashMap<&str, HashMap<&str, Vec<usize>>> = HashMap::new();
        let mut end = None;
        for (i, record) in history.records.iter().enumerate() {
            match record {
                WatchRecord::Write(w) => {
                    writes.push((i, w));
                    if let (WriteOp::Put, Some(v)) = (w.op, &w.value) {
                        writers.entry(w.key.as_str()).or_default().entry(v.as_str()).or_default().push(i);
                    }
                }
                WatchRecord::Watch(w) => {
                    watchers.entry(w.watcher).or_default().push(streams.len());
                    streams.push(Stream { watcher: w.watcher, record: i, request: w, responses: Vec::new() });
                }
                WatchRecord::Response(r) => {
                    // Validation guarantees a preceding `watch` of the watcher.
                    if let Some(&s) = watchers.get(&r.watcher).and_then(|s| s.last()) {
                        streams[s].responses.push((i, r));
                    }
                }
                WatchRecord::End(e) => end = Some(e.revision),
                WatchRecord::Closed(_) => {}
            }
        }
        let spans = streams.iter().map(Stream::span).collect();
        Indexed { history, streams, spans, watchers, writes, writers, end }
    }

    pub(crate) fn write(&self, record: usize) -> &'h WriteRecord {
        match &self.history.records[record] {
            WatchRecord::Write(w) => w,
            other => unreachable!("record #{record} is indexed as a write but is {other:?}"),
        }
    }

    /// The puts of `value` to `key` that may have taken effect (ok or unknown).
    pub(crate) fn effective_writers(&self, key: &str, value: &str) -> Vec<usize> {
        self.writers_of(key, value)
            .iter()
            .copied()
            .filter(|&i| self.write(i).outcome != Outcome::Fail)
            .collect()
    }

    /// The puts of `value` to `key` that certainly failed.
    pub(crate) fn failed_writers(&self, key: &str, value: &str) -> Vec<usize> {
        self.writers_of(key, value)
            .iter()
            .copied()
            .filter(|&i| self.write(i).outcome == Outcome::Fail)
            .collect()
    }

    fn writers_of(&self, key: &str, value: &str) -> &[usize] {
        self.writers.get(key).and_then(|values| values.get(value)).map_or(&[], Vec::as_slice)
    }

    /// The streams of `watcher` with their spans, in the order opened.
    pub(crate) fn streams_of(&self, watcher: u64) -> impl Iterator<Item = (&Stream<'h>, Option<Span>)> {
        self.watchers.get(&watcher).into_iter().flatten().map(|&s| (&self.streams[s], self.spans[s]))
    }

    /// Whether some stream observed every event of `key` in `from..=to`: then no event of the key
    /// in between can be unknown.
    pub(crate) fn observed_all_of(&self, key: &str, from: Revision, to: Revision) -> bool {
        self.streams.iter().zip(&self.spans).any(|(s, span)| {
            s.watches(key) && s.sees_everything() && span.is_some_and(|sp| sp.from <= from && sp.to >= to)
        })
    }
}
