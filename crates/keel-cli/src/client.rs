//! The HTTP/JSON client: endpoint parsing, failover across endpoints, the wire types of
//! `docs/http-api.md` and their decoding, and the error a command reports.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::http::uri::Authority;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::tls::{Alpn, ClientTls, Connector, TlsError};

/// Largest answer body read into memory. Range answers are not bounded by the server's
/// `max_request_bytes`, so this is generous; it only stops a runaway answer.
const MAX_ANSWER_BYTES: usize = 512 * 1024 * 1024;

/// TCP keep-alive on every connection: probes after this much silence, ...
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ... then one every this long, ...
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ... and the connection fails after this many unanswered: a vanished peer is noticed in ~16 s.
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Bytes kept verbatim in a key or query value: RFC 3986 unreserved characters. Everything else,
/// `/` included, is percent-encoded, so a key never produces `//` or a dot segment in the path.
const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

// ---------------------------------------------------------------------------------------------
// Endpoints and URL encoding
// ---------------------------------------------------------------------------------------------

/// One server client address, `host:port`, and how it is dialed: plaintext, or TLS with the
/// client's [`ClientTls`]. Displayed as the user knows it: `host:port`, `https://host:port`
/// when dialed over TLS.
#[derive(Clone)]
pub struct Endpoint {
    authority: String,
    scheme: Scheme,
    /// Set (by [`Endpoint::secured`]) exactly when this endpoint is dialed over TLS.
    tls: Option<Arc<ClientTls>>,
}

/// The scheme an endpoint was given with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    /// `host:port`: TLS when `--cacert` is given, as etcdctl does.
    Bare,
    Http,
    Https,
}

impl Endpoint {
    /// Parses `host:port`, `http://host:port` or `https://host:port` (a trailing `/` is allowed).
    /// A port is required: `http://host` meaning port 80 would surprise a user of a store that
    /// listens on 2379. An `https://` endpoint is usable only once [`Endpoint::secured`].
    pub fn parse(input: &str) -> Result<Endpoint, EndpointError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(EndpointError::Empty);
        }
        let (scheme, rest) = match trimmed.split_once("://") {
            None => (Scheme::Bare, trimmed),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
            Some((scheme, _)) => return Err(EndpointError::Scheme(scheme.to_owned())),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(EndpointError::Path(input.to_owned()));
        }
        if rest.contains('@') {
            return Err(EndpointError::Invalid(input.to_owned()));
        }
        let authority: Authority = rest.parse().map_err(|_| EndpointError::Invalid(input.to_owned()))?;
        if authority.port_u16().is_none() {
            // `host:` or `host:x` has a port separator but no usable port.
            let has_separator = rest.rfind(':') > rest.rfind(']');
            return Err(if has_separator {
                EndpointError::Invalid(input.to_owned())
            } else {
                EndpointError::NoPort(input.to_owned())
            });
        }
        Ok(Endpoint { authority: authority.as_str().to_owned(), scheme, tls: None })
    }

    /// Decides how the endpoint is dialed, given the client's TLS settings (`None`: no
    /// `--cacert`): `https://` over TLS (refused without settings), `http://` in plaintext, a bare
    /// `host:port` over TLS exactly when there are settings.
    pub fn secured(mut self, tls: Option<&Arc<ClientTls>>) -> Result<Endpoint, TlsError> {
        self.tls = match (self.scheme, tls) {
            (Scheme::Http, _) | (Scheme::Bare, None) => None,
            (Scheme::Https | Scheme::Bare, Some(tls)) => Some(tls.clone()),
            (Scheme::Https, None) => {
                return Err(TlsError::HttpsWithoutCacert(format!("https://{}", self.authority)))
            }
        };
        Ok(self)
    }

    /// Whether the endpoint is dialed over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS settings it is dialed with, if any.
    pub fn tls(&self) -> Option<&Arc<ClientTls>> {
        self.tls.as_ref()
    }

    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `scheme://host:port` with the scheme it is dialed with.
    pub fn base_url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base_url(), path_and_query)
    }
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Endpoint) -> bool {
        self.authority == other.authority && self.scheme == other.scheme && self.is_tls() == other.is_tls()
    }
}

impl Eq for Endpoint {}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({self})")
    }
}

impl From<std::net::SocketAddr> for Endpoint {
    /// A socket address is always a valid `host:port` (IPv6 in brackets), dialed in plaintext.
    fn from(addr: std::net::SocketAddr) -> Endpoint {
        Endpoint { authority: addr.to_string(), scheme: Scheme::Bare, tls: None }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_tls() {
            f.write_str("https://")?;
        }
        f.write_str(&self.authority)
    }
}

/// Why an `--endpoints` entry (or a member's client address) is not usable.
#[derive(Debug, PartialEq, Eq)]
pub enum EndpointError {
    Empty,
    Scheme(String),
    Path(String),
    NoPort(String),
    Invalid(String),
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointError::Empty => write!(f, "empty endpoint (expected host:port)"),
            EndpointError::Scheme(s) => {
                write!(f, "unsupported scheme '{s}://' (expected http:// or https://)")
            }
            EndpointError::Path(e) => write!(f, "endpoint '{e}' has a path (expected host:port)"),
            EndpointError::NoPort(e) => write!(f, "endpoint '{e}' has no port (expected host:port)"),
            EndpointError::Invalid(e) => write!(f, "invalid endpoint '{e}' (expected host:port)"),
        }
    }
}

impl StdError for EndpointError {}

/// Percent-encodes a key (or any query value) for a URL: every byte outside the unreserved
/// characters. The keys `.` and `..` are fully encoded so no path normalization can touch them.
pub fn encode_component(bytes: &[u8]) -> String {
    if bytes == b"." || bytes == b".." {
        return bytes.iter().map(|_| "%2E").collect();
    }
    percent_encoding::percent_encode(bytes, KEEP).to_string()
}

/// `/v1/kv/{key}` with the key percent-encoded.
pub fn kv_path(key: &[u8]) -> String {
    format!("/v1/kv/{}", encode_component(key))
}

/// Builds `path?a=b&c=d` from already-decided parameters; values are percent-encoded.
pub fn with_query(path: &str, params: &[(&str, Vec<u8>)]) -> String {
    let mut out = path.to_owned();
    for (i, (name, value)) in params.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(name);
        out.push('=');
        out.push_str(&encode_component(value));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why one endpoint did not answer. Whether the client may then try the next endpoint depends
/// on the request: see [`may_fail_over`].
#[derive(Debug)]
pub enum Unreachable {
    /// No complete answer within `--timeout`. The request may have been sent and carried out:
    /// keel cannot tell whether the deadline struck while connecting or after sending.
    TimedOut(Duration),
    /// Connecting failed (refused, unroutable, the TLS handshake refused): nothing was sent.
    Connect(hyper_util::client::legacy::Error),
    /// The exchange failed after connecting (reset, closed before the answer): the request may
    /// have been sent and carried out.
    Transport(hyper_util::client::legacy::Error),
    /// The answer's body could not be read to the end: the request was carried out or refused,
    /// keel cannot tell which.
    Body(Box<dyn StdError + Send + Sync>),
    /// `503` with `"retryable": true`: this node did not carry the request out; another may.
    Retryable { code: String, message: String },
}

impl Unreachable {
    /// Whether the node certainly did not carry the request out, so sending it elsewhere cannot
    /// apply it twice.
    pub fn certainly_not_applied(&self) -> bool {
        matches!(self, Unreachable::Connect(_) | Unreachable::Retryable { .. })
    }
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unreachable::TimedOut(d) => write!(f, "timed out after {}", format_duration(*d)),
            Unreachable::Connect(e) | Unreachable::Transport(e) => f.write_str(&describe_cause(e)),
            Unreachable::Body(e) => write!(f, "answer cut short: {}", describe_cause(e.as_ref())),
            Unreachable::Retryable { code, message } => write!(f, "{message} ({code})"),
        }
    }
}

/// Whether `request`, having failed with `failure` on one endpoint, may be sent to the next.
///
/// Reads, and writes that do no harm when carried out twice ([`ApiRequest::repeatable`]), may go
/// anywhere. Any other write goes to another endpoint only when this one certainly did not carry
/// it out; otherwise a retry could apply it twice (a `txn` whose compares see its own first
/// run, a membership change made twice), so the caller must learn that the outcome is unknown.
pub fn may_fail_over(request: &ApiRequest, failure: &Unreachable) -> bool {
    request.may_repeat() || failure.certainly_not_applied()
}

/// Whether a request that waits in line ([`Client::call_waiting`]), having failed with `failure`
/// on one endpoint, may be sent to the next: only when it certainly never reached the server.
pub fn waiting_may_fail_over(_request: &ApiRequest, failure: &Unreachable) -> bool {
    matches!(failure, Unreachable::Connect(_))
}

/// One failed attempt, for the "no endpoint answered" message.
#[derive(Debug)]
pub struct Attempt {
    pub endpoint: Endpoint,
    pub failure: Unreachable,
}

fn write_attempts(f: &mut fmt::Formatter<'_>, attempts: &[Attempt]) -> fmt::Result {
    for (i, a) in attempts.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{} ({})", a.endpoint, a.failure)?;
    }
    Ok(())
}

/// Why a request failed. `NoEndpoint` means nobody carried it out; `OutcomeUnknown` that a write
/// may or may not have been carried out; the others are final answers.
#[derive(Debug)]
pub enum ClientError {
    /// Every endpoint was unreachable or said "retry elsewhere".
    NoEndpoint(Vec<Attempt>),
    /// A write reached `last` and no complete answer came back: it may have been applied, so it
    /// was not sent to another endpoint. `before` are the endpoints that certainly did not apply it.
    OutcomeUnknown { before: Vec<Attempt>, last: Box<Attempt> },
    /// The server refused the request with a non-retryable error (`docs/http-api.md`, Errors).
    Server { code: String, message: String },
    /// An error status without the JSON error body (a proxy, or not a keeld).
    Http { endpoint: Endpoint, status: StatusCode, body: String },
    /// A success status whose body is not the JSON the API documents.
    BadAnswer { endpoint: Endpoint, reason: DecodeError },
    /// The request itself could not be built (an address `hyper` does not accept as a URI).
    Request { endpoint: Endpoint, reason: hyper::http::Error },
    /// A stream (a watch) broke off after it began.
    StreamBroken { endpoint: Endpoint, reason: String },
    /// Printing what a stream delivered failed (e.g. stdout closed).
    Output(std::io::Error),
}

impl ClientError {
    /// The server's error code, when the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NoEndpoint(attempts) => {
                f.write_str("no endpoint answered: ")?;
                write_attempts(f, attempts)
            }
            ClientError::OutcomeUnknown { before, last } => {
                write!(
                    f,
                    "{} ({}): the outcome is unknown, the request may or may not have been applied; \
                     it was not sent to another endpoint",
                    last.endpoint, last.failure
                )?;
                if !before.is_empty() {
                    f.write_str(" (tried before: ")?;
                    write_attempts(f, before)?;
                    f.write_str(")")?;
                }
                Ok(())
            }
            ClientError::Server { code, message, .. } => write!(f, "{message} ({code})"),
            ClientError::Http { endpoint, status, body } => {
                write!(f, "{endpoint} answered HTTP {status} without a Keel error body")?;
                if !body.is_empty() {
                    write!(f, ": {body}")?;
                }
                Ok(())
            }
            ClientError::BadAnswer { endpoint, reason } => {
                write!(f, "malformed answer from {endpoint}: {reason}")
            }
            ClientError::Request { endpoint, reason } => {
                write!(f, "cannot build a request for {endpoint}: {reason}")
            }
            ClientError::StreamBroken { endpoint, reason } => {
                write!(f, "the stream from {endpoint} broke: {reason}")
            }
            ClientError::Output(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl StdError for ClientError {}

/// Why an answer body does not decode.
#[derive(Debug)]
pub enum DecodeError {
    Json(serde_json::Error),
    Base64 {
        field: &'static str,
        reason: base64::DecodeError,
    },
    MissingKey,
    /// Bytes the answer must carry, as `field` or `field_base64`, are in neither.
    Missing(&'static str),
    /// A number the answer must carry is not there.
    NoNumber(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(e) => write!(f, "{e}"),
            DecodeError::Base64 { field, reason } => write!(f, "{field} is not base64: {reason}"),
            DecodeError::MissingKey => write!(f, "a key-value has neither key nor key_base64"),
            DecodeError::Missing(field) => write!(f, "the answer has neither {field} nor {field}_base64"),
            DecodeError::NoNumber(field) => write!(f, "the answer has no {field}"),
        }
    }
}

/// `5s`, `1.5s`, `250ms`: how the user would have written the timeout.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// A short human reason from an error chain: the innermost I/O error when there is one
/// ("connection refused" rather than "client error (Connect)").
fn describe_cause(err: &(dyn StdError + 'static)) -> String {
    if let Some(tls) = crate::tls::explain(err) {
        return tls;
    }
    let mut innermost: &(dyn StdError + 'static) = err;
    let mut io: Option<&std::io::Error> = None;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<std::io::Error>() {
            io = Some(found);
        }
        innermost = e;
        cur = e.source();
    }
    if let Some(io) = io {
        use std::io::ErrorKind as K;
        return match io.kind() {
            K::ConnectionRefused => "connection refused".to_owned(),
            K::ConnectionReset => "connection reset".to_owned(),
            K::ConnectionAborted => "connection aborted".to_owned(),
            K::TimedOut => "connect timed out".to_owned(),
            K::AddrNotAvailable => "address not available".to_owned(),
            K::UnexpectedEof => "connection closed before an answer".to_owned(),
            _ => io.to_string(),
        };
    }
    innermost.to_string()
}

// ---------------------------------------------------------------------------------------------
// The failover client
// ---------------------------------------------------------------------------------------------

/// An HTTP request to the API, independent of the endpoint it goes to.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub method: Method,
    /// Path and query, already percent-encoded (`/v1/kv/a%20b?prev_kv=true`).
    pub path: String,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    /// A write that does no harm when carried out twice (see [`ApiRequest::repeatable`]).
    pub repeatable: bool,
}

impl ApiRequest {
    pub fn get(path: String) -> ApiRequest {
        ApiRequest { method: Method::GET, path, body: Bytes::new(), content_type: None, repeatable: false }
    }

    pub fn delete(path: String) -> ApiRequest {
        ApiRequest { method: Method::DELETE, path, body: Bytes::new(), content_type: None, repeatable: false }
    }

    pub fn put_bytes(path: String, body: Vec<u8>) -> ApiRequest {
        ApiRequest {
            method: Method::PUT,
            path,
            body: Bytes::from(body),
            content_type: Some("application/octet-stream"),
            repeatable: false,
        }
    }

    pub fn post_json(path: String, body: &serde_json::Value) -> ApiRequest {
        ApiRequest {
            method: Method::POST,
            path,
            body: Bytes::from(body.to_string()),
            content_type: Some("application/json"),
            repeatable: false,
        }
    }

    /// A POST with no body at all (`POST /v1/cluster/init` for a single-node cluster).
    pub fn post_empty(path: String) -> ApiRequest {
        ApiRequest { method: Method::POST, path, body: Bytes::new(), content_type: None, repeatable: false }
    }

    /// Marks a write whose second run, after a first that may have happened, changes nothing more
    /// than the first did: a lease keep-alive, releasing a lock by its key, a resignation guarded
    /// by the leader key's create revision. It then fails over like a read.
    pub fn repeatable(mut self) -> ApiRequest {
        self.repeatable = true;
        self
    }

    /// A read changes nothing on the server, so sending it twice is harmless. Every `GET` of the
    /// API is one; every other method is a write.
    pub fn is_read(&self) -> bool {
        self.method == Method::GET
    }

    /// Whether sending the request again, after an attempt that may have been carried out, is
    /// harmless: a read, or a write marked [`ApiRequest::repeatable`].
    pub fn may_repeat(&self) -> bool {
        self.is_read() || self.repeatable
    }
}

/// A successful (2xx) answer: which endpoint gave it and its JSON body.
#[derive(Debug)]
pub struct Answer {
    pub endpoint: Endpoint,
    pub body: serde_json::Value,
}

impl Answer {
    /// Decodes the body into one of the wire types below.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_value(self.body.clone()).map_err(|e| ClientError::BadAnswer {
            endpoint: self.endpoint.clone(),
            reason: DecodeError::Json(e),
        })
    }
}

/// What one endpoint did with a request: answered (final, success or not) or could not serve it.
enum Outcome {
    Final(Result<Answer, ClientError>),
    Unreachable(Unreachable),
}

/// Sends requests to the first endpoint that answers. Cloning is cheap (a shared pool).
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<Endpoint>,
    timeout: Duration,
    /// How endpoints met along the way (members' client addresses) are dialed.
    tls: Option<Arc<ClientTls>>,
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    /// `Authorization` on every request (--user), marked sensitive.
    credentials: Option<hyper::header::HeaderValue>,
}

impl Client {
    /// A client of `endpoints` (each already [`Endpoint::secured`]); `tls` is what other
    /// addresses it is told of are dialed with.
    pub fn new(endpoints: Vec<Endpoint>, timeout: Duration, tls: Option<Arc<ClientTls>>) -> Client {
        let mut connector = HttpConnector::new();
        // Bounds connecting on its own, for the requests whose answer may take long to come
        // ([`Client::call_waiting`]); the other requests are bounded as a whole anyway.
        connector.set_connect_timeout(Some(timeout));
        // A request that waits for its answer (a lock, a campaign) would otherwise wait forever
        // on a peer that vanished without closing the connection (a host down, a network cut).
        connector.set_keepalive(Some(TCP_KEEPALIVE_IDLE));
        connector.set_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL));
        connector.set_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
        let connector = Connector::new(connector, tls.clone(), Alpn::Http1);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        Client { endpoints, timeout, tls, http, credentials: None }
    }

    /// The same client, sending every request as user `name` (HTTP basic credentials, which
    /// keeld checks on every request; see keel-kv's `docs/http-api.md`, "Auth").
    pub fn with_user(mut self, name: &str, password: &str) -> Result<Client, String> {
        use base64::Engine;
        if name.contains(':') {
            return Err(format!("a user name with a colon cannot be sent: {name:?}"));
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"));
        let mut value = hyper::header::HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|e| format!("credentials: {e}"))?;
        value.set_sensitive(true);
        self.credentials = Some(value);
        Ok(self)
    }

    /// The same client (same endpoints and connections) with another per-request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client { timeout, ..self.clone() }
    }

    /// Tries the endpoints in order. A read moves on to the next one after any failure to
    /// answer; a write only when the endpoint certainly did not carry it out ([`may_fail_over`]),
    /// and otherwise stops with [`ClientError::OutcomeUnknown`]. Any answer (success or error) is
    /// final.
    pub async fn call(&self, request: &ApiRequest) -> Result<Answer, ClientError> {
        self.call_until(request, Some(self.timeout), may_fail_over).await
    }

    /// [`Client::call`] for a request that waits in line on the server and is answered once at
    /// the front (a lock acquired, an election won): connecting is bounded by the timeout, the
    /// answer is awaited for as long as it takes.
    ///
    /// It moves on to the next endpoint only when connecting failed. Any other failure, a
    /// retryable `503` included, may come after the request took its place in line (its key
    /// made): the server may then still withdraw that place at any time, so the place must be
    /// given up (its lease revoked) rather than taken up again by the same request elsewhere.
    /// Such a failure is [`ClientError::OutcomeUnknown`].
    pub async fn call_waiting(&self, request: &ApiRequest) -> Result<Answer, ClientError> {
        self.call_until(request, None, waiting_may_fail_over).await
    }

    async fn call_until(
        &self,
        request: &ApiRequest,
        deadline: Option<Duration>,
        may_fail_over: impl Fn(&ApiRequest, &Unreachable) -> bool,
    ) -> Result<Answer, ClientError> {
        let mut attempts = Vec::new();
        for endpoint in &self.endpoints {
            match self.call_endpoint(endpoint, request, deadline).await {
                Outcome::Final(result) => return result,
                Outcome::Unreachable(failure) => {
                    let fail_over = may_fail_over(request, &failure);
                    let attempt = Attempt { endpoint: endpoint.clone(), failure };
                    if !fail_over {
                        return Err(ClientError::OutcomeUnknown {
                            before: attempts,
                            last: Box::new(attempt),
                        });
                    }
                    attempts.push(attempt);
                }
            }
        }
        Err(ClientError::NoEndpoint(attempts))
    }

    /// Opens a stream of server-sent events (`GET path`) on `endpoint` and hands each `data:`
    /// line's JSON to `on_message` until the server ends the stream (Ok) or the connection fails
    /// (Err). Only connecting and the answer's header are bounded by the timeout: a watch may
    /// be quiet for hours.
    pub async fn stream(
        &self,
        endpoint: &Endpoint,
        path: &str,
        mut on_message: impl FnMut(serde_json::Value) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let mut builder = Request::builder().method(Method::GET).uri(endpoint.url(path));
        if let Some(credentials) = &self.credentials {
            builder = builder.header(hyper::header::AUTHORIZATION, credentials.clone());
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .map_err(|reason| ClientError::Request { endpoint: endpoint.clone(), reason })?;
        let unreachable =
            |failure| ClientError::NoEndpoint(vec![Attempt { endpoint: endpoint.clone(), failure }]);
        let response = match tokio::time::timeout(self.timeout, self.http.request(request)).await {
            Err(_) => return Err(unreachable(Unreachable::TimedOut(self.timeout))),
            Ok(Err(e)) => return Err(unreachable(Unreachable::Connect(e))),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(Unreachable::Body(e)))?;
            return match classify(endpoint, status, &bytes.to_bytes()) {
                Outcome::Final(Err(e)) => Err(e),
                Outcome::Unreachable(failure) => Err(unreachable(failure)),
                Outcome::Final(Ok(_)) => Ok(()),
            };
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::StreamBroken {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            if pending.len() > MAX_ANSWER_BYTES {
                return Err(ClientError::StreamBroken {
                    endpoint: endpoint.clone(),
                    reason: format!("a message over {MAX_ANSWER_BYTES} bytes"),
                });
            }
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Some(json) = line.strip_prefix(b"data:") else { continue };
                let value: serde_json::Value = serde_json::from_slice(json.trim_ascii()).map_err(|e| {
                    ClientError::BadAnswer { endpoint: endpoint.clone(), reason: DecodeError::Json(e) }
                })?;
                on_message(value).map_err(ClientError::Output)?;
            }
        }
        Ok(())
    }

    /// The endpoints, in the order they are tried.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The per-request timeout (`--timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// An address met along the way (a member's client address), dialed as the client's own
    /// endpoints are: over TLS when the client has `--cacert`, unless it says `http://`.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, String> {
        let endpoint = Endpoint::parse(addr).map_err(|e| e.to_string())?;
        endpoint.secured(self.tls.as_ref()).map_err(|e| e.to_string())
    }

    /// Sends to exactly one endpoint, with no failover (e.g. one member's own status).
    pub async fn call_one(&self, endpoint: &Endpoint, request: &ApiRequest) -> Result<Answer, ClientError> {
        match self.call_endpoint(endpoint, request, Some(self.timeout)).await {
            Outcome::Final(result) => result,
            Outcome::Unreachable(failure) => {
                let attempt = Attempt { endpoint: endpoint.clone(), failure };
                Err(if may_fail_over(request, &attempt.failure) {
                    ClientError::NoEndpoint(vec![attempt])
                } else {
                    ClientError::OutcomeUnknown { before: Vec::new(), last: Box::new(attempt) }
                })
            }
        }
    }

    /// One attempt on one endpoint; `deadline` bounds connecting, sending and reading the whole
    /// answer (`None`: only connecting is bounded, by the connector's timeout).
    async fn call_endpoint(
        &self,
        endpoint: &Endpoint,
        request: &ApiRequest,
        deadline: Option<Duration>,
    ) -> Outcome {
        let mut builder = Request::builder().method(request.method.clone()).uri(endpoint.url(&request.path));
        if let Some(ct) = request.content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Some(credentials) = &self.credentials {
            builder = builder.header(hyper::header::AUTHORIZATION, credentials.clone());
        }
        let http_request = match builder.body(Full::new(request.body.clone())) {
            Ok(r) => r,
            Err(reason) => {
                return Outcome::Final(Err(ClientError::Request { endpoint: endpoint.clone(), reason }))
            }
        };
        // One deadline covers connecting, sending and reading the whole answer.
        let exchange = async {
            let response = self.http.request(http_request).await.map_err(|e| {
                // A server that refuses our certificate (or its absence) says so once the TLS 1.3
                // handshake is over on our side, when the request may be on its way: it never
                // read the request, as surely as if connecting had failed.
                if e.is_connect() || crate::tls::refused_in_handshake(&e) {
                    Unreachable::Connect(e)
                } else {
                    Unreachable::Transport(e)
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(Unreachable::Body)?
                .to_bytes();
            Ok::<_, Unreachable>((status, body))
        };
        let answered = match deadline {
            Some(deadline) => match tokio::time::timeout(deadline, exchange).await {
                Err(_elapsed) => return Outcome::Unreachable(Unreachable::TimedOut(deadline)),
                Ok(answered) => answered,
            },
            None => exchange.await,
        };
        match answered {
            Err(failure) => Outcome::Unreachable(failure),
            Ok((status, body)) => classify(endpoint, status, &body),
        }
    }
}

/// Decides what an HTTP answer means: success, a final error, or "try the next endpoint".
fn classify(endpoint: &Endpoint, status: StatusCode, body: &[u8]) -> Outcome {
    if status.is_success() {
        // `{}` and an empty body are both "OK, nothing to say".
        let value = if body.iter().all(u8::is_ascii_whitespace) {
            Ok(serde_json::Value::Object(serde_json::Map::new()))
        } else {
            serde_json::from_slice(body)
        };
        return Outcome::Final(match value {
            Ok(body) => Ok(Answer { endpoint: endpoint.clone(), body }),
            Err(e) => {
                Err(ClientError::BadAnswer { endpoint: endpoint.clone(), reason: DecodeError::Json(e) })
            }
        });
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => {
            if status == StatusCode::SERVICE_UNAVAILABLE && error.retryable {
                Outcome::Unreachable(Unreachable::Retryable { code: error.code, message: error.message })
            } else {
                Outcome::Final(Err(ClientError::Server { code: error.code, message: error.message }))
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let snippet: String = text.trim().chars().take(200).collect();
            Outcome::Final(Err(ClientError::Http { endpoint: endpoint.clone(), status, body: snippet }))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire types (docs/http-api.md). Tolerant: unknown fields are ignored, absent numbers are None.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retryable: bool,
}

/// `KV` as the server sends it: text fields, or `*_base64` when the bytes are not UTF-8.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WireKv {
    pub key: Option<String>,
    pub key_base64: Option<String>,
    pub value: Option<String>,
    pub value_base64: Option<String>,
    pub mod_revision: Option<i64>,
    pub create_revision: Option<i64>,
}

/// A decoded key-value: bytes, whatever their encoding on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    /// `None` for `keys_only` answers.
    pub value: Option<Vec<u8>>,
}

impl WireKv {
    pub fn decode(&self) -> Result<Kv, DecodeError> {
        let key = match (&self.key, &self.key_base64) {
            (Some(k), _) => k.as_bytes().to_vec(),
            (None, Some(b)) => decode_base64("key_base64", b)?,
            (None, None) => return Err(DecodeError::MissingKey),
        };
        let value = match (&self.value, &self.value_base64) {
            (Some(v), _) => Some(v.as_bytes().to_vec()),
            (None, Some(b)) => Some(decode_base64("value_base64", b)?),
            (None, None) => None,
        };
        Ok(Kv { key, value })
    }
}

fn decode_base64(field: &'static str, text: &str) -> Result<Vec<u8>, DecodeError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|reason| DecodeError::Base64 { field, reason })
}

/// Bytes that travel as `field` (UTF-8 text) or `field_base64`, as the server sends keys, names
/// and values.
pub fn text_or_base64(
    field: &'static str,
    text: Option<&str>,
    b64: Option<&str>,
) -> Result<Vec<u8>, DecodeError> {
    match (text, b64) {
        (Some(t), _) => Ok(t.as_bytes().to_vec()),
        (None, Some(b)) => decode_base64(field, b),
        (None, None) => Err(DecodeError::Missing(field)),
    }
}

/// Puts bytes into a JSON body as the server reads them: `field` when they are UTF-8 text, else
/// `field_base64`.
pub fn put_bytes_field(body: &mut serde_json::Map<String, serde_json::Value>, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => body.insert(field.to_owned(), text.into()),
        Err(_) => body.insert(
            format!("{field}_base64"),
            base64::engine::general_purpose::STANDARD.encode(bytes).into(),
        ),
    };
}

/// Decodes a list of wire key-values, naming the endpoint on failure.
pub fn decode_kvs(endpoint: &Endpoint, kvs: &[WireKv]) -> Result<Vec<Kv>, ClientError> {
    kvs.iter()
        .map(WireKv::decode)
        .collect::<Result<_, _>>()
        .map_err(|reason| ClientError::BadAnswer { endpoint: endpoint.clone(), reason })
}

/// `PUT /v1/kv/{key}`.
#[derive(Debug, Deserialize)]
pub struct PutAnswer {
    pub prev_kv: Option<WireKv>,
}

/// `GET /v1/kv?...`, and a txn's `get` response.
#[derive(Debug, Default, Deserialize)]
pub struct RangeAnswer {
    #[serde(default)]
    pub kvs: Vec<WireKv>,
    #[serde(default)]
    pub count: u64,
}

/// `DELETE /v1/kv/{key}`, and a txn's `delete` response.
#[derive(Debug, Deserialize)]
pub struct DeleteAnswer {
    #[serde(default)]
    pub deleted: u64,
    #[serde(default)]
    pub prev_kvs: Vec<WireKv>,
}

/// `POST /v1/txn`.
#[derive(Debug, Deserialize)]
pub struct TxnAnswer {
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<TxnResponse>,
}

/// One txn response: `{"put": {...}}`, `{"get": {...}}` or `{"delete": {...}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxnResponse {
    Put(serde::de::IgnoredAny),
    Get(RangeAnswer),
    Delete(DeleteAnswer),
}

/// A txn response, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum OpResult {
    Put,
    Get(Vec<Kv>),
    Delete(u64),
}

impl TxnAnswer {
    /// The responses with their keys and values decoded.
    pub fn results(&self, endpoint: &Endpoint) -> Result<Vec<OpResult>, ClientError> {
        self.responses
            .iter()
            .map(|r| {
                Ok(match r {
                    TxnResponse::Put(_) => OpResult::Put,
                    TxnResponse::Get(range) => OpResult::Get(decode_kvs(endpoint, &range.kvs)?),
                    TxnResponse::Delete(del) => OpResult::Delete(del.deleted),
                })
            })
            .collect()
    }
}

/// `GET /v1/cluster/members`, and the answer of the membership changes.
#[derive(Debug, Deserialize)]
pub struct MembersAnswer {
    pub leader: Option<u64>,
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    #[serde(default)]
    pub peer_addr: String,
    pub client_addr: Option<String>,
    #[serde(default)]
    pub voter: bool,
}

/// `GET /v1/cluster/status` of one node (the fields `keel cluster status` shows).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StatusAnswer {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: Option<String>,
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Only on the leader: follower id (as a string, JSON object keys are strings) → progress.
    pub replication: Option<BTreeMap<String, Replication>>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Replication {
    pub matched_index: Option<u64>,
    pub lag: Option<u64>,
}

/// `POST /v1/lease/grant` and `POST /v1/lease/keepalive`: the lease and its TTL in seconds (the
/// granted TTL, not what is left of it).
#[derive(Debug, Deserialize)]
pub struct LeaseAnswer {
    pub id: i64,
    pub ttl: i64,
}

/// `GET /v1/lease/ttl`.
#[derive(Debug, Deserialize)]
pub struct LeaseTtlAnswer {
    pub id: i64,
    /// Seconds left.
    pub ttl: i64,
    pub granted_ttl: i64,
    /// Keys only (no values); present when asked for with `keys=true`.
    #[serde(default)]
    pub keys: Vec<WireKv>,
}

/// `GET /v1/lease/list`.
#[derive(Debug, Deserialize)]
pub struct LeasesAnswer {
    #[serde(default)]
    pub leases: Vec<i64>,
}

/// `POST /v1/lock/acquire`: the holder's key.
#[derive(Debug, Deserialize)]
pub struct LockAnswer {
    pub key: Option<String>,
    pub key_base64: Option<String>,
}

impl LockAnswer {
    pub fn key(&self, endpoint: &Endpoint) -> Result<Vec<u8>, ClientError> {
        text_or_base64("key", self.key.as_deref(), self.key_base64.as_deref())
            .map_err(|reason| ClientError::BadAnswer { endpoint: endpoint.clone(), reason })
    }
}

/// `POST /v1/election/campaign`: the leadership won, which `proclaim` and `resign` name.
#[derive(Debug, Deserialize)]
pub struct CampaignAnswer {
    pub key: Option<String>,
    pub key_base64: Option<String>,
    /// The leader key's create revision.
    pub rev: i64,
    pub lease: i64,
}

/// `GET /v1/election/leader`, and each message of `GET /v1/election/observe`.
#[derive(Debug, Deserialize)]
pub struct LeaderAnswer {
    pub kv: WireKv,
}

/// `POST /v1/cluster/transfer-leader`.
#[derive(Debug, Deserialize)]
pub struct TransferAnswer {
    pub leader: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_accept_host_port_and_http_urls() {
        let got: Vec<Endpoint> =
            ["127.0.0.1:2379", " http://10.0.0.2:22379/", "HTTP://node-3:2379", "[::1]:2379"]
                .into_iter()
                .map(|e| Endpoint::parse(e).expect("valid endpoint"))
                .collect();
        let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["127.0.0.1:2379", "10.0.0.2:22379", "node-3:2379", "[::1]:2379"]);
        assert_eq!(got[0].url("/v1/kv/a"), "http://127.0.0.1:2379/v1/kv/a");
    }

    #[test]
    fn without_cacert_only_https_is_refused_and_nothing_is_tls() {
        let plain = |e: &str| Endpoint::parse(e).expect("valid endpoint").secured(None);
        for e in ["127.0.0.1:2379", "http://127.0.0.1:2379"] {
            let endpoint = plain(e).expect("dialed in plaintext");
            assert!(!endpoint.is_tls());
            assert_eq!(endpoint.base_url(), "http://127.0.0.1:2379");
        }
        let refused = plain("https://127.0.0.1:2379").expect_err("https needs --cacert");
        assert!(refused.to_string().starts_with("https://127.0.0.1:2379 needs --cacert"), "{refused}");
    }

    #[test]
    fn endpoints_reject_what_cannot_be_dialed() {
        assert_eq!(Endpoint::parse(""), Err(EndpointError::Empty));
        assert_eq!(Endpoint::parse("ftp://a:1"), Err(EndpointError::Scheme("ftp".into())));
        assert_eq!(Endpoint::parse("a:1/v1"), Err(EndpointError::Path("a:1/v1".into())));
        assert_eq!(Endpoint::parse("localhost"), Err(EndpointError::NoPort("localhost".into())));
        assert_eq!(Endpoint::parse("http://a"), Err(EndpointError::NoPort("http://a".into())));
        assert_eq!(Endpoint::parse("a:notaport"), Err(EndpointError::Invalid("a:notaport".into())));
        assert_eq!(Endpoint::parse("a:"), Err(EndpointError::Invalid("a:".into())));
        assert_eq!(Endpoint::parse("[::1]"), Err(EndpointError::NoPort("[::1]".into())));
        assert_eq!(Endpoint::parse("user@a:1"), Err(EndpointError::Invalid("user@a:1".into())));
        assert_eq!(
            Endpoint::parse("ftp://a:1").expect_err("ftp is refused").to_string(),
            "unsupported scheme 'ftp://' (expected http:// or https://)"
        );
    }

    #[test]
    fn keys_are_percent_encoded_outside_unreserved() {
        assert_eq!(kv_path(b"foo"), "/v1/kv/foo");
        assert_eq!(kv_path(b"a/b"), "/v1/kv/a%2Fb");
        assert_eq!(kv_path(b"a b?c#d%e"), "/v1/kv/a%20b%3Fc%23d%25e");
        assert_eq!(kv_path(b"AZaz09-._~"), "/v1/kv/AZaz09-._~");
        assert_eq!(kv_path("é".as_bytes()), "/v1/kv/%C3%A9");
        assert_eq!(kv_path(&[0x00, 0xff]), "/v1/kv/%00%FF");
        assert_eq!(kv_path(b"."), "/v1/kv/%2E");
        assert_eq!(kv_path(b".."), "/v1/kv/%2E%2E");
        assert_eq!(kv_path(b"..."), "/v1/kv/...");
    }

    #[test]
    fn query_values_are_encoded_too() {
        let q = with_query("/v1/kv", &[("prefix", b"a/&=b".to_vec()), ("limit", b"10".to_vec())]);
        assert_eq!(q, "/v1/kv?prefix=a%2F%26%3Db&limit=10");
        assert_eq!(with_query("/v1/kv", &[]), "/v1/kv");
    }

    #[test]
    fn kvs_decode_text_and_base64() {
        let wire: WireKv = serde_json::from_str(
            r#"{"key_base64": "AP8=", "value": "v", "create_revision": 2, "mod_revision": 3, "version": 1}"#,
        )
        .expect("valid JSON");
        let kv = wire.decode().expect("decodes");
        assert_eq!(kv.key, vec![0x00, 0xff]);
        assert_eq!(kv.value, Some(b"v".to_vec()));

        let keys_only: WireKv = serde_json::from_str(r#"{"key": "k"}"#).expect("valid JSON");
        assert_eq!(keys_only.decode().expect("decodes").value, None);

        let bad: WireKv = serde_json::from_str(r#"{"key": "k", "value_base64": "!!"}"#).expect("valid JSON");
        assert!(matches!(bad.decode(), Err(DecodeError::Base64 { field: "value_base64", .. })));
        let keyless: WireKv = serde_json::from_str(r#"{"value": "v"}"#).expect("valid JSON");
        assert!(matches!(keyless.decode(), Err(DecodeError::MissingKey)));
    }

    #[test]
    fn answers_are_classified_for_failover() {
        let ep = Endpoint::parse("n1:2379").expect("valid endpoint");
        let retry = br#"{"error": {"code": "no_leader", "message": "no leader; retry", "retryable": true}}"#;
        match classify(&ep, StatusCode::SERVICE_UNAVAILABLE, retry) {
            Outcome::Unreachable(u) => assert_eq!(u.to_string(), "no leader; retry (no_leader)"),
            Outcome::Final(_) => panic!("a retryable 503 must move on"),
        }
        // A 503 that says "not retryable" is final, as is any other error.
        let final_503 = br#"{"error": {"code": "unavailable", "message": "stopping", "retryable": false}}"#;
        assert!(matches!(
            classify(&ep, StatusCode::SERVICE_UNAVAILABLE, final_503),
            Outcome::Final(Err(ClientError::Server { .. }))
        ));
        let rejected =
            br#"{"error": {"code": "rejected", "message": "already initialized", "retryable": false}}"#;
        match classify(&ep, StatusCode::CONFLICT, rejected) {
            Outcome::Final(Err(e)) => assert_eq!(e.to_string(), "already initialized (rejected)"),
            _ => panic!("expected a final server error"),
        }
        match classify(&ep, StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>") {
            Outcome::Final(Err(e)) => {
                assert_eq!(e.to_string(), "n1:2379 answered HTTP 502 Bad Gateway without a Keel error body: <html>bad gateway</html>")
            }
            _ => panic!("expected a final HTTP error"),
        }
        match classify(&ep, StatusCode::OK, b"") {
            Outcome::Final(Ok(a)) => assert_eq!(a.body, serde_json::json!({})),
            _ => panic!("an empty 200 is an empty object"),
        }
        assert!(matches!(
            classify(&ep, StatusCode::OK, b"not json"),
            Outcome::Final(Err(ClientError::BadAnswer { .. }))
        ));
    }

    #[test]
    fn no_endpoint_message_lists_every_attempt() {
        let err = ClientError::NoEndpoint(vec![
            Attempt {
                endpoint: Endpoint::parse("127.0.0.1:2379").expect("valid endpoint"),
                failure: Unreachable::Retryable { code: "no_leader".into(), message: "no leader".into() },
            },
            Attempt {
                endpoint: Endpoint::parse("127.0.0.1:22379").expect("valid endpoint"),
                failure: Unreachable::TimedOut(Duration::from_secs(5)),
            },
        ]);
        assert_eq!(
            err.to_string(),
            "no endpoint answered: 127.0.0.1:2379 (no leader (no_leader)), 127.0.0.1:22379 (timed out after 5s)"
        );
    }

    #[test]
    fn reads_fail_over_on_anything_writes_only_when_certainly_not_applied() {
        let get = ApiRequest::get("/v1/kv/k".into());
        let writes = [
            ApiRequest::put_bytes("/v1/kv/k".into(), b"v".to_vec()),
            ApiRequest::delete("/v1/kv/k".into()),
            ApiRequest::post_json("/v1/txn".into(), &serde_json::json!({})),
            ApiRequest::post_json("/v1/cluster/promote".into(), &serde_json::json!({"id": 4})),
            ApiRequest::post_empty("/v1/cluster/init".into()),
        ];
        let retryable = || Unreachable::Retryable { code: "no_leader".into(), message: "retry".into() };
        let timed_out = || Unreachable::TimedOut(Duration::from_secs(1));
        let cut_off = || Unreachable::Body("connection reset".into());
        for failure in [retryable(), timed_out(), cut_off()] {
            assert!(may_fail_over(&get, &failure), "a GET moves on after {failure}");
        }
        for write in &writes {
            assert!(!write.is_read(), "{} is a write", write.method);
            assert!(may_fail_over(write, &retryable()), "{} moves on after a retryable 503", write.path);
            assert!(!may_fail_over(write, &timed_out()), "{} stops after a timeout", write.path);
            assert!(!may_fail_over(write, &cut_off()), "{} stops after a cut-off answer", write.path);
        }
    }

    #[test]
    fn repeatable_writes_fail_over_like_reads_and_waits_only_after_a_refused_connect() {
        let keep_alive =
            ApiRequest::post_json("/v1/lease/keepalive".into(), &serde_json::json!({"id": 1})).repeatable();
        let acquire = ApiRequest::post_json("/v1/lock/acquire".into(), &serde_json::json!({"name": "n"}));
        assert!(keep_alive.may_repeat() && !keep_alive.is_read());
        assert!(!acquire.may_repeat());
        let failures = [
            Unreachable::Retryable { code: "no_leader".into(), message: "retry".into() },
            Unreachable::TimedOut(Duration::from_secs(1)),
            Unreachable::Body("connection reset".into()),
        ];
        for failure in &failures {
            assert!(may_fail_over(&keep_alive, failure), "a keep-alive moves on after {failure}");
            // A wait may have taken its place in line before any of these.
            assert!(!waiting_may_fail_over(&acquire, failure), "a wait stops after {failure}");
        }
    }

    /// A real connect failure (nothing listens on the port) is the one transport error after
    /// which a write moves on; any other transport error stops it.
    #[tokio::test]
    async fn connect_errors_are_told_apart_from_errors_after_sending() {
        let port = keel_testkit::free_port();
        let client = Client::new(Vec::new(), Duration::from_secs(5), None);
        let ep = Endpoint::parse(&format!("127.0.0.1:{port}")).expect("valid endpoint");
        let put = ApiRequest::put_bytes("/v1/kv/k".into(), b"v".to_vec());
        match client.call_endpoint(&ep, &put, Some(Duration::from_secs(5))).await {
            Outcome::Unreachable(failure @ Unreachable::Connect(_)) => {
                assert_eq!(failure.to_string(), "connection refused");
                assert!(may_fail_over(&put, &failure));
                assert!(waiting_may_fail_over(&put, &failure));
            }
            Outcome::Unreachable(other) => panic!("expected a connect error, got {other}"),
            Outcome::Final(r) => panic!("expected a connect error, got {r:?}"),
        }
    }

    #[test]
    fn an_unknown_outcome_says_so_and_names_the_endpoints() {
        let err = ClientError::OutcomeUnknown {
            before: vec![Attempt {
                endpoint: Endpoint::parse("127.0.0.1:2379").expect("valid endpoint"),
                failure: Unreachable::Retryable { code: "no_leader".into(), message: "no leader".into() },
            }],
            last: Box::new(Attempt {
                endpoint: Endpoint::parse("127.0.0.1:22379").expect("valid endpoint"),
                failure: Unreachable::TimedOut(Duration::from_millis(500)),
            }),
        };
        assert_eq!(
            err.to_string(),
            "127.0.0.1:22379 (timed out after 500ms): the outcome is unknown, the request may or may \
             not have been applied; it was not sent to another endpoint (tried before: 127.0.0.1:2379 \
             (no leader (no_leader)))"
        );
    }

    #[test]
    fn durations_read_like_the_flag() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn io_causes_read_plainly() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(describe_cause(&refused), "connection refused");
    }
}
