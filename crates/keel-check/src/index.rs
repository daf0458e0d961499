//! The validated, indexed view of a history that every check starts from: each op's typed action,
//! the ops of each key, and who wrote each value.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::history::{Action, History, Op, Outcome};
use crate::CheckError;

/// A reference to one op of the history, carrying a copy of it so that a finding can be printed or
/// serialized on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpRef {
    /// Position in [`History::ops`] (0-based).
    pub index: usize,
    pub op: Op,
}

impl OpRef {
    pub(crate) fn new(history: &History, index: usize) -> OpRef {
        OpRef { index, op: history.ops[index].clone() }
    }
}

impl std::fmt::Display for OpRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op #{} ({})", self.index, self.op)
    }
}

pub(crate) struct Indexed<'h> {
    pub(crate) history: &'h History,
    /// `actions[i]` is `history.ops[i]`'s meaning.
    pub(crate) actions: Vec<Action<'h>>,
    /// Op indices per key, in history order.
    pub(crate) by_key: BTreeMap<&'h str, Vec<usize>>,
    /// Per key, per value: every write or cas of the value to the key, whatever its outcome.
    pub(crate) writers: HashMap<&'h str, HashMap<&'h str, Vec<usize>>>,
}

impl<'h> Indexed<'h> {
    pub(crate) fn new(history: &'h History) -> Result<Indexed<'h>, CheckError> {
        let mut actions = Vec::with_capacity(history.ops.len());
        let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut writers: HashMap<&str, HashMap<&str, Vec<usize>>> = HashMap::new();
        for (index, op) in history.ops.iter().enumerate() {
            let action = op.action().map_err(|source| CheckError::InvalidOp { index, source })?;
            by_key.entry(op.key.as_str()).or_default().push(index);
            if let Action::Write { value } | Action::Cas { value, .. } = action {
                writers.entry(op.key.as_str()).or_default().entry(value).or_default().push(index);
            }
            actions.push(action);
        }
        Ok(Indexed { history, actions, by_key, writers })
    }

    pub(crate) fn op(&self, index: usize) -> &'h Op {
        &self.history.ops[index]
    }

    pub(crate) fn initial(&self, key: &str) -> Option<&'h str> {
        self.history.initial.get(key).and_then(|v| v.as_deref())
    }

    /// The writers of `value` to `key` that may have taken effect (ok or unknown): a failed write
    /// or a cas whose comparison failed certainly did not write.
    pub(crate) fn effective_writers(&self, key: &str, value: &str) -> Vec<usize> {
        self.writers_of(key, value).iter().copied().filter(|&i| may_take_effect(self.op(i))).collect()
    }

    /// The writers of `value` to `key` that certainly did not take effect.
    pub(crate) fn failed_writers(&self, key: &str, value: &str) -> Vec<usize> {
        self.writers_of(key, value).iter().copied().filter(|&i| !may_take_effect(self.op(i))).collect()
    }

    fn writers_of(&self, key: &str, value: &str) -> &[usize] {
        self.writers.get(key).and_then(|values| values.get(value)).map_or(&[], Vec::as_slice)
    }

    /// How many times `value` may have been put into `key`: its effective writers, plus one if it
    /// is the key's initial value. The checks that reason "a value cannot come back" need this ≤ 1.
    pub(crate) fn times_written(&self, key: &str, value: &str) -> usize {
        self.effective_writers(key, value).len() + usize::from(self.initial(key) == Some(value))
    }

    /// Values put into a key more than once, which the runner promises never to do.
    pub(crate) fn duplicate_writes(&self) -> Vec<DuplicateWrite> {
        let mut out: Vec<DuplicateWrite> = self
            .writers
            .iter()
            .flat_map(|(key, values)| values.iter().map(move |(value, ops)| (key, value, ops)))
            .filter(|(key, value, _)| self.times_written(key, value) > 1)
            .map(|(key, value, ops)| DuplicateWrite {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
                ops: ops.clone(),
                initial: self.initial(key) == Some(value),
            })
            .collect();
        out.sort_by(|a, b| (&a.key, &a.value).cmp(&(&b.key, &b.value)));
        out
    }
}

/// A value written to one key more than once (or written and also the initial value). The cheap
/// checks skip such values rather than report something they cannot prove; linearizability does not
/// depend on unique values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DuplicateWrite {
    pub key: String,
    pub value: String,
    /// The write and cas ops (indices) that write it, whatever their outcome.
    pub ops: Vec<usize>,
    /// Also the key's initial value.
    pub initial: bool,
}

/// True unless the op certainly did not change its register: ok and unknown ops may have.
pub(crate) fn may_take_effect(op: &Op) -> bool {
    match op.outcome {
        Outcome::Ok | Outcome::Unknown => true,
        Outcome::Fail => false,
    }
}
