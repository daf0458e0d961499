//! `keel demo`: three real `keeld` processes on loopback lose their leader to SIGKILL and keep
//! every acknowledged write.
//!
//! This file owns the demo: its flags, the child processes, the six steps and what they print.
//! The decisions (where keeld is, which leader the nodes agree on, which acknowledged writes a
//! read does not return) are pure functions tested below; `tests/demo.rs` runs the whole demo.
//!
//! Contract: every `keeld` started is SIGKILLed and reaped before [`run`] returns, on success, on
//! failure and on Ctrl+C ([`Cluster`] is the guard; its `Drop` covers a panic). Every wait polls a
//! condition (`GET /ready`, `GET /v1/cluster/status`, the count of acknowledged writes) against a
//! deadline; nothing sleeps in place of a condition.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Deserialize;
use tokio::sync::watch;

use crate::certs;
use crate::client::{
    decode_kvs, kv_path, with_query, ApiRequest, Client, ClientError, Endpoint, Kv, RangeAnswer,
};
use crate::tls::{ClientTls, TlsFiles};

/// The founding members are nodes 1..=NODES.
const NODES: u64 = 3;
const STEPS: u32 = 6;
/// Keys written in step 2.
const FIRST_WRITES: usize = 100;
/// Writes acknowledged in step 4 before the leader is killed, and again once the new leader is
/// known (so that some are certainly served by it).
const WRITES_AROUND_KILL: u64 = 20;
/// Every key the demo writes starts with this.
const PREFIX: &str = "demo/";
/// Between two checks of a condition.
const POLL: Duration = Duration::from_millis(25);
/// After a failed write in step 4, so that a cluster between leaders is not hammered.
const FAILED_WRITE_PAUSE: Duration = Duration::from_millis(50);
/// Per readiness or status probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Per write or read. A follower forwards a write to the leader for up to 5 s (`forward_timeout_ms`),
/// so a write sent during the election is answered rather than cut off as "outcome unknown".
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadlines are generous (a debug build on a loaded machine); a healthy run takes seconds.
const START_DEADLINE: Duration = Duration::from_secs(30);
const ELECTION_DEADLINE: Duration = Duration::from_secs(20);
const WRITES_DEADLINE: Duration = Duration::from_secs(20);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(30);
const KEELD: &str = "keeld";

/// `keel demo` flags. The global `--endpoints`, `--timeout` and `--json` do not apply.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// The keeld binary [default: `keeld` next to this `keel`, else the first on PATH].
    #[arg(long, value_name = "PATH")]
    pub keeld: Option<PathBuf>,
    /// Keep the temporary directory (data dirs and logs) instead of removing it at the end.
    #[arg(long)]
    pub keep: bool,
    /// TLS on both ports of every node, with mutual TLS: certificates from `keel certs` in the
    /// demo's directory, each node's for its client port, its peer port and dialing its peers,
    /// `root`'s for the demo's requests.
    #[arg(long)]
    pub tls: bool,
    /// After step 5, leave the cluster running until Ctrl+C (then step 6, exit 0), to try the
    /// commands printed in step 1 against it.
    #[arg(long)]
    pub hold: bool,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why the demo stopped early. Each is reported after every node has been stopped.
#[derive(Debug)]
pub enum DemoError {
    /// No keeld binary where it was looked for.
    KeeldNotFound { given: Option<PathBuf>, beside_keel: Option<PathBuf> },
    /// Ctrl+C could not be hooked, so the demo could not promise to clean up; nothing was started.
    Signal(io::Error),
    /// A file or process operation failed; `doing` says which.
    Io { doing: String, source: io::Error },
    /// A condition did not hold by its deadline.
    TimedOut { waited_for: String, after: Duration, last: String, logs: Vec<PathBuf> },
    /// A node exited without being killed.
    NodeExited { id: u64, status: ExitStatus, log: PathBuf },
    /// The cluster named a node the demo did not start.
    UnknownNode(u64),
    /// A request that a cluster with a leader serves failed (boxed: `ClientError` is large).
    Request { doing: String, source: Box<ClientError> },
    /// Acknowledged writes that a read did not return as written: what the demo exists to show
    /// cannot happen.
    Lost { missing: Vec<String>, acknowledged: usize },
    /// The certificates of `--tls` could not be made or read.
    Certs(String),
    /// Ctrl+C.
    Interrupted,
}

impl DemoError {
    /// 130 after Ctrl+C, as a shell reports a command ended by SIGINT; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DemoError::Interrupted => 130,
            _ => 1,
        }
    }

    /// After a failure the temporary directory is kept for its logs; after Ctrl+C it is not.
    fn keeps_dir(&self) -> bool {
        !matches!(self, DemoError::Interrupted)
    }
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BUILD: &str = "build it with `cargo build -p keel-kv`";
        match self {
            DemoError::KeeldNotFound { given: Some(path), .. } => {
                write!(f, "no executable keeld at {} (--keeld); {BUILD}", path.display())
            }
            DemoError::KeeldNotFound { given: None, beside_keel } => {
                f.write_str("keeld not found ")?;
                if let Some(path) = beside_keel {
                    write!(f, "next to keel ({}) nor ", path.display())?;
                }
                write!(f, "on PATH; {BUILD}, or pass --keeld PATH")
            }
            DemoError::Signal(e) => write!(f, "cannot handle Ctrl+C ({e}), so no node was started"),
            DemoError::Io { doing, source } => write!(f, "{doing}: {source}"),
            DemoError::Certs(e) => write!(f, "--tls: {e}"),
            DemoError::TimedOut { waited_for, after, last, logs } => {
                write!(f, "timed out after {} waiting for {waited_for} (last: {last}); see ", secs(*after))?;
                let logs: Vec<String> = logs.iter().map(|l| l.display().to_string()).collect();
                f.write_str(&logs.join(", "))
            }
            DemoError::NodeExited { id, status, log } => {
                write!(f, "node {id} exited on its own ({status}); see {}", log.display())
            }
            DemoError::UnknownNode(id) => {
                write!(f, "the cluster names node {id}, which the demo did not start")
            }
            DemoError::Request { doing, source } => write!(f, "{doing}: {source}"),
            DemoError::Lost { missing, acknowledged } => {
                let shown: Vec<&str> = missing.iter().take(10).map(String::as_str).collect();
                let more = if missing.len() > shown.len() { ", …" } else { "" };
                write!(
                    f,
                    "{} of {acknowledged} acknowledged writes are missing or changed: {}{more}",
                    missing.len(),
                    shown.join(", ")
                )
            }
            DemoError::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl std::error::Error for DemoError {}

// ---------------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------------

/// Runs the demo, printing as it goes; returns nothing more to print.
///
/// Order: find keeld, make the directory, then race the steps against Ctrl+C; whatever ends the
/// race, stop every node (SIGKILL, reap), then remove the directory (kept with `--keep`, and
/// after a failure for its logs).
pub async fn run(args: DemoArgs) -> Result<String, DemoError> {
    let keeld = find_keeld(args.keeld.as_deref())?;
    let dir = make_dir()?;
    let mut out = Out::default();
    out.line("keel demo: a 3-node cluster on loopback loses its leader and keeps every acknowledged write");
    out.line(format!("keeld: {}", keeld.display()));
    out.line(format!("data and logs: {}", dir.display()));
    if args.tls {
        out.line(format!(
            "TLS on both ports, client certificates required; certificates (keel certs) in {}",
            dir.join("certs").display()
        ));
    }

    let tls = if args.tls { Some(make_certs(&dir)) } else { None };
    let outcome = match tls.transpose().and_then(|tls| Cluster::new(keeld, &dir, tls)) {
        Err(e) => Err(e),
        Ok(mut cluster) => {
            let outcome = tokio::select! {
                // Ctrl+C first: its handler is installed when this future is first polled, before
                // the steps start any keeld, so from then on Ctrl+C reaches this select instead of
                // killing keel and orphaning the nodes.
                biased;
                signal = tokio::signal::ctrl_c() => Err(match signal {
                    Ok(()) => DemoError::Interrupted,
                    Err(e) => DemoError::Signal(e),
                }),
                result = steps(&mut cluster, &mut out) => result,
            };
            let outcome = match outcome {
                Ok(()) if args.hold => hold(&mut cluster, &mut out).await,
                other => other,
            };
            match &outcome {
                Ok(()) => out.begin(step(6, "stopping the cluster")),
                Err(DemoError::Interrupted) => {
                    // Ends the step line left open, or has a line of its own.
                    if out.open {
                        out.end("interrupted");
                    } else {
                        out.line("interrupted");
                    }
                    out.begin("stopping the cluster");
                }
                Err(_) => {
                    out.abandon("failed");
                    out.begin("stopping the cluster");
                }
            }
            cluster.stop();
            out.end("done");
            outcome
        }
    };

    let keep = args.keep || outcome.as_ref().err().is_some_and(DemoError::keeps_dir);
    if keep {
        out.line(format!("kept {} (data dirs and logs)", dir.display()));
    } else {
        match fs::remove_dir_all(&dir) {
            Ok(()) => out.line(format!("removed {}", dir.display())),
            Err(e) => out.line(format!("could not remove {}: {e}", dir.display())),
        }
    }
    outcome.map(|()| String::new())
}

/// Steps 1 to 5; the caller stops the cluster (step 6) whatever happens here.
async fn steps(cluster: &mut Cluster, out: &mut Out) -> Result<(), DemoError> {
    let probe = Client::new(Vec::new(), PROBE_TIMEOUT, cluster.client_tls());
    let all: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();

    out.begin(step(1, format!("starting {NODES} keeld nodes")));
    let started = Instant::now();
    for &id in &all {
        cluster.start(id)?;
    }
    wait_ready(cluster, &probe).await?;
    let leader = wait_leader(cluster, &probe, &all, START_DEADLINE, "the nodes to agree on a leader").await?;
    out.end(format!("ready ({})", secs(started.elapsed())));
    for node in &cluster.nodes {
        let pid = node.process.as_ref().map_or_else(|| "-".to_owned(), |p| p.id().to_string());
        out.detail(format!("node {}: pid {pid}, client {}, peer {}", node.id, node.client, node.peer));
    }
    out.detail(format!("leader: node {leader} ({})", cluster.node(leader)?.client));
    let scheme = if cluster.tls.is_some() { "https" } else { "http" };
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| format!("{scheme}://{}", n.client)).collect();
    for line in commands(&endpoints.join(","), cluster.tls.as_ref()) {
        out.detail(line);
    }

    let all_endpoints = all.iter().map(|&id| cluster.endpoint(id)).collect::<Result<Vec<_>, _>>()?;
    let client = Client::new(all_endpoints, REQUEST_TIMEOUT, cluster.client_tls());
    out.begin(step(2, format!("writing {FIRST_WRITES} keys")));
    let started = Instant::now();
    let mut acked = BTreeMap::new();
    for n in 0..FIRST_WRITES {
        let (key, value) = (key_name(n), value_for(n));
        put(&client, &key, &value).await.map_err(|source| DemoError::Request {
            doing: format!("writing {key}"),
            source: Box::new(source),
        })?;
        acked.insert(key, value);
    }
    out.end(format!("{} acknowledged ({})", acked.len(), secs(started.elapsed())));

    out.begin(step(3, "reading them back"));
    let read = read_all(&client, None).await?;
    check_all_readable(&acked, &read, out)?;
    out.end(format!("{n} of {n} read, every value as written", n = acked.len()));

    // Step 4: a writer keeps writing, one acknowledged write after another, while the leader is
    // killed; both run in this task (no spawn), so dropping this future on Ctrl+C drops the writer.
    let stop = Cell::new(false);
    let (progress_tx, progress_rx) = watch::channel(WriterProgress::default());
    let writer = write_until_stopped(&client, FIRST_WRITES, &stop, progress_tx);
    let failover = async {
        let result = kill_leader(cluster, out, &probe, leader, progress_rx).await;
        // Whatever happened, so that the join below ends.
        stop.set(true);
        result
    };
    let (during, new_leader) = tokio::join!(writer, failover);
    let new_leader = new_leader?;
    out.detail(format!(
        "writes through the failover: {} acknowledged in all, {} not (refused or outcome unknown; not counted)",
        during.acked.len(),
        during.failed
    ));
    acked.extend(during.acked);
    let read = read_all(&client, None).await?;
    check_all_readable(&acked, &read, out)?;
    out.detail(format!("all {} acknowledged writes readable: yes (no acknowledged write lost)", acked.len()));

    let leader_addr = cluster.endpoint(new_leader)?;
    let target = node_status(&probe, &leader_addr)
        .await
        .map_err(|source| DemoError::Request {
            doing: format!("reading node {new_leader}'s status"),
            source: Box::new(source),
        })?
        .applied_index
        .unwrap_or(0);
    out.begin(step(5, format!("restarting node {leader}")));
    let started = Instant::now();
    cluster.start(leader)?;
    let applied = wait_applied(cluster, &probe, leader, target).await?;
    out.end(format!("caught up to applied index {applied} ({})", secs(started.elapsed())));
    let restarted = cluster.endpoint(leader)?;
    let local = read_all(&client, Some(&restarted)).await?;
    check_all_readable(&acked, &local, out)?;
    out.detail(format!("node {leader} holds all {} acknowledged writes in its own state: yes", acked.len()));
    Ok(())
}

/// `--hold`: the cluster keeps running until Ctrl+C (the handler is still installed: the
/// select in [`run`] polled it first), checked on every second so that a node that exits says so.
async fn hold(cluster: &mut Cluster, out: &mut Out) -> Result<(), DemoError> {
    out.line("holding the cluster (--hold): try the commands of step 1; Ctrl+C stops it");
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            signal = tokio::signal::ctrl_c() => return signal.map_err(DemoError::Signal),
            _ = ticks.tick() => cluster.check_running()?,
        }
    }
}

/// Step 4 bar the writer: waits for some acknowledged writes, SIGKILLs the leader, waits for the
/// survivors to agree on a new one, then for more acknowledged writes. Returns the new leader.
async fn kill_leader(
    cluster: &mut Cluster,
    out: &mut Out,
    probe: &Client,
    leader: u64,
    mut progress: watch::Receiver<WriterProgress>,
) -> Result<u64, DemoError> {
    let logs = cluster.logs();
    let pid = cluster.node(leader)?.process.as_ref().map_or(0, Child::id);
    out.line(step(
        4,
        format!("killing the leader (node {leader}, pid {pid}) with SIGKILL, writes continuing"),
    ));
    wait_acks(&mut progress, WRITES_AROUND_KILL, "with the leader alive", &logs).await?;
    cluster.kill(leader)?;
    let killed = Instant::now();
    out.detail(format!("writes acknowledged before the kill: {}", progress.borrow().acked));

    let survivors: Vec<u64> = cluster.nodes.iter().map(|n| n.id).filter(|&id| id != leader).collect();
    let what = "the surviving nodes to agree on a new leader";
    let new_leader = wait_leader(cluster, probe, &survivors, ELECTION_DEADLINE, what).await?;
    out.detail(format!(
        "new leader: node {new_leader} ({}) after {}",
        cluster.node(new_leader)?.client,
        secs(killed.elapsed())
    ));
    let target = progress.borrow().acked + WRITES_AROUND_KILL;
    wait_acks(&mut progress, target, "with the new leader", &logs).await?;
    Ok(new_leader)
}

/// Fails with [`DemoError::Lost`] (after saying "no") if `read` lacks an acknowledged write.
fn check_all_readable(acked: &BTreeMap<String, String>, read: &[Kv], out: &mut Out) -> Result<(), DemoError> {
    let missing = missing_writes(acked, read);
    if missing.is_empty() {
        return Ok(());
    }
    out.abandon("failed");
    out.detail(format!("all {} acknowledged writes readable: no, {} missing", acked.len(), missing.len()));
    Err(DemoError::Lost { missing, acknowledged: acked.len() })
}

// ---------------------------------------------------------------------------------------------
// Waiting on conditions
// ---------------------------------------------------------------------------------------------

/// A condition being waited for: what it is, its deadline, and the logs that would explain a
/// timeout.
struct Wait {
    what: String,
    start: Instant,
    limit: Duration,
    logs: Vec<PathBuf>,
}

impl Wait {
    fn new(what: impl Into<String>, limit: Duration, logs: Vec<PathBuf>) -> Wait {
        Wait { what: what.into(), start: Instant::now(), limit, logs }
    }

    /// After a check that did not hold (`last` is what it saw): fails if a node died or the
    /// deadline has passed, else pauses one poll interval before the next check.
    async fn again(&self, cluster: &mut Cluster, last: String) -> Result<(), DemoError> {
        cluster.check_running()?;
        if self.start.elapsed() >= self.limit {
            return Err(DemoError::TimedOut {
                waited_for: self.what.clone(),
                after: self.limit,
                last,
                logs: self.logs.clone(),
            });
        }
        tokio::time::sleep(POLL).await;
        Ok(())
    }
}

async fn wait_ready(cluster: &mut Cluster, probe: &Client) -> Result<(), DemoError> {
    let wait = Wait::new("every node to answer GET /ready with 200", START_DEADLINE, cluster.logs());
    loop {
        let mut not_ready = Vec::new();
        for node in &cluster.nodes {
            let request = ApiRequest::get("/ready".into());
            if let Err(e) = probe.call_one(&cluster.endpoint(node.id)?, &request).await {
                not_ready.push(format!("node {}: {e}", node.id));
            }
        }
        if not_ready.is_empty() {
            return Ok(());
        }
        wait.again(cluster, not_ready.join("; ")).await?;
    }
}

/// Polls the status of the nodes `among` until they agree on a leader among them.
async fn wait_leader(
    cluster: &mut Cluster,
    probe: &Client,
    among: &[u64],
    limit: Duration,
    what: &str,
) -> Result<u64, DemoError> {
    let logs = among.iter().filter_map(|&id| cluster.node(id).ok()).map(|n| n.log.clone()).collect();
    let wait = Wait::new(what, limit, logs);
    loop {
        let mut statuses = Vec::new();
        let mut seen = Vec::new();
        for &id in among {
            match node_status(probe, &cluster.endpoint(id)?).await {
                Ok(status) => {
                    seen.push(format!("node {id}: {status}"));
                    statuses.push((id, status));
                }
                Err(e) => seen.push(format!("node {id}: {e}")),
            }
        }
        if statuses.len() == among.len() {
            if let Some(leader) = agreed_leader(&statuses) {
                return Ok(leader);
            }
        }
        wait.again(cluster, seen.join("; ")).await?;
    }
}

/// Polls node `id` until it has applied the log up to `target`; returns its applied index.
async fn wait_applied(cluster: &mut Cluster, probe: &Client, id: u64, target: u64) -> Result<u64, DemoError> {
    let (addr, log) = (cluster.endpoint(id)?, cluster.node(id)?.log.clone());
    let wait =
        Wait::new(format!("node {id} to apply the log up to index {target}"), CATCH_UP_DEADLINE, vec![log]);
    loop {
        let last = match node_status(probe, &addr).await {
            Ok(NodeStatus { applied_index: Some(applied), .. }) if applied >= target => return Ok(applied),
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        wait.again(cluster, last).await?;
    }
}

/// Waits until the writer has `target` acknowledged writes (its own count, published on every
/// answer).
async fn wait_acks(
    progress: &mut watch::Receiver<WriterProgress>,
    target: u64,
    when: &str,
    logs: &[PathBuf],
) -> Result<(), DemoError> {
    let reached = tokio::time::timeout(WRITES_DEADLINE, progress.wait_for(|p| p.acked >= target))
        .await
        .is_ok_and(|seen| seen.is_ok());
    if reached {
        return Ok(());
    }
    Err(DemoError::TimedOut {
        waited_for: format!("{target} acknowledged writes {when}"),
        after: WRITES_DEADLINE,
        last: progress.borrow().to_string(),
        logs: logs.to_vec(),
    })
}

/// What the demo reads of a node's `GET /v1/cluster/status`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
struct NodeStatus {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    state: Option<String>,
    /// The leader this node knows of, if any.
    leader: Option<u64>,
    applied_index: Option<u64>,
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.state.as_deref().unwrap_or("?"))?;
        match self.leader {
            Some(leader) => write!(f, ", leader {leader}")?,
            None => f.write_str(", no leader")?,
        }
        write!(f, ", applied {}", self.applied_index.unwrap_or(0))
    }
}

async fn node_status(probe: &Client, node: &Endpoint) -> Result<NodeStatus, ClientError> {
    probe.call_one(node, &ApiRequest::get("/v1/cluster/status".into())).await?.decode()
}

/// The leader every node in `statuses` names, provided it is one of them and calls itself the
/// leader: a node may still name a leader it has lost, so the leader's own word settles it.
fn agreed_leader(statuses: &[(u64, NodeStatus)]) -> Option<u64> {
    let leader = statuses.first()?.1.leader?;
    let all_agree = statuses.iter().all(|(_, s)| s.leader == Some(leader));
    let says_so = statuses.iter().any(|(id, s)| *id == leader && s.state.as_deref() == Some("leader"));
    (all_agree && says_so).then_some(leader)
}

// ---------------------------------------------------------------------------------------------
// Writes and reads
// ---------------------------------------------------------------------------------------------

fn key_name(n: usize) -> String {
    format!("{PREFIX}{n:04}")
}

fn value_for(n: usize) -> String {
    format!("value-{n}")
}

async fn put(client: &Client, key: &str, value: &str) -> Result<(), ClientError> {
    client.call(&ApiRequest::put_bytes(kv_path(key.as_bytes()), value.as_bytes().to_vec())).await.map(drop)
}

/// Every demo key in one range request: linearizable through any endpoint of `client`, or with
/// `local`, serializable from that node alone (its own state, no round to the leader).
async fn read_all(client: &Client, local: Option<&Endpoint>) -> Result<Vec<Kv>, DemoError> {
    let mut params = vec![("prefix", PREFIX.as_bytes().to_vec())];
    let answer = match local {
        None => client.call(&ApiRequest::get(with_query("/v1/kv", &params))).await,
        Some(node) => {
            params.push(("consistency", b"serializable".to_vec()));
            client.call_one(node, &ApiRequest::get(with_query("/v1/kv", &params))).await
        }
    };
    let decoded = answer.and_then(|answer| {
        let range: RangeAnswer = answer.decode()?;
        decode_kvs(&answer.endpoint, &range.kvs)
    });
    decoded.map_err(|source| DemoError::Request {
        doing: format!("reading the {PREFIX} keys"),
        source: Box::new(source),
    })
}

/// The acknowledged keys that `read` lacks or holds with another value, in key order.
fn missing_writes(acked: &BTreeMap<String, String>, read: &[Kv]) -> Vec<String> {
    let found: BTreeMap<&[u8], Option<&[u8]>> =
        read.iter().map(|kv| (kv.key.as_slice(), kv.value.as_deref())).collect();
    acked
        .iter()
        .filter(|(key, value)| found.get(key.as_bytes()) != Some(&Some(value.as_bytes())))
        .map(|(key, _)| key.clone())
        .collect()
}

/// The writer's running count, published after every answer.
#[derive(Clone, Debug, Default)]
struct WriterProgress {
    acked: u64,
    failed: u64,
    last_error: Option<String>,
}

impl fmt::Display for WriterProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} acknowledged, {} failed", self.acked, self.failed)?;
        if let Some(e) = &self.last_error {
            write!(f, ", the last with: {e}")?;
        }
        Ok(())
    }
}

/// What the writer leaves: the writes acknowledged, and how many were not.
struct Written {
    acked: BTreeMap<String, String>,
    failed: u64,
}

/// Writes keys `first`, `first + 1`, … one at a time through `client` (which fails over across
/// the nodes) until `stop`. A failed write is counted, not retried: it may have been applied or
/// not (the node died holding it), and the demo vouches only for acknowledged writes.
async fn write_until_stopped(
    client: &Client,
    first: usize,
    stop: &Cell<bool>,
    progress: watch::Sender<WriterProgress>,
) -> Written {
    let mut written = Written { acked: BTreeMap::new(), failed: 0 };
    let mut count = WriterProgress::default();
    let mut n = first;
    while !stop.get() {
        let (key, value) = (key_name(n), value_for(n));
        n += 1;
        match put(client, &key, &value).await {
            Ok(()) => {
                written.acked.insert(key, value);
                count.acked += 1;
            }
            Err(e) => {
                written.failed += 1;
                count.failed += 1;
                count.last_error = Some(e.to_string());
                tokio::time::sleep(FAILED_WRITE_PAUSE).await;
            }
        }
        progress.send_replace(count.clone());
    }
    written
}

// ---------------------------------------------------------------------------------------------
// Processes and files
// ---------------------------------------------------------------------------------------------

/// One keeld: its addresses and files, and its process while it runs.
struct Node {
    id: u64,
    client: SocketAddr,
    peer: SocketAddr,
    data_dir: PathBuf,
    /// stdout and stderr of every run of this node, appended.
    log: PathBuf,
    /// Invariant: `Some` from spawning until the process has been killed *and* reaped.
    process: Option<Child>,
}

/// The demo's keeld processes, and the guard that leaves none behind: [`Cluster::stop`] SIGKILLs
/// and reaps every running node, and `Drop` calls it, so a panic cleans up too.
struct Cluster {
    keeld: PathBuf,
    initial_cluster: String,
    nodes: Vec<Node>,
    /// `--tls`: the certificates, and the client's settings made of them.
    tls: Option<DemoTls>,
}

impl Cluster {
    /// Chooses the addresses and files of nodes 1..=NODES under `dir`; starts nothing.
    fn new(keeld: PathBuf, dir: &Path, tls: Option<DemoTls>) -> Result<Cluster, DemoError> {
        let bind_error = |source| DemoError::Io { doing: "binding a loopback port".into(), source };
        // Every listener stays bound until all are chosen, so the ports are distinct; then they
        // are released for keeld. Another process could take one in between: keeld would then
        // exit, and the demo say so with its log.
        let mut held = Vec::new();
        let mut nodes = Vec::new();
        for id in 1..=NODES {
            let client = TcpListener::bind("127.0.0.1:0").map_err(bind_error)?;
            let peer = TcpListener::bind("127.0.0.1:0").map_err(bind_error)?;
            nodes.push(Node {
                id,
                client: client.local_addr().map_err(bind_error)?,
                peer: peer.local_addr().map_err(bind_error)?,
                data_dir: dir.join(format!("n{id}")),
                log: dir.join(format!("n{id}.log")),
                process: None,
            });
            held.extend([client, peer]);
        }
        drop(held);
        let initial_cluster: Vec<String> = nodes.iter().map(|n| format!("{}={}", n.id, n.peer)).collect();
        Ok(Cluster { keeld, initial_cluster: initial_cluster.join(","), nodes, tls })
    }

    /// Node `id`'s client address, dialed as the demo dials it (TLS with `--tls`).
    fn endpoint(&self, id: u64) -> Result<Endpoint, DemoError> {
        let plain = Endpoint::from(self.node(id)?.client);
        plain.secured(self.client_tls().as_ref()).map_err(|e| DemoError::Certs(e.to_string()))
    }

    fn client_tls(&self) -> Option<Arc<ClientTls>> {
        self.tls.as_ref().map(|t| t.client.clone())
    }

    fn node(&self, id: u64) -> Result<&Node, DemoError> {
        self.nodes.iter().find(|n| n.id == id).ok_or(DemoError::UnknownNode(id))
    }

    fn logs(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.log.clone()).collect()
    }

    /// Starts node `id` (again: a restarted node resumes from its data dir).
    fn start(&mut self, id: u64) -> Result<(), DemoError> {
        let Cluster { keeld, initial_cluster, nodes, tls } = self;
        let node = nodes.iter_mut().find(|n| n.id == id).ok_or(DemoError::UnknownNode(id))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io_error(format!("opening {}", node.log.display())))?;
        let log_too = log.try_clone().map_err(io_error(format!("opening {}", node.log.display())))?;
        let child = Command::new(&*keeld)
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--client-addr")
            .arg(node.client.to_string())
            .arg("--peer-addr")
            .arg(node.peer.to_string())
            .arg("--initial-cluster")
            .arg(&*initial_cluster)
            .args(tls.as_ref().map(|t| t.keeld_flags(id)).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            .spawn()
            .map_err(io_error(format!("starting {} for node {id}", keeld.display())))?;
        node.process = Some(child);
        Ok(())
    }

    /// SIGKILLs node `id` (on Unix `Child::kill` is SIGKILL: no shutdown, as in a crash) and
    /// reaps it; returns its pid.
    fn kill(&mut self, id: u64) -> Result<u32, DemoError> {
        let node = self.nodes.iter_mut().find(|n| n.id == id).ok_or(DemoError::UnknownNode(id))?;
        let Some(mut child) = node.process.take() else {
            return Err(DemoError::Io {
                doing: format!("killing node {id}"),
                source: io::Error::other("it is not running"),
            });
        };
        let pid = child.id();
        let killed = child.kill().and_then(|()| child.wait());
        if let Err(source) = killed {
            // Not reaped: back under the guard, which tries again.
            node.process = Some(child);
            return Err(DemoError::Io { doing: format!("killing node {id} (pid {pid})"), source });
        }
        Ok(pid)
    }

    /// Fails if a node that should be running has exited (it is reaped here).
    fn check_running(&mut self) -> Result<(), DemoError> {
        for node in &mut self.nodes {
            let Some(child) = node.process.as_mut() else { continue };
            let exited = child
                .try_wait()
                .map_err(|source| DemoError::Io { doing: format!("checking on node {}", node.id), source })?;
            if let Some(status) = exited {
                node.process = None;
                return Err(DemoError::NodeExited { id: node.id, status, log: node.log.clone() });
            }
        }
        Ok(())
    }

    /// SIGKILLs and reaps every running node. Errors are ignored: `kill` fails only for a
    /// process that has already exited, and `wait` then reaps it.
    fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `--tls`: the certificates `keel certs` made in `<dir>/certs` (a CA, one per node, `root`'s),
/// and the demo's client settings.
struct DemoTls {
    dir: PathBuf,
    client: Arc<ClientTls>,
}

impl DemoTls {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// etcd's flags, as keeld takes them: TLS on both ports, client certificates required on
    /// both, the node's own certificate for both and for dialing its peers.
    fn keeld_flags(&self, id: u64) -> Vec<String> {
        let (cert, key, ca) =
            (self.file(&format!("n{id}.pem")), self.file(&format!("n{id}-key.pem")), self.file("ca.pem"));
        let mut flags = Vec::new();
        for (flag, value) in [
            ("--cert-file", &cert),
            ("--key-file", &key),
            ("--trusted-ca-file", &ca),
            ("--peer-cert-file", &cert),
            ("--peer-key-file", &key),
            ("--peer-trusted-ca-file", &ca),
        ] {
            flags.push(flag.to_owned());
            flags.push(value.clone());
        }
        flags.push("--client-cert-auth".to_owned());
        flags.push("--peer-client-cert-auth".to_owned());
        flags
    }
}

/// The commands that reach the cluster while it runs (`--hold` keeps it running).
fn commands(endpoints: &str, tls: Option<&DemoTls>) -> Vec<String> {
    let flags = tls.map_or(String::new(), |t| {
        format!(
            " --cacert {} --cert {} --key {}",
            t.file("ca.pem"),
            t.file("root.pem"),
            t.file("root-key.pem")
        )
    });
    vec![
        format!("try: keel --endpoints {endpoints}{flags} get --prefix {PREFIX}"),
        format!("     ETCDCTL_API=3 etcdctl --endpoints {endpoints}{flags} get --prefix {PREFIX}"),
    ]
}

/// Makes the certificates of `--tls` in `<dir>/certs` with `keel certs`: a CA, one for each
/// node (127.0.0.1 and localhost), and `root`'s client certificate; reads the client's settings.
fn make_certs(dir: &Path) -> Result<DemoTls, DemoError> {
    let certs_dir = dir.join("certs");
    let common = || certs::Common::in_dir(certs_dir.clone());
    let failed = |e: certs::CertsError| DemoError::Certs(e.to_string());
    certs::run(certs::CertsCommand::Init { common: common() }).map_err(failed)?;
    for id in 1..=NODES {
        let hosts = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        certs::run(certs::CertsCommand::Node { name: format!("n{id}"), hosts, common: common() })
            .map_err(failed)?;
    }
    certs::run(certs::CertsCommand::Client { name: "root".to_owned(), common: common() }).map_err(failed)?;
    let files = TlsFiles {
        cacert: Some(certs_dir.join("ca.pem")),
        cert: Some(certs_dir.join("root.pem")),
        key: Some(certs_dir.join("root-key.pem")),
    };
    let client = ClientTls::load(&files)
        .map_err(|e| DemoError::Certs(e.to_string()))?
        .ok_or_else(|| DemoError::Certs("no client settings".to_owned()))?;
    Ok(DemoTls { dir: certs_dir, client })
}

/// Wraps an I/O error with what was being done.
fn io_error(doing: String) -> impl FnOnce(io::Error) -> DemoError {
    move |source| DemoError::Io { doing, source }
}

/// `--keeld`, else `keeld` beside the running `keel` (cargo builds both into `target/<profile>`),
/// else the first `keeld` on PATH.
fn find_keeld(given: Option<&Path>) -> Result<PathBuf, DemoError> {
    if let Some(path) = given {
        if is_executable(path) {
            return Ok(path.to_path_buf());
        }
        return Err(DemoError::KeeldNotFound { given: Some(path.to_path_buf()), beside_keel: None });
    }
    let beside_keel = std::env::current_exe().ok().map(|exe| exe.with_file_name(KEELD));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(KEELD)).collect())
        .unwrap_or_default();
    beside_keel
        .iter()
        .cloned()
        .chain(on_path)
        .find(|path| is_executable(path))
        .ok_or(DemoError::KeeldNotFound { given: None, beside_keel })
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// A new directory `keel-demo-<pid>-<n>` under the system's temporary directory, the first `n`
/// not taken (a pid is reused; a kept directory stays).
fn make_dir() -> Result<PathBuf, DemoError> {
    let base = std::env::temp_dir();
    let pid = std::process::id();
    let mut n = 0;
    loop {
        let dir = base.join(format!("keel-demo-{pid}-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(source) => {
                return Err(DemoError::Io { doing: format!("creating {}", dir.display()), source })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// The demo's report on stdout: a line per step, `[n/6] what … result`, and indented details.
/// Write errors are ignored: a closed stdout must not stop the demo before it stops its nodes.
#[derive(Default)]
struct Out {
    /// A step line has been begun and not ended.
    open: bool,
}

impl Out {
    /// Begins a step line ("[2/6] writing 100 keys … "), shown at once, ended by [`Out::end`].
    fn begin(&mut self, text: impl fmt::Display) {
        self.finish_line();
        let mut stdout = io::stdout().lock();
        let _ = write!(stdout, "{text} … ");
        let _ = stdout.flush();
        self.open = true;
    }

    fn end(&mut self, text: impl fmt::Display) {
        let _ = writeln!(io::stdout().lock(), "{text}");
        self.open = false;
    }

    /// Ends a step line left open by a failure with `why`.
    fn abandon(&mut self, why: &str) {
        if self.open {
            self.end(why);
        }
    }

    fn line(&mut self, text: impl fmt::Display) {
        self.finish_line();
        let _ = writeln!(io::stdout().lock(), "{text}");
    }

    fn detail(&mut self, text: impl fmt::Display) {
        self.line(format_args!("      {text}"));
    }

    fn finish_line(&mut self) {
        if self.open {
            let _ = writeln!(io::stdout().lock());
            self.open = false;
        }
    }
}

fn step(n: u32, text: impl fmt::Display) -> String {
    format!("[{n}/{STEPS}] {text}")
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, leader: Option<u64>) -> NodeStatus {
        NodeStatus { state: Some(state.to_owned()), leader, applied_index: Some(7) }
    }

    #[test]
    fn a_leader_counts_once_every_node_names_it_and_it_says_so() {
        let agreed = [
            (1, status("follower", Some(2))),
            (2, status("leader", Some(2))),
            (3, status("follower", Some(2))),
        ];
        assert_eq!(agreed_leader(&agreed), Some(2));
        // Node 3 still names the old leader.
        let split = [
            (1, status("follower", Some(2))),
            (2, status("leader", Some(2))),
            (3, status("follower", Some(1))),
        ];
        assert_eq!(agreed_leader(&split), None);
        // Both survivors name node 1, killed: it is not among them to say so.
        let stale = [(2, status("follower", Some(1))), (3, status("follower", Some(1)))];
        assert_eq!(agreed_leader(&stale), None);
        // Named, but not (yet, or any more) leader by its own account.
        let unconfirmed = [(2, status("candidate", Some(2))), (3, status("follower", Some(2)))];
        assert_eq!(agreed_leader(&unconfirmed), None);
        assert_eq!(agreed_leader(&[(2, status("follower", None))]), None);
        assert_eq!(agreed_leader(&[]), None);
    }

    #[test]
    fn a_write_is_missing_when_absent_or_changed() {
        let acked: BTreeMap<String, String> = (0..4).map(|n| (key_name(n), value_for(n))).collect();
        let kv = |n: usize, value: &str| Kv {
            key: key_name(n).into_bytes(),
            value: Some(value.as_bytes().to_vec()),
        };
        let read = [kv(0, "value-0"), kv(1, "value-1"), kv(3, "other"), kv(9, "value-9")];
        assert_eq!(missing_writes(&acked, &read), ["demo/0002", "demo/0003"]);
        let all: Vec<Kv> = (0..4).map(|n| kv(n, &value_for(n))).collect();
        assert!(missing_writes(&acked, &all).is_empty());
    }

    #[test]
    fn a_keeld_that_is_not_there_says_how_to_build_it() {
        let err = find_keeld(Some(Path::new("/nonexistent/keeld"))).expect_err("no such file");
        assert_eq!(
            err.to_string(),
            "no executable keeld at /nonexistent/keeld (--keeld); build it with `cargo build -p keel-kv`"
        );
        let err = DemoError::KeeldNotFound { given: None, beside_keel: Some("/t/debug/keeld".into()) };
        assert_eq!(
            err.to_string(),
            "keeld not found next to keel (/t/debug/keeld) nor on PATH; build it with `cargo build -p keel-kv`, \
             or pass --keeld PATH"
        );
    }

    #[test]
    fn a_timeout_names_what_it_waited_for_and_the_logs() {
        let err = DemoError::TimedOut {
            waited_for: "node 2 to apply the log up to index 40".into(),
            after: Duration::from_secs(30),
            last: "follower, leader 3, applied 12".into(),
            logs: vec!["/tmp/d/n2.log".into()],
        };
        assert_eq!(
            err.to_string(),
            "timed out after 30.0 s waiting for node 2 to apply the log up to index 40 \
             (last: follower, leader 3, applied 12); see /tmp/d/n2.log"
        );
        assert_eq!(err.exit_code(), 1);
        assert_eq!(DemoError::Interrupted.exit_code(), 130);
    }
}
