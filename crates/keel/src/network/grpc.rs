//! The gRPC peer transport (tonic, plaintext HTTP/2).
//!
//! - Receiving: [`PeerServer`] serves one node's [`RaftService`] as the `RaftPeer` gRPC service of
//!   `proto/peer.proto`; [`serve`] runs it on a bound listener until a shutdown signal.
//! - Sending: [`GrpcNetwork`] is the node's `RaftNetworkFactory`; each [`GrpcConnection`] is a
//!   lazily connected channel to one peer (`NodeInfo::peer_addr`) that reconnects on its own.
//! - Replication runs over one `StreamAppend` stream per follower and session: openraft's
//!   AppendEntries go out as one message each instead of one call each (on 2 cores, the call per
//!   entry and the commit update after it were the largest cost of a write). One request is out
//!   at a time; the entries appended meanwhile ride the next.
//!
//! Messages travel as the postcard encoding ([`crate::codec`]) of the openraft types, wrapped in a
//! request that names the target node and the cluster: a node refuses (`FAILED_PRECONDITION`) a
//! message meant for another node or another cluster, e.g. after an address was reused. Snapshots
//! stream as a header followed by chunks of at most [`SNAPSHOT_CHUNK_BYTES`], read from the file
//! at most two chunks ahead of the network.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::Stream;
use futures_util::StreamExt;
use openraft::base::BoxFuture as OpenraftBoxFuture;
use openraft::base::BoxStream;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Timeout;
use openraft::errors::Unreachable;
use openraft::network::v2::RaftNetworkV2;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::OptionalSend;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::transport::Endpoint;
use tonic::Code;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use self::proto::raft_peer_client::RaftPeerClient;
use self::proto::raft_peer_server::RaftPeer;
use self::proto::raft_peer_server::RaftPeerServer;
use self::proto::snapshot_chunk::Item;
use self::proto::PeerReply;
use self::proto::PeerRequest;
use self::proto::SnapshotChunk;
use self::proto::SnapshotHeader;
use super::snapshot_chunks;
use super::AppendStream;
use super::BoxFuture;
use super::RaftService;
use super::ServiceError;
use super::SnapshotChunks;
use super::SNAPSHOT_CHUNK_BYTES;
use crate::codec;
use crate::forward::ForwardError;
use crate::forward::ForwardReply;
use crate::forward::ForwardRequest;
use crate::forward::Forwarder;
use crate::storage::snapshot::SnapshotFile;
use crate::types::KeelTypes;
use crate::types::NodeId;
use crate::types::NodeInfo;
use crate::types::SnapshotMeta;
use crate::types::Vote;

/// The messages and service stubs generated from `proto/peer.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("keel.peer.v1");
}

/// The largest gRPC reply a node accepts from a peer, and the largest message it sends. What a
/// node accepts as a request is smaller: [`crate::Config::max_peer_message_bytes`].
pub const MAX_MESSAGE_BYTES: usize = codec::MAX_VALUE_BYTES;

/// The most bytes of commands one AppendEntries call carries (etcd's `MaxSizePerMsg` is 1 MiB).
/// openraft hands over up to `max_payload_entries` entries at once and gives the call its
/// heartbeat interval: 300 commands of 1 MiB could never arrive in time, and a follower behind by
/// that much would retry forever. A larger batch is cut after this many bytes (always at least one
/// entry) and reported as a partial success; openraft sends the rest next.
pub const MAX_APPEND_BYTES: usize = 1 << 20;

/// Time added to an AppendEntries call's deadline per byte of commands, for one large entry on
/// a slow link: 1 ms per 16 KiB (16 MiB/s).
const APPEND_BYTES_PER_MS: usize = 16 << 10;

/// The time added to an AppendEntries' deadline for `bytes` of commands, on a call or the stream.
fn time_for_bytes(bytes: usize) -> Duration {
    Duration::from_millis((bytes / APPEND_BYTES_PER_MS) as u64)
}

/// The least time an AppendEntries call that carries entries is given (see
/// [`GrpcNetwork::with_append_timeout`]). openraft gives it its heartbeat interval (and the
/// transport three quarters of that: 75 ms by default), so on a link whose round trip is longer,
/// no entry would ever be acknowledged and nothing could commit; etcd only slows down there.
pub const DEFAULT_APPEND_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection attempt to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a peer connection is pinged (HTTP/2 keep-alive), and how long a ping may go
/// unanswered before the connection is dropped and re-established.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Server

/// Serves one node's [`RaftService`] to its peers over gRPC.
#[derive(Clone)]
pub struct PeerServer {
    cluster: String,
    node_id: NodeId,
    /// The largest message accepted (see [`crate::Config::max_peer_message_bytes`]).
    max_message_bytes: usize,
    service: Arc<dyn RaftService>,
    /// Set by [`Self::close_streams`]: open replication streams end.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl PeerServer {
    /// `cluster` and `node_id` are what every incoming message must name as its target.
    pub fn new(cluster: impl Into<String>, node_id: NodeId, service: Arc<dyn RaftService>) -> Self {
        let closing = Arc::new(tokio::sync::watch::Sender::new(false));
        let max_message_bytes = crate::Config::default().max_peer_message_bytes();
        Self { cluster: cluster.into(), node_id, service, closing, max_message_bytes }
    }

    /// Refuse messages larger than `bytes` (default: what the default
    /// [`LimitsConfig`](crate::config::LimitsConfig) needs). Give it
    /// [`Config::max_peer_message_bytes`](crate::Config::max_peer_message_bytes) of the node.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Ends the replication streams open now and later, so that a graceful server shutdown,
    /// which waits for requests in flight, is not held up by them: a leader keeps its stream open
    /// for as long as it leads. A reply not sent yet is dropped; the leader sends the request
    /// again. [`serve`] calls it when
    /// shutdown begins; call it yourself if you serve [`Self::into_service`] on your own server.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`Self::close_streams`] was called.
    fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }

    /// The tonic service, to add to a `tonic::transport::Server` of your own.
    pub fn into_service(self) -> RaftPeerServer<PeerServer> {
        let limit = self.max_message_bytes;
        RaftPeerServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn check(&self, target_id: NodeId, cluster: &str) -> Result<(), Status> {
        if target_id == self.node_id && cluster == self.cluster {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "wrong recipient: this is node {} of cluster {:?}, but the message is for node \
             {target_id} of cluster {cluster:?}; ensure connection to the correct node",
            self.node_id, self.cluster
        )))
    }

    /// Checks the recipient and decodes the payload.
    fn decode<T: DeserializeOwned>(&self, request: Request<PeerRequest>) -> Result<T, Status> {
        self.decode_message(request.into_inner())
    }

    fn decode_message<T: DeserializeOwned>(&self, req: PeerRequest) -> Result<T, Status> {
        self.check(req.target_id, &req.cluster)?;
        codec::from_bytes(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("payload does not decode: {e}")))
    }
}

fn reply<T: Serialize>(value: &T) -> Result<Response<PeerReply>, Status> {
    let payload =
        codec::to_bytes(value).map_err(|e| Status::internal(format!("reply does not encode: {e}")))?;
    Ok(Response::new(PeerReply { payload }))
}

fn service_status(e: ServiceError) -> Status {
    match e {
        ServiceError::Stopped(_) => Status::unavailable(e.to_string()),
        ServiceError::Snapshot(_) => Status::data_loss(e.to_string()),
        ServiceError::Refused(_) => Status::permission_denied(e.to_string()),
    }
}

/// The replies of a replication stream.
pub type StreamAppendReplies = Pin<Box<dyn Stream<Item = Result<PeerReply, Status>> + Send>>;

#[tonic::async_trait]
impl RaftPeer for PeerServer {
    async fn append_entries(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let rpc: AppendEntriesRequest<KeelTypes> = self.decode(request)?;
        reply(&self.service.append_entries(rpc).await.map_err(service_status)?)
    }

    type StreamAppendStream = StreamAppendReplies;

    /// Hands the requests to the node as they arrive; replies as they are stored, in order. A
    /// request that is refused (wrong recipient, undecodable) ends the input, and its reason is
    /// the stream's last word, after the replies to the requests before it.
    async fn stream_append(
        &self,
        request: Request<tonic::Streaming<PeerRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let refused: Arc<Mutex<Option<Status>>> = Arc::default();
        let slot = refused.clone();
        let server = self.clone();
        // Closing ends both halves: the request half is what holds the HTTP/2 stream open.
        let input = request.into_inner().take_until(self.closed()).scan((), move |(), msg| {
            let rpc = msg.and_then(|req| server.decode_message::<AppendEntriesRequest<KeelTypes>>(req));
            futures_util::future::ready(match rpc {
                Ok(rpc) => Some(rpc),
                Err(status) => {
                    if let Ok(mut slot) = slot.lock() {
                        *slot = Some(status);
                    }
                    None
                }
            })
        });
        let input: AppendStream = Box::pin(input);
        let replies = self.service.clone().stream_append(input).map(|result| match result {
            Ok(result) => codec::to_bytes(&result)
                .map(|payload| PeerReply { payload })
                .map_err(|e| Status::internal(format!("reply does not encode: {e}"))),
            Err(e) => Err(service_status(e)),
        });
        let last_word =
            futures_util::stream::once(async move { refused.lock().ok().and_then(|mut s| s.take()) })
                .filter_map(|refusal| futures_util::future::ready(refusal.map(Err)));
        Ok(Response::new(Box::pin(replies.chain(last_word).take_until(self.closed()))))
    }

    async fn vote(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let rpc: VoteRequest<KeelTypes> = self.decode(request)?;
        reply(&self.service.vote(rpc).await.map_err(service_status)?)
    }

    async fn pre_vote(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let rpc: VoteRequest<KeelTypes> = self.decode(request)?;
        reply(&self.service.pre_vote(rpc).await.map_err(service_status)?)
    }

    async fn transfer_leader(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req: TransferLeaderRequest<KeelTypes> = self.decode(request)?;
        reply(&self.service.transfer_leader(req).await.map_err(service_status)?)
    }

    async fn forward(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let from = request.get_ref().from_id;
        let req: ForwardRequest = self.decode(request)?;
        reply(&self.service.forward(from, req).await.map_err(service_status)?)
    }

    async fn install_snapshot(
        &self,
        request: Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<Response<PeerReply>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(SnapshotChunk { item: Some(Item::Header(h)) }) => h,
            Some(_) => return Err(Status::invalid_argument("snapshot stream must start with a header")),
            None => return Err(Status::invalid_argument("empty snapshot stream")),
        };
        self.check(header.target_id, &header.cluster)?;
        let vote: Vote = codec::from_bytes(&header.vote)
            .map_err(|e| Status::invalid_argument(format!("snapshot vote does not decode: {e}")))?;
        let meta: SnapshotMeta = codec::from_bytes(&header.meta)
            .map_err(|e| Status::invalid_argument(format!("snapshot meta does not decode: {e}")))?;

        let chunks: SnapshotChunks = Box::pin(stream.map(|msg| match msg {
            Ok(SnapshotChunk { item: Some(Item::Data(data)) }) if data.len() <= SNAPSHOT_CHUNK_BYTES => {
                Ok(data)
            }
            Ok(SnapshotChunk { item: Some(Item::Data(data)) }) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("snapshot chunk of {} bytes exceeds {SNAPSHOT_CHUNK_BYTES}", data.len()),
            )),
            Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected message in snapshot stream")),
            Err(status) => Err(io::Error::other(format!("snapshot stream failed: {status}"))),
        }));
        let resp = self.service.install_snapshot(vote, meta, chunks).await.map_err(service_status)?;
        reply(&resp)
    }
}

/// Serves `server` on `listener` until `shutdown` completes, then stops accepting, lets requests in
/// flight finish and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: PeerServer,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let streams = server.clone();
    let shutdown = async move {
        shutdown.await;
        streams.close_streams();
    };
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(server.into_service(), incoming, shutdown)
        .await
}

/// [`serve`] over TLS: every connection completes a handshake with `tls` (bounded by
/// [`crate::tls::HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at once) before a byte of gRPC is
/// read; with a trusted CA in `tls`, a peer without a certificate the CA signed is refused in the
/// handshake. A plaintext client is told that TLS is required and closed.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    server: PeerServer,
    tls: Arc<crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<crate::tls::TlsStream, std::io::Error>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let acceptor = tokio::spawn(async move {
        let warn = crate::tls::RateLimitedLog::default();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accepting a peer connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                warn.log(|| format!("peer connection from {peer} closed: {MAX_HANDSHAKES} TLS handshakes already in progress"));
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, tls, warn) = (tx.clone(), tls.clone(), warn.clone());
            tokio::spawn(async move {
                let accepted = crate::tls::accept(&tls, tcp, crate::tls::HANDSHAKE_TIMEOUT).await;
                drop(permit);
                match accepted {
                    Ok(a) => {
                        let _ = tx.send(Ok(a.stream)).await;
                    }
                    Err(e) => warn.log(|| format!("peer connection from {peer} refused: {e}")),
                }
            });
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let streams = server.clone();
    let shutdown = async move {
        shutdown.await;
        acceptor.abort();
        streams.close_streams();
    };
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(server.into_service(), incoming, shutdown)
        .await
}

/// TLS handshakes in progress at once on the peer port; a connection beyond is closed.
pub const MAX_HANDSHAKES: usize = 256;

// ---------------------------------------------------------------------------------------------
// Client

/// The [`RaftNetworkFactory`] of node `from` in cluster `cluster`: reaches peers over gRPC at
/// their `NodeInfo::peer_addr` (`host:port`).
///
/// It is also the node's [`Forwarder`]: requests for the leader travel on one cached channel per
/// peer address.
#[derive(Clone, Debug)]
pub struct GrpcNetwork {
    cluster: String,
    from: NodeId,
    append_timeout: Duration,
    forward_clients: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    /// Dial peers with TLS (mutual: this node presents its certificate). `None`: plaintext.
    tls: Option<Arc<crate::tls::ClientTls>>,
}

impl GrpcNetwork {
    pub fn new(cluster: impl Into<String>, from: NodeId) -> Self {
        Self {
            cluster: cluster.into(),
            from,
            append_timeout: DEFAULT_APPEND_TIMEOUT,
            forward_clients: Arc::default(),
            tls: None,
        }
    }

    /// Dial peers over TLS with `tls` (see [`crate::config::Config::peer_tls`]); the peers must
    /// serve with [`serve_tls`].
    pub fn with_tls(mut self, tls: Arc<crate::tls::ClientTls>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The least time an AppendEntries call that carries entries may take before it counts as
    /// failed ([`DEFAULT_APPEND_TIMEOUT`] unless set; keeld uses its maximum election timeout:
    /// a follower that answers later than that has started an election anyway). Heartbeats keep
    /// openraft's own limit, the heartbeat interval: set that above the round trip, as for etcd.
    pub fn with_append_timeout(mut self, timeout: Duration) -> Self {
        self.append_timeout = timeout;
        self
    }

    /// A lazily connected channel to `node`'s peer address.
    fn channel(&self, target: NodeId, node: &NodeInfo) -> Result<Channel, String> {
        let channel = Endpoint::from_shared(format!("http://{}", node.peer_addr))
            .map(|e| {
                let e = e
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    // Detect a silently dead peer (host gone, partition) so the channel reconnects
                    // instead of timing out every call on a connection that will never answer.
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true);
                match &self.tls {
                    None => e.connect_lazy(),
                    Some(tls) => e.connect_with_connector_lazy(crate::tls::TlsConnector::new(
                        tls.clone(),
                        CONNECT_TIMEOUT + crate::tls::HANDSHAKE_TIMEOUT,
                    )),
                }
            })
            .map_err(|e| format!("invalid peer address {:?} of node {target}: {e}", node.peer_addr));
        if let Err(e) = &channel {
            tracing::warn!(from = self.from, target, "{e}");
        }
        channel
    }

    fn connect(&self, target: NodeId, node: &NodeInfo) -> Result<RaftPeerClient<Channel>, String> {
        self.channel(target, node).map(peer_client)
    }
}

fn peer_client(channel: Channel) -> RaftPeerClient<Channel> {
    RaftPeerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl RaftNetworkFactory<KeelTypes> for GrpcNetwork {
    type Network = GrpcConnection;

    /// Does not connect: the channel connects on first use and reconnects after failures.
    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        let client = self.connect(target, node);
        GrpcConnection {
            cluster: self.cluster.clone(),
            from: self.from,
            target,
            append_timeout: self.append_timeout,
            client,
            peer_lacks_streaming: false,
            round_trips: crate::metrics::network().peer(target),
        }
    }
}

/// Whether a failed call certainly did nothing on the receiver: it refused the request (wrong
/// recipient, undecodable, node stopped) or the connection was never made. A call cut off later
/// (reset, keep-alive timeout) may have been carried out.
fn never_sent(status: &Status) -> bool {
    match status.code() {
        Code::FailedPrecondition | Code::InvalidArgument => true,
        Code::Unavailable => {
            let mut chain = status.message().to_string();
            let mut source = std::error::Error::source(status);
            while let Some(e) = source {
                chain.push_str(": ");
                chain.push_str(&e.to_string());
                source = e.source();
            }
            ["node stopped", "tcp connect error", "Connection refused", "error trying to connect"]
                .iter()
                .any(|marker| chain.contains(marker))
        }
        _ => false,
    }
}

/// How long a forwarded request may take, including the leader committing a write.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

impl Forwarder for GrpcNetwork {
    fn forward<'a>(
        &'a self,
        target: NodeId,
        node: &'a NodeInfo,
        req: ForwardRequest,
    ) -> BoxFuture<'a, Result<ForwardReply, ForwardError>> {
        Box::pin(async move {
            let key = (target, node.peer_addr.clone());
            let cached = self.forward_clients.lock().ok().and_then(|c| c.get(&key).cloned());
            let channel = match cached {
                Some(c) => c,
                None => {
                    let c = self.channel(target, node).map_err(ForwardError::NotSent)?;
                    if let Ok(mut clients) = self.forward_clients.lock() {
                        clients.insert(key, c.clone());
                    }
                    c
                }
            };
            let payload = codec::to_bytes(&req).map_err(|e| ForwardError::NotSent(format!("encode: {e}")))?;
            let request =
                PeerRequest { target_id: target, cluster: self.cluster.clone(), payload, from_id: self.from };
            let mut client = peer_client(channel);
            let answer = match tokio::time::timeout(FORWARD_TIMEOUT, client.forward(request)).await {
                Err(_) => {
                    return Err(ForwardError::Unknown(format!(
                        "node {target} did not answer within {FORWARD_TIMEOUT:?}"
                    )))
                }
                Ok(answer) => answer,
            };
            match answer {
                Ok(resp) => codec::from_bytes(&resp.into_inner().payload).map_err(|e| {
                    ForwardError::Unknown(format!("reply from node {target} does not decode: {e}"))
                }),
                Err(status) if never_sent(&status) => {
                    Err(ForwardError::NotSent(format!("node {target}: {}", status.message())))
                }
                Err(status) => Err(ForwardError::Unknown(format!("node {target}: {status}"))),
            }
        })
    }
}

/// One node's gRPC client to one peer.
pub struct GrpcConnection {
    cluster: String,
    from: NodeId,
    target: NodeId,
    append_timeout: Duration,
    /// `Err` if the peer's address is invalid: every call then answers `Unreachable`.
    client: Result<RaftPeerClient<Channel>, String>,
    /// The peer answered `StreamAppend` with "unimplemented" (a version before it): replicate to
    /// it one AppendEntries call at a time.
    peer_lacks_streaming: bool,
    /// Heartbeats' round trips to this peer ([`crate::metrics::network`]).
    round_trips: prometheus_client::metrics::histogram::Histogram,
}

#[derive(Clone, Copy, Debug)]
enum Method {
    AppendEntries,
    Vote,
    PreVote,
    TransferLeader,
}

impl Method {
    fn rpc_type(self) -> RPCTypes {
        match self {
            Method::AppendEntries => RPCTypes::AppendEntries,
            Method::Vote | Method::PreVote => RPCTypes::Vote,
            Method::TransferLeader => RPCTypes::TransferLeader,
        }
    }
}

/// What a failed call means to openraft: back off (`Unreachable`), retry now (`Network`) or
/// `Timeout`.
enum Failure {
    Unreachable(String),
    Network(String),
    Timeout,
}

impl Failure {
    fn from_status(target: NodeId, status: &Status) -> Self {
        let msg = format!("node {target}: {:?}: {}", status.code(), status.message());
        match status.code() {
            Code::DeadlineExceeded => Failure::Timeout,
            // A request cut off mid-flight (connection reset, stream refused): retry right away.
            Code::Unknown | Code::Internal | Code::Cancelled | Code::ResourceExhausted => {
                Failure::Network(msg)
            }
            // Connection refused, node stopped, wrong recipient, incompatible peer: back off.
            _ => Failure::Unreachable(msg),
        }
    }
}

impl GrpcConnection {
    fn client(&self) -> Result<RaftPeerClient<Channel>, Unreachable<KeelTypes>> {
        self.client.clone().map_err(Unreachable::from_string)
    }

    fn timeout(&self, action: RPCTypes, timeout: Duration) -> Timeout<KeelTypes> {
        Timeout { action, id: self.from, target: self.target, timeout }
    }

    async fn call<Req, Resp>(
        &self,
        method: Method,
        rpc: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<KeelTypes>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let mut client = self.client()?;
        let payload = codec::to_bytes(rpc).map_err(|e| NetworkError::from_string(format!("encode: {e}")))?;
        let req = PeerRequest {
            target_id: self.target,
            cluster: self.cluster.clone(),
            payload,
            from_id: self.from,
        };
        let ttl = option.soft_ttl();
        let call = async move {
            match method {
                Method::AppendEntries => client.append_entries(req).await,
                Method::Vote => client.vote(req).await,
                Method::PreVote => client.pre_vote(req).await,
                Method::TransferLeader => client.transfer_leader(req).await,
            }
        };
        let status = match tokio::time::timeout(ttl, call).await {
            Err(_) => return Err(self.timeout(method.rpc_type(), ttl).into()),
            Ok(Ok(resp)) => {
                return codec::from_bytes(&resp.into_inner().payload).map_err(|e| {
                    Unreachable::from_string(format!("reply from node {} does not decode: {e}", self.target))
                        .into()
                })
            }
            Ok(Err(status)) => status,
        };
        Err(rpc_error(self.from, self.target, method.rpc_type(), ttl, &status))
    }
}

/// What a failed call (`status`) that was given `timeout` means to openraft.
fn rpc_error(
    from: NodeId,
    target: NodeId,
    action: RPCTypes,
    timeout: Duration,
    status: &Status,
) -> RPCError<KeelTypes> {
    match Failure::from_status(target, status) {
        Failure::Timeout => Timeout { action, id: from, target, timeout }.into(),
        Failure::Network(msg) => NetworkError::from_string(msg).into(),
        Failure::Unreachable(msg) => Unreachable::from_string(msg).into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Replication stream (client side)

/// How many requests a replication stream has out at once. One: the entries that arrive while a
/// request is out ride the next one together. Measured on 2 cores, 3 nodes, 64 clients putting:
/// 6,450 puts/s with one, 5,500 with two, 5,100 with no limit (smaller batches, more messages and
/// fsyncs on the followers); no difference at one client.
const MAX_UNANSWERED_REQUESTS: usize = 1;

/// The messages of one replication stream that are not answered yet, oldest first.
struct Unanswered {
    parts: Mutex<VecDeque<SentPart>>,
    /// Wakes the receiving side when a message goes out, so that it starts timing it.
    sent: tokio::sync::Notify,
    /// Why the stream stopped sending (a request that does not encode).
    broken: Mutex<Option<String>>,
    /// Wakes the sending side when a request is answered.
    answered: tokio::sync::Notify,
    /// Set when openraft drops the receiving side (the session is over): the sending side must
    /// stop taking requests from openraft, whose next session takes them now, and end.
    gone: tokio::sync::watch::Sender<bool>,
}

/// One message on the wire: a whole request, or a piece of one cut at [`MAX_APPEND_BYTES`].
struct SentPart {
    /// When the stream counts as stalled if this message is still unanswered.
    deadline: tokio::time::Instant,
    /// Whether its reply answers the request (the last piece); earlier pieces' replies are not
    /// passed on: openraft expects one reply per request.
    last_piece: bool,
}

impl Unanswered {
    fn new() -> Self {
        Self {
            parts: Mutex::default(),
            sent: tokio::sync::Notify::new(),
            broken: Mutex::default(),
            answered: tokio::sync::Notify::new(),
            gone: tokio::sync::watch::Sender::new(false),
        }
    }

    fn oldest_deadline(&self) -> Option<tokio::time::Instant> {
        self.parts.lock().ok().and_then(|p| p.front().map(|part| part.deadline))
    }

    fn answered(&self) -> Option<SentPart> {
        let part = self.parts.lock().ok().and_then(|mut p| p.pop_front());
        self.answered.notify_one();
        part
    }

    /// How many requests are sent and not answered.
    fn requests(&self) -> usize {
        self.parts.lock().map(|p| p.iter().filter(|part| part.last_piece).count()).unwrap_or(0)
    }

    fn broken(&self) -> Option<String> {
        self.broken.lock().ok().and_then(|b| b.clone())
    }
}

/// Cuts `rpc` into requests that follow on from one another, each with at most
/// [`MAX_APPEND_BYTES`] of commands (at least one entry); with each one's size in bytes.
fn split_append(rpc: AppendEntriesRequest<KeelTypes>) -> Vec<(AppendEntriesRequest<KeelTypes>, usize)> {
    let AppendEntriesRequest { vote, mut prev_log_id, entries, leader_commit } = rpc;
    if entries.is_empty() {
        return vec![(AppendEntriesRequest { vote, prev_log_id, entries, leader_commit }, 0)];
    }
    let mut pieces = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let (keep, bytes) = entries_within(&rest, MAX_APPEND_BYTES);
        let tail = rest.split_off(keep);
        let last = rest.last().map(|e| e.log_id);
        pieces.push((AppendEntriesRequest { vote, prev_log_id, entries: rest, leader_commit }, bytes));
        prev_log_id = last;
        rest = tail;
    }
    pieces
}

/// The wire messages for openraft's request stream `input`: each request encoded (in pieces, if
/// large) and recorded in `unanswered` with the time its reply may take, `window` plus time
/// for its bytes. The next request is taken from `input` once fewer than
/// [`MAX_UNANSWERED_REQUESTS`] are unanswered.
fn outbound<S>(
    input: S,
    from: NodeId,
    target: NodeId,
    cluster: String,
    window: Duration,
    unanswered: Arc<Unanswered>,
) -> impl Stream<Item = PeerRequest> + Send + 'static
where
    S: Stream<Item = AppendEntriesRequest<KeelTypes>> + Send + Unpin + 'static,
{
    let gone = unanswered.gone.subscribe();
    futures_util::stream::unfold((input, gone), move |(mut input, mut gone)| {
        let unanswered = unanswered.clone();
        let cluster = cluster.clone();
        async move {
            // openraft's next request takes every entry appended by the time it is asked for.
            loop {
                if *gone.borrow() {
                    return None;
                }
                if unanswered.requests() < MAX_UNANSWERED_REQUESTS {
                    break;
                }
                tokio::select! {
                    _ = unanswered.answered.notified() => {}
                    _ = gone.changed() => {}
                }
            }
            let rpc = tokio::select! {
                rpc = input.next() => rpc?,
                _ = gone.wait_for(|gone| *gone) => return None,
            };
            let now = tokio::time::Instant::now();
            let pieces = split_append(rpc);
            let n = pieces.len();
            let mut messages = Vec::with_capacity(n);
            let mut bytes = 0;
            for (i, (piece, size)) in pieces.into_iter().enumerate() {
                bytes += size;
                let payload = match codec::to_bytes(&piece) {
                    Ok(payload) => payload,
                    Err(e) => {
                        if let Ok(mut broken) = unanswered.broken.lock() {
                            *broken = Some(format!("AppendEntries to node {target} does not encode: {e}"));
                        }
                        unanswered.sent.notify_one();
                        return None;
                    }
                };
                messages.push(PeerRequest {
                    target_id: target,
                    cluster: cluster.clone(),
                    payload,
                    from_id: from,
                });
                let deadline = now + window + time_for_bytes(bytes);
                if let Ok(mut parts) = unanswered.parts.lock() {
                    parts.push_back(SentPart { deadline, last_piece: i + 1 == n });
                }
            }
            unanswered.sent.notify_one();
            Some((messages, (input, gone)))
        }
    })
    .flat_map(futures_util::stream::iter)
}

/// openraft's response stream: one result per request, in order. It ends with an error when the
/// oldest unanswered message is past its deadline (a stalled peer or link), when the stream
/// breaks, or after a refusal (conflict, higher vote), as openraft expects.
fn inbound(
    replies: tonic::Streaming<PeerReply>,
    unanswered: Arc<Unanswered>,
    from: NodeId,
    target: NodeId,
    window: Duration,
) -> BoxStream<'static, Result<StreamAppendResult<KeelTypes>, RPCError<KeelTypes>>> {
    type Item = Result<StreamAppendResult<KeelTypes>, RPCError<KeelTypes>>;
    let stall = move |timeout| -> Item {
        Err(Timeout { action: RPCTypes::AppendEntries, id: from, target, timeout }.into())
    };
    let next = move |mut receiving: Receiving| async move {
        let Receiving { replies, unanswered } = &mut receiving;
        loop {
            if let Some(why) = unanswered.broken() {
                return Some((Err(NetworkError::from_string(why).into()), None));
            }
            let oldest = unanswered.oldest_deadline();
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            let msg = tokio::select! {
                msg = replies.message() => msg,
                _ = unanswered.sent.notified(), if oldest.is_none() => continue,
                _ = tokio::time::sleep_until(oldest.unwrap_or(far)), if oldest.is_some() => {
                    return Some((stall(window), None));
                }
            };
            let reply = match msg {
                Ok(Some(reply)) => reply,
                // The peer ended the stream: what is unanswered is sent again in a new one.
                Ok(None) => return None,
                Err(status) => {
                    return Some((
                        Err(rpc_error(from, target, RPCTypes::AppendEntries, window, &status)),
                        None,
                    ))
                }
            };
            let Some(part) = unanswered.answered() else {
                let msg = format!("node {target} answered an AppendEntries that was not sent");
                return Some((Err(Unreachable::from_string(msg).into()), None));
            };
            let result: StreamAppendResult<KeelTypes> = match codec::from_bytes(&reply.payload) {
                Ok(result) => result,
                Err(e) => {
                    let msg = format!("reply from node {target} does not decode: {e}");
                    return Some((Err(Unreachable::from_string(msg).into()), None));
                }
            };
            if result.is_ok() && !part.last_piece {
                continue;
            }
            let go_on = result.is_ok();
            return Some((Ok(result), go_on.then_some(receiving)));
        }
    };
    let receiving = Receiving { replies, unanswered };
    Box::pin(futures_util::stream::unfold(Some(receiving), move |state| async move { next(state?).await }))
}

/// The receiving half of a replication stream. openraft drops it when the session is over; then
/// the sending half, which hyper polls on its own, must stop too (see [`Unanswered::gone`]).
struct Receiving {
    replies: tonic::Streaming<PeerReply>,
    unanswered: Arc<Unanswered>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.unanswered.gone.send_replace(true);
    }
}

impl RaftNetworkV2<KeelTypes> for GrpcConnection {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<KeelTypes>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<KeelTypes>, RPCError<KeelTypes>> {
        let (keep, bytes) = entries_within(&rpc.entries, MAX_APPEND_BYTES);
        // Heartbeats (no entries) keep openraft's deadline; it cancels them at that anyway.
        let base = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(self.append_timeout)
        };
        let option = RPCOption::new(base + time_for_bytes(bytes));
        if rpc.entries.is_empty() {
            let sent = std::time::Instant::now();
            let answer = self.call(Method::AppendEntries, &rpc, &option).await;
            if answer.is_ok() {
                self.round_trips.observe(sent.elapsed().as_secs_f64());
            }
            return answer;
        }
        if keep == rpc.entries.len() {
            return self.call(Method::AppendEntries, &rpc, &option).await;
        }
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|e| e.log_id);
        let reply: AppendEntriesResponse<KeelTypes> = self.call(Method::AppendEntries, &rpc, &option).await?;
        Ok(match reply {
            AppendEntriesResponse::Success => AppendEntriesResponse::PartialSuccess(last),
            other => other,
        })
    }

    /// One long-lived gRPC stream per replication session: each request is one message on it
    /// rather than a call, sent once the previous one is answered. A reply may take
    /// `max(heartbeat interval, append timeout)` plus time for its bytes, as with
    /// [`Self::append_entries`]; an older peer without the stream is replicated to call by call.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> OpenraftBoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<KeelTypes>, RPCError<KeelTypes>>>,
            RPCError<KeelTypes>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<KeelTypes>> + OptionalSend + Unpin + 'static,
    {
        if self.peer_lacks_streaming {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            // The stream opens once there is a request to send. Taking it first also lets
            // openraft's back-off (applied while it produces a request) pace reconnection
            // attempts to a peer that is down.
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(Box::pin(futures_util::stream::empty()) as BoxStream<'s, _>);
            };
            // openraft's heartbeats (which linearizable reads wait for) come one request to an
            // input: one call costs less than opening a stream for it, and a linearizable get at
            // 1 client ran at 0.89 of etcd with a stream per heartbeat.
            let second = match input.next().now_or_never() {
                Some(None) => {
                    let lone = futures_util::stream::once(futures_util::future::ready(first));
                    return openraft::network::stream_append_sequential(self, lone, option).await;
                }
                Some(Some(second)) => Some(second),
                None => None,
            };
            let mut client = self.client()?;
            let input = futures_util::stream::once(futures_util::future::ready(first))
                .chain(futures_util::stream::iter(second))
                .chain(input);
            let window = option.hard_ttl().max(self.append_timeout);
            let unanswered = Arc::new(Unanswered::new());
            let requests =
                outbound(input, self.from, self.target, self.cluster.clone(), window, unanswered.clone());
            let replies = match tokio::time::timeout(window, client.stream_append(requests)).await {
                Err(_) => return Err(self.timeout(RPCTypes::AppendEntries, window).into()),
                Ok(Ok(resp)) => resp.into_inner(),
                Ok(Err(status)) => {
                    if status.code() == Code::Unimplemented {
                        tracing::warn!(
                            from = self.from,
                            target = self.target,
                            "peer does not serve StreamAppend (an older version): replicating to it \
                             one AppendEntries call at a time"
                        );
                        self.peer_lacks_streaming = true;
                    }
                    return Err(rpc_error(self.from, self.target, RPCTypes::AppendEntries, window, &status));
                }
            };
            Ok(inbound(replies, unanswered, self.from, self.target, window))
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<KeelTypes>,
        option: RPCOption,
    ) -> Result<VoteResponse<KeelTypes>, RPCError<KeelTypes>> {
        self.call(Method::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<KeelTypes>,
        option: RPCOption,
    ) -> Result<VoteResponse<KeelTypes>, RPCError<KeelTypes>> {
        self.call(Method::PreVote, &rpc, &option).await
    }

    /// Streams the header, then the file in chunks; no timeout but `cancel` (a snapshot may take
    /// long), which drops the stream and so aborts the transfer on the receiver too.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<KeelTypes, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<KeelTypes>, StreamingError<KeelTypes>> {
        let mut client = self.client()?;
        let encode =
            |what: &str, e: io::Error| NetworkError::from_string(format!("encode snapshot {what}: {e}"));
        let header = SnapshotHeader {
            target_id: self.target,
            cluster: self.cluster.clone(),
            vote: codec::to_bytes(&vote).map_err(|e| encode("vote", e))?,
            meta: codec::to_bytes(&snapshot.meta).map_err(|e| encode("meta", e))?,
        };
        // A pump task feeds the request stream (header, then chunks) through a one-slot channel. A
        // local read error ends the stream early (the receiver then rejects the short file) and is
        // kept to report the real cause.
        let read_error: Arc<Mutex<Option<io::Error>>> = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(1);
        let mut chunks = snapshot_chunks(snapshot.snapshot);
        let slot = read_error.clone();
        tokio::spawn(async move {
            if tx.send(SnapshotChunk { item: Some(Item::Header(header)) }).await.is_err() {
                return;
            }
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(data) => {
                        if tx.send(SnapshotChunk { item: Some(Item::Data(data)) }).await.is_err() {
                            return; // the transfer was cancelled or failed
                        }
                    }
                    Err(e) => {
                        if let Ok(mut slot) = slot.lock() {
                            *slot = Some(e);
                        }
                        return;
                    }
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);

        let result = tokio::select! {
            res = client.install_snapshot(stream) => res,
            closed = cancel => return Err(closed.into()),
        };
        if let Some(e) = read_error.lock().ok().and_then(|mut slot| slot.take()) {
            return Err(Unreachable::from_string(format!("reading local snapshot file: {e}")).into());
        }
        match result {
            Ok(resp) => codec::from_bytes(&resp.into_inner().payload).map_err(|e| {
                Unreachable::from_string(format!(
                    "snapshot reply from node {} does not decode: {e}",
                    self.target
                ))
                .into()
            }),
            Err(status) => {
                Err(rpc_error(self.from, self.target, RPCTypes::InstallSnapshot, Duration::ZERO, &status)
                    .into())
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<KeelTypes>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<KeelTypes>, RPCError<KeelTypes>> {
        self.call(Method::TransferLeader, &req, &option).await
    }
}

/// How many of `entries`, from the first, fit in `budget` bytes of commands (at least one), and
/// their size.
fn entries_within(entries: &[crate::types::Entry], budget: usize) -> (usize, usize) {
    let mut bytes = 0;
    for (i, e) in entries.iter().enumerate() {
        let size = match &e.payload {
            openraft::EntryPayload::Normal(cmd) => cmd.0.len(),
            openraft::EntryPayload::Membership(m) => 64 * m.nodes().count(),
            openraft::EntryPayload::Blank => 0,
        } + 32;
        if i > 0 && bytes + size > budget {
            return (i, bytes);
        }
        bytes += size;
    }
    (entries.len(), bytes)
}
