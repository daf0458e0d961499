//! A cluster of real `keeld` processes on loopback, for tests that kill, pause and restart them,
//! and a write load that retries against every endpoint.
//!
//! Every wait polls a condition against a deadline; every node is SIGKILLed when the cluster is
//! dropped, and the logs of all nodes are printed when a test fails.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::io::Read as _;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::ExitStatus;
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use serde_json::Value;

pub const KEELD: &str = env!("CARGO_BIN_EXE_keeld");

/// Runs etcdctl 3.4 (API v3) against `endpoint` (a URL, or `host:port`).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl (apt-get install etcd-client)")
}

/// How long a node may take to start, a cluster to elect, a node to catch up.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// The polling interval of condition waits.
const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it answers `Ok`, or fails the test with its last answer after `deadline`.
#[track_caller]
pub fn wait_until<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > deadline => {
                panic!("{what}: still not so after {deadline:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// One HTTP/1.0 exchange: (status, body). `Err` when nothing answered in `timeout`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, String), String> {
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body))
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(|e| format!("read from {addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    status.map(|s| (s, body)).ok_or_else(|| format!("no HTTP status from {addr}: {answer:?}"))
}

/// `GET path` answered 200 with JSON.
pub fn get_json(addr: &str, path: &str) -> Result<Value, String> {
    match http(addr, "GET", path, b"", Duration::from_secs(5))? {
        (200, body) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
        (code, body) => Err(format!("{addr}{path}: {code} {body}")),
    }
}

/// `POST path` with a JSON body, answered 200.
pub fn post_json(addr: &str, path: &str, body: &Value) -> Result<Value, String> {
    match http(addr, "POST", path, body.to_string().as_bytes(), Duration::from_secs(15))? {
        (200, body) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
        (code, body) => Err(format!("{addr}{path}: {code} {body}")),
    }
}

pub struct Proc {
    pub client: String,
    pub peer: String,
    pub data_dir: PathBuf,
    /// stdout and stderr of every run of this node, appended.
    pub log: PathBuf,
    child: Option<Child>,
}

/// Nodes with ids 1..=n found the cluster; `reserve` more ids have addresses for tests that add
/// nodes. Dropping the cluster SIGKILLs every node.
pub struct Procs {
    pub dir: tempfile::TempDir,
    config: PathBuf,
    pub nodes: BTreeMap<u64, Proc>,
    /// `KEEL_FAULT_INJECTION` for every node spawned from now on (planted bugs, debug builds
    /// only). `None`: the variable is removed, so a node never inherits it from the test's
    /// environment.
    pub fault_injection: Option<String>,
    /// A command that runs keeld (given as its arguments) instead of running it directly, e.g.
    /// `sh -c '...; exec "$0" "$@"'` to set resource limits; empty: keeld itself.
    pub wrapper: Vec<String>,
}

impl Procs {
    /// Starts nodes `1..=n` as a new cluster with `config` (TOML, applied to every node) and
    /// waits until all are ready.
    pub fn start(n: u64, reserve: u64, config: &str) -> Procs {
        let mut procs = Procs::new(n + reserve, config);
        let initial: Vec<String> = (1..=n).map(|id| format!("{id}={}", procs.node(id).peer)).collect();
        let initial = initial.join(",");
        for id in 1..=n {
            procs.spawn(id, &["--id", &id.to_string(), "--initial-cluster", &initial]);
        }
        for id in 1..=n {
            procs.wait_ready(id);
        }
        procs
    }

    /// Addresses and data dirs for nodes `1..=total`, none started.
    pub fn new(total: u64, config: &str) -> Procs {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("keeld.toml");
        std::fs::write(&config_path, config).expect("write the config");
        let ports = keel_testkit::free_ports(2 * total as usize);
        let nodes = (1..=total)
            .zip(ports.chunks(2))
            .map(|(id, p)| {
                let node = Proc {
                    client: format!("127.0.0.1:{}", p[0]),
                    peer: format!("127.0.0.1:{}", p[1]),
                    data_dir: dir.path().join(format!("n{id}")),
                    log: dir.path().join(format!("n{id}.log")),
                    child: None,
                };
                (id, node)
            })
            .collect();
        Procs { dir, config: config_path, nodes, fault_injection: None, wrapper: Vec::new() }
    }

    pub fn node(&self, id: u64) -> &Proc {
        self.nodes.get(&id).unwrap_or_else(|| panic!("node {id} has no addresses"))
    }

    pub fn client(&self, id: u64) -> String {
        self.node(id).client.clone()
    }

    pub fn clients(&self, ids: impl IntoIterator<Item = u64>) -> Vec<String> {
        ids.into_iter().map(|id| self.client(id)).collect()
    }

    /// The process id of running node `id`.
    pub fn pid(&self, id: u64) -> u32 {
        self.node(id).child.as_ref().unwrap_or_else(|| panic!("node {id} is not running")).id()
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).child.is_some()
    }

    /// Starts node `id` on its addresses and data dir with `extra` flags (a restart passes none:
    /// the data dir knows the node's id and cluster).
    pub fn spawn(&mut self, id: u64, extra: &[&str]) {
        let config = self.config.clone();
        let node = self.nodes.get_mut(&id).unwrap_or_else(|| panic!("node {id} has no addresses"));
        assert!(node.child.is_none(), "node {id} is already running");
        let out = OpenOptions::new().create(true).append(true).open(&node.log).expect("open the node's log");
        let err = out.try_clone().expect("clone the log handle");
        let mut keeld = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(KEELD);
                c
            }
            None => Command::new(KEELD),
        };
        match &self.fault_injection {
            Some(faults) => keeld.env("KEEL_FAULT_INJECTION", faults),
            None => keeld.env_remove("KEEL_FAULT_INJECTION"),
        };
        let child = keeld
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--client-addr", &node.client, "--peer-addr", &node.peer])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start keeld");
        node.child = Some(child);
    }

    /// Starts a stopped node again on its data dir.
    pub fn restart(&mut self, id: u64) {
        self.spawn(id, &[]);
    }

    /// SIGKILLs every node, starts them all again and waits until each is ready.
    pub fn kill_and_restart_all(&mut self) {
        self.kill_all();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for &id in &ids {
            self.restart(id);
        }
        for &id in &ids {
            self.wait_ready(id);
        }
    }

    /// Waits for `GET /ready` to answer 200; fails at once if the process exited.
    #[track_caller]
    pub fn wait_ready(&mut self, id: u64) {
        let client = self.client(id);
        wait_until(&format!("keeld {id} ready"), DEADLINE, || {
            if let Some(status) = self.exited(id) {
                panic!("keeld {id} exited before it was ready: {status}");
            }
            match http(&client, "GET", "/ready", b"", Duration::from_secs(2))? {
                (200, _) => Ok(()),
                (code, body) => Err(format!("{code} {body}")),
            }
        });
    }

    /// The exit status of node `id` if it has exited (and then it counts as stopped).
    pub fn exited(&mut self, id: u64) -> Option<ExitStatus> {
        let node = self.nodes.get_mut(&id)?;
        let status = node.child.as_mut()?.try_wait().ok()??;
        node.child = None;
        Some(status)
    }

    /// SIGKILLs node `id` and reaps it, so its ports refuse connections from here on.
    pub fn kill(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(mut child) = node.child.take() {
                // Errors only mean it already exited; also called from `drop`, so never panics.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// SIGKILLs every running node at once (one `kill` call), then reaps them.
    pub fn kill_all(&mut self) {
        let pids: Vec<String> =
            self.nodes.values().filter_map(|n| n.child.as_ref()).map(|c| c.id().to_string()).collect();
        if !pids.is_empty() {
            let status = Command::new("kill").arg("-KILL").args(&pids).status().expect("run kill");
            assert!(status.success(), "kill -KILL {pids:?}: {status}");
        }
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.kill(id);
        }
    }

    /// SIGTERMs node `id` and waits for it to exit; its status.
    #[track_caller]
    pub fn terminate(&mut self, id: u64) -> ExitStatus {
        let pid =
            self.node(id).child.as_ref().map(|c| c.id()).unwrap_or_else(|| panic!("node {id} not running"));
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
        wait_until(&format!("keeld {id} to exit after SIGTERM"), DEADLINE, || {
            self.exited(id).ok_or_else(String::new)
        })
    }

    /// `GET /v1/cluster/status` of node `id`.
    pub fn status(&self, id: u64) -> Result<Value, String> {
        get_json(&self.node(id).client, "/v1/cluster/status")
    }

    /// Waits until a running node among `ids` is leader by its own status, and every running
    /// node among `ids` names it; its id.
    #[track_caller]
    pub fn wait_leader(&mut self, ids: &[u64], deadline: Duration) -> u64 {
        wait_until("one leader that every running node names", deadline, || {
            let mut named = Vec::new();
            for &id in ids {
                if !self.is_running(id) {
                    continue;
                }
                let st = self.status(id)?;
                named.push(st["leader"].as_u64().ok_or_else(|| format!("node {id} knows no leader: {st}"))?);
            }
            let leader = *named.first().ok_or("no running node")?;
            if named.iter().any(|l| *l != leader) {
                return Err(format!("nodes name different leaders: {named:?}"));
            }
            let st = self.status(leader)?;
            if st["state"] == "leader" {
                Ok(leader)
            } else {
                Err(format!("node {leader} is named but says {st}"))
            }
        })
    }

    /// Waits until node `id` has applied everything the leader had committed when this was
    /// called.
    #[track_caller]
    pub fn wait_caught_up(&mut self, id: u64, leader: u64) {
        let target = self.status(leader).ok().and_then(|st| st["committed_index"].as_u64()).unwrap_or(0);
        wait_until(&format!("node {id} applies up to {target}"), DEADLINE, || {
            if let Some(status) = self.exited(id) {
                panic!("keeld {id} exited: {status}");
            }
            let st = self.status(id)?;
            match st["applied_index"].as_u64() {
                Some(applied) if applied >= target => Ok(()),
                _ => Err(st.to_string()),
            }
        });
    }

    /// Every key under `prefix` and its value, as node `id` serves them (`serializable` reads its
    /// own state).
    pub fn read_prefix(
        &self,
        id: u64,
        prefix: &str,
        serializable: bool,
    ) -> Result<BTreeMap<String, String>, String> {
        let consistency = if serializable { "&consistency=serializable" } else { "" };
        let v = get_json(&self.client(id), &format!("/v1/kv?prefix={prefix}{consistency}"))?;
        let kvs = v["kvs"].as_array().ok_or_else(|| format!("no kvs: {v}"))?;
        kvs.iter()
            .map(|kv| match (kv["key"].as_str(), kv["value"].as_str()) {
                (Some(k), Some(v)) => Ok((k.to_owned(), v.to_owned())),
                _ => Err(format!("not a UTF-8 key and value: {kv}")),
            })
            .collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.kill(id);
        }
        if std::thread::panicking() {
            for (id, node) in &self.nodes {
                if let Ok(mut f) = File::open(&node.log) {
                    let mut log = String::new();
                    let _ = f.read_to_string(&mut log);
                    eprintln!("----- keeld {id} ({}) -----\n{log}", node.log.display());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Write load
// ---------------------------------------------------------------------------------------------

/// How long one write may keep failing, across all endpoints, before the client gives up on it.
pub const WRITE_GIVE_UP: Duration = Duration::from_secs(30);

/// Writers that put unique keys through the HTTP API, each retrying a failed write against the
/// next endpoint until it is acknowledged. A put of the same key and value is idempotent, so a
/// write whose outcome was unknown is retried like any other.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    writers: Vec<JoinHandle<LoadReport>>,
}

/// What writers did: each writer's own, and all of them merged by [`Load::stop`].
#[derive(Default)]
pub struct LoadReport {
    /// key → value of every acknowledged write.
    pub acked: BTreeMap<String, String>,
    /// Writes that failed on every retry for `WRITE_GIVE_UP`: what the last attempt answered.
    pub gave_up: Vec<String>,
    /// Writes answered with an error that is not retryable.
    pub refused: Vec<String>,
    /// Failed attempts that a retry then covered.
    pub retried: u64,
    /// The longest time one write took to be acknowledged, retries included.
    pub longest: Duration,
}

impl Load {
    /// `writers` threads writing `{prefix}{writer}/{seq}` through `endpoints`, writer `w` starting
    /// at endpoint `w % len`.
    pub fn start(endpoints: Vec<String>, writers: usize, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let writers = (0..writers)
            .map(|w| {
                let (stop, acked, endpoints) = (stop.clone(), acked.clone(), endpoints.clone());
                let prefix = prefix.to_owned();
                std::thread::spawn(move || write_loop(w, &prefix, &endpoints, &stop, &acked))
            })
            .collect();
        Load { stop, acked, writers }
    }

    /// Writes acknowledged so far, by all writers.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `n` more writes than now are acknowledged.
    #[track_caller]
    pub fn wait_more(&self, n: u64, deadline: Duration) {
        let target = self.acked() + n;
        wait_until(&format!("{n} more acknowledged writes"), deadline, || {
            let now = self.acked();
            if now >= target {
                Ok(())
            } else {
                Err(format!("{now} of {target}"))
            }
        });
    }

    /// Stops the writers and merges their reports. A write still being retried is abandoned after
    /// its current attempt.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for w in self.writers {
            let r = w.join().expect("a writer panicked");
            report.acked.extend(r.acked);
            report.gave_up.extend(r.gave_up);
            report.refused.extend(r.refused);
            report.retried += r.retried;
            report.longest = report.longest.max(r.longest);
        }
        report
    }
}

fn write_loop(
    w: usize,
    prefix: &str,
    endpoints: &[String],
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> LoadReport {
    let mut report = LoadReport::default();
    let mut at = w % endpoints.len();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}{w}/{seq:08}");
        let value = format!("v{w}-{seq}");
        let started = Instant::now();
        loop {
            let path = format!("/v1/kv/{key}");
            let answer = http(&endpoints[at], "PUT", &path, value.as_bytes(), Duration::from_secs(10));
            match answer {
                Ok((200, _)) => {
                    report.acked.insert(key, value);
                    report.longest = report.longest.max(started.elapsed());
                    acked.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                failed => {
                    let failed_code = failed.as_ref().ok().map(|(code, _)| *code);
                    let what = match failed {
                        Ok((code, body)) => format!("{} answered {code} {body}", endpoints[at]),
                        Err(e) => e,
                    };
                    if !retryable(&failed_code) {
                        report.refused.push(format!("{key}: {what}"));
                        break;
                    }
                    if started.elapsed() > WRITE_GIVE_UP {
                        report.gave_up.push(format!("{key}: {what}"));
                        break;
                    }
                    if stop.load(Ordering::Relaxed) {
                        break; // abandoned: neither acknowledged nor failed
                    }
                    report.retried += 1;
                    at = (at + 1) % endpoints.len();
                    // Every endpoint refused in a row: back off a little before the next round.
                    if at == w % endpoints.len() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        seq += 1;
    }
    report
}

/// Whether a failed put may be retried: nothing answered (connection refused or cut, timeout), or
/// a 503 (`no_leader`, `unavailable`, `outcome_unknown`; the last is safe to retry because the
/// same put twice leaves the same state). Anything else is a request the client could not retry.
fn retryable(code: &Option<u16>) -> bool {
    matches!(code, None | Some(503))
}

/// Asserts that every acknowledged write is what node `id` serves (a linearizable read unless
/// `serializable`).
#[track_caller]
pub fn assert_all_present(
    procs: &Procs,
    id: u64,
    prefix: &str,
    acked: &BTreeMap<String, String>,
    serializable: bool,
) {
    let served = wait_until(&format!("a read of {prefix} from node {id}"), DEADLINE, || {
        procs.read_prefix(id, prefix, serializable)
    });
    let missing: Vec<&String> =
        acked.iter().filter(|(k, v)| served.get(*k) != Some(v)).map(|(k, _)| k).collect();
    assert!(
        missing.is_empty(),
        "node {id} lost {} of {} acknowledged writes, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

impl LoadReport {
    /// Asserts that no write failed for good: every one was acknowledged or abandoned at stop.
    #[track_caller]
    pub fn assert_no_failures(&self) {
        assert!(self.refused.is_empty(), "writes refused with a non-retryable error: {:?}", self.refused);
        assert!(
            self.gave_up.is_empty(),
            "writes that failed for {WRITE_GIVE_UP:?} of retries: {:?}",
            self.gave_up
        );
    }
}

/// A byte count from `/proc/PID/status` (`field`: `VmRSS` now, `VmHWM` at the peak).
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kb * 1024
}

// ---------------------------------------------------------------------------------------------
// etcd itself, as the reference a test's expectations are checked against
// ---------------------------------------------------------------------------------------------

/// One etcd process (Debian's `etcd-server`, 3.4), a single-member cluster on loopback, for
/// tests that run the same commands against etcd and keeld. Dropping it SIGKILLs it (and prints
/// its log when a test fails).
pub struct Etcd {
    /// The client address, `127.0.0.1:PORT`.
    pub client: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd with `extra` flags and waits until its `/health` answers 200 (it has a
    /// leader). Fails the test if `etcd` is not on PATH.
    pub fn start(extra: &[&str]) -> Etcd {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let etcd = std::env::split_paths(&path).map(|dir| dir.join("etcd")).find(|p| p.is_file()).expect(
            "etcd is not on PATH: this test checks its expectations against etcd 3.4 first; install \
             it with `apt-get install etcd-server`",
        );
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::tempdir().expect("temp dir");
            let ports = keel_testkit::free_ports(2);
            let (client, peer) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
            let log = dir.path().join("etcd.log");
            let child = Command::new(&etcd)
                .args(["--name", "e1"])
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &format!("http://{client}")])
                .args(["--advertise-client-urls", &format!("http://{client}")])
                .args(["--listen-peer-urls", &format!("http://{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                .args(["--initial-cluster", &format!("e1=http://{peer}")])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("create etcd's log"))
                .spawn()
                .expect("start etcd");
            let mut e = Etcd { client, child, log, _dir: dir };
            let started = wait_until(&format!("etcd ready at {}", e.client), DEADLINE, || {
                if let Some(status) = e.child.try_wait().map_err(|x| x.to_string())? {
                    let log = std::fs::read_to_string(&e.log).unwrap_or_default();
                    if log.contains("address already in use") {
                        return Ok(false);
                    }
                    panic!("etcd exited before it was ready: {status}\n{log}");
                }
                match http(&e.client, "GET", "/health", b"", Duration::from_secs(2))? {
                    (200, _) => Ok(true),
                    (code, body) => Err(format!("{code} {body}")),
                }
            });
            if started {
                return e;
            }
            eprintln!(
                "attempt {attempt}: a port picked for etcd was taken; starting it again on other ports"
            );
        }
        panic!("no etcd after {ATTEMPTS} attempts: a port was taken each time");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(unreadable: {e})"));
            eprintln!("----- etcd (client {}) log -----\n{log}", self.client);
        }
    }
}
