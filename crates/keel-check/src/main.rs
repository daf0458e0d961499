//! `keel-check HISTORY.jsonl [--final FINAL.json] [--budget-secs N] [--json]` and
//! `keel-check watch WATCH.jsonl [--json]` and `keel-check lock LOCK.jsonl [--json]`: parses flags
//! and hands over to [`keel_check::cli::run`], [`keel_check::cli::run_watch`] or
//! [`keel_check::cli::run_lock`]. Exits 0 if linearizable (or the watches, locks and leases valid),
//! 1 on a violation, 2 if undecided or the input is bad.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keel_check::cli::{
    exit_code, lock_exit_code, run, run_lock, run_watch, watch_exit_code, LockRunConfig, RunConfig,
    WatchRunConfig, EXIT_UNKNOWN,
};

/// Checks a history of key-value operations for linearizability, or (`keel-check watch`) a
/// history of watch responses for etcd's watch guarantees, or (`keel-check lock`) a history of
/// leases, lock holdings and fenced writes for mutual exclusion, fencing and lease timing.
#[derive(Debug, Parser)]
#[command(
    name = "keel-check",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The history: one JSON operation per line, optionally after an {"initial":{..}} header.
    #[arg(required = true)]
    history: Option<PathBuf>,
    /// Each key's value read after healing, as a JSON object (null = absent).
    #[arg(long = "final", value_name = "FINAL.json")]
    final_state: Option<PathBuf>,
    /// Seconds the linearizability search may take before undecided keys are reported unknown.
    #[arg(long, value_name = "N", default_value_t = 60.0)]
    budget_secs: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks a watch history (writes with revisions, watch streams and their responses).
    Watch {
        /// The watch history: one JSON record per line.
        history: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Checks a lock history (leases, keep-alives, acquisitions, fenced writes, probes, faults).
    Lock {
        /// The lock history: one JSON record per line.
        history: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // clap exits with 2 on bad flags, like any other bad input.
    let args = Args::parse();
    match args.command {
        Some(Command::Watch { history, json }) => {
            let result = run_watch(&WatchRunConfig { history, json }, &mut std::io::stdout().lock());
            if let Err(e) = &result {
                eprintln!("keel-check: {e}");
            }
            return ExitCode::from(watch_exit_code(&result));
        }
        Some(Command::Lock { history, json }) => {
            let result = run_lock(&LockRunConfig { history, json }, &mut std::io::stdout().lock());
            if let Err(e) = &result {
                eprintln!("keel-check: {e}");
            }
            return ExitCode::from(lock_exit_code(&result));
        }
        None => {}
    }
    let Some(history) = args.history else {
        // `required = true` unless a subcommand is given.
        eprintln!("keel-check: a history file is required");
        return ExitCode::from(EXIT_UNKNOWN);
    };
    let Ok(budget) = Duration::try_from_secs_f64(args.budget_secs) else {
        eprintln!("keel-check: --budget-secs must be a non-negative number of seconds");
        return ExitCode::from(EXIT_UNKNOWN);
    };
    let config = RunConfig { history, final_state: args.final_state, budget, json: args.json };
    let result = run(&config, &mut std::io::stdout().lock());
    if let Err(e) = &result {
        eprintln!("keel-check: {e}");
    }
    ExitCode::from(exit_code(&result))
}
