//! The peer transport seam.
//!
//! [`RaftService`] is what a node offers its peers: every transport (in-process channels, gRPC)
//! receives a message, finds the target node's `RaftService` and calls it. The sending side
//! is openraft's `RaftNetworkFactory`/`RaftNetworkV2`, implemented per transport.
//!
//! - [`in_process`]: nodes of one process, through a shared router (tests, simulations).
//! - [`grpc`]: nodes on a network, over gRPC (tonic): [`grpc::PeerServer`] and [`grpc::GrpcNetwork`].

pub mod grpc;
pub mod guard;
pub mod in_process;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures_util::Stream;
use futures_util::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::io::AsyncWriteExt;

use crate::forward;
use crate::forward::ForwardReply;
use crate::forward::ForwardRequest;
use crate::forward::Timing;
use crate::network::guard::PeerRefusal;
use crate::network::guard::Transfer;
use crate::network::guard::View;
use crate::state_machine::StateMachine;
use crate::storage::sm_store::SmShared;
use crate::storage::sm_store::SmStore;
use crate::storage::snapshot::verify_file;
use crate::storage::snapshot::SnapshotFile;
use crate::types::KeelTypes;
use crate::types::NodeId;
use crate::types::Raft;
use crate::types::SnapshotMeta;
use crate::types::Vote;
use openraft::vote::RaftLeaderId;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A snapshot file in transit, as a stream of byte chunks (at most [`SNAPSHOT_CHUNK_BYTES`] each).
pub type SnapshotChunks = Pin<Box<dyn Stream<Item = io::Result<Vec<u8>>> + Send>>;

/// A leader's AppendEntries requests to one follower, in the order it sent them.
pub type AppendStream = Pin<Box<dyn Stream<Item = AppendEntriesRequest<KeelTypes>> + Send>>;
/// One result per request of an [`AppendStream`], in order: the last log id the follower now
/// holds (flushed), or why not (conflict, higher vote), after which the stream ends.
pub type AppendResults =
    Pin<Box<dyn Stream<Item = Result<StreamAppendResult<KeelTypes>, ServiceError>> + Send>>;

/// Largest chunk a snapshot travels in. Senders read at most a couple of chunks ahead.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Why a node could not serve a peer's message.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The node has stopped (shut down or failed); the sender should treat it as unreachable.
    #[error("node stopped: {0}")]
    Stopped(String),
    /// A received snapshot was damaged or did not match what the sender announced.
    #[error("snapshot transfer failed: {0}")]
    Snapshot(String),
    /// The message was refused at the edge (see [`guard`]): openraft never saw it.
    #[error("refused: {0}")]
    Refused(#[from] PeerRefusal),
}

/// The Raft messages one node serves to its peers.
pub trait RaftService: Send + Sync + 'static {
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<KeelTypes>, ServiceError>>;

    /// Serves a leader's replication stream (openraft's `Raft::stream_append`): requests are taken
    /// in as they arrive, without waiting for earlier ones to be answered.
    ///
    /// The default serves them one at a time through [`Self::append_entries`].
    fn stream_append(self: Arc<Self>, input: AppendStream) -> AppendResults {
        Box::pin(futures_util::stream::unfold(Some((self, input)), |state| async move {
            let (service, mut input) = state?;
            let rpc = input.next().await?;
            let prev = rpc.prev_log_id;
            let last = rpc.entries.last().map(|e| e.log_id).or(prev);
            match service.append_entries(rpc).await {
                // Nothing precedes the first entry, so there is nothing to conflict with.
                Ok(AppendEntriesResponse::Conflict) if prev.is_none() => {
                    Some((Err(stopped("follower reported a conflict before the first log entry")), None))
                }
                Ok(resp) => {
                    let partial = matches!(resp, AppendEntriesResponse::PartialSuccess(_));
                    let result = resp.into_stream_result(prev, last);
                    // After a refusal or a partial append, later requests no longer follow on.
                    let go_on = result.is_ok() && !partial;
                    Some((Ok(result), go_on.then_some((service, input))))
                }
                Err(e) => Some((Err(e), None)),
            }
        }))
    }

    fn vote(
        &self,
        rpc: VoteRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<VoteResponse<KeelTypes>, ServiceError>>;

    fn pre_vote(
        &self,
        rpc: VoteRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<VoteResponse<KeelTypes>, ServiceError>>;

    /// Receives a whole snapshot file as chunks, verifies it, and installs it.
    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        chunks: SnapshotChunks,
    ) -> BoxFuture<'_, Result<SnapshotResponse<KeelTypes>, ServiceError>>;

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<KeelTypes>, ServiceError>>;

    /// Serves a request that member `from` forwarded to this node as the leader.
    fn forward(&self, from: NodeId, req: ForwardRequest)
        -> BoxFuture<'_, Result<ForwardReply, ServiceError>>;
}

/// Streams an open snapshot file in bounded chunks; reads at most two chunks ahead of the consumer.
pub fn snapshot_chunks(file: SnapshotFile) -> SnapshotChunks {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Vec<u8>>>(2);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file.file;
        loop {
            let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let item = match read_full(&mut file, &mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(buf)
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
        fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }))
}

/// What a node's peer service remembers between messages; one per node, shared by every
/// [`LocalService`] handed out and by the node's own leader-side operations.
pub(crate) struct PeerState {
    /// The leadership transfer that this node's leader (or this node, leading) announced last.
    pub transfer: Mutex<Option<Transfer>>,
    /// One permit: at most one snapshot is received at a time.
    receiving: tokio::sync::Semaphore,
    /// The largest snapshot accepted (`limits.max_snapshot_bytes`).
    max_snapshot_bytes: u64,
    /// Refusals are logged at most once a second (a flood must not flood the log too).
    refusals: Mutex<(Option<Instant>, u64)>,
}

impl PeerState {
    pub fn new(max_snapshot_bytes: u64) -> Self {
        Self {
            transfer: Mutex::new(None),
            receiving: tokio::sync::Semaphore::new(1),
            max_snapshot_bytes,
            refusals: Mutex::new((None, 0)),
        }
    }

    /// Records that leadership is being handed from the leader at `term` to `to`.
    pub fn announce_transfer(&self, transfer: Transfer) {
        if let Ok(mut slot) = self.transfer.lock() {
            *slot = Some(transfer);
        }
    }

    fn announced_transfer(&self) -> Option<Transfer> {
        self.transfer.lock().ok().and_then(|t| *t)
    }

    /// Logs a refusal, or counts it if one was logged less than a second ago.
    fn log_refusal(&self, what: &str, refusal: &PeerRefusal) {
        let Ok(mut guard) = self.refusals.lock() else { return };
        let (last, suppressed) = &mut *guard;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(suppressed = *suppressed, "peer {what} refused: {refusal}");
        *last = Some(now);
        *suppressed = 0;
    }
}

/// The [`RaftService`] of a local node.
///
/// It holds the storage weakly: a transport that still has it registered after `Node::shutdown`
/// gets `Stopped` answers, and does not keep the database open.
///
/// Every message is judged by [`guard`] before openraft sees it.
pub(crate) struct LocalService<SM: StateMachine> {
    pub raft: Raft<SmStore<SM>>,
    pub shared: std::sync::Weak<SmShared<SM>>,
    pub timing: Timing,
    pub peer: Arc<PeerState>,
    pub server_metrics:
        openraft::alias::WatchReceiverOf<KeelTypes, openraft::metrics::RaftServerMetrics<KeelTypes>>,
    pub data_metrics:
        openraft::alias::WatchReceiverOf<KeelTypes, openraft::metrics::RaftDataMetrics<KeelTypes>>,
}

fn stopped(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Stopped(e.to_string())
}

/// Removes a temp file when dropped, unless it was kept: a snapshot transfer cut off at any
/// point (the sender went away, the task was cancelled) leaves nothing behind.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(mut self) -> PathBuf {
        self.0.take().expect("a TempFile holds its path until kept")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl<SM: StateMachine> LocalService<SM> {
    /// This node's Raft state, to judge a message by.
    fn view(&self) -> View {
        let last_log = self.data_metrics.borrow_watched().last_log;
        let m = self.server_metrics.borrow_watched();
        View::new(
            m.id,
            m.vote,
            m.current_leader,
            last_log,
            m.membership_config.clone(),
            m.committed_membership_config.clone(),
        )
    }

    /// Passes `decision` through, logging a refusal.
    fn judge(&self, what: &str, decision: Result<(), PeerRefusal>) -> Result<(), ServiceError> {
        decision.map_err(|refusal| {
            self.peer.log_refusal(what, &refusal);
            ServiceError::Refused(refusal)
        })
    }

    /// Writes incoming chunks to a temp file in the snapshot dir, fsyncs and verifies it. At most
    /// `max_snapshot_bytes` are written; the temp file is removed on any failure or cancellation.
    async fn receive_snapshot(
        &self,
        meta: &SnapshotMeta,
        mut chunks: SnapshotChunks,
    ) -> Result<TempFile, ServiceError> {
        let shared = self.shared.upgrade().ok_or_else(|| stopped("storage closed"))?;
        let temp = TempFile(Some(shared.snapshots.temp_path()));
        drop(shared);
        let path = temp.0.clone().expect("just set");
        let limit = self.peer.max_snapshot_bytes;
        let result = async {
            let mut file = tokio::fs::File::create(&path).await?;
            let mut received = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                received += chunk.len() as u64;
                if received > limit {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "snapshot exceeds limits.max_snapshot_bytes ({limit} bytes); transfer cut off"
                        ),
                    ));
                }
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            drop(file);
            let path = path.clone();
            let got = tokio::task::spawn_blocking(move || verify_file(&path))
                .await
                .map_err(io::Error::other)?
                .map_err(io::Error::from)?;
            if got.last_log_id != meta.last_log_id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "file holds snapshot up to {:?} but {:?} was announced",
                        got.last_log_id, meta.last_log_id
                    ),
                ));
            }
            Ok(())
        }
        .await;
        result.map(|()| temp).map_err(|e| ServiceError::Snapshot(e.to_string()))
    }
}

impl<SM: StateMachine> RaftService for LocalService<SM> {
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move {
            self.judge("append-entries", self.view().check_leader(&rpc.vote))?;
            self.raft.append_entries(rpc).await.map_err(stopped)
        })
    }

    /// Each request on the stream is judged as it arrives; the first refused one ends the input,
    /// and the stream with it.
    fn stream_append(self: Arc<Self>, input: AppendStream) -> AppendResults {
        let judge = self.clone();
        let input = input.take_while(move |rpc| {
            let admitted = judge.judge("append-entries stream", judge.view().check_leader(&rpc.vote)).is_ok();
            futures_util::future::ready(admitted)
        });
        Box::pin(self.raft.stream_append(Box::pin(input)).map(|r| r.map_err(stopped)))
    }

    fn vote(
        &self,
        mut rpc: VoteRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<VoteResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move {
            self.judge("vote", self.view().check_vote(&rpc.vote, rpc.last_log_id.as_ref()))?;
            if rpc.leadership_transfer
                && !guard::transfer_authorized(self.peer.announced_transfer(), &rpc.vote)
            {
                // Judged as an ordinary vote: the leader lease holds.
                tracing::info!(vote = %rpc.vote, "vote request's leadership-transfer flag cleared: no transfer to it was announced by the leader");
                rpc.leadership_transfer = false;
            }
            self.raft.vote(rpc).await.map_err(stopped)
        })
    }

    fn pre_vote(
        &self,
        rpc: VoteRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<VoteResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move {
            self.judge("pre-vote", self.view().check_vote(&rpc.vote, rpc.last_log_id.as_ref()))?;
            self.raft.pre_vote(rpc).await.map_err(stopped)
        })
    }

    /// The sender and its vote are judged, and a slot taken (one snapshot at a time), before a
    /// byte is written.
    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        chunks: SnapshotChunks,
    ) -> BoxFuture<'_, Result<SnapshotResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move {
            self.judge("snapshot", self.view().check_snapshot(&vote))?;
            let _slot = self
                .peer
                .receiving
                .try_acquire()
                .map_err(|_| ServiceError::Refused(PeerRefusal::SnapshotBusy))?;
            let temp = self.receive_snapshot(&meta, chunks).await?;
            let path = temp.0.clone().expect("held until kept");
            let file = SnapshotFile::open(&path).map_err(|e| ServiceError::Snapshot(e.to_string()))?;
            let res =
                self.raft.install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: file }).await;
            // Installed snapshots were renamed into place; a refused one is still a temp file.
            let path = temp.keep();
            let _ = tokio::fs::remove_file(&path).await;
            res.map_err(stopped)
        })
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move {
            let from = req.from_leader();
            self.judge("transfer-leader", self.view().check_transfer(from))?;
            self.peer.announce_transfer(Transfer { term: from.leader_id().term(), to: *req.to_node_id() });
            self.raft.handle_transfer_leader(req).await.map_err(stopped)
        })
    }

    fn forward(
        &self,
        from: NodeId,
        req: ForwardRequest,
    ) -> BoxFuture<'_, Result<ForwardReply, ServiceError>> {
        Box::pin(async move {
            self.judge("forward", self.view().check_forward(from))?;
            let shared = self.shared.upgrade().ok_or_else(|| stopped("storage closed"))?;
            // The leader checks a forwarded command as its own clients' (nothing unchecked enters
            // the log); storage is not held while the write runs.
            if let ForwardRequest::Write(cmd) = &req {
                if let Err(refused) = forward::check_command(&shared.sm, self.timing.max_command_bytes, cmd) {
                    return Ok(ForwardReply::Failed(refused));
                }
            }
            drop(shared);
            Ok(forward::serve(&self.raft, self.timing, &self.peer, req).await)
        })
    }
}
