//! Fencing: a write made `if create_revision(lock key) == token` can only succeed while that very
//! lock key exists. A lock key is deleted before the next holder acquires, and never comes back
//! (a new key gets a new create revision). So, of the successful fenced writes:
//!
//! - on one resource, in revision order, the tokens never go down;
//! - none was sent after a holder with a larger token of the same lock had acquired it;
//! - none is at a revision after its own holder's acknowledged release.
//!
//! Fenced writes of unknown outcome are not judged.

use std::collections::BTreeMap;

use super::history::{Fenced, Micros, Revision};
use super::index::{Holding, Indexed};
use super::violation::{Finding, LockViolation, Rule};
use crate::history::Outcome;

pub(crate) fn check_fencing(index: &Indexed<'_>, out: &mut Vec<LockViolation>) {
    let ok: Vec<(usize, &Fenced, Revision)> = index
        .fenced
        .iter()
        .filter(|(_, f)| f.outcome == Outcome::Ok)
        .filter_map(|&(i, f)| Some((i, f, f.revision?)))
        .collect();
    let violation = |record: usize, f: &Fenced, finding: Finding| LockViolation {
        rule: Rule::Fencing,
        lock: Some(f.lock.clone()),
        lease: None,
        client: f.client,
        record,
        finding,
    };

    // Token order per resource.
    let mut by_resource: BTreeMap<&str, Vec<(Revision, usize, &Fenced)>> = BTreeMap::new();
    for &(i, f, revision) in &ok {
        by_resource.entry(f.resource.as_str()).or_default().push((revision, i, f));
    }
    for writes in by_resource.values_mut() {
        writes.sort_by_key(|&(revision, i, _)| (revision, i));
        let mut max: Option<(Revision, usize, &Fenced)> = None;
        for &(revision, i, f) in writes.iter() {
            match max {
                Some((earlier_revision, earlier_record, top)) if top.token > f.token => out.push(violation(
                    i,
                    f,
                    Finding::FenceOutOfOrder {
                        resource: f.resource.clone(),
                        token: f.token,
                        revision,
                        earlier_token: top.token,
                        earlier_revision,
                        earlier_record,
                    },
                )),
                Some((_, _, top)) if top.token == f.token => {}
                _ => max = Some((revision, i, f)),
            }
        }
    }

    // Per lock: the acquisitions by answer time, with the largest token answered so far.
    let successors: BTreeMap<&str, Vec<(Micros, &Holding<'_>)>> = index
        .locks
        .iter()
        .map(|(&lock, holdings)| {
            let mut answered: Vec<&Holding<'_>> = holdings.iter().collect();
            answered.sort_by_key(|h| (h.acquire.1.at_us, h.acquire.0));
            let mut best: Option<&Holding<'_>> = None;
            let list = answered
                .into_iter()
                .map(|h| {
                    if best.is_none_or(|b| b.acquire.1.token < h.acquire.1.token) {
                        best = Some(h);
                    }
                    (h.acquire.1.at_us, best.expect("set just above"))
                })
                .collect();
            (lock, list)
        })
        .collect();
    for &(i, f, revision) in &ok {
        if let Some(list) = successors.get(f.lock.as_str()) {
            let n = list.partition_point(|&(at, _)| at < f.sent_us);
            if let Some(&(_, s)) = n.checked_sub(1).map(|k| &list[k]) {
                let (successor_record, a) = s.acquire;
                if a.token > f.token {
                    out.push(violation(
                        i,
                        f,
                        Finding::FenceAfterSuccessor {
                            resource: f.resource.clone(),
                            token: f.token,
                            revision,
                            sent_us: f.sent_us,
                            successor_client: a.client,
                            successor_token: a.token,
                            successor_acquired_us: a.at_us,
                            successor_record,
                        },
                    ));
                }
            }
        }
        let released = index.holding_of(f).and_then(|h| h.release).filter(|(_, r)| r.outcome == Outcome::Ok);
        if let Some((release_record, r)) = released {
            match r.revision {
                Some(release_revision) if release_revision < revision => out.push(violation(
                    i,
                    f,
                    Finding::FenceAfterRelease {
                        resource: f.resource.clone(),
                        token: f.token,
                        revision,
                        release_revision,
                        release_record,
                    },
                )),
                _ => {}
            }
        }
    }
}
