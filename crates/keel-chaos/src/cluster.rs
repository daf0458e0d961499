//! The system under test: real `keeld` (or etcd) processes, one per network namespace, and what
//! the nemesis does to them (SIGKILL, SIGSTOP/SIGCONT, restart, replace a member).

use std::fs::OpenOptions;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use keel_kv::etcd::pb::etcdserverpb as rpc;
use rpc::cluster_client::ClusterClient;
use rpc::maintenance_client::MaintenanceClient;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::net::Net;
use crate::net::NetError;

/// How long a status probe, and a member change, may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Which system the run drives.
#[derive(Debug, Clone)]
pub enum System {
    /// keeld; `faults` is passed as `KEEL_FAULT_INJECTION` (planted bugs, debug builds only).
    Keel { keeld: PathBuf, faults: Option<String> },
    /// etcd (Debian's `etcd-server`), to validate the harness against a known-good peer.
    Etcd { etcd: PathBuf },
}

impl System {
    pub fn name(&self) -> &'static str {
        match self {
            System::Keel { .. } => "keel",
            System::Etcd { .. } => "etcd",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Timeout(String),
    #[error("member change: {0}")]
    Admin(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// One node slot: a namespace and the process running in it (if any).
#[derive(Debug)]
struct Slot {
    /// The member id the system knows this node by (keeld's `--id`; etcd's member id once seen).
    id: u64,
    /// Bumped when the slot is replaced by a new member: it names the data dir.
    generation: u32,
    child: Option<Child>,
    paused: bool,
}

/// The running cluster. Dropping it SIGKILLs every process.
pub struct Cluster {
    pub system: System,
    pub net: Net,
    dir: PathBuf,
    slots: Vec<Slot>,
    next_keel_id: u64,
}

/// A member's view of the cluster, from `Maintenance.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeStatus {
    pub member_id: u64,
    pub leader: u64,
    pub term: u64,
    pub applied: u64,
    pub revision: i64,
}

/// Connects lazily: nothing is sent until the first request, so a dead node costs no time here.
pub fn channel(addr: &str, timeout: Duration) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("http://IP:PORT is a valid URI")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_lazy()
}

impl Cluster {
    /// Starts one node per namespace and waits for a leader.
    pub async fn start(system: System, net: Net, dir: &Path) -> Result<Cluster, ClusterError> {
        let n = net.nodes();
        let slots = (1..=n as u64).map(|id| Slot { id, generation: 0, child: None, paused: false }).collect();
        let mut cluster = Cluster { system, net, dir: dir.to_path_buf(), slots, next_keel_id: n as u64 + 1 };
        for i in 1..=n {
            cluster.spawn(i, None)?;
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        if let System::Etcd { .. } = cluster.system {
            // etcd assigns member ids; learn them so that member changes can name them.
            for i in 1..=n {
                let st = cluster.status(i).await.ok_or_else(|| {
                    ClusterError::Timeout(format!("etcd node {i} did not answer its status"))
                })?;
                cluster.slots[i - 1].id = st.member_id;
            }
        }
        Ok(cluster)
    }

    pub fn nodes(&self) -> usize {
        self.slots.len()
    }

    /// Node `i`'s client address.
    pub fn client_addr(&self, i: usize) -> String {
        format!("{}:2379", self.net.ip(i))
    }

    fn peer_addr(&self, i: usize) -> String {
        format!("{}:{}", self.net.ip(i), crate::proxy::PEER_PORT)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}.{}", self.slots[i - 1].generation))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}.log"))
    }

    /// Starts the process of slot `i`. `join`: a member's client address to join through (a
    /// replacement member), else the node (re)starts as a founding member.
    fn spawn(&mut self, i: usize, join: Option<String>) -> Result<(), ClusterError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(io_err(format!("open {}", self.log_path(i).display())))?;
        let log2 = log.try_clone().map_err(io_err("clone log handle"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.net.ns(i)]);
        let data = self.data_dir(i);
        let n = self.nodes();
        match &self.system {
            System::Keel { keeld, faults } => {
                let initial: Vec<String> = (1..=n).map(|j| format!("{j}={}", self.peer_addr(j))).collect();
                cmd.arg(keeld)
                    .args(["--id", &self.slots[i - 1].id.to_string()])
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--client-addr", &self.client_addr(i), "--peer-addr", &self.peer_addr(i)]);
                match join {
                    Some(addr) => cmd.args(["--join", &addr]),
                    None => cmd.args(["--initial-cluster", &initial.join(",")]),
                };
                // Progress notifications every 10 minutes by default, as etcd: the watchers would
                // never see one in a run.
                cmd.args(["--watch-progress-notify-interval-ms", "1000"]);
                cmd.env("RUST_LOG", "info");
                match faults {
                    Some(f) => cmd.env("KEEL_FAULT_INJECTION", f),
                    None => cmd.env_remove("KEEL_FAULT_INJECTION"),
                };
            }
            System::Etcd { etcd } => {
                let initial: Vec<String> =
                    (1..=n).map(|j| format!("n{j}=http://{}", self.peer_addr(j))).collect();
                cmd.arg(etcd)
                    .args(["--name", &format!("n{i}")])
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--listen-client-urls", &format!("http://{}", self.client_addr(i))])
                    .args(["--advertise-client-urls", &format!("http://{}", self.client_addr(i))])
                    .args(["--listen-peer-urls", &format!("http://{}", self.peer_addr(i))])
                    .args(["--initial-advertise-peer-urls", &format!("http://{}", self.peer_addr(i))])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-token", "keel-chaos", "--initial-cluster-state", "new"])
                    // Progress notifications every 10 minutes by default: the watchers would never
                    // see one in a run.
                    .args(["--experimental-watch-progress-notify-interval", "1s"]);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(io_err(format!("start node {i} in {}", self.net.ns(i))))?;
        let slot = &mut self.slots[i - 1];
        slot.child = Some(child);
        slot.paused = false;
        Ok(())
    }

    /// Whether slot `i`'s process runs (possibly paused).
    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.slots[i - 1].child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.slots[i - 1].paused
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.slots[i - 1].child {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
        }
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        if self.slots[i - 1].paused {
            self.signal(i, "-CONT");
        }
        if let Some(mut c) = self.slots[i - 1].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.slots[i - 1].paused = false;
    }

    /// SIGSTOPs node `i`.
    pub fn pause(&mut self, i: usize) {
        if self.slots[i - 1].child.is_some() && !self.slots[i - 1].paused {
            self.signal(i, "-STOP");
            self.slots[i - 1].paused = true;
        }
    }

    /// SIGCONTs node `i`.
    pub fn resume(&mut self, i: usize) {
        if self.slots[i - 1].paused {
            self.signal(i, "-CONT");
            self.slots[i - 1].paused = false;
        }
    }

    /// Restarts node `i` on its data dir if it is not running; resumes it if paused. A member that
    /// joined (not a founder) restarts with `--join` again: ignored once its data dir holds the
    /// cluster, and it finishes joining if it was killed before that.
    pub fn revive(&mut self, i: usize) -> Result<(), ClusterError> {
        self.resume(i);
        if !self.is_running(i) {
            self.slots[i - 1].child = None;
            let join = (self.slots[i - 1].generation > 0).then(|| self.client_addr(1 + i % self.nodes()));
            self.spawn(i, join)?;
        }
        Ok(())
    }

    /// `Maintenance.Status` of node `i`, or `None` if it does not answer in time.
    pub async fn status(&self, i: usize) -> Option<NodeStatus> {
        let mut client = MaintenanceClient::new(channel(&self.client_addr(i), PROBE_TIMEOUT));
        let fut = client.status(rpc::StatusRequest {});
        let resp = tokio::time::timeout(PROBE_TIMEOUT, fut).await.ok()?.ok()?.into_inner();
        let header = resp.header.unwrap_or_default();
        Some(NodeStatus {
            member_id: header.member_id,
            leader: resp.leader,
            term: resp.raft_term,
            applied: resp.raft_applied_index,
            revision: header.revision,
        })
    }

    /// The slot whose member a majority of all nodes names as leader (by member id, which each
    /// node reports of itself in its status header).
    pub async fn leader(&self) -> Option<usize> {
        let mut votes: Vec<(u64, usize)> = Vec::new();
        let mut ids: Vec<(u64, usize)> = Vec::new();
        for i in 1..=self.nodes() {
            if self.slots[i - 1].paused {
                continue;
            }
            if let Some(st) = self.status(i).await {
                ids.push((st.member_id, i));
                if st.leader != 0 {
                    match votes.iter_mut().find(|(l, _)| *l == st.leader) {
                        Some((_, n)) => *n += 1,
                        None => votes.push((st.leader, 1)),
                    }
                }
            }
        }
        let (leader, n) = votes.into_iter().max_by_key(|(_, n)| *n)?;
        if n * 2 <= self.nodes() {
            return None;
        }
        ids.into_iter().find(|(id, _)| *id == leader).map(|(_, i)| i)
    }

    pub async fn wait_for_leader(&self, within: Duration) -> Result<usize, ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "no leader within {within:?} (logs in {})",
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every node answers, all name the same leader, and all have applied the same
    /// index at the same revision, twice in a row.
    pub async fn wait_converged(&self, within: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + within;
        let mut last: Option<Vec<NodeStatus>> = None;
        loop {
            let mut all = Vec::new();
            for i in 1..=self.nodes() {
                match self.status(i).await {
                    Some(st) => all.push(st),
                    None => break,
                }
            }
            let agreed = all.len() == self.nodes()
                && all.iter().all(|s| {
                    s.leader != 0
                        && s.leader == all[0].leader
                        && s.applied == all[0].applied
                        && s.revision == all[0].revision
                });
            if agreed && last.as_ref() == Some(&all) {
                return Ok(());
            }
            last = agreed.then_some(all.clone());
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout(format!(
                    "nodes did not converge within {within:?}: {all:?} (logs in {})",
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Replaces node `i` by a new member: removes its member (through the leader), stops its
    /// process, and starts a fresh one (new id, empty data dir) that joins through the leader.
    /// Keel only: the etcd runs use the other nemeses.
    pub async fn replace(&mut self, i: usize) -> Result<String, ClusterError> {
        if !matches!(self.system, System::Keel { .. }) {
            return Err(ClusterError::Admin("member replacement is implemented for keel only".into()));
        }
        let leader = self.wait_for_leader(Duration::from_secs(10)).await?;
        let old = self.slots[i - 1].id;
        let mut admin = ClusterClient::new(channel(&self.client_addr(leader), ADMIN_TIMEOUT));
        admin
            .member_remove(rpc::MemberRemoveRequest { id: old })
            .await
            .map_err(|s| ClusterError::Admin(format!("remove member {old}: {}", s.message())))?;
        // A removed keeld stops by itself; make sure, then start the new member in the slot.
        self.kill(i);
        let new = self.next_keel_id;
        self.next_keel_id += 1;
        let slot = &mut self.slots[i - 1];
        slot.id = new;
        slot.generation += 1;
        let via = self.client_addr(if leader == i { 1 + i % self.nodes() } else { leader });
        self.spawn(i, Some(via))?;
        Ok(format!("member {old} removed, member {new} joined in slot {i}"))
    }

    /// Appends a marker line (a nemesis event) to node `i`'s log, best effort.
    pub fn mark(&self, i: usize, line: &str) {
        use std::io::Write as _;
        if let Ok(mut f) = OpenOptions::new().append(true).open(self.log_path(i)) {
            let _ = writeln!(f, "=== keel-chaos: {line}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.slots.len() {
            self.kill(i);
        }
    }
}
