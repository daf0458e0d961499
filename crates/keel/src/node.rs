//! `Node<SM>`: one replica of a user state machine — storage, Raft and the operations users call.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use openraft::network::NetSnapshot;
use openraft::network::RaftNetworkFactory;
use redb::ReadTransaction;
use redb::ReadableDatabase;

use crate::codec;
use crate::config::Config;
use crate::config::ReadPolicy;
use crate::error::AdminError;
use crate::error::NotLeader;
use crate::error::ProposeError;
use crate::error::ReadError;
use crate::error::StartError;
use crate::error::WaitTimeout;
use crate::network::LocalService;
use crate::network::RaftService;
use crate::state_machine::StateMachine;
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

/// One replica of a user state machine.
pub struct Node<SM: StateMachine> {
    id: NodeId,
    config: Config,
    raft: Raft<SmStore<SM>>,
    shared: Arc<SmShared<SM>>,
    log: LogStore,
    /// Complete when the log and the state machine database are closed.
    closed: (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Receiver<()>),
}

fn write_error(e: RaftError<KeelTypes, ClientWriteError<KeelTypes>>) -> AdminError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => AdminError::NotLeader(f.into()),
        RaftError::APIError(e @ ClientWriteError::LogEntryDiscarded(_)) => AdminError::Retry(e.to_string()),
        RaftError::APIError(e) => AdminError::Rejected(e.to_string()),
        RaftError::Fatal(f) => AdminError::Stopped(f.to_string()),
    }
}

impl<SM: StateMachine> Node<SM> {
    /// Opens (or creates) the node's storage in `config.data_dir` and starts Raft.
    ///
    /// A fresh node is not a member of any cluster until [`initialize`](Self::initialize) is called
    /// on one node, or a leader adds it. A restarted node resumes from its data dir.
    pub async fn start<N>(config: Config, sm: SM, network: N) -> Result<Self, StartError>
    where
        N: RaftNetworkFactory<KeelTypes>,
        N::Network: NetSnapshot<KeelTypes, SnapshotData = SnapshotFile>,
    {
        config.validate()?;
        let raft_config = Arc::new(config.to_openraft()?);
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|source| StartError::DataDir { path: data_dir.clone(), source })?;

        let (log, log_closed) = LogStore::open_with_close_signal(&data_dir.join("log"), &config.log)?;
        let (id, sm_config) = (config.id, config.state_machine.clone());
        let mut shared = tokio::task::spawn_blocking(move || SmShared::open(&data_dir, id, &sm_config, sm))
            .await
            .map_err(|e| StartError::Raft(format!("storage open task failed: {e}")))??;
        let (sm_closed_tx, sm_closed) = tokio::sync::oneshot::channel();
        shared.closed = Some(sm_closed_tx);
        let shared = Arc::new(shared);

        let raft = openraft::Raft::new(
            config.id,
            raft_config,
            network,
            log.clone(),
            SmStore { shared: shared.clone() },
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        tracing::info!(id = config.id, data_dir = %config.data_dir.display(), "node started");
        Ok(Self { id: config.id, config, raft, shared, log, closed: (log_closed, sm_closed) })
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
        Arc::new(LocalService { raft: self.raft.clone(), shared: Arc::downgrade(&self.shared) })
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
        self.raft.add_learner(id, info, wait_caught_up).await.map(|_| ()).map_err(write_error)
    }

    /// Makes `voters` the voting members (joint consensus). Non-voters are kept as learners.
    pub async fn change_membership(&self, voters: BTreeSet<NodeId>) -> Result<(), AdminError> {
        self.raft.change_membership(voters, true).await.map(|_| ()).map_err(write_error)
    }

    /// Replicates `cmd`, applies it once it is committed, and returns the state machine's response.
    /// Only the leader accepts proposals; others answer [`ProposeError::NotLeader`].
    pub async fn propose(&self, cmd: SM::Command) -> Result<SM::Response, ProposeError> {
        self.propose_indexed(cmd).await.map(|(response, _)| response)
    }

    /// Like [`propose`](Self::propose), and also returns the command's log index: a client that
    /// then reads from another node can wait for it there (`wait_applied`) to read its own write.
    pub async fn propose_indexed(&self, cmd: SM::Command) -> Result<(SM::Response, LogIndex), ProposeError> {
        let bytes = codec::to_bytes(&cmd).map_err(|e| ProposeError::InvalidCommand(e.to_string()))?;
        let mut attempt = self.raft.client_write(Command(bytes.clone())).await;
        if let Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) = &attempt {
            // A newly elected leader refuses writes until a quorum has acknowledged it (its lease).
            // That is this node's own transient state, not a reason to send the client elsewhere.
            if f.leader_id.is_none() && self.await_leader_lease().await {
                attempt = self.raft.client_write(Command(bytes)).await;
            }
        }
        let resp = attempt.map_err(|e| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader(f.into()),
            RaftError::APIError(e @ ClientWriteError::LogEntryDiscarded(_)) => {
                ProposeError::Discarded(e.to_string())
            }
            RaftError::APIError(e) => ProposeError::Stopped(format!("unexpected write error: {e}")),
            RaftError::Fatal(f) => ProposeError::Stopped(f.to_string()),
        })?;
        let response = codec::from_bytes(&resp.data.0)
            .map_err(|e| ProposeError::Stopped(format!("state machine response does not decode: {e}")))?;
        Ok((response, resp.log_id.index))
    }

    /// If this node is leader, waits (up to an election timeout) until a quorum has acknowledged
    /// its leadership; true if it is then a leader with a valid lease.
    async fn await_leader_lease(&self) -> bool {
        let timeout = Duration::from_millis(self.config.raft.election_timeout_max_ms);
        let ready =
            |m: &RaftMetrics| m.state != openraft::ServerState::Leader || m.last_quorum_acked.is_some();
        match self.wait_for(timeout, "leader lease", ready).await {
            Ok(m) => m.state == openraft::ServerState::Leader,
            Err(_) => false,
        }
    }

    /// A linearizable read: confirms leadership (per `raft.read_policy`), waits until this node has
    /// applied everything committed before the read began, then runs `f` on the state.
    pub async fn read<R>(&self, f: impl FnOnce(&SM, &ReadTransaction) -> R) -> Result<R, ReadError> {
        let policy = match self.config.raft.read_policy {
            ReadPolicy::ReadIndex => openraft::ReadPolicy::ReadIndex,
            ReadPolicy::LeaseRead => openraft::ReadPolicy::LeaseRead,
        };
        self.raft.ensure_linearizable(policy).await.map_err(|e| match e {
            RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => ReadError::NotLeader(f.into()),
            RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
                ReadError::QuorumUnavailable(q.to_string())
            }
            RaftError::Fatal(f) => ReadError::Stopped(f.to_string()),
        })?;
        self.read_local(f)
    }

    /// A serializable read of this node's applied state: no round trip, possibly stale.
    pub fn read_local<R>(&self, f: impl FnOnce(&SM, &ReadTransaction) -> R) -> Result<R, ReadError> {
        let txn = self.shared.db.begin_read().map_err(|e| ReadError::Storage(e.to_string()))?;
        Ok(f(&self.shared.sm, &txn))
    }

    /// A copy of the current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow_watched().clone()
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
                m.current_leader.is_some_and(|l| Some(l) != not)
                    && (m.current_leader != Some(m.id) || m.last_quorum_acked.is_some())
            })
            .await?;
        m.current_leader.ok_or_else(|| WaitTimeout("leader vanished".into()))
    }

    /// The current leader's id, if this node is not it.
    pub fn not_leader(&self) -> Option<NotLeader> {
        let m = self.metrics();
        match m.current_leader {
            Some(l) if l == self.id => None,
            leader_id => {
                let leader = leader_id.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
                Some(NotLeader { leader_id, leader })
            }
        }
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
