//! What the `keel-check` binary does once its flags are parsed: read the history (and final state),
//! run every check, print the report, and map the verdict to an exit code; or, for
//! `keel-check watch` and `keel-check lock`, the same with a watch or a lock history.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::check::{check, CheckOptions, Verdict};
use crate::history::{History, HistoryError, KeyValues};
use crate::lock::{check_lock, InvalidLockHistory, LockHistory, LockHistoryError, LockVerdict};
use crate::watch::{check_watch, InvalidWatchHistory, WatchHistory, WatchHistoryError, WatchVerdict};
use crate::CheckError;

/// The binary's inputs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub history: PathBuf,
    /// A JSON object of each key's final value (`null` = absent).
    pub final_state: Option<PathBuf>,
    pub budget: Duration,
    /// Print the report as JSON instead of text.
    pub json: bool,
}

/// Why a run produced no verdict. All of these exit with [`EXIT_UNKNOWN`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open history {path}: {source}")]
    OpenHistory { path: PathBuf, source: std::io::Error },
    #[error("history {path}, {source}")]
    ReadHistory { path: PathBuf, source: HistoryError },
    #[error("cannot read final state {path}: {source}")]
    ReadFinal { path: PathBuf, source: std::io::Error },
    #[error("final state {path} is not a JSON object of key to value or null: {source}")]
    ParseFinal { path: PathBuf, source: serde_json::Error },
    #[error("watch history {path}, {source}")]
    ReadWatchHistory { path: PathBuf, source: WatchHistoryError },
    #[error("lock history {path}, {source}")]
    ReadLockHistory { path: PathBuf, source: LockHistoryError },
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    CheckLock(#[from] InvalidLockHistory),
    #[error(transparent)]
    CheckWatch(#[from] InvalidWatchHistory),
    #[error("encoding the report: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// The history is linearizable.
pub const EXIT_LINEARIZABLE: u8 = 0;
/// A violation was found.
pub const EXIT_VIOLATION: u8 = 1;
/// Undecided within the budget, or the input could not be read.
pub const EXIT_UNKNOWN: u8 = 2;

/// The exit code for a run's result.
pub fn exit_code(result: &Result<Verdict, RunError>) -> u8 {
    match result {
        Ok(Verdict::Linearizable) => EXIT_LINEARIZABLE,
        Ok(Verdict::NotLinearizable) => EXIT_VIOLATION,
        Ok(Verdict::Unknown) | Err(_) => EXIT_UNKNOWN,
    }
}

/// The exit code for a watch check's result: 0 valid, 1 a violation, 2 bad input.
pub fn watch_exit_code(result: &Result<WatchVerdict, RunError>) -> u8 {
    match result {
        Ok(WatchVerdict::Valid) => EXIT_LINEARIZABLE,
        Ok(WatchVerdict::Invalid) => EXIT_VIOLATION,
        Err(_) => EXIT_UNKNOWN,
    }
}

/// The exit code for a lock check's result: 0 valid, 1 a violation, 2 bad input.
pub fn lock_exit_code(result: &Result<LockVerdict, RunError>) -> u8 {
    match result {
        Ok(LockVerdict::Valid) => EXIT_LINEARIZABLE,
        Ok(LockVerdict::Invalid) => EXIT_VIOLATION,
        Err(_) => EXIT_UNKNOWN,
    }
}

/// `keel-check lock`'s inputs.
#[derive(Debug, Clone)]
pub struct LockRunConfig {
    pub history: PathBuf,
    /// Print the report as JSON instead of text.
    pub json: bool,
}

/// Reads a lock history, checks it, and writes the report to `out`.
pub fn run_lock(config: &LockRunConfig, out: &mut impl Write) -> Result<LockVerdict, RunError> {
    let path = &config.history;
    let file = File::open(path).map_err(|source| RunError::OpenHistory { path: path.clone(), source })?;
    let history = LockHistory::read_from(BufReader::new(file))
        .map_err(|source| RunError::ReadLockHistory { path: path.clone(), source })?;
    let report = check_lock(&history)?;
    write_report(&report, config.json, out)?;
    Ok(report.verdict)
}

/// Writes a report as pretty JSON or as its text form.
fn write_report<R: serde::Serialize + std::fmt::Display>(
    report: &R,
    json: bool,
    out: &mut impl Write,
) -> Result<(), RunError> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report).map_err(RunError::Encode)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    out.flush()?;
    Ok(())
}

/// `keel-check watch`'s inputs.
#[derive(Debug, Clone)]
pub struct WatchRunConfig {
    pub history: PathBuf,
    /// Print the report as JSON instead of text.
    pub json: bool,
}

/// Reads a watch history, checks it, and writes the report to `out`.
pub fn run_watch(config: &WatchRunConfig, out: &mut impl Write) -> Result<WatchVerdict, RunError> {
    let path = &config.history;
    let file = File::open(path).map_err(|source| RunError::OpenHistory { path: path.clone(), source })?;
    let history = WatchHistory::read_from(BufReader::new(file))
        .map_err(|source| RunError::ReadWatchHistory { path: path.clone(), source })?;
    let report = check_watch(&history)?;
    write_report(&report, config.json, out)?;
    Ok(report.verdict)
}

/// Reads the inputs, checks, and writes the report to `out`.
pub fn run(config: &RunConfig, out: &mut impl Write) -> Result<Verdict, RunError> {
    let path = &config.history;
    let file = File::open(path).map_err(|source| RunError::OpenHistory { path: path.clone(), source })?;
    let history = History::read_from(BufReader::new(file))
        .map_err(|source| RunError::ReadHistory { path: path.clone(), source })?;
    let final_state = match &config.final_state {
        Some(path) => Some(read_final(path)?),
        None => None,
    };
    let report = check(&history, final_state.as_ref(), &CheckOptions::with_budget(config.budget))?;
    write_report(&report, config.json, out)?;
    Ok(report.verdict)
}

fn read_final(path: &PathBuf) -> Result<KeyValues, RunError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| RunError::ReadFinal { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| RunError::ParseFinal { path: path.clone(), source })
}
