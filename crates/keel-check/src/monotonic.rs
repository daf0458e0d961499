//! The monotonic-reads check: one client, reading one key, sees `v`, later something else, later `v`
//! again, each read completing before the next was invoked.
//!
//! With `v` written at most once (and not absent, which deletes can restore any number of times),
//! that proves a violation: the register changed away from `v` between the first two reads, and
//! only the one write of `v`, which took effect before the first read, could bring it back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::history::{Action, History, Outcome};
use crate::index::{Indexed, OpRef};
use crate::CheckError;

/// Three reads of one client, in real-time order, that went `value`, something else, `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonMonotonicRead {
    pub client: u64,
    pub key: String,
    pub value: String,
    pub first: OpRef,
    pub other: OpRef,
    pub again: OpRef,
}

impl fmt::Display for NonMonotonicRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client {} read {:?} from key {:?} again after it had been replaced: {}, then {}, then {}",
            self.client, self.value, self.key, self.first, self.other, self.again
        )
    }
}

/// Finds clients whose reads of a key went back to a value they had already seen replaced.
pub fn check_monotonic_reads(history: &History) -> Result<Vec<NonMonotonicRead>, CheckError> {
    Ok(non_monotonic_reads(&Indexed::new(history)?))
}

pub(crate) fn non_monotonic_reads(index: &Indexed<'_>) -> Vec<NonMonotonicRead> {
    let mut reads: BTreeMap<(u64, &str), Vec<usize>> = BTreeMap::new();
    for (i, op) in index.history.ops.iter().enumerate() {
        if op.outcome == Outcome::Ok && matches!(index.actions[i], Action::Read) {
            reads.entry((op.client, op.key.as_str())).or_default().push(i);
        }
    }
    let mut found = Vec::new();
    for ((client, key), mut ops) in reads {
        ops.sort_by_key(|&i| (index.op(i).invoke_us, i));
        found.extend(client_key(index, client, key, &ops));
    }
    found
}

/// The earliest proof that `value` was replaced: a read of it, then a read of something else.
#[derive(Clone, Copy)]
struct Replaced {
    first: usize,
    other: usize,
    /// When the read of something else completed.
    at: u64,
}

/// One client's ok reads of one key, by invoke time.
///
/// A client runs one op at a time, but nothing here relies on it: each step of the pattern is taken
/// only between reads that are ordered in real time (one completed before the next was invoked),
/// and where a client's reads overlap the check may miss a pattern, never invent one.
fn client_key(index: &Indexed<'_>, client: u64, key: &str, reads: &[usize]) -> Vec<NonMonotonicRead> {
    let mut found = Vec::new();
    // Values that can never come back, once read.
    let mut tracked: HashSet<&str> = HashSet::new();
    // Values read (with their first read), not yet seen replaced.
    let mut waiting: Vec<(&str, usize)> = Vec::new();
    let mut replaced: HashMap<&str, Replaced> = HashMap::new();
    for &r in reads {
        let op = index.op(r);
        let seen = op.read.as_ref().and_then(|v| v.as_deref());
        let complete = op.complete_us.unwrap_or(u64::MAX);
        if let Some(v) = seen {
            if let Some(rep) = replaced.get(v).copied() {
                if op.invoke_us > rep.at {
                    found.push(NonMonotonicRead {
                        client,
                        key: key.to_owned(),
                        value: v.to_owned(),
                        first: OpRef::new(index.history, rep.first),
                        other: OpRef::new(index.history, rep.other),
                        again: OpRef::new(index.history, r),
                    });
                    // One finding per value is enough; it cannot be "replaced" earlier than this.
                    replaced.insert(v, Replaced { at: u64::MAX, ..rep });
                }
            }
        }
        waiting.retain(|&(w, first)| {
            let first_done = index.op(first).complete_us.unwrap_or(u64::MAX);
            if seen != Some(w) && first_done < op.invoke_us {
                replaced.insert(w, Replaced { first, other: r, at: complete });
                false
            } else {
                true
            }
        });
        if let Some(v) = seen {
            if !tracked.contains(v) && index.times_written(key, v) <= 1 {
                tracked.insert(v);
                waiting.push((v, r));
            }
        }
    }
    found
}
