//! One key's sub-history as the linearizability search sees it: which ops take part (and why the
//! others are left out), each as a step on a register whose values are interned into small ids.
//!
//! Values no op can observe (no read returned them, no cas compared against them, not the final
//! value) all become one id, [`OTHER`]: a register holding one of them behaves the same for every
//! op of the history, and merging them lets the search's memo recognize more states as equal.

use std::collections::HashMap;

use serde::Serialize;

use crate::history::{Action, KeyValues, Outcome};
use crate::index::Indexed;

/// A register value, interned. [`ABSENT`] and [`OTHER`] are fixed; observed values start at 2.
pub(crate) type State = u32;
pub(crate) const ABSENT: State = 0;
pub(crate) const OTHER: State = 1;
const FIRST_VALUE: State = 2;

/// What an op does to the register, and when it may apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Read(State),
    Write(State),
    Cas {
        expect: State,
        value: State,
    },
    /// A cas whose comparison failed: a read that saw anything but `expect`.
    CasFailed {
        expect: State,
    },
    Delete,
}

impl Step {
    /// The register after this step from `state`, or `None` if the step cannot happen there.
    pub(crate) fn apply(self, state: State) -> Option<State> {
        match self {
            Step::Read(v) => (state == v).then_some(state),
            Step::Write(v) => Some(v),
            Step::Cas { expect, value } => (state == expect).then_some(value),
            Step::CasFailed { expect } => (state != expect).then_some(state),
            Step::Delete => Some(ABSENT),
        }
    }

    /// The value this step needs to find in the register, if it needs a specific one.
    pub(crate) fn needs(self) -> Option<State> {
        match self {
            Step::Read(v) | Step::Cas { expect: v, .. } => Some(v),
            Step::Write(_) | Step::CasFailed { .. } | Step::Delete => None,
        }
    }
}

/// Where a search entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `history.ops[i]`.
    Op(usize),
    /// The key's final value, as a read after every op.
    FinalRead,
}

/// One op in the search.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) origin: Origin,
    pub(crate) step: Step,
    pub(crate) invoke: u64,
    /// `u64::MAX` for ops that are not required (outcome unknown): no completion bound.
    pub(crate) complete: u64,
    /// Must be linearized (ok, or a failed cas). The others may take effect or not.
    pub(crate) required: bool,
    /// Non-zero for optional blind ops with the same effect as every other of their class: the
    /// search tries only one of them at each point (see `wgl`). A bit mask.
    pub(crate) class: u8,
}

/// Optional writes of a value no op observes.
pub(crate) const CLASS_OTHER_WRITE: u8 = 1;
/// Optional deletes.
pub(crate) const CLASS_DELETE: u8 = 2;

/// Why an op of the key takes no part in the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ignored {
    /// Rejected with a definite error before anything happened.
    Rejected,
    /// A read that did not complete ok: it carries no information.
    NoInformation,
    /// A failed write or delete: it certainly did nothing.
    Failed,
    /// An op of unknown outcome whose effect no op could ever observe: linearizing it never helps,
    /// so leaving it out (taking it as never happened) changes no verdict.
    Unobservable,
}

impl Ignored {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Ignored::Rejected => "ignored: rejected",
            Ignored::NoInformation => "ignored: carries no information",
            Ignored::Failed => "ignored: certainly did nothing",
            Ignored::Unobservable => "ignored: unknown, and no op could observe its effect",
        }
    }
}

/// One key's search problem.
#[derive(Debug)]
pub(crate) struct KeyModel {
    pub(crate) key: String,
    pub(crate) entries: Vec<Entry>,
    pub(crate) initial: State,
    /// Per state id: the value is put in the register at most once (by an op or as the initial
    /// value), so once replaced it never comes back.
    pub(crate) unique: Vec<bool>,
    /// Per state id: how many required entries need to find it in the register.
    pub(crate) needed_by: Vec<u32>,
    /// The key's ops left out of the search, with the reason.
    pub(crate) ignored: Vec<(usize, Ignored)>,
    /// Every history op of the key (in the search or not), in history order.
    pub(crate) ops: Vec<usize>,
}

impl KeyModel {
    /// How many history ops of the key there are: the "size" used to pick which failure to show.
    pub(crate) fn size(&self) -> usize {
        self.ops.len()
    }
}

/// Builds the search problem of every key that has ops or a final value.
pub(crate) fn build(index: &Indexed<'_>, final_state: Option<&KeyValues>) -> Vec<KeyModel> {
    let mut keys: Vec<&str> = index.by_key.keys().copied().collect();
    if let Some(final_state) = final_state {
        keys.extend(final_state.keys().map(String::as_str).filter(|k| !index.by_key.contains_key(k)));
    }
    keys.into_iter()
        .map(|key| {
            let final_value = final_state.and_then(|f| f.get(key)).map(|v| v.as_deref());
            build_key(index, key, final_value)
        })
        .collect()
}

/// A participating op before values are interned.
struct Raw<'h> {
    origin: Origin,
    action: RawStep<'h>,
    invoke: u64,
    complete: u64,
    required: bool,
}

#[derive(Clone, Copy)]
enum RawStep<'h> {
    Read(Option<&'h str>),
    Write(&'h str),
    Cas { expect: Option<&'h str>, value: &'h str },
    CasFailed { expect: Option<&'h str> },
    Delete,
}

fn build_key(index: &Indexed<'_>, key: &str, final_value: Option<Option<&str>>) -> KeyModel {
    let ops: Vec<usize> = index.by_key.get(key).cloned().unwrap_or_default();
    let mut raw: Vec<Raw<'_>> = Vec::new();
    let mut ignored = Vec::new();
    let mut last_time = 0;
    for &i in &ops {
        let op = index.op(i);
        last_time = last_time.max(op.invoke_us).max(op.completed_at().unwrap_or(0));
        if op.is_rejected() {
            ignored.push((i, Ignored::Rejected));
            continue;
        }
        let required = op.outcome != Outcome::Unknown;
        let action = match (index.actions[i], op.outcome) {
            (Action::Read, Outcome::Ok) => RawStep::Read(op.read.as_ref().and_then(|v| v.as_deref())),
            (Action::Read, _) => {
                ignored.push((i, Ignored::NoInformation));
                continue;
            }
            (Action::Write { .. } | Action::Delete, Outcome::Fail) => {
                ignored.push((i, Ignored::Failed));
                continue;
            }
            (Action::Write { value }, _) => RawStep::Write(value),
            (Action::Delete, _) => RawStep::Delete,
            (Action::Cas { expect, .. }, Outcome::Fail) => RawStep::CasFailed { expect },
            (Action::Cas { expect, value }, _) => RawStep::Cas { expect, value },
        };
        let complete = if required { op.complete_us.unwrap_or(u64::MAX) } else { u64::MAX };
        raw.push(Raw { origin: Origin::Op(i), action, invoke: op.invoke_us, complete, required });
    }
    if let Some(value) = final_value {
        // After every op of the key: real time puts it after all ok ops. Ops of unknown outcome
        // may fall before it or not at all (which also covers "took effect after it").
        let at = last_time.saturating_add(1);
        raw.push(Raw {
            origin: Origin::FinalRead,
            action: RawStep::Read(value),
            invoke: at,
            complete: at,
            required: true,
        });
    }

    // Observed values get their own ids; the rest are OTHER.
    let mut ids: HashMap<&str, State> = HashMap::new();
    let mut absent_observed = false;
    for r in &raw {
        let seen = match r.action {
            RawStep::Read(v) => v,
            RawStep::Cas { expect, .. } | RawStep::CasFailed { expect } => expect,
            RawStep::Write(_) | RawStep::Delete => continue,
        };
        match seen {
            Some(v) => {
                let next = FIRST_VALUE + ids.len() as State;
                ids.entry(v).or_insert(next);
            }
            None => absent_observed = true,
        }
    }
    let id = |v: Option<&str>| match v {
        None => ABSENT,
        Some(v) => ids.get(v).copied().unwrap_or(OTHER),
    };

    // An optional op whose result no op observes can only help a failed cas (by moving the
    // register off its `expect`). Without a failed cas that may come after it, every linearization
    // that uses it stays valid without it: the op right after it is a blind write or delete.
    let failed_cas_until =
        raw.iter().filter(|r| matches!(r.action, RawStep::CasFailed { .. })).map(|r| r.complete).max();
    let mut entries = Vec::with_capacity(raw.len());
    for r in &raw {
        let step = match r.action {
            RawStep::Read(v) => Step::Read(id(v)),
            RawStep::Write(v) => Step::Write(id(Some(v))),
            RawStep::Cas { expect, value } => Step::Cas { expect: id(expect), value: id(Some(value)) },
            RawStep::CasFailed { expect } => Step::CasFailed { expect: id(expect) },
            RawStep::Delete => Step::Delete,
        };
        let result = match step {
            Step::Write(v) | Step::Cas { value: v, .. } => Some(v),
            Step::Delete => Some(ABSENT),
            Step::Read(_) | Step::CasFailed { .. } => None,
        };
        let unobserved = match result {
            Some(OTHER) => true,
            Some(ABSENT) => !absent_observed,
            _ => false,
        };
        let may_help_failed_cas = failed_cas_until.is_some_and(|t| t >= r.invoke);
        if !r.required && unobserved && !may_help_failed_cas {
            if let Origin::Op(i) = r.origin {
                ignored.push((i, Ignored::Unobservable));
                continue;
            }
        }
        let class = match (r.required, step) {
            (false, Step::Write(OTHER)) => CLASS_OTHER_WRITE,
            (false, Step::Delete) => CLASS_DELETE,
            _ => 0,
        };
        entries.push(Entry {
            origin: r.origin,
            step,
            invoke: r.invoke,
            complete: r.complete,
            required: r.required,
            class,
        });
    }

    let states = FIRST_VALUE as usize + ids.len();
    let initial = id(index.initial(key));
    let mut writes = vec![0u32; states];
    writes[initial as usize] += 1;
    let mut needed_by = vec![0u32; states];
    for e in &entries {
        if let Step::Write(v) | Step::Cas { value: v, .. } = e.step {
            writes[v as usize] += 1;
        }
        if let (true, Some(v)) = (e.required, e.step.needs()) {
            needed_by[v as usize] += 1;
        }
    }
    // ABSENT and OTHER stand for values that can recur; only real interned values are unique.
    let unique = writes.iter().enumerate().map(|(s, &n)| s >= FIRST_VALUE as usize && n <= 1).collect();
    ignored.sort_unstable();
    KeyModel { key: key.to_owned(), entries, initial, unique, needed_by, ignored, ops }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{History, Op};

    fn model(ops: Vec<Op>) -> KeyModel {
        let history = History { initial: KeyValues::new(), ops };
        let index = Indexed::new(&history).expect("valid ops");
        build(&index, None).remove(0)
    }

    #[test]
    fn unobserved_unknown_writes_are_left_out_unless_a_failed_cas_could_use_them() {
        let m = model(vec![
            Op::write(1, "k", "a", 0).ok(10),
            Op::write(2, "k", "never-read", 5).unknown(),
            Op::read(1, "k", 20).read_ok(30, Some("a")),
        ]);
        assert_eq!(m.ignored, vec![(1, Ignored::Unobservable)]);
        assert_eq!(m.entries.len(), 2);
        // "a" is observed by the read: its write gets an id of its own.
        assert_eq!(m.entries[0].step, Step::Write(FIRST_VALUE));

        let m = model(vec![
            Op::write(1, "k", "a", 0).ok(10),
            Op::write(2, "k", "never-read", 5).unknown(),
            Op::cas(1, "k", Some("a"), "b", 20).fail(30),
        ]);
        assert!(m.ignored.is_empty());
        assert_eq!(m.entries[1].step, Step::Write(OTHER));
        assert_eq!(m.entries[1].class, CLASS_OTHER_WRITE);
    }

    #[test]
    fn failed_cas_is_a_read_of_anything_but_expect() {
        assert_eq!(Step::CasFailed { expect: 2 }.apply(2), None);
        assert_eq!(Step::CasFailed { expect: 2 }.apply(OTHER), Some(OTHER));
        assert_eq!(Step::Cas { expect: ABSENT, value: 3 }.apply(ABSENT), Some(3));
    }
}
