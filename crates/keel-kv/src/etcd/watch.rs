//! etcd's `Watch` service: one session per gRPC stream, its watchers registered with this node's
//! [`WatchHub`](crate::watch::WatchHub).
//!
//! A session reads the client's requests (create, cancel, progress) and forwards what the hub
//! delivers for its watchers, in order, as `WatchResponse`s. Its answers to requests and the hub's
//! deliveries leave on one bounded channel, so a client that does not read holds at most that
//! channel and the hub's per-stream channel; its watchers then fall back to reading history.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::kv;
use super::mvccpb;
use super::rpc;
use super::EtcdService;
use crate::history::Event;
use crate::history::EventKind;
use crate::watch::Delivery;
use crate::watch::Filter;
use crate::watch::WatcherKey;
use crate::watch::STREAM_CHANNEL;

/// Responses queued for the client on one stream before the session waits for it.
const OUT_CHANNEL: usize = 64;
/// Watchers one stream may hold (each costs the hub a little on every write in its range).
pub const MAX_WATCHERS_PER_STREAM: usize = 100_000;
/// How soon a progress request that found a watcher behind is tried again.
const PROGRESS_RETRY: Duration = Duration::from_millis(100);

type Out = mpsc::Sender<Result<rpc::WatchResponse, Status>>;

/// A watcher of this session.
struct Active {
    key: WatcherKey,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
}

struct Session {
    svc: EtcdService,
    out: Out,
    hub_tx: mpsc::Sender<Delivery>,
    watchers: HashMap<i64, Active>,
    next_id: i64,
    /// A progress request waits for every watcher to be synced.
    progress_wanted: bool,
    /// Who opened the stream (its `token` metadata, its client certificate's CN): with auth on,
    /// each create is judged on them, as etcd does.
    token: Option<String>,
    cert_name: Option<String>,
}

#[tonic::async_trait]
impl rpc::watch_server::Watch for EtcdService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<rpc::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<Streaming<rpc::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.api.count(true, false);
        let md = request.metadata();
        let token = md.get("token").or_else(|| md.get("authorization")).and_then(|v| v.to_str().ok());
        let token = token.map(str::to_string);
        let cert_name = request.extensions().get::<crate::client_port::ClientCertName>().map(|c| c.0.clone());
        let inbound = request.into_inner();
        let (out, out_rx) = mpsc::channel(OUT_CHANNEL);
        let (hub_tx, hub_rx) = mpsc::channel(STREAM_CHANNEL);
        let session = Session {
            svc: self.clone(),
            out,
            hub_tx,
            watchers: HashMap::new(),
            next_id: 0,
            progress_wanted: false,
            token,
            cert_name,
        };
        tokio::spawn(session.run(inbound, hub_rx));
        let responses =
            futures_util::stream::unfold(out_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// The session could not send: the client is gone.
struct Gone;

impl Session {
    async fn run(mut self, mut inbound: Streaming<rpc::WatchRequest>, mut hub_rx: mpsc::Receiver<Delivery>) {
        let every = self.svc.api.watch_progress_notify_interval;
        let mut notify = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut retry = tokio::time::interval(PROGRESS_RETRY);
        let closed = self.svc.api.hub().closed();
        tokio::pin!(closed);
        // As etcd's: a client that closes its side of the stream keeps its watchers; the session
        // ends when the client goes (the answers are dropped) or on an error.
        let mut reading = true;
        loop {
            let step = tokio::select! {
                msg = inbound.message(), if reading => match msg {
                    Ok(Some(req)) => self.request(req).await,
                    Ok(None) => {
                        reading = false;
                        Ok(())
                    }
                    // A message that does not decode: the stream fails with its status, as
                    // etcd's does (and as the unary methods answer it).
                    Err(status) => {
                        let _ = self.out.send(Err(status)).await;
                        break;
                    }
                },
                Some(d) = hub_rx.recv() => self.deliver(d).await,
                _ = notify.tick() => {
                    self.notify_progress();
                    Ok(())
                }
                _ = retry.tick(), if self.progress_wanted => {
                    self.progress_all();
                    Ok(())
                }
                _ = self.out.closed() => break,
                () = &mut closed => {
                    // As etcd when a member stops: the stream ends with an error, and the client
                    // resumes on another member from the last revision it saw + 1.
                    let _ = self.out.send(Err(Status::unavailable("etcdserver: server stopped"))).await;
                    break;
                }
            };
            if step.is_err() {
                break;
            }
        }
        let hub = self.svc.api.hub();
        for (_, w) in self.watchers.drain() {
            hub.cancel(w.key);
        }
    }

    async fn send(&self, r: rpc::WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(r)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> rpc::WatchResponse {
        rpc::WatchResponse { header: self.svc.header(revision), watch_id, ..Default::default() }
    }

    async fn request(&mut self, req: rpc::WatchRequest) -> Result<(), Gone> {
        use rpc::watch_request::RequestUnion;
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                if let Some(w) = self.watchers.remove(&c.watch_id) {
                    self.svc.api.hub().cancel(w.key);
                    let revision = self.svc.api.hub().revision();
                    self.send(rpc::WatchResponse { canceled: true, ..self.response(c.watch_id, revision) })
                        .await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress_wanted = true;
                self.progress_all();
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn may_watch(&self, c: &rpc::WatchCreateRequest) -> bool {
        let api = &self.svc.api;
        let need = crate::auth::Need::Keys(vec![crate::auth::Access::new(
            &c.key,
            &c.range_end,
            crate::auth::PermType::Read,
        )]);
        api.request_user(self.token.as_deref(), self.cert_name.as_deref())
            .and_then(|user| api.authorize(user.as_ref(), &need))
            .is_ok()
    }

    async fn create(&mut self, c: rpc::WatchCreateRequest) -> Result<(), Gone> {
        let hub = self.svc.api.hub().clone();
        let svc = self.svc.clone();
        let refuse = |why: &str| rpc::WatchResponse {
            header: svc.header(hub.revision()),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: why.to_string(),
            ..Default::default()
        };
        if self.watchers.len() >= MAX_WATCHERS_PER_STREAM {
            let why =
                format!("keel: at most {MAX_WATCHERS_PER_STREAM} watchers per stream; open another stream");
            return self.send(refuse(&why)).await;
        }
        if c.key.len() > self.svc.api.max_key_bytes || c.range_end.len() > self.svc.api.max_key_bytes {
            return self.send(refuse("etcdserver: key is too large")).await;
        }
        // etcd: with auth on, the stream's user must be allowed to read the range; refused (an
        // unknown user, a bad token too) with etcd's answer, which keeps the client's watch id.
        if !self.may_watch(&c) {
            return self
                .send(rpc::WatchResponse {
                    header: svc.header(hub.revision()),
                    watch_id: c.watch_id,
                    created: true,
                    canceled: true,
                    cancel_reason: "etcdserver: permission denied".into(),
                    ..Default::default()
                })
                .await;
        }
        // etcd: a range whose end is not after its key selects nothing.
        if !matches!(c.range_end.as_slice(), [] | [0]) && c.key >= c.range_end {
            return self.send(refuse("mvcc: watcher range is empty")).await;
        }
        let watch_id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self.send(refuse("mvcc: duplicate watch ID provided on the WatchStream")).await;
            }
            c.watch_id
        } else {
            // As etcd: ids the stream handed out are not handed out again, even once canceled
            // (a delivery still queued for a canceled watch must not pass for a new one's).
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        if watch_id < 0 {
            return self.send(refuse("etcdserver: watch ID must not be negative")).await;
        }
        use rpc::watch_create_request::FilterType;
        let filter = Filter {
            key: c.key,
            range_end: c.range_end,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
        };
        let registered = hub.watch(filter, c.start_revision, watch_id, self.hub_tx.clone());
        self.watchers.insert(
            watch_id,
            Active {
                key: registered.key,
                prev_kv: c.prev_kv,
                fragment: c.fragment,
                progress_notify: c.progress_notify,
            },
        );
        // The created answer's revision: a watch from "now" sees every change after it.
        let revision = if c.start_revision <= 0 { registered.start_revision - 1 } else { hub.revision() };
        // Sent before any delivery: deliveries wait in the hub channel until this returns.
        self.send(rpc::WatchResponse { created: true, ..self.response(watch_id, revision) }).await
    }

    async fn deliver(&mut self, d: Delivery) -> Result<(), Gone> {
        match d {
            Delivery::Events { watcher, watch_id, revision, events } => {
                // Canceled since (its id may be taken again by a client-chosen id).
                let Some(w) = self.watchers.get(&watch_id).filter(|w| w.key == watcher) else {
                    return Ok(());
                };
                let events: Vec<mvccpb::Event> = events.iter().map(|e| event(e, w.prev_kv)).collect();
                let fragment = w.fragment;
                let limit = self.svc.api.max_request_bytes;
                let whole = rpc::WatchResponse { events, ..self.response(watch_id, revision) };
                if !fragment || whole.encoded_len() <= limit {
                    return self.send(whole).await;
                }
                // etcd's fragments: pieces of at most `limit` bytes of events (one event at
                // least), every piece but the last marked `fragment`.
                let mut pieces: Vec<Vec<mvccpb::Event>> = vec![Vec::new()];
                let mut size = 0;
                for e in whole.events {
                    let n = e.encoded_len();
                    let last = pieces.last_mut().expect("one piece at least");
                    if !last.is_empty() && size + n > limit {
                        pieces.push(Vec::new());
                        size = 0;
                    }
                    size += n;
                    pieces.last_mut().expect("one piece at least").push(e);
                }
                let count = pieces.len();
                for (i, events) in pieces.into_iter().enumerate() {
                    let r = rpc::WatchResponse {
                        events,
                        fragment: i + 1 < count,
                        ..self.response(watch_id, revision)
                    };
                    self.send(r).await?;
                }
                Ok(())
            }
            Delivery::Compacted { watcher, watch_id, compact_revision } => {
                if self.watchers.get(&watch_id).is_none_or(|w| w.key != watcher) {
                    return Ok(());
                }
                self.watchers.remove(&watch_id);
                // etcd's answer carries no header revision.
                self.send(rpc::WatchResponse {
                    canceled: true,
                    compact_revision,
                    ..self.response(watch_id, 0)
                })
                .await
            }
            Delivery::Progress { watch_id, revision } => {
                if watch_id >= 0 && !self.watchers.contains_key(&watch_id) {
                    return Ok(());
                }
                self.send(self.response(watch_id, revision)).await
            }
        }
    }

    /// Answers a progress request (watch id -1) once every watcher of the stream is synced.
    fn progress_all(&mut self) {
        let keys: Vec<WatcherKey> = self.watchers.values().map(|w| w.key).collect();
        if self.svc.api.hub().progress(&keys, -1, &self.hub_tx) {
            self.progress_wanted = false;
        }
    }

    /// The periodic progress notification, to each synced watcher that asked for them.
    fn notify_progress(&self) {
        let hub = self.svc.api.hub();
        for (&id, w) in self.watchers.iter().filter(|(_, w)| w.progress_notify) {
            hub.progress(&[w.key], id, &self.hub_tx);
        }
    }
}

fn event(e: &Event, with_prev: bool) -> mvccpb::Event {
    let kind = match e.kind {
        EventKind::Put => mvccpb::event::EventType::Put,
        EventKind::Delete => mvccpb::event::EventType::Delete,
    };
    mvccpb::Event {
        r#type: kind as i32,
        kv: Some(kv(e.kv.clone())),
        prev_kv: if with_prev { e.prev_kv.clone().map(kv) } else { None },
    }
}
