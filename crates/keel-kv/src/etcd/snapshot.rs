//! `Maintenance.Snapshot`: a point-in-time backup streamed as etcd streams one (the payload's
//! chunks with `remaining_bytes` counting down, then its SHA-256); the reading is in
//! [`crate::backup`].

use std::pin::Pin;

use futures_util::Stream;
use tonic::Status;

use super::rpc;
use super::EtcdService;
use crate::backup;

pub(super) type SnapshotStream = Pin<Box<dyn Stream<Item = Result<rpc::SnapshotResponse, Status>> + Send>>;

impl EtcdService {
    /// The snapshot stream of this member's applied state. The first message's header carries
    /// the snapshot's revision.
    pub(super) fn snapshot_stream(&self) -> SnapshotStream {
        let mut chunks = backup::stream(self.api.node.clone());
        let service = self.clone();
        let mut first = true;
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            chunks.poll_recv(cx).map(|next| {
                next.map(|chunk| match chunk {
                    Ok(chunk) => {
                        let header =
                            if std::mem::take(&mut first) { service.header(chunk.revision) } else { None };
                        Ok(rpc::SnapshotResponse {
                            header,
                            remaining_bytes: chunk.remaining_bytes,
                            blob: chunk.blob,
                        })
                    }
                    Err(e @ backup::StreamError::Busy) => Err(Status::resource_exhausted(e.to_string())),
                    Err(e) => {
                        tracing::warn!("snapshot stream failed: {e}");
                        Err(Status::internal(e.to_string()))
                    }
                })
            })
        }))
    }
}
