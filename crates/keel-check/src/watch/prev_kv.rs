//! prev_kv: on a watch that asked for it, each event carries the key's state just before it: none
//! for a put that created the key, else the key's latest event before it, which must be a put of
//! the same value (and metadata, where known) with the version right before the event's, and no
//! known event of the key may lie between the two.

use std::collections::BTreeMap;

use super::history::{Event, EventType, KeyValue, Revision};
use super::index::Indexed;
use super::merged::{Known, Merged};
use super::violation::{Finding, Guarantee, WatchViolation};

pub(crate) fn check_prev_kv(index: &Indexed<'_>, merged: &Merged<'_>, found: &mut Vec<WatchViolation>) {
    let by_key = merged.by_key();
    let empty = BTreeMap::new();
    for stream in index.streams.iter().filter(|s| s.request.prev_kv) {
        for &(record, resp) in &stream.responses {
            for e in &resp.events {
                let events = by_key.get(e.key.as_str()).unwrap_or(&empty);
                if let Some(problem) = problem(index, events, e) {
                    found.push(WatchViolation {
                        guarantee: Guarantee::PrevKv,
                        watcher: Some(stream.watcher),
                        revision: e.mod_revision,
                        key: e.key.clone(),
                        record,
                        finding: Finding::PrevKv { problem },
                    });
                }
            }
        }
    }
}

/// What is wrong with `e`'s `prev_kv`, given the known events of its key.
fn problem(index: &Indexed<'_>, events: &BTreeMap<Revision, &Known<'_>>, e: &Event) -> Option<String> {
    let rev = e.mod_revision;
    let Some(prev) = &e.prev_kv else {
        return match e.kind {
            EventType::Put if e.version > 1 => {
                Some(format!("no prev_kv, but the put has version {} (the key existed)", e.version))
            }
            EventType::Delete => Some("no prev_kv on a delete (the key existed)".to_owned()),
            EventType::Put => None,
        };
    };
    if e.kind == EventType::Put && e.version == 1 {
        return Some(format!("a prev_kv (revision {}) on the put that created the key", prev.mod_revision));
    }
    if prev.key != e.key {
        return Some(format!("prev_kv is of another key, {:?}", prev.key));
    }
    if prev.mod_revision >= rev {
        return Some(format!("prev_kv is from revision {}, not before the event", prev.mod_revision));
    }
    if e.kind == EventType::Put
        && (prev.version != e.version - 1 || prev.create_revision != e.create_revision)
    {
        return Some(format!(
            "prev_kv has version {} and create revision {}; the put has version {} and create revision {}",
            prev.version, prev.create_revision, e.version, e.create_revision
        ));
    }
    if let Some((&between, known)) = events.range(prev.mod_revision + 1..rev).next_back() {
        return Some(format!(
            "prev_kv is from revision {}, but the key changed after it, at revision {between} ({})",
            prev.mod_revision, known.witness
        ));
    }
    match events.get(&prev.mod_revision) {
        Some(known) => mismatch(prev, known),
        None if index.effective_writers(&e.key, &prev.value).is_empty() => {
            Some(format!("prev_kv holds {:?}, which no write that may have taken effect wrote", prev.value))
        }
        None => None,
    }
}

/// What differs between `prev` and the known event at its revision.
fn mismatch(prev: &KeyValue, known: &Known<'_>) -> Option<String> {
    if known.kind == EventType::Delete {
        return Some(format!(
            "prev_kv holds {:?} from revision {}, where the key was deleted ({})",
            prev.value, prev.mod_revision, known.witness
        ));
    }
    if known.value != Some(prev.value.as_str()) {
        return Some(format!(
            "prev_kv holds {:?} from revision {}, which wrote {:?} ({})",
            prev.value,
            prev.mod_revision,
            known.value.unwrap_or_default(),
            known.witness
        ));
    }
    match known.meta {
        Some((create, version)) if (create, version) != (prev.create_revision, prev.version) => Some(format!(
            "prev_kv has version {} and create revision {}; revision {} was delivered with version {version} and create revision {create} ({})",
            prev.version, prev.create_revision, prev.mod_revision, known.witness
        )),
        _ => None,
    }
}
