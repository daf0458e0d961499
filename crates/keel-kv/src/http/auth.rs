//! Auth on the HTTP API: `POST /v1/auth/authenticate` hands out the same tokens as etcd's
//! `Authenticate`, and [`gate`] judges every other request while auth is on.
//!
//! A request names its user with `Authorization: Bearer TOKEN` or `Authorization: Basic
//! base64(name:password)` (checked with bcrypt on every request: prefer a token for many
//! requests), or by the verified CN of its TLS client certificate. While auth is on, the key-value
//! routes ([`KEYED`]: keys, txn, watch, leases) serve every user by its permissions, as etcd's
//! gRPC API does (the handlers judge, with [`HttpCaller`]); every other route (cluster, alarms,
//! compaction, locks and elections) serves only users with role `root`. The routes in [`OPEN`]
//! stay open.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::Request;
use axum::extract::State;
use axum::http::header;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::counted;
use super::ok;
use super::parse_json;
use super::HttpError;
use crate::api::ApiError;
use crate::api::KvApi;
use crate::auth::Need;
use crate::client_port::ClientCertName;

/// Paths anyone may ask for while auth is on: health and metrics, the way in, and this node's
/// status and the member list (etcd leaves `Status` and `MemberList` open too).
const OPEN: &[&str] = &[
    "/health",
    "/version",
    "/ready",
    "/metrics",
    "/v1/auth/authenticate",
    "/v1/cluster/status",
    "/v1/cluster/members",
];

/// Whether the handler of `path` judges the request by the user's permissions itself: it finds
/// the user in [`HttpCaller`].
fn keyed(path: &str) -> bool {
    path == "/v1/kv"
        || path.starts_with("/v1/kv/")
        || path == "/v1/txn"
        || path == "/v1/watch"
        || path.starts_with("/v1/lease/")
}

/// The user a [`keyed`] request comes from (None: auth is off here), put there by [`gate`].
#[derive(Clone, Debug)]
pub(crate) struct HttpCaller(pub Option<crate::auth::Caller>);

/// The user of a keyed route's request, for `write_as`/`range_as`/`authorize`.
pub(super) fn who(caller: &Option<axum::Extension<HttpCaller>>) -> Option<&crate::auth::Caller> {
    caller.as_ref().and_then(|c| c.0 .0.as_ref())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthenticateBody {
    name: String,
    password: String,
}

/// `POST /v1/auth/authenticate` `{"name", "password"}` → `{"token"}`.
pub(super) async fn authenticate(State(api): State<KvApi>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b: AuthenticateBody = parse_json(&api, body)?;
        let (revision, token) = api.authenticate(&b.name, b.password).await?;
        ok(&api, json!({"revision": revision, "token": token}))
    }
    .await;
    counted(&api, r)
}

/// Who the request is from while auth is on (None: auth is off here).
async fn user_of(
    api: &KvApi,
    auth: Option<&str>,
    cert: Option<&str>,
) -> Result<Option<crate::auth::Caller>, ApiError> {
    match auth.and_then(|a| a.split_once(' ')) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            api.request_user(Some(token.trim()), cert)
        }
        Some((scheme, basic)) if scheme.eq_ignore_ascii_case("basic") => {
            // Only worth a bcrypt check while auth is on.
            if !api.auth_enabled_here()? {
                return Ok(None);
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            let Some((name, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
                return Err(ApiError::Kv(crate::store::KvError::Auth(crate::auth::AuthError::AuthFailed)));
            };
            api.authenticate(name, password.to_string()).await?;
            Ok(Some(crate::auth::Caller::named(name)))
        }
        _ => api.request_user(None, cert),
    }
}

/// Middleware: while auth is on, a [`keyed`] request must name a user (its handler judges the
/// permissions), and every other request but [`OPEN`] ones must come from a user with role
/// `root` (the keeld-to-keeld `/v1/cluster/join` too: see `docs/http-api.md`).
pub(super) async fn gate(State(api): State<KvApi>, mut req: Request, next: Next) -> Response {
    if OPEN.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let cert = req.extensions().get::<ClientCertName>().map(|c| c.0.clone());
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let judged = match user_of(&api, auth.as_deref(), cert.as_deref()).await {
        Ok(user) if keyed(req.uri().path()) => {
            req.extensions_mut().insert(HttpCaller(user));
            Ok(())
        }
        Ok(user) => api.authorize(user.as_ref(), &Need::Root),
        Err(e) => Err(e),
    };
    match judged {
        Ok(()) => next.run(req).await,
        Err(e) => {
            api.count(false, true);
            HttpError::from(e).into_response()
        }
    }
}
