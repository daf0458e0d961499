//! A running keeld node: storage and Raft, the peer server, the client server (etcd gRPC + HTTP on
//! one address), cluster bootstrap, and an orderly shutdown.
//!
//! Shutdown order: stop client ingress (requests in flight finish), hand leadership to another
//! voter if this node leads, stop the peer server, shut Raft down, close storage.
//!
//! [`run`] stops the node on a signal, on its removal from the cluster, and when Raft stops on its
//! own with a fatal error (storage I/O such as ENOSPC, a failed apply): a node whose Raft stopped
//! serves nothing and recovers nothing by waiting, so it stops in the same order and `run` answers
//! [`RunError::Fatal`] (keeld exits non-zero and a supervisor restarts it).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel::network::grpc;
use keel::network::grpc::GrpcNetwork;
use keel::network::grpc::PeerServer;
use keel::openraft::ChangeMembers;
use keel::Node;
use keel::NodeId;
use keel::NodeInfo;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::KvApi;
use crate::client_port::ClientPort;
use crate::client_port::PortCounters;
use crate::compaction;
use crate::compaction::AutoCompaction;
use crate::config::bare_addr;
use crate::config::ClusterState;
use crate::config::KeeldConfig;
use crate::etcd::health;
use crate::etcd::pb;
use crate::etcd::pb::etcdserverpb as rpc;
use crate::etcd::EtcdService;
use crate::etcd::GRPC_OVERHEAD_BYTES;
use crate::history;
use crate::http;
use crate::store;
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
    #[error("TLS: {0}")]
    Tls(#[from] keel::tls::TlsError),
    #[error("cannot join the cluster through {via}: {reason}")]
    Join { via: String, reason: String },
    /// This node was removed from its cluster; its data dir must not be used to rejoin.
    #[error("{0}")]
    Removed(String),
    /// Raft stopped on its own: the cause is openraft's fatal error (e.g. the log or the state
    /// machine database could not be written). The node was stopped in order.
    #[error("raft stopped with a fatal error: {0}")]
    Fatal(String),
    #[error("shutdown: {0}")]
    Shutdown(String),
}

/// Written to the data dir when the node learns it was removed from the cluster: a restart on the
/// same data dir then refuses, rather than come back as a stale member nobody replicates to.
pub const REMOVED_MARKER: &str = "REMOVED";

/// A running node and its servers.
pub struct Server {
    pub api: KvApi,
    /// The bound client address (the real port when the config asked for port 0).
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// What the client port has accepted, refused and timed out (`/metrics`).
    pub port_counters: Arc<PortCounters>,
    stop_client: oneshot::Sender<()>,
    client_server: JoinHandle<()>,
    stop_peer: oneshot::Sender<()>,
    peer_server: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    leave_on_shutdown: bool,
    /// Completes if this node is removed from the cluster (see [`Server::removed`]).
    removed: Option<oneshot::Receiver<String>>,
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
    pub async fn start(mut config: KeeldConfig) -> Result<Server, RunError> {
        let stored = if config.data_dir.as_os_str().is_empty() {
            None // validate() names the missing field
        } else {
            keel::storage::sm_store::stored_node_id(&config.data_dir)
                .map_err(|e| RunError::Start(keel::StartError::StateMachine(e)))?
        };
        // A data dir that holds a cluster ignores initial_cluster (as etcd does), so a member that
        // joined later may restart with the founders' list, which does not name it: the list is
        // checked only if the cluster turns out not to be formed yet (see `bootstrap`).
        let initial_cluster = match stored {
            Some(_) => std::mem::take(&mut config.initial_cluster),
            None => String::new(),
        };
        config.validate()?;
        let marker = config.data_dir.join(REMOVED_MARKER);
        if let Ok(why) = std::fs::read_to_string(&marker) {
            return Err(RunError::Removed(format!(
                "{} Refusing to start on {}: remove the data dir to add this machine again as a new member.",
                why.trim(),
                config.data_dir.display()
            )));
        }
        match (config.id, stored) {
            (0, Some(id)) => config.id = id,
            (0, None) if config.joins() => {} // the cluster assigns one below
            // A brand-new node given no id founds a cluster as node 1 (`keeld` with no flags).
            (0, None) => config.id = 1,
            _ => {}
        }
        // With the id known, check what depends on it (e.g. initial_cluster lists this node).
        config.validate()?;
        if stored.is_some() {
            config.initial_cluster = initial_cluster;
        }
        // Certificates next: a file that does not load must stop keeld before anything starts.
        let peer_tls_config = config.node_config().peer_tls;
        let client_tls = config.client_tls()?;
        let peer_tls = if peer_tls_config.enabled() {
            Some((peer_tls_config.server()?, peer_tls_config.client()?))
        } else {
            None
        };
        let member_tls = |alpn: &[&[u8]]| match config.member_client_tls(alpn) {
            Ok(None) => None,
            Ok(Some(tls)) => Some(Ok(tls)),
            Err(e) => Some(Err(e.to_string())),
        };
        let tls_settings = crate::api::TlsSettings {
            client: client_tls.is_some(),
            peer: peer_tls.is_some(),
            member_grpc: member_tls(keel::tls::ALPN_H2),
        };
        let member_http = member_tls(&[b"http/1.1"]);
        if let Some(Err(why)) = &member_http {
            tracing::warn!("{why}: lease keep-alives sent to a follower will fail, and so will --join");
        }
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
        let joining = stored.is_none() && config.joins();
        if joining {
            config.id = join_cluster(&config, &advertise, member_http.clone()).await?;
            tracing::info!(id = config.id, via = %config.join, "added to the cluster as a learner");
        }

        let node_config = config.node_config();
        let mut network = GrpcNetwork::new(node_config.cluster_name.clone(), node_config.id)
            .with_append_timeout(Duration::from_millis(node_config.raft.election_timeout_max_ms));
        if let Some((_, dial)) = &peer_tls {
            network = network.with_tls(dial.clone());
        }
        let max_peer_message_bytes = node_config.max_peer_message_bytes();
        let node = Arc::new(Node::start(node_config, config.state_machine(), network).await?);
        // The watchers start from what is applied now (applies since are published to them).
        let hub = node.state_machine().hub().clone();
        let applied = node
            .read_local(|_, txn| {
                Ok::<_, keel::StateMachineError>((store::revision(txn)?, history::compact_progress(txn)?))
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match applied {
            Ok((revision, progress)) => hub.observe(revision, progress),
            Err(e) => return Err(RunError::Fatal(format!("reading the applied revision: {e}"))),
        }
        let auto_compaction =
            AutoCompaction::parse(config.auto_compaction_mode, &config.auto_compaction_retention).map_err(
                |e| keel::config::ConfigError::Invalid { field: "auto_compaction_retention", reason: e },
            )?;

        let (stop_peer, peer_stopped) = oneshot::channel::<()>();
        let peer = PeerServer::new(config.cluster_name.clone(), config.id, node.service())
            .with_max_message_bytes(max_peer_message_bytes);
        let peer_stop = async {
            let _ = peer_stopped.await;
        };
        let peer_server = match &peer_tls {
            None => tokio::spawn(grpc::serve(peer_listener, peer, peer_stop)),
            Some((serve, _)) => tokio::spawn(grpc::serve_tls(peer_listener, peer, serve.clone(), peer_stop)),
        };

        let mut api =
            KvApi::new(node.clone(), advertise.clone(), config.max_request_bytes, config.max_key_bytes);
        api.quota_backend_bytes = config.quota_backend_bytes();
        if api.quota_backend_bytes > crate::config::MAX_RECOMMENDED_QUOTA_BACKEND_BYTES {
            tracing::warn!(
                quota = api.quota_backend_bytes,
                "quota_backend_bytes is above the 8 GiB etcd recommends as a maximum"
            );
        }
        api.max_response_bytes = config.max_response_bytes;
        api.tls = tls_settings;
        api.bcrypt_cost = config.bcrypt_cost;
        api.auth_token_ttl = Duration::from_secs(config.auth_token_ttl);
        api.watch_progress_notify_interval = Duration::from_millis(config.watch_progress_notify_interval_ms);
        let port_counters = Arc::new(PortCounters::default());
        api.port = port_counters.clone();
        let (stop_client, client_stopped) = oneshot::channel::<()>();
        let port = ClientPort {
            listener: client_listener,
            limits: config.client_limits(),
            counters: port_counters.clone(),
            tls: client_tls,
        };
        let client_server = tokio::spawn(port.serve(client_router(api.clone()), async {
            let _ = client_stopped.await;
        }));

        if !joining {
            bootstrap(&config, &node, &advertise).await?;
        }
        let mut background = vec![
            tokio::spawn(hub.run_sync(history_reader(node.clone()))),
            tokio::spawn(compaction::compactor(node.clone())),
            tokio::spawn(crate::lease::keep_time(api.clone())),
            tokio::spawn(compaction::auto_compact(node.clone(), auto_compaction)),
            tokio::spawn(count_leader_changes(node.clone(), api.counters.clone())),
        ];
        background.push(tokio::spawn(publish_client_addr(node.clone(), advertise)));
        if config.joins() {
            background.push(tokio::spawn(promote_when_caught_up(node.clone())));
        }
        let (removed_tx, removed) = oneshot::channel();
        let ask_with = member_http.and_then(Result::ok);
        background.push(tokio::spawn(watch_removal(node.clone(), marker, removed_tx, ask_with)));
        tracing::info!(id = config.id, %client_addr, %peer_addr, "keeld serving");
        Ok(Server {
            api,
            client_addr,
            peer_addr,
            port_counters,
            stop_client,
            client_server,
            stop_peer,
            peer_server,
            background,
            leave_on_shutdown: config.leave_on_shutdown,
            removed: Some(removed),
        })
    }

    pub fn node(&self) -> &Arc<Node<KvStore>> {
        &self.api.node
    }

    /// Completes with the reason once this node learns it was removed from the cluster (it then
    /// has nothing left to serve); never completes otherwise.
    pub fn removed(&mut self) -> impl Future<Output = String> + use<> {
        let rx = self.removed.take();
        async move {
            match rx {
                Some(rx) => match rx.await {
                    Ok(why) => why,
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        }
    }

    /// Stops in order: client ingress, leadership hand-over, peer server, Raft, storage.
    pub async fn shutdown(self) -> Result<(), RunError> {
        let Server {
            api,
            stop_client,
            mut client_server,
            stop_peer,
            peer_server,
            background,
            leave_on_shutdown,
            ..
        } = self;
        let id = api.node.id();
        tracing::info!(id, "shutting down: stopping client ingress");
        let _ = stop_client.send(());
        // Watch streams never finish on their own: end them now (clients resume elsewhere).
        api.hub().close();
        // Requests in flight get a bounded time to finish.
        match tokio::time::timeout(Duration::from_secs(10), &mut client_server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(id, "client server task: {e}"),
            Err(_) => {
                tracing::warn!(id, "client requests still running after 10 s; closing their connections");
                // Dropping the task drops every connection it owns.
                client_server.abort();
                let _ = client_server.await;
            }
        }
        // Background tasks hold the node: stop them and wait until they are gone.
        for task in background {
            task.abort();
            let _ = task.await;
        }
        if let Err(fatal) = &api.node.metrics().running_state {
            tracing::info!(id, "raft has stopped ({fatal}): no leadership hand-over");
        } else if leave_on_shutdown {
            leave(&api).await;
        } else {
            hand_over_leadership(&api.node).await;
        }
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

/// What the watch hub's catch-up loop reads: whole revisions of history from a revision on, with
/// the last revision covered and the compaction revision, from one read of the applied state.
fn history_reader(
    node: Arc<Node<KvStore>>,
) -> impl Fn(i64, usize) -> Result<(Vec<history::Revision>, i64, i64), String> + Send + Sync + Clone + 'static
{
    move |from, max_events| {
        let read = node.read_local(|_, txn| {
            let (revisions, last) = history::read_events(txn, from, max_events, true)?;
            Ok::<_, keel::StateMachineError>((revisions, last, store::compact_revision(txn)?))
        });
        read.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
    }
}

/// Counts each new leader this node learns of (etcd's `leader_changes_seen`: the first one too),
/// from openraft's server metrics, until the node stops.
async fn count_leader_changes(node: Arc<Node<KvStore>>, counters: Arc<crate::api::Counters>) {
    use keel::openraft::async_runtime::WatchReceiver;
    // The server metrics change with votes and membership only, not with every append.
    let mut metrics = node.raft().server_metrics();
    let mut known = None;
    loop {
        let leader = metrics.borrow_watched().current_leader;
        if leader.is_some() && leader != known {
            counters.leader_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if leader.is_some() {
            known = leader;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The client address's router: etcd gRPC services, etcd's JSON gateway on them, and the HTTP API.
fn client_router(api: KvApi) -> axum::Router {
    let svc = EtcdService::new(api.clone());
    let limit = api.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let routes = tonic::service::Routes::new(
        rpc::kv_server::KvServer::new(svc.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        rpc::watch_server::WatchServer::new(svc.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(rpc::lease_server::LeaseServer::new(svc.clone()))
    .add_service(pb::v3lockpb::lock_server::LockServer::new(svc.clone()))
    .add_service(pb::v3electionpb::election_server::ElectionServer::new(svc.clone()))
    .add_service(rpc::cluster_server::ClusterServer::new(svc.clone()))
    .add_service(rpc::auth_server::AuthServer::new(svc.clone()))
    .add_service(rpc::maintenance_server::MaintenanceServer::new(svc))
    .add_service(health::HealthServer::new(health::HealthService::new(api.clone())));
    // Bodies over the limit are refused by the HTTP handlers with a JSON 413.
    let body_limit = axum::extract::DefaultBodyLimit::max(api.max_request_bytes + 1);
    let grpc_metrics =
        axum::middleware::from_fn_with_state(api.grpc_metrics.clone(), crate::metrics::grpc_layer);
    // etcd's grpc-gateway routes bound their bodies themselves (a JSON message is larger than
    // its protobuf form), as gRPC requests are bounded by their decoding limit.
    let gateway = crate::gateway::router(&api);
    routes
        .into_axum_router()
        .layer(grpc_metrics)
        .merge(http::router(api).layer(body_limit))
        .merge(gateway)
        .fallback(http::fallback)
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

/// Leaves the cluster before shutting down: hands leadership over if this node leads, then has
/// the (new) leader remove it. Best effort: a failure is logged and shutdown goes on.
async fn leave(api: &KvApi) {
    let id = api.node.id();
    hand_over_leadership(&api.node).await;
    tracing::info!(id, "leaving the cluster");
    match api.remove_member(id).await {
        Ok(()) => {
            tracing::info!(id, "removed from the cluster");
            let marker = api.node.config().data_dir.join(REMOVED_MARKER);
            let why =
                format!("Node {id} left cluster {:?} (--leave-on-shutdown).", api.node.config().cluster_name);
            if let Err(e) = std::fs::write(&marker, format!("{why}\n")) {
                tracing::error!("cannot write {}: {e}", marker.display());
            }
        }
        Err(e) => tracing::warn!(id, "could not leave the cluster: {e}"),
    }
}

/// Asks a member (at `config.join`, a client address) to add this node as a learner; answers the
/// node id (the configured one, or one the cluster assigned).
///
/// A node is usually started while its cluster is busy: electing a leader, or with the member it
/// names restarting. What cannot last (no answer, no leader, an outcome the member could not
/// learn: HTTP 5xx) is asked again, with backoff, for up to [`JOIN_DEADLINE`]; the cluster
/// answers a repeated join with the same id (`KvApi::join`), so a retry of a join that was carried
/// out is harmless. A refusal (4xx: another cluster, an address a voter holds) is final at once.
async fn join_cluster(
    config: &KeeldConfig,
    me: &NodeInfo,
    tls: Option<Result<Arc<keel::tls::ClientTls>, String>>,
) -> Result<NodeId, RunError> {
    let via = bare_addr(&config.join).to_string();
    let tls = match tls {
        None if config.join.trim().starts_with("https://") => {
            return Err(RunError::Join {
                via,
                reason: "an https:// member needs client TLS here: cert_file, key_file and a trusted CA"
                    .into(),
            })
        }
        None => None,
        Some(Ok(tls)) => Some(tls),
        Some(Err(reason)) => return Err(RunError::Join { via, reason }),
    };
    let mut body = serde_json::json!({
        "peer_addr": me.peer_addr,
        "client_addr": me.client_addr,
        "cluster_name": config.cluster_name,
    });
    if config.id != 0 {
        body["id"] = config.id.into();
    }
    let body = body.to_string();
    let deadline = tokio::time::Instant::now() + JOIN_DEADLINE;
    let mut backoff = Duration::from_millis(200);
    loop {
        let reason = match join_once(tls.as_deref(), &via, &body).await {
            Ok(id) => return Ok(id),
            Err(JoinFailure::Refused(reason)) => return Err(RunError::Join { via, reason }),
            Err(JoinFailure::Transient(reason)) => reason,
        };
        let now = tokio::time::Instant::now();
        if now + backoff >= deadline {
            return Err(RunError::Join {
                via,
                reason: format!("{reason} (still failing after {JOIN_DEADLINE:?})"),
            });
        }
        tracing::warn!(%via, "cannot join yet, asking again in {backoff:?}: {reason}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

enum JoinFailure {
    /// Worth asking again: no answer, or the member could not carry the request out now.
    Transient(String),
    /// The cluster refused this node; asking again would get the same answer.
    Refused(String),
}

/// One join request, bounded by [`JOIN_ATTEMPT_TIMEOUT`].
async fn join_once(tls: Option<&keel::tls::ClientTls>, via: &str, body: &str) -> Result<NodeId, JoinFailure> {
    let (status, bytes) = match member_request(
        tls,
        via,
        hyper::Method::POST,
        "/v1/cluster/join",
        body.to_string(),
        JOIN_ATTEMPT_TIMEOUT,
    )
    .await
    {
        Ok(answer) => answer,
        // A certificate the member refuses, or one this node cannot verify, stays so.
        Err(MemberCallError::Tls(e)) => return Err(JoinFailure::Refused(e)),
        Err(MemberCallError::Io(e)) => return Err(JoinFailure::Transient(e)),
    };
    let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let message = match &json {
        Some(json) => json["error"]["message"].as_str().map_or_else(|| json.to_string(), str::to_string),
        None => String::from_utf8_lossy(&bytes).into_owned(),
    };
    if status.is_success() {
        return json
            .as_ref()
            .and_then(|json| json["id"].as_u64())
            .filter(|id| *id != 0)
            .ok_or_else(|| JoinFailure::Refused(format!("answer has no node id: {message}")));
    }
    let reason = format!("HTTP {status}: {message}");
    if status.is_server_error() || status == hyper::StatusCode::TOO_MANY_REQUESTS {
        Err(JoinFailure::Transient(reason))
    } else {
        Err(JoinFailure::Refused(reason))
    }
}

/// Why a call to another member's client port failed.
enum MemberCallError {
    /// The TLS handshake failed: a certificate refused on either side, or TLS against plaintext.
    Tls(String),
    /// No connection, no answer in time, or the connection broke.
    Io(String),
}

/// One HTTP/1.1 request to another member's client port at `addr`, over TLS when `tls` is given;
/// answers the status and the body, read in full within `timeout`.
async fn member_request(
    tls: Option<&keel::tls::ClientTls>,
    addr: &str,
    method: hyper::Method,
    path: &str,
    body: String,
    timeout: Duration,
) -> Result<(hyper::StatusCode, hyper::body::Bytes), MemberCallError> {
    use http_body_util::BodyExt;
    let call = async {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .map_err(|e| MemberCallError::Io(e.to_string()))?;
        let answer = match tls {
            None => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| MemberCallError::Io(format!("no answer: {e}")))?;
                send_http1(hyper_util::rt::TokioIo::new(tcp), request).await?
            }
            Some(tls) => {
                let stream = tls.connect(addr, timeout).await.map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidData => MemberCallError::Tls(e.to_string()),
                    _ => MemberCallError::Io(format!("no answer: {e}")),
                })?;
                send_http1(hyper_util::rt::TokioIo::new(stream), request).await?
            }
        };
        let status = answer.status();
        let bytes = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| MemberCallError::Io(format!("answer cut off: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| MemberCallError::Io(format!("no answer within {timeout:?}")))?
}

async fn send_http1<IO>(
    io: IO,
    request: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, MemberCallError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let failed = |e: hyper::Error| match tls_refusal(&e) {
        Some(why) => MemberCallError::Tls(why),
        None => MemberCallError::Io(format!("no answer: {e}")),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(failed)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(request).await.map_err(failed)
}

/// The TLS error under `e`, if a TLS alert or certificate check ended the connection: under TLS
/// 1.3 a server refuses the client's certificate after the client's handshake is done, so the
/// refusal shows on the first request.
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return Some(format!("TLS: {io}"));
            }
        }
        cause = c.source();
    }
    None
}

/// How long `keeld --join` keeps asking while the cluster cannot answer (see [`join_cluster`]).
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
const JOIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// A node that joined as a learner asks to be promoted to voter once it has caught up (the
/// leader refuses until it holds 90% of the log). Stops once it is a voter.
async fn promote_when_caught_up(node: Arc<Node<KvStore>>) {
    let id = node.id();
    loop {
        let m = node.metrics();
        let membership = m.membership_config.membership();
        if membership.voter_ids().any(|v| v == id) {
            return;
        }
        if membership.get_node(&id).is_some() && m.current_leader.is_some() {
            match node.promote(id).await {
                Ok(()) => {
                    tracing::info!(id, "caught up; promoted to voter");
                    return;
                }
                Err(keel::AdminError::NotReady(why)) => tracing::debug!(id, "not promoted yet: {why}"),
                Err(e) => tracing::info!(id, "promotion failed, will retry: {e}"),
            }
        }
        // Look again after the log moves on (or half a second).
        let applied = m.last_applied;
        let _ = node
            .wait_for(Duration::from_millis(500), "catching up", move |m| m.last_applied != applied)
            .await;
    }
}

/// Watches for this node's removal from the cluster. A removed node may never receive the entry
/// that removes it (the leader stops replicating to it), so besides its own view of the membership
/// it asks the leader, every few election timeouts, whether it is still a member. Once
/// removed, it marks the data dir (a restart then refuses) and reports it.
async fn watch_removal(
    node: Arc<Node<KvStore>>,
    marker: std::path::PathBuf,
    removed: oneshot::Sender<String>,
    tls: Option<Arc<keel::tls::ClientTls>>,
) {
    let id = node.id();
    let interval = Duration::from_millis(node.config().raft.election_timeout_max_ms * 3);
    let mut was_member = false;
    loop {
        let m = node.metrics();
        if m.running_state.is_err() {
            return;
        }
        let membership = m.membership_config.membership();
        let member_here = membership.get_node(&id).is_some();
        let gone = if member_here {
            was_member = true;
            // Not the leader: ask the leader whether it still counts this node (it stops sending
            // to a node it removed, so this node's own view may never change).
            if m.current_leader != Some(id) {
                let peers: Vec<NodeInfo> =
                    membership.nodes().filter(|(n, _)| **n != id).map(|(_, info)| info.clone()).collect();
                removed_per_peers(id, &node.config().cluster_name, &peers, tls.as_deref()).await
            } else {
                None
            }
        } else if was_member {
            Some(format!(
                "membership at log index {}",
                m.membership_config.log_id().as_ref().map_or(0, |l| l.index)
            ))
        } else {
            None
        };
        if let Some(evidence) = gone {
            let why =
                format!("Node {id} was removed from cluster {:?} ({evidence}).", node.config().cluster_name);
            tracing::error!("{why} It stops serving.");
            if let Err(e) = std::fs::write(&marker, format!("{why}\n")) {
                tracing::error!("cannot write {}: {e}", marker.display());
            }
            let _ = removed.send(why);
            return;
        }
        let (leader, members) = (m.current_leader, m.membership_config.clone());
        let _ = node
            .wait_for(interval, "leader or membership change", move |m| {
                m.current_leader != leader || m.membership_config != members
            })
            .await;
    }
}

/// Asks `peers` (by their client address) for their status. Answers the evidence if the leader of
/// the same cluster does not list `id`. Only the leader's word counts: it appends a membership
/// change before anyone else sees it, so another member may not list a node that just joined.
async fn removed_per_peers(
    id: NodeId,
    cluster: &str,
    peers: &[NodeInfo],
    tls: Option<&keel::tls::ClientTls>,
) -> Option<String> {
    for peer in peers.iter().filter(|p| !p.client_addr.is_empty()) {
        let ask = member_request(
            tls,
            &peer.client_addr,
            hyper::Method::GET,
            "/v1/cluster/status",
            String::new(),
            Duration::from_secs(2),
        );
        let Ok((_, bytes)) = ask.await else { continue };
        let Ok(status) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        let same_cluster = status["cluster_name"].as_str() == Some(cluster);
        let leads = status["state"].as_str() == Some("leader");
        let members = status["members"].as_array();
        if same_cluster && leads {
            if let Some(members) = members {
                if !members.iter().any(|m| m["id"].as_u64() == Some(id)) {
                    let who = status["id"].as_u64().unwrap_or(0);
                    return Some(format!(
                        "the leader, node {who} at {}, no longer lists it",
                        peer.client_addr
                    ));
                }
            }
        }
    }
    None
}

/// Runs a node until `shutdown` completes, the node is removed from its cluster, or its Raft
/// stops with a fatal error; then stops it in order. Answers why it stopped, if not for
/// `shutdown`.
pub async fn run(config: KeeldConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let mut server = Server::start(config).await?;
    let removed = server.removed();
    let fatal = server.node().fatal();
    let outcome = tokio::select! {
        () = shutdown => None,
        why = removed => Some(RunError::Removed(why)),
        fatal = fatal => {
            tracing::error!("raft stopped with a fatal error: {fatal}; stopping keeld");
            Some(RunError::Fatal(fatal.to_string()))
        }
    };
    let stopped = server.shutdown().await;
    match (outcome, stopped) {
        (None, stopped) => stopped,
        // The reason to stop outranks a failure to stop cleanly: log that one, answer the reason.
        (Some(why), Err(e)) => {
            tracing::error!("{e}");
            Err(why)
        }
        (Some(why), Ok(())) => Err(why),
    }
}
