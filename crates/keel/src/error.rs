//! Errors a [`Node`](crate::Node) returns, one enum per operation family.
//!
//! Each keeps apart what the caller should do: retry elsewhere (`NotLeader`), fix the request
//! (`InvalidCommand`, `Rejected`), or give up on this node (`Stopped`).

use std::fmt;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::storage::log_store::LogOpenError;
use crate::storage::sm_store::SmOpenError;
use crate::types::NodeId;
use crate::types::NodeInfo;

/// This node is not the leader. Retry at `leader` if known, or after an election settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLeader {
    pub leader_id: Option<NodeId>,
    pub leader: Option<NodeInfo>,
}

impl fmt::Display for NotLeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.leader_id, &self.leader) {
            (Some(id), Some(info)) => write!(f, "not the leader; the leader is node {id} at {info}"),
            (Some(id), None) => write!(f, "not the leader; the leader is node {id}"),
            _ => write!(f, "not the leader, and no leader is known yet (election in progress); retry"),
        }
    }
}

impl std::error::Error for NotLeader {}

impl NotLeader {
    /// The leader `m` knows (if any) and its address from the membership.
    pub fn from_metrics(m: &crate::types::RaftMetrics) -> Self {
        let leader_id = m.current_leader;
        let leader = leader_id.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        Self { leader_id, leader }
    }
}

impl From<openraft::errors::ForwardToLeader<crate::types::KeelTypes>> for NotLeader {
    fn from(f: openraft::errors::ForwardToLeader<crate::types::KeelTypes>) -> Self {
        Self { leader_id: f.leader_id, leader: f.leader_node }
    }
}

/// A node could not start. Nothing was modified beyond creating missing directories.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Log(#[from] LogOpenError),
    #[error(transparent)]
    StateMachine(#[from] SmOpenError),
    #[error("raft failed to start: {0}")]
    Raft(String),
}

/// A proposal failed. `NotLeader` and `InvalidCommand` mean it was never appended; after
/// `Discarded`, `Stopped` and `Unknown` it may or may not have been applied.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// A leader change dropped the entry from this node's log before it learned its fate: it may
    /// still have committed through the new leader (openraft: commit status unknown).
    #[error("proposal dropped from the log by a leader change; it may or may not have been applied: {0}")]
    Discarded(String),
    /// The command was refused before it was proposed: it does not encode or decode, is over
    /// `limits.max_command_bytes`, or the state machine's `validate` refused it. Nothing changed.
    #[error("command refused: {0}")]
    InvalidCommand(String),
    /// The command was committed, but the state machine could not take it (it does not decode
    /// as a command on the replicas): every replica answered this refusal and changed nothing.
    #[error("committed but not applied: {0}")]
    Refused(String),
    /// The node stopped (shut down, or a storage failure made it halt).
    #[error("node stopped: {0}")]
    Stopped(String),
    /// The proposal was forwarded to the leader and the connection failed before the answer came
    /// back: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// A read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// The leader could not confirm its leadership with a quorum in time; retry.
    #[error("leadership not confirmed by a quorum: {0}")]
    QuorumUnavailable(String),
    #[error("state machine read failed: {0}")]
    Storage(String),
    #[error("node stopped: {0}")]
    Stopped(String),
}

/// A cluster administration request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    /// A leader change discarded the change before it committed; retry.
    #[error("discarded by a leader change; retry: {0}")]
    Retry(String),
    /// The request is not allowed in the current state (e.g. already initialized, a membership
    /// change already in progress, an unknown node id).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The change needs a learner that has caught up with the leader; retry later.
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("node stopped: {0}")]
    Stopped(String),
    /// Forwarded to the leader, and the connection failed before the answer: it may have happened.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl ProposeError {
    /// Whether retrying (at another node, or later) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::NotLeader(_))
    }
}

impl AdminError {
    /// Whether retrying (at another node, or later) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::NotLeader(_) | Self::Retry(_) | Self::NotReady(_))
    }
}

impl ReadError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::NotLeader(_) | Self::QuorumUnavailable(_))
    }
}

/// A condition waited for did not come true in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out waiting: {0}")]
pub struct WaitTimeout(pub String);
