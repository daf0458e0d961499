//! The openraft type configuration Keel runs on, and the Raft vocabulary the rest of the crate speaks.
//!
//! Keel's Raft log carries opaque bytes: the user's command is encoded once at `propose` and decoded
//! once at `apply`. That keeps the log, the network and the storage non-generic, so one on-disk format
//! serves every state machine, and a user type change never breaks decoding of the Raft layer.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

/// A node's identity in the cluster. Stable for the node's whole life; persisted in its data dir.
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// A position in the Raft log.
pub type LogIndex = u64;

/// What the cluster membership records about a node: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Address peers dial for Raft traffic (`host:port`). Empty for in-process nodes.
    pub peer_addr: String,
    /// Address clients dial (`host:port`). Empty when the node serves no clients.
    pub client_addr: String,
}

impl NodeInfo {
    pub fn new(peer_addr: impl Into<String>, client_addr: impl Into<String>) -> Self {
        Self { peer_addr: peer_addr.into(), client_addr: client_addr.into() }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{peer: {}, client: {}}}", self.peer_addr, self.client_addr)
    }
}

/// An encoded user command, as it sits in the Raft log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What applying one log entry answered, as it travels back to the proposer.
///
/// Every replica computes the same `Reply` for the same entry: a committed entry that the state
/// machine cannot take (its bytes do not decode as a command) is answered `Refused` on every node
/// and skipped, so the replicas stay identical and the log never wedges.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The user's encoded response.
    Response(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The entry was committed but not applied; why.
    Refused(String),
}

impl Default for Reply {
    /// The reply to entries that carry no command (blank, membership).
    fn default() -> Self {
        Reply::Response(Vec::new())
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Response(bytes) => write!(f, "Reply({} bytes)", bytes.len()),
            Reply::Refused(why) => write!(f, "Refused({why:?})"),
        }
    }
}

openraft::declare_raft_types!(
    /// Keel's openraft type configuration.
    pub KeelTypes:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = NodeInfo,
        Term = Term,
);

pub type Raft<SM> = openraft::Raft<KeelTypes, SM>;
pub type LogId = openraft::alias::LogIdOf<KeelTypes>;
pub type Vote = openraft::alias::VoteOf<KeelTypes>;
pub type Entry = openraft::alias::EntryOf<KeelTypes>;
pub type EntryPayload = openraft::EntryPayload<Command, NodeId, NodeInfo>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<KeelTypes>;
pub type Membership = openraft::Membership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<KeelTypes>;
pub type RaftMetrics = openraft::RaftMetrics<KeelTypes>;
