//! Leader forwarding: a follower hands writes, read-index requests and membership changes to the
//! leader, so a client can talk to any node.
//!
//! The follower sends a [`ForwardRequest`] through its transport's [`Forwarder`]; the leader's
//! [`RaftService::forward`](crate::network::RaftService::forward) serves it with [`serve`]. A
//! linearizable read is not shipped to the leader: the follower only asks it for a read index (the
//! leader confirms its leadership with a quorum first), waits until its own state machine has
//! applied that far, and reads locally — etcd's ReadIndex on followers.

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;

use openraft::errors::ChangeMembershipError;
use openraft::errors::ClientWriteError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use openraft::ChangeMembers;
use serde::Deserialize;
use serde::Serialize;

use crate::config::ReadPolicy;
use crate::error::AdminError;
use crate::error::NotLeader;
use crate::error::ProposeError;
use crate::error::ReadError;
use crate::network::guard::Transfer;
use crate::network::BoxFuture;
use crate::network::PeerState;
use crate::state_machine::StateMachine;
use crate::storage::SmStore;
use crate::types::Command;
use crate::types::KeelTypes;
use crate::types::LogIndex;
use crate::types::NodeId;
use crate::types::NodeInfo;
use crate::types::Raft;
use crate::types::RaftMetrics;
use crate::types::Reply;

/// What a follower asks of the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// Propose this encoded command; answer its reply and log index.
    Write(Command),
    /// Confirm leadership and answer the index a linearizable read must wait for.
    ReadIndex,
    /// Add a learner; with `blocking`, answer once it has caught up.
    AddLearner { id: NodeId, node: NodeInfo, blocking: bool },
    /// Change the membership (`retain`: keep removed voters as learners).
    ChangeMembers { change: ChangeMembers<NodeId, NodeInfo>, retain: bool },
    /// Hand leadership to `to`.
    TransferLeader { to: NodeId },
    /// Make learner `id` a voter, if it has caught up with the leader.
    Promote { id: NodeId },
}

/// The leader's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardReply {
    Written { reply: Reply, index: LogIndex },
    ReadIndex(LogIndex),
    Done,
    Failed(ForwardFailure),
}

/// Why the leader could not serve a forwarded request. Mirrors the local error enums.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum ForwardFailure {
    #[error("{}", NotLeader { leader_id: *leader_id, leader: leader.clone() })]
    NotLeader { leader_id: Option<NodeId>, leader: Option<NodeInfo> },
    #[error("dropped from the log by a leader change; it may or may not have been applied: {0}")]
    Discarded(String),
    /// A learner is not caught up enough to be promoted; retry later.
    #[error("not ready: {0}")]
    NotReady(String),
    /// Another membership change is still in progress; retry once it has committed.
    #[error("another membership change is in progress; retry: {0}")]
    Busy(String),
    #[error("leadership not confirmed by a quorum: {0}")]
    QuorumUnavailable(String),
    #[error("rejected: {0}")]
    Rejected(String),
    /// The leader refused to propose a command: it does not decode, is too large, or the state
    /// machine's `validate` refused it. Nothing was appended.
    #[error("command refused: {0}")]
    Invalid(String),
    #[error("leader stopped: {0}")]
    Stopped(String),
}

/// Why a forwarded request got no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request never left this node (no connection to the leader): safe to retry.
    #[error("leader unreachable: {0}")]
    NotSent(String),
    /// The request may have reached the leader and been carried out: the outcome is unknown.
    #[error("connection to the leader failed mid-request; the outcome is unknown: {0}")]
    Unknown(String),
}

/// The sending side of forwarding, implemented by each transport.
pub trait Forwarder: Send + Sync + 'static {
    fn forward<'a>(
        &'a self,
        target: NodeId,
        node: &'a NodeInfo,
        req: ForwardRequest,
    ) -> BoxFuture<'a, Result<ForwardReply, ForwardError>>;
}

// ---------------------------------------------------------------------------------------------
// The leader's side: what a node does itself, for its own clients and for forwarded requests.

/// The settings leader-side operations need.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub election_timeout: Duration,
    pub read_policy: ReadPolicy,
    /// The largest encoded command this node proposes (`limits.max_command_bytes`).
    pub max_command_bytes: usize,
}

/// Serves a forwarded request on this node.
///
/// A `Write` must have passed [`check_command`] on this node.
pub(crate) async fn serve<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    timing: Timing,
    peer: &PeerState,
    req: ForwardRequest,
) -> ForwardReply {
    let result = match req {
        ForwardRequest::Write(cmd) => {
            local_write(raft, timing, cmd).await.map(|(reply, index)| ForwardReply::Written { reply, index })
        }
        ForwardRequest::ReadIndex => local_read_index(raft, timing).await.map(ForwardReply::ReadIndex),
        ForwardRequest::AddLearner { id, node, blocking } => {
            local_add_learner(raft, timing, id, node, blocking).await.map(|()| ForwardReply::Done)
        }
        ForwardRequest::ChangeMembers { change, retain } => {
            local_change_members(raft, timing, change, retain).await.map(|()| ForwardReply::Done)
        }
        ForwardRequest::TransferLeader { to } => {
            local_transfer_leader(raft, timing, peer, to).await.map(|()| ForwardReply::Done)
        }
        ForwardRequest::Promote { id } => local_promote(raft, id).await.map(|()| ForwardReply::Done),
    };
    result.unwrap_or_else(ForwardReply::Failed)
}

/// How long a membership change waits for one already in progress to commit.
const MEMBERSHIP_BUSY_WAIT: Duration = Duration::from_secs(5);

/// Runs a membership change on this node (the leader); while another change is still in
/// progress (e.g. a member publishing its address), waits for it to commit and tries again.
async fn retry_while_busy<F, Fut>(
    raft: &Raft<impl openraft::storage::RaftStateMachine<KeelTypes>>,
    change: F,
) -> Result<(), ForwardFailure>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), ForwardFailure>>,
{
    let deadline = tokio::time::Instant::now() + MEMBERSHIP_BUSY_WAIT;
    loop {
        match change().await {
            Err(ForwardFailure::Busy(m)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("membership change waits for the one in progress: {m}");
                let committed =
                    |m: &RaftMetrics| m.membership_config.log_id() == m.committed_membership_config.log_id();
                let _ = raft
                    .wait(Some(Duration::from_millis(200)))
                    .metrics(committed, "membership committed")
                    .await;
            }
            other => return other,
        }
    }
}

pub(crate) async fn local_add_learner<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    _timing: Timing,
    id: NodeId,
    node: NodeInfo,
    blocking: bool,
) -> Result<(), ForwardFailure> {
    retry_while_busy(raft, || async {
        raft.add_learner(id, node.clone(), blocking).await.map(|_| ()).map_err(write_failure)
    })
    .await
}

pub(crate) async fn local_change_members<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    _timing: Timing,
    change: ChangeMembers<NodeId, NodeInfo>,
    retain: bool,
) -> Result<(), ForwardFailure> {
    retry_while_busy(raft, || async {
        raft.change_membership(change.clone(), retain).await.map(|_| ()).map_err(write_failure)
    })
    .await
}

/// Checks an encoded command as the leader does before it proposes one, whichever path it came
/// by: within the size limit, decodes as the state machine's command, and passes its `validate`.
pub(crate) fn check_command<SM: StateMachine>(
    sm: &SM,
    max_bytes: usize,
    cmd: &Command,
) -> Result<(), ForwardFailure> {
    check_command_size(max_bytes, cmd.0.len())?;
    let decoded: SM::Command = crate::codec::from_bytes(&cmd.0)
        .map_err(|e| ForwardFailure::Invalid(format!("command does not decode: {e}")))?;
    sm.validate(&decoded).map_err(|refusal| ForwardFailure::Invalid(refusal.0))
}

pub(crate) fn check_command_size(max_bytes: usize, len: usize) -> Result<(), ForwardFailure> {
    if len > max_bytes {
        return Err(ForwardFailure::Invalid(format!(
            "command is {len} bytes, over the {max_bytes} byte limit (limits.max_command_bytes)"
        )));
    }
    Ok(())
}

/// Proposes `cmd` on this node, which must be the leader. The caller has checked it
/// ([`check_command`]).
pub(crate) async fn local_write<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    timing: Timing,
    cmd: Command,
) -> Result<(Reply, LogIndex), ForwardFailure> {
    let mut attempt = raft.client_write(cmd.clone()).await;
    if let Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) = &attempt {
        // A newly elected leader refuses writes until a quorum has acknowledged it (its lease).
        // That is this node's own transient state, not a reason to send the client elsewhere.
        if f.leader_id.is_none() && await_leader_lease(raft, timing).await {
            attempt = raft.client_write(cmd).await;
        }
    }
    attempt.map(|resp| (resp.data, resp.log_id.index)).map_err(write_failure)
}

/// If this node is leader, waits (up to an election timeout) until a quorum has acknowledged its
/// leadership; true if it is then a leader with a valid lease.
async fn await_leader_lease<SM: StateMachine>(raft: &Raft<SmStore<SM>>, timing: Timing) -> bool {
    let ready = raft.wait(Some(timing.election_timeout)).metrics(leader_ready, "leader lease").await;
    ready.is_ok_and(|m| m.state == openraft::ServerState::Leader)
}

/// Confirms this node's leadership (per the read policy) and answers the index a linearizable
/// read must see applied. Does not wait for this node's own state machine.
pub(crate) async fn local_read_index<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    timing: Timing,
) -> Result<LogIndex, ForwardFailure> {
    let policy = match timing.read_policy {
        ReadPolicy::ReadIndex => openraft::ReadPolicy::ReadIndex,
        ReadPolicy::LeaseRead => openraft::ReadPolicy::LeaseRead,
    };
    let linearizer = raft.get_read_linearizer(policy).await.map_err(read_failure)?;
    Ok(linearizer.read_log_id().index())
}

/// A learner counts as caught up once it holds this share of the leader's log (etcd's rule).
pub const PROMOTE_READY_RATIO: f64 = 0.9;

/// Makes learner `id` a voter, on this node (the leader), if it has caught up.
pub(crate) async fn local_promote<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    id: NodeId,
) -> Result<(), ForwardFailure> {
    let m = raft.metrics().borrow_watched().clone();
    let Some(replication) = m.replication.as_ref().filter(|_| m.current_leader == Some(m.id)) else {
        return Err(not_leader_failure(&m));
    };
    let membership = m.membership_config.membership();
    if membership.get_node(&id).is_none() {
        return Err(ForwardFailure::Rejected(format!("node {id} is not a member")));
    }
    if membership.voter_ids().any(|v| v == id) {
        return Err(ForwardFailure::Rejected(format!("node {id} is already a voter, not a learner")));
    }
    let matched = replication.get(&id).cloned().flatten().map_or(0, |l| l.index);
    let leader_last = m.last_log_index.unwrap_or(0);
    if (matched as f64) < leader_last as f64 * PROMOTE_READY_RATIO {
        return Err(ForwardFailure::NotReady(format!(
            "learner {id} is not in sync with the leader yet (has {matched} of {leader_last} entries); retry later"
        )));
    }
    let change = ChangeMembers::AddVoterIds([id].into_iter().collect());
    retry_while_busy(raft, || async {
        raft.change_membership(change.clone(), true).await.map(|_| ()).map_err(write_failure)
    })
    .await
}

/// Asks this node (the leader) to hand leadership to `to`, and waits until it has moved.
///
/// The transfer is recorded in `peer` first: the target's vote request carries the transfer
/// flag, which this node honours only for a transfer it knows of (see [`crate::network::guard`]).
pub(crate) async fn local_transfer_leader<SM: StateMachine>(
    raft: &Raft<SmStore<SM>>,
    timing: Timing,
    peer: &PeerState,
    to: NodeId,
) -> Result<(), ForwardFailure> {
    let m = raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(m.id) {
        return Err(not_leader_failure(&m));
    }
    if to == m.id {
        return Ok(());
    }
    if !m.membership_config.membership().voter_ids().any(|v| v == to) {
        return Err(ForwardFailure::Rejected(format!("node {to} is not a voter; only a voter can lead")));
    }
    peer.announce_transfer(Transfer { term: m.current_term, to });
    raft.trigger().transfer_leader(to).await.map_err(|e| ForwardFailure::Stopped(e.to_string()))?;
    // The target campaigns at once; allow it a few election timeouts to win.
    raft.wait(Some(timing.election_timeout * 4))
        .metrics(|m| m.current_leader == Some(to), "leadership transfer")
        .await
        .map(|_| ())
        .map_err(|e| ForwardFailure::QuorumUnavailable(format!("leadership did not move to node {to}: {e}")))
}

/// Maps the errors of openraft's write API (shared by proposals and membership changes).
pub(crate) fn write_failure(e: RaftError<KeelTypes, ClientWriteError<KeelTypes>>) -> ForwardFailure {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ForwardFailure::NotLeader { leader_id: f.leader_id, leader: f.leader_node }
        }
        RaftError::APIError(e @ ClientWriteError::LogEntryDiscarded(_)) => {
            ForwardFailure::Discarded(e.to_string())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            e @ ChangeMembershipError::InProgress(_),
        )) => ForwardFailure::Busy(e.to_string()),
        RaftError::APIError(e) => ForwardFailure::Rejected(e.to_string()),
        RaftError::Fatal(f) => ForwardFailure::Stopped(f.to_string()),
    }
}

pub(crate) fn read_failure(e: RaftError<KeelTypes, LinearizableReadError<KeelTypes>>) -> ForwardFailure {
    match e {
        RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => {
            ForwardFailure::NotLeader { leader_id: f.leader_id, leader: f.leader_node }
        }
        RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
            ForwardFailure::QuorumUnavailable(q.to_string())
        }
        RaftError::Fatal(f) => ForwardFailure::Stopped(f.to_string()),
    }
}

impl ForwardFailure {
    pub(crate) fn not_leader(&self) -> Option<NotLeader> {
        match self {
            ForwardFailure::NotLeader { leader_id, leader } => {
                Some(NotLeader { leader_id: *leader_id, leader: leader.clone() })
            }
            _ => None,
        }
    }
}

impl From<ForwardFailure> for ProposeError {
    fn from(f: ForwardFailure) -> Self {
        match f {
            ForwardFailure::NotLeader { leader_id, leader } => {
                ProposeError::NotLeader(NotLeader { leader_id, leader })
            }
            ForwardFailure::Discarded(m) => ProposeError::Discarded(m),
            ForwardFailure::Invalid(m) => ProposeError::InvalidCommand(m),
            ForwardFailure::QuorumUnavailable(m)
            | ForwardFailure::Rejected(m)
            | ForwardFailure::Busy(m)
            | ForwardFailure::NotReady(m) => ProposeError::Stopped(format!("unexpected write error: {m}")),
            ForwardFailure::Stopped(m) => ProposeError::Stopped(m),
        }
    }
}

impl From<ForwardFailure> for ReadError {
    fn from(f: ForwardFailure) -> Self {
        match f {
            ForwardFailure::NotLeader { leader_id, leader } => {
                ReadError::NotLeader(NotLeader { leader_id, leader })
            }
            ForwardFailure::QuorumUnavailable(m) | ForwardFailure::Discarded(m) | ForwardFailure::Busy(m) => {
                ReadError::QuorumUnavailable(m)
            }
            ForwardFailure::Rejected(m)
            | ForwardFailure::Stopped(m)
            | ForwardFailure::NotReady(m)
            | ForwardFailure::Invalid(m) => ReadError::Stopped(m),
        }
    }
}

impl From<ForwardFailure> for AdminError {
    fn from(f: ForwardFailure) -> Self {
        match f {
            ForwardFailure::NotLeader { leader_id, leader } => {
                AdminError::NotLeader(NotLeader { leader_id, leader })
            }
            ForwardFailure::Discarded(m) => AdminError::Unknown(m),
            ForwardFailure::QuorumUnavailable(m) | ForwardFailure::Busy(m) => AdminError::Retry(m),
            ForwardFailure::Rejected(m) | ForwardFailure::Invalid(m) => AdminError::Rejected(m),
            ForwardFailure::NotReady(m) => AdminError::NotReady(m),
            ForwardFailure::Stopped(m) => AdminError::Stopped(m),
        }
    }
}

/// "Not the leader", naming the leader `m` knows and its address.
pub(crate) fn not_leader_failure(m: &RaftMetrics) -> ForwardFailure {
    let NotLeader { leader_id, leader } = NotLeader::from_metrics(m);
    ForwardFailure::NotLeader { leader_id, leader }
}

/// Whether `m` says this node is a leader whose leadership a quorum has acknowledged (a new
/// leader refuses writes until then).
pub(crate) fn leader_ready(m: &RaftMetrics) -> bool {
    m.state != openraft::ServerState::Leader || m.last_quorum_acked.is_some()
}
