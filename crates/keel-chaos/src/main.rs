//! keel-chaos: fault runs against real keeld (or etcd) processes in network namespaces (root).
//!
//! `keel-chaos run` one run; `keel-chaos suite` many (the short CI suite by default);
//! `keel-chaos negative` a planted bug that must be caught. Exit codes: 0 all runs passed,
//! 1 a run found a violation, lost write, diverged replicas, broken watch guarantee or broken lock
//! or lease rule (or lock and lease clients that got nowhere, or a planted bug went unnoticed),
//! 2 the harness itself failed (bad flags, no root, a cluster that never came up).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clap::Subcommand;
use clap::ValueEnum;
use keel_chaos::cluster::System;
use keel_chaos::nemesis::Nemesis;
use keel_chaos::run::RunSpec;
use keel_chaos::suite;
use keel_chaos::suite::CaughtBy;
use keel_chaos::suite::SuiteSpec;
use keel_chaos::workload::Workload;

#[derive(Parser, Debug)]
#[command(name = "keel-chaos", version, about = "Jepsen-style fault runs with linearizability checking")]
struct Flags {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// System under test.
    #[arg(long, global = true, value_enum, default_value_t = Target::Keel)]
    system: Target,
    /// keeld binary [default: keeld next to this binary].
    #[arg(long, global = true, value_name = "PATH")]
    keeld: Option<PathBuf>,
    /// etcd binary, for `--system etcd`.
    #[arg(long, global = true, value_name = "PATH", default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Seconds of load (and faults) per run.
    #[arg(long, global = true, default_value_t = 30)]
    duration: u64,
    /// Concurrent clients.
    #[arg(long, global = true, default_value_t = 8)]
    clients: usize,
    /// Keys (registers).
    #[arg(long, global = true, default_value_t = 8)]
    keys: usize,
    /// Watch streams over the keys beside the clients, their history checked against etcd's watch
    /// guarantees (0: none).
    #[arg(long, global = true, default_value_t = 4)]
    watchers: usize,
    /// Clients contending for locks (etcd's client-side mutex on leases, fenced writes), checked
    /// by `keel-check lock` (0: none).
    #[arg(long, global = true, default_value_t = 0)]
    lock_clients: usize,
    /// Clients keeping leases alive with a key attached, then letting them lapse: the key must
    /// vanish neither before TTL after the last acknowledged keep-alive nor past the bound (0: none).
    #[arg(long, global = true, default_value_t = 0)]
    lease_clients: usize,
    /// Seconds between the progress notifications each watcher requests (0: none; they still ask
    /// for the periodic ones).
    #[arg(long, global = true, default_value_t = 0.0)]
    watch_progress_every: f64,
    /// Requests per second over all clients.
    #[arg(long, global = true, default_value_t = 200)]
    rate: u32,
    /// Seconds after which a request's outcome is unknown.
    #[arg(long, global = true, default_value_t = 1.0)]
    timeout: f64,
    /// Seed of the workload and the nemesis [default: from the clock, printed].
    #[arg(long, global = true)]
    seed: Option<u64>,
    /// Where the runs' files go [default: a new directory under ./target/chaos].
    #[arg(long, global = true, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Seconds the checker may spend on one history before answering "unknown".
    #[arg(long, global = true, default_value_t = 60)]
    check_budget: u64,
    /// Network id (1..=250): concurrent runs need different ones [default: from the pid].
    #[arg(long, global = true)]
    net_id: Option<u8>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    Keel,
    Etcd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// One run.
    Run {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, value_enum, default_value_t = Nemesis::Mixed)]
        nemesis: Nemesis,
        /// Planted bugs for keeld (debug builds): stale-reads, ack-before-fsync, watch-drop-event,
        /// lease-early-expiry.
        #[arg(long)]
        faults: Option<String>,
    },
    /// Many runs: every nemesis on every node count, `--rounds` times, and a summary.
    /// Default: the short suite (each nemesis and one mixed run, 3 nodes, 30 s each).
    Suite {
        /// Node counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "3")]
        nodes: Vec<usize>,
        /// Nemeses, comma-separated [default: every single one, then mixed].
        #[arg(long, value_enum, value_delimiter = ',')]
        nemeses: Vec<Nemesis>,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// A planted bug the harness must catch within `--max-runs` runs (exit 0 if caught).
    Negative {
        /// stale-reads (followers answer linearizable reads locally), ack-before-fsync,
        /// watch-drop-event (watch responses silently lose events; must be caught by the watch
        /// check), or lease-early-expiry (keep-alives acknowledged without renewing; must be
        /// caught by the lock check, with --lock-clients or --lease-clients).
        #[arg(long)]
        fault: String,
        #[arg(long, default_value_t = 5)]
        max_runs: usize,
        /// The nemesis [default: partition-leader for stale-reads, kill-leader for
        /// watch-drop-event (watchers reconnect) and lease-early-expiry (leases meet leader
        /// changes), kill-all otherwise].
        #[arg(long, value_enum)]
        nemesis: Option<Nemesis>,
    },
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel-chaos: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(main_async(flags))
}

fn default_keeld() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("keeld")))
        .unwrap_or_else(|| PathBuf::from("keeld"))
}

async fn main_async(flags: Flags) -> ExitCode {
    let c = flags.common;
    let seed = c.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let out_dir = c
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/chaos").join(format!("{}-{seed}", std::process::id())));
    let net_id = c.net_id.unwrap_or((std::process::id() % 250) as u8 + 1);
    let keeld = c.keeld.clone().unwrap_or_else(default_keeld);
    let system = |faults: Option<String>| match c.system {
        Target::Keel => System::Keel { keeld: keeld.clone(), faults },
        Target::Etcd => System::Etcd { etcd: c.etcd.clone() },
    };
    let workload = Workload {
        clients: c.clients.max(1),
        keys: c.keys.max(1),
        rate: c.rate.max(1),
        timeout: Duration::from_secs_f64(c.timeout.max(0.05)),
        seed,
        watchers: c.watchers,
        watch_progress_every: (c.watch_progress_every > 0.0)
            .then(|| Duration::from_secs_f64(c.watch_progress_every.max(0.01))),
        lock_clients: c.lock_clients,
        lease_clients: c.lease_clients,
    };
    let suite_spec = |faults: Option<String>| SuiteSpec {
        system: system(faults),
        duration: Duration::from_secs(c.duration),
        workload: workload.clone(),
        dir: out_dir.clone(),
        net_id,
        check_budget: Duration::from_secs(c.check_budget),
    };
    let mut out = std::io::stdout();
    println!("keel-chaos: seed {seed} (replay with --seed {seed}), files in {}", out_dir.display());
    match flags.command {
        Cmd::Run { nodes, nemesis, faults } => {
            let spec = RunSpec {
                system: system(faults),
                nodes,
                nemesis,
                duration: Duration::from_secs(c.duration),
                workload,
                schedule: Default::default(),
                dir: out_dir.clone(),
                net_id,
                check_budget: Duration::from_secs(c.check_budget),
            };
            match keel_chaos::run::run(spec, &mut out).await {
                Ok((result, reports)) => {
                    let _ = writeln!(out, "{result}");
                    if result.failed() {
                        suite::explain(&reports, &mut out);
                        return ExitCode::from(1);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keel-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Suite { nodes, nemeses, rounds } => {
            let nemeses = if nemeses.is_empty() {
                let mut all: Vec<Nemesis> = Nemesis::SINGLE
                    .into_iter()
                    .filter(|n| matches!(c.system, Target::Keel) || *n != Nemesis::Membership)
                    .collect();
                all.push(Nemesis::Mixed);
                all
            } else {
                nemeses
            };
            let summary = suite::run_suite(&suite_spec(None), &nodes, &nemeses, rounds, &mut out).await;
            println!(
                "summary: {} runs, {} operations, {} unknown outcomes, {} violations, {} lost writes, {} watch violations, {} lock violations, {} idle lock runs, {} runs with diverged replicas, {} undecided, {} harness errors",
                summary.runs,
                summary.operations,
                summary.unknown,
                summary.violations,
                summary.lost_writes,
                summary.watch_violations,
                summary.lock_violations,
                summary.lock_idle_runs,
                summary.diverged_runs,
                summary.undecided,
                summary.errors
            );
            match summary.ok() {
                true => ExitCode::SUCCESS,
                false if summary.runs > 0 && summary.failed_runs.len() > summary.errors => ExitCode::from(1),
                false => ExitCode::from(2),
            }
        }
        Cmd::Negative { fault, max_runs, nemesis } => {
            if !matches!(c.system, Target::Keel) {
                eprintln!("keel-chaos: planted bugs exist in keeld only");
                return ExitCode::from(2);
            }
            let nemesis = nemesis.unwrap_or(match fault.as_str() {
                "stale-reads" => Nemesis::PartitionLeader,
                "watch-drop-event" | "lease-early-expiry" => Nemesis::KillLeader,
                _ => Nemesis::KillAll,
            });
            let by = CaughtBy::for_fault(&fault);
            if by == CaughtBy::WatchCheck && c.watchers == 0 {
                eprintln!("keel-chaos: {fault} can only be caught by watchers (--watchers > 0)");
                return ExitCode::from(2);
            }
            if by == CaughtBy::LockCheck && c.lock_clients + c.lease_clients == 0 {
                eprintln!("keel-chaos: {fault} can only be caught by lock or lease clients (--lock-clients, --lease-clients)");
                return ExitCode::from(2);
            }
            let spec = suite_spec(Some(fault.clone()));
            match suite::negative_control(&spec, nemesis, by, max_runs, &mut out).await {
                Ok(Some(n)) => {
                    println!("negative control {fault}: caught in run {n} of at most {max_runs}");
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    println!("negative control {fault}: NOT caught in {max_runs} runs: the harness misses this bug");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("keel-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
