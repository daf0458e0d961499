//! Holding something for as long as a lease lives: the keep-alive schedule and what it proves
//! ([`Keeper`], pure), the background task that keeps a lease alive and says when it may have
//! run out ([`Session`]), waiting in line under a lease ([`queue`]) for `keel lock` and `keel
//! elect`, and the signals that end such a command ([`Signals`]).
//!
//! What the client can know: the leader sets a lease's expiry to the TTL after it *received* a
//! keep-alive and acknowledges only after that (`docs/etcd-api.md`, Leases), so the lease lives at
//! least until the TTL after the client *sent* the last acknowledged keep-alive (or the grant).
//! Past that moment without a newer acknowledgement, the client cannot tell whether the lease is
//! alive, and a holder must act as if it were gone.

use std::fmt;
use std::io;
use std::time::Duration;

use serde_json::json;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Answer, ApiRequest, Client, ClientError, LeaseAnswer};
use crate::lease::LeaseId;

/// After a keep-alive that failed (no endpoint answered it), the next is sent after this.
const RETRY: Duration = Duration::from_millis(500);
/// Keep-alives are never sent more often than this, whatever the TTL.
const MIN_PERIOD: Duration = Duration::from_millis(200);
/// A keep-alive that has had no answer for this long moves on to the next endpoint, if the TTL
/// leaves less time than `--timeout` (a third of the TTL, at least).
const MIN_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Times `queue` takes a new lease and gets in line again after the wait broke off.
pub const MAX_QUEUE_ATTEMPTS: u32 = 10;
/// Pause before getting in line again.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);

/// A TTL in whole seconds, as the API counts it, as a duration (at least one second).
pub fn ttl_duration(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(0).max(1))
}

/// The keep-alive schedule of one lease, and until when the lease is certainly alive.
///
/// Keep-alives go every third of the TTL, as etcd's client sends them: two can fail before the
/// lease is at risk. Pure: every method takes the time it is called at, so tests need no clock.
#[derive(Clone, Debug)]
pub struct Keeper {
    ttl: Duration,
    /// Invariant: the TTL after the sending of the newest keep-alive (or grant) the leader
    /// acknowledged. The lease does not expire before it.
    certain_until: Instant,
    /// When the next keep-alive is due.
    next: Instant,
}

impl Keeper {
    /// A lease whose grant, sent at `sent`, was acknowledged with `ttl`.
    pub fn granted(sent: Instant, ttl: Duration) -> Keeper {
        Keeper { ttl, certain_until: sent + ttl, next: sent + period(ttl) }
    }

    /// A keep-alive sent at `sent` was acknowledged with `ttl`.
    pub fn renewed(&mut self, sent: Instant, ttl: Duration) {
        self.ttl = ttl;
        self.certain_until = self.certain_until.max(sent + ttl);
        self.next = sent + period(ttl);
    }

    /// A keep-alive got no answer (as of `now`): try again soon.
    pub fn failed(&mut self, now: Instant) {
        self.next = now + RETRY.min(period(self.ttl));
    }

    /// When the next keep-alive is due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Until when the lease is certainly alive.
    pub fn certain_until(&self) -> Instant {
        self.certain_until
    }

    /// Whether, at `now`, the lease may have expired.
    pub fn uncertain(&self, now: Instant) -> bool {
        now >= self.certain_until
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long one keep-alive may wait for an answer from one endpoint.
    pub fn request_timeout(&self, timeout: Duration) -> Duration {
        timeout.min(period(self.ttl).max(MIN_KEEP_ALIVE_TIMEOUT))
    }
}

/// Between two keep-alives: a third of the TTL.
fn period(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_PERIOD)
}

/// Why a held lease can no longer be counted on.
#[derive(Clone, Debug)]
pub enum Lost {
    /// The cluster answered that the lease does not exist: it expired or was revoked.
    Gone,
    /// No keep-alive was acknowledged for a whole TTL: the lease may have expired.
    Unconfirmed { ttl: Duration, last_error: Option<String> },
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lost::Gone => f.write_str("it expired or was revoked"),
            Lost::Unconfirmed { ttl, last_error } => {
                write!(f, "no keep-alive was acknowledged for its whole TTL ({}s)", ttl.as_secs())?;
                if let Some(e) = last_error {
                    write!(f, "; last failure: {e}")?;
                }
                Ok(())
            }
        }
    }
}

/// The body of a request that names a lease.
pub fn lease_body(id: LeaseId) -> serde_json::Value {
    json!({"id": id.0})
}

/// A lease kept alive in the background from its grant until this is dropped or ended.
pub struct Session {
    pub lease: LeaseId,
    pub ttl: Duration,
    lost: watch::Receiver<Option<Lost>>,
    task: JoinHandle<()>,
}

impl Session {
    /// Grants a lease of `ttl` seconds (the cluster may raise it to its minimum) and starts
    /// keeping it alive. A grant whose outcome is unknown is not retried: it fails the command,
    /// and the lease it may have made expires on its own.
    pub async fn grant(client: &Client, ttl: i64) -> Result<Session, ClientError> {
        let sent = Instant::now();
        let answer =
            client.call(&ApiRequest::post_json("/v1/lease/grant".into(), &json!({"ttl": ttl}))).await?;
        let granted: LeaseAnswer = answer.decode()?;
        let lease = LeaseId(granted.id);
        let ttl = ttl_duration(granted.ttl);
        let (report, lost) = watch::channel(None);
        let keeper = Keeper::granted(sent, ttl);
        let task = tokio::spawn(keep_alive(client.clone(), lease, keeper, report));
        Ok(Session { lease, ttl, lost, task })
    }

    /// Resolves once the lease can no longer be counted on (never, while it can).
    pub async fn lost(&mut self) -> Lost {
        match self.lost.wait_for(Option::is_some).await {
            Ok(lost) => lost.clone().unwrap_or(Lost::Gone),
            // The task ended without a verdict: it only does so when aborted, by `end` or `drop`.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops keeping the lease alive and revokes it, which deletes every key attached to it.
    /// A lease already gone counts as revoked.
    pub async fn end(self, client: &Client) -> Result<(), ClientError> {
        self.task.abort();
        let revoke = ApiRequest::post_json("/v1/lease/revoke".into(), &lease_body(self.lease)).repeatable();
        match client.call(&revoke).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("lease_not_found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the [`Keeper`]'s schedule until the lease is lost, and says why on `report`.
async fn keep_alive(client: Client, lease: LeaseId, mut keeper: Keeper, report: watch::Sender<Option<Lost>>) {
    let request = ApiRequest::post_json("/v1/lease/keepalive".into(), &lease_body(lease)).repeatable();
    let mut last_error = None;
    let lost = loop {
        if keeper.uncertain(Instant::now()) {
            break Lost::Unconfirmed { ttl: keeper.ttl(), last_error };
        }
        tokio::time::sleep_until(keeper.next().min(keeper.certain_until())).await;
        if keeper.uncertain(Instant::now()) {
            continue;
        }
        let sent = Instant::now();
        let client = client.with_timeout(keeper.request_timeout(client.timeout()));
        match tokio::time::timeout_at(keeper.certain_until(), client.call(&request)).await {
            Err(_) => continue,
            Ok(Ok(answer)) => match answer.decode::<LeaseAnswer>() {
                Ok(a) => keeper.renewed(sent, ttl_duration(a.ttl)),
                Err(e) => {
                    last_error = Some(e.to_string());
                    keeper.failed(Instant::now());
                }
            },
            Ok(Err(e)) if e.code() == Some("lease_not_found") => break Lost::Gone,
            Ok(Err(e)) => {
                last_error = Some(e.to_string());
                keeper.failed(Instant::now());
            }
        }
    };
    let _ = report.send(Some(lost));
}

/// Whether a wait in line that broke off with `e` may be tried again under a new lease: the
/// cluster or the connection failed, or the lease ran out while waiting.
fn requeue_after(e: &ClientError) -> bool {
    match e {
        ClientError::NoEndpoint(_)
        | ClientError::OutcomeUnknown { .. }
        | ClientError::StreamBroken { .. } => true,
        ClientError::Server { code, .. } => code == "lease_not_found",
        _ => false,
    }
}

/// How a wait in line ended without the thing waited for.
#[derive(Debug)]
pub enum QueueError {
    /// The cluster failed the request (or the grant); nothing is held.
    Client(ClientError),
    /// SIGINT or SIGTERM came while waiting; the lease was revoked (or will expire).
    Interrupted,
    /// Waited `MAX_QUEUE_ATTEMPTS` times, each broken off; the last reason.
    GaveUp { attempts: u32, last: String },
}

/// Gets in line (`make(lease)` is the request that answers once at the front, a lock acquire or
/// a campaign) under a new lease kept alive meanwhile, and answers the lease with the answer.
///
/// A wait that breaks off (the connection lost, the lease lost) is never resumed under the same
/// lease: the request that broke off may still withdraw its place on the server (delete its key)
/// at any time, even after a new request found that key in place. So the lease is revoked, which
/// deletes the key whatever became of the request, and the wait starts again under a new lease,
/// at the back of the line; up to [`MAX_QUEUE_ATTEMPTS`] times.
pub async fn queue(
    client: &Client,
    signals: &mut Signals,
    ttl: i64,
    what: &str,
    make: impl Fn(LeaseId) -> ApiRequest,
) -> Result<(Session, Answer), QueueError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut session = Session::grant(client, ttl).await.map_err(QueueError::Client)?;
        let request = make(session.lease);
        enum Ended {
            Answered(Result<Answer, ClientError>),
            Lost(Lost),
            Signal,
        }
        let ended = tokio::select! {
            answer = client.call_waiting(&request) => Ended::Answered(answer),
            lost = session.lost() => Ended::Lost(lost),
            _ = signals.recv() => Ended::Signal,
        };
        let why = match ended {
            Ended::Answered(Ok(answer)) => return Ok((session, answer)),
            Ended::Answered(Err(e)) if requeue_after(&e) => e.to_string(),
            Ended::Answered(Err(e)) => {
                let _ = session.end(client).await;
                return Err(QueueError::Client(e));
            }
            Ended::Lost(lost) => format!("lease {} lost: {lost}", session.lease),
            Ended::Signal => {
                // Revoking deletes the place in line at once; if that fails, the lease expires.
                let _ = session.end(client).await;
                return Err(QueueError::Interrupted);
            }
        };
        let _ = session.end(client).await;
        if attempts >= MAX_QUEUE_ATTEMPTS {
            return Err(QueueError::GaveUp { attempts, last: why });
        }
        eprintln!("keel {what}: the wait broke off ({why}); waiting again under a new lease");
        tokio::select! {
            () = tokio::time::sleep(REQUEUE_PAUSE) => {}
            _ = signals.recv() => return Err(QueueError::Interrupted),
        }
    }
}

/// Which signal asked a command to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT: Ctrl+C at a terminal, which also reaches the command `keel lock` runs (the
    /// terminal signals the whole foreground process group).
    Interrupt,
    /// SIGTERM: sent to `keel` alone (a supervisor, `kill`).
    Terminate,
}

/// SIGINT and SIGTERM, caught from when this is made: they no longer end the process at once,
/// so that what is held is given back first.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn catch() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal.
    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(9);

    #[test]
    fn keep_alives_go_every_third_of_the_ttl() {
        let t0 = Instant::now();
        let mut k = Keeper::granted(t0, TTL);
        assert_eq!(k.next(), t0 + Duration::from_secs(3));
        assert_eq!(k.certain_until(), t0 + TTL);
        let sent = t0 + Duration::from_secs(3);
        k.renewed(sent, TTL);
        assert_eq!(k.next(), sent + Duration::from_secs(3));
        assert_eq!(k.certain_until(), sent + TTL);
        // A TTL the cluster raised (or lowered) sets the period from then on.
        k.renewed(sent + Duration::from_secs(3), Duration::from_secs(30));
        assert_eq!(k.next(), sent + Duration::from_secs(13));
    }

    #[test]
    fn the_lease_is_certain_until_the_ttl_after_the_last_acknowledged_send() {
        let t0 = Instant::now();
        let mut k = Keeper::granted(t0, TTL);
        // Failures move the next try closer but prove nothing.
        for s in [3, 4, 5, 6, 7, 8] {
            k.failed(t0 + Duration::from_secs(s));
            assert_eq!(k.next(), t0 + Duration::from_secs(s) + RETRY);
            assert_eq!(k.certain_until(), t0 + TTL);
        }
        assert!(!k.uncertain(t0 + TTL - Duration::from_millis(1)));
        assert!(k.uncertain(t0 + TTL));
        // An acknowledgement of an older send (answered late) never moves the bound back.
        k.renewed(t0 + Duration::from_secs(8), TTL);
        k.renewed(t0 + Duration::from_secs(1), TTL);
        assert_eq!(k.certain_until(), t0 + Duration::from_secs(8) + TTL);
    }

    #[test]
    fn short_ttls_keep_a_floor_on_period_and_timeout() {
        let t0 = Instant::now();
        let k = Keeper::granted(t0, Duration::from_secs(2));
        assert_eq!(k.next(), t0 + Duration::from_secs(2) / 3);
        assert_eq!(k.request_timeout(Duration::from_secs(5)), MIN_KEEP_ALIVE_TIMEOUT);
        assert_eq!(k.request_timeout(Duration::from_millis(300)), Duration::from_millis(300));
        let long = Keeper::granted(t0, Duration::from_secs(60));
        assert_eq!(long.request_timeout(Duration::from_secs(5)), Duration::from_secs(5));
        let mut tiny = Keeper::granted(t0, Duration::from_millis(300));
        assert_eq!(tiny.next(), t0 + MIN_PERIOD);
        tiny.failed(t0);
        assert_eq!(tiny.next(), t0 + MIN_PERIOD);
    }

    #[test]
    fn ttls_in_seconds_are_at_least_one() {
        assert_eq!(ttl_duration(10), Duration::from_secs(10));
        assert_eq!(ttl_duration(0), Duration::from_secs(1));
        assert_eq!(ttl_duration(-1), Duration::from_secs(1));
    }

    #[test]
    fn only_broken_waits_are_requeued() {
        let server = |code: &str| ClientError::Server { code: code.into(), message: String::new() };
        assert!(requeue_after(&ClientError::NoEndpoint(Vec::new())));
        assert!(requeue_after(&server("lease_not_found")));
        assert!(!requeue_after(&server("bad_request")));
        assert!(!requeue_after(&server("key_too_large")));
    }
}
