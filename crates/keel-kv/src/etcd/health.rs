//! `grpc.health.v1.Health` on the client port, as etcd serves it (gRPC's standard health
//! service, which load balancers and `grpc_health_probe` ask).
//!
//! etcd 3.4 registers the service with the overall status (service name `""`) set to SERVING
//! once and never changes it. Keel answers SERVING only while this member can serve — Raft
//! running, a leader known, the store readable, as `/health` judges — and NOT_SERVING otherwise,
//! so a probe takes a member that has lost its leader out of rotation. Any other service name
//! is unknown, as in grpc-go's health server: `Check` answers NOT_FOUND "unknown service",
//! `Watch` sends SERVICE_UNKNOWN and stays open.

use std::pin::Pin;

use futures_util::Stream;
use futures_util::StreamExt;
use keel::openraft::async_runtime::WatchReceiver;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::HealthCheckResponse;

use crate::api::KvApi;

pub use tonic_health::pb::health_server::HealthServer;

/// The health service of one member.
#[derive(Clone)]
pub struct HealthService {
    api: KvApi,
}

impl HealthService {
    pub fn new(api: KvApi) -> Self {
        Self { api }
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: status as i32 }
}

fn serving(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if !request.into_inner().service.is_empty() {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(answer(serving(self.api.health().is_ok()))))
    }

    type WatchStream = WatchStream;

    /// The current status at once, then each change, judged again whenever this member's Raft
    /// role, vote, leader or membership changes; the stream ends with Raft. It holds only
    /// receivers of Raft's metrics, not the node, so an open watch never holds up a shutdown.
    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        if !request.into_inner().service.is_empty() {
            let unknown = futures_util::stream::once(async { Ok(answer(ServingStatus::ServiceUnknown)) });
            return Ok(Response::new(Box::pin(unknown.chain(futures_util::stream::pending()))));
        }
        let metrics = self.api.node.raft().metrics();
        let server = self.api.node.raft().server_metrics();
        let changes =
            futures_util::stream::unfold((metrics, server, None), |(metrics, mut server, last)| async move {
                loop {
                    let ok = {
                        let m = metrics.borrow_watched();
                        m.running_state.is_ok() && m.current_leader.is_some()
                    };
                    let now = serving(ok);
                    if last != Some(now) {
                        return Some((Ok(answer(now)), (metrics, server, Some(now))));
                    }
                    // The sender goes with Raft's core task: then the stream ends.
                    server.changed().await.ok()?;
                }
            });
        Ok(Response::new(Box::pin(changes)))
    }
}
