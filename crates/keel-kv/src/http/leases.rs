//! `/v1/lease/…`, `/v1/lock/…` and `/v1/election/…`: leases, locks and elections over HTTP/JSON
//! (docs/http-api.md), on the same [`KvApi`] operations as etcd's gRPC services.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::Value;

use super::counted;
use super::kv_json;
use super::ok;
use super::parse_json;
use super::query;
use super::text_or_b64;
use super::HttpError;
use super::B64;
use crate::api::KvApi;
use base64::Engine;

use crate::lock::LeaderKey;

/// Bytes as JSON: `name` when UTF-8 text, else `name_base64`.
fn bytes_entry(obj: &mut serde_json::Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => obj.insert(name.into(), text.into()),
        Err(_) => obj.insert(format!("{name}_base64"), B64.encode(bytes).into()),
    };
}

fn lease_gone(id: i64) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        "lease_not_found",
        format!("lease {id} not found (expired or revoked)"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    ttl: i64,
    #[serde(default)]
    id: i64,
}

/// `POST /v1/lease/grant` `{"ttl": N, "id": ID?}`.
pub(super) async fn grant(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: GrantBody = parse_json(&api, body)?;
        if b.ttl < 0 {
            return Err(HttpError::bad("ttl must not be negative"));
        }
        let (revision, id, ttl) = api.lease_grant(b.ttl, b.id).await?;
        ok(&api, json!({"revision": revision, "id": id, "ttl": ttl}))
    }
    .await;
    counted(&api, r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdBody {
    id: i64,
}

/// `POST /v1/lease/revoke` `{"id": ID}`.
pub(super) async fn revoke(
    State(api): State<KvApi>,
    caller: Option<axum::Extension<super::auth::HttpCaller>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let b: IdBody = parse_json(&api, body)?;
        // With auth on, the user must be allowed to write every key on the lease (etcd).
        let command = crate::store::KvCommand::LeaseRevoke { id: b.id };
        let (revision, _) = api.write_as(super::auth::who(&caller), command).await?;
        ok(&api, json!({"revision": revision}))
    }
    .await;
    counted(&api, r)
}

/// `POST /v1/lease/keepalive` `{"id": ID}`: one keep-alive.
pub(super) async fn keep_alive(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: IdBody = parse_json(&api, body)?;
        match api.lease_keep_alive(b.id, false).await? {
            ttl if ttl > 0 => ok(&api, json!({"id": b.id, "ttl": ttl})),
            _ => Err(lease_gone(b.id)),
        }
    }
    .await;
    counted(&api, r)
}

/// `GET /v1/lease/ttl?id=ID&keys=true`.
pub(super) async fn time_to_live(State(api): State<KvApi>, uri: Uri) -> Response {
    let r = async {
        let q = query(&uri);
        let id = signed(&q, "id")?;
        let t = api.lease_time_to_live(id, super::flag(&q, "keys")?, false).await?;
        if t.ttl < 0 {
            return Err(lease_gone(id));
        }
        let keys: Vec<Value> = t
            .keys
            .iter()
            .map(|k| {
                let mut obj = serde_json::Map::new();
                bytes_entry(&mut obj, "key", k);
                Value::Object(obj)
            })
            .collect();
        ok(&api, json!({"id": t.id, "ttl": t.ttl, "granted_ttl": t.granted_ttl, "keys": keys}))
    }
    .await;
    counted(&api, r)
}

/// `GET /v1/lease/list`.
pub(super) async fn list(State(api): State<KvApi>) -> Response {
    let r = async {
        let ids = api.lease_list().await?;
        ok(&api, json!({"leases": ids}))
    }
    .await;
    counted(&api, r)
}

/// A signed integer query parameter (lease ids may be any non-zero i64).
pub(super) fn signed(q: &std::collections::BTreeMap<String, Vec<u8>>, name: &str) -> Result<i64, HttpError> {
    q.get(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| HttpError::bad(format!("query parameter {name} must be an integer")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    name: Option<String>,
    name_base64: Option<String>,
    #[serde(default)]
    lease: i64,
}

fn required_name(name: &Option<String>, b64: &Option<String>) -> Result<Vec<u8>, HttpError> {
    text_or_b64("name", name, b64)?.filter(|n| !n.is_empty()).ok_or_else(|| HttpError::bad("give the name"))
}

/// `POST /v1/lock/acquire` `{"name": N, "lease": ID}`: answers once the lock is held.
pub(super) async fn lock(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: LockBody = parse_json(&api, body)?;
        let name = required_name(&b.name, &b.name_base64)?;
        let (revision, key) = api.lock(&name, b.lease).await?;
        let mut obj = serde_json::Map::new();
        obj.insert("revision".into(), revision.into());
        bytes_entry(&mut obj, "key", &key);
        ok(&api, Value::Object(obj))
    }
    .await;
    counted(&api, r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    key: Option<String>,
    key_base64: Option<String>,
}

/// `POST /v1/lock/release` `{"key": K}`.
pub(super) async fn unlock(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: KeyBody = parse_json(&api, body)?;
        let key = text_or_b64("key", &b.key, &b.key_base64)?.ok_or_else(|| HttpError::bad("give the key"))?;
        let revision = api.unlock(&key).await?;
        ok(&api, json!({"revision": revision}))
    }
    .await;
    counted(&api, r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignBody {
    name: Option<String>,
    name_base64: Option<String>,
    #[serde(default)]
    lease: i64,
    value: Option<String>,
    value_base64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaderBody {
    name: Option<String>,
    name_base64: Option<String>,
    key: Option<String>,
    key_base64: Option<String>,
    rev: i64,
    lease: i64,
    value: Option<String>,
    value_base64: Option<String>,
}

impl LeaderBody {
    fn leader_key(&self) -> Result<LeaderKey, HttpError> {
        Ok(LeaderKey {
            name: text_or_b64("name", &self.name, &self.name_base64)?.unwrap_or_default(),
            key: text_or_b64("key", &self.key, &self.key_base64)?
                .ok_or_else(|| HttpError::bad("give the key"))?,
            rev: self.rev,
            lease: self.lease,
        })
    }
}

fn leader_json(revision: i64, l: &LeaderKey) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("revision".into(), revision.into());
    bytes_entry(&mut obj, "name", &l.name);
    bytes_entry(&mut obj, "key", &l.key);
    obj.insert("rev".into(), l.rev.into());
    obj.insert("lease".into(), l.lease.into());
    Value::Object(obj)
}

/// `POST /v1/election/campaign` `{"name": N, "lease": ID, "value": V}`: answers once leading.
pub(super) async fn campaign(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: CampaignBody = parse_json(&api, body)?;
        let name = required_name(&b.name, &b.name_base64)?;
        let value = text_or_b64("value", &b.value, &b.value_base64)?.unwrap_or_default();
        let (revision, leader) = api.campaign(&name, b.lease, &value).await?;
        ok(&api, leader_json(revision, &leader))
    }
    .await;
    counted(&api, r)
}

/// `POST /v1/election/proclaim` `{"name", "key", "rev", "lease", "value"}`.
pub(super) async fn proclaim(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: LeaderBody = parse_json(&api, body)?;
        let value = text_or_b64("value", &b.value, &b.value_base64)?.unwrap_or_default();
        let revision = api.proclaim(&b.leader_key()?, &value).await?;
        ok(&api, json!({"revision": revision}))
    }
    .await;
    counted(&api, r)
}

/// `POST /v1/election/resign` `{"name", "key", "rev", "lease"}`.
pub(super) async fn resign(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: LeaderBody = parse_json(&api, body)?;
        let revision = api.resign(&b.leader_key()?).await?;
        ok(&api, json!({"revision": revision}))
    }
    .await;
    counted(&api, r)
}

/// `GET /v1/election/leader?name=N`.
pub(super) async fn leader(State(api): State<KvApi>, uri: Uri) -> Response {
    let r = async {
        let q = query(&uri);
        let name = q.get("name").filter(|n| !n.is_empty()).ok_or_else(|| HttpError::bad("give ?name="))?;
        let (revision, kv) = api.election_leader(name).await?;
        ok(&api, json!({"revision": revision, "kv": kv_json(&kv, true)}))
    }
    .await;
    counted(&api, r)
}

/// `GET /v1/election/observe?name=N`: server-sent events, one `{"revision", "kv"}` per leader.
pub(super) async fn observe(State(api): State<KvApi>, uri: Uri) -> Response {
    use axum::response::sse::Event as SseEvent;
    use axum::response::sse::KeepAlive;
    use axum::response::sse::Sse;

    let q = query(&uri);
    let Some(name) = q.get("name").filter(|n| !n.is_empty()).cloned() else {
        return counted(&api, Err(HttpError::bad("give ?name=")));
    };
    api.count(false, false);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let observer = api.clone();
    tokio::spawn(async move { observer.observe(&name, tx).await });
    let events = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let message = match rx.recv().await? {
            Ok((revision, kv)) => (json!({"revision": revision, "kv": kv_json(&kv, true)}), Some(rx)),
            Err(e) => (json!({"error": e.to_string()}), None),
        };
        Some((Ok::<_, std::convert::Infallible>(SseEvent::default().data(message.0.to_string())), message.1))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
