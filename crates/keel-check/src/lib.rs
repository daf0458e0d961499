//! keel-check: decides whether a history of operations on key-value registers, recorded by a
//! Jepsen-style fault test, is linearizable, and explains why not when it is not.
//!
//! A test runner records each client operation (read, write, compare-and-set, delete) with its
//! invoke and complete times and outcome (ok, fail, unknown) as one JSON line ([`History`],
//! [`HistoryWriter`]); after healing the faults it may read every key's final value. [`check()`]
//! then runs:
//! 1. cheap checks, each of whose findings proves a violation by itself:
//!    [`check_phantom_reads`], [`check_final`], [`check_monotonic_reads`];
//! 2. the full check, [`check_linearizable`]: a Wing–Gong–Lowe search per key, within a time budget
//!    after which a key's verdict is unknown rather than the check hanging.
//!
//! The cheap checks rely on the runner's promise that each value is written at most once per key;
//! the full check does not.
//!
//! Watches are checked apart, from their own history of writes (with revisions) and watch
//! responses: [`watch::check_watch`] checks etcd's watch guarantees (ordered, unique, atomic,
//! bookmarkable, resumable, filtered, reliable, prev_kv) and that the events agree with the writes.
//!
//! Locks and leases too, from a history of leases, keep-alives, lock acquisitions and fenced
//! writes: [`lock::check_lock`] checks mutual exclusion by validity, tokens, fencing, and that
//! leases expire neither before their TTL after the last acknowledged keep-alive nor past the
//! stated bound.
//!
//! # Layout
//!
//! - [`history`]: the JSON-lines format, its reader (errors name the line) and writer
//! - `index`: the validated view every check starts from (ops per key, writers of each value)
//! - [`phantom`], [`final_state`], [`monotonic`]: the cheap checks
//! - `model`: one key's sub-history as a search problem (which ops take part, interned values)
//! - `wgl`: the linearizability search with its memo and prunings
//! - [`violation`]: the report of a failing key: sub-history, longest linearizable prefix, stuck ops
//! - [`check`](mod@check): runs everything under a budget into a [`Report`] with a [`Verdict`]
//! - [`watch`]: the watch history format and the watch checks, into a [`WatchReport`]
//! - [`lock`]: the lock history format and the lock and lease checks, into a [`LockReport`]
//! - [`cli`]: what the `keel-check` binary does (`src/main.rs` only parses flags)

pub mod check;
pub mod cli;
pub mod final_state;
pub mod history;
mod index;
pub mod lock;
mod model;
pub mod monotonic;
pub mod phantom;
pub mod violation;
pub mod watch;
mod wgl;

pub use check::{
    check, check_linearizable, CheckOptions, KeyVerdict, Linearizability, Report, Summary, UnknownReason,
    Verdict, DEFAULT_MAX_MEMO_BYTES,
};
pub use final_state::{check_final, FinalStateFinding};
pub use history::{
    History, HistoryError, HistoryWriter, InvalidOp, KeyValues, Op, OpKind, Outcome, WriteError,
};
pub use index::{DuplicateWrite, OpRef};
pub use lock::{check_lock, LockHistory, LockReport, LockVerdict, LockViolation};
pub use model::Ignored;
pub use monotonic::{check_monotonic_reads, NonMonotonicRead};
pub use phantom::{check_phantom_reads, PhantomCause, PhantomRead};
pub use violation::{KeyOp, Placed, Stuck, StuckReason, SubOp, Violation};
pub use watch::{check_watch, WatchHistory, WatchReport, WatchVerdict, WatchViolation};

/// A history the checks cannot work on. Histories read with [`History::read_from`] are already
/// validated; this is for histories built in memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("op #{index}: {source}")]
    InvalidOp { index: usize, source: InvalidOp },
}
