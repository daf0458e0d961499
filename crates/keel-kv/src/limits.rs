//! What one write may hold. The client APIs check it at the edge, and the leader checks it again
//! before it proposes ([`KvStore`](crate::store::KvStore)'s `validate`), so a write that came by
//! another path (a peer's `Forward`) meets the same limits.
//!
//! The byte size of a whole request is bounded twice: by `max_request_bytes` at the client API
//! (measured on the request as it arrived) and by Keel's `limits.max_command_bytes` on the encoded
//! command at the leader (keeld sets it from `max_request_bytes`).

use std::cell::Cell;
use std::collections::HashSet;

use crate::store::KvCommand;
use crate::store::Op;
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
            KvCommand::Put(p) => self.check_key(&p.key),
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
            let mut put_keys = HashSet::new();
            for op in ops {
                match op {
                    Op::Range(r) => self.check_key(&r.key)?,
                    Op::Put(p) => {
                        self.check_key(&p.key)?;
                        if !put_keys.insert(p.key.as_slice()) {
                            return Err(LimitError::DuplicateKey);
                        }
                    }
                    Op::DeleteRange(d) => self.check_key(&d.key)?,
                    Op::Txn(inner) => self.check_txn(inner, depth + 1)?,
                }
            }
        }
        Ok(())
    }
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
    use crate::store::Put;

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
}
