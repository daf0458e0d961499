//! The HTTP/JSON API (see `docs/http-api.md`), on [`KvApi`].
//!
//! Keys come from the raw URL path and query (percent-decoded to bytes, so any key works); values
//! are raw request bodies. Every error is `{"error": {"code", "message", "retryable"}}` with a
//! fitting HTTP status.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::routing::post;
use axum::Extension;
use axum::Router;
use base64::Engine;
use keel::NodeId;
use keel::NodeInfo;
use serde::Deserialize;
use serde_json::json;
use serde_json::Value;

use crate::api::ApiError;
use crate::api::KvApi;
use crate::store;
use crate::store::KvCommand;
use crate::store::KvError;
use crate::store::OpResult;

mod auth;
mod leases;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The HTTP routes, to merge with the gRPC services on one address.
pub fn router(api: KvApi) -> Router {
    Router::new()
        .route("/v1/kv", get(list))
        .route("/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/v1/txn", post(txn))
        .route("/v1/compact", post(compact))
        .route("/v1/watch", get(watch))
        .route("/v1/lease/grant", post(leases::grant))
        .route("/v1/lease/revoke", post(leases::revoke))
        .route("/v1/lease/keepalive", post(leases::keep_alive))
        .route("/v1/lease/ttl", get(leases::time_to_live))
        .route("/v1/lease/list", get(leases::list))
        .route("/v1/lock/acquire", post(leases::lock))
        .route("/v1/lock/release", post(leases::unlock))
        .route("/v1/election/campaign", post(leases::campaign))
        .route("/v1/election/proclaim", post(leases::proclaim))
        .route("/v1/election/resign", post(leases::resign))
        .route("/v1/election/leader", get(leases::leader))
        .route("/v1/election/observe", get(leases::observe))
        .route("/v1/cluster/init", post(init))
        .route("/v1/cluster/add-learner", post(add_learner))
        .route("/v1/cluster/join", post(join))
        .route("/v1/cluster/promote", post(promote))
        .route("/v1/cluster/remove", post(remove))
        .route("/v1/cluster/change-membership", post(change_membership))
        .route("/v1/cluster/transfer-leader", post(transfer_leader))
        .route("/v1/cluster/members", get(members))
        .route("/v1/cluster/status", get(status))
        .route("/v1/alarms", get(alarms))
        .route("/v1/alarms/disarm", post(disarm))
        .route("/v1/alarms/activate", post(activate))
        .route("/v1/alarms/deactivate", post(deactivate))
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/auth/authenticate", post(auth::authenticate))
        .layer(axum::middleware::from_fn_with_state(api.clone(), auth::gate))
        .with_state(api)
}

/// An HTTP error answer.
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retryable: bool,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retryable: false }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let retryable = e.retryable();
        let message = match &e {
            // etcd's own words, which clients and operators search for.
            ApiError::Kv(KvError::NoSpace) => "etcdserver: mvcc: database space exceeded".to_string(),
            e => e.to_string(),
        };
        let (status, code) = match &e {
            ApiError::BadRequest(_) | ApiError::Kv(KvError::InvalidRequest(_)) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ApiError::KeyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "key_too_large"),
            ApiError::RequestTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
            ApiError::KeyNotFound | ApiError::Kv(KvError::KeyNotFound) => {
                (StatusCode::NOT_FOUND, "key_not_found")
            }
            ApiError::UnknownMember(_) => (StatusCode::NOT_FOUND, "unknown_member"),
            ApiError::Kv(KvError::Compacted { .. }) | ApiError::Kv(KvError::FutureRevision { .. }) => {
                (StatusCode::BAD_REQUEST, "compacted")
            }
            ApiError::Kv(KvError::LeaseNotFound) => (StatusCode::NOT_FOUND, "lease_not_found"),
            ApiError::Kv(KvError::LeaseExists) => (StatusCode::CONFLICT, "lease_exists"),
            ApiError::LeaseTtlTooLarge => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::ElectionNotLeader => (StatusCode::CONFLICT, "not_leader"),
            ApiError::ElectionNoLeader => (StatusCode::NOT_FOUND, "no_leader_elected"),
            // 507: the request is fine, the server has no room for it (until the alarm is cleared).
            ApiError::Kv(KvError::NoSpace) => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
            ApiError::Kv(KvError::ResponseTooLarge { .. }) => (StatusCode::BAD_REQUEST, "response_too_large"),
            ApiError::Kv(KvError::Auth(a)) => auth_status(a),
            ApiError::Rejected(_)
            | ApiError::NotLearner(_)
            | ApiError::PeerAddrExists(..)
            | ApiError::MemberExists(_)
            | ApiError::BadTransferee(_) => (StatusCode::CONFLICT, "rejected"),
            ApiError::LearnerNotReady(_) => (StatusCode::CONFLICT, "learner_not_ready"),
            ApiError::NoLeader(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Unknown(_) => (StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self { status, code, message, retryable }
    }
}

/// The HTTP status and code of an auth refusal.
fn auth_status(e: &crate::auth::AuthError) -> (StatusCode, &'static str) {
    use crate::auth::AuthError as A;
    match e {
        A::UserEmpty | A::InvalidAuthToken | A::AuthFailed => (StatusCode::UNAUTHORIZED, "unauthenticated"),
        A::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        A::UserNotFound | A::RoleNotFound => (StatusCode::NOT_FOUND, "not_found"),
        A::UserAlreadyExist | A::RoleAlreadyExist => (StatusCode::CONFLICT, "exists"),
        A::RootUserNotExist
        | A::RootRoleNotExist
        | A::RoleNotGranted
        | A::PermissionNotGranted
        | A::AuthNotEnabled => (StatusCode::CONFLICT, "failed_precondition"),
        A::RoleEmpty | A::InvalidAuthMgmt => (StatusCode::BAD_REQUEST, "bad_request"),
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "retryable": self.retryable}});
        (self.status, axum::Json(body)).into_response()
    }
}

type HttpResult = Result<Response, HttpError>;

fn ok(api: &KvApi, body: Value) -> HttpResult {
    api.count(false, false);
    Ok(axum::Json(body).into_response())
}

/// Counts failures too: every handler's result passes through here.
fn counted(api: &KvApi, r: HttpResult) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => {
            api.count(false, true);
            e.into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// One key as JSON: `key` (or `key_base64` when not UTF-8), `value` (or `value_base64`) unless
/// keys only, and its revisions. Written straight to the output: a range answer never becomes a
/// `serde_json::Value` tree (for 1M keys that tree alone took ~3.4 GB).
struct KvJson<'a> {
    kv: &'a store::KeyValue,
    with_value: bool,
}

impl serde::Serialize for KvJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        fn bytes_field<M: SerializeMap>(m: &mut M, name: &str, bytes: &[u8]) -> Result<(), M::Error> {
            match std::str::from_utf8(bytes) {
                Ok(text) => m.serialize_entry(name, text),
                Err(_) => m.serialize_entry(&format!("{name}_base64"), &B64.encode(bytes)),
            }
        }
        let mut m = s.serialize_map(None)?;
        bytes_field(&mut m, "key", &self.kv.key)?;
        if self.with_value {
            bytes_field(&mut m, "value", &self.kv.value)?;
        }
        m.serialize_entry("create_revision", &self.kv.create_revision)?;
        m.serialize_entry("mod_revision", &self.kv.mod_revision)?;
        m.serialize_entry("version", &self.kv.version)?;
        if self.kv.lease != 0 {
            m.serialize_entry("lease", &self.kv.lease)?;
        }
        m.end()
    }
}

/// A list of keys as a JSON array, written as it is serialized.
struct KvsJson<'a> {
    kvs: &'a [store::KeyValue],
    with_value: bool,
}

impl serde::Serialize for KvsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.kvs.iter().map(|kv| KvJson { kv, with_value: self.with_value }))
    }
}

/// The answer to `GET /v1/kv?...`.
#[derive(serde::Serialize)]
struct ListJson<'a> {
    revision: i64,
    kvs: KvsJson<'a>,
    count: i64,
    more: bool,
}

fn kv_json(kv: &store::KeyValue, with_value: bool) -> Value {
    // A map with string keys and plain values: serializing it cannot fail.
    serde_json::to_value(KvJson { kv, with_value }).unwrap_or(Value::Null)
}

/// A percent-decoded query: name → raw bytes.
fn query(uri: &Uri) -> BTreeMap<String, Vec<u8>> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode(s.replace('+', " ").as_bytes()).collect::<Vec<u8>>()
            };
            (String::from_utf8_lossy(&decode(k)).into_owned(), decode(v))
        })
        .collect()
}

fn flag(q: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<bool, HttpError> {
    match q.get(name).map(Vec::as_slice) {
        None | Some(b"false") | Some(b"0") => Ok(false),
        Some(b"true") | Some(b"1") | Some(b"") => Ok(true),
        Some(other) => Err(HttpError::bad(format!(
            "query parameter {name}={:?} is not true or false",
            String::from_utf8_lossy(other)
        ))),
    }
}

fn number(q: &BTreeMap<String, Vec<u8>>, name: &str) -> Result<i64, HttpError> {
    match q.get(name) {
        None => Ok(0),
        Some(v) => {
            std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()).filter(|n| *n >= 0).ok_or_else(
                || HttpError::bad(format!("query parameter {name} must be a non-negative integer")),
            )
        }
    }
}

fn serializable(q: &BTreeMap<String, Vec<u8>>) -> Result<bool, HttpError> {
    match q.get("consistency").map(Vec::as_slice) {
        None | Some(b"linearizable") | Some(b"l") => Ok(false),
        Some(b"serializable") | Some(b"s") => Ok(true),
        Some(_) => Err(HttpError::bad("consistency must be linearizable or serializable")),
    }
}

/// The key in `/v1/kv/{key}`, percent-decoded to bytes.
fn path_key(uri: &Uri) -> Result<Vec<u8>, HttpError> {
    let raw = uri.path().strip_prefix("/v1/kv/").unwrap_or("");
    let key: Vec<u8> = percent_encoding::percent_decode(raw.as_bytes()).collect();
    if key.is_empty() {
        return Err(HttpError::bad("key is empty"));
    }
    Ok(key)
}

fn body_bytes(api: &KvApi, body: Result<Bytes, BytesRejection>) -> Result<Bytes, HttpError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HttpError::from(ApiError::RequestTooLarge {
                size: api.max_request_bytes + 1,
                limit: api.max_request_bytes,
            })
        } else {
            HttpError::bad(format!("cannot read the request body: {e}"))
        }
    })?;
    api.check_size(body.len())?;
    Ok(body)
}

fn parse_json<T: for<'de> Deserialize<'de>>(
    api: &KvApi,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, HttpError> {
    let body = body_bytes(api, body)?;
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body };
    serde_json::from_slice(body).map_err(|e| HttpError::bad(format!("malformed JSON body: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Key-value

async fn put_key(
    State(api): State<KvApi>,
    caller: Option<Extension<auth::HttpCaller>>,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let key = path_key(&uri)?;
        let q = query(&uri);
        let value = body_bytes(&api, body)?.to_vec();
        let lease = match q.get("lease") {
            None => 0,
            Some(_) => leases::signed(&q, "lease")?,
        };
        let put = store::Put {
            key,
            value,
            lease,
            ignore_lease: flag(&q, "ignore_lease")?,
            prev_kv: flag(&q, "prev_kv")?,
            ..Default::default()
        };
        match api.write_as(auth::who(&caller), KvCommand::Put(put)).await? {
            (revision, OpResult::Put { prev_kv }) => {
                // `prev_kv` only when there is one (docs/http-api.md: `"prev_kv": KV?`).
                let mut body = json!({"revision": revision});
                if let (Some(kv), Value::Object(obj)) = (prev_kv, &mut body) {
                    obj.insert("prev_kv".into(), kv_json(&kv, true));
                }
                ok(&api, body)
            }
            (_, other) => Err(ApiError::Internal(format!("put answered {other:?}")).into()),
        }
    }
    .await;
    counted(&api, r)
}

async fn get_key(
    State(api): State<KvApi>,
    caller: Option<Extension<auth::HttpCaller>>,
    uri: Uri,
) -> Response {
    let r = async {
        let key = path_key(&uri)?;
        let q = query(&uri);
        let range = store::Range { key, revision: number(&q, "revision")?, ..Default::default() };
        let (revision, result) = api.range_as(auth::who(&caller), &range, serializable(&q)?).await?;
        let Some(kv) = result.kvs.first() else {
            return Err(HttpError::new(StatusCode::NOT_FOUND, "key_not_found", "key not found"));
        };
        let mut body = kv_json(kv, true);
        if let Value::Object(obj) = &mut body {
            obj.insert("revision".into(), revision.into());
        }
        ok(&api, body)
    }
    .await;
    counted(&api, r)
}

async fn list(State(api): State<KvApi>, caller: Option<Extension<auth::HttpCaller>>, uri: Uri) -> Response {
    let r = async {
        let q = query(&uri);
        let (key, range_end) = keys_of(&q)?;
        let keys_only = flag(&q, "keys_only")?;
        let range = store::Range {
            key,
            range_end,
            limit: number(&q, "limit")?,
            keys_only,
            count_only: flag(&q, "count_only")?,
            revision: number(&q, "revision")?,
            ..Default::default()
        };
        let (revision, result) = api.range_as(auth::who(&caller), &range, serializable(&q)?).await?;
        api.count(false, false);
        let kvs = KvsJson { kvs: &result.kvs, with_value: !keys_only };
        let body = ListJson { revision, kvs, count: result.count, more: result.more };
        Ok(axum::Json(body).into_response())
    }
    .await;
    counted(&api, r)
}

async fn delete_key(
    State(api): State<KvApi>,
    caller: Option<Extension<auth::HttpCaller>>,
    uri: Uri,
) -> Response {
    let r = async {
        let key = path_key(&uri)?;
        let q = query(&uri);
        let range_end = if flag(&q, "prefix")? { store::prefix_range_end(&key) } else { Vec::new() };
        let del = store::DeleteRange { key, range_end, prev_kv: flag(&q, "prev_kv")? };
        match api.write_as(auth::who(&caller), KvCommand::DeleteRange(del)).await? {
            (revision, OpResult::DeleteRange { deleted, prev_kvs }) => {
                let prev: Vec<Value> = prev_kvs.iter().map(|kv| kv_json(kv, true)).collect();
                ok(&api, json!({"revision": revision, "deleted": deleted, "prev_kvs": prev}))
            }
            (_, other) => Err(ApiError::Internal(format!("delete answered {other:?}")).into()),
        }
    }
    .await;
    counted(&api, r)
}

/// The keys a list or a watch names: `?prefix=P`, `?from=K` (every key ≥ K), or
/// `?key=K[&range_end=E]`; as `(key, range_end)`.
fn keys_of(q: &BTreeMap<String, Vec<u8>>) -> Result<(Vec<u8>, Vec<u8>), HttpError> {
    if let Some(prefix) = q.get("prefix") {
        if prefix.is_empty() {
            Ok((vec![0], vec![0]))
        } else {
            Ok((prefix.clone(), store::prefix_range_end(prefix)))
        }
    } else if let Some(from) = q.get("from") {
        let from = if from.is_empty() { vec![0] } else { from.clone() };
        Ok((from, vec![0]))
    } else if let Some(key) = q.get("key") {
        Ok((key.clone(), q.get("range_end").cloned().unwrap_or_default()))
    } else {
        Err(HttpError::bad("name the keys: ?prefix=P, ?from=K or ?key=K[&range_end=E]"))
    }
}

async fn compact(State(api): State<KvApi>, uri: Uri) -> Response {
    let r = async {
        let q = query(&uri);
        let revision = number(&q, "revision")?;
        if revision == 0 {
            return Err(HttpError::bad("give the revision to compact to: ?revision=R"));
        }
        let header = api.compact(revision, flag(&q, "physical")?).await?;
        ok(&api, json!({"revision": header, "compact_revision": revision}))
    }
    .await;
    counted(&api, r)
}

/// `GET /v1/watch`: server-sent events, one `data:` line of JSON per message (docs/http-api.md).
async fn watch(State(api): State<KvApi>, caller: Option<Extension<auth::HttpCaller>>, uri: Uri) -> Response {
    use axum::response::sse::Event as SseEvent;
    use axum::response::sse::KeepAlive;
    use axum::response::sse::Sse;

    use crate::watch::Delivery;

    let q = query(&uri);
    let opened = (|| {
        let (key, range_end) = keys_of(&q)?;
        api.check_key(&key)?;
        let read = crate::auth::Access::new(&key, &range_end, crate::auth::PermType::Read);
        api.authorize(auth::who(&caller), &crate::auth::Need::Keys(vec![read]))?;
        let filter = crate::watch::Filter {
            key,
            range_end,
            no_put: flag(&q, "no_put")?,
            no_delete: flag(&q, "no_delete")?,
        };
        Ok::<_, HttpError>((filter, number(&q, "start_revision")?, flag(&q, "prev_kv")?))
    })();
    let (filter, start_revision, prev_kv) = match opened {
        Ok(o) => o,
        Err(e) => return counted(&api, Err(e)),
    };
    api.count(false, false);
    let hub = api.hub().clone();
    let (tx, rx) = tokio::sync::mpsc::channel(crate::watch::STREAM_CHANNEL);
    let registered = hub.watch(filter, start_revision, 0, tx);
    let created = if start_revision <= 0 { registered.start_revision - 1 } else { hub.revision() };
    // Unregisters the watcher when the response stream is dropped (the client went away).
    let closed = hub.closed();
    let guard = crate::watch::Watching(hub, registered.key);
    let first = SseEvent::default().data(json!({"created": true, "revision": created}).to_string());
    let events = futures_util::stream::unfold(Some((rx, guard, Box::pin(closed))), move |state| async move {
        let (mut rx, guard, mut closed) = state?;
        // The node stopping ends the stream (the client resumes elsewhere).
        let delivery = tokio::select! {
            d = rx.recv() => d?,
            () = &mut closed => return None,
        };
        let message = match delivery {
            Delivery::Events { revision, events, .. } => {
                let events: Vec<Value> = events.iter().map(|e| event_json(e, prev_kv)).collect();
                json!({"revision": revision, "events": events})
            }
            Delivery::Compacted { compact_revision, .. } => {
                let body = json!({"canceled": true, "compact_revision": compact_revision,
                    "reason": "the start revision has been compacted"});
                let sse = SseEvent::default().data(body.to_string());
                return Some((Ok::<_, std::convert::Infallible>(sse), None)); // the last message
            }
            Delivery::Progress { revision, .. } => json!({"revision": revision, "events": []}),
        };
        Some((Ok(SseEvent::default().data(message.to_string())), Some((rx, guard, closed))))
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(first) }),
        events,
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn event_json(e: &crate::history::Event, with_prev: bool) -> Value {
    let kind = match e.kind {
        crate::history::EventKind::Put => "put",
        crate::history::EventKind::Delete => "delete",
    };
    let mut body = json!({"type": kind, "kv": kv_json(&e.kv, e.kind == crate::history::EventKind::Put)});
    if let (true, Some(prev), Value::Object(obj)) = (with_prev, &e.prev_kv, &mut body) {
        obj.insert("prev_kv".into(), kv_json(prev, true));
    }
    body
}

// ---------------------------------------------------------------------------------------------
// Txn

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnBody {
    #[serde(default)]
    compare: Vec<CompareBody>,
    #[serde(default)]
    success: Vec<OpBody>,
    #[serde(default)]
    failure: Vec<OpBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareBody {
    key: Option<String>,
    key_base64: Option<String>,
    target: String,
    result: String,
    value: Option<String>,
    value_base64: Option<String>,
    version: Option<i64>,
    create_revision: Option<i64>,
    mod_revision: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum OpBody {
    Put(KeyBody),
    Get(KeyBody),
    Delete(KeyBody),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    key: Option<String>,
    key_base64: Option<String>,
    value: Option<String>,
    value_base64: Option<String>,
    #[serde(default)]
    prefix: bool,
}

fn text_or_b64(
    what: &str,
    text: &Option<String>,
    b64: &Option<String>,
) -> Result<Option<Vec<u8>>, HttpError> {
    match (text, b64) {
        (Some(_), Some(_)) => Err(HttpError::bad(format!("give {what} or {what}_base64, not both"))),
        (Some(t), None) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(b)) => {
            B64.decode(b).map(Some).map_err(|e| HttpError::bad(format!("{what}_base64 is not base64: {e}")))
        }
        (None, None) => Ok(None),
    }
}

fn range_for(key: Vec<u8>, prefix: bool) -> (Vec<u8>, Vec<u8>) {
    match (prefix, key.is_empty()) {
        (false, _) => (key, Vec::new()),
        (true, true) => (vec![0], vec![0]),
        (true, false) => {
            let end = store::prefix_range_end(&key);
            (key, end)
        }
    }
}

fn op_of(op: OpBody) -> Result<store::Op, HttpError> {
    let key_of = |b: &KeyBody| -> Result<Vec<u8>, HttpError> {
        text_or_b64("key", &b.key, &b.key_base64)?.ok_or_else(|| HttpError::bad("txn op needs a key"))
    };
    Ok(match op {
        OpBody::Put(b) => store::Op::Put(store::Put {
            key: key_of(&b)?,
            value: text_or_b64("value", &b.value, &b.value_base64)?.unwrap_or_default(),
            ..Default::default()
        }),
        OpBody::Get(b) => {
            let (key, range_end) = range_for(key_of(&b)?, b.prefix);
            store::Op::Range(store::Range { key, range_end, ..Default::default() })
        }
        OpBody::Delete(b) => {
            let (key, range_end) = range_for(key_of(&b)?, b.prefix);
            store::Op::DeleteRange(store::DeleteRange { key, range_end, prev_kv: false })
        }
    })
}

fn compare_of(c: CompareBody) -> Result<store::Compare, HttpError> {
    let key =
        text_or_b64("key", &c.key, &c.key_base64)?.ok_or_else(|| HttpError::bad("compare needs a key"))?;
    let result = match c.result.as_str() {
        "equal" | "=" => store::CompareResult::Equal,
        "not_equal" | "!=" => store::CompareResult::NotEqual,
        "greater" | ">" => store::CompareResult::Greater,
        "less" | "<" => store::CompareResult::Less,
        other => {
            return Err(HttpError::bad(format!(
                "compare result {other:?} is not equal/not_equal/greater/less"
            )))
        }
    };
    let need = |v: Option<i64>, name: &str| {
        v.ok_or_else(|| HttpError::bad(format!("compare on {name} needs {name}")))
    };
    let target = match c.target.as_str() {
        "value" => store::CompareTarget::Value(
            text_or_b64("value", &c.value, &c.value_base64)?
                .ok_or_else(|| HttpError::bad("compare on value needs value"))?,
        ),
        "version" => store::CompareTarget::Version(need(c.version, "version")?),
        "create" => store::CompareTarget::Create(need(c.create_revision, "create_revision")?),
        "mod" => store::CompareTarget::Mod(need(c.mod_revision, "mod_revision")?),
        other => {
            return Err(HttpError::bad(format!("compare target {other:?} is not value/version/create/mod")))
        }
    };
    Ok(store::Compare { key, range_end: Vec::new(), result, target })
}

/// One txn response; `revision` is the txn's (a put's `{"revision": R}` in docs/http-api.md).
fn op_result_json(r: &OpResult, revision: i64) -> Value {
    match r {
        OpResult::Range(r) => {
            let kvs: Vec<Value> = r.kvs.iter().map(|kv| kv_json(kv, true)).collect();
            json!({"get": {"kvs": kvs, "count": r.count}})
        }
        OpResult::Put { .. } => json!({"put": {"revision": revision}}),
        OpResult::DeleteRange { deleted, .. } => json!({"delete": {"deleted": deleted}}),
        OpResult::Txn(t) => {
            json!({"txn": {"succeeded": t.succeeded, "responses": t.responses.iter().map(|r| op_result_json(r, revision)).collect::<Vec<_>>()}})
        }
        OpResult::MemberId(id) => json!({"member_id": id}),
        OpResult::Alarms(alarms) => json!({"alarms": alarms_json(alarms)}),
        OpResult::LeaseGranted { id, ttl } => json!({"lease": {"id": id, "ttl": ttl}}),
        OpResult::LeaseRevoked { deleted } => json!({"revoke": {"deleted": deleted}}),
        OpResult::Auth { auth_revision } => json!({"auth_revision": auth_revision}),
    }
}

async fn txn(
    State(api): State<KvApi>,
    caller: Option<Extension<auth::HttpCaller>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let body: TxnBody = parse_json(&api, body)?;
        let t = store::Txn {
            compare: body.compare.into_iter().map(compare_of).collect::<Result<_, _>>()?,
            success: body.success.into_iter().map(op_of).collect::<Result<_, _>>()?,
            failure: body.failure.into_iter().map(op_of).collect::<Result<_, _>>()?,
        };
        match api.write_as(auth::who(&caller), KvCommand::Txn(t)).await? {
            (revision, OpResult::Txn(t)) => {
                let responses: Vec<Value> = t.responses.iter().map(|r| op_result_json(r, revision)).collect();
                ok(&api, json!({"revision": revision, "succeeded": t.succeeded, "responses": responses}))
            }
            (_, other) => Err(ApiError::Internal(format!("txn answered {other:?}")).into()),
        }
    }
    .await;
    counted(&api, r)
}

// ---------------------------------------------------------------------------------------------
// Cluster

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InitBody {
    #[serde(default)]
    members: BTreeMap<NodeId, AddrBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddrBody {
    peer_addr: String,
    #[serde(default)]
    client_addr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnerBody {
    id: NodeId,
    peer_addr: String,
    #[serde(default)]
    client_addr: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    #[serde(default)]
    id: Option<NodeId>,
    peer_addr: String,
    #[serde(default)]
    client_addr: String,
    cluster_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdBody {
    id: NodeId,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VotersBody {
    voters: BTreeSet<NodeId>,
}

fn members_json(api: &KvApi) -> Value {
    json!({"leader": api.node.leader(), "members": api.members()})
}

async fn init(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let body: InitBody = parse_json(&api, body)?;
        let members: BTreeMap<NodeId, NodeInfo> = if body.members.is_empty() {
            [(api.member_id(), api.advertise.clone())].into_iter().collect()
        } else {
            body.members
                .into_iter()
                .map(|(id, a)| {
                    (
                        id,
                        NodeInfo::new(
                            crate::config::bare_addr(&a.peer_addr),
                            crate::config::bare_addr(&a.client_addr),
                        ),
                    )
                })
                .collect()
        };
        if !members.contains_key(&api.member_id()) {
            return Err(HttpError::bad(format!("members must include this node ({})", api.member_id())));
        }
        api.node.initialize(members).await.map_err(ApiError::from)?;
        ok(&api, json!({}))
    }
    .await;
    counted(&api, r)
}

async fn add_learner(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: LearnerBody = parse_json(&api, body)?;
        api.add_member(Some(b.id), &b.peer_addr, b.client_addr.as_deref().unwrap_or(""), true).await?;
        ok(&api, members_json(&api))
    }
    .await;
    counted(&api, r)
}

/// A new node asks to be added as a learner; the cluster assigns its id unless it brings one.
async fn join(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: JoinBody = parse_json(&api, body)?;
        let ours = &api.node.config().cluster_name;
        if &b.cluster_name != ours {
            return Err(HttpError::bad(format!(
                "this is cluster {ours:?}, the joining node is configured for {:?}",
                b.cluster_name
            )));
        }
        let member = api.join(b.id, &b.peer_addr, &b.client_addr).await?;
        let mut answer = members_json(&api);
        answer["id"] = member.id.into();
        ok(&api, answer)
    }
    .await;
    counted(&api, r)
}

async fn promote(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: IdBody = parse_json(&api, body)?;
        api.promote(b.id).await?;
        ok(&api, members_json(&api))
    }
    .await;
    counted(&api, r)
}

async fn remove(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: IdBody = parse_json(&api, body)?;
        api.remove_member(b.id).await?;
        ok(&api, members_json(&api))
    }
    .await;
    counted(&api, r)
}

async fn change_membership(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: VotersBody = parse_json(&api, body)?;
        api.change_voters(b.voters).await?;
        ok(&api, members_json(&api))
    }
    .await;
    counted(&api, r)
}

async fn transfer_leader(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: IdBody = parse_json(&api, body)?;
        api.transfer_leader(b.id).await?;
        ok(&api, json!({"leader": b.id}))
    }
    .await;
    counted(&api, r)
}

async fn members(State(api): State<KvApi>) -> Response {
    let body = members_json(&api);
    counted(&api, ok(&api, body))
}

async fn status(State(api): State<KvApi>) -> Response {
    let body = serde_json::to_value(api.status()).unwrap_or(Value::Null);
    counted(&api, ok(&api, body))
}

// ---------------------------------------------------------------------------------------------
// Alarms

fn alarms_json(alarms: &[store::AlarmMember]) -> Vec<Value> {
    alarms.iter().map(|a| json!({"member_id": a.member_id, "alarm": a.alarm.name()})).collect()
}

/// `GET /v1/alarms`: the raised alarms (linearizable unless `consistency=serializable`).
async fn alarms(State(api): State<KvApi>, uri: Uri) -> Response {
    let r = async {
        let raised = api.alarms(serializable(&query(&uri))?).await?;
        ok(&api, json!({"alarms": alarms_json(&raised)}))
    }
    .await;
    counted(&api, r)
}

/// `{"member_id": N, "alarm": "NOSPACE"}`: one alarm, as etcd's `AlarmRequest` names it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlarmBody {
    member_id: u64,
    alarm: String,
}

fn alarm_of(b: AlarmBody) -> Result<store::AlarmMember, HttpError> {
    match b.alarm.as_str() {
        "NOSPACE" => Ok(store::AlarmMember { member_id: b.member_id, alarm: store::AlarmKind::NoSpace }),
        other => Err(HttpError::bad(format!("unknown alarm {other:?}: Keel raises only NOSPACE"))),
    }
}

/// `POST /v1/alarms/activate` and `/v1/alarms/deactivate`: raise or clear one alarm (etcd's
/// ACTIVATE / DEACTIVATE); answers it if that changed anything.
async fn change_alarm(
    api: KvApi,
    action: store::AlarmAction,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let alarm = alarm_of(parse_json(&api, body)?)?;
        let changed = api.change_alarm(action, alarm).await?;
        ok(&api, json!({"alarms": alarms_json(&changed)}))
    }
    .await;
    counted(&api, r)
}

async fn activate(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    change_alarm(api, store::AlarmAction::Activate, body).await
}

async fn deactivate(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    change_alarm(api, store::AlarmAction::Deactivate, body).await
}

/// `POST /v1/alarms/disarm`: clears every raised alarm (what `etcdctl alarm disarm` does: list,
/// then deactivate each); answers the alarms cleared.
async fn disarm(State(api): State<KvApi>) -> Response {
    let r = async {
        let mut cleared = Vec::new();
        for alarm in api.alarms(false).await? {
            cleared.extend(api.change_alarm(store::AlarmAction::Deactivate, alarm).await?);
        }
        ok(&api, json!({"alarms": alarms_json(&cleared)}))
    }
    .await;
    counted(&api, r)
}

// ---------------------------------------------------------------------------------------------
// Operations

/// etcd's `/health`: the answer is a string, `"true"` or `"false"` (etcd's shape, which its
/// clients and probes parse), with Keel's reason when unhealthy.
async fn health(State(api): State<KvApi>) -> Response {
    match api.health() {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"health": "true"}))).into_response(),
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"health": "false", "reason": reason})))
                .into_response()
        }
    }
}

/// etcd's `/version`: the etcd API level Keel speaks as both the server and the cluster version,
/// plain dot-separated integers (Patroni and etcd3gw parse them), and Keel's own version.
async fn version() -> Response {
    let etcd = crate::etcd::ETCD_VERSION;
    axum::Json(json!({"etcdserver": etcd, "etcdcluster": etcd, "keel": env!("CARGO_PKG_VERSION")}))
        .into_response()
}

async fn ready(State(api): State<KvApi>) -> Response {
    match api.ready() {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response(),
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"ready": false, "reason": reason})))
                .into_response()
        }
    }
}

async fn metrics(State(api): State<KvApi>) -> Response {
    let body = crate::metrics::render(&api).await;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
        .into_response()
}

/// What an unknown path answers: a gRPC `UNIMPLEMENTED` status to gRPC clients, JSON 404 otherwise.
pub async fn fallback(req: axum::extract::Request) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        let status = tonic::Status::unimplemented(format!("{} is not served by Keel", req.uri().path()));
        return status.into_http();
    }
    HttpError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}
