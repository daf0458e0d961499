//! The client port's accept loop: HTTP/1.1 and HTTP/2 (h2c, gRPC) on one listener, with every
//! connection bounded — a cap on open connections, a deadline for the first request (and, for
//! HTTP/1, for every request's header), an idle timeout, HTTP/2 keep-alive pings and a cap on
//! concurrent HTTP/2 streams — and a graceful stop.
//!
//! Why not `axum::serve`: it sets no limit at all. A hostile client kept 2,000 idle, 500
//! slow-header and 200 slow-body connections open for minutes (each one a task, buffers and a
//! file descriptor).
//!
//! TLS (`--cert-file`): every connection completes its handshake before anything else, within
//! the first-request deadline and under the connection cap like any other connection; gRPC and
//! HTTP/1.1 share the port (ALPN `h2`, `http/1.1`). A plaintext client is told the port needs TLS
//! (see [`keel::tls::accept`]). The subject CN of a verified client certificate rides on every
//! request of the connection as [`ClientCertName`].
//!
//! Stop: [`ClientPort::serve`] stops accepting when `stop` completes, asks every connection to
//! finish gracefully (HTTP/1: close once the request in flight is answered; HTTP/2: GOAWAY, the
//! streams in flight finish), and returns once all are closed. The caller bounds that wait; when
//! it gives up and drops the task, every connection is dropped with it (they are owned by one
//! `JoinSet`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How a peer that stopped answering HTTP/2 keep-alive pings is given up on (etcd's
/// `--grpc-keepalive-timeout` default).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a connection closed for idleness may take to wind down (answer what it is sending)
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The limits of the client port (`KeeldConfig`'s `max_client_connections`, `client_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A new connection must have sent its first request (HTTP/1 header, or the HTTP/2 preface
    /// and a first stream) within this; an HTTP/1 request's header must arrive within it, and
    /// every request's body within it of its header.
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2: ping a connection silent for this long; no answer in 20 s closes it. `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// HTTP/2: streams (requests) open at once on one connection.
    pub max_concurrent_streams: u32,
}

/// What the port has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct PortCounters {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Closed because no first request came within `header_timeout`, or idle past `idle_timeout`.
    pub timed_out: AtomicU64,
}

/// The subject CN of the verified client certificate a TLS connection presented
/// (`--client-cert-auth`), added to the extensions of every request on that connection (tonic
/// requests carry them too). With auth on, etcd takes it as the user of a request without a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertName(pub String);

/// The listener, the service it serves, and its limits.
pub struct ClientPort {
    pub listener: TcpListener,
    pub limits: Limits,
    pub counters: Arc<PortCounters>,
    /// Serve TLS only (`None`: plaintext only).
    pub tls: Option<Arc<keel::tls::ServerTls>>,
}

impl ClientPort {
    /// Serves `router` until `stop` completes, then closes every connection gracefully and
    /// returns once they are all gone.
    pub async fn serve(self, router: axum::Router, stop: impl Future<Output = ()>) {
        let ClientPort { listener, limits, counters, tls } = self;
        let refusals = keel::tls::RateLimitedLog::default();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        let builder = Arc::new(builder);
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let (closing, closing_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => accepted,
                // Reap finished connections so the set does not grow with every one ever served.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors (EMFILE/ENFILE) and the like: the connection waiting
                    // in the backlog cannot be taken now; pause rather than spin on the error.
                    tracing::warn!("accepting a client connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, max = limits.max_connections, "client connection refused: at the connection cap");
                drop(tcp);
                continue;
            };
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            // Without TCP_NODELAY a small answer waits for the client's delayed ACK (~40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY on a client connection: {e}");
            }
            let conn = Connection {
                builder: builder.clone(),
                router: router.clone(),
                limits,
                counters: counters.clone(),
                closing: closing_rx.clone(),
            };
            let (tls, refusals) = (tls.clone(), refusals.clone());
            connections.spawn(async move {
                conn.counters.open.fetch_add(1, Ordering::Relaxed);
                let counters = conn.counters.clone();
                match tls {
                    None => conn.serve(tcp, None).await,
                    Some(tls) => match keel::tls::accept(&tls, tcp, limits.header_timeout).await {
                        Ok(a) => conn.serve(a.stream, a.client_cn.map(ClientCertName)).await,
                        Err(e) => {
                            if matches!(e, keel::tls::AcceptError::Timeout(_)) {
                                counters.timed_out.fetch_add(1, Ordering::Relaxed);
                            }
                            refusals.log(|| format!("client connection from {peer} refused: {e}"));
                        }
                    },
                }
                counters.open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        drop(listener);
        let _ = closing.send(true);
        while connections.join_next().await.is_some() {}
    }
}

/// One accepted connection.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: axum::Router,
    limits: Limits,
    counters: Arc<PortCounters>,
    closing: watch::Receiver<bool>,
}

impl Connection {
    async fn serve<IO>(mut self, io: IO, cert_name: Option<ClientCertName>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let service = Tracked {
            router: self.router.clone(),
            activity: activity.clone(),
            body_timeout: self.limits.header_timeout,
            cert_name,
        };
        // etcd clients send `:authority` values h2 would refuse: see `h2_authority`.
        let io = crate::h2_authority::LenientAuthority::new(io);
        let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = activity.idle(self.limits);
        tokio::pin!(idle);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    // hyper's own HTTP/1 header timeout ends the connection with an error.
                    let timeout = e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                    if timeout {
                        self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!("client connection: {e}");
                }
            }
            first = &mut idle => {
                self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                // Before any request there is nothing to answer: drop it. After, let what is
                // being written go out (HTTP/2: GOAWAY) but no longer than CLOSE_GRACE.
                if !first {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                }
            }
            // (`wait_for` answers a borrow of the value, which must not live across an await)
            () = async { let _ = self.closing.wait_for(|c| *c).await; } => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.as_mut().await;
            }
        }
    }
}

/// Requests in flight on one connection, and when the last one ended. Plain atomics, read by the
/// connection's idle timer when it fires: a request neither wakes the timer nor re-arms it (a
/// watch channel did both, twice per request, on the put path).
struct Activity {
    started: AtomicBool,
    in_flight: AtomicUsize,
    /// When the connection went idle last (its start, or its last request's end), in
    /// milliseconds since `opened`.
    idle_since_ms: AtomicU64,
    opened: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            started: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn elapsed_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Completes when the connection has had no request in flight for too long: before its first
    /// request `header_timeout`, after it `idle_timeout`. Answers whether it was the first wait.
    /// It sleeps until the earliest moment that could be so and checks then, so a busy
    /// connection costs it one wake-up per timeout, not one per request.
    async fn idle(&self, limits: Limits) -> bool {
        loop {
            let first = !self.started.load(Ordering::Relaxed);
            let wait = if first { limits.header_timeout } else { limits.idle_timeout };
            let wait_ms = wait.as_millis() as u64;
            // Never sleep past the shorter timeout: a first request may come meanwhile and make
            // the other one apply.
            let check_every = limits.header_timeout.min(limits.idle_timeout).as_millis() as u64;
            let next_check = if self.in_flight.load(Ordering::Acquire) > 0 {
                check_every
            } else {
                let idle_for = self.elapsed_ms().saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
                if idle_for >= wait_ms {
                    return first;
                }
                (wait_ms - idle_for).min(check_every)
            };
            tokio::time::sleep(Duration::from_millis(next_check.max(1))).await;
        }
    }
}

/// One request in flight: counted from the moment its header is read until its response body is
/// sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle clock starts now, before the count drops, so the timer never sees an idle
        // connection with an old start.
        self.0.idle_since_ms.store(self.0.elapsed_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router, counting the requests in flight on its connection and bounding how long a
/// request's body may take to arrive.
#[derive(Clone)]
struct Tracked {
    router: axum::Router,
    activity: Arc<Activity>,
    body_timeout: Duration,
    /// The connection's verified client certificate CN, given to every request.
    cert_name: Option<ClientCertName>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        use tower_service::Service;
        let in_flight = self.activity.begin();
        if let Some(name) = &self.cert_name {
            req.extensions_mut().insert(name.clone());
        }
        let mut router = self.router.clone();
        // A client stream's body is the stream: it lasts as long as the client watches.
        let timeout = if is_client_stream(req.uri().path()) { None } else { Some(self.body_timeout) };
        let req = req.map(|inner| match timeout {
            Some(t) => {
                axum::body::Body::new(DeadlineBody { inner, deadline: Box::pin(tokio::time::sleep(t)) })
            }
            None => axum::body::Body::new(inner),
        });
        Box::pin(async move {
            // axum's router is always ready (its `poll_ready` answers at once) and never fails.
            let response = router.call(req).await?;
            Ok(response.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    // The body owns the count: the request is in flight until it is sent.
                    let _in_flight = &in_flight;
                    frame
                }))
            }))
        })
    }
}

/// The gRPC methods whose request body is a long-lived stream of client messages, exempt from
/// the body deadline (they are bounded by `max_concurrent_streams` and the connection cap).
const CLIENT_STREAMS: &[&str] = &["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"];

/// The same methods on etcd's JSON gateway (`/v3/watch`, …), whose bodies are streams too.
fn is_client_stream(path: &str) -> bool {
    CLIENT_STREAMS.contains(&path) || crate::gateway::is_request_stream(path)
}

/// A request body that must arrive in full by a deadline: a client that trickles its body (a
/// request in flight, so the idle timeout never fires) cannot hold a request and its connection
/// open. Past the deadline the body fails; the handler answers an error and, for HTTP/1, hyper
/// closes the connection since the body was not read to its end.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// The body of a request did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within client_header_timeout_ms of its header")]
struct BodyTimeout;

impl hyper::body::Body for DeadlineBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
