//! The etcd v3 gRPC API (`etcdserverpb.KV`, `Cluster`, `Maintenance`) on [`KvApi`].
//!
//! Errors carry etcd's own gRPC codes and `etcdserver: …` messages, which etcd client libraries
//! match on (e.g. `ErrCompacted`, `ErrNoLeader`), followed by Keel's detail where it helps.

use keel::NodeId;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::api::ApiError;
use crate::api::KvApi;
use crate::api::Member;
use crate::store;
use crate::store::KvError;
use crate::store::OpResult;

/// Code generated from `proto/` (Keel's own files for etcd's wire format).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
        include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
        include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
    }
}

use pb::etcdserverpb as rpc;
use pb::mvccpb;

mod auth;
pub mod health;
mod lease;
mod lock;
mod snapshot;
mod watch;
pub use watch::MAX_WATCHERS_PER_STREAM;

/// The etcd API level Keel speaks (`/version`; plain integers, as clients parse them).
pub const ETCD_VERSION: &str = "3.5.0";

/// What Maintenance.Status reports as the server version: [`ETCD_VERSION`], tagged.
pub const SERVER_VERSION: &str = concat!("3.5.0-keel.", env!("CARGO_PKG_VERSION"));

/// Room for gRPC framing and the request's own fields beyond a maximal key and value (etcd's).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// etcd's error: its exact gRPC code and message (etcd clients turn known messages back into typed
/// errors, so the text must match), with Keel's explanation in the `keel-detail` metadata.
fn etcd_error(code: tonic::Code, message: &str, detail: &str) -> Status {
    let mut status = Status::new(code, message);
    let ascii: String =
        detail.chars().map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { '?' }).collect();
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(ascii.as_str()) {
        status.metadata_mut().insert("keel-detail", v);
    }
    status
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let detail = e.to_string();
        let (code, message) = match &e {
            ApiError::BadRequest(m) => return Status::invalid_argument(format!("etcdserver: {m}")),
            ApiError::KeyTooLarge { .. } => (Code::InvalidArgument, "etcdserver: key is too large"),
            ApiError::RequestTooLarge { .. } => (Code::InvalidArgument, "etcdserver: request is too large"),
            ApiError::KeyNotFound | ApiError::Kv(KvError::KeyNotFound) => {
                (Code::InvalidArgument, "etcdserver: key not found")
            }
            ApiError::UnknownMember(_) => (Code::NotFound, "etcdserver: member not found"),
            ApiError::Kv(KvError::Compacted { .. }) => {
                (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
            }
            ApiError::Kv(KvError::FutureRevision { .. }) => {
                (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
            }
            ApiError::Kv(KvError::LeaseNotFound) => (Code::NotFound, "etcdserver: requested lease not found"),
            ApiError::Kv(KvError::LeaseExists) => {
                (Code::FailedPrecondition, "etcdserver: lease already exists")
            }
            ApiError::LeaseTtlTooLarge => (Code::OutOfRange, "etcdserver: too large lease TTL"),
            // etcd's election server answers its recipe's plain errors: gRPC's UNKNOWN.
            ApiError::ElectionNotLeader => (Code::Unknown, "election: not leader"),
            ApiError::ElectionNoLeader => (Code::Unknown, "election: no leader"),
            ApiError::Kv(KvError::NoSpace) => {
                (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded")
            }
            ApiError::Kv(KvError::InvalidRequest(m)) => {
                return Status::invalid_argument(format!("etcdserver: {m}"))
            }
            // etcd has no such error (it would build the answer, then gRPC refuses to send it
            // with RESOURCE_EXHAUSTED): the same code, with the way out in the message.
            ApiError::Kv(e @ KvError::ResponseTooLarge { .. }) => {
                return Status::resource_exhausted(format!("etcdserver: {e}"))
            }
            ApiError::Kv(KvError::Auth(a)) => return auth_status(a),
            ApiError::NotLearner(_) => {
                (Code::FailedPrecondition, "etcdserver: can only promote a learner member")
            }
            ApiError::LearnerNotReady(_) => (
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member which is in sync with leader",
            ),
            ApiError::PeerAddrExists(..) => {
                (Code::FailedPrecondition, "etcdserver: Peer URLs already exists")
            }
            ApiError::MemberExists(_) => (Code::FailedPrecondition, "etcdserver: member ID already exist"),
            ApiError::BadTransferee(_) => (Code::FailedPrecondition, "etcdserver: bad leader transferee"),
            ApiError::Rejected(m) => return Status::failed_precondition(format!("etcdserver: {m}")),
            ApiError::NoLeader(_) => (Code::Unavailable, "etcdserver: no leader"),
            ApiError::Unavailable(_) => (Code::Unavailable, "etcdserver: request timed out"),
            ApiError::Unknown(_) => {
                (Code::Unavailable, "etcdserver: request timed out, possibly due to connection lost")
            }
            ApiError::Internal(m) => return Status::internal(format!("etcdserver: {m}")),
        };
        etcd_error(code, message, &detail)
    }
}

/// etcd's gRPC error for an auth refusal (`rpctypes`): its code, and its message word for word.
fn auth_status(e: &crate::auth::AuthError) -> Status {
    use crate::auth::AuthError as A;
    use tonic::Code;
    let code = match e {
        A::RootUserNotExist
        | A::RootRoleNotExist
        | A::UserAlreadyExist
        | A::UserNotFound
        | A::RoleAlreadyExist
        | A::RoleNotFound
        | A::RoleNotGranted
        | A::PermissionNotGranted
        | A::AuthNotEnabled => Code::FailedPrecondition,
        A::UserEmpty | A::RoleEmpty | A::AuthFailed | A::InvalidAuthMgmt => Code::InvalidArgument,
        A::PermissionDenied => Code::PermissionDenied,
        A::InvalidAuthToken => Code::Unauthenticated,
    };
    Status::new(code, format!("etcdserver: {e}"))
}

/// Serves the etcd services; one clone per service.
#[derive(Clone)]
pub struct EtcdService {
    api: KvApi,
}

impl EtcdService {
    pub fn new(api: KvApi) -> Self {
        Self { api }
    }

    fn header(&self, revision: i64) -> Option<rpc::ResponseHeader> {
        Some(rpc::ResponseHeader {
            cluster_id: self.api.cluster_id,
            member_id: self.api.member_id(),
            revision,
            raft_term: self.api.term(),
        })
    }

    fn members(&self) -> Vec<rpc::Member> {
        self.api.members().iter().map(|m| member(m, &self.api.tls)).collect()
    }

    /// Counts the request and converts its error.
    fn done<T>(&self, r: Result<T, ApiError>) -> Result<Response<T>, Status> {
        self.api.count(true, r.is_err());
        r.map(Response::new).map_err(Status::from)
    }

    /// Who sent `request` while auth is on (None: auth is off here): the user its `token`
    /// metadata names (etcd's key; `authorization` as etcd 3.5 also reads it), else the CN of the
    /// verified TLS client certificate of its connection.
    fn user_of<T>(&self, request: &Request<T>) -> Result<Option<crate::auth::Caller>, ApiError> {
        let md = request.metadata();
        let token = md.get("token").or_else(|| md.get("authorization")).and_then(|v| v.to_str().ok());
        let cert = request.extensions().get::<crate::client_port::ClientCertName>().map(|c| c.0.as_str());
        self.api.request_user(token, cert)
    }

    /// Refuses unless the sender of `request` holds role `root` (etcd's `IsAdminPermitted`).
    fn admin<T>(&self, request: &Request<T>) -> Result<(), ApiError> {
        self.api.authorize(self.user_of(request)?.as_ref(), &crate::auth::Need::Root)
    }

    fn check_size(&self, msg: &impl prost::Message) -> Result<(), ApiError> {
        self.api.check_size(msg.encoded_len())
    }
}

fn member(m: &Member, tls: &crate::api::TlsSettings) -> rpc::Member {
    // etcd shows a member that has not published its client address yet with an empty name
    // (etcdctl prints it as "unstarted").
    let name = if m.client_addr.is_empty() { String::new() } else { format!("keel{}", m.id) };
    rpc::Member {
        id: m.id,
        name,
        peer_ur_ls: tls.urls(&m.peer_addr, true),
        client_ur_ls: tls.urls(&m.client_addr, false),
        is_learner: !m.voter,
    }
}

fn alarm_member(a: store::AlarmMember) -> rpc::AlarmMember {
    let alarm = match a.alarm {
        store::AlarmKind::NoSpace => rpc::AlarmType::Nospace,
    };
    rpc::AlarmMember { member_id: a.member_id, alarm: alarm as i32 }
}

fn kv(k: store::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        value: k.value,
        lease: k.lease,
    }
}

fn range_of(r: rpc::RangeRequest) -> store::Range {
    use rpc::range_request::SortOrder as O;
    use rpc::range_request::SortTarget as T;
    store::Range {
        sort_order: match O::try_from(r.sort_order).unwrap_or(O::None) {
            O::None => store::SortOrder::None,
            O::Ascend => store::SortOrder::Ascend,
            O::Descend => store::SortOrder::Descend,
        },
        sort_target: match T::try_from(r.sort_target).unwrap_or(T::Key) {
            T::Key => store::SortTarget::Key,
            T::Version => store::SortTarget::Version,
            T::Create => store::SortTarget::Create,
            T::Mod => store::SortTarget::Mod,
            T::Value => store::SortTarget::Value,
        },
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    }
}

fn put_of(p: rpc::PutRequest) -> store::Put {
    store::Put {
        key: p.key,
        value: p.value,
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    }
}

fn delete_of(d: rpc::DeleteRangeRequest) -> store::DeleteRange {
    store::DeleteRange { key: d.key, range_end: d.range_end, prev_kv: d.prev_kv }
}

fn txn_of(t: rpc::TxnRequest) -> Result<store::Txn, ApiError> {
    let ops = |ops: Vec<rpc::RequestOp>| -> Result<Vec<store::Op>, ApiError> {
        ops.into_iter()
            .map(|op| match op.request {
                Some(rpc::request_op::Request::RequestRange(r)) => Ok(store::Op::Range(range_of(r))),
                Some(rpc::request_op::Request::RequestPut(p)) => Ok(store::Op::Put(put_of(p))),
                Some(rpc::request_op::Request::RequestDeleteRange(d)) => {
                    Ok(store::Op::DeleteRange(delete_of(d)))
                }
                Some(rpc::request_op::Request::RequestTxn(t)) => Ok(store::Op::Txn(txn_of(t)?)),
                None => Err(ApiError::BadRequest("txn op has no request".into())),
            })
            .collect()
    };
    let compare = t
        .compare
        .into_iter()
        .map(|c| {
            use rpc::compare::CompareResult as R;
            use rpc::compare::CompareTarget as T;
            use rpc::compare::TargetUnion as U;
            let result = match R::try_from(c.result) {
                Ok(R::Equal) => store::CompareResult::Equal,
                Ok(R::Greater) => store::CompareResult::Greater,
                Ok(R::Less) => store::CompareResult::Less,
                Ok(R::NotEqual) => store::CompareResult::NotEqual,
                Err(_) => return Err(ApiError::BadRequest(format!("unknown compare result {}", c.result))),
            };
            let target = match (T::try_from(c.target), c.target_union) {
                (Ok(T::Version), u) => store::CompareTarget::Version(match u {
                    Some(U::Version(v)) => v,
                    _ => 0,
                }),
                (Ok(T::Create), u) => store::CompareTarget::Create(match u {
                    Some(U::CreateRevision(v)) => v,
                    _ => 0,
                }),
                (Ok(T::Mod), u) => store::CompareTarget::Mod(match u {
                    Some(U::ModRevision(v)) => v,
                    _ => 0,
                }),
                (Ok(T::Value), u) => store::CompareTarget::Value(match u {
                    Some(U::Value(v)) => v,
                    _ => Vec::new(),
                }),
                (Ok(T::Lease), u) => store::CompareTarget::Lease(match u {
                    Some(U::Lease(v)) => v,
                    _ => 0,
                }),
                (Err(_), _) => {
                    return Err(ApiError::BadRequest(format!("unknown compare target {}", c.target)))
                }
            };
            Ok(store::Compare { key: c.key, range_end: c.range_end, result, target })
        })
        .collect::<Result<_, _>>()?;
    Ok(store::Txn { compare, success: ops(t.success)?, failure: ops(t.failure)? })
}

impl EtcdService {
    fn txn_response(&self, revision: i64, t: store::TxnResult) -> rpc::TxnResponse {
        let responses = t
            .responses
            .into_iter()
            .map(|r| rpc::ResponseOp {
                response: match r {
                    OpResult::MemberId(_)
                    | OpResult::Alarms(_)
                    | OpResult::LeaseGranted { .. }
                    | OpResult::LeaseRevoked { .. }
                    | OpResult::Auth { .. } => None,
                    r => Some(match r {
                        OpResult::Range(r) => rpc::response_op::Response::ResponseRange(rpc::RangeResponse {
                            header: self.header(revision),
                            kvs: r.kvs.into_iter().map(kv).collect(),
                            more: r.more,
                            count: r.count,
                        }),
                        OpResult::Put { prev_kv } => {
                            rpc::response_op::Response::ResponsePut(rpc::PutResponse {
                                header: self.header(revision),
                                prev_kv: prev_kv.map(kv),
                            })
                        }
                        OpResult::DeleteRange { deleted, prev_kvs } => {
                            rpc::response_op::Response::ResponseDeleteRange(rpc::DeleteRangeResponse {
                                header: self.header(revision),
                                deleted,
                                prev_kvs: prev_kvs.into_iter().map(kv).collect(),
                            })
                        }
                        OpResult::Txn(t) => {
                            rpc::response_op::Response::ResponseTxn(self.txn_response(revision, t))
                        }
                        OpResult::MemberId(_)
                        | OpResult::Alarms(_)
                        | OpResult::LeaseGranted { .. }
                        | OpResult::LeaseRevoked { .. }
                        | OpResult::Auth { .. } => return rpc::ResponseOp { response: None },
                    }),
                },
            })
            .collect();
        rpc::TxnResponse { header: self.header(revision), succeeded: t.succeeded, responses }
    }

    async fn range(
        &self,
        user: Option<&crate::auth::Caller>,
        r: rpc::RangeRequest,
    ) -> Result<rpc::RangeResponse, ApiError> {
        let serializable = r.serializable;
        let (revision, result) = self.api.range_as(user, &range_of(r), serializable).await?;
        Ok(rpc::RangeResponse {
            header: self.header(revision),
            kvs: result.kvs.into_iter().map(kv).collect(),
            more: result.more,
            count: result.count,
        })
    }

    async fn put(
        &self,
        user: Option<&crate::auth::Caller>,
        p: rpc::PutRequest,
    ) -> Result<rpc::PutResponse, ApiError> {
        self.check_size(&p)?;
        match self.api.write_as(user, store::KvCommand::Put(put_of(p))).await? {
            (revision, OpResult::Put { prev_kv }) => {
                Ok(rpc::PutResponse { header: self.header(revision), prev_kv: prev_kv.map(kv) })
            }
            (_, other) => Err(ApiError::Internal(format!("put answered {other:?}"))),
        }
    }

    async fn delete_range(
        &self,
        user: Option<&crate::auth::Caller>,
        d: rpc::DeleteRangeRequest,
    ) -> Result<rpc::DeleteRangeResponse, ApiError> {
        self.check_size(&d)?;
        match self.api.write_as(user, store::KvCommand::DeleteRange(delete_of(d))).await? {
            (revision, OpResult::DeleteRange { deleted, prev_kvs }) => Ok(rpc::DeleteRangeResponse {
                header: self.header(revision),
                deleted,
                prev_kvs: prev_kvs.into_iter().map(kv).collect(),
            }),
            (_, other) => Err(ApiError::Internal(format!("delete answered {other:?}"))),
        }
    }

    async fn txn(
        &self,
        user: Option<&crate::auth::Caller>,
        t: rpc::TxnRequest,
    ) -> Result<rpc::TxnResponse, ApiError> {
        self.check_size(&t)?;
        let txn = txn_of(t)?;
        // Every txn, read-only ones included, goes through the log: its reads and compares are then
        // linearizable with every write (and its permissions judged at apply, the whole txn at once).
        match self.api.write_as(user, store::KvCommand::Txn(txn)).await? {
            (revision, OpResult::Txn(t)) => Ok(self.txn_response(revision, t)),
            (_, other) => Err(ApiError::Internal(format!("txn answered {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl rpc::kv_server::Kv for EtcdService {
    async fn range(
        &self,
        request: Request<rpc::RangeRequest>,
    ) -> Result<Response<rpc::RangeResponse>, Status> {
        let r = async {
            let user = self.user_of(&request)?;
            EtcdService::range(self, user.as_ref(), request.into_inner()).await
        }
        .await;
        self.done(r)
    }

    async fn put(&self, request: Request<rpc::PutRequest>) -> Result<Response<rpc::PutResponse>, Status> {
        let r = async {
            let user = self.user_of(&request)?;
            EtcdService::put(self, user.as_ref(), request.into_inner()).await
        }
        .await;
        self.done(r)
    }

    async fn delete_range(
        &self,
        request: Request<rpc::DeleteRangeRequest>,
    ) -> Result<Response<rpc::DeleteRangeResponse>, Status> {
        let r = async {
            let user = self.user_of(&request)?;
            EtcdService::delete_range(self, user.as_ref(), request.into_inner()).await
        }
        .await;
        self.done(r)
    }

    async fn txn(&self, request: Request<rpc::TxnRequest>) -> Result<Response<rpc::TxnResponse>, Status> {
        let r = async {
            let user = self.user_of(&request)?;
            EtcdService::txn(self, user.as_ref(), request.into_inner()).await
        }
        .await;
        self.done(r)
    }

    async fn compact(
        &self,
        request: Request<rpc::CompactionRequest>,
    ) -> Result<Response<rpc::CompactionResponse>, Status> {
        let req = request.into_inner();
        let r = self
            .api
            .compact(req.revision, req.physical)
            .await
            .map(|rev| rpc::CompactionResponse { header: self.header(rev) });
        self.done(r)
    }
}

#[tonic::async_trait]
impl rpc::cluster_server::Cluster for EtcdService {
    async fn member_add(
        &self,
        request: Request<rpc::MemberAddRequest>,
    ) -> Result<Response<rpc::MemberAddResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        let req = request.into_inner();
        let r = async {
            let peer = match req.peer_ur_ls.as_slice() {
                [one] => one.clone(),
                [] => return Err(ApiError::BadRequest("member add needs a peer URL".into())),
                _ => return Err(ApiError::BadRequest("Keel members have exactly one peer URL".into())),
            };
            let added = self.api.add_member(None, &peer, "", req.is_learner).await?;
            Ok(rpc::MemberAddResponse {
                header: self.header(self.api.revision()),
                member: Some(member(&added, &self.api.tls)),
                members: self.members(),
            })
        }
        .await;
        self.done(r)
    }

    async fn member_remove(
        &self,
        request: Request<rpc::MemberRemoveRequest>,
    ) -> Result<Response<rpc::MemberRemoveResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        let id = request.into_inner().id;
        let r = async {
            self.api.remove_member(id).await?;
            Ok(rpc::MemberRemoveResponse {
                header: self.header(self.api.revision()),
                members: self.members(),
            })
        }
        .await;
        self.done(r)
    }

    async fn member_update(
        &self,
        request: Request<rpc::MemberUpdateRequest>,
    ) -> Result<Response<rpc::MemberUpdateResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        let req = request.into_inner();
        let r = async {
            let [peer] = req.peer_ur_ls.as_slice() else {
                return Err(ApiError::BadRequest("Keel members have exactly one peer URL".into()));
            };
            self.api.update_member(req.id, peer).await?;
            Ok(rpc::MemberUpdateResponse {
                header: self.header(self.api.revision()),
                members: self.members(),
            })
        }
        .await;
        self.done(r)
    }

    async fn member_list(
        &self,
        request: Request<rpc::MemberListRequest>,
    ) -> Result<Response<rpc::MemberListResponse>, Status> {
        let r = async {
            if request.into_inner().linearizable {
                self.api.node.linearize().await?;
            }
            Ok(rpc::MemberListResponse { header: self.header(self.api.revision()), members: self.members() })
        }
        .await;
        self.done(r)
    }

    async fn member_promote(
        &self,
        request: Request<rpc::MemberPromoteRequest>,
    ) -> Result<Response<rpc::MemberPromoteResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        let id = request.into_inner().id;
        let r = async {
            self.api.promote(id).await?;
            Ok(rpc::MemberPromoteResponse {
                header: self.header(self.api.revision()),
                members: self.members(),
            })
        }
        .await;
        self.done(r)
    }
}

#[tonic::async_trait]
impl rpc::maintenance_server::Maintenance for EtcdService {
    /// etcd's alarms: GET lists them (a linearizable read; `alarm` NONE: every type), ACTIVATE
    /// and DEACTIVATE change one through Raft and answer it if it changed. Keel knows only
    /// NOSPACE: activating another type is refused, and nothing else is ever listed.
    async fn alarm(
        &self,
        request: Request<rpc::AlarmRequest>,
    ) -> Result<Response<rpc::AlarmResponse>, Status> {
        use rpc::alarm_request::AlarmAction as A;
        let req = request.into_inner();
        let r = async {
            let kind = match rpc::AlarmType::try_from(req.alarm) {
                Ok(rpc::AlarmType::Nospace) => Some(store::AlarmKind::NoSpace),
                Ok(rpc::AlarmType::None) | Ok(rpc::AlarmType::Corrupt) => None,
                Err(_) => return Err(ApiError::BadRequest(format!("unknown alarm type {}", req.alarm))),
            };
            let member = |alarm| store::AlarmMember { member_id: req.member_id, alarm };
            let alarms = match (A::try_from(req.action), kind) {
                (Ok(A::Get), _) => {
                    let all = self.api.alarms(false).await?;
                    all.into_iter().filter(|a| kind.is_none_or(|k| a.alarm == k)).collect()
                }
                (Ok(A::Activate), Some(kind)) => {
                    self.api.change_alarm(store::AlarmAction::Activate, member(kind)).await?
                }
                // etcd ignores activating NONE; CORRUPT is an alarm Keel does not raise (a
                // corruption stops the node), so it is refused rather than silently ignored.
                (Ok(A::Activate), None) if req.alarm == rpc::AlarmType::None as i32 => vec![],
                (Ok(A::Activate), None) => {
                    return Err(ApiError::BadRequest("Keel supports only the NOSPACE alarm".into()))
                }
                (Ok(A::Deactivate), Some(kind)) => {
                    self.api.change_alarm(store::AlarmAction::Deactivate, member(kind)).await?
                }
                // No such alarm can be raised here: nothing to clear (etcd answers none too).
                (Ok(A::Deactivate), None) => vec![],
                (Err(_), _) => {
                    return Err(ApiError::BadRequest(format!("unknown alarm action {}", req.action)))
                }
            };
            // etcd's maintenance server answers alarms without a header.
            Ok(rpc::AlarmResponse { header: None, alarms: alarms.into_iter().map(alarm_member).collect() })
        }
        .await;
        self.done(r)
    }

    async fn status(&self, _: Request<rpc::StatusRequest>) -> Result<Response<rpc::StatusResponse>, Status> {
        let s = self.api.status();
        let db_size = self.api.db_size() as i64;
        // As etcd: every raised alarm is listed among the errors (`etcdctl endpoint status`).
        let alarms = self.api.alarms(true).await.unwrap_or_default();
        let errors = self
            .api
            .health()
            .err()
            .into_iter()
            .chain(alarms.iter().map(|a| format!("memberID:{} alarm:{}", a.member_id, a.alarm.name())))
            .collect();
        let is_learner = !s.members.iter().any(|m| m.id == s.id && m.voter);
        self.done(Ok(rpc::StatusResponse {
            header: self.header(s.revision),
            version: SERVER_VERSION.into(),
            db_size,
            leader: s.leader.unwrap_or(0),
            raft_index: s.committed_index,
            raft_term: s.term,
            raft_applied_index: s.applied_index,
            errors,
            db_size_in_use: db_size,
            is_learner,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        request: Request<rpc::DefragmentRequest>,
    ) -> Result<Response<rpc::DefragmentResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        // redb reuses freed pages itself; there is nothing to defragment. etcd answers no header
        // here (v3rpc's maintenance server returns an empty response).
        self.done(Ok(rpc::DefragmentResponse { header: None }))
    }

    async fn hash(&self, request: Request<rpc::HashRequest>) -> Result<Response<rpc::HashResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        let r = self.api.hash_kv().map(|(hash, rev, _)| rpc::HashResponse { header: self.header(rev), hash });
        self.done(r)
    }

    async fn hash_kv(
        &self,
        request: Request<rpc::HashKvRequest>,
    ) -> Result<Response<rpc::HashKvResponse>, Status> {
        if let Err(e) = self.admin(&request) {
            return self.done(Err(e));
        }
        let requested = request.into_inner().revision;
        let r = self.api.hash_kv().and_then(|(hash, rev, compacted)| {
            if requested > 0 && requested != rev {
                let e = if requested > rev {
                    KvError::FutureRevision { requested, current: rev }
                } else {
                    KvError::Compacted { requested, compacted: rev }
                };
                return Err(ApiError::Kv(e));
            }
            Ok(rpc::HashKvResponse {
                header: self.header(rev),
                hash,
                // etcd's: the last compaction's revision (the hash covers what is above it),
                // -1 before any compaction.
                compact_revision: if compacted > 0 { compacted } else { -1 },
                hash_revision: rev,
            })
        });
        self.done(r)
    }

    type SnapshotStream = snapshot::SnapshotStream;

    /// A point-in-time backup of this member's applied state (root only with auth on), streamed
    /// as etcd does; the stream and the file it makes: `etcd/snapshot.rs`, `backup.rs`.
    async fn snapshot(
        &self,
        request: Request<rpc::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let r = self.admin(&request).map(|()| self.snapshot_stream());
        self.done(r)
    }

    async fn move_leader(
        &self,
        request: Request<rpc::MoveLeaderRequest>,
    ) -> Result<Response<rpc::MoveLeaderResponse>, Status> {
        let to: NodeId = request.into_inner().target_id;
        let r = async {
            self.api.transfer_leader(to).await?;
            // As etcd's: an empty response, no header.
            Ok(rpc::MoveLeaderResponse { header: None })
        }
        .await;
        self.done(r)
    }
}
