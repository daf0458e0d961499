//! Many runs: the short suite CI runs every time, the long one run by hand, and the negative
//! controls that prove the harness catches planted bugs.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use keel_check::LockReport;

use crate::cluster::System;
use crate::nemesis::Nemesis;
use crate::nemesis::Schedule;
use crate::run::run;
use crate::run::Reports;
use crate::run::RunError;
use crate::run::RunResult;
use crate::run::RunSpec;
use crate::workload::Workload;

/// The knobs shared by every run of a suite.
#[derive(Debug, Clone)]
pub struct SuiteSpec {
    pub system: System,
    pub duration: Duration,
    pub workload: Workload,
    pub dir: PathBuf,
    pub net_id: u8,
    pub check_budget: Duration,
}

impl SuiteSpec {
    fn run_spec(&self, n: usize, nodes: usize, nemesis: Nemesis, seed: u64) -> RunSpec {
        RunSpec {
            system: self.system.clone(),
            nodes,
            nemesis,
            duration: self.duration,
            workload: Workload { seed, ..self.workload.clone() },
            schedule: Schedule::default(),
            dir: self.dir.join(format!("{n:03}-{}-{}n-{}", self.system.name(), nodes, nemesis.name())),
            net_id: self.net_id,
            check_budget: self.check_budget,
        }
    }
}

/// The totals a suite reports.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    pub runs: usize,
    pub operations: usize,
    pub unknown: usize,
    pub violations: usize,
    pub lost_writes: usize,
    /// Broken watch guarantees, over all runs.
    pub watch_violations: usize,
    /// Broken lock and lease rules, over all runs; runs whose lock and lease clients got nowhere.
    pub lock_violations: usize,
    pub lock_idle_runs: usize,
    /// Runs whose replicas differed or did not converge once healed.
    pub diverged_runs: usize,
    /// Runs whose check ran out of budget (neither proven nor refuted).
    pub undecided: usize,
    pub errors: usize,
    pub failed_runs: Vec<PathBuf>,
}

impl Summary {
    fn add(&mut self, r: &RunResult) {
        self.runs += 1;
        self.operations += r.ops;
        self.unknown += r.unknown;
        self.violations += usize::from(r.verdict == keel_check::Verdict::NotLinearizable);
        self.lost_writes += r.lost_writes;
        self.watch_violations += r.watch_violations;
        self.lock_violations += r.lock_violations;
        self.lock_idle_runs += usize::from(r.locks_idle());
        self.diverged_runs += usize::from(r.diverged_nodes > 0 || !r.converged);
        self.undecided += usize::from(r.verdict == keel_check::Verdict::Unknown);
        if r.failed() {
            self.failed_runs.push(r.dir.clone());
        }
    }

    pub fn ok(&self) -> bool {
        self.failed_runs.is_empty() && self.errors == 0
    }
}

/// How many watch (and lock) violations [`explain`] prints (all are in the run's
/// `watch-report.json` and `lock-report.json`).
const WATCH_VIOLATIONS_SHOWN: usize = 20;

/// Prints why a run failed: the cheap findings, the smallest failing key's history, the first
/// broken watch guarantees, and the first broken lock and lease rules.
pub fn explain(reports: &Reports, out: &mut impl std::io::Write) {
    let (report, watch, lock) = (&reports.linearizability, reports.watch.as_ref(), reports.lock.as_ref());
    for p in &report.phantom_reads {
        let _ = writeln!(out, "  phantom read: {p:?}");
    }
    for f in report.final_state.iter().flatten() {
        let _ = writeln!(out, "  final state: {f:?}");
    }
    for m in &report.non_monotonic_reads {
        let _ = writeln!(out, "  non-monotonic read: {m:?}");
    }
    if let Some(v) = &report.linearizability.violation {
        let _ = writeln!(out, "{v}");
    }
    if let Some(watch) = watch.filter(|w| !w.violations.is_empty()) {
        let counts: Vec<String> = watch.counts().iter().map(|(g, n)| format!("{g} {n}")).collect();
        let _ = writeln!(out, "  watch violations: {}", counts.join(", "));
        for v in watch.violations.iter().take(WATCH_VIOLATIONS_SHOWN) {
            let _ = writeln!(out, "    {v}");
        }
    }
    if let Some(lock) = lock {
        explain_lock(lock, out);
    }
}

fn explain_lock(lock: &LockReport, out: &mut impl std::io::Write) {
    let s = &lock.summary;
    let _ = writeln!(
        out,
        "  locks: {} acquisitions, {} fenced writes ok; leases: {} keep-alives ({} unanswered), {} lapsed leases judged, {} undecided",
        s.acquisitions, s.fenced_ok, s.keepalives, s.keepalives_unknown, s.late_expiry_decided, s.late_expiry_undecided
    );
    if !lock.violations.is_empty() {
        let counts: Vec<String> = lock.counts().iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(out, "  lock violations: {}", counts.join(", "));
        for v in lock.violations.iter().take(WATCH_VIOLATIONS_SHOWN) {
            let _ = writeln!(out, "    {v}");
        }
    }
}

/// Runs each (nodes, nemesis) pair `rounds` times; returns the summary.
pub async fn run_suite(
    spec: &SuiteSpec,
    node_counts: &[usize],
    nemeses: &[Nemesis],
    rounds: usize,
    out: &mut impl std::io::Write,
) -> Summary {
    let mut summary = Summary::default();
    let mut n = 0;
    for round in 0..rounds {
        for &nodes in node_counts {
            for &nemesis in nemeses {
                n += 1;
                let seed = spec.workload.seed.wrapping_add((round * 1000 + n) as u64);
                let run_spec = spec.run_spec(n, nodes, nemesis, seed);
                match run(run_spec.clone(), out).await {
                    Ok((result, reports)) => {
                        let _ = writeln!(out, "  => {result}");
                        if result.failed() {
                            explain(&reports, out);
                            let _ = writeln!(out, "  files: {}", result.dir.display());
                        }
                        summary.add(&result);
                    }
                    Err(e) => {
                        let _ = writeln!(out, "  => run error: {e} (files: {})", run_spec.dir.display());
                        summary.errors += 1;
                        summary.failed_runs.push(run_spec.dir.clone());
                    }
                }
            }
        }
    }
    let _ = write_summary(&spec.dir, &summary);
    summary
}

fn write_summary(dir: &Path, summary: &Summary) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let f = std::fs::File::create(dir.join("summary.json"))?;
    serde_json::to_writer_pretty(f, summary).map_err(std::io::Error::other)
}

/// Which check must catch a planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaughtBy {
    /// Any finding of a run (linearizability, lost writes, diverged replicas, watches).
    AnyCheck,
    /// The watch checker: a run failing for another reason does not count.
    WatchCheck,
    /// The lock checker (a broken lock or lease rule): nothing else counts.
    LockCheck,
}

impl CaughtBy {
    /// The check that must catch the planted bug `fault` (`KEEL_FAULT_INJECTION`).
    pub fn for_fault(fault: &str) -> CaughtBy {
        match fault {
            "watch-drop-event" => CaughtBy::WatchCheck,
            "lease-early-expiry" => CaughtBy::LockCheck,
            _ => CaughtBy::AnyCheck,
        }
    }

    fn caught(self, r: &RunResult) -> bool {
        match self {
            CaughtBy::AnyCheck => r.failed(),
            CaughtBy::WatchCheck => r.watch_violations > 0,
            CaughtBy::LockCheck => r.lock_violations > 0,
        }
    }
}

/// Runs with a planted bug until `by` catches it or `max_runs` pass. Returns the number of the run
/// that caught it.
pub async fn negative_control(
    spec: &SuiteSpec,
    nemesis: Nemesis,
    by: CaughtBy,
    max_runs: usize,
    out: &mut impl std::io::Write,
) -> Result<Option<usize>, RunError> {
    for n in 1..=max_runs {
        let run_spec = spec.run_spec(n, 3, nemesis, spec.workload.seed.wrapping_add(n as u64));
        let (result, reports) = run(run_spec, out).await?;
        let _ = writeln!(out, "  => {result}");
        if result.failed() {
            explain(&reports, out);
        }
        if by.caught(&result) {
            return Ok(Some(n));
        }
    }
    Ok(None)
}
