//! `Node<SM>`: one replica of a user state machine — storage, Raft and the operations users call.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::Fatal;
use openraft::errors::RaftError;
use openraft::network::NetSnapshot;
use openraft::network::RaftNetworkFactory;
use openraft::ChangeMembers;
use redb::ReadTransaction;
use redb::ReadableDatabase;
use redb::WriteTransaction;

use crate::codec;
use crate::config::Config;
use crate::error::AdminError;
use crate::error::NotLeader;
use crate::error::ProposeError;
use crate::error::ReadError;
use crate::error::StartError;
use crate::error::WaitTimeout;
use crate::forward;
use crate::forward::leader_ready;
use crate::forward::ForwardError;
use crate::forward::ForwardFailure;
use crate::forward::ForwardReply;
use crate::forward::ForwardRequest;
use crate::forward::Forwarder;
use crate::forward::Timing;
use crate::network::LocalService;
use crate::network::PeerState;
use crate::network::RaftService;
use crate::state_machine::StateMachine;
use crate::state_machine::StateMachineError;
use crate::storage::sm_store::SmShared;
use crate::storage::snapshot::SnapshotFile;
use crate::storage::LogStore;
use crate::storage::SmStore;
use crate::types::Command;
use crate::types::KeelTypes;
use crate::types::LogIndex;
use crate::types::NodeId;
use crate::types::NodeInfo;
use crate::types::Raft;
use crate::types::RaftMetrics;
use crate::types::Reply;

/// One replica of a user state machine.
pub struct Node<SM: StateMachine> {
    id: NodeId,
    config: Config,
    raft: Raft<SmStore<SM>>,
    shared: Arc<SmShared<SM>>,
    log: LogStore,
    /// Sends requests to the leader when this node is not it.
    forwarder: Arc<dyn Forwarder>,
    timing: Timing,
    /// What the peer service remembers between messages (shared with every `service()`).
    peer: Arc<PeerState>,
    /// Complete when the log and the state machine database are closed.
    closed: (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Receiver<()>),
}

/// Accepts the answer to a forwarded membership change.
fn done(reply: ForwardReply) -> Option<()> {
    matches!(reply, ForwardReply::Done).then_some(())
}

/// The error families of operations that a follower forwards to the leader.
trait Forwardable: From<ForwardFailure> {
    /// The forwarded request may or may not have been carried out.
    fn unknown(e: ForwardError) -> Self;
}

impl Forwardable for ProposeError {
    fn unknown(e: ForwardError) -> Self {
        ProposeError::Unknown(e.to_string())
    }
}

impl Forwardable for ReadError {
    fn unknown(e: ForwardError) -> Self {
        // A read changes nothing: an unanswered read-index request is just a failed read.
        ReadError::QuorumUnavailable(e.to_string())
    }
}

impl Forwardable for AdminError {
    fn unknown(e: ForwardError) -> Self {
        AdminError::Unknown(e.to_string())
    }
}

/// Purges the log up to `keep` entries behind the snapshot on disk, if a previous run did not.
///
/// openraft purges only right after it builds or installs a snapshot; a node stopped between
/// publishing a snapshot and purging behind it would otherwise keep that log until the next
/// snapshot. (openraft clamps the request to the snapshot it loaded, and defers it while a
/// replication stream still reads the range.)
async fn purge_behind_snapshot<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    shared: &SmShared<SM>,
    log: &LogStore,
    keep: u64,
) -> Result<(), StartError> {
    let Some(snapshot) = shared.snapshots.current().and_then(|(meta, _)| meta.last_log_id) else {
        return Ok(());
    };
    let Some(upto) = snapshot.index.checked_sub(keep) else {
        return Ok(());
    };
    let (_, purged, _, _) = log.state();
    if purged.is_some_and(|p| p.index >= upto) {
        return Ok(());
    }
    tracing::info!(upto, snapshot = %snapshot, "purging the log behind the snapshot left by the last run");
    raft.trigger().purge_log(upto).await.map_err(|e| StartError::Raft(e.to_string()))
}

impl<SM: StateMachine> Node<SM> {
    /// Opens (or creates) the node's storage in `config.data_dir` and starts Raft.
    ///
    /// A fresh node is not a member of any cluster until [`initialize`](Self::initialize) is called
    /// on one node, or a leader adds it. A restarted node resumes from its data dir.
    ///
    /// `network` is the transport: it carries Raft messages and, when this node is not the
    /// leader, the requests it forwards to the leader.
    pub async fn start<N>(config: Config, sm: SM, network: N) -> Result<Self, StartError>
    where
        N: RaftNetworkFactory<KeelTypes> + Forwarder + Clone,
        N::Network: NetSnapshot<KeelTypes, SnapshotData = SnapshotFile>,
    {
        config.validate()?;
        let raft_config = Arc::new(config.to_openraft()?);
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|source| StartError::DataDir { path: data_dir.clone(), source })?;

        let (log, log_closed) = LogStore::open_with_close_signal(&data_dir.join("log"), &config.log)?;
        #[cfg(debug_assertions)]
        if config.faults.any() {
            tracing::warn!(
                id = config.id,
                faults = %config.faults,
                "FAULT INJECTION ACTIVE: this node breaks Raft's guarantees on purpose (a fault test's \
                 negative control); never run it with data you care about"
            );
        }
        #[cfg(debug_assertions)]
        if config.faults.ack_before_fsync {
            log.plant_ack_before_fsync(crate::faults::ACK_BEFORE_FSYNC_HOLD).map_err(|source| {
                crate::storage::log_store::LogOpenError { dir: data_dir.join("log"), source }
            })?;
        }
        let (id, sm_config) = (config.id, config.state_machine.clone());
        let mut shared = tokio::task::spawn_blocking(move || SmShared::open(&data_dir, id, &sm_config, sm))
            .await
            .map_err(|e| StartError::Raft(format!("storage open task failed: {e}")))??;
        let (sm_closed_tx, sm_closed) = tokio::sync::oneshot::channel();
        shared.closed = Some(sm_closed_tx);
        let shared = Arc::new(shared);

        let forwarder: Arc<dyn Forwarder> = Arc::new(network.clone());
        let timing = Timing {
            election_timeout: Duration::from_millis(config.raft.election_timeout_max_ms),
            read_policy: config.raft.read_policy,
            max_command_bytes: config.limits.max_command_bytes as usize,
        };
        let raft = openraft::Raft::new(
            config.id,
            raft_config,
            network,
            log.clone(),
            SmStore { shared: shared.clone() },
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        purge_behind_snapshot(&raft, &shared, &log, config.raft.logs_to_keep_after_snapshot).await?;
        let peer = Arc::new(PeerState::new(config.limits.max_snapshot_bytes));
        tracing::info!(id = config.id, data_dir = %config.data_dir.display(), "node started");
        Ok(Self {
            id: config.id,
            config,
            raft,
            shared,
            log,
            forwarder,
            timing,
            peer,
            closed: (log_closed, sm_closed),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The openraft handle, for what this API does not cover (e.g. `raft().wait(..)` in tests).
    pub fn raft(&self) -> &Raft<SmStore<SM>> {
        &self.raft
    }

    /// What this node serves to its peers; register it with the transport.
    pub fn service(&self) -> Arc<dyn RaftService> {
        Arc::new(LocalService {
            raft: self.raft.clone(),
            shared: Arc::downgrade(&self.shared),
            timing: self.timing,
            peer: self.peer.clone(),
            server_metrics: self.raft.server_metrics(),
            data_metrics: self.raft.data_metrics(),
        })
    }

    /// The user's state machine value (configuration and handles; state lives in the database).
    pub fn state_machine(&self) -> &SM {
        &self.shared.sm
    }

    /// Forms a new cluster from `members` (which must include this node). Call once, on one node.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), AdminError> {
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(e) => AdminError::Rejected(e.to_string()),
            RaftError::Fatal(f) => AdminError::Stopped(f.to_string()),
        })
    }

    /// Adds a non-voting member and, with `wait_caught_up`, returns once it has caught up.
    pub async fn add_learner(
        &self,
        id: NodeId,
        info: NodeInfo,
        wait_caught_up: bool,
    ) -> Result<(), AdminError> {
        let req = ForwardRequest::AddLearner { id, node: info.clone(), blocking: wait_caught_up };
        let local = || forward::local_add_learner(&self.raft, self.timing, id, info.clone(), wait_caught_up);
        self.on_leader(local, req, done).await
    }

    /// Makes `voters` the voting members (joint consensus). Non-voters are kept as learners.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), AdminError> {
        self.change_members(ChangeMembers::ReplaceAllVoters(voters), true).await
    }

    /// Applies a membership change (promote learners, remove voters or nodes, update addresses);
    /// with `retain`, voters removed from the voter set stay on as learners.
    pub async fn change_members(
        &self,
        change: ChangeMembers<NodeId, NodeInfo>,
        retain: bool,
    ) -> Result<(), AdminError> {
        let req = ForwardRequest::ChangeMembers { change: change.clone(), retain };
        let local = || forward::local_change_members(&self.raft, self.timing, change.clone(), retain);
        self.on_leader(local, req, done).await
    }

    /// Makes learner `id` a voter, once it holds at least 90% of the leader's log (etcd's rule);
    /// before that the leader answers [`AdminError::Rejected`] and the caller retries later.
    pub async fn promote(&self, id: NodeId) -> Result<(), AdminError> {
        let local = || forward::local_promote(&self.raft, id);
        self.on_leader(local, ForwardRequest::Promote { id }, done).await
    }

    /// Hands leadership to voter `to` and returns once it leads.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), AdminError> {
        let local = || forward::local_transfer_leader(&self.raft, self.timing, &self.peer, to);
        self.on_leader(local, ForwardRequest::TransferLeader { to }, done).await
    }

    /// Replicates `cmd`, applies it once it is committed, and returns the state machine's response.
    ///
    /// Any node accepts proposals: a follower forwards them to the leader (unless
    /// `raft.forward_timeout_ms` is 0, in which case it answers [`ProposeError::NotLeader`]).
    pub async fn propose(&self, cmd: SM::Command) -> Result<SM::Response, ProposeError> {
        self.propose_indexed(cmd).await.map(|(response, _)| response)
    }

    /// Like [`propose`](Self::propose), and also returns the command's log index: a client that
    /// then reads from another node can wait for it there (`wait_applied`) to read its own write.
    ///
    /// The command is checked first ([`StateMachine::validate`], `limits.max_command_bytes`); a
    /// follower's leader checks it again before proposing it.
    pub async fn propose_indexed(&self, cmd: SM::Command) -> Result<(SM::Response, LogIndex), ProposeError> {
        self.shared.sm.validate(&cmd).map_err(|refusal| ProposeError::InvalidCommand(refusal.0))?;
        let bytes = codec::to_bytes(&cmd).map_err(|e| ProposeError::InvalidCommand(e.to_string()))?;
        forward::check_command_size(self.timing.max_command_bytes, bytes.len())?;
        let (reply, index) = self.propose_checked(Command(bytes)).await?;
        let response = match reply {
            Reply::Response(bytes) => codec::from_bytes(&bytes)
                .map_err(|e| ProposeError::Stopped(format!("state machine response does not decode: {e}")))?,
            Reply::Refused(why) => return Err(ProposeError::Refused(why)),
        };
        Ok((response, index))
    }

    /// Proposes an already encoded command (see [`codec`]) and answers the encoded reply. The
    /// bytes must decode as the state machine's command and pass its `validate`, or the command
    /// is refused ([`ProposeError::InvalidCommand`]) before it enters the log.
    pub async fn propose_bytes(&self, cmd: Command) -> Result<(Reply, LogIndex), ProposeError> {
        forward::check_command(&self.shared.sm, self.timing.max_command_bytes, &cmd)?;
        self.propose_checked(cmd).await
    }

    /// Proposes a command that was checked on this node; a leader it is forwarded to checks it
    /// again.
    async fn propose_checked(&self, cmd: Command) -> Result<(Reply, LogIndex), ProposeError> {
        let local = || forward::local_write(&self.raft, self.timing, cmd.clone());
        let written = |reply| match reply {
            ForwardReply::Written { reply, index } => Some((reply, index)),
            _ => None,
        };
        self.on_leader(local, ForwardRequest::Write(cmd.clone()), written).await
    }

    /// A linearizable read: confirms leadership (per `raft.read_policy`), waits until this node has
    /// applied everything committed before the read began, then runs `f` on the state.
    ///
    /// On a follower, the leader confirms its leadership and answers the read index; the follower
    /// waits until it has applied that far and reads its own state.
    pub async fn read<R>(&self, f: impl FnOnce(&SM, &ReadTransaction) -> R) -> Result<R, ReadError> {
        self.linearize().await?;
        self.read_local(f)
    }

    /// Waits until a read on this node would be linearizable (see [`read`](Self::read)).
    pub async fn linearize(&self) -> Result<(), ReadError> {
        let local = || forward::local_read_index(&self.raft, self.timing);
        let read_index = |reply| match reply {
            ForwardReply::ReadIndex(index) => Some(index),
            _ => None,
        };
        let index: LogIndex =
            self.on_leader::<_, ReadError, _>(local, ForwardRequest::ReadIndex, read_index).await?;
        self.wait_applied(index, self.forward_timeout().max(self.timing.election_timeout)).await
    }

    /// Confirms that this node is the leader as of some moment after the call (per
    /// `raft.read_policy`: a heartbeat round to a quorum, or the leader lease), then waits until
    /// it has applied everything committed before then, its own term's first entry included.
    /// Never forwards: a follower answers [`ReadError::NotLeader`]. For state only the leader
    /// keeps (an application's timers): once this returns, no other leader of a later term was
    /// elected before the call, and every entry an earlier leader committed is applied here.
    pub async fn confirm_leader(&self) -> Result<(), ReadError> {
        let index = forward::local_read_index(&self.raft, self.timing).await.map_err(ReadError::from)?;
        self.wait_applied(index, self.forward_timeout().max(self.timing.election_timeout)).await
    }

    fn forward_timeout(&self) -> Duration {
        Duration::from_millis(self.config.raft.forward_timeout_ms)
    }

    /// Runs `local` here; if this node is not the leader, sends `remote` to the leader instead and
    /// decodes its answer with `accept`. Retries while leadership is moving, up to
    /// `raft.forward_timeout_ms`; never retries a request whose outcome is unknown.
    async fn on_leader<T, E, Fut>(
        &self,
        local: impl Fn() -> Fut,
        remote: ForwardRequest,
        accept: impl Fn(ForwardReply) -> Option<T>,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, ForwardFailure>>,
        E: Forwardable,
    {
        let deadline = tokio::time::Instant::now() + self.forward_timeout();
        let mut tried: Option<NodeId> = None;
        loop {
            let not_leader = match local().await {
                Ok(v) => return Ok(v),
                Err(failure) => match failure.not_leader() {
                    Some(nl) if !self.forward_timeout().is_zero() => nl,
                    _ => return Err(E::from(failure)),
                },
            };
            let target = match (not_leader.leader_id, not_leader.leader.clone()) {
                (Some(id), Some(node)) if id != self.id && Some(id) != tried => Some((id, node)),
                _ => None,
            };
            let Some((leader, node)) = target else {
                // No leader known yet, or the one known just failed us: wait for news, then retry.
                if !self.wait_leader_change(tried, deadline).await {
                    return Err(E::from(ForwardFailure::NotLeader {
                        leader_id: not_leader.leader_id,
                        leader: not_leader.leader,
                    }));
                }
                tried = None;
                continue;
            };
            tracing::debug!(id = self.id, leader, "forwarding to the leader");
            match self.forwarder.forward(leader, &node, remote.clone()).await {
                Ok(ForwardReply::Failed(failure)) => match failure.not_leader() {
                    Some(_) => tried = Some(leader),
                    None => return Err(E::from(failure)),
                },
                Ok(reply) => {
                    return accept(reply).ok_or_else(|| {
                        E::from(ForwardFailure::Stopped(format!(
                            "leader {leader} answered the wrong kind of reply"
                        )))
                    })
                }
                Err(e @ ForwardError::Unknown(_)) => return Err(E::unknown(e)),
                Err(ForwardError::NotSent(e)) => {
                    tracing::debug!(id = self.id, leader, "forward not sent: {e}");
                    tried = Some(leader);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let err: E = E::from(ForwardFailure::NotLeader { leader_id: None, leader: None });
                return Err(err);
            }
        }
    }

    /// Waits until this node knows a leader other than `tried` (and, if it is itself the leader,
    /// one a quorum has acknowledged), at most until `deadline`. False on timeout.
    async fn wait_leader_change(&self, tried: Option<NodeId>, deadline: tokio::time::Instant) -> bool {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return false;
        }
        // Poll at least every 100 ms: a leader that stays the same may become reachable again.
        let wait = remaining.min(Duration::from_millis(100));
        let changed = self
            .wait_for(wait, "a new leader", |m| {
                m.current_leader.is_some() && m.current_leader != tried && leader_ready(m)
            })
            .await;
        changed.is_ok() || tokio::time::Instant::now() < deadline
    }

    /// A serializable read of this node's applied state: no round trip, possibly stale.
    pub fn read_local<R>(&self, f: impl FnOnce(&SM, &ReadTransaction) -> R) -> Result<R, ReadError> {
        let txn = self.shared.begin_read().map_err(|e| ReadError::Storage(e.to_string()))?;
        Ok(f(&self.shared.sm, &txn))
    }

    /// Runs `f` on the state machine's write transaction between applied batches, on this node
    /// only: housekeeping that changes nothing a read, an apply or a snapshot could observe, such
    /// as physically removing history already compacted away. Not replicated, not in the log; a
    /// crash may undo it (the owner must be able to redo it). Applies wait while `f` runs: keep
    /// each call short and call again for more. Blocking: call it from a blocking thread.
    pub fn maintain<R>(
        &self,
        f: impl FnOnce(&SM, &WriteTransaction) -> Result<R, StateMachineError>,
    ) -> Result<R, ReadError> {
        self.shared.maintain(f).map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// A copy of the current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Completes with the cause once Raft stops on its own with a fatal error (a log or state
    /// machine I/O failure such as ENOSPC, an apply that fails, a panic in Raft's core); never
    /// completes while Raft runs or after an orderly [`shutdown`](Self::shutdown).
    ///
    /// A node in that state serves nothing useful and frees nothing by waiting: its owner should
    /// stop it and exit, so a supervisor restarts it.
    pub fn fatal(&self) -> impl std::future::Future<Output = Fatal<KeelTypes>> + Send + 'static {
        let metrics = self.raft.metrics();
        // Waits on the server metrics, which change only with the vote, the role or the
        // membership (and end with Raft's core task), not on the full metrics, which change with
        // every append and apply: woken by each, this waiter cost ~10 % of put throughput at
        // one client.
        let mut server = self.raft.server_metrics();
        async move {
            loop {
                let state = metrics.borrow_watched().running_state.clone();
                match state {
                    Err(Fatal::Stopped) => return std::future::pending().await,
                    Err(fatal) => return fatal,
                    Ok(()) => {}
                }
                // The senders are dropped only when Raft's core task ends; without a cause in the
                // metrics, it ended by panicking.
                if server.changed().await.is_err() {
                    let state = metrics.borrow_watched().running_state.clone();
                    return match state {
                        Ok(()) => Fatal::Panicked,
                        Err(Fatal::Stopped) => std::future::pending().await,
                        Err(fatal) => fatal,
                    };
                }
            }
        }
    }

    /// The current leader as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.metrics().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    /// Bytes the Raft log occupies on disk.
    pub fn log_bytes(&self) -> u64 {
        self.log.on_disk_bytes()
    }

    /// Waits until this node has applied `index`, or fails after `timeout`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ReadError> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "wait_applied")
            .await
            .map(|_| ())
            .map_err(|e| ReadError::QuorumUnavailable(e.to_string()))
    }

    /// Waits until `pred` holds for this node's metrics; `what` names the condition in the error.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&RaftMetrics) -> bool + Send,
    ) -> Result<RaftMetrics, WaitTimeout> {
        self.raft.wait(Some(timeout)).metrics(pred, what).await.map_err(|e| WaitTimeout(e.to_string()))
    }

    /// Waits until this node knows a leader other than `not` (e.g. the node just stopped).
    pub async fn wait_for_leader(
        &self,
        timeout: Duration,
        not: Option<NodeId>,
    ) -> Result<NodeId, WaitTimeout> {
        let m = self
            .wait_for(timeout, "a leader is known", |m| {
                // A leader counts once a quorum acknowledged it: before that it refuses writes.
                m.current_leader.is_some_and(|l| Some(l) != not) && leader_ready(m)
            })
            .await?;
        m.current_leader.ok_or_else(|| WaitTimeout("leader vanished".into()))
    }

    /// The current leader's id, if this node is not it.
    pub fn not_leader(&self) -> Option<NotLeader> {
        let m = self.metrics();
        (m.current_leader != Some(self.id)).then(|| NotLeader::from_metrics(&m))
    }

    /// Stops Raft and closes storage. Everything acknowledged is already durable, so this only
    /// stops work in flight: proposals not yet committed fail with `Stopped`.
    ///
    /// Returns once the log and the state machine database are closed, so the same data dir can be
    /// opened again right away. (A transport that still has this node's `service()` registered only
    /// gets `Stopped` answers: it does not hold storage.)
    pub async fn shutdown(self) -> Result<(), String> {
        let res = self.raft.shutdown().await.map_err(|e| e.to_string());
        // openraft's state machine worker and a snapshot build in progress hold storage handles a
        // little past `Raft::shutdown`: wait until the last one is dropped and the files closed.
        let Node { id, raft, shared, log, closed: (log_closed, sm_closed), .. } = self;
        // Fields left in a partially moved struct live to the end of scope: drop ours now.
        drop((raft, shared, log));
        let closed = async {
            // Err(RecvError) is the signal: the sender was dropped with the storage it guards.
            let _ = log_closed.await;
            let _ = sm_closed.await;
        };
        if tokio::time::timeout(Duration::from_secs(30), closed).await.is_err() {
            return Err("storage still open 30 s after raft stopped".into());
        }
        tracing::info!(id, "node stopped");
        res
    }

    /// The number of state machine read transactions one can open (test hook: proves the database
    /// is open and readable).
    pub fn check_readable(&self) -> Result<(), ReadError> {
        self.shared.db.begin_read().map(|_| ()).map_err(|e| ReadError::Storage(e.to_string()))
    }
}
