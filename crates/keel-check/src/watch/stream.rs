//! The checks of one watcher's deliveries on their own, over all its streams in order: ordered,
//! unique, atomic, bookmarkable, resumable (nothing before a stream's start revision) and filtered.
//!
//! A watcher that reconnects resumes from the revision after the last one it observed, so its
//! guarantees span reconnects: what it got before a stream starting at S still counts for the
//! revisions below S. A stream may rightly deliver again what an earlier one delivered at S or
//! later (a runner that resumed too early), so that is forgotten when it starts; and a stream
//! watching "from now" (start 0) is a new watch altogether.

use std::collections::HashMap;

use super::history::Revision;
use super::index::{range_text, Indexed};
use super::violation::{Finding, Guarantee, WatchViolation};

pub(crate) fn check_watchers(index: &Indexed<'_>, found: &mut Vec<WatchViolation>) {
    for &watcher in index.watchers.keys() {
        check_watcher(index, watcher, found);
    }
}

fn check_watcher(index: &Indexed<'_>, watcher: u64, found: &mut Vec<WatchViolation>) {
    // (revision, key) -> the response that first delivered it.
    let mut delivered: HashMap<(Revision, &str), usize> = HashMap::new();
    // The newest event delivered so far and its response.
    let mut last: Option<(Revision, usize)> = None;
    // The newest progress notification so far and its response.
    let mut progress: Option<(Revision, usize)> = None;
    for (stream, _) in index.streams_of(watcher) {
        let request = stream.request;
        let start = request.start_revision;
        if start == 0 {
            delivered.clear();
            last = None;
            progress = None;
        } else {
            delivered.retain(|&(rev, _), _| rev < start);
            last = last.filter(|&(l, _)| l < start);
            progress = progress.filter(|&(p, _)| p < start);
        }
        for &(record, resp) in &stream.responses {
            if resp.is_progress_notify() {
                if progress.is_none_or(|(p, _)| resp.revision > p) {
                    progress = Some((resp.revision, record));
                }
                continue;
            }
            for e in &resp.events {
                let rev = e.mod_revision;
                let mut report = |guarantee, finding| {
                    found.push(WatchViolation {
                        guarantee,
                        watcher: Some(watcher),
                        revision: rev,
                        key: e.key.clone(),
                        record,
                        finding,
                    })
                };
                if !stream.watches(&e.key) {
                    report(Guarantee::Filtered, Finding::OutOfRange { range: range_text(request) });
                }
                if !stream.delivers(e.kind) {
                    report(Guarantee::Filtered, Finding::FilteredType { event: e.kind });
                }
                if request.start_revision > 0 && rev < request.start_revision {
                    report(
                        Guarantee::Resumable,
                        Finding::BeforeStart { start: request.start_revision, stream_record: stream.record },
                    );
                }
                if rev > resp.revision {
                    report(Guarantee::Ordered, Finding::AboveHeader { header: resp.revision });
                }
                if let Some(&first_record) = delivered.get(&(rev, e.key.as_str())) {
                    // Ordering is judged on first deliveries only: a duplicate is reported once.
                    report(Guarantee::Unique, Finding::Duplicate { first_record });
                    continue;
                }
                delivered.insert((rev, e.key.as_str()), record);
                match last {
                    Some((l, _)) if rev < l => report(Guarantee::Ordered, Finding::OutOfOrder { after: l }),
                    Some((l, first_record)) if rev == l && first_record != record => {
                        report(Guarantee::Atomic, Finding::SplitRevision { first_record })
                    }
                    _ => {}
                }
                if let Some((p, progress_record)) = progress.filter(|&(p, _)| rev <= p) {
                    report(Guarantee::Bookmarkable, Finding::AfterProgress { progress: p, progress_record });
                }
                if last.is_none_or(|(l, _)| rev > l) {
                    last = Some((rev, record));
                }
            }
        }
    }
}
