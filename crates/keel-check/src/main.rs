//! `keel-check HISTORY.jsonl [--final FINAL.json] [--budget-secs N] [--json]`: parses flags and
//! hands over to [`keel_check::cli::run`]. Exits 0 if linearizable, 1 on a violation, 2 if
//! undecided or the input is bad.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keel_check::cli::{exit_code, run, RunConfig, EXIT_UNKNOWN};

/// Checks a history of key-value operations for linearizability.
#[derive(Debug, Parser)]
#[command(name = "keel-check", version)]
struct Args {
    /// The history: one JSON operation per line, optionally after an {"initial":{..}} header.
    history: PathBuf,
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

fn main() -> ExitCode {
    // clap exits with 2 on bad flags, like any other bad input.
    let args = Args::parse();
    let Ok(budget) = Duration::try_from_secs_f64(args.budget_secs) else {
        eprintln!("keel-check: --budget-secs must be a non-negative number of seconds");
        return ExitCode::from(EXIT_UNKNOWN);
    };
    let config = RunConfig { history: args.history, final_state: args.final_state, budget, json: args.json };
    let result = run(&config, &mut std::io::stdout().lock());
    if let Err(e) = &result {
        eprintln!("keel-check: {e}");
    }
    ExitCode::from(exit_code(&result))
}
