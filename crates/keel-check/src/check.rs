//! The whole check of a history: the cheap checks, then the per-key linearizability search within a
//! time budget, gathered into one [`Report`] with an overall [`Verdict`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::final_state::{final_findings, FinalStateFinding};
use crate::history::{History, KeyValues, Outcome};
use crate::index::{DuplicateWrite, Indexed};
use crate::model::{self, KeyModel};
use crate::monotonic::{non_monotonic_reads, NonMonotonicRead};
use crate::phantom::{list, phantom_reads, PhantomRead};
use crate::violation::{self, Violation};
use crate::wgl::{self, Limit, Limits};
use crate::CheckError;

/// The memo of one key's search may grow to this many bytes before the key's verdict is
/// [`KeyVerdict::Unknown`]: a pathological key must not take the machine's memory down with it.
pub const DEFAULT_MAX_MEMO_BYTES: usize = 1 << 30;

/// How hard to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Wall-clock time for the linearizability search of all keys together. Keys are searched
    /// smallest first, each given an equal share of what is left, so time one key does not need
    /// goes to the next ones.
    pub budget: Duration,
    /// See [`DEFAULT_MAX_MEMO_BYTES`].
    pub max_memo_bytes: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { budget: Duration::from_secs(60), max_memo_bytes: DEFAULT_MAX_MEMO_BYTES }
    }
}

impl CheckOptions {
    pub fn with_budget(budget: Duration) -> Self {
        CheckOptions { budget, ..CheckOptions::default() }
    }
}

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    /// No violation found, but some key could not be decided within the budget.
    Unknown,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Linearizable => "LINEARIZABLE",
            Verdict::NotLinearizable => "NOT LINEARIZABLE",
            Verdict::Unknown => "UNKNOWN",
        })
    }
}

/// One key's linearizability verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum KeyVerdict {
    Linearizable,
    /// `ops`: the key's ops; `linearized`: the longest prefix the search could linearize.
    NotLinearizable {
        ops: usize,
        linearized: usize,
    },
    Unknown {
        reason: UnknownReason,
    },
}

/// Why a key was left undecided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnknownReason {
    /// The key's share of the budget ran out after exploring `states` states.
    BudgetExhausted { share_ms: u64, states: usize },
    /// The search's memo reached [`CheckOptions::max_memo_bytes`].
    MemoFull { states: usize },
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnknownReason::BudgetExhausted { share_ms, states } => {
                write!(f, "time budget exhausted ({share_ms} ms for this key, {states} states explored)")
            }
            UnknownReason::MemoFull { states } => write!(f, "search memo full ({states} states explored)"),
        }
    }
}

/// The linearizability search's result over all keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Linearizability {
    pub keys: BTreeMap<String, KeyVerdict>,
    /// The violation of the failing key with the fewest ops, if any key fails.
    pub violation: Option<Box<Violation>>,
    pub elapsed_ms: u64,
}

impl Linearizability {
    pub fn verdict(&self) -> Verdict {
        let mut verdict = Verdict::Linearizable;
        for v in self.keys.values() {
            match v {
                KeyVerdict::NotLinearizable { .. } => return Verdict::NotLinearizable,
                KeyVerdict::Unknown { .. } => verdict = Verdict::Unknown,
                KeyVerdict::Linearizable => {}
            }
        }
        verdict
    }
}

/// Counts over the history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ops: usize,
    pub keys: usize,
    pub clients: usize,
    pub ok: usize,
    /// Failed, not counting rejected ones.
    pub fail: usize,
    /// Failed with a definite error before anything happened: dropped.
    pub rejected: usize,
    pub unknown: usize,
}

/// Everything the checks found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub summary: Summary,
    /// Values written to a key more than once, which the runner promises never to do; the cheap
    /// checks skip them.
    pub duplicate_writes: Vec<DuplicateWrite>,
    pub phantom_reads: Vec<PhantomRead>,
    /// `None` if no final state was given.
    pub final_state: Option<Vec<FinalStateFinding>>,
    pub non_monotonic_reads: Vec<NonMonotonicRead>,
    pub linearizability: Linearizability,
    pub verdict: Verdict,
}

impl Report {
    /// How many findings the cheap checks made (each proves a violation).
    pub fn cheap_findings(&self) -> usize {
        self.phantom_reads.len()
            + self.final_state.as_ref().map_or(0, Vec::len)
            + self.non_monotonic_reads.len()
    }
}

/// Runs every check. `final_state` (optional) is each key's value read from every node after
/// healing; it is checked by [`crate::check_final`] and also given to the search as a last read.
pub fn check(
    history: &History,
    final_state: Option<&KeyValues>,
    options: &CheckOptions,
) -> Result<Report, CheckError> {
    let index = Indexed::new(history)?;
    let phantom_reads = phantom_reads(&index);
    let final_state_findings = final_state.map(|f| final_findings(&index, f));
    let non_monotonic_reads = non_monotonic_reads(&index);
    let linearizability = linearizability(&index, final_state, options);
    let cheap =
        phantom_reads.len() + final_state_findings.as_ref().map_or(0, Vec::len) + non_monotonic_reads.len();
    // A cheap finding is a proof on its own, whatever the search concluded in its budget.
    let verdict = if cheap > 0 { Verdict::NotLinearizable } else { linearizability.verdict() };
    Ok(Report {
        summary: summary(history, final_state),
        duplicate_writes: index.duplicate_writes(),
        phantom_reads,
        final_state: final_state_findings,
        non_monotonic_reads,
        linearizability,
        verdict,
    })
}

/// Runs only the linearizability search (per key, P-compositionality: a history of independent
/// registers is linearizable iff each key's sub-history is).
pub fn check_linearizable(
    history: &History,
    final_state: Option<&KeyValues>,
    options: &CheckOptions,
) -> Result<Linearizability, CheckError> {
    Ok(linearizability(&Indexed::new(history)?, final_state, options))
}

fn linearizability(
    index: &Indexed<'_>,
    final_state: Option<&KeyValues>,
    options: &CheckOptions,
) -> Linearizability {
    let start = Instant::now();
    let end = far_after(start, options.budget);
    let mut models = model::build(index, final_state);
    models.sort_by_key(|m| (m.entries.len(), m.size()));
    let mut keys = BTreeMap::new();
    let mut failures: Vec<(&KeyModel, Vec<u32>)> = Vec::new();
    let total = models.len();
    for (done, m) in models.iter().enumerate() {
        let now = Instant::now();
        let share = end.saturating_duration_since(now) / (total - done) as u32;
        let limits = Limits { deadline: far_after(now, share), max_memo_bytes: options.max_memo_bytes };
        let (outcome, stats) = wgl::search(m, &limits);
        let verdict = match outcome {
            wgl::Outcome::Linearizable => KeyVerdict::Linearizable,
            wgl::Outcome::NotLinearizable { best } => {
                let linearized = best.len();
                failures.push((m, best));
                KeyVerdict::NotLinearizable { ops: m.size(), linearized }
            }
            wgl::Outcome::GaveUp { limit: Limit::Deadline, .. } => KeyVerdict::Unknown {
                reason: UnknownReason::BudgetExhausted {
                    share_ms: share.as_millis() as u64,
                    states: stats.states,
                },
            },
            wgl::Outcome::GaveUp { limit: Limit::Memory, .. } => {
                KeyVerdict::Unknown { reason: UnknownReason::MemoFull { states: stats.states } }
            }
        };
        keys.insert(m.key.clone(), verdict);
    }
    let violation = failures
        .iter()
        .min_by_key(|(m, _)| (m.size(), m.key.as_str()))
        .map(|(m, best)| Box::new(violation::build(index, final_state, m, best)));
    Linearizability { keys, violation, elapsed_ms: start.elapsed().as_millis() as u64 }
}

/// `at + budget`, or about a century after `at` for budgets too large to add: a huge budget means
/// "no limit", not a panic.
fn far_after(at: Instant, budget: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(budget.min(CENTURY)).unwrap_or(at)
}

fn summary(history: &History, final_state: Option<&KeyValues>) -> Summary {
    let mut keys: BTreeSet<&str> = history.ops.iter().map(|op| op.key.as_str()).collect();
    keys.extend(final_state.into_iter().flat_map(|f| f.keys().map(String::as_str)));
    let clients: BTreeSet<u64> = history.ops.iter().map(|op| op.client).collect();
    let mut s =
        Summary { ops: history.ops.len(), keys: keys.len(), clients: clients.len(), ..Summary::default() };
    for op in &history.ops {
        match op.outcome {
            Outcome::Ok => s.ok += 1,
            Outcome::Fail if op.is_rejected() => s.rejected += 1,
            Outcome::Fail => s.fail += 1,
            Outcome::Unknown => s.unknown += 1,
        }
    }
    s
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.summary;
        writeln!(
            f,
            "history: {} ops, {} keys, {} clients; outcomes: {} ok, {} fail, {} rejected, {} unknown",
            s.ops, s.keys, s.clients, s.ok, s.fail, s.rejected, s.unknown
        )?;
        for d in &self.duplicate_writes {
            let initial = if d.initial { " and as the initial value" } else { "" };
            writeln!(
                f,
                "warning: {:?} written to key {:?} more than once (ops {}{initial}); the cheap checks skip it",
                d.value,
                d.key,
                list(&d.ops)
            )?;
        }
        section(f, "phantom reads", &self.phantom_reads)?;
        match &self.final_state {
            Some(findings) => section(f, "final state", findings)?,
            None => writeln!(f, "final state: not checked (none given)")?,
        }
        section(f, "non-monotonic reads", &self.non_monotonic_reads)?;

        let lin = &self.linearizability;
        let count = |want: fn(&KeyVerdict) -> bool| lin.keys.values().filter(|v| want(v)).count();
        writeln!(
            f,
            "linearizability of {} keys: {} linearizable, {} not, {} unknown ({} ms)",
            lin.keys.len(),
            count(|v| matches!(v, KeyVerdict::Linearizable)),
            count(|v| matches!(v, KeyVerdict::NotLinearizable { .. })),
            count(|v| matches!(v, KeyVerdict::Unknown { .. })),
            lin.elapsed_ms
        )?;
        for (key, v) in &lin.keys {
            match v {
                KeyVerdict::Linearizable => {}
                KeyVerdict::NotLinearizable { ops, linearized } => writeln!(
                    f,
                    "  key {key:?}: not linearizable ({ops} ops, longest linearizable prefix {linearized})"
                )?,
                KeyVerdict::Unknown { reason } => writeln!(f, "  key {key:?}: unknown: {reason}")?,
            }
        }
        if let Some(violation) = &lin.violation {
            writeln!(f)?;
            write!(f, "{violation}")?;
            writeln!(f)?;
        }
        writeln!(f, "verdict: {}", self.verdict)
    }
}

fn section<T: fmt::Display>(f: &mut fmt::Formatter<'_>, name: &str, findings: &[T]) -> fmt::Result {
    if findings.is_empty() {
        return writeln!(f, "{name}: none");
    }
    writeln!(f, "{name}: {}", findings.len())?;
    for finding in findings {
        writeln!(f, "  {finding}")?;
    }
    Ok(())
}
