//! The lock checker: decides whether clients that held etcd leases and contended for locks with
//! them (etcd's client-side mutex: a key per contender under the lock's prefix, attached to its
//! lease; the smallest create revision holds the lock) got what a lock service must give, and
//! whether the leases lived as long as they had to and no longer than the stated bound.
//!
//! A runner records, as JSON lines ([`LockHistory`]): every lease granted, each keep-alive with
//! its send time and answer (acknowledged with a TTL, answered "gone", or unknown), each lock
//! acquisition with its fencing token (the lock key's create revision), every fenced write, release
//! and revoke; keys put with leases and the reads that probed them; the faults and heals.
//! [`check_lock`] then checks:
//!
//! - **mutual exclusion** by validity: a holder is valid from its acquisition's answer until the
//!   earlier of its release being sent and the last acknowledged keep-alive's send time + TTL;
//!   no two holders of a lock are valid at once;
//! - **tokens**: never shared, and increasing in real-time acquisition order;
//! - **fencing**: successful fenced writes carry non-decreasing tokens in revision order, none was
//!   sent after a larger token had been acquired, none lands after its holder's release;
//! - **early expiry**: no lease is seen gone (a keep-alive answered TTL 0, an attached key read
//!   absent, a fenced write refused while its holder held) before that same floor (its revoke
//!   aside: seen gone before the client sent one is early whatever came after);
//! - **late expiry**: a lease no longer kept alive has its keys deleted within TTL + the stated
//!   bounds after its last keep-alive, stretched over the faults ([`Bounds`]).
//!
//! Outcomes the clients could not learn (a keep-alive with no answer, a fenced write that timed
//! out) count for nothing; the report says how many there were, and how many stopped leases the
//! late-expiry check could not decide.
//!
//! # Layout
//!
//! - [`history`]: the JSON-lines format, its reader (errors name the line) and writer
//! - `index`: leases with their floors, holdings with their validity, fault windows
//! - `exclusion`: mutual exclusion and tokens
//! - `fencing`: the fenced writes
//! - `lease`: early and late expiry
//! - [`violation`]: what a finding says

mod exclusion;
mod fencing;
pub mod history;
mod index;
mod lease;
pub mod violation;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

pub use history::{
    Abandon, Acquire, Attach, Bounds, FaultRecord, Fenced, Grant, InvalidLockHistory, InvalidRecord,
    Keepalive, KeepaliveOutcome, LeaseId, LockHistory, LockHistoryError, LockRecord, LockWriteError, Micros,
    Probe, Release, Revision, Revoke, Stop,
};
pub use violation::{EndBy, Finding, FloorBy, GoneBy, LockViolation, Rule, Validity};

use crate::history::Outcome;
use index::Indexed;

/// At most this many violations of each rule are printed (all are in the JSON report).
const SHOWN_PER_RULE: usize = 20;

/// Counts over a lock history, and what could not be decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LockSummary {
    pub clients: usize,
    pub leases: usize,
    pub keepalives: usize,
    pub keepalives_ok: usize,
    pub keepalives_gone: usize,
    /// Unanswered (error or timeout): each may or may not have renewed its lease.
    pub keepalives_unknown: usize,
    pub locks: usize,
    pub acquisitions: usize,
    pub releases: usize,
    /// Holdings their holders walked away from or gave up.
    pub abandoned: usize,
    pub fenced: usize,
    pub fenced_ok: usize,
    /// Refused: the compare on the lock key failed.
    pub fenced_refused: usize,
    /// Outcome unknown: not judged.
    pub fenced_unknown: usize,
    /// Keys put with a lease, and reads of them.
    pub attached: usize,
    pub probes: usize,
    /// Leases kept alive, then stopped, whose keys were watched by reads.
    pub stopped_leases: usize,
    /// Of those, how many the late-expiry check decided, and how many it could not (no read after
    /// the deadline, or a fault never healed).
    pub late_expiry_decided: usize,
    pub late_expiry_undecided: usize,
    pub faults: usize,
}

/// The answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockVerdict {
    Valid,
    Invalid,
}

impl fmt::Display for LockVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockVerdict::Valid => "LOCKS VALID",
            LockVerdict::Invalid => "LOCKS INVALID",
        })
    }
}

/// Everything the lock checks found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockReport {
    pub summary: LockSummary,
    pub bounds: Bounds,
    /// Sorted by rule, lock, record.
    pub violations: Vec<LockViolation>,
    pub verdict: LockVerdict,
}

impl LockReport {
    /// The number of violations of each rule broken.
    pub fn counts(&self) -> BTreeMap<Rule, usize> {
        let mut out = BTreeMap::new();
        for v in &self.violations {
            *out.entry(v.rule).or_insert(0) += 1;
        }
        out
    }
}

/// Runs every lock check.
pub fn check_lock(history: &LockHistory) -> Result<LockReport, InvalidLockHistory> {
    history.validate()?;
    let index = Indexed::new(history);
    let mut violations = Vec::new();
    exclusion::check_exclusion(&index, &mut violations);
    exclusion::check_tokens(&index, &mut violations);
    fencing::check_fencing(&index, &mut violations);
    lease::check_early(&index, &mut violations);
    let late = lease::check_late(&index, &mut violations);
    violations.sort_by(|a, b| (a.rule, &a.lock, a.record).cmp(&(b.rule, &b.lock, b.record)));
    let verdict = if violations.is_empty() { LockVerdict::Valid } else { LockVerdict::Invalid };
    let mut summary = summary(&index);
    summary.late_expiry_decided = late.decided;
    summary.late_expiry_undecided = late.undecided;
    Ok(LockReport { summary, bounds: index.bounds, violations, verdict })
}

fn summary(index: &Indexed<'_>) -> LockSummary {
    let mut s = LockSummary {
        clients: index.clients,
        leases: index.leases.len(),
        locks: index.locks.len(),
        abandoned: index.abandoned,
        fenced: index.fenced.len(),
        faults: index.windows.len(),
        ..LockSummary::default()
    };
    for lease in index.leases.values() {
        for (_, k) in &lease.keepalives {
            s.keepalives += 1;
            match k.outcome {
                KeepaliveOutcome::Ok => s.keepalives_ok += 1,
                KeepaliveOutcome::Gone => s.keepalives_gone += 1,
                KeepaliveOutcome::Unknown => s.keepalives_unknown += 1,
            }
        }
        s.attached += lease.attached.len();
        s.probes += lease.probes.len();
        let stopped = lease.stop.is_some() && lease.revoke.is_none() && !lease.attached.is_empty();
        s.stopped_leases += usize::from(stopped);
    }
    for holdings in index.locks.values() {
        s.acquisitions += holdings.len();
        s.releases += holdings.iter().filter(|h| h.release.is_some()).count();
    }
    for (_, f) in &index.fenced {
        match f.outcome {
            Outcome::Ok => s.fenced_ok += 1,
            Outcome::Fail => s.fenced_refused += 1,
            Outcome::Unknown => s.fenced_unknown += 1,
        }
    }
    s
}

impl fmt::Display for LockReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        writeln!(
            f,
            "leases: {} by {} clients; keep-alives {} ({} acknowledged, {} answered gone, {} unanswered)",
            s.leases, s.clients, s.keepalives, s.keepalives_ok, s.keepalives_gone, s.keepalives_unknown
        )?;
        writeln!(
            f,
            "locks: {}, acquisitions {}, releases {}, abandoned {}; fenced writes {} ({} ok, {} refused, {} unknown)",
            s.locks, s.acquisitions, s.releases, s.abandoned, s.fenced, s.fenced_ok, s.fenced_refused, s.fenced_unknown
        )?;
        let b = &self.bounds;
        writeln!(
            f,
            "lease timing: {} keys attached, {} reads; {} stopped leases, expiry decided for {}, undecided for {}; {} faults; bounds: election timeout {} ms, recovery {} ms, grace {} ms",
            s.attached,
            s.probes,
            s.stopped_leases,
            s.late_expiry_decided,
            s.late_expiry_undecided,
            s.faults,
            b.election_timeout_ms,
            b.recovery_ms,
            b.grace_ms
        )?;
        let undecided: BTreeSet<String> = [
            (s.keepalives_unknown, "unanswered keep-alives counted for nothing"),
            (s.fenced_unknown, "fenced writes of unknown outcome not judged"),
            (s.late_expiry_undecided, "stopped leases whose expiry no read observed after the deadline"),
        ]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if !undecided.is_empty() {
            writeln!(f, "not decided: {}", undecided.into_iter().collect::<Vec<_>>().join("; "))?;
        }
        let counts = self.counts();
        if counts.is_empty() {
            writeln!(f, "violations: none")?;
        } else {
            let list: Vec<String> = counts.iter().map(|(r, n)| format!("{r} {n}")).collect();
            writeln!(f, "violations: {}", list.join(", "))?;
        }
        for (&rule, &n) in &counts {
            for v in self.violations.iter().filter(|v| v.rule == rule).take(SHOWN_PER_RULE) {
                writeln!(f, "  {v}")?;
            }
            if n > SHOWN_PER_RULE {
                writeln!(f, "  ... and {} more {rule} violations (all in --json)", n - SHOWN_PER_RULE)?;
            }
        }
        writeln!(f, "verdict: {}", self.verdict)
    }
}
