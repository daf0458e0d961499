//! The report of a linearizability violation on one key: its sub-history, the longest prefix the
//! search could linearize, and why none of the ops that could come next fits.

use std::fmt;

use serde::Serialize;

use crate::history::{describe, outcome_name, Action, KeyValues, Op, Shown};
use crate::index::Indexed;
use crate::model::{Ignored, KeyModel, Origin, State, Step};
use crate::wgl::would_hide;

/// One op of a key's sub-history, or the key's final value taken as a last read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum KeyOp {
    History { index: usize, op: Op },
    FinalRead { value: Option<String> },
}

/// A key's sub-history entry, with why it took no part in the search, if it did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubOp {
    pub op: KeyOp,
    pub ignored: Option<Ignored>,
}

/// One op of the linearized prefix and the register's value after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placed {
    pub op: KeyOp,
    pub after: Option<String>,
}

/// An op that could have come next after the prefix but did not fit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stuck {
    pub op: KeyOp,
    /// False for ops of unknown outcome, which did not have to be placed at all.
    pub required: bool,
    pub why: StuckReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StuckReason {
    /// A read (or the final value) saw something other than what the register holds.
    ReadMismatch,
    /// An ok cas expected something other than what the register holds.
    CasMismatch,
    /// A cas reported its comparison failed, but the register holds its `expect`.
    CasWouldSucceed,
    /// It would replace `value`, which is written only once and which `needed_by` still has to read.
    WouldHide { value: String, needed_by: KeyOp },
    /// It fits here, but no way of placing the rest of the ops after it works.
    DeadEnd,
}

/// Why one key's sub-history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub key: String,
    /// The key's first invoke: the report's times are relative to it.
    pub base_us: u64,
    /// Every op on the key, by invoke time (the final read last).
    pub history: Vec<SubOp>,
    /// The register's value before any op (from the history's header; absent by default).
    pub initial: Option<String>,
    /// How many ops had to be linearized.
    pub required: usize,
    /// The longest prefix the search linearized, in its order.
    pub linearized: Vec<Placed>,
    /// The register's value after that prefix.
    pub register: Option<String>,
    /// The ops that could have come next, none of which fits.
    pub stuck: Vec<Stuck>,
}

pub(crate) fn build(
    index: &Indexed<'_>,
    final_state: Option<&KeyValues>,
    model: &KeyModel,
    best: &[u32],
) -> Violation {
    let final_value = final_state.and_then(|f| f.get(&model.key)).cloned().flatten();
    let key_op = |origin: Origin| match origin {
        Origin::Op(index_) => KeyOp::History { index: index_, op: index.op(index_).clone() },
        Origin::FinalRead => KeyOp::FinalRead { value: final_value.clone() },
    };

    let mut history: Vec<SubOp> = model
        .ops
        .iter()
        .map(|&i| SubOp {
            op: key_op(Origin::Op(i)),
            ignored: model.ignored.iter().find(|(j, _)| *j == i).map(|(_, why)| *why),
        })
        .collect();
    history.sort_by_key(|s| match &s.op {
        KeyOp::History { index, op } => (op.invoke_us, *index),
        KeyOp::FinalRead { .. } => (u64::MAX, usize::MAX),
    });
    if model.entries.iter().any(|e| e.origin == Origin::FinalRead) {
        history.push(SubOp { op: key_op(Origin::FinalRead), ignored: None });
    }
    let base_us = model.ops.iter().map(|&i| index.op(i).invoke_us).min().unwrap_or(0);

    // Replay the prefix twice: on interned states (to ask the model why an op does not fit) and
    // on the real values (to show them).
    let mut placed = vec![false; model.entries.len()];
    let mut state: State = model.initial;
    let initial: Option<String> = index.initial(&model.key).map(str::to_owned);
    let mut register = initial.clone();
    let mut linearized = Vec::with_capacity(best.len());
    for &entry in best {
        let e = &model.entries[entry as usize];
        placed[entry as usize] = true;
        state = e.step.apply(state).unwrap_or(state);
        if let Origin::Op(i) = e.origin {
            register = match (index.actions[i], e.step) {
                (_, Step::CasFailed { .. } | Step::Read(_)) => register,
                (Action::Write { value } | Action::Cas { value, .. }, _) => Some(value.to_owned()),
                (Action::Delete, _) => None,
                (Action::Read, _) => register,
            };
        }
        linearized.push(Placed { op: key_op(e.origin), after: register.clone() });
    }

    // The ops that could go next: not placed, invoked by the time the first pending required op
    // had to complete.
    let deadline = model
        .entries
        .iter()
        .zip(&placed)
        .filter(|(e, &p)| !p && e.required)
        .map(|(e, _)| e.complete)
        .min()
        .unwrap_or(u64::MAX);
    let mut candidates: Vec<usize> =
        (0..model.entries.len()).filter(|&i| !placed[i] && model.entries[i].invoke <= deadline).collect();
    candidates.sort_by_key(|&i| (model.entries[i].invoke, i));
    let stuck = candidates
        .into_iter()
        .map(|i| {
            let e = &model.entries[i];
            let why = match (e.step, e.step.apply(state)) {
                (Step::Read(_), None) => StuckReason::ReadMismatch,
                (Step::Cas { .. }, None) => StuckReason::CasMismatch,
                (Step::CasFailed { .. }, None) => StuckReason::CasWouldSucceed,
                (step, Some(_)) if would_hide(model, &placed, step, state) => {
                    let needer = model
                        .entries
                        .iter()
                        .zip(&placed)
                        .enumerate()
                        .find(|(j, (other, &p))| {
                            !p && *j != i && other.required && other.step.needs() == Some(state)
                        })
                        .map(|(_, (other, _))| key_op(other.origin));
                    match needer {
                        Some(needed_by) => {
                            StuckReason::WouldHide { value: register.clone().unwrap_or_default(), needed_by }
                        }
                        None => StuckReason::DeadEnd,
                    }
                }
                _ => StuckReason::DeadEnd,
            };
            Stuck { op: key_op(e.origin), required: e.required, why }
        })
        .collect();

    Violation {
        key: model.key.clone(),
        base_us,
        history,
        initial,
        required: model.entries.iter().filter(|e| e.required).count(),
        linearized,
        register,
        stuck,
    }
}

/// An op on one line, with times relative to `base`.
struct Line<'a> {
    op: &'a KeyOp,
    base: u64,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            KeyOp::History { index, op } => {
                let start = op.invoke_us.saturating_sub(self.base);
                let end = match op.completed_at() {
                    Some(t) => t.saturating_sub(self.base).to_string(),
                    None => "?".to_owned(),
                };
                write!(f, "#{index:<6} c{:<4} [{start:>9} ..{end:>9}] ", op.client)?;
                describe(op, f)?;
                write!(f, "  {}", outcome_name(op))
            }
            KeyOp::FinalRead { value } => {
                write!(
                    f,
                    "{:<13} [{:>9} ..{:>9}] final value {}",
                    "final",
                    "end",
                    "end",
                    Shown(value.as_deref())
                )
            }
        }
    }
}

/// An op named within a sentence: `#2 c2 cas "k" "a" -> "c"`.
struct Short<'a>(&'a KeyOp);

impl fmt::Display for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            KeyOp::History { index, op } => {
                write!(f, "#{index} c{} ", op.client)?;
                describe(op, f)
            }
            KeyOp::FinalRead { value } => write!(f, "the final value {}", Shown(value.as_deref())),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.base_us;
        let ops = self.history.iter().filter(|s| matches!(s.op, KeyOp::History { .. })).count();
        let and_final = if ops < self.history.len() { " and its final value" } else { "" };
        writeln!(
            f,
            "key {:?} is not linearizable ({ops} ops{and_final}; times in µs after {base})",
            self.key
        )?;
        writeln!(f, "sub-history:")?;
        for sub in &self.history {
            write!(f, "  {}", Line { op: &sub.op, base })?;
            if let Some(why) = sub.ignored {
                write!(f, "  ({})", why.describe())?;
            }
            writeln!(f)?;
        }
        writeln!(f, "initial value: {}", Shown(self.initial.as_deref()))?;
        writeln!(
            f,
            "longest linearizable prefix found: {} ops ({} ops had to be placed):",
            self.linearized.len(),
            self.required
        )?;
        if self.linearized.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for (n, placed) in self.linearized.iter().enumerate() {
            writeln!(
                f,
                "  {:>4}. {}  => {}",
                n + 1,
                Line { op: &placed.op, base },
                Shown(placed.after.as_deref())
            )?;
        }
        writeln!(
            f,
            "then the register holds {}, and none of the ops that could come next fits:",
            Shown(self.register.as_deref())
        )?;
        for stuck in &self.stuck {
            let optional = if stuck.required { "" } else { " (unknown outcome: optional)" };
            writeln!(f, "  {}{optional}", Line { op: &stuck.op, base })?;
            match &stuck.why {
                StuckReason::ReadMismatch => writeln!(f, "      it saw something else")?,
                StuckReason::CasMismatch => writeln!(f, "      its expected value is not there")?,
                StuckReason::CasWouldSucceed => {
                    writeln!(f, "      it failed, but its expected value is there: it would have succeeded")?
                }
                StuckReason::WouldHide { value, needed_by } => writeln!(
                    f,
                    "      it would replace {value:?} for good (written once), but {} still needs it",
                    Short(needed_by)
                )?,
                StuckReason::DeadEnd => writeln!(f, "      it fits, but nothing after it does")?,
            }
        }
        Ok(())
    }
}
