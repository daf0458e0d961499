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
}

#[tonic::async_trait]
impl rpc::watch_server::Watch for EtcdService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<rpc::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<Streaming<rpc::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.api.count(true, false);
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
        loop {
            let step = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.request(req).await,
                    Ok(None) | Err(_) => break,
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
        let watch_id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self.send(refuse("mvcc: duplicate watch ID provided on the WatchStream")).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
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
            Delivery::Events { watch_id, revision, events } => {
                let Some(w) = self.watchers.get(&watch_id) else {
                    return Ok(()); // canceled since
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
            Delivery::Compacted { watch_id, compact_revision } => {
                if self.watchers.remove(&watch_id).is_none() {
                    return Ok(());
                }
                let revision = self.svc.api.hub().revision();
                self.send(rpc::WatchResponse {
                    canceled: true,
                    compact_revision,
                    ..self.response(watch_id, revision)
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
