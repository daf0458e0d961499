//! One run: network, cluster, clients, watchers, lock and lease clients and nemesis for a while;
//! then heal, wait for the nodes to agree, read every key from every node, let the watchers catch
//! up, read the lapsed leases' keys until they are gone, and check every history.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keel_check::CheckOptions;
use keel_check::History;
use keel_check::KeyValues;
use keel_check::LockHistory;
use keel_check::LockReport;
use keel_check::LockVerdict;
use keel_check::Report;
use keel_check::Verdict;
use keel_check::WatchHistory;
use keel_check::WatchReport;
use rand::rngs::StdRng;
use rand::Rng as _;
use rand::SeedableRng as _;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::cluster::ClusterError;
use crate::cluster::System;
use crate::locks;
use crate::locks::LockRecorder;
use crate::nemesis;
use crate::nemesis::Nemesis;
use crate::nemesis::Schedule;
use crate::net::Net;
use crate::watchers::Watchers;
use crate::workload;
use crate::workload::Recorder;
use crate::workload::Workload;

/// How long the watchers get, once the cluster has converged, to observe the last revision of their
/// range: plenty for a healthy member to send what it has already applied.
const WATCH_CATCH_UP: Duration = Duration::from_secs(20);

/// How long, once the cluster has converged, the keys of lapsed leases are read until they are
/// gone: past the late-expiry deadline of a lease stopped as the load ended (TTL ≤ 5 s, plus the
/// bounds), so that a key that lingers is seen lingering.
const FINAL_PROBES: Duration = Duration::from_secs(20);

/// Everything that defines a run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub system: System,
    pub nodes: usize,
    pub nemesis: Nemesis,
    pub duration: Duration,
    pub workload: Workload,
    pub schedule: Schedule,
    /// The run's files (history, final state, node logs, report) go here.
    pub dir: PathBuf,
    /// Keeps concurrent runs' namespaces apart (1..=250).
    pub net_id: u8,
    pub check_budget: Duration,
}

/// What a run found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    pub system: String,
    pub nemesis: String,
    pub nodes: usize,
    pub seed: u64,
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    /// Acknowledged writes missing from the final state, and other final-state findings.
    pub lost_writes: usize,
    /// Whether every node agreed on leader, applied index and revision once healed.
    pub converged: bool,
    /// Nodes whose state differed from the leader's once healed.
    pub diverged_nodes: usize,
    pub verdict: Verdict,
    /// Watchers run beside the clients (0: no watch check).
    pub watchers: usize,
    /// Events delivered to them, over all watchers.
    pub watch_events: usize,
    /// Broken watch guarantees (`keel-check watch`).
    pub watch_violations: usize,
    /// Lock and lease clients (0 and 0: no lock check).
    pub lock_clients: usize,
    pub lease_clients: usize,
    /// Locks acquired, fenced writes that succeeded, lapsed leases whose expiry was judged.
    pub lock_acquisitions: usize,
    pub lock_fenced_ok: usize,
    pub lease_expiries_decided: usize,
    /// Broken lock and lease rules (`keel-check lock`).
    pub lock_violations: usize,
    pub faults: Vec<String>,
    pub dir: PathBuf,
}

impl RunResult {
    /// True if the run proves a bug: a violation, a lost write, diverged replicas, a cluster that
    /// did not converge once every fault was healed, a broken watch guarantee, a broken lock or
    /// lease rule, or lock and lease clients that got nowhere ([`RunResult::locks_idle`]).
    pub fn failed(&self) -> bool {
        self.verdict == Verdict::NotLinearizable
            || self.lost_writes > 0
            || self.diverged_nodes > 0
            || !self.converged
            || self.watch_violations > 0
            || self.lock_violations > 0
            || self.locks_idle()
    }

    /// Lock clients that never acquired a lock, or lease clients none of whose leases was seen to
    /// expire: the check had nothing to judge, which a run of any length with a working lease
    /// service never gives.
    pub fn locks_idle(&self) -> bool {
        (self.lock_clients > 0 && self.lock_acquisitions == 0)
            || (self.lease_clients > 0 && self.lease_expiries_decided == 0)
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ops ({} ok, {} fail, {} unknown), lost writes {}, diverged nodes {}{}",
            self.verdict,
            self.ops,
            self.ok,
            self.fail,
            self.unknown,
            self.lost_writes,
            self.diverged_nodes,
            if self.converged { "" } else { ", NOT CONVERGED" }
        )?;
        if self.watchers > 0 {
            write!(
                f,
                "; watch: {} events to {} watchers, {} violations",
                self.watch_events, self.watchers, self.watch_violations
            )?;
        }
        if self.lock_clients + self.lease_clients > 0 {
            write!(
                f,
                "; locks: {} acquisitions, {} fenced writes, {} lease expiries judged, {} violations{}",
                self.lock_acquisitions,
                self.lock_fenced_ok,
                self.lease_expiries_decided,
                self.lock_violations,
                if self.locks_idle() { " (IDLE: nothing to judge)" } else { "" }
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("final read: {0}")]
    FinalRead(String),
    #[error("checker: {0}")]
    Check(String),
}

/// What a run's checks reported.
pub struct Reports {
    pub linearizability: Report,
    /// `None` without watchers.
    pub watch: Option<WatchReport>,
    /// `None` without lock or lease clients.
    pub lock: Option<LockReport>,
}

/// Runs `spec` and checks its histories. The reports, histories and final state are written to
/// `spec.dir`; `log` gets progress lines.
pub async fn run(spec: RunSpec, log: &mut impl std::io::Write) -> Result<(RunResult, Reports), RunError> {
    std::fs::create_dir_all(&spec.dir)
        .map_err(|source| RunError::Io { what: format!("create {}", spec.dir.display()), source })?;
    let net = Net::create(spec.net_id, spec.nodes).map_err(ClusterError::from)?;
    let mut cluster = Cluster::start(spec.system.clone(), net, &spec.dir).await?;
    let endpoints: Vec<String> = (1..=spec.nodes).map(|i| cluster.client_addr(i)).collect();
    let _ = writeln!(
        log,
        "run {} on {} nodes of {}, nemesis {}, {:?}, seed {}, files in {}",
        spec.dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        spec.nodes,
        spec.system.name(),
        spec.nemesis.name(),
        spec.duration,
        spec.workload.seed,
        spec.dir.display()
    );

    let epoch = Instant::now();
    let recorder = Arc::new(Recorder::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clients = tokio::spawn(workload::run(
        spec.workload.clone(),
        endpoints.clone(),
        epoch,
        stop_rx.clone(),
        recorder.clone(),
    ));
    let mut watchers = (spec.workload.watchers > 0)
        .then(|| Watchers::start(&spec.workload, endpoints.clone(), epoch, recorder.clone()));
    let locks_on = spec.workload.lock_clients + spec.workload.lease_clients > 0;
    let lock_recorder = Arc::new(LockRecorder::new(epoch));
    lock_recorder.push(keel_check::lock::LockRecord::Bounds(locks::bounds(&spec.system)));
    let lock_clients = locks_on.then(|| {
        tokio::spawn(locks::run(
            spec.workload.clone(),
            endpoints.clone(),
            stop_rx.clone(),
            lock_recorder.clone(),
        ))
    });

    let mut rng = StdRng::seed_from_u64(spec.workload.seed);
    let mut faults = Vec::new();
    let end = epoch + spec.duration;
    let event = |faults: &mut Vec<String>, log: &mut dyn std::io::Write, what: String| {
        let line = format!("{:>7.3}s {what}", epoch.elapsed().as_secs_f64());
        let _ = writeln!(log, "  {line}");
        faults.push(line);
    };
    while spec.nemesis != Nemesis::None && Instant::now() + spec.schedule.quiet < end {
        tokio::time::sleep(spec.schedule.quiet).await;
        let fault_at = lock_recorder.now_us();
        let what = match nemesis::inject(spec.nemesis, &mut cluster, &mut rng).await {
            Ok(w) => w,
            Err(e) => format!("fault not injected: {e}"),
        };
        // A fault window for the lease timing check (`fault` ... `heal`), from before the fault.
        lock_recorder.fault(fault_at, &what);
        event(&mut faults, log, what);
        let hold = rng.gen_range(spec.schedule.fault_min..=spec.schedule.fault_max);
        tokio::time::sleep(hold.min(end.saturating_duration_since(Instant::now()))).await;
        let what = nemesis::heal(&mut cluster)?;
        lock_recorder.heal(&what);
        event(&mut faults, log, what);
    }
    tokio::time::sleep_until(end).await;
    let _ = stop_tx.send(true);
    let _ = clients.await;
    if let Some(t) = lock_clients {
        let _ = t.await;
    }
    let what = nemesis::heal(&mut cluster)?;
    lock_recorder.heal(&what);
    event(&mut faults, log, format!("end of load; {what}"));

    // Everything healed: the nodes must agree and hold the same data.
    // A cluster that does not converge once healed is a finding (a replica stuck behind, or a
    // lost leader), not a harness failure: the run goes on to compare states and check history.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let converged = match cluster.wait_converged(Duration::from_secs(60)).await {
        Ok(()) => true,
        Err(e) => {
            let _ = writeln!(log, "  NOT CONVERGED: {e}");
            false
        }
    };
    // A node that does not answer is already a finding when the cluster did not converge; the
    // others' states and the history are still checked.
    let mut states = Vec::new();
    for (i, addr) in endpoints.iter().enumerate() {
        match workload::read_all_local(addr, spec.workload.keys).await {
            Ok(state) => states.push(Some(state)),
            Err(e) if !converged => {
                let _ = writeln!(log, "  node {} not read: {e}", i + 1);
                states.push(None);
            }
            Err(e) => return Err(RunError::FinalRead(e)),
        }
    }
    // The leader's state is the final state the history is checked against; the others must equal it.
    let reference =
        states[leader - 1].clone().ok_or_else(|| RunError::FinalRead("the leader did not answer".into()))?;
    let diverged_nodes = states.iter().flatten().filter(|s| **s != reference).count();
    if diverged_nodes > 0 {
        for (i, s) in states.iter().enumerate() {
            let _ = writeln!(log, "  node {} state: {s:?}", i + 1);
        }
    }
    let final_state: KeyValues = reference.into_iter().collect::<BTreeMap<_, _>>();
    if let Some(mut w) = watchers.take() {
        // Healed and converged: every watcher must now catch up with its range. The end record
        // makes the checker hold the laggards to it; without convergence nothing can be promised.
        let end = match converged {
            true => cluster.status(leader).await.map(|st| st.revision),
            false => None,
        };
        let behind = w.catch_up(&endpoints[leader - 1], WATCH_CATCH_UP).await;
        for (id, reached, target) in &behind {
            let _ = writeln!(log, "  watcher {id} behind: observed up to revision {reached} of {target}");
        }
        w.stop(end).await;
    }
    if locks_on {
        let left = locks::final_probes(&lock_recorder, &endpoints[leader - 1], FINAL_PROBES).await;
        if left > 0 {
            let _ = writeln!(log, "  {left} keys of lapsed leases still present after {FINAL_PROBES:?}");
        }
    }
    drop(cluster);

    let history = History { initial: KeyValues::new(), ops: recorder.take() };
    let write = |name: &str, f: &dyn Fn(&mut std::fs::File) -> std::io::Result<()>| {
        let path = spec.dir.join(name);
        std::fs::File::create(&path)
            .and_then(|mut file| f(&mut file))
            .map_err(|source| RunError::Io { what: format!("write {}", path.display()), source })
    };
    write("history.jsonl", &|f| history.write_to(f).map_err(std::io::Error::other))?;
    write("final.json", &|f| serde_json::to_writer_pretty(f, &final_state).map_err(std::io::Error::other))?;
    write("faults.txt", &|f| f.write_all(faults.join("\n").as_bytes()))?;

    let report =
        keel_check::check(&history, Some(&final_state), &CheckOptions::with_budget(spec.check_budget))
            .map_err(|e| RunError::Check(e.to_string()))?;
    write("report.json", &|f| serde_json::to_writer_pretty(f, &report).map_err(std::io::Error::other))?;
    let watch_report = match spec.workload.watchers {
        0 => None,
        _ => {
            let watch = WatchHistory { records: recorder.take_watch() };
            write("watch.jsonl", &|f| watch.write_to(f).map_err(std::io::Error::other))?;
            let report = keel_check::check_watch(&watch).map_err(|e| RunError::Check(e.to_string()))?;
            write("watch-report.json", &|f| {
                serde_json::to_writer_pretty(f, &report).map_err(std::io::Error::other)
            })?;
            Some(report)
        }
    };
    let lock_report = match locks_on {
        false => None,
        true => {
            let history = LockHistory { records: lock_recorder.take() };
            write("lock.jsonl", &|f| history.write_to(f).map_err(std::io::Error::other))?;
            let report = keel_check::check_lock(&history).map_err(|e| RunError::Check(e.to_string()))?;
            write("lock-report.json", &|f| {
                serde_json::to_writer_pretty(f, &report).map_err(std::io::Error::other)
            })?;
            Some(report)
        }
    };
    let result = RunResult {
        system: spec.system.name().to_string(),
        nemesis: spec.nemesis.name(),
        nodes: spec.nodes,
        seed: spec.workload.seed,
        ops: report.summary.ops,
        ok: report.summary.ok,
        fail: report.summary.fail,
        unknown: report.summary.unknown,
        lost_writes: report.final_state.as_ref().map_or(0, Vec::len),
        converged,
        diverged_nodes,
        verdict: report.verdict,
        watchers: spec.workload.watchers,
        watch_events: watch_report.as_ref().map_or(0, |r| r.summary.events),
        watch_violations: watch_report.as_ref().map_or(0, |r| r.violations.len()),
        lock_clients: spec.workload.lock_clients,
        lease_clients: spec.workload.lease_clients,
        lock_acquisitions: lock_report.as_ref().map_or(0, |r| r.summary.acquisitions),
        lock_fenced_ok: lock_report.as_ref().map_or(0, |r| r.summary.fenced_ok),
        lease_expiries_decided: lock_report.as_ref().map_or(0, |r| r.summary.late_expiry_decided),
        lock_violations: lock_report.as_ref().map_or(0, |r| match r.verdict {
            LockVerdict::Valid => 0,
            LockVerdict::Invalid => r.violations.len(),
        }),
        faults,
        dir: spec.dir.clone(),
    };
    Ok((result, Reports { linearizability: report, watch: watch_report, lock: lock_report }))
}
