//! A running keeld node: storage and Raft, the peer server, the client server (etcd gRPC + HTTP on
//! one address), cluster bootstrap, and an orderly shutdown.
//!
//! Shutdown order: stop client ingress (requests in flight finish), hand leadership to another
//! voter if this node leads, stop the peer server, shut Raft down, close storage.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel::network::grpc;
use keel::network::grpc::GrpcNetwork;
use keel::network::grpc::PeerServer;
use keel::openraft::ChangeMembers;
use keel::Node;
use keel::NodeInfo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::KvApi;
use crate::config::bare_addr;
use crate::config::ClusterState;
use crate::config::KeeldConfig;
use crate::etcd::pb::etcdserverpb as rpc;
use crate::etcd::EtcdService;
use crate::etcd::GRPC_OVERHEAD_BYTES;
use crate::http;
use crate::store::KvStore;

/// Why keeld could not start (or stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] keel::config::ConfigError),
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind { what: &'static str, addr: String, source: std::io::Error },
    #[error(transparent)]
    Start(#[from] keel::StartError),
    #[error("cannot form the initial cluster: {0}")]
    Bootstrap(String),
    #[error("shutdown: {0}")]
    Shutdown(String),
}

/// A running node and its servers.
pub struct Server {
    pub api: KvApi,
    /// The bound client address (the real port when the config asked for port 0).
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    stop_client: oneshot::Sender<()>,
    client_server: JoinHandle<std::io::Result<()>>,
    stop_peer: oneshot::Sender<()>,
    peer_server: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, RunError> {
    TcpListener::bind(bare_addr(addr)).await.map_err(|source| RunError::Bind {
        what,
        addr: addr.to_string(),
        source,
    })
}

impl Server {
    /// Opens storage, starts Raft and both servers, and forms the initial cluster if this node
    /// founds it. Returns once the node serves (it may not have a leader yet).
    pub async fn start(config: KeeldConfig) -> Result<Server, RunError> {
        config.validate()?;
        // Listen first: a taken port is the most common startup failure, and must not leave a
        // half-started node behind.
        let peer_listener = bind("peer", &config.peer_addr).await?;
        let client_listener = bind("client", &config.client_addr).await?;
        let peer_addr = peer_listener.local_addr().map_err(|source| RunError::Bind {
            what: "peer",
            addr: config.peer_addr.clone(),
            source,
        })?;
        let client_addr = client_listener.local_addr().map_err(|source| RunError::Bind {
            what: "client",
            addr: config.client_addr.clone(),
            source,
        })?;
        let advertise = NodeInfo::new(peer_addr.to_string(), client_addr.to_string());

        let node_config = config.node_config();
        let network = GrpcNetwork::new(node_config.cluster_name.clone(), node_config.id);
        let node = Arc::new(Node::start(node_config, KvStore, network).await?);

        let (stop_peer, peer_stopped) = oneshot::channel::<()>();
        let peer = PeerServer::new(config.cluster_name.clone(), config.id, node.service());
        let peer_server = tokio::spawn(grpc::serve(peer_listener, peer, async {
            let _ = peer_stopped.await;
        }));

        let api = KvApi::new(node.clone(), advertise.clone(), config.max_request_bytes, config.max_key_bytes);
        let (stop_client, client_stopped) = oneshot::channel::<()>();
        let router = client_router(api.clone());
        let client_server = tokio::spawn(async move {
            axum::serve(client_listener, router)
                .with_graceful_shutdown(async {
                    let _ = client_stopped.await;
                })
                .await
        });

        let mut background = Vec::new();
        bootstrap(&config, &node, &advertise).await?;
        background.push(tokio::spawn(publish_client_addr(node.clone(), advertise)));
        tracing::info!(id = config.id, %client_addr, %peer_addr, "keeld serving");
        Ok(Server {
            api,
            client_addr,
            peer_addr,
            stop_client,
            client_server,
            stop_peer,
            peer_server,
            background,
        })
    }

    pub fn node(&self) -> &Arc<Node<KvStore>> {
        &self.api.node
    }

    /// Stops in order: client ingress, leadership hand-over, peer server, Raft, storage.
    pub async fn shutdown(self) -> Result<(), RunError> {
        let Server { api, stop_client, client_server, stop_peer, peer_server, background, .. } = self;
        let id = api.node.id();
        tracing::info!(id, "shutting down: stopping client ingress");
        let _ = stop_client.send(());
        // Requests in flight get a bounded time to finish.
        match tokio::time::timeout(Duration::from_secs(10), client_server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(id, "client server: {e}"),
            Ok(Err(e)) => tracing::warn!(id, "client server task: {e}"),
            Err(_) => tracing::warn!(id, "client requests still running after 10 s; stopping anyway"),
        }
        for task in background {
            task.abort();
        }
        hand_over_leadership(&api.node).await;
        tracing::info!(id, "stopping peer server");
        let _ = stop_peer.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), peer_server).await;
        let node = api.node.clone();
        drop(api);
        let node = Arc::try_unwrap(node).map_err(|_| {
            RunError::Shutdown("the node is still in use by a request that did not finish".into())
        })?;
        tracing::info!(id, "stopping raft and closing storage");
        node.shutdown().await.map_err(RunError::Shutdown)
    }
}

/// The client address's router: etcd gRPC services and the HTTP API.
fn client_router(api: KvApi) -> axum::Router {
    let svc = EtcdService::new(api.clone());
    let limit = api.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let routes = tonic::service::Routes::new(
        rpc::kv_server::KvServer::new(svc.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(rpc::cluster_server::ClusterServer::new(svc.clone()))
    .add_service(rpc::maintenance_server::MaintenanceServer::new(svc));
    // Bodies over the limit are refused by the HTTP handlers with a JSON 413.
    let body_limit = axum::extract::DefaultBodyLimit::max(api.max_request_bytes + 1);
    routes.into_axum_router().merge(http::router(api).layer(body_limit)).fallback(http::fallback)
}

/// Forms the initial cluster if this node's data dir is empty and it is the founding node that
/// initializes (the lowest id in `initial_cluster`): exactly one initialization, whatever the
/// start order. A data dir that already holds a cluster ignores `initial_cluster`.
async fn bootstrap(config: &KeeldConfig, node: &Node<KvStore>, me: &NodeInfo) -> Result<(), RunError> {
    let initialized = node.raft().is_initialized().await.map_err(|e| RunError::Bootstrap(e.to_string()))?;
    if initialized {
        tracing::info!(id = config.id, "data dir holds a cluster; initial_cluster is ignored");
        return Ok(());
    }
    if config.initial_cluster_state == ClusterState::Existing {
        tracing::info!(id = config.id, "waiting to be added to an existing cluster");
        return Ok(());
    }
    let members = config.initial_members()?;
    let first = members.keys().next().copied();
    if first != Some(config.id) {
        tracing::info!(id = config.id, initializer = ?first, "waiting for the founding node to initialize the cluster");
        return Ok(());
    }
    let members = members
        .into_iter()
        .map(|(id, peer)| {
            let info = if id == config.id { me.clone() } else { NodeInfo::new(peer, "") };
            (id, info)
        })
        .collect();
    tracing::info!(id = config.id, "initializing the cluster");
    node.initialize(members).await.map_err(|e| RunError::Bootstrap(e.to_string()))
}

/// Records this node's client address in the membership once it is a member (founding members
/// other than the initializer, and added members, start with an empty one), so `member list`
/// shows it and clients can find it.
async fn publish_client_addr(node: Arc<Node<KvStore>>, me: NodeInfo) {
    let id = node.id();
    loop {
        let m = node.metrics();
        let recorded = m.membership_config.membership().get_node(&id).cloned();
        match recorded {
            Some(info) if info.client_addr == me.client_addr => return,
            Some(info) if m.current_leader.is_some() => {
                let updated = NodeInfo::new(info.peer_addr.clone(), me.client_addr.clone());
                let change = ChangeMembers::SetNodes([(id, updated)].into_iter().collect());
                match node.change_members(change, true).await {
                    Ok(()) => {
                        tracing::info!(id, client_addr = %me.client_addr, "published client address");
                        return;
                    }
                    Err(e) => tracing::debug!(id, "publishing client address: {e}; will retry"),
                }
            }
            _ => {}
        }
        // Wait for a membership or leader change (or a second), then look again.
        let (leader, members) = (m.current_leader, m.membership_config.clone());
        let _ = node
            .wait_for(Duration::from_secs(1), "membership change", move |m| {
                m.current_leader != leader || m.membership_config != members
            })
            .await;
    }
}

/// If this node leads, hands leadership to the most caught-up other voter, so the cluster does not
/// wait out an election timeout. Best effort: bounded by a few election timeouts.
async fn hand_over_leadership(node: &Node<KvStore>) {
    let m = node.metrics();
    if m.current_leader != Some(m.id) {
        return;
    }
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().filter(|v| *v != m.id).collect();
    let best = m.replication.as_ref().and_then(|r| {
        voters.iter().copied().max_by_key(|v| r.get(v).cloned().flatten().map_or(0, |l| l.index))
    });
    let Some(to) = best else { return };
    tracing::info!(id = m.id, to, "handing leadership over before shutdown");
    if let Err(e) = node.transfer_leader(to).await {
        tracing::warn!(id = m.id, to, "leadership hand-over failed: {e}");
    }
}

/// Runs a node until `shutdown` completes, then stops it in order.
pub async fn run(config: KeeldConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let server = Server::start(config).await?;
    shutdown.await;
    server.shutdown().await
}
