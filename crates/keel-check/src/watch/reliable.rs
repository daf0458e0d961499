//! Reliable: no event missing. Each stream must have delivered every known event of its range and
//! filters with a revision in the span it observed (its start revision to its last event or
//! progress notification); an event is known if a write of it was acknowledged or any watcher
//! delivered it. And once the run is over (an `end` record), every watcher must have caught up
//! with every known event of its range up to the cluster's final revision.

use std::collections::HashSet;

use super::history::Revision;
use super::index::Indexed;
use super::merged::{Known, Merged};
use super::violation::{Finding, Guarantee, WatchViolation};

pub(crate) fn check_reliable(index: &Indexed<'_>, merged: &Merged<'_>, found: &mut Vec<WatchViolation>) {
    for (stream, span) in index.streams.iter().zip(&index.spans) {
        let Some(span) = *span else { continue };
        let delivered: HashSet<(Revision, &str)> = stream
            .responses
            .iter()
            .flat_map(|(_, r)| &r.events)
            .map(|e| (e.mod_revision, e.key.as_str()))
            .collect();
        for (&(rev, key), known) in merged.events.range((span.from, "")..) {
            if rev > span.to {
                break;
            }
            if stream.watches(key) && stream.delivers(known.kind) && !delivered.contains(&(rev, key)) {
                found.push(WatchViolation {
                    guarantee: Guarantee::Reliable,
                    watcher: Some(stream.watcher),
                    revision: rev,
                    key: key.to_owned(),
                    record: span.to_record,
                    finding: Finding::Missing {
                        event: known.seen(key),
                        witness: known.witness,
                        stream_record: stream.record,
                        from: span.from,
                        to: span.to,
                    },
                });
            }
        }
    }
    if let Some(end) = index.end {
        check_caught_up(index, merged, end, found);
    }
}

/// Each watcher's last stream (its range and filters) must have reached its last known event up
/// to `end`. What it observed counts from all its streams; and a last stream that started later
/// than that (a runner that skipped a compacted stretch) only owes the events from its start on.
fn check_caught_up(index: &Indexed<'_>, merged: &Merged<'_>, end: Revision, found: &mut Vec<WatchViolation>) {
    for &watcher in index.watchers.keys() {
        let Some((last, _)) = index.streams_of(watcher).last() else { continue };
        let observed = index.streams_of(watcher).filter_map(|(s, _)| s.observed_to()).max();
        let skipped = last.from().map(|from| (from - 1, last.last_record()));
        let (reached, record) = observed.max(skipped).unwrap_or((0, last.last_record()));
        let first_missed: Option<(&(Revision, &str), &Known<'_>)> = merged
            .events
            .range((reached + 1, "")..)
            .take_while(|((rev, _), _)| *rev <= end)
            .find(|((_, key), known)| last.watches(key) && last.delivers(known.kind));
        if let Some((&(rev, key), known)) = first_missed {
            found.push(WatchViolation {
                guarantee: Guarantee::Reliable,
                watcher: Some(watcher),
                revision: rev,
                key: key.to_owned(),
                record,
                finding: Finding::Stalled { reached, end, event: known.seen(key), witness: known.witness },
            });
        }
    }
}
