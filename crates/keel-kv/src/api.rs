//! What both client APIs (etcd gRPC, HTTP/JSON) do, in one place: limits, writes through Raft,
//! linearizable or serializable reads, membership, status — and one error type that each API
//! maps onto its own wire (gRPC status, HTTP status + JSON code).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel::openraft::async_runtime::WatchReceiver;
use keel::openraft::ChangeMembers;
use keel::openraft::ServerState;
use keel::AdminError;
use keel::Node;
use keel::NodeId;
use keel::NodeInfo;
use keel::ProposeError;
use keel::ReadError;

use crate::auth;
use crate::auth::AuthCommand;
use crate::auth::AuthError;
use crate::auth::AuthStatus;
use crate::auth::AuthView;
use crate::auth::Caller;
use crate::auth::Need;
use crate::auth::Permission;
use crate::limits::LimitError;
use crate::limits::Limits;
use crate::store;
use crate::store::AlarmAction;
use crate::store::AlarmChange;
use crate::store::AlarmKind;
use crate::store::AlarmMember;
use crate::store::KvCommand;
use crate::store::KvError;
use crate::store::KvStore;
use crate::store::OpResult;
use crate::store::Range;
use crate::store::RangeResult;

/// How long the answer to a membership change waits for this node to see the change.
const MEMBERSHIP_VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The state machine database file in the data dir (opened by `keel::storage::sm_store`); the
/// space quota is measured on its size.
pub const DB_FILE: &str = "state.redb";

/// Why a client request failed. Each variant maps to one etcd gRPC error and one HTTP code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("key is {size} bytes, over the {limit} byte limit")]
    KeyTooLarge { size: usize, limit: usize },
    #[error("request is {size} bytes, over the {limit} byte limit")]
    RequestTooLarge { size: usize, limit: usize },
    #[error("key not found")]
    KeyNotFound,
    #[error("member {0} not found")]
    UnknownMember(NodeId),
    #[error("{0}")]
    Kv(KvError),
    /// The cluster refused a membership or leadership change.
    #[error("{0}")]
    Rejected(String),
    #[error("can only promote a learner member; {0} is a voter")]
    NotLearner(NodeId),
    /// A learner must catch up before promotion. Retryable later.
    #[error("{0}")]
    LearnerNotReady(String),
    #[error("peer address {0} is already used by member {1}")]
    PeerAddrExists(String, NodeId),
    #[error("member {0} already exists")]
    MemberExists(NodeId),
    #[error("bad leader transferee: {0} is a learner")]
    BadTransferee(NodeId),
    /// No leader could be reached in time. Retryable.
    #[error("no leader: {0}")]
    NoLeader(String),
    /// The node is stopping or cannot reach its quorum. Retryable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request reached the leader but the answer was lost: it may or may not have happened.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("lease TTL is over the largest, {} seconds", store::MAX_LEASE_TTL)]
    LeaseTtlTooLarge,
    /// etcd's `ErrElectionNotLeader`: the leader key named does not lead (any more).
    #[error("election: not leader")]
    ElectionNotLeader,
    /// etcd's `ErrElectionNoLeader`: nobody leads the election.
    #[error("election: no leader")]
    ElectionNoLeader,
}

impl ApiError {
    pub fn retryable(&self) -> bool {
        matches!(self, ApiError::NoLeader(_) | ApiError::Unavailable(_))
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::KeyTooLarge { size, limit } => ApiError::KeyTooLarge { size, limit },
            e @ (LimitError::EmptyKey
            | LimitError::TooManyOps
            | LimitError::DuplicateKey
            | LimitError::ValueProvided
            | LimitError::LeaseProvided
            | LimitError::TooDeep
            | LimitError::BadLease { .. }
            | LimitError::NestedUser) => ApiError::BadRequest(e.to_string()),
        }
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader(nl) => ApiError::NoLeader(nl.to_string()),
            ProposeError::Discarded(m) => {
                ApiError::Unknown(format!("proposal dropped by a leader change: {m}"))
            }
            ProposeError::InvalidCommand(m) => ApiError::BadRequest(m),
            ProposeError::Refused(m) => ApiError::BadRequest(m),
            // Stopping mid-proposal: the entry may already be in the leader's log.
            ProposeError::Stopped(m) => ApiError::Unknown(format!("node stopped: {m}")),
            ProposeError::Unknown(m) => ApiError::Unknown(m),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::NotLeader(nl) => ApiError::NoLeader(nl.to_string()),
            ReadError::QuorumUnavailable(m) => ApiError::Unavailable(m),
            ReadError::Storage(m) => ApiError::Internal(m),
            ReadError::Stopped(m) => ApiError::Unavailable(format!("node stopped: {m}")),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::NotLeader(nl) => ApiError::NoLeader(nl.to_string()),
            AdminError::Retry(m) => ApiError::Unavailable(m),
            AdminError::Rejected(m) => ApiError::Rejected(m),
            AdminError::NotReady(m) => ApiError::LearnerNotReady(m),
            AdminError::Stopped(m) => ApiError::Unavailable(format!("node stopped: {m}")),
            AdminError::Unknown(m) => ApiError::Unknown(m),
        }
    }
}

impl From<keel::StateMachineError> for ApiError {
    fn from(e: keel::StateMachineError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// A cluster member as the APIs show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub id: NodeId,
    pub peer_addr: String,
    pub client_addr: String,
    pub voter: bool,
}

/// This node's view of itself and the cluster.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Status {
    pub id: NodeId,
    pub cluster_name: String,
    pub state: &'static str,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// The last index removed from this node's log (0: none): a member behind it catches up
    /// by a snapshot.
    pub purged_index: u64,
    pub revision: i64,
    pub members: Vec<Member>,
    /// On the leader: each other member's matched log index and lag behind the leader.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<BTreeMap<NodeId, Replication>>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Replication {
    pub matched_index: u64,
    pub lag: u64,
}

/// Request counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub grpc_requests: AtomicU64,
    pub grpc_errors: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_errors: AtomicU64,
    /// Times this node saw a new leader (etcd's `leader_changes_seen`; see `server::count_leader_changes`).
    pub leader_changes: AtomicU64,
    /// Writes proposed and not answered yet.
    pub proposals_pending: AtomicU64,
    /// Writes whose proposal failed (not committed, or the outcome unknown).
    pub proposals_failed: AtomicU64,
}

/// The client-facing operations of one keeld node.
#[derive(Clone)]
pub struct KvApi {
    pub node: Arc<Node<KvStore>>,
    /// The space quota on the state machine database file, in bytes (etcd's
    /// `--quota-backend-bytes`, 0 already replaced by the default).
    pub quota_backend_bytes: u64,
    /// etcd's cluster id: a hash of the cluster name.
    pub cluster_id: u64,
    pub max_request_bytes: usize,
    pub max_key_bytes: usize,
    /// Largest range answer (see [`store::answer_bytes`]); a range over it is refused.
    pub max_response_bytes: usize,
    /// This node's own addresses, as it advertises them to the cluster.
    pub advertise: NodeInfo,
    pub counters: Arc<Counters>,
    /// The gRPC server's per-method series (served by `/metrics`).
    pub grpc_metrics: Arc<crate::metrics::GrpcMetrics>,
    /// The client port's connection counters (served by `/metrics`).
    pub port: Arc<crate::client_port::PortCounters>,
    /// How often an idle watch that asked for progress notifications gets one.
    pub watch_progress_notify_interval: std::time::Duration,
    /// Which ports speak TLS, and how this member dials other members' client ports.
    pub tls: TlsSettings,
    /// The leader's client port, for what only the leader answers (lease timers).
    pub(crate) leader_channel: Arc<std::sync::Mutex<Option<(String, tonic::transport::Channel)>>>,
    /// bcrypt's cost for the password hashes this node makes (etcd's `--bcrypt-cost`, default 10).
    pub bcrypt_cost: u32,
    /// How long a token from `Authenticate` is good for (etcd's `--auth-token-ttl`, 300 s).
    pub auth_token_ttl: std::time::Duration,
    /// Whether auth is on, as last read, with the state machine's auth epoch then: requests
    /// while auth is off cost no read of the state.
    auth_seen: Arc<std::sync::Mutex<Option<(u64, bool)>>>,
}

/// Which of this cluster's ports speak TLS (for the `https://` of the URLs members show), and how
/// this member dials other members' client ports (forwarded lease keep-alives).
#[derive(Clone, Debug, Default)]
pub struct TlsSettings {
    pub client: bool,
    pub peer: bool,
    /// `None` with client TLS off; an error says why this member cannot dial them (no CA to
    /// verify them with).
    pub member_grpc: Option<Result<Arc<keel::tls::ClientTls>, String>>,
}

impl TlsSettings {
    /// `scheme://addr` of a client (`peer` false) or peer address; nothing for an empty one.
    pub fn urls(&self, addr: &str, peer: bool) -> Vec<String> {
        let https = if peer { self.peer } else { self.client };
        match addr {
            "" => vec![],
            a if https => vec![format!("https://{a}")],
            a => vec![format!("http://{a}")],
        }
    }
}

/// etcd's default bcrypt cost (`--bcrypt-cost`).
pub const DEFAULT_BCRYPT_COST: u32 = 10;

/// etcd's default lifetime of a simple token (`--auth-token-ttl`).
pub const DEFAULT_AUTH_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// FNV-1a: a stable cluster id from the cluster name.
pub fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl KvApi {
    pub fn new(
        node: Arc<Node<KvStore>>,
        advertise: NodeInfo,
        max_request_bytes: usize,
        max_key_bytes: usize,
    ) -> Self {
        let cluster_id = cluster_id(&node.config().cluster_name);
        Self {
            node,
            cluster_id,
            quota_backend_bytes: crate::config::DEFAULT_QUOTA_BACKEND_BYTES,
            max_request_bytes,
            max_key_bytes,
            max_response_bytes: crate::config::DEFAULT_MAX_RESPONSE_BYTES,
            advertise,
            counters: Arc::default(),
            grpc_metrics: Arc::default(),
            port: Arc::default(),
            watch_progress_notify_interval: std::time::Duration::from_secs(600),
            tls: TlsSettings::default(),
            leader_channel: Arc::default(),
            bcrypt_cost: DEFAULT_BCRYPT_COST,
            auth_token_ttl: DEFAULT_AUTH_TOKEN_TTL,
            auth_seen: Arc::default(),
        }
    }

    /// This node's watchers.
    pub fn hub(&self) -> &Arc<crate::watch::WatchHub> {
        self.node.state_machine().hub()
    }

    /// Compacts history below `revision` (through Raft); with `physical`, answers only once this
    /// node has removed it (etcd's `physical`).
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<i64, ApiError> {
        let (header_revision, _) = self.write(KvCommand::Compact { revision }).await?;
        if physical {
            let mut progress = self.hub().compaction();
            progress
                .wait_for(|p| p.physical >= revision)
                .await
                .map_err(|_| ApiError::Unavailable("node stopping".into()))?;
        }
        Ok(header_revision)
    }

    pub fn member_id(&self) -> NodeId {
        self.node.id()
    }

    pub fn term(&self) -> u64 {
        // Borrowed, not copied: every watch response asks.
        self.node.raft().metrics().borrow_watched().current_term
    }

    fn limits(&self) -> Limits {
        Limits { max_key_bytes: self.max_key_bytes }
    }

    /// Refuses an empty or oversized key.
    pub fn check_key(&self, key: &[u8]) -> Result<(), ApiError> {
        Ok(self.limits().check_key(key)?)
    }

    pub fn check_size(&self, size: usize) -> Result<(), ApiError> {
        if size > self.max_request_bytes {
            return Err(ApiError::RequestTooLarge { size, limit: self.max_request_bytes });
        }
        Ok(())
    }

    /// Checks a write's keys, shape and space, proposes it, and answers the store's revision and
    /// result. (The leader checks the limits again before proposing: see [`crate::limits`].)
    pub async fn write(&self, cmd: KvCommand) -> Result<(i64, OpResult), ApiError> {
        // Checked here although `KvStore::validate` checks the same on the leader: here the
        // refusal keeps its type (a too-large key answers 413 / etcd's own error); through Raft
        // it comes back as text. The check costs microseconds against a round of fsyncs.
        self.limits().check(&cmd)?;
        self.check_running()?;
        self.check_quota(&cmd).await?;
        let resp = self.propose_counted(cmd).await?;
        match resp.result {
            Ok(r) => Ok((resp.revision, r)),
            Err(e) => Err(ApiError::Kv(e)),
        }
    }

    /// Proposes `cmd`, counted in etcd's proposal metrics: pending while it waits (also when the
    /// caller gives up and drops the wait), failed if it was not committed.
    async fn propose_counted(
        &self,
        cmd: KvCommand,
    ) -> Result<<KvStore as keel::StateMachine>::Response, keel::ProposeError> {
        struct Pending<'a>(&'a AtomicU64);
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.counters.proposals_pending.fetch_add(1, Ordering::Relaxed);
        let _pending = Pending(&self.counters.proposals_pending);
        let proposed = self.node.propose(cmd).await;
        if proposed.is_err() {
            self.counters.proposals_failed.fetch_add(1, Ordering::Relaxed);
        }
        proposed
    }

    /// Refuses a request, before proposing anything, once this node's Raft has stopped: the
    /// client then learns that nothing happened (not "outcome unknown"). keeld exits soon after.
    fn check_running(&self) -> Result<(), ApiError> {
        // Borrowed, not copied: this runs on every write (`Node::metrics` clones them all).
        let state = self.node.raft().metrics().borrow_watched().running_state.clone();
        match state {
            Ok(()) => Ok(()),
            Err(fatal) => Err(ApiError::Unavailable(format!("raft stopped, nothing was proposed: {fatal}"))),
        }
    }

    /// Bytes the state machine database file occupies (etcd's backend size).
    pub fn db_size(&self) -> u64 {
        std::fs::metadata(self.node.config().data_dir.join(DB_FILE)).map_or(0, |m| m.len())
    }

    /// etcd's quota check on the node that receives a write: if the database plus what the
    /// request may add reaches the quota, raise the `NOSPACE` alarm (through Raft, so every
    /// member refuses growing writes from then on) and refuse the request without proposing it.
    async fn check_quota(&self, cmd: &KvCommand) -> Result<(), ApiError> {
        let cost = store::cost(cmd);
        if cost == 0 || self.db_size().saturating_add(cost) < self.quota_backend_bytes {
            return Ok(());
        }
        let me = AlarmMember { member_id: self.member_id(), alarm: AlarmKind::NoSpace };
        tracing::warn!(
            db_size = self.db_size(),
            quota = self.quota_backend_bytes,
            "database space quota reached; raising the NOSPACE alarm"
        );
        // As etcd: the refusal does not depend on the alarm being raised (it is retried with the
        // next refused write if this proposal fails).
        if let Err(e) = self.change_alarm(AlarmAction::Activate, me).await {
            tracing::warn!("raising the NOSPACE alarm: {e}");
        }
        Err(ApiError::Kv(KvError::NoSpace))
    }

    /// Raises or clears one alarm through Raft; answers the alarm changed (none if it already was
    /// so).
    pub async fn change_alarm(
        &self,
        action: AlarmAction,
        member: AlarmMember,
    ) -> Result<Vec<AlarmMember>, ApiError> {
        self.check_running()?;
        let resp = self.node.propose(KvCommand::Alarm(AlarmChange { action, member })).await?;
        match resp.result {
            Ok(OpResult::Alarms(changed)) => Ok(changed),
            Ok(other) => Err(ApiError::Internal(format!("alarm change answered {other:?}"))),
            Err(e) => Err(ApiError::Kv(e)),
        }
    }

    /// The raised alarms (a linearizable read unless `serializable`).
    pub async fn alarms(&self, serializable: bool) -> Result<Vec<AlarmMember>, ApiError> {
        if !serializable {
            self.node.linearize().await?;
        }
        Ok(self.node.read_local(|_, txn| store::alarms(txn))??)
    }

    /// Reads a range: linearizable unless `serializable`. Answers the revision the read saw.
    pub async fn range(&self, r: &Range, serializable: bool) -> Result<(i64, RangeResult), ApiError> {
        self.check_key(&r.key)?;
        // Planted bug (debug builds, KEEL_FAULT_INJECTION=stale-reads): every read is served as a
        // serializable one, from whatever this node has applied.
        #[cfg(debug_assertions)]
        let serializable = serializable || self.node.config().faults.stale_reads;
        if !serializable {
            self.node.linearize().await?;
        }
        let budget = self.max_response_bytes;
        let (revision, result) = self.node.read_local(|_, txn| store::range(txn, r, budget))??;
        Ok((revision, result.map_err(ApiError::Kv)?))
    }

    /// The store's revision here (serializable).
    pub fn revision(&self) -> i64 {
        self.node.read_local(|_, txn| store::revision(txn)).ok().and_then(Result::ok).unwrap_or(0)
    }

    pub fn members(&self) -> Vec<Member> {
        let m = self.node.metrics();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, info)| Member {
                id: *id,
                peer_addr: info.peer_addr.clone(),
                client_addr: info.client_addr.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }

    fn member(&self, id: NodeId) -> Result<Member, ApiError> {
        self.members().into_iter().find(|m| m.id == id).ok_or(ApiError::UnknownMember(id))
    }

    /// Adds a member at `peer_addr`. With `id` None the cluster assigns the next free id.
    pub async fn add_member(
        &self,
        id: Option<NodeId>,
        peer_addr: &str,
        client_addr: &str,
        learner: bool,
    ) -> Result<Member, ApiError> {
        let peer_addr = crate::config::bare_addr(peer_addr).to_string();
        if !peer_addr.contains(':') {
            return Err(ApiError::BadRequest(format!("peer address {peer_addr:?} is not HOST:PORT")));
        }
        let members = self.members();
        if let Some(m) = members.iter().find(|m| m.peer_addr == peer_addr) {
            return Err(ApiError::PeerAddrExists(peer_addr, m.id));
        }
        let id = match id {
            Some(0) => return Err(ApiError::BadRequest("node id 0 is not allowed".into())),
            Some(id) if members.iter().any(|m| m.id == id) => return Err(ApiError::MemberExists(id)),
            Some(id) => id,
            // A Raft-replicated counter: an id once handed out is never handed out again, even
            // after its member was removed (a removed node must not come back under it).
            None => {
                let above = members.iter().map(|m| m.id).max().unwrap_or(0);
                match self.node.propose(KvCommand::AllocateMemberId { above }).await?.result {
                    Ok(OpResult::MemberId(id)) => id,
                    other => {
                        return Err(ApiError::Internal(format!("member id allocation answered {other:?}")))
                    }
                }
            }
        };
        let info = NodeInfo::new(peer_addr.clone(), crate::config::bare_addr(client_addr));
        self.node.add_learner(id, info, false).await?;
        if !learner {
            let change = ChangeMembers::AddVoterIds([id].into_iter().collect());
            self.node.change_members(change, true).await?;
        }
        self.await_membership(|m| m.get_node(&id).is_some() && (learner || m.voter_ids().any(|v| v == id)))
            .await;
        Ok(Member { id, peer_addr, client_addr: client_addr.to_string(), voter: !learner })
    }

    /// A new node asks to be added as a learner (`keeld --join`). A node whose first request was
    /// carried out but whose answer was lost (the leader died, a timeout) asks again: if it is
    /// already a learner at that peer address, under the id it asks for or under any when it
    /// asks for none, it gets the same answer. A voter at that address is not a retry (a voter
    /// that lost its data must be removed and added anew) and is refused, as is any other member
    /// there.
    pub async fn join(
        &self,
        id: Option<NodeId>,
        peer_addr: &str,
        client_addr: &str,
    ) -> Result<Member, ApiError> {
        let bare = crate::config::bare_addr(peer_addr);
        if let Some(m) = self.members().into_iter().find(|m| m.peer_addr == bare) {
            if !m.voter && id.is_none_or(|id| id == m.id) {
                return Ok(m);
            }
        }
        self.add_member(id, peer_addr, client_addr, true).await
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<(), ApiError> {
        let member = self.member(id)?;
        let change = if member.voter {
            ChangeMembers::RemoveVoters([id].into_iter().collect())
        } else {
            ChangeMembers::RemoveNodes([id].into_iter().collect())
        };
        self.node.change_members(change, false).await?;
        // A node removed from the cluster may never hear of its own removal: do not wait for it.
        if id != self.member_id() {
            self.await_membership(|m| m.get_node(&id).is_none()).await;
        }
        Ok(())
    }

    /// After a change the leader has committed, waits (bounded) until this node's own view of the
    /// membership shows it, so the answer lists the members as they now are. A follower that
    /// forwarded the change learns of it with the leader's next replication. The change is done
    /// either way: past the wait, the answer shows this node's view as it is.
    async fn await_membership(
        &self,
        shows: impl Fn(&keel::openraft::Membership<NodeId, NodeInfo>) -> bool + Send,
    ) {
        let seen = self
            .node
            .wait_for(MEMBERSHIP_VIEW_WAIT, "the membership change", move |m| {
                shows(m.membership_config.membership())
            })
            .await;
        if let Err(e) = seen {
            tracing::warn!("answering a membership change before this node sees it: {e}");
        }
    }

    pub async fn promote(&self, id: NodeId) -> Result<(), ApiError> {
        let member = self.member(id)?;
        if member.voter {
            return Err(ApiError::NotLearner(id));
        }
        self.node.promote(id).await?;
        self.await_membership(|m| m.voter_ids().any(|v| v == id)).await;
        Ok(())
    }

    pub async fn change_voters(&self, voters: std::collections::BTreeSet<NodeId>) -> Result<(), ApiError> {
        let members = self.members();
        if let Some(unknown) = voters.iter().find(|v| !members.iter().any(|m| m.id == **v)) {
            return Err(ApiError::UnknownMember(*unknown));
        }
        if voters.is_empty() {
            return Err(ApiError::BadRequest("voters must not be empty".into()));
        }
        self.node.change_membership(voters.clone()).await?;
        self.await_membership(|m| m.voter_ids().collect::<std::collections::BTreeSet<_>>() == voters).await;
        Ok(())
    }

    /// Updates member `id`'s peer address (etcd's MemberUpdate).
    pub async fn update_member(&self, id: NodeId, peer_addr: &str) -> Result<(), ApiError> {
        let m = self.member(id)?;
        let info = NodeInfo::new(crate::config::bare_addr(peer_addr), m.client_addr);
        let change = ChangeMembers::SetNodes([(id, info)].into_iter().collect());
        Ok(self.node.change_members(change, true).await?)
    }

    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ApiError> {
        let member = self.member(to)?;
        if !member.voter {
            return Err(ApiError::BadTransferee(to));
        }
        Ok(self.node.transfer_leader(to).await?)
    }

    pub fn status(&self) -> Status {
        let m = self.node.metrics();
        let last_log_index = m.last_log_index.unwrap_or(0);
        let members = self.members();
        let is_learner = !members.iter().any(|mm| mm.id == m.id && mm.voter);
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
            ServerState::Learner => "learner",
            ServerState::Follower if is_learner => "learner",
            ServerState::Follower => "follower",
        };
        let replication = m.replication.as_ref().map(|r| {
            r.iter()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, matched)| {
                    let matched_index = matched.as_ref().map_or(0, |l| l.index);
                    (*id, Replication { matched_index, lag: last_log_index.saturating_sub(matched_index) })
                })
                .collect()
        });
        Status {
            id: m.id,
            cluster_name: self.node.config().cluster_name.clone(),
            state,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index,
            committed_index: m.local_committed.as_ref().map_or(0, |l| l.index),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
            purged_index: m.purged.as_ref().map_or(0, |l| l.index),
            revision: self.revision(),
            members,
            replication,
        }
    }

    /// A hash of every key and value here (serializable), to compare replicas.
    /// A hash of this member's current keys and values: (hash, its revision, the last
    /// compaction's revision, 0 if none).
    pub fn hash_kv(&self) -> Result<(u32, i64, i64), ApiError> {
        // One key at a time: the store may be far larger than memory.
        let (h, revision, compacted) = self.node.read_local(|_, txn| {
            let mut h = crc32fast::Hasher::new();
            let revision = store::for_each_kv(txn, |kv| {
                for part in [&kv.key, &kv.value] {
                    h.update(&(part.len() as u64).to_le_bytes());
                    h.update(part);
                }
                for n in [kv.create_revision, kv.mod_revision, kv.version] {
                    h.update(&n.to_le_bytes());
                }
            });
            (h, revision, store::compact_revision(txn))
        })?;
        Ok((h.finalize(), revision?, compacted?))
    }

    /// Whether this node can serve: it knows a leader and its store is readable.
    pub fn health(&self) -> Result<(), String> {
        let m = self.node.metrics();
        if let Err(e) = &m.running_state {
            return Err(format!("raft stopped: {e}"));
        }
        if m.current_leader.is_none() {
            return Err("no leader".into());
        }
        self.node.check_readable().map_err(|e| e.to_string())
    }

    /// Whether this node is a member that has published its client address and applied what its
    /// leader had committed.
    pub fn ready(&self) -> Result<(), String> {
        self.health()?;
        let m = self.node.metrics();
        let Some(me) = m.membership_config.membership().get_node(&m.id) else {
            return Err("not a member of any cluster yet".into());
        };
        // As etcd, which is ready only once it has published its attributes: until then
        // `member list` shows this node unstarted and clients cannot find it.
        if me.client_addr != self.advertise.client_addr {
            return Err("client address not published in the membership yet".into());
        }
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        let committed = m.local_committed.as_ref().map_or(0, |l| l.index);
        if applied < committed {
            return Err(format!("catching up: applied {applied} of {committed}"));
        }
        Ok(())
    }

    pub fn count(&self, grpc: bool, failed: bool) {
        let c = &self.counters;
        let (total, errors) =
            if grpc { (&c.grpc_requests, &c.grpc_errors) } else { (&c.http_requests, &c.http_errors) };
        total.fetch_add(1, Ordering::Relaxed);
        if failed {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Auth: users, roles, permissions, tokens (etcd's `Auth` service; see `crate::auth`)

/// A refusal by etcd's auth rules.
fn auth_err(e: AuthError) -> ApiError {
    ApiError::Kv(KvError::Auth(e))
}

/// Seconds since the Unix epoch on this node's clock (token expiry).
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl KvApi {
    /// Proposes an auth change on behalf of `user` (None: auth is off here; else the apply
    /// refuses it unless the user holds role `root`); answers the store's (KV) revision for the
    /// response header.
    async fn auth_write(&self, user: Option<&Caller>, cmd: AuthCommand) -> Result<i64, ApiError> {
        self.check_running()?;
        let cmd = match user {
            Some(u) => KvCommand::AsUser { caller: Some(u.clone()), cmd: Box::new(KvCommand::Auth(cmd)) },
            None => KvCommand::Auth(cmd),
        };
        let resp = self.propose_counted(cmd).await?;
        match resp.result {
            Ok(OpResult::Auth { .. }) => Ok(resp.revision),
            Ok(other) => Err(ApiError::Internal(format!("auth change answered {other:?}"))),
            Err(e) => Err(ApiError::Kv(e)),
        }
    }

    /// Reads the auth state linearizably (as a range without `serializable`): on a follower, after
    /// the leader's read index is applied here. Answers the store's revision with `f`'s result.
    async fn auth_read<R>(
        &self,
        f: impl FnOnce(&AuthView) -> Result<R, keel::StateMachineError>,
    ) -> Result<(i64, R), ApiError> {
        self.node.linearize().await?;
        let read = self.node.read_local(|_, txn| {
            let revision = store::revision(txn)?;
            Ok::<_, keel::StateMachineError>((revision, f(&AuthView::open(txn)?)?))
        })?;
        Ok(read?)
    }

    /// bcrypt of `password` at this node's cost, off the async threads (tens of milliseconds).
    async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        let cost = self.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| ApiError::Internal(format!("password hashing stopped: {e}")))?
            .map_err(|e| ApiError::BadRequest(format!("password cannot be hashed: {e}")))
    }

    pub async fn auth_enable(&self, user: Option<&Caller>) -> Result<i64, ApiError> {
        // The token key, if this is the cluster's first enable (a later one keeps the first key).
        let mut secret = [0u8; auth::SECRET_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| ApiError::Internal("no randomness for the token key".into()))?;
        self.auth_write(user, AuthCommand::Enable { secret }).await
    }

    pub async fn auth_disable(&self, user: Option<&Caller>) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::Disable).await
    }

    /// Whether auth is on, and the auth revision (linearizable).
    pub async fn auth_status(&self) -> Result<(i64, AuthStatus), ApiError> {
        self.auth_read(|v| v.status()).await
    }

    /// etcd's `Authenticate`: checks the password against the current state (linearizable) and
    /// answers a token for the user. Nothing goes through Raft: every member can check the token.
    pub async fn authenticate(&self, name: &str, password: String) -> Result<(i64, String), ApiError> {
        let (_, (status, user)) = self.auth_read(|v| Ok((v.status()?, v.user(name)?))).await?;
        if !status.enabled {
            return Err(auth_err(AuthError::AuthNotEnabled));
        }
        let Some((hash, password_revision)) =
            user.and_then(|u| Some((u.password_hash?, u.password_revision)))
        else {
            return Err(auth_err(AuthError::AuthFailed));
        };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .map_err(|e| ApiError::Internal(format!("password check stopped: {e}")))?;
        if !ok.unwrap_or(false) {
            tracing::info!(user = name, "authentication failed");
            return Err(auth_err(AuthError::AuthFailed));
        }
        // Bound to the password just checked: if it changed meanwhile, the token is refused on use
        // (etcd retries its check instead; the client sees the same, a token that fails).
        let expires = unix_now().saturating_add(self.auth_token_ttl.as_secs().max(1));
        let (revision, token) = self.node.read_local(|_, txn| {
            let token = AuthView::open(txn)?.issue_token(name, password_revision, expires)?;
            Ok::<_, keel::StateMachineError>((store::revision(txn)?, token))
        })??;
        Ok((revision, token.ok_or(auth_err(AuthError::AuthNotEnabled))?))
    }

    pub async fn user_add(
        &self,
        user: Option<&Caller>,
        name: &str,
        password: String,
        no_password: bool,
    ) -> Result<i64, ApiError> {
        if name.is_empty() {
            return Err(auth_err(AuthError::UserEmpty));
        }
        let password_hash = if no_password { None } else { Some(self.hash_password(password).await?) };
        self.auth_write(user, AuthCommand::UserAdd { name: name.to_string(), password_hash }).await
    }

    /// The roles of user `name` (linearizable).
    pub async fn user_get(&self, name: &str) -> Result<(i64, Vec<String>), ApiError> {
        let (revision, user) = self.auth_read(|v| v.user(name)).await?;
        Ok((revision, user.ok_or(auth_err(AuthError::UserNotFound))?.roles))
    }

    pub async fn user_list(&self) -> Result<(i64, Vec<String>), ApiError> {
        self.auth_read(|v| v.user_names()).await
    }

    pub async fn user_delete(&self, user: Option<&Caller>, name: &str) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::UserDelete { name: name.to_string() }).await
    }

    pub async fn user_change_password(
        &self,
        user: Option<&Caller>,
        name: &str,
        password: String,
    ) -> Result<i64, ApiError> {
        let password_hash = self.hash_password(password).await?;
        self.auth_write(user, AuthCommand::UserChangePassword { name: name.to_string(), password_hash }).await
    }

    pub async fn user_grant_role(
        &self,
        user: Option<&Caller>,
        name: &str,
        role: &str,
    ) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::UserGrantRole { user: name.to_string(), role: role.to_string() })
            .await
    }

    pub async fn user_revoke_role(
        &self,
        user: Option<&Caller>,
        name: &str,
        role: &str,
    ) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::UserRevokeRole { user: name.to_string(), role: role.to_string() })
            .await
    }

    pub async fn role_add(&self, user: Option<&Caller>, name: &str) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::RoleAdd { name: name.to_string() }).await
    }

    /// The permissions of role `name` (linearizable).
    pub async fn role_get(&self, name: &str) -> Result<(i64, Vec<Permission>), ApiError> {
        let (revision, role) = self.auth_read(|v| v.role(name)).await?;
        Ok((revision, role.ok_or(auth_err(AuthError::RoleNotFound))?.perms))
    }

    pub async fn role_list(&self) -> Result<(i64, Vec<String>), ApiError> {
        self.auth_read(|v| v.role_names()).await
    }

    pub async fn role_delete(&self, user: Option<&Caller>, name: &str) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::RoleDelete { name: name.to_string() }).await
    }

    pub async fn role_grant_permission(
        &self,
        user: Option<&Caller>,
        role: &str,
        perm: Permission,
    ) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::RoleGrantPermission { role: role.to_string(), perm }).await
    }

    pub async fn role_revoke_permission(
        &self,
        user: Option<&Caller>,
        role: &str,
        key: Vec<u8>,
        range_end: Vec<u8>,
    ) -> Result<i64, ApiError> {
        self.auth_write(user, AuthCommand::RoleRevokePermission { role: role.to_string(), key, range_end })
            .await
    }

    /// Proposes `cmd` on behalf of `user` (from [`Self::request_user`]; None: auth is off here):
    /// with a user, the leader's apply judges it on the state then (`KvCommand::AsUser`).
    pub async fn write_as(&self, user: Option<&Caller>, cmd: KvCommand) -> Result<(i64, OpResult), ApiError> {
        match user {
            Some(u) => self.write(KvCommand::AsUser { caller: Some(u.clone()), cmd: Box::new(cmd) }).await,
            None => self.write(cmd).await,
        }
    }

    /// [`Self::range`] for `user`: refused unless the user may read the range, judged in the same
    /// read of the state as the range itself (after the read index, when linearizable).
    pub async fn range_as(
        &self,
        user: Option<&Caller>,
        r: &Range,
        serializable: bool,
    ) -> Result<(i64, RangeResult), ApiError> {
        let Some(user) = user else { return self.range(r, serializable).await };
        self.check_key(&r.key)?;
        if !serializable {
            self.node.linearize().await?;
        }
        let need = Need::Keys(vec![auth::Access {
            key: r.key.clone(),
            range_end: r.range_end.clone(),
            need: auth::PermType::Read,
        }]);
        let budget = self.max_response_bytes;
        let read = self.node.read_local(|_, txn| {
            if let Some(refused) = AuthView::open(txn)?.refusal(Some(user), &need)? {
                return Ok(Err(refused));
            }
            store::range(txn, r, budget).map(Ok)
        })?;
        let (revision, result) = read?.map_err(auth_err)?;
        Ok((revision, result.map_err(ApiError::Kv)?))
    }

    /// Refuses unless `user` (None: auth is off here) may do what `need` says, on this node's
    /// applied state: for what is not proposed (watch creation, admin calls).
    pub fn authorize(&self, user: Option<&Caller>, need: &Need) -> Result<(), ApiError> {
        if user.is_none() {
            return Ok(());
        }
        match self.node.read_local(|_, txn| AuthView::open(txn)?.refusal(user, need))?? {
            None => Ok(()),
            Some(e) => Err(auth_err(e)),
        }
    }

    /// `UserGet`'s rule (etcd): root, or the user asking about itself.
    pub fn authorize_user_get(&self, user: Option<&Caller>, name: &str) -> Result<(), ApiError> {
        if user.is_some_and(|u| u.name == name) {
            return Ok(());
        }
        self.authorize(user, &Need::Root)
    }

    /// `RoleGet`'s rule (etcd): root, or a user holding the role.
    pub fn authorize_role_get(&self, user: Option<&Caller>, role: &str) -> Result<(), ApiError> {
        let Some(u) = user else { return Ok(()) };
        let holds = self.node.read_local(|_, txn| {
            AuthView::open(txn)?
                .user(&u.name)
                .map(|rec| rec.is_some_and(|rec| rec.roles.iter().any(|r| r == role)))
        })??;
        if holds {
            return Ok(());
        }
        self.authorize(user, &Need::Root)
    }

    /// Whether auth is on in this node's applied state. Read once per auth change (see
    /// `KvStore::auth_epoch`), not per request: a read of the state commits the batch being
    /// applied, which every request while auth is off would otherwise force.
    pub fn auth_enabled_here(&self) -> Result<bool, ApiError> {
        let epoch = self.node.state_machine().auth_epoch();
        let seen = *self.auth_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, on)) = seen {
            if at == epoch {
                return Ok(on);
            }
        }
        let on = self.node.read_local(|_, txn| AuthView::open(txn)?.status())??.enabled;
        // Kept only if no auth change was applied meanwhile (else the read may predate it).
        if self.node.state_machine().auth_epoch() == epoch {
            *self.auth_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((epoch, on));
        }
        Ok(on)
    }

    /// Who a request is from while auth is on, from its token, else from its verified TLS client
    /// certificate's CN; None while auth is off (everything is allowed). Judged on this node's
    /// applied state (serializable), as etcd judges tokens locally.
    pub fn request_user(
        &self,
        token: Option<&str>,
        cert_name: Option<&str>,
    ) -> Result<Option<Caller>, ApiError> {
        if !self.auth_enabled_here()? {
            return Ok(None);
        }
        let now = unix_now();
        let judged = self.node.read_local(|_, txn| {
            let view = AuthView::open(txn)?;
            if !view.status()?.enabled {
                return Ok::<_, keel::StateMachineError>(Ok(None));
            }
            Ok(match (token, cert_name) {
                (Some(token), _) => view.check_token(token, now)?.map(Some),
                (None, Some(cn)) if !cn.is_empty() => Ok(Some(Caller::named(cn))),
                (None, _) => Err(AuthError::UserEmpty),
            })
        })??;
        judged.map_err(auth_err)
    }
}
