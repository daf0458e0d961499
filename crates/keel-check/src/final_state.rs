//! The final-state check: the value of each key read from the nodes after the faults healed must be
//! one the history can end with.
//!
//! The final state is treated as a read after every op; an op of unknown outcome may also take effect
//! after it (or never), so only ok ops and the times of ok ops are used as evidence. With unique
//! values, each finding proves a violation:
//! - the final value `v` must have been written (else it is a phantom);
//! - no ok write, cas or delete may have been invoked after every write of `v` completed: it took
//!   effect after `v` did, and `v` is never written again, so `v` cannot be the last value;
//! - an absent final value needs a delete (ok or unknown) that can fall after every ok write and
//!   ok cas (the initial value counts as a write at the beginning): else that write was lost.

use std::fmt;

use serde::Serialize;

use crate::history::{Action, History, KeyValues, Outcome};
use crate::index::{may_take_effect, Indexed, OpRef};
use crate::phantom::{cause, PhantomCause};
use crate::CheckError;

/// Something about a key's final value that no linearization of the history allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FinalStateFinding {
    /// The final value was never (effectively) written to the key.
    PhantomValue { key: String, value: String, cause: PhantomCause },
    /// The final value was certainly overwritten: `overwritten_by` is an ok op invoked after every
    /// write of `value` completed.
    StaleValue { key: String, value: String, overwritten_by: OpRef },
    /// The key ended absent, but no delete can fall after `write` (`None`: the key's initial value,
    /// which was never deleted).
    LostWrite { key: String, write: Option<OpRef> },
}

impl fmt::Display for FinalStateFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FinalStateFinding::PhantomValue { key, value, cause } => {
                write!(f, "key {key:?} ended holding {value:?}: {cause}")
            }
            FinalStateFinding::StaleValue { key, value, overwritten_by } => write!(
                f,
                "key {key:?} ended holding {value:?}, which {overwritten_by} overwrote: it was invoked after every write of {value:?} completed"
            ),
            FinalStateFinding::LostWrite { key, write: Some(write) } => write!(
                f,
                "key {key:?} ended absent, but no delete can come after {write}: the write was lost"
            ),
            FinalStateFinding::LostWrite { key, write: None } => write!(
                f,
                "key {key:?} ended absent, but its initial value was never deleted"
            ),
        }
    }
}

/// Checks the final value of each key in `final_state` (read from every node after healing; `None`
/// = absent) against the history. Keys missing from `final_state` are not checked.
pub fn check_final(history: &History, final_state: &KeyValues) -> Result<Vec<FinalStateFinding>, CheckError> {
    Ok(final_findings(&Indexed::new(history)?, final_state))
}

pub(crate) fn final_findings(index: &Indexed<'_>, final_state: &KeyValues) -> Vec<FinalStateFinding> {
    let mut found = Vec::new();
    let no_ops = Vec::new();
    for (key, value) in final_state {
        let ops = index.by_key.get(key.as_str()).unwrap_or(&no_ops);
        let finding = match value {
            Some(value) => present_value(index, key, value, ops),
            None => absent_value(index, key, ops),
        };
        found.extend(finding);
    }
    found
}

fn present_value(index: &Indexed<'_>, key: &str, value: &str, ops: &[usize]) -> Option<FinalStateFinding> {
    if let Some(cause) = cause(index, key, value, None) {
        return Some(FinalStateFinding::PhantomValue { key: key.to_owned(), value: value.to_owned(), cause });
    }
    // The latest moment a write of `value` can have taken effect; the initial value "completes"
    // before everything. An unknown writer may take effect at any time: no bound.
    let mut last_written = None;
    for w in index.effective_writers(key, value) {
        match index.op(w).completed_at() {
            Some(t) => last_written = Some(last_written.map_or(t, |l: u64| l.max(t))),
            None => return None,
        }
    }
    let overwriter = ops
        .iter()
        .copied()
        .filter(|&i| {
            let op = index.op(i);
            op.outcome == Outcome::Ok
                && !matches!(index.actions[i], Action::Read)
                && last_written.is_none_or(|t| op.invoke_us > t)
        })
        .min_by_key(|&i| (index.op(i).invoke_us, i))?;
    Some(FinalStateFinding::StaleValue {
        key: key.to_owned(),
        value: value.to_owned(),
        overwritten_by: OpRef::new(index.history, overwriter),
    })
}

fn absent_value(index: &Indexed<'_>, key: &str, ops: &[usize]) -> Option<FinalStateFinding> {
    // The latest time any delete may take effect (unknown deletes: any time at all).
    let mut latest_delete: Option<u64> = None;
    let mut any_delete = false;
    for &i in ops {
        let op = index.op(i);
        if matches!(index.actions[i], Action::Delete) && may_take_effect(op) {
            any_delete = true;
            let t = op.completed_at().unwrap_or(u64::MAX);
            latest_delete = Some(latest_delete.map_or(t, |l| l.max(t)));
        }
    }
    // Ok writes and ok cas certainly set a value; the one invoked last is the hardest to delete.
    let last_set = ops
        .iter()
        .copied()
        .filter(|&i| {
            index.op(i).outcome == Outcome::Ok
                && matches!(index.actions[i], Action::Write { .. } | Action::Cas { .. })
        })
        .max_by_key(|&i| (index.op(i).invoke_us, i));
    match last_set {
        // A delete can follow the write if it may take effect at or after the write's invoke.
        Some(w) if latest_delete.is_none_or(|d| d < index.op(w).invoke_us) => {
            Some(FinalStateFinding::LostWrite {
                key: key.to_owned(),
                write: Some(OpRef::new(index.history, w)),
            })
        }
        Some(_) => None,
        None if index.initial(key).is_some() && !any_delete => {
            Some(FinalStateFinding::LostWrite { key: key.to_owned(), write: None })
        }
        None => None,
    }
}
