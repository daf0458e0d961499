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
use crate::auth::Access;
use crate::auth::Need;
use crate::auth::PermType;
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

/// What a lock or an election named `name` touches with auth on: it puts, reads and deletes the
/// keys under `name/` (etcd's recipes run as the caller, so its permissions apply to them).
fn recipe_keys(name: &[u8]) -> Need {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let end = crate::store::prefix_range_end(&prefix);
    Need::Keys(vec![Access::new(&prefix, &end, PermType::Read), Access::new(&prefix, &end, PermType::Write)])
}

/// Writing one key (unlock, proclaim, resign: the caller's own key).
fn write_key(key: &[u8]) -> Need {
    Need::Keys(vec![Access::new(key, &[], PermType::Write)])
}

/// Reading the keys under `name/` (leader, observe).
fn read_keys(name: &[u8]) -> Need {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    let end = crate::store::prefix_range_end(&prefix);
    Need::Keys(vec![Access::new(&prefix, &end, PermType::Read)])
}

impl EtcdService {
    /// Refuses unless the sender of `request` may do what `need` says.
    fn allow<T>(&self, request: &Request<T>, need: &Need) -> Result<(), ApiError> {
        self.api.authorize(self.user_of(request)?.as_ref(), need)
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
        if let Err(e) = self.allow(&request, &recipe_keys(&request.get_ref().name)) {
            return done(self, Err(e));
        }
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
        if let Err(e) = self.allow(&request, &write_key(&request.get_ref().key)) {
            return done(self, Err(e));
        }
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
        if let Err(e) = self.allow(&request, &recipe_keys(&request.get_ref().name)) {
            return done(self, Err(e));
        }
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
        if let Err(e) = self.allow(
            &request,
            &write_key(request.get_ref().leader.as_ref().map_or(&[][..], |l| l.key.as_slice())),
        ) {
            return done(self, Err(e));
        }
        let r = request.into_inner();
        let leader = required(r.leader)?;
        let result = self.api.proclaim(&leader, &r.value).await;
        done(self, result.map(|revision| election::ProclaimResponse { header: self.header(revision) }))
    }

    async fn leader(
        &self,
        request: Request<election::LeaderRequest>,
    ) -> Result<Response<election::LeaderResponse>, Status> {
        if let Err(e) = self.allow(&request, &read_keys(&request.get_ref().name)) {
            return done(self, Err(e));
        }
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
        if let Err(e) = self.allow(&request, &read_keys(&request.get_ref().name)) {
            return done(self, Err(e));
        }
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
        if let Err(e) = self.allow(
            &request,
            &write_key(request.get_ref().leader.as_ref().map_or(&[][..], |l| l.key.as_slice())),
        ) {
            return done(self, Err(e));
        }
        let leader = required(request.into_inner().leader)?;
        let result = self.api.resign(&leader).await;
        done(self, result.map(|revision| election::ResignResponse { header: self.header(revision) }))
    }
}
