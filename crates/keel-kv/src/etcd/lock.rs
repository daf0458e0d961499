//! etcd's `v3lockpb.Lock` and `v3electionpb.Election` services on [`crate::lock`]'s recipes.

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::kv;
use super::pb::v3electionpb as election;
use super::pb::v3lockpb as lock;
use super::EtcdService;
use crate::api::ApiError;
use crate::lock::LeaderKey;

type ObserveStream = Pin<Box<dyn Stream<Item = Result<election::LeaderResponse, Status>> + Send>>;

fn leader_key(k: LeaderKey) -> election::LeaderKey {
    election::LeaderKey { name: k.name, key: k.key, rev: k.rev, lease: k.lease }
}

/// The `leader` field, which etcd requires (`ErrMissingLeaderKey`, a plain error: `UNKNOWN`).
fn required(k: Option<election::LeaderKey>) -> Result<LeaderKey, Status> {
    let k = k.ok_or_else(|| Status::unknown("\"leader\" field must be provided"))?;
    Ok(LeaderKey { name: k.name, key: k.key, rev: k.rev, lease: k.lease })
}

/// etcd's lock and election servers run its client recipes and answer the client's errors as
/// plain errors: gRPC `UNKNOWN` with the server's message (e.g. a lease that does not exist).
fn recipe_status(e: ApiError) -> Status {
    let status = Status::from(e);
    match status.code() {
        tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
            Status::unknown(status.message().to_string())
        }
        _ => status,
    }
}

/// Counts the request and answers its error as etcd's recipe servers do.
fn done<T>(svc: &EtcdService, r: Result<T, ApiError>) -> Result<Response<T>, Status> {
    svc.api.count(true, r.is_err());
    r.map(Response::new).map_err(recipe_status)
}

#[tonic::async_trait]
impl lock::lock_server::Lock for EtcdService {
    async fn lock(
        &self,
        request: Request<lock::LockRequest>,
    ) -> Result<Response<lock::LockResponse>, Status> {
        let r = request.into_inner();
        let result = self
            .api
            .lock(&r.name, r.lease)
            .await
            .map(|(revision, key)| lock::LockResponse { header: self.header(revision), key });
        done(self, result)
    }

    async fn unlock(
        &self,
        request: Request<lock::UnlockRequest>,
    ) -> Result<Response<lock::UnlockResponse>, Status> {
        let key = request.into_inner().key;
        let result = self
            .api
            .unlock(&key)
            .await
            .map(|revision| lock::UnlockResponse { header: self.header(revision) });
        done(self, result)
    }
}

#[tonic::async_trait]
impl election::election_server::Election for EtcdService {
    async fn campaign(
        &self,
        request: Request<election::CampaignRequest>,
    ) -> Result<Response<election::CampaignResponse>, Status> {
        let r = request.into_inner();
        let result = self.api.campaign(&r.name, r.lease, &r.value).await.map(|(revision, leader)| {
            election::CampaignResponse { header: self.header(revision), leader: Some(leader_key(leader)) }
        });
        done(self, result)
    }

    async fn proclaim(
        &self,
        request: Request<election::ProclaimRequest>,
    ) -> Result<Response<election::ProclaimResponse>, Status> {
        let r = request.into_inner();
        let leader = required(r.leader)?;
        let result = self.api.proclaim(&leader, &r.value).await;
        done(self, result.map(|revision| election::ProclaimResponse { header: self.header(revision) }))
    }

    async fn leader(
        &self,
        request: Request<election::LeaderRequest>,
    ) -> Result<Response<election::LeaderResponse>, Status> {
        let name = request.into_inner().name;
        let result = self.api.election_leader(&name).await.map(|(revision, leader)| {
            election::LeaderResponse { header: self.header(revision), kv: Some(kv(leader)) }
        });
        done(self, result)
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<election::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let name = request.into_inner().name;
        let (tx, rx) = mpsc::channel(16);
        let api = self.api.clone();
        tokio::spawn(async move { api.observe(&name, tx).await });
        let svc = self.clone();
        let out = futures_util::stream::unfold(Some(rx), move |rx| {
            let svc = svc.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await? {
                    Ok((revision, leader)) => {
                        let resp =
                            election::LeaderResponse { header: svc.header(revision), kv: Some(kv(leader)) };
                        Some((Ok(resp), Some(rx)))
                    }
                    // The first error ends the stream.
                    Err(e) => Some((Err(recipe_status(e)), None)),
                }
            }
        });
        self.api.count(true, false);
        Ok(Response::new(Box::pin(out)))
    }

    async fn resign(
        &self,
        request: Request<election::ResignRequest>,
    ) -> Result<Response<election::ResignResponse>, Status> {
        let leader = required(request.into_inner().leader)?;
        let result = self.api.resign(&leader).await;
        done(self, result.map(|revision| election::ResignResponse { header: self.header(revision) }))
    }
}
