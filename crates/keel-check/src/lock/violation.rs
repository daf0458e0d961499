//! What the lock checks report: one [`LockViolation`] per broken rule, naming the rule, the lock or
//! lease, the client, and the records that show it.

use std::fmt;

use serde::Serialize;

use super::history::{LeaseId, Micros, Revision};

/// The rule a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Two holders of one lock whose validity intervals overlap.
    MutualExclusion,
    /// Tokens of one lock reused, or not increasing in real-time acquisition order.
    Tokens,
    /// A fenced write that should have been refused, or fenced writes out of token order.
    Fencing,
    /// A lease gone before its TTL after the last keep-alive the leader acknowledged.
    EarlyExpiry,
    /// A lease's key still there past the stated bound after its last keep-alive.
    LateExpiry,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::MutualExclusion => "mutual_exclusion",
            Rule::Tokens => "tokens",
            Rule::Fencing => "fencing",
            Rule::EarlyExpiry => "early_expiry",
            Rule::LateExpiry => "late_expiry",
        })
    }
}

/// Microseconds as seconds, for reports.
pub(crate) struct Secs(pub Micros);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3}s", self.0 as f64 / 1e6)
    }
}

/// What set the earliest time a lease may expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum FloorBy {
    /// The grant's send time + TTL (no keep-alive acknowledged).
    Grant { record: usize },
    /// The send time of the last acknowledged keep-alive + its TTL.
    Keepalive { record: usize },
    /// The client's revoke was sent then.
    Revoke { record: usize },
}

impl FloorBy {
    pub fn record(self) -> usize {
        match self {
            FloorBy::Grant { record } | FloorBy::Keepalive { record } | FloorBy::Revoke { record } => record,
        }
    }
}

impl fmt::Display for FloorBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FloorBy::Grant { record } => write!(f, "grant sent + TTL (record #{record})"),
            FloorBy::Keepalive { record } => {
                write!(f, "last acknowledged keep-alive sent + TTL (record #{record})")
            }
            FloorBy::Revoke { record } => write!(f, "revoke sent (record #{record})"),
        }
    }
}

/// The end of a holder's validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum EndBy {
    /// Its release (the delete of the lock key) was sent.
    Release { record: usize },
    /// Its lease could expire from then on.
    Lease(FloorBy),
}

impl fmt::Display for EndBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndBy::Release { record } => write!(f, "release sent (record #{record})"),
            EndBy::Lease(by) => by.fmt(f),
        }
    }
}

/// A holder's validity: `[from_us, to_us)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Validity {
    pub client: u64,
    pub token: Revision,
    /// The acquire record.
    pub record: usize,
    pub from_us: Micros,
    pub to_us: Micros,
    pub ends_by: EndBy,
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client {} (token {}, acquired at {}, record #{}) valid until {} ({})",
            self.client,
            self.token,
            Secs(self.from_us),
            self.record,
            Secs(self.to_us),
            self.ends_by
        )
    }
}

/// How a lease was seen gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum GoneBy {
    /// A keep-alive answered with TTL ≤ 0.
    Keepalive,
    /// A linearizable read found the attached key absent.
    Probe { key: String },
    /// A fenced write of a holding on the lease was refused: its lock key was gone, and its
    /// holder had not released it.
    Fenced { lock: String, token: Revision },
}

impl fmt::Display for GoneBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GoneBy::Keepalive => f.write_str("a keep-alive answered TTL 0"),
            GoneBy::Probe { key } => write!(f, "a read found its key {key:?} absent"),
            GoneBy::Fenced { lock, token } => {
                write!(f, "a fenced write of lock {lock:?} token {token} was refused (the lock key was gone, not released)")
            }
        }
    }
}

/// What exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Two holders valid at once, over `[from_us, to_us)`.
    Overlap { holder: Validity, other: Validity, from_us: Micros, to_us: Micros },
    /// Two acquisitions of the lock with one token.
    TokenReused { token: Revision, other_client: u64, other_record: usize },
    /// `other` acquired (answered) at `other_acquired_us`, before this acquisition's request was
    /// sent at `sent_us`, yet holds the larger token.
    TokenOutOfOrder {
        token: Revision,
        sent_us: Micros,
        other_client: u64,
        other_token: Revision,
        other_acquired_us: Micros,
        other_record: usize,
    },
    /// A successful fenced write at `revision` with a smaller token than the successful one at the
    /// lower `earlier_revision`.
    FenceOutOfOrder {
        resource: String,
        token: Revision,
        revision: Revision,
        earlier_token: Revision,
        earlier_revision: Revision,
        earlier_record: usize,
    },
    /// A successful fenced write sent after a holder with a larger token had acquired the lock.
    FenceAfterSuccessor {
        resource: String,
        token: Revision,
        revision: Revision,
        sent_us: Micros,
        successor_client: u64,
        successor_token: Revision,
        successor_acquired_us: Micros,
        successor_record: usize,
    },
    /// A successful fenced write at a revision after its holder's acknowledged release.
    FenceAfterRelease {
        resource: String,
        token: Revision,
        revision: Revision,
        release_revision: Revision,
        release_record: usize,
    },
    /// The lease was seen gone at `at_us`, before it could expire (`floor_us`).
    GoneEarly { by: GoneBy, at_us: Micros, floor_us: Micros, floor_by: FloorBy },
    /// The key was read present by a read sent at `probe_sent_us`, after `deadline_us`: the last
    /// keep-alive's answer (or the grant's) at `last_us` + TTL + the bounds, extended over the
    /// `faults` fault windows that began while the lease could still be alive.
    Lingered {
        key: String,
        probe_sent_us: Micros,
        deadline_us: Micros,
        last_us: Micros,
        ttl: i64,
        faults: usize,
    },
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockViolation {
    pub rule: Rule,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
    pub client: u64,
    /// The record that shows the violation.
    pub record: usize,
    pub finding: Finding,
}

impl fmt::Display for LockViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.rule)?;
        if let Some(lock) = &self.lock {
            write!(f, "lock {lock:?}, ")?;
        }
        if let Some(lease) = self.lease {
            write!(f, "lease {lease:x}, ")?;
        }
        write!(f, "client {} (record #{}): ", self.client, self.record)?;
        match &self.finding {
            Finding::Overlap { holder, other, from_us, to_us } => write!(
                f,
                "two holders valid at once from {} to {}: {holder}; and {other}",
                Secs(*from_us),
                Secs(*to_us)
            ),
            Finding::TokenReused { token, other_client, other_record } => write!(
                f,
                "token {token} also acquired by client {other_client} (record #{other_record})"
            ),
            Finding::TokenOutOfOrder { token, sent_us, other_client, other_token, other_acquired_us, other_record } => {
                write!(
                    f,
                    "token {token} requested at {}, after client {other_client} had acquired token {other_token} at {} (record #{other_record}): tokens must grow in acquisition order",
                    Secs(*sent_us),
                    Secs(*other_acquired_us)
                )
            }
            Finding::FenceOutOfOrder { resource, token, revision, earlier_token, earlier_revision, earlier_record } => {
                write!(
                    f,
                    "fenced write to {resource:?} with token {token} succeeded at revision {revision}, after one with token {earlier_token} at revision {earlier_revision} (record #{earlier_record})"
                )
            }
            Finding::FenceAfterSuccessor {
                resource,
                token,
                revision,
                sent_us,
                successor_client,
                successor_token,
                successor_acquired_us,
                successor_record,
            } => write!(
                f,
                "fenced write to {resource:?} with token {token}, sent at {}, succeeded at revision {revision}, though client {successor_client} had acquired the lock with token {successor_token} at {} (record #{successor_record})",
                Secs(*sent_us),
                Secs(*successor_acquired_us)
            ),
            Finding::FenceAfterRelease { resource, token, revision, release_revision, release_record } => write!(
                f,
                "fenced write to {resource:?} with token {token} succeeded at revision {revision}, after its holder's release at revision {release_revision} (record #{release_record})"
            ),
            Finding::GoneEarly { by, at_us, floor_us, floor_by } => write!(
                f,
                "lease gone at {}: {by}; it could not expire before {} ({floor_by})",
                Secs(*at_us),
                Secs(*floor_us)
            ),
            Finding::Lingered { key, probe_sent_us, deadline_us, last_us, ttl, faults } => write!(
                f,
                "key {key:?} still present for a read sent at {}, past its deadline {} (last keep-alive answer {} + TTL {ttl}s + bounds, {faults} fault windows counted)",
                Secs(*probe_sent_us),
                Secs(*deadline_us),
                Secs(*last_us)
            ),
        }
    }
}
