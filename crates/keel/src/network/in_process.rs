//! An in-process transport: nodes in one process reach each other through a shared router.
//!
//! It runs the same [`RaftService`] path a network transport does, including snapshot streaming in
//! chunks, and lets tests cut nodes off (`isolate`) to simulate partitions.

use std::collections::HashMap;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;

use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::OptionalSend;

use super::snapshot_chunks;
use super::BoxFuture;
use super::RaftService;
use crate::forward::ForwardError;
use crate::forward::ForwardReply;
use crate::forward::ForwardRequest;
use crate::forward::Forwarder;
use crate::storage::snapshot::SnapshotFile;
use crate::types::KeelTypes;
use crate::types::NodeId;
use crate::types::NodeInfo;
use crate::types::Vote;

#[derive(Default)]
struct Routes {
    nodes: HashMap<NodeId, Arc<dyn RaftService>>,
    isolated: HashSet<NodeId>,
}

/// Connects the nodes of one process. Cloning shares the same routes.
#[derive(Clone, Default)]
pub struct InProcessRouter {
    routes: Arc<Mutex<Routes>>,
}

impl InProcessRouter {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().expect("router mutex poisoned by an earlier panic")
    }

    /// Makes `service` reachable as node `id` (replacing an earlier registration).
    pub fn register(&self, id: NodeId, service: Arc<dyn RaftService>) {
        self.lock().nodes.insert(id, service);
    }

    /// Makes node `id` unreachable, as if its process had died.
    pub fn unregister(&self, id: NodeId) {
        self.lock().nodes.remove(&id);
    }

    /// Cuts node `id` off from every other node, both directions.
    pub fn isolate(&self, id: NodeId) {
        self.lock().isolated.insert(id);
    }

    /// Reconnects an isolated node.
    pub fn heal(&self, id: NodeId) {
        self.lock().isolated.remove(&id);
    }

    /// The network factory node `from` sends with.
    pub fn network(&self, from: NodeId) -> InProcessNetwork {
        InProcessNetwork { router: self.clone(), from }
    }

    fn route(&self, from: NodeId, to: NodeId) -> Result<Arc<dyn RaftService>, Unreachable<KeelTypes>> {
        let routes = self.lock();
        if routes.isolated.contains(&from) || routes.isolated.contains(&to) {
            return Err(Unreachable::from_string(format!("link {from} -> {to} is cut")));
        }
        routes
            .nodes
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::from_string(format!("node {to} is not running")))
    }
}

/// The [`RaftNetworkFactory`] of one node on an [`InProcessRouter`].
#[derive(Clone)]
pub struct InProcessNetwork {
    router: InProcessRouter,
    from: NodeId,
}

impl RaftNetworkFactory<KeelTypes> for InProcessNetwork {
    type Network = InProcessConnection;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Self::Network {
        InProcessConnection { router: self.router.clone(), from: self.from, target }
    }
}

/// One node's client to one peer.
pub struct InProcessConnection {
    router: InProcessRouter,
    from: NodeId,
    target: NodeId,
}

impl InProcessConnection {
    fn service(&self) -> Result<Arc<dyn RaftService>, Unreachable<KeelTypes>> {
        self.router.route(self.from, self.target)
    }
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<KeelTypes> {
    Unreachable::from_string(e)
}

impl RaftNetworkV2<KeelTypes> for InProcessConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<KeelTypes>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<KeelTypes>, RPCError<KeelTypes>> {
        let svc = self.service()?;
        Ok(svc.append_entries(rpc).await.map_err(unreachable)?)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<KeelTypes>,
        _option: RPCOption,
    ) -> Result<VoteResponse<KeelTypes>, RPCError<KeelTypes>> {
        let svc = self.service()?;
        Ok(svc.vote(rpc).await.map_err(unreachable)?)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<KeelTypes>,
        _option: RPCOption,
    ) -> Result<VoteResponse<KeelTypes>, RPCError<KeelTypes>> {
        let svc = self.service()?;
        Ok(svc.pre_vote(rpc).await.map_err(unreachable)?)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<KeelTypes, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<KeelTypes>, StreamingError<KeelTypes>> {
        let svc = self.service()?;
        let chunks = snapshot_chunks(snapshot.snapshot);
        tokio::select! {
            res = svc.install_snapshot(vote, snapshot.meta, chunks) => Ok(res.map_err(unreachable)?),
            closed = cancel => Err(closed.into()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<KeelTypes>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<KeelTypes>, RPCError<KeelTypes>> {
        let svc = self.service()?;
        Ok(svc.transfer_leader(req).await.map_err(unreachable)?)
    }
}

impl Forwarder for InProcessNetwork {
    fn forward<'a>(
        &'a self,
        target: NodeId,
        _node: &'a NodeInfo,
        req: ForwardRequest,
    ) -> BoxFuture<'a, Result<ForwardReply, ForwardError>> {
        Box::pin(async move {
            let svc =
                self.router.route(self.from, target).map_err(|e| ForwardError::NotSent(e.to_string()))?;
            // In process, a request is either served or refused before anything happens.
            svc.forward(self.from, req).await.map_err(|e| ForwardError::NotSent(e.to_string()))
        })
    }
}
