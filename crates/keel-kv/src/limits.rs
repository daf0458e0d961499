//! What one write may hold. The client APIs check it at the edge, and the leader checks it again
//! before it proposes ([`KvStore`](crate::store::KvStore)'s `validate`), so a write that came by
//! another path (a peer's `Forward`) meets the same limits.
//!
//! The byte size of a whole request is bounded twice: by `max_request_bytes` at the client API
//! (measured on the request as it arrived) and by Keel's `limits.max_command_bytes` on the encoded
//! command at the leader (keeld sets it from `max_request_bytes`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::collections::HashSet;
use std::ops::Bound::Included;
use std::ops::Bound::Unbounded;

use crate::store::KvCommand;
use crate::store::Op;
use crate::store::Put;
use crate::store::Txn;

/// etcd's limit on operations in one txn (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// How deeply txns may nest. etcd has no limit of its own, but gRPC's decoder stops at 100
/// nested messages (two per txn level). Checked while a command decodes (see
/// [`DecodeDepth`]): a forged command nested a million deep would otherwise overflow the stack
/// of every node that decodes it.
pub const MAX_TXN_DEPTH: usize = 64;

/// Why a write was refused before it was proposed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("key is not provided")]
    EmptyKey,
    #[error("key is {size} bytes, over the {limit} byte limit")]
    KeyTooLarge { size: usize, limit: usize },
    #[error("too many operations in txn request (limit {MAX_TXN_OPS})")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    /// etcd's `ErrGRPCValueProvided`: `ignore_value` with a value.
    #[error("value is provided")]
    ValueProvided,
    /// etcd's `ErrGRPCLeaseProvided`: `ignore_lease` with a lease.
    #[error("lease is provided")]
    LeaseProvided,
    #[error("txns nested more than {MAX_TXN_DEPTH} deep")]
    TooDeep,
    #[error("lease {id} with TTL {ttl} cannot be granted (id 0, or TTL outside 1..=9000000000)")]
    BadLease { id: i64, ttl: i64 },
    #[error("a request on behalf of a user nested in another")]
    NestedUser,
}

/// The limits a node enforces on writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_key_bytes: crate::config::DEFAULT_MAX_KEY_BYTES }
    }
}

impl Limits {
    /// Refuses an empty or oversized key.
    pub fn check_key(&self, key: &[u8]) -> Result<(), LimitError> {
        if key.is_empty() {
            return Err(LimitError::EmptyKey);
        }
        if key.len() > self.max_key_bytes {
            return Err(LimitError::KeyTooLarge { size: key.len(), limit: self.max_key_bytes });
        }
        Ok(())
    }

    /// Checks a write's keys and shape.
    pub fn check(&self, cmd: &KvCommand) -> Result<(), LimitError> {
        match cmd {
            KvCommand::Put(p) => self.check_put(p),
            KvCommand::DeleteRange(d) => self.check_key(&d.key),
            KvCommand::Txn(t) => self.check_txn(t, 1),
            KvCommand::LeaseGrant { id, ttl } => {
                if *id == 0 || !(1..=crate::store::MAX_LEASE_TTL).contains(ttl) {
                    return Err(LimitError::BadLease { id: *id, ttl: *ttl });
                }
                Ok(())
            }
            KvCommand::Compact { .. }
            | KvCommand::AllocateMemberId { .. }
            | KvCommand::Alarm(_)
            | KvCommand::LeaseRevoke { .. }
            | KvCommand::Auth(_) => Ok(()),
            KvCommand::AsUser { cmd, .. } => match **cmd {
                KvCommand::AsUser { .. } => Err(LimitError::NestedUser),
                ref inner => self.check(inner),
            },
        }
    }

    /// etcd's `checkPutRequest`: a key, and no value or lease beside the flag that ignores it.
    fn check_put(&self, p: &Put) -> Result<(), LimitError> {
        self.check_key(&p.key)?;
        if p.ignore_value && !p.value.is_empty() {
            return Err(LimitError::ValueProvided);
        }
        if p.ignore_lease && p.lease != 0 {
            return Err(LimitError::LeaseProvided);
        }
        Ok(())
    }

    fn check_txn(&self, t: &Txn, depth: usize) -> Result<(), LimitError> {
        if depth > MAX_TXN_DEPTH {
            return Err(LimitError::TooDeep);
        }
        if t.compare.len() > MAX_TXN_OPS || t.success.len() > MAX_TXN_OPS || t.failure.len() > MAX_TXN_OPS {
            return Err(LimitError::TooManyOps);
        }
        for c in &t.compare {
            self.check_key(&c.key)?;
        }
        for ops in [&t.success, &t.failure] {
            for op in ops {
                match op {
                    Op::Range(r) => self.check_key(&r.key)?,
                    Op::Put(p) => self.check_put(p)?,
                    Op::DeleteRange(d) => self.check_key(&d.key)?,
                    Op::Txn(inner) => self.check_txn(inner, depth + 1)?,
                }
            }
        }
        // Each branch on its own: only one of them runs.
        written_keys(&t.success)?;
        written_keys(&t.failure)?;
        Ok(())
    }
}

/// The keys deleted ranges cover, as etcd's duplicate check sees them: `[key, range_end)`
/// compared as plain byte strings, or `key` alone (`[key, key\0)`). etcd compares the end `\0`
/// as a string too, so a delete of every key from `key` on covers no put: nor does it here.
/// Kept as disjoint intervals by start, so a check costs O(log n) however many deletes a large
/// nested txn holds.
#[derive(Default)]
struct Covered(BTreeMap<Vec<u8>, Vec<u8>>);

impl Covered {
    fn delete(&mut self, key: &[u8], range_end: &[u8]) {
        let end = if range_end.is_empty() { [key, &[0]].concat() } else { range_end.to_vec() };
        self.insert(key.to_vec(), end);
    }

    fn insert(&mut self, mut start: Vec<u8>, mut end: Vec<u8>) {
        if end <= start {
            return;
        }
        if let Some((s, e)) = self.0.range::<[u8], _>((Unbounded, Included(start.as_slice()))).next_back() {
            if *e >= start {
                start = s.clone();
                end = end.max(e.clone());
            }
        }
        let absorbed: Vec<Vec<u8>> = self
            .0
            .range::<[u8], _>((Included(start.as_slice()), Included(end.as_slice())))
            .map(|(s, _)| s.clone())
            .collect();
        for s in absorbed {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }

    fn covers(&self, k: &[u8]) -> bool {
        self.0.range::<[u8], _>((Unbounded, Included(k))).next_back().is_some_and(|(_, e)| k < e.as_slice())
    }

    fn union(&mut self, other: Covered) {
        for (s, e) in other.0 {
            self.insert(s, e);
        }
    }
}

/// The keys one branch of a txn puts, and the ranges it deletes, nested txns included; refuses
/// the branch if it writes a key twice: two puts of one key, or a put of a key a delete of the
/// same branch covers. etcd's `checkIntervals` (`etcdserver/api/v3rpc/key.go`), rule for rule:
/// a nested txn counts with both its branches, and the same key put in both branches of one
/// nested txn is no duplicate (only one of them runs); a delete and a put of the same key at one
/// level are a duplicate in either order; two deletes never are.
fn written_keys(ops: &[Op]) -> Result<(HashSet<&[u8]>, Covered), LimitError> {
    let mut dels = Covered::default();
    for op in ops {
        if let Op::DeleteRange(d) = op {
            dels.delete(&d.key, &d.range_end);
        }
    }
    let mut puts: HashSet<&[u8]> = HashSet::new();
    for op in ops {
        let Op::Txn(inner) = op else { continue };
        let (puts_then, dels_then) = written_keys(&inner.success)?;
        let (puts_else, dels_else) = written_keys(&inner.failure)?;
        for &k in &puts_then {
            if puts.contains(k) || dels.covers(k) {
                return Err(LimitError::DuplicateKey);
            }
            puts.insert(k);
        }
        for &k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || dels.covers(k) {
                return Err(LimitError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.union(dels_then);
        dels.union(dels_else);
    }
    for op in ops {
        let Op::Put(p) = op else { continue };
        let k = p.key.as_slice();
        if !puts.insert(k) || dels.covers(k) {
            return Err(LimitError::DuplicateKey);
        }
    }
    Ok((puts, dels))
}

thread_local! {
    static TXN_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Counts the txns being decoded on this thread, nested; decoding one past [`MAX_TXN_DEPTH`]
/// fails instead of recursing on. Decoding is synchronous, so a thread-local count is exact.
pub(crate) struct DecodeDepth(());

impl DecodeDepth {
    /// Enters one txn level; `None` if that is too deep.
    pub(crate) fn enter() -> Option<Self> {
        let depth = TXN_DEPTH.with(|d| {
            let depth = d.get() + 1;
            d.set(depth);
            depth
        });
        let guard = Self(());
        (depth <= MAX_TXN_DEPTH).then_some(guard)
    }
}

impl Drop for DecodeDepth {
    fn drop(&mut self) {
        TXN_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeleteRange;

    fn nested(depth: usize) -> Txn {
        let mut t =
            Txn { success: vec![Op::Put(Put { key: b"k".to_vec(), ..Put::default() })], ..Txn::default() };
        for _ in 1..depth {
            t = Txn { success: vec![Op::Txn(t)], ..Txn::default() };
        }
        t
    }

    #[test]
    fn nesting_is_bounded_when_checked_and_when_decoded() {
        let limits = Limits::default();
        assert_eq!(Ok(()), limits.check(&KvCommand::Txn(nested(MAX_TXN_DEPTH))));
        assert_eq!(Err(LimitError::TooDeep), limits.check(&KvCommand::Txn(nested(MAX_TXN_DEPTH + 1))));

        let ok = postcard::to_stdvec(&KvCommand::Txn(nested(MAX_TXN_DEPTH))).expect("encodes");
        assert!(postcard::from_bytes::<KvCommand>(&ok).is_ok());
        let deep = postcard::to_stdvec(&KvCommand::Txn(nested(MAX_TXN_DEPTH + 1))).expect("encodes");
        assert!(postcard::from_bytes::<KvCommand>(&deep).is_err());
        // The count unwinds after a failed decode: the next one starts from zero.
        assert!(postcard::from_bytes::<KvCommand>(&ok).is_ok());
    }

    #[test]
    fn a_forged_command_nested_a_million_deep_is_refused_without_overflowing_the_stack() {
        // KvCommand::Txn, then per level: no compares, one success op that is a Txn, and so on.
        let mut bytes = vec![2u8];
        for _ in 0..1_000_000 {
            bytes.extend_from_slice(&[0, 1, 3]);
        }
        assert!(postcard::from_bytes::<KvCommand>(&bytes).is_err());
    }

    #[test]
    fn keys_ops_and_duplicates() {
        let limits = Limits { max_key_bytes: 4 };
        assert_eq!(Err(LimitError::EmptyKey), limits.check_key(b""));
        assert_eq!(Err(LimitError::KeyTooLarge { size: 5, limit: 4 }), limits.check_key(b"12345"));
        let put = |k: &[u8]| Op::Put(Put { key: k.to_vec(), ..Put::default() });
        let dup = Txn { success: vec![put(b"a"), put(b"a")], ..Txn::default() };
        assert_eq!(Err(LimitError::DuplicateKey), limits.check(&KvCommand::Txn(dup)));
        let many = Txn { failure: (0..=MAX_TXN_OPS).map(|_| put(b"a")).collect(), ..Txn::default() };
        assert_eq!(Err(LimitError::TooManyOps), limits.check(&KvCommand::Txn(many)));
    }

    #[test]
    fn deleted_ranges_merge_and_cover_what_etcd_counts_as_covered() {
        let mut c = Covered::default();
        c.delete(b"k", b"m");
        c.delete(b"b", b"d");
        c.delete(b"c", b"l"); // joins both
        c.delete(b"x", b"");
        c.delete(b"p", b"\0"); // etcd compares the end as a string: covers nothing
        assert_eq!(2, c.0.len(), "{:?}", c.0);
        for k in [&b"b"[..], b"c", b"k", b"l\xff", b"x"] {
            assert!(c.covers(k), "{k:?}");
        }
        for k in [&b"a"[..], b"m", b"p", b"q", b"x\0", b"w"] {
            assert!(!c.covers(k), "{k:?}");
        }
    }

    #[test]
    fn puts_and_deletes_of_one_branch_are_checked_as_etcd_checks_them() {
        let limits = Limits::default();
        let put = |k: &[u8]| Op::Put(Put { key: k.to_vec(), ..Put::default() });
        let del = |k: &[u8], e: &[u8]| {
            Op::DeleteRange(DeleteRange { key: k.to_vec(), range_end: e.to_vec(), prev_kv: false })
        };
        let nested = |s: Vec<Op>, f: Vec<Op>| Op::Txn(Txn { success: s, failure: f, ..Txn::default() });
        let check = |ops: Vec<Op>| limits.check(&KvCommand::Txn(Txn { success: ops, ..Txn::default() }));
        assert_eq!(Err(LimitError::DuplicateKey), check(vec![put(b"d"), nested(vec![], vec![put(b"d")])]));
        assert_eq!(Err(LimitError::DuplicateKey), check(vec![del(b"a", b"b"), put(b"a1")]));
        assert_eq!(
            Err(LimitError::DuplicateKey),
            check(vec![nested(vec![del(b"k", b"m")], vec![]), put(b"l")])
        );
        assert_eq!(Ok(()), check(vec![nested(vec![put(b"d")], vec![put(b"d")])]));
        assert_eq!(
            Ok(()),
            check(vec![nested(vec![put(b"l")], vec![]), nested(vec![del(b"k", b"m")], vec![])])
        );
        let ignored = Put { key: b"k".to_vec(), value: b"v".to_vec(), ignore_value: true, ..Put::default() };
        assert_eq!(Err(LimitError::ValueProvided), limits.check(&KvCommand::Put(ignored)));
        let ignored = Put { key: b"k".to_vec(), lease: 7, ignore_lease: true, ..Put::default() };
        assert_eq!(Err(LimitError::LeaseProvided), check(vec![Op::Put(ignored)]));
    }
}
