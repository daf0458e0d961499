//! `keel bench`: a load generator over the etcd v3 gRPC API, so one tool measures Keel and etcd.
//!
//! This file owns the command line and the plan it validates into, the workload (which key, which
//! operation) and the errors; `bench/load.rs` sends the requests, `bench/watch.rs` runs the watch
//! fan-out, `bench/lease.rs` the lease loads (grant+revoke, keep-alive streams), `bench/lock.rs`
//! the lock contention, `bench/restart.rs` what `bench/lease-restart.sh` needs (the lease loader,
//! the readiness probe); `bench/wire.rs` speaks the RPCs without a generated client (Watch,
//! `v3lockpb.Lock`), `bench/report.rs` turns the latencies into the table and the JSON line.
//! Everything here is pure: tests assert on values.

mod lease;
mod load;
/// One gRPC connection to an endpoint (also `keel snapshot save`'s).
pub(crate) use load::connect;
mod lock;
mod report;
mod restart;
mod watch;
mod wire;

use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use clap::{Args, ValueEnum};
use rand::Rng;

use crate::client::Endpoint;

/// Most clients (in-flight requests) one run may have.
pub const MAX_CLIENTS: u64 = 10_000;
/// Largest key space: keys are `key-%08d`, so past 10^8 they simply grow a digit.
pub const MAX_KEY_SPACE: u64 = 1_000_000_000;
/// Largest value: 1 MiB, under etcd's (and Keel's) default 1.5 MiB request limit.
pub const MAX_VALUE_SIZE: usize = 1024 * 1024;
/// Measured time when neither `--duration` nor `--ops` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The hard cap on measured time, also for a run bounded by `--ops` alone.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// The hard cap on measured requests, also for a run bounded by `--duration` alone.
pub const MAX_OPS: u64 = 1_000_000_000;
/// Longest warm-up.
pub const MAX_WARMUP: Duration = Duration::from_secs(600);
/// In-flight puts while preloading (or `--clients`, if more).
pub const PRELOAD_CLIENTS: usize = 256;
/// Most watchers one `--op watch` run may open.
pub const MAX_WATCHERS: u64 = 100_000;
/// Highest `--rate` (puts per second) of a watch run.
pub const MAX_RATE: u64 = 100_000;
/// `--op watch` without `--watchers`.
pub const DEFAULT_WATCHERS: u64 = 1;
/// `--op watch` without `--rate`: puts per second, the default of etcd's `benchmark watch-latency`.
pub const DEFAULT_RATE: u64 = 100;
/// Most leases `--op keepalive` or `--op lease-load` may grant.
pub const MAX_LEASES: u64 = 1_000_000;
/// `--leases` when not given: the "keep-alives over 10,000 live leases".
pub const DEFAULT_LEASES: u64 = 10_000;
/// `--ttl` when not given, in seconds: long enough that no lease of a run expires while it runs.
pub const DEFAULT_TTL: i64 = 60;
/// The longest TTL etcd grants (`lease.MaxLeaseTTL`, 9,000,000,000 s).
pub const MAX_TTL: i64 = 9_000_000_000;
/// `--op keepalive` without `--window`: keep-alive requests in flight on each stream.
pub const DEFAULT_WINDOW: u64 = 64;
/// Largest `--window`.
pub const MAX_WINDOW: u64 = 10_000;
/// A lock contender's lease outlives the run (warm-up and measurement) by at least this, so that
/// no lease expires under a contender without keep-alives.
pub const LOCK_LEASE_SLACK: Duration = Duration::from_secs(60);

/// `keel bench` flags (the global `--endpoints`, `--timeout` and `--json` apply too).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Requests in flight: each client sends one request, awaits the answer, sends the next.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub clients: u64,
    /// gRPC connections (HTTP/2), spread over the endpoints; clients are spread over them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub conns: u64,
    /// What each request is.
    #[arg(long, value_enum, default_value_t = OpArg::Put)]
    pub op: OpArg,
    /// With `--op mixed`: the fraction of requests that are gets (0 to 1) [default: 0.5].
    #[arg(long, value_name = "FRACTION")]
    pub read_ratio: Option<f64>,
    /// How gets read: through the leader, or from the contacted member's state (maybe stale).
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    pub consistency: Consistency,
    /// Keys are `key-00000000` .. `key-<N-1>`, each request picking one uniformly at random.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub key_space: u64,
    /// Bytes in each put's value (random bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub value_size: usize,
    /// Measured seconds [default: 10, or up to 3600 with --ops].
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", value_parser = parse_positive_secs)]
    pub duration: Option<Duration>,
    /// Measured requests (successful or not); the run ends at --duration or --ops, whichever first.
    #[arg(long, value_name = "N")]
    pub ops: Option<u64>,
    /// Seconds of unmeasured load before the measurement.
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    pub warmup: Duration,
    /// Send only to the leader, found by asking every endpoint for its Maintenance.Status.
    #[arg(long)]
    pub target_leader: bool,
    /// First put N keys (256 in flight): keys 0..N, cycling through the key space when N exceeds
    /// it, so that gets find them, or so that the store holds N revisions of history.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preload: u64,
    /// With `--op watch`: watchers, all on one prefix that the run's puts write under [default: 1].
    #[arg(long, value_name = "N")]
    pub watchers: Option<u64>,
    /// With `--op watch`: Watch streams (gRPC bidi streams), spread over the `--conns`
    /// connections; the watchers are spread over the streams [default: --conns].
    #[arg(long, value_name = "N")]
    pub streams: Option<u64>,
    /// With `--op watch`: puts per second, each sent on schedule, at most --clients at once
    /// [default: 100].
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<u64>,
    /// With `--op keepalive`: leases kept alive, granted before the run and spread over the
    /// clients' streams; with `--op lease-load`: leases granted, each with one key [default: 10000].
    #[arg(long, value_name = "N")]
    pub leases: Option<u64>,
    /// With `--op lease`, `keepalive`, `lock` and `lease-load`: the TTL leases are granted with, in
    /// seconds (a lock contender's is stretched to outlive the run) [default: 60].
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<i64>,
    /// With `--op keepalive`: keep-alive requests in flight on each stream [default: 64].
    #[arg(long, value_name = "N")]
    pub window: Option<u64>,
    /// With `--op lease-ready`: the lease that LeaseTimeToLive must find, as `--op lease-load`
    /// reported it (`sample_lease`).
    #[arg(long, value_name = "ID")]
    pub lease_id: Option<i64>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpArg {
    Put,
    Get,
    Mixed,
    /// Watchers on one prefix, puts under it at a fixed rate; measures event delivery.
    Watch,
    /// LeaseGrant, then LeaseRevoke of that lease: one op is the pair.
    Lease,
    /// Keep-alives of `--leases` leases, pipelined on one LeaseKeepAlive stream per client: one op
    /// is an answer with a TTL.
    Keepalive,
    /// `v3lockpb.Lock` of one lock name that every client contends for, then `Unlock`: one op is
    /// the pair.
    Lock,
    /// Not a measurement: grants `--leases` leases, each with one key put under it (for
    /// `bench/lease-restart.sh`).
    LeaseLoad,
    /// Not a measurement: waits until the first endpoint answers a linearizable Range of
    /// `key-00000000` and a LeaseTimeToLive of `--lease-id` (for `bench/lease-restart.sh`).
    LeaseReady,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Serializable,
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Linearizable => "linearizable",
            Consistency::Serializable => "serializable",
        }
    }
}

/// The mix of operations one run sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workload {
    Put,
    Get,
    /// Each request is a get with probability `read_ratio`, else a put.
    Mixed {
        read_ratio: f64,
    },
    /// Watchers on one prefix; the requests are puts under it, at a fixed rate.
    Watch(WatchSpec),
    /// LeaseGrant then LeaseRevoke, in a loop.
    Lease,
    /// Keep-alives of leases granted before the run.
    KeepAlive(KeepAliveSpec),
    /// Lock then Unlock, every client on one lock.
    Lock,
    /// Grants `leases` leases, lease `i` with key `i` put under it.
    LeaseLoad {
        leases: u64,
    },
    /// Waits until the store answers, with key 0 attached to `lease_id`.
    LeaseReady {
        lease_id: i64,
    },
}

/// `--op keepalive`: how many leases, and how many keep-alives a stream has in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAliveSpec {
    /// Leases granted before the run; lease `i` is kept alive by client `i mod clients`.
    pub leases: usize,
    /// Unanswered keep-alive requests on one stream, at most.
    pub window: usize,
}

/// `--op watch`: who watches, and how fast the puts they watch come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    pub watchers: usize,
    /// Watch streams; stream `s` is on connection `s mod conns`, watcher `w` on stream `w mod
    /// streams`.
    pub streams: usize,
    /// Puts per second.
    pub rate: u64,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mixed { .. } => "mixed",
            Workload::Watch(_) => "watch",
            Workload::Lease => "lease",
            Workload::KeepAlive(_) => "keepalive",
            Workload::Lock => "lock",
            Workload::LeaseLoad { .. } => "lease-load",
            Workload::LeaseReady { .. } => "lease-ready",
        }
    }

    /// The next request's operation, for the loads of puts and gets (the others send their own
    /// requests; a put stands for them here).
    pub fn next_op(self, rng: &mut impl Rng) -> Op {
        match self {
            Workload::Put
            | Workload::Watch(_)
            | Workload::Lease
            | Workload::KeepAlive(_)
            | Workload::Lock
            | Workload::LeaseLoad { .. }
            | Workload::LeaseReady { .. } => Op::Put,
            Workload::Get => Op::Get,
            Workload::Mixed { read_ratio } => {
                if rng.gen_bool(read_ratio) {
                    Op::Get
                } else {
                    Op::Put
                }
            }
        }
    }
}

/// One request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
}

/// A validated run: every bound is known, every count fits.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub workload: Workload,
    pub consistency: Consistency,
    pub clients: usize,
    pub conns: usize,
    pub key_space: u64,
    pub value_size: usize,
    /// Measured time; the run also stops after `ops` measured requests.
    pub duration: Duration,
    pub ops: u64,
    pub warmup: Duration,
    pub preload: u64,
    pub target_leader: bool,
    /// The TTL leases are granted with, in seconds (the lease ops and `Lock`).
    pub ttl: i64,
}

impl BenchArgs {
    /// Checks the flags against each other and the caps; the message names the flag.
    pub fn plan(&self) -> Result<Plan, String> {
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return Err(format!("--clients must be 1 to {MAX_CLIENTS}, not {}", self.clients));
        }
        if self.op != OpArg::Watch && (self.conns == 0 || self.conns > self.clients) {
            return Err(format!(
                "--conns must be 1 to --clients ({}), not {}: a connection without a client sends nothing",
                self.clients, self.conns
            ));
        }
        self.refuse_flags_of_other_ops()?;
        let workload = match (self.op, self.read_ratio) {
            (OpArg::Put, None) => Workload::Put,
            (OpArg::Get, None) => Workload::Get,
            (OpArg::Mixed, ratio) => {
                let read_ratio = ratio.unwrap_or(0.5);
                if !(0.0..=1.0).contains(&read_ratio) {
                    return Err(format!("--read-ratio must be between 0 and 1, not {read_ratio}"));
                }
                Workload::Mixed { read_ratio }
            }
            (OpArg::Watch, None) => Workload::Watch(self.watch_spec()?),
            (OpArg::Lease, None) => Workload::Lease,
            (OpArg::Keepalive, None) => Workload::KeepAlive(self.keepalive_spec()?),
            (OpArg::Lock, None) => Workload::Lock,
            (OpArg::LeaseLoad, None) => Workload::LeaseLoad { leases: self.lease_count()? },
            (OpArg::LeaseReady, None) => match self.lease_id {
                Some(id) if id > 0 => Workload::LeaseReady { lease_id: id },
                Some(id) => return Err(format!("--lease-id must be a lease id (above 0), not {id}")),
                None => return Err("--op lease-ready needs --lease-id".to_owned()),
            },
            (_, Some(_)) => return Err("--read-ratio applies to --op mixed only".to_owned()),
        };
        let ttl = self.ttl.unwrap_or(DEFAULT_TTL);
        if !(1..=MAX_TTL).contains(&ttl) {
            return Err(format!("--ttl must be 1 to {MAX_TTL} seconds, not {ttl}"));
        }
        if self.key_space == 0 || self.key_space > MAX_KEY_SPACE {
            return Err(format!("--key-space must be 1 to {MAX_KEY_SPACE}, not {}", self.key_space));
        }
        if self.value_size > MAX_VALUE_SIZE {
            return Err(format!(
                "--value-size must be at most {MAX_VALUE_SIZE} bytes, not {}",
                self.value_size
            ));
        }
        if self.preload > MAX_OPS {
            return Err(format!("--preload must be at most {MAX_OPS}, not {}", self.preload));
        }
        let ops = match self.ops {
            Some(0) => return Err("--ops must be at least 1".to_owned()),
            Some(n) if n > MAX_OPS => return Err(format!("--ops must be at most {MAX_OPS}, not {n}")),
            Some(n) => n,
            None => MAX_OPS,
        };
        let duration = match (self.duration, self.ops) {
            (Some(d), _) if d > MAX_DURATION => {
                return Err(format!("--duration must be at most {}s", MAX_DURATION.as_secs()))
            }
            (Some(d), _) => d,
            (None, Some(_)) => MAX_DURATION,
            (None, None) => DEFAULT_DURATION,
        };
        if self.warmup > MAX_WARMUP {
            return Err(format!("--warmup must be at most {}s", MAX_WARMUP.as_secs()));
        }
        Ok(Plan {
            workload,
            consistency: self.consistency,
            // Both are at most MAX_CLIENTS, which fits any usize.
            clients: usize::try_from(self.clients).unwrap_or(usize::MAX),
            conns: usize::try_from(self.conns).unwrap_or(usize::MAX),
            key_space: self.key_space,
            value_size: self.value_size,
            duration,
            ops,
            warmup: self.warmup,
            preload: self.preload,
            target_leader: self.target_leader,
            ttl,
        })
    }

    /// Refuses a flag that the chosen `--op` does not use, naming the ops that do.
    fn refuse_flags_of_other_ops(&self) -> Result<(), String> {
        use OpArg::{Keepalive, Lease, LeaseLoad, LeaseReady, Lock, Watch};
        let flags: [(&str, bool, &[OpArg], &str); 7] = [
            ("--watchers", self.watchers.is_some(), &[Watch], "--op watch"),
            ("--streams", self.streams.is_some(), &[Watch], "--op watch"),
            ("--rate", self.rate.is_some(), &[Watch], "--op watch"),
            ("--leases", self.leases.is_some(), &[Keepalive, LeaseLoad], "--op keepalive and lease-load"),
            ("--window", self.window.is_some(), &[Keepalive], "--op keepalive"),
            (
                "--ttl",
                self.ttl.is_some(),
                &[Lease, Keepalive, Lock, LeaseLoad],
                "--op lease, keepalive, lock and lease-load",
            ),
            ("--lease-id", self.lease_id.is_some(), &[LeaseReady], "--op lease-ready"),
        ];
        match flags.iter().find(|(_, given, ops, _)| *given && !ops.contains(&self.op)) {
            Some((flag, _, _, ops)) => Err(format!("{flag} applies to {ops} only")),
            None => Ok(()),
        }
    }

    /// `--leases`, checked.
    fn lease_count(&self) -> Result<u64, String> {
        match self.leases.unwrap_or(DEFAULT_LEASES) {
            n @ 1..=MAX_LEASES => Ok(n),
            n => Err(format!("--leases must be 1 to {MAX_LEASES}, not {n}")),
        }
    }

    /// `--op keepalive`'s own flags: every stream needs a lease to keep alive.
    fn keepalive_spec(&self) -> Result<KeepAliveSpec, String> {
        let leases = self.lease_count()?;
        if leases < self.clients {
            return Err(format!(
                "--leases ({leases}) must be at least --clients ({}): a stream without a lease sends nothing",
                self.clients
            ));
        }
        let window = self.window.unwrap_or(DEFAULT_WINDOW);
        if window == 0 || window > MAX_WINDOW {
            return Err(format!("--window must be 1 to {MAX_WINDOW}, not {window}"));
        }
        // Both are at most MAX_LEASES, which fits any usize.
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(KeepAliveSpec { leases: size(leases), window: size(window) })
    }

    /// `--op watch`'s own flags. The watch streams need their connections: `--conns` is at most
    /// `--streams`, which is at most `--watchers`. The puts have a connection of their own.
    fn watch_spec(&self) -> Result<WatchSpec, String> {
        let watchers = self.watchers.unwrap_or(DEFAULT_WATCHERS);
        if watchers == 0 || watchers > MAX_WATCHERS {
            return Err(format!("--watchers must be 1 to {MAX_WATCHERS}, not {watchers}"));
        }
        let streams = self.streams.unwrap_or(self.conns);
        if self.streams.is_none() && streams > watchers {
            return Err(format!(
                "--conns ({streams}) must not exceed --watchers ({watchers}) with --op watch: \
                 a connection without a watcher carries nothing"
            ));
        }
        if streams == 0 || streams > watchers {
            return Err(format!("--streams must be 1 to --watchers ({watchers}), not {streams}"));
        }
        if self.conns == 0 || self.conns > streams {
            return Err(format!(
                "--conns must be 1 to --streams ({streams}), not {}: a connection without a watch \
                 stream carries nothing",
                self.conns
            ));
        }
        let rate = self.rate.unwrap_or(DEFAULT_RATE);
        if rate == 0 || rate > MAX_RATE {
            return Err(format!("--rate must be 1 to {MAX_RATE} puts per second, not {rate}"));
        }
        // All three are at most MAX_WATCHERS, which fits any usize.
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(WatchSpec { watchers: size(watchers), streams: size(streams), rate })
    }
}

/// Key `i` of the key space: `key-%08d`, as etcd's benchmark names keys (byte order is numeric
/// order below 10^8).
pub fn key(i: u64) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

/// A key drawn uniformly from the key space.
pub fn random_key(rng: &mut impl Rng, key_space: u64) -> Vec<u8> {
    key(rng.gen_range(0..key_space))
}

/// `size` random bytes: one value per client, sent with each of its puts (as etcd's benchmark does,
/// so that generating values costs the load generator nothing during the run).
pub fn random_value(rng: &mut impl Rng, size: usize) -> Vec<u8> {
    let mut value = vec![0; size];
    rng.fill(value.as_mut_slice());
    value
}

/// The connection each client uses (round robin), and the endpoint each connection goes to.
pub fn spread(index: usize, over: usize) -> usize {
    index % over.max(1)
}

/// What `--target-leader` learned from one endpoint's Maintenance.Status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// The answering member's own id (the response header's `member_id`).
    pub member_id: u64,
    /// The member it believes leads (0: none known).
    pub leader: u64,
}

/// The endpoint whose member is the leader: the one that answers with its own id as the leader.
/// Other answers only help explain a failure.
pub fn pick_leader(views: &[(Endpoint, Result<MemberView, String>)]) -> Result<Endpoint, BenchError> {
    if let Some((endpoint, _)) =
        views.iter().find(|(_, v)| matches!(v, Ok(view) if view.leader != 0 && view.member_id == view.leader))
    {
        return Ok(endpoint.clone());
    }
    let reasons = views
        .iter()
        .map(|(endpoint, view)| {
            let why = match view {
                Ok(MemberView { member_id, leader: 0 }) => format!("member {member_id:x}, no leader known"),
                Ok(MemberView { member_id, leader }) => format!("member {member_id:x}, leader {leader:x}"),
                Err(e) => e.clone(),
            };
            format!("{endpoint} ({why})")
        })
        .collect();
    Err(BenchError::NoLeader(reasons))
}

/// Why `keel bench` could not run or measured nothing (exit 1). Request errors during the run are
/// not here: they are counted and reported.
#[derive(Debug)]
pub enum BenchError {
    /// The endpoint could not be connected to before the run; why, in words (the TLS cause
    /// when the handshake failed).
    Connect { endpoint: String, why: String },
    /// `--target-leader`: no endpoint is the leader; one reason per endpoint.
    NoLeader(Vec<String>),
    /// The runtime could not start.
    Runtime(std::io::Error),
    /// Every measured request failed (the first distinct errors are printed above).
    NothingSucceeded { errors: u64 },
    /// `--op watch`: the watchers could not all be created, so no put was sent.
    Watch { created: usize, wanted: usize, why: WatchFailure },
    /// The leases a run holds (keep-alive's, the lock contenders') could not all be granted, so
    /// nothing was measured; the first error.
    Grant { granted: usize, wanted: usize, why: String },
    /// `--op lease-ready`: not ready within `--duration`; the last failure.
    NotReady { waited: Duration, last: String },
    /// `--op lease-ready`: the store answered without what `--op lease-load` had written.
    Lost(String),
}

/// Why a watcher could not be created.
#[derive(Debug)]
pub enum WatchFailure {
    /// The server refused the stream or the watcher (etcd's answer, or `Unimplemented` from a
    /// server without Watch).
    Refused(tonic::Status),
    /// No answer to a create request within `--timeout`.
    TimedOut(Duration),
    /// The server ended the stream.
    Ended,
    /// The server canceled a watcher as it created it, with its reason.
    Canceled(String),
    /// The server gave one id to two watchers of a stream.
    DuplicateId(i64),
    /// The task opening a stream panicked or was cancelled.
    Task(String),
}

impl fmt::Display for WatchFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchFailure::Refused(status) => {
                write!(f, "the server answered {:?}: {}", status.code(), status.message())
            }
            WatchFailure::TimedOut(after) => {
                write!(f, "no answer within {}s (--timeout)", after.as_secs_f64())
            }
            WatchFailure::Ended => write!(f, "the server ended the stream"),
            WatchFailure::Canceled(reason) => write!(f, "the server canceled the watcher: {reason}"),
            WatchFailure::DuplicateId(id) => write!(f, "the server gave watch id {id} twice on one stream"),
            WatchFailure::Task(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Connect { endpoint, why } => write!(f, "cannot connect to {endpoint}: {why}"),
            BenchError::NoLeader(reasons) => {
                write!(f, "no endpoint is the leader (--target-leader): {}", reasons.join(", "))
            }
            BenchError::Runtime(e) => write!(f, "cannot start the runtime: {e}"),
            BenchError::NothingSucceeded { errors } => {
                write!(f, "no request succeeded ({errors} errors)")
            }
            BenchError::Watch { created, wanted, why } => {
                write!(f, "cannot create the watchers ({created} of {wanted} created): {why}")
            }
            BenchError::Grant { granted, wanted, why } => {
                write!(f, "cannot grant the leases ({granted} of {wanted} granted, all revoked): {why}")
            }
            BenchError::NotReady { waited, last } => {
                write!(f, "not ready after {:.1}s (--duration); last: {last}", waited.as_secs_f64())
            }
            BenchError::Lost(what) => write!(f, "the store answered, but {what}"),
        }
    }
}

/// An error and its causes, `: `-separated (tonic's own text is only "transport error").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        // Wrappers often repeat their cause's text; say it once.
        let said = e.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if secs.is_nan() || secs < 0.0 {
        return Err(format!("'{text}' is not a number of seconds (0 or more)"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{text}' seconds is out of range"))
}

fn parse_positive_secs(text: &str) -> Result<Duration, String> {
    match parse_secs(text)? {
        Duration::ZERO => Err("must be more than 0 seconds".to_owned()),
        d => Ok(d),
    }
}

/// Runs the bench and returns what to print on stdout: the table, or with `json` the JSON line.
/// What it is doing, and the errors it met, go to stderr.
pub async fn run(
    endpoints: &[Endpoint],
    timeout: Duration,
    json: bool,
    plan: Plan,
) -> Result<String, BenchError> {
    let _ = writeln!(std::io::stderr(), "{}", plan.describe(endpoints));
    let (row, errors) = match plan.workload {
        Workload::Watch(spec) => {
            let (row, errors) = watch::run(endpoints, timeout, plan, spec).await?;
            let _ = write!(std::io::stderr(), "{}", errors.describe());
            if row.puts == 0 && errors.total > 0 {
                return Err(BenchError::NothingSucceeded { errors: errors.total });
            }
            return Ok(if json { row.json_line() } else { row.table() });
        }
        Workload::LeaseReady { lease_id } => {
            let row = restart::ready(endpoints, timeout, &plan, lease_id).await?;
            return Ok(if json { row.json_line() } else { row.table() });
        }
        Workload::Put | Workload::Get | Workload::Mixed { .. } => load::run(endpoints, timeout, plan).await?,
        Workload::Lease => lease::grant_revoke(endpoints, timeout, plan).await?,
        Workload::KeepAlive(spec) => lease::keepalive(endpoints, timeout, plan, spec).await?,
        Workload::Lock => lock::run(endpoints, timeout, plan).await?,
        Workload::LeaseLoad { leases } => restart::load(endpoints, timeout, plan, leases).await?,
    };
    let _ = write!(std::io::stderr(), "{}", errors.describe());
    if row.ops == 0 && errors.total > 0 {
        return Err(BenchError::NothingSucceeded { errors: errors.total });
    }
    Ok(if json { row.json_line() } else { row.table() })
}

impl Plan {
    /// The TTL of a lock contender's lease: `ttl`, stretched so that it outlives the whole run by
    /// `LOCK_LEASE_SLACK` (the contenders send no keep-alives). A lease that expired under a
    /// contender would delete its key and end the run's mutual exclusion.
    pub fn lock_lease_ttl(&self) -> i64 {
        let run = self.warmup + self.duration + LOCK_LEASE_SLACK;
        // At most 600 + 3600 + 60 s: the conversion cannot fail.
        let run = i64::try_from(run.as_secs() + u64::from(run.subsec_nanos() > 0)).unwrap_or(MAX_TTL);
        self.ttl.max(run).min(MAX_TTL)
    }

    /// One line saying what the run will do.
    pub fn describe(&self, endpoints: &[Endpoint]) -> String {
        let endpoints: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        let op = match self.workload {
            Workload::Put => "put".to_owned(),
            Workload::Get => format!("get ({})", self.consistency.name()),
            Workload::Mixed { read_ratio } => {
                format!("mixed, {:.0}% get ({})", read_ratio * 100.0, self.consistency.name())
            }
            Workload::Watch(spec) => {
                return self.describe_watch(spec, &endpoints);
            }
            Workload::Lease => {
                return format!(
                    "bench: lease grant then revoke (TTL {}s), {} clients {}, {}",
                    self.ttl,
                    self.clients,
                    self.over(&endpoints),
                    self.then()
                );
            }
            Workload::KeepAlive(spec) => {
                return format!(
                    "bench: keepalive, {} leases (TTL {}s) kept alive on {} streams (at most {} requests in flight each) {}, {}",
                    spec.leases,
                    self.ttl,
                    self.clients,
                    spec.window,
                    self.over(&endpoints),
                    self.then()
                );
            }
            Workload::Lock => {
                return format!(
                    "bench: lock then unlock, {} contender(s) on one lock, each with its own lease (TTL {}s), {}, {}",
                    self.clients,
                    self.lock_lease_ttl(),
                    self.over(&endpoints),
                    self.then()
                );
            }
            Workload::LeaseLoad { leases } => {
                return format!(
                    "bench: lease-load, {leases} leases (TTL {}s), lease i with key-%08d i ({}-byte value) put under it, {} in flight {}",
                    self.ttl,
                    self.value_size,
                    self.clients,
                    self.over(&endpoints)
                );
            }
            Workload::LeaseReady { lease_id } => {
                return format!(
                    "bench: lease-ready, until {} answers a linearizable Range of {} (attached to lease {lease_id}) \
                     and a LeaseTimeToLive of that lease with a TTL, at most {}s",
                    endpoints.first().map_or("", String::as_str),
                    String::from_utf8_lossy(&key(0)),
                    self.duration.as_secs_f64(),
                );
            }
        };
        let bound = self.bound();
        format!(
            "bench: {op}, {} clients over {} conns to {}{}, key space {}, {}-byte values, preload {}, warm-up {}s, then {bound}",
            self.clients,
            self.conns,
            endpoints.join(","),
            if self.target_leader { " (the leader only)" } else { "" },
            self.key_space,
            self.value_size,
            self.preload,
            self.warmup.as_secs_f64(),
        )
    }

    fn bound(&self) -> String {
        if self.ops == MAX_OPS {
            format!("{}s", self.duration.as_secs_f64())
        } else {
            format!("{} requests or {}s", self.ops, self.duration.as_secs_f64())
        }
    }

    /// Where the requests go: "over N conns to A,B (the leader only)".
    fn over(&self, endpoints: &[String]) -> String {
        format!(
            "over {} conns to {}{}",
            self.conns,
            endpoints.join(","),
            if self.target_leader { " (the leader only)" } else { "" }
        )
    }

    /// "warm-up Ws, then" the bound.
    fn then(&self) -> String {
        format!("warm-up {}s, then {}", self.warmup.as_secs_f64(), self.bound())
    }

    fn describe_watch(&self, spec: WatchSpec, endpoints: &[String]) -> String {
        format!(
            "bench: watch, {} watchers on {} streams over {} conns to {}{}, {} puts/s (at most {} in flight, on a connection of their own), {}-byte values, preload {}, warm-up {}s, then {}",
            spec.watchers,
            spec.streams,
            self.conns,
            endpoints.join(","),
            if self.target_leader { " (the leader only)" } else { "" },
            spec.rate,
            self.clients,
            self.value_size,
            self.preload,
            self.warmup.as_secs_f64(),
            self.bound().replace("requests", "puts"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    fn args(extra: &[&str]) -> Result<Plan, String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let cmd = Cmd::try_parse_from(std::iter::once("bench").chain(extra.iter().copied()))
            .map_err(|e| e.to_string())?;
        cmd.bench.plan()
    }

    #[test]
    fn defaults_are_bounded() {
        let plan = args(&[]).expect("valid");
        assert_eq!(plan.workload, Workload::Put);
        assert_eq!((plan.clients, plan.conns), (1, 1));
        assert_eq!(plan.duration, DEFAULT_DURATION);
        assert_eq!(plan.ops, MAX_OPS);
        assert_eq!(plan.warmup, Duration::from_secs(1));
        assert_eq!((plan.key_space, plan.value_size, plan.preload), (100_000, 256, 0));
    }

    #[test]
    fn ops_alone_is_capped_in_time_and_duration_alone_in_count() {
        let plan = args(&["--ops", "500"]).expect("valid");
        assert_eq!((plan.ops, plan.duration), (500, MAX_DURATION));
        let plan = args(&["--duration", "2.5"]).expect("valid");
        assert_eq!((plan.ops, plan.duration), (MAX_OPS, Duration::from_millis(2500)));
        let plan = args(&["--duration", "3", "--ops", "7"]).expect("valid");
        assert_eq!((plan.ops, plan.duration), (7, Duration::from_secs(3)));
    }

    #[test]
    fn invalid_flags_are_refused_with_the_flag_named() {
        let refused = |a: &[&str]| args(a).expect_err("refused");
        assert!(refused(&["--clients", "0"]).contains("--clients"));
        assert!(refused(&["--clients", "10001"]).contains("--clients"));
        assert!(refused(&["--clients", "4", "--conns", "5"]).contains("--conns"));
        assert!(refused(&["--conns", "0"]).contains("--conns"));
        assert!(refused(&["--read-ratio", "0.5"]).contains("--op mixed"));
        assert!(refused(&["--op", "mixed", "--read-ratio", "1.5"]).contains("--read-ratio"));
        assert!(refused(&["--op", "mixed", "--read-ratio", "NaN"]).contains("--read-ratio"));
        assert!(refused(&["--key-space", "0"]).contains("--key-space"));
        assert!(refused(&["--value-size", "2000000"]).contains("--value-size"));
        assert!(refused(&["--preload", "1000000001"]).contains("--preload"));
        assert!(refused(&["--ops", "0"]).contains("--ops"));
        assert!(refused(&["--ops", "1000000001"]).contains("--ops"));
        assert!(refused(&["--duration", "0"]).contains("--duration"));
        assert!(refused(&["--duration", "-2"]).contains("--duration"));
        assert!(refused(&["--duration", "3601"]).contains("--duration"));
        assert!(refused(&["--warmup", "-1"]).contains("--warmup"));
        assert!(refused(&["--warmup", "601"]).contains("--warmup"));
        assert!(refused(&["--op", "delete"]).contains("--op"));
        assert!(refused(&["--consistency", "eventual"]).contains("--consistency"));
        for flag in ["--watchers", "--streams", "--rate"] {
            assert!(refused(&[flag, "1"]).contains(&format!("{flag} applies to --op watch only")));
        }
    }

    #[test]
    fn a_preload_past_the_key_space_overwrites_to_make_history() {
        let plan = args(&["--key-space", "10", "--preload", "100000"]).expect("valid");
        assert_eq!((plan.key_space, plan.preload), (10, 100_000));
    }

    #[test]
    fn watch_defaults_to_one_watcher_one_stream_and_100_puts_a_second() {
        let plan = args(&["--op", "watch"]).expect("valid");
        assert_eq!(plan.workload, Workload::Watch(WatchSpec { watchers: 1, streams: 1, rate: 100 }));
        assert_eq!((plan.clients, plan.conns), (1, 1));
        assert_eq!(plan.workload.name(), "watch");
        assert_eq!(plan.workload.next_op(&mut StdRng::seed_from_u64(1)), Op::Put);
    }

    #[test]
    fn watch_streams_default_to_the_connections_which_need_not_match_the_clients() {
        let plan = args(&["--op", "watch", "--watchers", "10000", "--conns", "8"]).expect("valid");
        assert_eq!(plan.workload, Workload::Watch(WatchSpec { watchers: 10_000, streams: 8, rate: 100 }));
        assert_eq!((plan.clients, plan.conns), (1, 8));
        let plan =
            args(&["--op", "watch", "--watchers", "100", "--streams", "16", "--conns", "8", "--rate", "5"])
                .expect("valid");
        assert_eq!(plan.workload, Workload::Watch(WatchSpec { watchers: 100, streams: 16, rate: 5 }));
    }

    #[test]
    fn watch_flags_that_do_not_fit_are_refused_with_the_flag_named() {
        let refused = |a: &[&str]| args(&[&["--op", "watch"], a].concat()).expect_err("refused");
        assert!(refused(&["--watchers", "0"]).contains("--watchers"));
        assert!(refused(&["--watchers", "100001"]).contains("--watchers"));
        assert!(refused(&["--watchers", "4", "--conns", "8"]).contains("--conns"));
        assert!(refused(&["--watchers", "4", "--streams", "5"]).contains("--streams"));
        assert!(refused(&["--watchers", "4", "--streams", "0"]).contains("--streams"));
        assert!(refused(&["--watchers", "8", "--streams", "2", "--conns", "4"]).contains("--conns"));
        assert!(refused(&["--rate", "0"]).contains("--rate"));
        assert!(refused(&["--rate", "100001"]).contains("--rate"));
        assert!(refused(&["--read-ratio", "0.5"]).contains("--read-ratio"));
    }

    #[test]
    fn lease_ops_default_to_10000_leases_a_60s_ttl_and_a_window_of_64() {
        let plan = args(&["--op", "keepalive", "--clients", "16", "--conns", "8"]).expect("valid");
        assert_eq!(plan.workload, Workload::KeepAlive(KeepAliveSpec { leases: 10_000, window: 64 }));
        assert_eq!((plan.ttl, plan.clients, plan.conns), (60, 16, 8));
        assert_eq!(plan.workload.name(), "keepalive");
        let plan = args(&["--op", "lease", "--ttl", "5"]).expect("valid");
        assert_eq!((plan.workload, plan.ttl), (Workload::Lease, 5));
        let plan = args(&["--op", "lease-load", "--leases", "100000", "--ttl", "3600"]).expect("valid");
        assert_eq!((plan.workload, plan.ttl), (Workload::LeaseLoad { leases: 100_000 }, 3600));
        let plan = args(&["--op", "lease-ready", "--lease-id", "7587"]).expect("valid");
        assert_eq!(plan.workload, Workload::LeaseReady { lease_id: 7587 });
        assert_eq!(args(&["--op", "lock"]).expect("valid").workload.name(), "lock");
    }

    #[test]
    fn lease_flags_that_do_not_fit_are_refused_with_the_flag_named() {
        let refused = |a: &[&str]| args(a).expect_err("refused");
        assert!(refused(&["--op", "keepalive", "--leases", "0"]).contains("--leases"));
        assert!(refused(&["--op", "keepalive", "--leases", "1000001"]).contains("--leases"));
        assert!(refused(&["--op", "keepalive", "--leases", "3", "--clients", "4"]).contains("--leases"));
        assert!(refused(&["--op", "keepalive", "--window", "0"]).contains("--window"));
        assert!(refused(&["--op", "keepalive", "--window", "10001"]).contains("--window"));
        assert!(refused(&["--op", "lease", "--ttl", "0"]).contains("--ttl"));
        assert!(refused(&["--op", "lease", "--ttl", "9000000001"]).contains("--ttl"));
        assert!(refused(&["--op", "lease-ready"]).contains("--lease-id"));
        assert!(refused(&["--op", "lease-ready", "--lease-id", "0"]).contains("--lease-id"));
        assert_eq!(
            refused(&["--op", "lease", "--leases", "5"]),
            "--leases applies to --op keepalive and lease-load only"
        );
        assert_eq!(refused(&["--op", "lock", "--window", "5"]), "--window applies to --op keepalive only");
        assert_eq!(
            refused(&["--ttl", "5"]),
            "--ttl applies to --op lease, keepalive, lock and lease-load only"
        );
        assert_eq!(
            refused(&["--op", "lease", "--lease-id", "5"]),
            "--lease-id applies to --op lease-ready only"
        );
        assert_eq!(refused(&["--op", "lease", "--watchers", "5"]), "--watchers applies to --op watch only");
    }

    #[test]
    fn a_lock_lease_outlives_the_run() {
        let plan = args(&["--op", "lock", "--duration", "10", "--warmup", "0.5"]).expect("valid");
        // 0.5 + 10 + 60 s, rounded up; more than the 60 s asked for.
        assert_eq!(plan.lock_lease_ttl(), 71);
        let plan = args(&["--op", "lock", "--duration", "10", "--ttl", "600"]).expect("valid");
        assert_eq!(plan.lock_lease_ttl(), 600);
        let plan = args(&["--op", "lock", "--ops", "10"]).expect("valid");
        assert_eq!(plan.lock_lease_ttl(), 1 + 3600 + 60);
    }

    #[test]
    fn mixed_defaults_to_half_reads_and_accepts_the_extremes() {
        assert_eq!(args(&["--op", "mixed"]).expect("valid").workload, Workload::Mixed { read_ratio: 0.5 });
        for ratio in ["0", "1"] {
            assert!(args(&["--op", "mixed", "--read-ratio", ratio]).is_ok());
        }
        let mut rng = StdRng::seed_from_u64(7);
        let all_reads = Workload::Mixed { read_ratio: 1.0 };
        assert!((0..100).all(|_| all_reads.next_op(&mut rng) == Op::Get));
        let all_writes = Workload::Mixed { read_ratio: 0.0 };
        assert!((0..100).all(|_| all_writes.next_op(&mut rng) == Op::Put));
    }

    #[test]
    fn keys_are_zero_padded_and_stay_in_the_key_space() {
        assert_eq!(key(0), b"key-00000000");
        assert_eq!(key(42), b"key-00000042");
        assert_eq!(key(99_999_999), b"key-99999999");
        assert_eq!(key(123_456_789), b"key-123456789");
        let seed = rand::random::<u64>();
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..1000 {
            let k = random_key(&mut rng, 3);
            assert!([key(0), key(1), key(2)].contains(&k), "seed {seed}: {k:?} outside the key space");
        }
        assert_eq!(random_value(&mut rng, 256).len(), 256);
        assert!(random_value(&mut rng, 0).is_empty());
    }

    #[test]
    fn clients_and_connections_spread_round_robin() {
        let conns: Vec<usize> = (0..5).map(|c| spread(c, 2)).collect();
        assert_eq!(conns, [0, 1, 0, 1, 0]);
        assert_eq!(spread(3, 0), 0);
    }

    #[test]
    fn the_leader_is_the_endpoint_that_names_itself() {
        let ep = |s: &str| Endpoint::parse(s).expect("endpoint");
        let views = vec![
            (ep("127.0.0.1:1"), Ok(MemberView { member_id: 1, leader: 2 })),
            (ep("127.0.0.1:2"), Err("connection refused".to_owned())),
            (ep("127.0.0.1:3"), Ok(MemberView { member_id: 2, leader: 2 })),
        ];
        assert_eq!(pick_leader(&views).expect("leader").to_string(), "127.0.0.1:3");
        let views = vec![
            (ep("127.0.0.1:1"), Ok(MemberView { member_id: 1, leader: 0 })),
            (ep("127.0.0.1:2"), Err("connection refused".to_owned())),
        ];
        assert_eq!(
            pick_leader(&views).expect_err("no leader").to_string(),
            "no endpoint is the leader (--target-leader): 127.0.0.1:1 (member 1, no leader known), \
             127.0.0.1:2 (connection refused)"
        );
    }
}
