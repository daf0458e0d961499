//! Mutual exclusion by validity, and the tokens of each lock.
//!
//! A holder's validity runs from its acquisition's answer to the earlier of its release being sent
//! and the earliest time its lease may expire (the last acknowledged keep-alive's send time + TTL).
//! In a correct lock service the next holder acquires only after the lock key is deleted, which
//! happens after the release was sent or after the lease expired; so validities never overlap. Two
//! that overlap are a lock granted to two, or a lease that expired early.

use std::collections::BTreeMap;

use super::history::{Micros, Revision};
use super::index::{Holding, Indexed};
use super::violation::{Finding, LockViolation, Rule};

/// Two holders of one lock valid at once.
pub(crate) fn check_exclusion(index: &Indexed<'_>, out: &mut Vec<LockViolation>) {
    for (&lock, holdings) in &index.locks {
        let mut valid: Vec<_> =
            holdings.iter().map(|h| index.validity(h)).filter(|v| v.from_us < v.to_us).collect();
        valid.sort_by_key(|v| (v.from_us, v.record));
        for (i, earlier) in valid.iter().enumerate() {
            // Sorted by start: every later one starting before `earlier` ends overlaps it.
            for later in valid[i + 1..].iter().take_while(|l| l.from_us < earlier.to_us) {
                out.push(LockViolation {
                    rule: Rule::MutualExclusion,
                    lock: Some(lock.to_owned()),
                    lease: None,
                    client: later.client,
                    record: later.record,
                    finding: Finding::Overlap {
                        holder: *later,
                        other: *earlier,
                        from_us: later.from_us,
                        to_us: later.to_us.min(earlier.to_us),
                    },
                });
            }
        }
    }
}

/// Tokens of one lock: never shared, and an acquisition answered before another's request was sent
/// has the smaller token.
pub(crate) fn check_tokens(index: &Indexed<'_>, out: &mut Vec<LockViolation>) {
    for (&lock, holdings) in &index.locks {
        let mut by_token: BTreeMap<Revision, &Holding<'_>> = BTreeMap::new();
        for h in holdings {
            let (record, a) = h.acquire;
            if let Some(first) = by_token.get(&a.token) {
                out.push(LockViolation {
                    rule: Rule::Tokens,
                    lock: Some(lock.to_owned()),
                    lease: Some(a.lease),
                    client: a.client,
                    record,
                    finding: Finding::TokenReused {
                        token: a.token,
                        other_client: first.acquire.1.client,
                        other_record: first.acquire.0,
                    },
                });
            } else {
                by_token.insert(a.token, h);
            }
        }
        // By answer time, with the largest token answered so far.
        let mut answered: Vec<&Holding<'_>> = holdings.iter().collect();
        answered.sort_by_key(|h| (h.acquire.1.at_us, h.acquire.0));
        let mut max_so_far: Vec<(Micros, &Holding<'_>)> = Vec::with_capacity(answered.len());
        for h in answered {
            let best = match max_so_far.last() {
                Some(&(_, b)) if b.acquire.1.token >= h.acquire.1.token => b,
                _ => h,
            };
            max_so_far.push((h.acquire.1.at_us, best));
        }
        for h in holdings {
            let (record, a) = h.acquire;
            // The acquisitions answered strictly before this one's request was sent.
            let n = max_so_far.partition_point(|&(at, _)| at < a.sent_us);
            let Some(&(_, other)) = n.checked_sub(1).map(|i| &max_so_far[i]) else { continue };
            let (other_record, o) = other.acquire;
            if o.token > a.token {
                out.push(LockViolation {
                    rule: Rule::Tokens,
                    lock: Some(lock.to_owned()),
                    lease: Some(a.lease),
                    client: a.client,
                    record,
                    finding: Finding::TokenOutOfOrder {
                        token: a.token,
                        sent_us: a.sent_us,
                        other_client: o.client,
                        other_token: o.token,
                        other_acquired_us: o.at_us,
                        other_record,
                    },
                });
            }
        }
    }
}
