//! `GET /metrics`: etcd's main series under etcd's names, types and buckets where Keel has the
//! same quantity (dashboards and alerts written for etcd read them unchanged), next to Keel's own
//! `keel_*` series; encoded by `prometheus-client` (OpenMetrics text).
//!
//! Three kinds of source:
//! - values read when scraped (leader, indexes, sizes, counters kept as atomics elsewhere), put in
//!   a registry built for that scrape;
//! - the gRPC server's per-method counters and handling-time histogram, kept here
//!   ([`GrpcMetrics`], recorded by [`grpc_layer`] around the tonic services);
//! - the storage's timings, which `keel` records ([`keel::metrics::storage`]).
//!
//! Label values are never taken from the request: a method Keel does not serve counts under
//! `grpc_method="unknown"`, so a client cannot grow the series without bound.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Context;
use std::task::Poll;
use std::time::Instant;

use axum::extract::Request;
use axum::extract::State;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::api::KvApi;
use crate::store;

/// gRPC handling-time buckets (go-grpc-prometheus's, which etcd uses: Prometheus's defaults).
const GRPC_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Handled {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// The gRPC server's series (go-grpc-prometheus's names, as etcd exposes them).
#[derive(Debug)]
pub struct GrpcMetrics {
    started: Family<Method, Counter>,
    handled: Family<Handled, Counter>,
    seconds: Family<Method, Histogram>,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        GrpcMetrics {
            started: Family::default(),
            handled: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(GRPC_BUCKETS)),
        }
    }
}

/// Every gRPC method keeld serves: (service, method, grpc_type).
const METHODS: &[(&str, &str, &str)] = &[
    ("etcdserverpb.KV", "Range", "unary"),
    ("etcdserverpb.KV", "Put", "unary"),
    ("etcdserverpb.KV", "DeleteRange", "unary"),
    ("etcdserverpb.KV", "Txn", "unary"),
    ("etcdserverpb.KV", "Compact", "unary"),
    ("etcdserverpb.Watch", "Watch", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseGrant", "unary"),
    ("etcdserverpb.Lease", "LeaseRevoke", "unary"),
    ("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseTimeToLive", "unary"),
    ("etcdserverpb.Lease", "LeaseLeases", "unary"),
    ("etcdserverpb.Cluster", "MemberAdd", "unary"),
    ("etcdserverpb.Cluster", "MemberRemove", "unary"),
    ("etcdserverpb.Cluster", "MemberUpdate", "unary"),
    ("etcdserverpb.Cluster", "MemberList", "unary"),
    ("etcdserverpb.Cluster", "MemberPromote", "unary"),
    ("etcdserverpb.Maintenance", "Alarm", "unary"),
    ("etcdserverpb.Maintenance", "Status", "unary"),
    ("etcdserverpb.Maintenance", "Defragment", "unary"),
    ("etcdserverpb.Maintenance", "Hash", "unary"),
    ("etcdserverpb.Maintenance", "HashKV", "unary"),
    ("etcdserverpb.Maintenance", "Snapshot", "server_stream"),
    ("etcdserverpb.Maintenance", "MoveLeader", "unary"),
    ("etcdserverpb.Maintenance", "Downgrade", "unary"),
    ("etcdserverpb.Auth", "AuthEnable", "unary"),
    ("etcdserverpb.Auth", "AuthDisable", "unary"),
    ("etcdserverpb.Auth", "AuthStatus", "unary"),
    ("etcdserverpb.Auth", "Authenticate", "unary"),
    ("etcdserverpb.Auth", "UserAdd", "unary"),
    ("etcdserverpb.Auth", "UserGet", "unary"),
    ("etcdserverpb.Auth", "UserList", "unary"),
    ("etcdserverpb.Auth", "UserDelete", "unary"),
    ("etcdserverpb.Auth", "UserChangePassword", "unary"),
    ("etcdserverpb.Auth", "UserGrantRole", "unary"),
    ("etcdserverpb.Auth", "UserRevokeRole", "unary"),
    ("etcdserverpb.Auth", "RoleAdd", "unary"),
    ("etcdserverpb.Auth", "RoleGet", "unary"),
    ("etcdserverpb.Auth", "RoleList", "unary"),
    ("etcdserverpb.Auth", "RoleDelete", "unary"),
    ("etcdserverpb.Auth", "RoleGrantPermission", "unary"),
    ("etcdserverpb.Auth", "RoleRevokePermission", "unary"),
    ("v3lockpb.Lock", "Lock", "unary"),
    ("v3lockpb.Lock", "Unlock", "unary"),
    ("v3electionpb.Election", "Campaign", "unary"),
    ("v3electionpb.Election", "Proclaim", "unary"),
    ("v3electionpb.Election", "Leader", "unary"),
    ("v3electionpb.Election", "Observe", "server_stream"),
    ("v3electionpb.Election", "Resign", "unary"),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
];

fn method_of(path: &str) -> Method {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match METHODS.iter().find(|(s, m, _)| *s == service && *m == method) {
        Some((s, m, t)) => Method { grpc_type: t, grpc_service: s, grpc_method: m },
        None => Method { grpc_type: "unknown", grpc_service: "unknown", grpc_method: "unknown" },
    }
}

/// gRPC's status code names, as Go's `codes.Code.String()` spells them.
fn code_name(code: &[u8]) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("Unknown")
}

/// Middleware around the tonic services: counts each call when it starts and when it ends (its
/// `grpc-status`, in the headers of a trailers-only answer or in the trailers), and times it
/// to its end (a stream: to its last message; a client that goes away first: `Canceled`).
pub async fn grpc_layer(State(metrics): State<Arc<GrpcMetrics>>, req: Request, next: Next) -> Response {
    let method = method_of(req.uri().path());
    metrics.started.get_or_create(&method).inc();
    let ending = Ending { metrics, method, started: Instant::now() };
    let response = next.run(req).await;
    if let Some(code) = response.headers().get("grpc-status") {
        ending.end(code.as_bytes());
        return response;
    }
    response.map(|body| axum::body::Body::new(Observed { inner: body, ending: Some(ending) }))
}

/// Records a call's end once.
struct Ending {
    metrics: Arc<GrpcMetrics>,
    method: Method,
    started: Instant,
}

impl Ending {
    fn end(self, code: &[u8]) {
        let Method { grpc_type, grpc_service, grpc_method } = self.method.clone();
        let handled = Handled { grpc_type, grpc_service, grpc_method, grpc_code: code_name(code) };
        self.metrics.handled.get_or_create(&handled).inc();
        self.metrics.seconds.get_or_create(&self.method).observe(self.started.elapsed().as_secs_f64());
    }
}

/// A response body that records its call's end at its trailers (or its failure, or its drop).
struct Observed {
    inner: axum::body::Body,
    ending: Option<Ending>,
}

impl http_body::Body for Observed {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    if let Some(e) = self.ending.take() {
                        e.end(code.as_bytes());
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(e) = self.ending.take() {
                    e.end(b"2");
                }
            }
            Poll::Ready(None) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Ended without trailers: the client went away (or the stream was cut) first.
        if let Some(e) = self.ending.take() {
            e.end(b"1");
        }
    }
}

/// `GET /metrics`'s body: every series, read now.
pub async fn render(api: &KvApi) -> String {
    let s = api.status();
    let keys = api.node.read_local(|_, t| store::key_count(t)).ok().and_then(Result::ok).unwrap_or(0);
    // Serializable: /metrics must answer without a leader.
    let alarms = api.alarms(true).await.unwrap_or_default();
    let c = &api.counters;
    let p = &api.port;
    let has_leader = s.leader.is_some();
    let is_leader = s.leader == Some(s.id);
    let mut r = Registry::default();

    // etcd's series.
    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    let counter = |v: u64| ConstCounter::new(v);
    r.register(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        gauge(has_leader.into()),
    );
    r.register(
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        gauge(is_leader.into()),
    );
    r.register(
        "etcd_server_leader_changes_seen",
        "The number of leader changes seen.",
        counter(c.leader_changes.load(Relaxed)),
    );
    // etcd's proposal counts are raft indexes (gauges despite their `_total` names).
    r.register(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        gauge(s.committed_index),
    );
    r.register(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        gauge(s.applied_index),
    );
    r.register(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit.",
        gauge(c.proposals_pending.load(Relaxed)),
    );
    r.register(
        "etcd_server_proposals_failed",
        "The total number of failed proposals seen.",
        counter(c.proposals_failed.load(Relaxed)),
    );
    r.register(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        gauge(api.db_size()),
    );
    r.register(
        "etcd_server_quota_backend_bytes",
        "Current backend storage quota size in bytes.",
        gauge(api.quota_backend_bytes),
    );
    let storage = keel::metrics::storage();
    r.register(
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of fsync called by WAL (Keel: each group flush of the Raft log).",
        storage.log_flush_seconds.clone(),
    );
    r.register(
        "etcd_disk_backend_commit_duration_seconds",
        "The latency distributions of commit called by backend (Keel: each state machine transaction commit).",
        storage.state_commit_seconds.clone(),
    );
    r.register(
        "etcd_network_peer_round_trip_time_seconds",
        "Round-Trip-Time histogram between peers (Keel: each heartbeat the leader sends, to its answer).",
        keel::metrics::network().peer_round_trip_seconds.clone(),
    );
    let grpc = &api.grpc_metrics;
    r.register("grpc_server_started", "Total number of RPCs started on the server.", grpc.started.clone());
    r.register(
        "grpc_server_handled",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        grpc.handled.clone(),
    );
    r.register("grpc_server_handling_seconds", "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.", grpc.seconds.clone());

    // Keel's own.
    r.register("keel_raft_term", "Current Raft term.", gauge(s.term));
    r.register(
        "keel_raft_leader",
        "Id of the leader this node knows (0: none).",
        gauge(s.leader.unwrap_or(0)),
    );
    r.register("keel_raft_is_leader", "1 if this node is the leader.", gauge(is_leader.into()));
    r.register("keel_raft_last_log_index", "Index of the last entry in the log.", gauge(s.last_log_index));
    r.register("keel_raft_committed_index", "Highest committed index known here.", gauge(s.committed_index));
    r.register("keel_raft_applied_index", "Highest index applied to the store.", gauge(s.applied_index));
    r.register("keel_raft_snapshot_index", "Index covered by the latest snapshot.", gauge(s.snapshot_index));
    r.register("keel_raft_members", "Members in the current membership.", gauge(s.members.len() as u64));
    r.register("keel_log_bytes", "Bytes the Raft log occupies on disk.", gauge(api.node.log_bytes()));
    r.register("keel_kv_revision", "The store's revision.", gauge(u64::try_from(s.revision).unwrap_or(0)));
    r.register("keel_kv_keys", "Keys in the store.", gauge(keys));
    r.register("keel_db_bytes", "Bytes the state machine database file occupies.", gauge(api.db_size()));
    r.register(
        "keel_quota_backend_bytes",
        "The space quota on the state machine database (bytes).",
        gauge(api.quota_backend_bytes),
    );
    let raised: Family<AlarmLabel, prometheus_client::metrics::gauge::Gauge> = Family::default();
    let nospace = alarms.iter().filter(|a| a.alarm == store::AlarmKind::NoSpace).count();
    raised.get_or_create(&AlarmLabel { alarm: "NOSPACE" }).set(nospace as i64);
    r.register("keel_alarms", "Alarms raised in the cluster, by type.", raised);
    let by_api: Family<ApiLabel, ConstCounterCell> = Family::default();
    by_api.get_or_create(&ApiLabel { api: "grpc" }).set(c.grpc_requests.load(Relaxed));
    by_api.get_or_create(&ApiLabel { api: "http" }).set(c.http_requests.load(Relaxed));
    r.register("keel_requests", "Client requests served, by API.", by_api);
    let errors: Family<ApiLabel, ConstCounterCell> = Family::default();
    errors.get_or_create(&ApiLabel { api: "grpc" }).set(c.grpc_errors.load(Relaxed));
    errors.get_or_create(&ApiLabel { api: "http" }).set(c.http_errors.load(Relaxed));
    r.register("keel_request_errors", "Client requests that failed, by API.", errors);
    r.register("keel_client_connections_open", "Open client connections.", gauge(p.open.load(Relaxed)));
    let conns: Family<OutcomeLabel, ConstCounterCell> = Family::default();
    for (outcome, n) in [("accepted", &p.accepted), ("refused", &p.refused), ("timed_out", &p.timed_out)] {
        conns.get_or_create(&OutcomeLabel { outcome }).set(n.load(Relaxed));
    }
    r.register(
        "keel_client_connections",
        "Client connections, by outcome: accepted, refused at the cap, closed by a timeout.",
        conns,
    );

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlarmLabel {
    alarm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// A counter whose value is copied from elsewhere at scrape time (a labelled [`ConstCounter`]).
#[derive(Debug, Default)]
struct ConstCounterCell(std::sync::atomic::AtomicU64);

impl ConstCounterCell {
    fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for ConstCounterCell {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Counter;
}

impl prometheus_client::encoding::EncodeMetric for ConstCounterCell {
    fn encode(&self, encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        ConstCounter::new(self.0.load(Relaxed)).encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}
