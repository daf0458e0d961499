//! Lease timing: never gone before its floor (the last acknowledged keep-alive's send time + TTL),
//! and, once its client stopped keeping it alive, gone within the stated bound.
//!
//! **Early.** The lease is seen gone at time `t` when a keep-alive is answered with TTL 0 (arrived
//! at `t`), a linearizable read finds an attached key absent (answered at `t`; the key was put with
//! the lease and is deleted by nothing else), or a fenced write of a holding on the lease is
//! refused (answered at `t`; the lock key existed when acquired and its holder had not sent its
//! release). Something happened at or before `t`; if `t` is before the floor (by the renewals
//! alone: the grant and the acknowledged keep-alives) and before the client sent a revoke, the
//! lease ended early.
//!
//! **Late.** For a lease whose client sent its last keep-alive (a `stop` record) and never revoked
//! it: its deadline starts as the last keep-alive's answer (or giving up on it) + TTL + grace. A
//! leader change gives every lease its full TTL again plus an election timeout (etcd's rule), and
//! a paused leader may renew late, so every fault window that begins before the deadline pushes
//! it to the window's heal + recovery + TTL + election timeout + grace. A read sent after the
//! deadline that still finds the key present is a lease that lingered. A lease no read looked at
//! after its deadline is undecided.

use super::history::Micros;
use super::index::{ttl_us, Indexed, LeaseView};
use super::violation::{Finding, GoneBy, LockViolation, Rule};
use crate::history::Outcome;

use super::history::KeepaliveOutcome;

/// What the late-expiry check could decide.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LateCounts {
    /// Stopped leases whose keys were read absent after their deadline, or present past it.
    pub decided: usize,
    /// Stopped leases no read looked at after their deadline (or a fault never healed).
    pub undecided: usize,
}

pub(crate) fn check_early(index: &Indexed<'_>, out: &mut Vec<LockViolation>) {
    for (&id, lease) in &index.leases {
        // Seen gone before the client's own revoke was sent: only the renewals count.
        let floor = lease.renewal_floor();
        let revoked_us = lease.revoke.map_or(Micros::MAX, |(_, r)| r.sent_us);
        let mut gone = |record: usize, client: u64, by: GoneBy, at_us: Micros, lock: Option<String>| {
            if at_us < floor.at_us && at_us < revoked_us {
                out.push(LockViolation {
                    rule: Rule::EarlyExpiry,
                    lock,
                    lease: Some(id),
                    client,
                    record,
                    finding: Finding::GoneEarly { by, at_us, floor_us: floor.at_us, floor_by: floor.by },
                });
            }
        };
        for &(i, k) in &lease.keepalives {
            if k.outcome == KeepaliveOutcome::Gone {
                gone(i, k.client, GoneBy::Keepalive, k.at_us, None);
            }
        }
        for &(i, p) in &lease.probes {
            // Only reads sent once the put was acknowledged: before, absent says nothing.
            let attached = lease.attached.iter().any(|(_, a)| a.key == p.key && a.at_us <= p.sent_us);
            if !p.present && attached {
                gone(i, p.client, GoneBy::Probe { key: p.key.clone() }, p.at_us, None);
            }
        }
        for &(i, f) in &index.fenced {
            if f.outcome != Outcome::Fail {
                continue;
            }
            let Some(h) = index.holding_of(f).filter(|h| h.acquire.1.lease == id) else { continue };
            let released = h.release.is_some_and(|(_, r)| r.sent_us <= f.at_us);
            if !released && f.sent_us >= h.acquire.1.at_us {
                let by = GoneBy::Fenced { lock: f.lock.clone(), token: f.token };
                gone(i, f.client, by, f.at_us, Some(f.lock.clone()));
            }
        }
    }
}

/// The deadline of a stopped lease (`None`: a fault that pushes it was never healed).
fn deadline(index: &Indexed<'_>, lease: &LeaseView<'_>) -> Option<(Micros, usize)> {
    let b = index.bounds;
    let ttl = ttl_us(lease.ttl());
    let ms = |m: u64| m.saturating_mul(1000);
    let mut d = lease.last_renewal_us() + ttl + ms(b.grace_ms);
    let mut windows = 0;
    // Sorted by start: once one starts after the deadline, so do the rest.
    for w in &index.windows {
        if w.from_us >= d {
            break;
        }
        windows += 1;
        let pushed = w.to_us? + ms(b.recovery_ms) + ttl + ms(b.election_timeout_ms) + ms(b.grace_ms);
        d = d.max(pushed);
    }
    Some((d, windows))
}

pub(crate) fn check_late(index: &Indexed<'_>, out: &mut Vec<LockViolation>) -> LateCounts {
    let mut counts = LateCounts::default();
    for (&id, lease) in &index.leases {
        if lease.stop.is_none() || lease.revoke.is_some() || lease.attached.is_empty() {
            continue;
        }
        if lease.keepalives.iter().any(|(_, k)| k.outcome == KeepaliveOutcome::Gone) {
            // Already seen gone while kept alive: the early check judges it.
            continue;
        }
        let Some((deadline_us, faults)) = deadline(index, lease) else {
            counts.undecided += 1;
            continue;
        };
        let late: Vec<_> = lease.probes.iter().filter(|(_, p)| p.sent_us > deadline_us).collect();
        if late.is_empty() && !lease.probes.iter().any(|(_, p)| !p.present) {
            counts.undecided += 1;
            continue;
        }
        counts.decided += 1;
        if let Some(&&(i, p)) = late.iter().find(|(_, p)| p.present) {
            out.push(LockViolation {
                rule: Rule::LateExpiry,
                lock: None,
                lease: Some(id),
                client: p.client,
                record: i,
                finding: Finding::Lingered {
                    key: p.key.clone(),
                    probe_sent_us: p.sent_us,
                    deadline_us,
                    last_us: lease.last_renewal_us(),
                    ttl: lease.ttl(),
                    faults,
                },
            });
        }
    }
    counts
}
