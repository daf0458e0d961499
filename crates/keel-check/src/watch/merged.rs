//! The merged event history: every event known to have happened, from the acknowledged writes and
//! from every watcher's deliveries, one per (revision, key); and the consistency checks that come
//! with building it. A delivered event must agree with the acknowledged write of its revision and
//! key, with what other watchers got for it, and must have been written by some client; its
//! version and create revision must follow from the key's previous event where that is certain.

use std::collections::{BTreeMap, HashMap};

use super::history::{Event, EventType, Revision, WriteOp};
use super::index::Indexed;
use super::violation::{Finding, Guarantee, Seen, WatchViolation, Witness};
use crate::history::Outcome;

/// One event known to have happened.
#[derive(Debug, Clone)]
pub(crate) struct Known<'h> {
    pub(crate) kind: EventType,
    pub(crate) value: Option<&'h str>,
    /// (create revision, version) of a put, once a watcher delivered it.
    pub(crate) meta: Option<(Revision, i64)>,
    /// The first witness: an acknowledged write if there is one, else the first delivery.
    pub(crate) witness: Witness,
    /// The first delivery: (watcher, record).
    pub(crate) delivered: Option<(u64, usize)>,
}

impl Known<'_> {
    pub(crate) fn seen(&self, key: &str) -> Seen {
        Seen { kind: self.kind, key: key.to_owned(), value: self.value.map(str::to_owned), meta: self.meta }
    }
}

pub(crate) fn seen(e: &Event) -> Seen {
    Seen { kind: e.kind, key: e.key.clone(), value: e.value.clone(), meta: meta(e) }
}

fn meta(e: &Event) -> Option<(Revision, i64)> {
    (e.kind == EventType::Put).then_some((e.create_revision, e.version))
}

pub(crate) struct Merged<'h> {
    /// Every known event by (revision, key).
    pub(crate) events: BTreeMap<(Revision, &'h str), Known<'h>>,
}

impl<'h> Merged<'h> {
    /// Every key with a known event.
    pub(crate) fn by_key(&self) -> BTreeMap<&'h str, BTreeMap<Revision, &Known<'h>>> {
        let mut out: BTreeMap<&str, BTreeMap<Revision, &Known<'h>>> = BTreeMap::new();
        for ((r, k), e) in &self.events {
            out.entry(k).or_default().insert(*r, e);
        }
        out
    }
}

/// Merges the acknowledged writes and every delivery; reports deliveries that contradict them.
pub(crate) fn merge<'h>(index: &Indexed<'h>, found: &mut Vec<WatchViolation>) -> Merged<'h> {
    let mut events: BTreeMap<(Revision, &'h str), Known<'h>> = BTreeMap::new();
    for &(i, w) in &index.writes {
        let (Outcome::Ok, Some(rev)) = (w.outcome, w.revision) else { continue };
        let kind = match w.op {
            WriteOp::Put => EventType::Put,
            WriteOp::Delete => EventType::Delete,
        };
        let known = Known {
            kind,
            value: w.value.as_deref(),
            meta: None,
            witness: Witness::Write { record: i, client: w.client },
            delivered: None,
        };
        match events.get(&(rev, w.key.as_str())) {
            Some(other) if other.kind != kind || other.value != known.value => {
                let Witness::Write { record: other_record, .. } = other.witness else { continue };
                found.push(WatchViolation {
                    guarantee: Guarantee::Consistent,
                    watcher: None,
                    revision: rev,
                    key: w.key.clone(),
                    record: i,
                    finding: Finding::ConflictingAcks { write_record: i, other_record },
                });
            }
            Some(_) => {}
            None => {
                events.insert((rev, w.key.as_str()), known);
            }
        }
    }

    for stream in &index.streams {
        for &(record, resp) in &stream.responses {
            for e in &resp.events {
                let rev = e.mod_revision;
                let Some(known) = events.get_mut(&(rev, e.key.as_str())) else {
                    events.insert(
                        (rev, e.key.as_str()),
                        Known {
                            kind: e.kind,
                            value: e.value.as_deref(),
                            meta: meta(e),
                            witness: Witness::Watcher { watcher: stream.watcher, record },
                            delivered: Some((stream.watcher, record)),
                        },
                    );
                    continue;
                };
                let same_effect = known.kind == e.kind && known.value == e.value.as_deref();
                let same_meta = match (known.meta, meta(e)) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                let finding = match (known.witness, known.delivered) {
                    (Witness::Write { record: write_record, .. }, _) if !same_effect => {
                        Some(Finding::WrongEvent {
                            delivered: seen(e),
                            acknowledged: known.seen(&e.key),
                            write_record,
                        })
                    }
                    (_, Some((other_watcher, other_record)))
                        if !(same_effect && same_meta)
                            && (other_watcher, other_record) != (stream.watcher, record) =>
                    {
                        Some(Finding::Disagree {
                            delivered: seen(e),
                            other: known.seen(&e.key),
                            other_watcher,
                            other_record,
                        })
                    }
                    _ => None,
                };
                if known.delivered.is_none() {
                    known.delivered = Some((stream.watcher, record));
                    known.meta = meta(e);
                }
                if let Some(finding) = finding {
                    found.push(WatchViolation {
                        guarantee: Guarantee::Consistent,
                        watcher: Some(stream.watcher),
                        revision: rev,
                        key: e.key.clone(),
                        record,
                        finding,
                    });
                }
            }
        }
    }
    let mut merged = Merged { events };
    check_origins(index, &mut merged, found);
    check_metadata(index, &merged, found);
    merged
}

/// Every delivered put's value must come from a write of it to that key that may have taken
/// effect, at the revision that write was acknowledged at, and (written once) at no other revision.
/// A phantom is dropped from the merged history: it is no witness that other watchers missed
/// something.
fn check_origins(index: &Indexed<'_>, merged: &mut Merged<'_>, found: &mut Vec<WatchViolation>) {
    let mut revisions: HashMap<(&str, &str), Vec<Revision>> = HashMap::new();
    let mut phantoms = Vec::new();
    for (&(rev, key), known) in &merged.events {
        let (Witness::Watcher { watcher, record }, Some(value)) = (known.witness, known.value) else {
            continue;
        };
        revisions.entry((key, value)).or_default().push(rev);
        let violation = |finding| WatchViolation {
            guarantee: Guarantee::Consistent,
            watcher: Some(watcher),
            revision: rev,
            key: key.to_owned(),
            record,
            finding,
        };
        let effective = index.effective_writers(key, value);
        match effective.as_slice() {
            [] => {
                phantoms.push((rev, key));
                found.push(violation(Finding::Phantom {
                    value: value.to_owned(),
                    failed_writes: index.failed_writers(key, value),
                }));
            }
            &[only] => {
                if let Some(acknowledged) = index.write(only).revision.filter(|&a| a != rev) {
                    found.push(violation(Finding::WrongRevision {
                        value: value.to_owned(),
                        acknowledged,
                        write_record: only,
                    }));
                }
            }
            // Written more than once: which write this is cannot be told.
            _ => {}
        }
    }
    for ((key, value), revs) in revisions {
        if revs.len() < 2 || index.effective_writers(key, value).len() > 1 {
            continue;
        }
        for pair in revs.windows(2) {
            let Witness::Watcher { watcher, record } = merged.events[&(pair[1], key)].witness else {
                continue;
            };
            found.push(WatchViolation {
                guarantee: Guarantee::Consistent,
                watcher: Some(watcher),
                revision: pair[1],
                key: key.to_owned(),
                record,
                finding: Finding::DeliveredTwice { value: value.to_owned(), other_revision: pair[0] },
            });
        }
    }
    for p in phantoms {
        merged.events.remove(&p);
    }
}

/// A put's version and create revision must make sense on their own (created at its own revision
/// iff version 1), and follow from the key's previous event wherever some stream observed every
/// event of the key between the two (so that nothing unknown can sit in between).
fn check_metadata(index: &Indexed<'_>, merged: &Merged<'_>, found: &mut Vec<WatchViolation>) {
    for (key, events) in merged.by_key() {
        let mut previous: Option<(Revision, &Known<'_>)> = None;
        for (&rev, &known) in &events {
            let problem = match (known.kind, known.meta) {
                (EventType::Put, Some((create, version))) => {
                    if version < 1 {
                        Some(format!("put with version {version}"))
                    } else if create < 1 || create > rev {
                        Some(format!("put with create revision {create}, not in 1..={rev}"))
                    } else if (version == 1) != (create == rev) {
                        Some(format!(
                            "put with version {version} and create revision {create}: a key is created (version 1) exactly at its create revision"
                        ))
                    } else {
                        previous
                            .filter(|&(p, _)| index.observed_all_of(key, p, rev))
                            .and_then(|(_, prev)| follows(prev, create, version, rev))
                    }
                }
                (EventType::Delete, _) => previous
                    .filter(|&(p, prev)| prev.kind == EventType::Delete && index.observed_all_of(key, p, rev))
                    .map(|_| "deleted again, though absent since the previous delete".to_owned()),
                (EventType::Put, None) => None,
            };
            if let (Some(problem), Witness::Watcher { watcher, record }) = (problem, known.witness) {
                found.push(WatchViolation {
                    guarantee: Guarantee::Consistent,
                    watcher: Some(watcher),
                    revision: rev,
                    key: key.to_owned(),
                    record,
                    finding: Finding::Metadata { problem, previous: previous.map(|(p, _)| p) },
                });
            }
            previous = Some((rev, known));
        }
    }
}

/// What is wrong with a put of (`create`, `version`) right after `prev`, if anything.
fn follows(prev: &Known<'_>, create: Revision, version: i64, rev: Revision) -> Option<String> {
    match (prev.kind, prev.meta) {
        (EventType::Delete, _) if version != 1 || create != rev => {
            Some(format!("put after a delete with version {version} and create revision {create}, not 1 and {rev}"))
        }
        (EventType::Put, Some((pc, pv))) if version != pv + 1 || create != pc => Some(format!(
            "put with version {version} and create revision {create} after a put with version {pv} and create revision {pc}"
        )),
        _ => None,
    }
}
