//! The peer transport seam.
//!
//! [`RaftService`] is what a node offers its peers: every transport (in-process channels, gRPC)
//! receives a message, finds the target node's `RaftService` and calls it. The sending side
//! is openraft's `RaftNetworkFactory`/`RaftNetworkV2`, implemented per transport.
//!
//! - [`in_process`]: nodes of one process, through a shared router (tests, simulations).
//! - [`grpc`]: nodes on a network, over gRPC (tonic): [`grpc::PeerServer`] and [`grpc::GrpcNetwork`].

pub mod grpc;
pub mod in_process;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use futures_util::StreamExt;
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
use crate::state_machine::StateMachine;
use crate::storage::sm_store::SmShared;
use crate::storage::sm_store::SmStore;
use crate::storage::snapshot::verify_file;
use crate::storage::snapshot::SnapshotFile;
use crate::types::KeelTypes;
use crate::types::Raft;
use crate::types::SnapshotMeta;
use crate::types::Vote;

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

    /// Serves a request a follower forwarded to this node as the leader.
    fn forward(&self, req: ForwardRequest) -> BoxFuture<'_, Result<ForwardReply, ServiceError>>;
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

/// The [`RaftService`] of a local node.
///
/// It holds the storage weakly: a transport that still has it registered after `Node::shutdown`
/// gets `Stopped` answers, and does not keep the database open.
pub(crate) struct LocalService<SM: StateMachine> {
    pub raft: Raft<SmStore<SM>>,
    pub shared: std::sync::Weak<SmShared<SM>>,
    pub timing: Timing,
}

fn stopped(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Stopped(e.to_string())
}

impl<SM: StateMachine> LocalService<SM> {
    /// Writes incoming chunks to a temp file in the snapshot dir, fsyncs and verifies it.
    async fn receive_snapshot(
        &self,
        meta: &SnapshotMeta,
        mut chunks: SnapshotChunks,
    ) -> Result<PathBuf, ServiceError> {
        let shared = self.shared.upgrade().ok_or_else(|| stopped("storage closed"))?;
        let temp = shared.snapshots.temp_path();
        drop(shared);
        let result = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            while let Some(chunk) = chunks.next().await {
                file.write_all(&chunk?).await?;
            }
            file.sync_all().await?;
            drop(file);
            let path = temp.clone();
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
        match result {
            Ok(()) => Ok(temp),
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                Err(ServiceError::Snapshot(e.to_string()))
            }
        }
    }
}

impl<SM: StateMachine> RaftService for LocalService<SM> {
    fn append_entries(
        &self,
        rpc: AppendEntriesRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<AppendEntriesResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move { self.raft.append_entries(rpc).await.map_err(stopped) })
    }

    fn stream_append(self: Arc<Self>, input: AppendStream) -> AppendResults {
        Box::pin(self.raft.stream_append(input).map(|r| r.map_err(stopped)))
    }

    fn vote(
        &self,
        rpc: VoteRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<VoteResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move { self.raft.vote(rpc).await.map_err(stopped) })
    }

    fn pre_vote(
        &self,
        rpc: VoteRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<VoteResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move { self.raft.pre_vote(rpc).await.map_err(stopped) })
    }

    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        chunks: SnapshotChunks,
    ) -> BoxFuture<'_, Result<SnapshotResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move {
            let temp = self.receive_snapshot(&meta, chunks).await?;
            let file = SnapshotFile::open(&temp).map_err(|e| ServiceError::Snapshot(e.to_string()))?;
            let res =
                self.raft.install_full_snapshot(vote, openraft::Snapshot { meta, snapshot: file }).await;
            // Installed snapshots were renamed into place; a refused one is still a temp file.
            let _ = tokio::fs::remove_file(&temp).await;
            res.map_err(stopped)
        })
    }

    fn transfer_leader(
        &self,
        req: TransferLeaderRequest<KeelTypes>,
    ) -> BoxFuture<'_, Result<TransferLeaderResponse<KeelTypes>, ServiceError>> {
        Box::pin(async move { self.raft.handle_transfer_leader(req).await.map_err(stopped) })
    }

    fn forward(&self, req: ForwardRequest) -> BoxFuture<'_, Result<ForwardReply, ServiceError>> {
        Box::pin(async move {
            if self.shared.strong_count() == 0 {
                return Err(stopped("storage closed"));
            }
            Ok(forward::serve(&self.raft, self.timing, req).await)
        })
    }
}
