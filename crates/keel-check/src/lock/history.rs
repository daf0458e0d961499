//! The lock history format: one JSON object per line, tagged by `"kind"`, recorded by clients that
//! hold etcd leases, contend for named locks with them and write through fences; plus the faults
//! the cluster went through. The reader (with line numbers in its errors) and the writer.
//!
//! ```text
//! {"kind":"bounds","election_timeout_ms":1000,"recovery_ms":5000,"grace_ms":2000}
//! {"kind":"grant","client":0,"lease":7587862,"ttl":4,"sent_us":1000,"at_us":1520}
//! {"kind":"keepalive","client":0,"lease":7587862,"sent_us":2000,"at_us":2100,"outcome":"ok","ttl":4}
//! {"kind":"acquire","client":0,"lock":"lock0","lease":7587862,"key":"lock0/73c8b6","token":37,"sent_us":2200,"at_us":2900}
//! {"kind":"fenced","client":0,"lock":"lock0","token":37,"resource":"res-lock0","value":"c0-1","sent_us":3000,"at_us":3100,"outcome":"ok","revision":41}
//! {"kind":"release","client":0,"lock":"lock0","token":37,"sent_us":3200,"at_us":3300,"outcome":"ok","revision":42}
//! {"kind":"revoke","client":0,"lease":7587862,"sent_us":3300,"at_us":3400,"outcome":"ok"}
//! {"kind":"fault","at_us":5000,"what":"kill -9 leader node 2"}
//! {"kind":"grant","client":4,"lease":7587870,"ttl":3,"sent_us":5100,"at_us":5200}
//! {"kind":"attach","client":4,"lease":7587870,"key":"lease/4-1","sent_us":5200,"at_us":5300,"revision":57}
//! {"kind":"keepalive","client":4,"lease":7587870,"sent_us":6200,"at_us":7200,"outcome":"unknown"}
//! {"kind":"heal","at_us":8000,"what":"restart node 2"}
//! {"kind":"stop","client":4,"lease":7587870,"at_us":8100}
//! {"kind":"probe","client":4,"lease":7587870,"key":"lease/4-1","sent_us":8200,"at_us":8300,"present":true}
//! {"kind":"probe","client":4,"lease":7587870,"key":"lease/4-1","sent_us":9900,"at_us":9950,"present":false}
//! ```
//!
//! Every time is in microseconds on one monotonic clock shared by all the clients of a run
//! (`sent_us`: the request left; `at_us`: its answer arrived, or the client gave up on it). Lines of
//! different clients may interleave; a client's own lines are in the order it did things, and a
//! lease, lock holding or attached key must appear (`grant`, `acquire`, `attach`) before the lines
//! that use it.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::history::Outcome;

/// An etcd store revision.
pub type Revision = i64;
/// An etcd lease id.
pub type LeaseId = i64;
/// Microseconds on the run's clock.
pub type Micros = u64;

/// One line of a lock history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LockRecord {
    /// The timing allowances the lease timing check works with (at most one, anywhere; the
    /// defaults of [`Bounds`] otherwise).
    Bounds(Bounds),
    /// A lease granted to a client.
    Grant(Grant),
    /// One keep-alive of a lease and what became of it.
    Keepalive(Keepalive),
    /// The client sent its last keep-alive of the lease: none is sent after `at_us`.
    Stop(Stop),
    /// A lease revoke the client sent.
    Revoke(Revoke),
    /// A lock acquired: the client's lock key exists, and every key of the lock with a smaller
    /// create revision is gone.
    Acquire(Acquire),
    /// A write fenced by a lock holding's token.
    Fenced(Fenced),
    /// The lock key deleted by its holder (the unlock).
    Release(Release),
    /// The holder stopped acting on a holding without releasing it (informational).
    Abandon(Abandon),
    /// A key put with a lease, for the lease timing check.
    Attach(Attach),
    /// A linearizable read of an attached key: present or absent.
    Probe(Probe),
    /// A fault the nemesis injected.
    Fault(FaultRecord),
    /// Every fault healed.
    Heal(FaultRecord),
}

/// The allowances of the lease timing check's upper bound (`docs/lock-check.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// The cluster's election timeout: after a leader change the new leader gives every lease its
    /// full TTL plus this (etcd's rule).
    pub election_timeout_ms: u64,
    /// How long after a heal the cluster may take to have a leader again.
    pub recovery_ms: u64,
    /// Scheduling slack: the leader's expiry sweep, the revoke's commit, the probe's round trip.
    pub grace_ms: u64,
}

impl Default for Bounds {
    /// etcd's default election timeout (1 s); 5 s to restart and elect; 2 s of slack.
    fn default() -> Bounds {
        Bounds { election_timeout_ms: 1000, recovery_ms: 5000, grace_ms: 2000 }
    }
}

/// `LeaseGrant`, answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub client: u64,
    pub lease: LeaseId,
    /// The TTL the server granted, in seconds.
    pub ttl: i64,
    pub sent_us: Micros,
    pub at_us: Micros,
}

/// What a keep-alive's answer said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepaliveOutcome {
    /// Answered with a TTL > 0: the lease was renewed when the leader got it.
    Ok,
    /// Answered with a TTL ≤ 0: the lease no longer exists.
    Gone,
    /// An error, or no answer in time: the lease may or may not have been renewed.
    Unknown,
}

/// One keep-alive request of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keepalive {
    pub client: u64,
    pub lease: LeaseId,
    pub sent_us: Micros,
    /// The answer's arrival; for `unknown`, when the client gave up on it.
    pub at_us: Micros,
    pub outcome: KeepaliveOutcome,
    /// `ok` only, required: the TTL the answer carried (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
}

/// No keep-alive of `lease` is sent after `at_us`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    pub client: u64,
    pub lease: LeaseId,
    pub at_us: Micros,
}

/// `LeaseRevoke`, as sent (the lease may end from `sent_us` on, whatever the outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoke {
    pub client: u64,
    pub lease: LeaseId,
    pub sent_us: Micros,
    pub at_us: Micros,
    pub outcome: Outcome,
}

/// A completed acquisition of a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    pub client: u64,
    pub lock: String,
    /// The lease the lock key is attached to.
    pub lease: LeaseId,
    /// The client's lock key.
    pub key: String,
    /// The fencing token: the lock key's create revision.
    pub token: Revision,
    /// When the request that created the lock key was first sent.
    pub sent_us: Micros,
    /// When the client knew it held the lock.
    pub at_us: Micros,
}

/// A fenced write: `if create_revision(lock key) == token then put(resource, value)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fenced {
    pub client: u64,
    pub lock: String,
    pub token: Revision,
    pub resource: String,
    pub value: String,
    pub sent_us: Micros,
    /// The answer's arrival; for `unknown`, when the client gave up on it.
    pub at_us: Micros,
    /// ok: written at `revision`; fail: the compare failed (the lock key was not there with that
    /// create revision); unknown: written at some revision, or not.
    pub outcome: Outcome,
    /// `ok` only, required: the revision of the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
}

/// The unlock: a delete of the lock key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub client: u64,
    pub lock: String,
    pub token: Revision,
    pub sent_us: Micros,
    pub at_us: Micros,
    /// ok: deleted at `revision`; fail: the key was already gone; unknown: either, or not deleted.
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
}

/// The holder walked away from a holding (stopped its keep-alives), gave up on it, or saw its lease
/// lost. Informational: validity ends with the lease, not with this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abandon {
    pub client: u64,
    pub lock: String,
    pub token: Revision,
    pub at_us: Micros,
    pub reason: String,
}

/// A put of `key` with `lease`, acknowledged at `revision`. Only acknowledged puts are recorded:
/// a key whose put is in doubt says nothing when it is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub client: u64,
    pub lease: LeaseId,
    pub key: String,
    pub sent_us: Micros,
    pub at_us: Micros,
    pub revision: Revision,
}

/// A linearizable read of an attached key: it was served between `sent_us` and `at_us`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub client: u64,
    pub lease: LeaseId,
    pub key: String,
    pub sent_us: Micros,
    pub at_us: Micros,
    pub present: bool,
}

/// A fault or a heal, as the nemesis logged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub at_us: Micros,
    pub what: String,
}

/// Why a line is not a valid record, beyond being JSON of the right shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("an answer before its request (at_us {at_us} < sent_us {sent_us})")]
    AnswerBeforeRequest { sent_us: Micros, at_us: Micros },
    #[error("a TTL must be > 0, not {0}")]
    BadTtl(i64),
    #[error("an ok keep-alive needs its \"ttl\"")]
    OkKeepaliveWithoutTtl,
    #[error("only an ok keep-alive has a \"ttl\"")]
    TtlNotOk,
    #[error("an ok write needs its \"revision\" (> 0)")]
    OkWithoutRevision,
    #[error("only an ok write has a \"revision\"")]
    RevisionNotOk,
    #[error("a token (create revision) must be > 0, not {0}")]
    BadToken(Revision),
    #[error("lease {0} granted twice")]
    LeaseGrantedTwice(LeaseId),
    #[error("lease {lease} is not one client {client} was granted before this line")]
    UnknownLease { client: u64, lease: LeaseId },
    #[error("client {client} has acquired no {lock:?} with token {token} before this line")]
    UnknownHolding { client: u64, lock: String, token: Revision },
    #[error("lock {lock:?} acquired twice with token {token} by client {client}")]
    AcquiredTwice { client: u64, lock: String, token: Revision },
    #[error("key {key:?} is not attached to lease {lease} by client {client} before this line")]
    UnknownAttach { client: u64, lease: LeaseId, key: String },
    #[error("a second \"bounds\" record")]
    SecondBounds,
}

impl LockRecord {
    /// Checks the fields of the record on its own.
    pub fn validate(&self) -> Result<(), InvalidRecord> {
        let answered = |sent_us: Micros, at_us: Micros| match at_us < sent_us {
            true => Err(InvalidRecord::AnswerBeforeRequest { sent_us, at_us }),
            false => Ok(()),
        };
        let revision = |outcome: Outcome, revision: Option<Revision>| match (outcome, revision) {
            (Outcome::Ok, None) => Err(InvalidRecord::OkWithoutRevision),
            (Outcome::Ok, Some(r)) if r <= 0 => Err(InvalidRecord::OkWithoutRevision),
            (Outcome::Fail | Outcome::Unknown, Some(_)) => Err(InvalidRecord::RevisionNotOk),
            _ => Ok(()),
        };
        let token = |t: Revision| if t > 0 { Ok(()) } else { Err(InvalidRecord::BadToken(t)) };
        match self {
            LockRecord::Grant(g) => {
                answered(g.sent_us, g.at_us)?;
                if g.ttl <= 0 {
                    return Err(InvalidRecord::BadTtl(g.ttl));
                }
                Ok(())
            }
            LockRecord::Keepalive(k) => {
                answered(k.sent_us, k.at_us)?;
                match (k.outcome, k.ttl) {
                    (KeepaliveOutcome::Ok, None) => Err(InvalidRecord::OkKeepaliveWithoutTtl),
                    (KeepaliveOutcome::Ok, Some(t)) if t <= 0 => Err(InvalidRecord::BadTtl(t)),
                    (KeepaliveOutcome::Gone | KeepaliveOutcome::Unknown, Some(_)) => {
                        Err(InvalidRecord::TtlNotOk)
                    }
                    _ => Ok(()),
                }
            }
            LockRecord::Revoke(r) => answered(r.sent_us, r.at_us),
            LockRecord::Acquire(a) => {
                answered(a.sent_us, a.at_us)?;
                token(a.token)
            }
            LockRecord::Fenced(f) => {
                answered(f.sent_us, f.at_us)?;
                token(f.token)?;
                revision(f.outcome, f.revision)
            }
            LockRecord::Release(r) => {
                answered(r.sent_us, r.at_us)?;
                token(r.token)?;
                revision(r.outcome, r.revision)
            }
            LockRecord::Attach(a) => {
                answered(a.sent_us, a.at_us)?;
                revision(Outcome::Ok, Some(a.revision))
            }
            LockRecord::Probe(p) => answered(p.sent_us, p.at_us),
            LockRecord::Bounds(_)
            | LockRecord::Stop(_)
            | LockRecord::Abandon(_)
            | LockRecord::Fault(_)
            | LockRecord::Heal(_) => Ok(()),
        }
    }
}

/// A whole lock history, its records in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockHistory {
    pub records: Vec<LockRecord>,
}

/// Why a lock history could not be read. `line` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum LockHistoryError {
    #[error("line {line}: {source}")]
    Io { line: usize, source: std::io::Error },
    #[error("line {line}: not a valid lock record: {source}")]
    Json { line: usize, source: serde_json::Error },
    #[error("line {line}: {source}")]
    Invalid { line: usize, source: InvalidRecord },
}

/// A record the checks cannot work on, by its position in [`LockHistory::records`] (0-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record #{index}: {source}")]
pub struct InvalidLockHistory {
    pub index: usize,
    pub source: InvalidRecord,
}

/// Why a lock history could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LockWriteError {
    #[error("writing the lock history: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding a lock record: {0}")]
    Encode(#[source] serde_json::Error),
}

impl LockHistory {
    /// Reads JSON lines, one record per line; blank lines are skipped. Every record is validated
    /// ([`LockRecord::validate`], and what it refers to must come before it); the first bad line is
    /// the error.
    pub fn read_from(mut reader: impl BufRead) -> Result<LockHistory, LockHistoryError> {
        let mut history = LockHistory::default();
        let mut structure = Structure::default();
        let mut buf = String::new();
        let mut line = 0;
        loop {
            buf.clear();
            line += 1;
            let n = reader.read_line(&mut buf).map_err(|source| LockHistoryError::Io { line, source })?;
            if n == 0 {
                return Ok(history);
            }
            let text = buf.trim();
            if text.is_empty() {
                continue;
            }
            let record: LockRecord =
                serde_json::from_str(text).map_err(|source| LockHistoryError::Json { line, source })?;
            structure.next(&record).map_err(|source| LockHistoryError::Invalid { line, source })?;
            history.records.push(record);
        }
    }

    /// Writes the history in the format [`LockHistory::read_from`] reads.
    pub fn write_to(&self, writer: impl Write) -> Result<(), LockWriteError> {
        let mut out = std::io::BufWriter::new(writer);
        for record in &self.records {
            let mut bytes = serde_json::to_vec(record).map_err(LockWriteError::Encode)?;
            bytes.push(b'\n');
            out.write_all(&bytes)?;
        }
        out.flush()?;
        Ok(())
    }

    /// Checks every record, as the reader does.
    pub fn validate(&self) -> Result<(), InvalidLockHistory> {
        let mut structure = Structure::default();
        for (index, record) in self.records.iter().enumerate() {
            structure.next(record).map_err(|source| InvalidLockHistory { index, source })?;
        }
        Ok(())
    }
}

/// What the records so far allow next: leases, holdings and attached keys are referred to only
/// after they appear, by the client that owns them.
#[derive(Default)]
struct Structure {
    /// lease -> its client
    leases: HashMap<LeaseId, u64>,
    /// (client, lock, token)
    holdings: HashSet<(u64, String, Revision)>,
    /// (client, lease, key)
    attached: HashSet<(u64, LeaseId, String)>,
    bounds: bool,
}

impl Structure {
    fn next(&mut self, record: &LockRecord) -> Result<(), InvalidRecord> {
        record.validate()?;
        let lease_of = |s: &Structure, client: u64, lease: LeaseId| match s.leases.get(&lease) {
            Some(&c) if c == client => Ok(()),
            _ => Err(InvalidRecord::UnknownLease { client, lease }),
        };
        let holding = |s: &Structure, client: u64, lock: &str, token: Revision| match s.holdings.contains(&(
            client,
            lock.to_owned(),
            token,
        )) {
            true => Ok(()),
            false => Err(InvalidRecord::UnknownHolding { client, lock: lock.to_owned(), token }),
        };
        match record {
            LockRecord::Bounds(_) if self.bounds => return Err(InvalidRecord::SecondBounds),
            LockRecord::Bounds(_) => self.bounds = true,
            LockRecord::Grant(g) => {
                if self.leases.insert(g.lease, g.client).is_some() {
                    return Err(InvalidRecord::LeaseGrantedTwice(g.lease));
                }
            }
            LockRecord::Keepalive(k) => lease_of(self, k.client, k.lease)?,
            LockRecord::Stop(s) => lease_of(self, s.client, s.lease)?,
            LockRecord::Revoke(r) => lease_of(self, r.client, r.lease)?,
            LockRecord::Acquire(a) => {
                lease_of(self, a.client, a.lease)?;
                if !self.holdings.insert((a.client, a.lock.clone(), a.token)) {
                    return Err(InvalidRecord::AcquiredTwice {
                        client: a.client,
                        lock: a.lock.clone(),
                        token: a.token,
                    });
                }
            }
            LockRecord::Fenced(f) => holding(self, f.client, &f.lock, f.token)?,
            LockRecord::Release(r) => holding(self, r.client, &r.lock, r.token)?,
            LockRecord::Abandon(a) => holding(self, a.client, &a.lock, a.token)?,
            LockRecord::Attach(a) => {
                lease_of(self, a.client, a.lease)?;
                self.attached.insert((a.client, a.lease, a.key.clone()));
            }
            LockRecord::Probe(p) => {
                if !self.attached.contains(&(p.client, p.lease, p.key.clone())) {
                    return Err(InvalidRecord::UnknownAttach {
                        client: p.client,
                        lease: p.lease,
                        key: p.key.clone(),
                    });
                }
            }
            LockRecord::Fault(_) | LockRecord::Heal(_) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
{"kind":"bounds","election_timeout_ms":1000,"recovery_ms":5000,"grace_ms":2000}
{"kind":"grant","client":0,"lease":7587862,"ttl":4,"sent_us":1000,"at_us":1520}
{"kind":"keepalive","client":0,"lease":7587862,"sent_us":2000,"at_us":2100,"outcome":"ok","ttl":4}
{"kind":"acquire","client":0,"lock":"lock0","lease":7587862,"key":"lock0/73c8b6","token":37,"sent_us":2200,"at_us":2900}
{"kind":"fenced","client":0,"lock":"lock0","token":37,"resource":"res-lock0","value":"c0-1","sent_us":3000,"at_us":3100,"outcome":"ok","revision":41}
{"kind":"release","client":0,"lock":"lock0","token":37,"sent_us":3200,"at_us":3300,"outcome":"ok","revision":42}
{"kind":"revoke","client":0,"lease":7587862,"sent_us":3300,"at_us":3400,"outcome":"ok"}
{"kind":"fault","at_us":5000,"what":"kill -9 leader node 2"}
{"kind":"grant","client":4,"lease":7587870,"ttl":3,"sent_us":5100,"at_us":5200}
{"kind":"attach","client":4,"lease":7587870,"key":"lease/4-1","sent_us":5200,"at_us":5300,"revision":57}
{"kind":"keepalive","client":4,"lease":7587870,"sent_us":6200,"at_us":7200,"outcome":"unknown"}
{"kind":"heal","at_us":8000,"what":"restart node 2"}
{"kind":"stop","client":4,"lease":7587870,"at_us":8100}
{"kind":"probe","client":4,"lease":7587870,"key":"lease/4-1","sent_us":8200,"at_us":8300,"present":true}
{"kind":"probe","client":4,"lease":7587870,"key":"lease/4-1","sent_us":9900,"at_us":9950,"present":false}
"#;

    #[test]
    fn the_documented_example_reads_and_round_trips() {
        let h = LockHistory::read_from(EXAMPLE.as_bytes()).expect("valid");
        assert_eq!(h.records.len(), 15);
        let LockRecord::Keepalive(k) = &h.records[2] else { panic!("a keep-alive: {:?}", h.records[2]) };
        assert_eq!((k.outcome, k.ttl), (KeepaliveOutcome::Ok, Some(4)));
        let mut bytes = Vec::new();
        h.write_to(&mut bytes).expect("in memory");
        assert_eq!(LockHistory::read_from(bytes.as_slice()).expect("valid"), h);
    }

    #[test]
    fn bad_lines_are_named() {
        let err = |text: &str| LockHistory::read_from(text.as_bytes()).expect_err("invalid");
        let grant = r#"{"kind":"grant","client":0,"lease":1,"ttl":4,"sent_us":1,"at_us":2}"#;
        let e = err(r#"{"kind":"keepalive","client":0,"lease":1,"sent_us":1,"at_us":2,"outcome":"gone"}"#);
        assert!(matches!(
            e,
            LockHistoryError::Invalid {
                line: 1,
                source: InvalidRecord::UnknownLease { client: 0, lease: 1 }
            }
        ));
        let e = err(&format!(
            "{grant}\n{}",
            r#"{"kind":"keepalive","client":0,"lease":1,"sent_us":1,"at_us":2,"outcome":"ok"}"#
        ));
        assert!(matches!(
            e,
            LockHistoryError::Invalid { line: 2, source: InvalidRecord::OkKeepaliveWithoutTtl }
        ));
        let e = err(&format!("{grant}\n{}", grant.replace("\"client\":0", "\"client\":1")));
        assert!(matches!(
            e,
            LockHistoryError::Invalid { line: 2, source: InvalidRecord::LeaseGrantedTwice(1) }
        ));
        let e = err(&format!(
            "{grant}\n{}",
            r#"{"kind":"fenced","client":0,"lock":"l","token":5,"resource":"r","value":"v","sent_us":3,"at_us":4,"outcome":"ok","revision":9}"#
        ));
        assert!(matches!(
            e,
            LockHistoryError::Invalid { line: 2, source: InvalidRecord::UnknownHolding { .. } }
        ));
        let e = err(r#"{"kind":"grant","client":0,"lease":1,"ttl":4,"sent_us":5,"at_us":2}"#);
        assert!(matches!(
            e,
            LockHistoryError::Invalid { source: InvalidRecord::AnswerBeforeRequest { .. }, .. }
        ));
        let e = err(r#"{"kind":"nonsense"}"#);
        assert!(matches!(e, LockHistoryError::Json { line: 1, .. }));
    }
}
