//! etcd's `Lease` service on [`KvApi`](crate::api::KvApi)'s leases (see [`crate::lease`] for who
//! keeps the timers and what a keep-alive promises).

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::sync::Semaphore;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::rpc;
use super::EtcdService;
use crate::lease::FORWARDED;

/// Keep-alives of one stream being answered at once; past it the stream is read no further until
/// one is answered.
const KEEP_ALIVES_IN_FLIGHT: usize = 128;
/// Answers queued for one keep-alive stream's client.
const OUT_CHANNEL: usize = 256;

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<rpc::LeaseKeepAliveResponse, Status>> + Send>>;

fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

#[tonic::async_trait]
impl rpc::lease_server::Lease for EtcdService {
    async fn lease_grant(
        &self,
        request: Request<rpc::LeaseGrantRequest>,
    ) -> Result<Response<rpc::LeaseGrantResponse>, Status> {
        let r = request.into_inner();
        let result = self.api.lease_grant(r.ttl, r.id).await.map(|(revision, id, ttl)| {
            rpc::LeaseGrantResponse { header: self.header(revision), id, ttl, error: String::new() }
        });
        self.done(result)
    }

    async fn lease_revoke(
        &self,
        request: Request<rpc::LeaseRevokeRequest>,
    ) -> Result<Response<rpc::LeaseRevokeResponse>, Status> {
        // With auth on, the user must be allowed to write every key on the lease (etcd), judged
        // at apply.
        let result = async {
            let user = self.user_of(&request)?;
            let id = request.into_inner().id;
            let (revision, _) =
                self.api.write_as(user.as_ref(), crate::store::KvCommand::LeaseRevoke { id }).await?;
            Ok(rpc::LeaseRevokeResponse { header: self.header(revision) })
        }
        .await;
        self.done(result)
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    /// Each request is answered on its own (in any order: answers carry the id), at most
    /// [`KEEP_ALIVES_IN_FLIGHT`] at once. A lease that is gone is answered TTL 0, as etcd does; an
    /// error (no leader) ends the stream, and the client opens a new one.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<rpc::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let forwarded = forwarded(&request);
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<rpc::LeaseKeepAliveResponse, Status>>(OUT_CHANNEL);
        let svc = self.clone();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(KEEP_ALIVES_IN_FLIGHT));
            let closed = svc.api.hub().closed();
            tokio::pin!(closed);
            loop {
                let next = tokio::select! {
                    next = requests.message() => next,
                    () = &mut closed => {
                        let _ = tx.send(Err(Status::unavailable("etcdserver: server stopped"))).await;
                        return;
                    }
                    () = tx.closed() => return,
                };
                let id = match next {
                    Ok(Some(r)) => r.id,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!("keep-alive stream: {e}");
                        return;
                    }
                };
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (svc, tx) = (svc.clone(), tx.clone());
                tokio::spawn(async move {
                    let answer = svc.api.lease_keep_alive(id, forwarded).await;
                    svc.api.count(true, answer.is_err());
                    let answer = answer
                        // The revision from memory: a read transaction per keep-alive costs.
                        .map(|ttl| rpc::LeaseKeepAliveResponse {
                            header: svc.header(svc.api.hub().revision()),
                            id,
                            ttl,
                        })
                        .map_err(Status::from);
                    let _ = tx.send(answer).await;
                    drop(permit);
                });
            }
        });
        // The first error ends the stream.
        let out = futures_util::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            let item = rx.recv().await?;
            let next = if item.is_err() { None } else { Some(rx) };
            Some((item, next))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<rpc::LeaseTimeToLiveRequest>,
    ) -> Result<Response<rpc::LeaseTimeToLiveResponse>, Status> {
        let forwarded = forwarded(&request);
        let r = request.into_inner();
        let result = self.api.lease_time_to_live(r.id, r.keys, forwarded).await.map(|t| {
            rpc::LeaseTimeToLiveResponse {
                header: self.header(self.api.revision()),
                id: t.id,
                ttl: t.ttl,
                granted_ttl: t.granted_ttl,
                keys: t.keys,
            }
        });
        self.done(result)
    }

    async fn lease_leases(
        &self,
        _request: Request<rpc::LeaseLeasesRequest>,
    ) -> Result<Response<rpc::LeaseLeasesResponse>, Status> {
        let result = self.api.lease_list().await.map(|ids| rpc::LeaseLeasesResponse {
            header: self.header(self.api.revision()),
            leases: ids.into_iter().map(|id| rpc::LeaseStatus { id }).collect(),
        });
        self.done(result)
    }
}
