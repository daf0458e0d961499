//! The phantom-read check: every value an ok read returned (or an ok cas found) must have been
//! written to that key, by an op that may have taken effect, invoked before the read completed.
//!
//! Each finding proves a violation on its own: a register only ever holds its initial value or a
//! value some op wrote, and that op's effect falls after its invoke.

use std::fmt;

use serde::Serialize;

use crate::history::{Action, History, Outcome};
use crate::index::{Indexed, OpRef};
use crate::CheckError;

/// An ok read (or ok cas) that observed a value nothing could have put there at that time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhantomRead {
    pub read: OpRef,
    pub value: String,
    pub cause: PhantomCause,
}

/// Why the observed value cannot have been there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PhantomCause {
    /// No op wrote it to this key, and it is not the key's initial value.
    NeverWritten,
    /// Only ops that certainly did not take effect wrote it (outcome fail, or rejected).
    WriteFailed { writers: Vec<usize> },
    /// Every op that wrote it was invoked after the read completed: a read of the future.
    WrittenAfterRead { writers: Vec<usize> },
}

impl fmt::Display for PhantomCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PhantomCause::NeverWritten => f.write_str("no op ever wrote it to this key"),
            PhantomCause::WriteFailed { writers } => {
                write!(f, "only written by ops that failed: {}", list(writers))
            }
            PhantomCause::WrittenAfterRead { writers } => {
                write!(f, "only written by ops invoked after the read completed: {}", list(writers))
            }
        }
    }
}

impl fmt::Display for PhantomRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} observed {:?}: {}", self.read, self.value, self.cause)
    }
}

pub(crate) fn list(ops: &[usize]) -> String {
    let names: Vec<String> = ops.iter().map(|i| format!("#{i}")).collect();
    names.join(", ")
}

/// Finds ok reads and ok cas ops that observed a value no op could have written by then.
pub fn check_phantom_reads(history: &History) -> Result<Vec<PhantomRead>, CheckError> {
    Ok(phantom_reads(&Indexed::new(history)?))
}

pub(crate) fn phantom_reads(index: &Indexed<'_>) -> Vec<PhantomRead> {
    let mut found = Vec::new();
    for (i, op) in index.history.ops.iter().enumerate() {
        if op.outcome != Outcome::Ok {
            continue;
        }
        // A failed cas observed "not expect", which is not a value: nothing to trace.
        let seen = match index.actions[i] {
            Action::Read => op.read.as_ref().and_then(|v| v.as_deref()),
            Action::Cas { expect, .. } => expect,
            Action::Write { .. } | Action::Delete => None,
        };
        let Some(value) = seen else { continue };
        if let Some(cause) = cause(index, &op.key, value, op.complete_us) {
            found.push(PhantomRead { read: OpRef::new(index.history, i), value: value.to_owned(), cause });
        }
    }
    found
}

/// Why `value` cannot be in `key` at a moment before `by` (`None`: no bound), or `None` if it can.
pub(crate) fn cause(index: &Indexed<'_>, key: &str, value: &str, by: Option<u64>) -> Option<PhantomCause> {
    if index.initial(key) == Some(value) {
        return None;
    }
    let effective = index.effective_writers(key, value);
    if effective.is_empty() {
        let failed = index.failed_writers(key, value);
        return Some(if failed.is_empty() {
            PhantomCause::NeverWritten
        } else {
            PhantomCause::WriteFailed { writers: failed }
        });
    }
    let by = by?;
    // Equal times count as concurrent: the write may take effect at the very instant the read does.
    if effective.iter().all(|&w| index.op(w).invoke_us > by) {
        return Some(PhantomCause::WrittenAfterRead { writers: effective });
    }
    None
}
