//! `keel`: the command-line client for Keel clusters, over the HTTP/JSON API (`docs/http-api.md`),
//! in plaintext or TLS.
//!
//! # Layout
//!
//! - `main.rs`: the command line (clap) and one function per command.
//! - `client.rs`: endpoints, failover, the wire types and the error a command reports.
//! - `tls.rs`: `--cacert/--cert/--key` into rustls configs, the connector both clients dial
//!   through (HTTP/1.1 and gRPC), and what a failed handshake means in words.
//! - `certs.rs`: `keel certs`, a development CA and the certificates it signs (rcgen).
//! - `txn.rs`: etcdctl's txn syntax into the `POST /v1/txn` body.
//! - `output.rs`: text and JSON output.
//! - `lease.rs`: `keel lease …` and lease ids (hex for people, i64 on the wire).
//! - `session.rs`: holding a lease: the keep-alive schedule and what it proves, the background
//!   keep-alive, waiting in line under a lease, the signals that end a holder.
//! - `lock.rs`: `keel lock`, and the command it runs tied to its life (`keel run-tied`).
//! - `elect.rs`: `keel elect`, campaigning and observing.
//! - `bench.rs`, `bench/`: `keel bench`, a load generator over the etcd v3 gRPC API (not HTTP), so
//!   that it measures etcd and Keel alike.
//! - `demo.rs`: `keel demo`, a 3-node cluster of real `keeld` processes that loses its leader
//!   (exit 130 on Ctrl+C).
//!
//! Exit codes: 0 success, 1 the request failed (no endpoint answered, a write's outcome is
//! unknown, the server refused, a malformed answer; a lock or leadership lost), 2 bad usage or bad
//! input (clap's code, also a txn syntax error), 130 interrupted while waiting for a lock or a
//! leadership; `keel lock NAME -- COMMAND` exits with the command's status.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod bench;
mod certs;
mod client;
mod debug;
mod demo;
mod elect;
mod lease;
mod lock;
mod output;
mod session;
mod snapshot;
mod tls;
mod txn;

use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bench::{BenchArgs, BenchError};
use clap::{Args, Parser, Subcommand};
use lease::{LeaseCommand, LeaseId};
use serde_json::{json, Value};

use client::{
    decode_kvs, kv_path, with_query, Answer, ApiRequest, Client, ClientError, DeleteAnswer, Endpoint,
    MembersAnswer, PutAnswer, RangeAnswer, StatusAnswer, TransferAnswer, TxnAnswer, WireKv,
};
use output::MemberStatus;
use txn::{Section, TxnError, TxnParser};

#[derive(Parser, Debug)]
#[command(name = "keel", version, about = "Command-line client for Keel clusters (HTTP/JSON API)")]
struct Cli {
    /// Client addresses to try in order, comma-separated: host:port, http://host:port or
    /// https://host:port (host:port is TLS when --cacert is given).
    #[arg(
        long,
        global = true,
        env = "KEEL_ENDPOINTS",
        value_name = "ENDPOINTS",
        value_delimiter = ',',
        value_parser = Endpoint::parse,
        default_value = "127.0.0.1:2379"
    )]
    endpoints: Vec<Endpoint>,

    /// Verify servers' certificates with this CA (PEM); turns TLS on.
    #[arg(long, global = true, env = "KEEL_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,

    /// Present this client certificate (PEM), for servers with --client-cert-auth.
    #[arg(long = "cert", id = "tls_cert", global = true, env = "KEEL_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,

    /// The private key of --cert (PEM).
    // Not the id `key`: that is the commands' KEY argument.
    #[arg(long = "key", id = "tls_key", global = true, env = "KEEL_KEY", value_name = "FILE")]
    key: Option<PathBuf>,

    /// With auth on: send requests as this user, NAME:PASSWORD or NAME with --password (as
    /// etcdctl's --user). Checked by the server on every request (HTTP basic credentials).
    #[arg(long, global = true, env = "KEEL_USER", value_name = "NAME[:PASSWORD]")]
    user: Option<String>,

    /// The password of --user NAME (prefer the KEEL_PASSWORD variable: a flag shows in `ps`).
    #[arg(long, global = true, env = "KEEL_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    password: Option<String>,

    /// Print one JSON object per command (the server's answer) instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Per-request timeout in seconds (connect, send and read the whole answer).
    #[arg(long, global = true, value_name = "SECS", default_value = "5", value_parser = parse_timeout)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a value; VALUE `-` reads it from stdin (all bytes, a final newline included).
    Put {
        /// The key.
        key: OsString,
        /// The value, or `-` to read it from stdin.
        #[arg(allow_hyphen_values = true)]
        value: OsString,
        /// Also print the previous key-value.
        #[arg(long)]
        prev_kv: bool,
        /// Attach the key to this lease (hex or decimal): it is deleted when the lease ends.
        #[arg(long, value_name = "ID", value_parser = LeaseId::parse)]
        lease: Option<LeaseId>,
        /// Keep the key's current lease (the key must exist).
        #[arg(long, conflicts_with = "lease")]
        ignore_lease: bool,
    },
    /// Read a key, or a range of keys.
    Get(GetArgs),
    /// Delete a key, or every key with a prefix; prints the number deleted.
    Del {
        /// The key, or the prefix with --prefix.
        key: OsString,
        /// Delete every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Also print the deleted key-values.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Run a transaction read from stdin in etcdctl's syntax: compares, a blank line, success
    /// ops, a blank line, failure ops.
    Txn,
    /// Print changes to a key or a prefix as they happen (etcdctl's format: PUT or DELETE, the
    /// key, the value; `--json`: one JSON message per line), until interrupted. If the endpoint
    /// goes away, the watch resumes on the next one from the revision after the last it printed.
    Watch {
        /// The key, or the prefix with --prefix.
        key: OsString,
        /// Watch every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision (replaying history from it); default: changes from now on.
        #[arg(long, value_name = "REV")]
        rev: Option<i64>,
        /// Also print each key's previous value.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Compact history below a revision: reads at older revisions fail from then on.
    Compaction {
        /// The revision to compact to.
        revision: i64,
        /// Answer only once this node has removed the history.
        #[arg(long)]
        physical: bool,
    },
    /// Leases: keys that live as long as a lease is kept alive.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Hold a lock of the cluster while COMMAND runs (its key and fencing token in
    /// $KEEL_LOCK_KEY and $KEEL_LOCK_REVISION); exits with the command's status. Without a
    /// command, print the lock's key and hold it until SIGINT or SIGTERM.
    Lock(lock::LockArgs),
    /// Campaign in an election: print the leader key and VALUE once leading, lead until SIGINT or
    /// SIGTERM, then resign. `-l`: print each leader instead.
    Elect(elect::ElectArgs),
    /// Cluster administration.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Load generator over the etcd v3 gRPC API (works against etcd too): prints throughput and
    /// latency percentiles. `--timeout` bounds each request.
    Bench(BenchArgs),
    /// Start a throwaway 3-node cluster of real keeld processes on loopback, kill its leader and
    /// show that no acknowledged write is lost (needs keeld: `cargo build -p keel-kv`).
    Demo(demo::DemoArgs),
    /// A development CA and certificates for TLS (writes PEM files; keys mode 0600).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Backups: save a snapshot of a cluster, check a snapshot file, restore a new cluster from
    /// one (status and restore need no server).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Offline inspection (no server needed).
    #[command(subcommand)]
    Debug(DebugCommand),
    /// Internal, for `keel lock`: run COMMAND (exec) so that it gets SIGTERM when process PARENT
    /// dies.
    #[command(hide = true)]
    RunTied {
        parent: u32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<OsString>,
    },
}

#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// What a stopped node's data dir holds: vote, log range, last applied, membership, snapshot,
    /// key count. Changes nothing; refuses if a running node holds the dir.
    DataDir {
        /// The node's data dir (e.g. ./keel-data).
        path: std::path::PathBuf,
    },
    /// Cut a stopped node's Raft log at a byte offset, e.g. past damage start-up refuses: prints
    /// the records and log indexes that will be lost, and cuts only with --yes. Later chunk files
    /// are removed. Refuses if a running node holds the dir.
    TruncateLog {
        /// The node's data dir (e.g. ./keel-data); the log is its `log/`.
        #[arg(long, value_name = "DIR")]
        data_dir: std::path::PathBuf,
        /// Byte offset in the chunk file where the log is to end: a record's start, or the end of
        /// the readable records (which cuts only a damaged tail).
        #[arg(long, value_name = "N")]
        offset: u64,
        /// The chunk file to cut (e.g. r-00000000000000000000.wal) [default: the last one].
        #[arg(long, value_name = "F")]
        file: Option<String>,
        /// Cut. Without it, only print what would be lost (exit 2).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
struct GetArgs {
    /// The key, or the prefix with --prefix, or the first key with --from-key.
    key: OsString,
    /// Every key starting with KEY (an empty KEY: every key).
    #[arg(long, conflicts_with = "from_key")]
    prefix: bool,
    /// Every key greater than or equal to KEY.
    #[arg(long)]
    from_key: bool,
    /// At most N keys (0: no limit).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Print keys only.
    #[arg(long)]
    keys_only: bool,
    /// Print only the number of keys.
    #[arg(long, conflicts_with = "keys_only")]
    count_only: bool,
    /// Read the contacted node's state without a round to the leader (may be stale).
    #[arg(long)]
    serializable: bool,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Initialize a new cluster: ID=PEER_ADDR@CLIENT_ADDR,... or nothing for a single-node
    /// cluster of the contacted node.
    Init {
        /// The initial voters; omit for a single-node cluster.
        #[arg(value_name = "ID=PEER_ADDR@CLIENT_ADDR,...", value_parser = parse_init_members)]
        members: Option<InitMembers>,
    },
    /// Every member's own view: role, term, log, applied index, replication lag.
    Status,
    /// List the members.
    Members,
    /// Add a non-voting member that starts receiving the log.
    AddLearner {
        /// The new member's node id.
        id: u64,
        /// The address its peers reach it on.
        peer_addr: String,
        /// The learner's client address, for clients and `keel cluster status`.
        #[arg(long, value_name = "ADDR")]
        client_addr: Option<String>,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a member.
    Remove { id: u64 },
    /// Ask the leader to hand leadership to a voter.
    TransferLeader { id: u64 },
}

/// The members of `keel cluster init`, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
struct InitMembers(Vec<InitMember>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct InitMember {
    id: u64,
    peer_addr: String,
    client_addr: String,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err("the timeout must be more than 0 seconds".to_owned());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{text}' seconds is out of range"))
}

fn parse_init_members(text: &str) -> Result<InitMembers, String> {
    let mut members: Vec<InitMember> = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let shape = || format!("'{item}' is not ID=PEER_ADDR@CLIENT_ADDR");
        let (id, addrs) = item.split_once('=').ok_or_else(shape)?;
        let (peer_addr, client_addr) = addrs.split_once('@').ok_or_else(shape)?;
        let id: u64 = id.trim().parse().map_err(|_| format!("'{id}' in '{item}' is not a node id"))?;
        if peer_addr.is_empty() || client_addr.is_empty() {
            return Err(shape());
        }
        if members.iter().any(|m| m.id == id) {
            return Err(format!("node id {id} is given twice"));
        }
        members.push(InitMember { id, peer_addr: peer_addr.to_owned(), client_addr: client_addr.to_owned() });
    }
    Ok(InitMembers(members))
}

impl InitMembers {
    fn to_json(&self) -> Value {
        let members: serde_json::Map<String, Value> = self
            .0
            .iter()
            .map(|m| (m.id.to_string(), json!({"peer_addr": m.peer_addr, "client_addr": m.client_addr})))
            .collect();
        json!({ "members": members })
    }
}

/// Why a command failed.
#[derive(Debug)]
enum CliError {
    /// The request failed; exit 1.
    Client(ClientError),
    /// stdin could not be read; exit 1.
    Stdin(io::Error),
    /// `keel txn` input is not valid txn syntax; exit 2.
    Txn(TxnError),
    /// An empty key where the server requires one; exit 2.
    EmptyKey,
    /// `keel bench` flags that do not fit together or exceed a cap; exit 2.
    BenchUsage(String),
    /// `keel bench` could not run, or no request succeeded; exit 1.
    Bench(BenchError),
    /// `keel demo` failed (exit 1) or was interrupted (exit 130).
    Demo(demo::DemoError),
    /// `keel debug` could not inspect; exit 1.
    Debug(String),
    /// `keel snapshot`: the save, check or restore failed.
    Snapshot(String),
    /// The TLS flags cannot be used (a file missing or unreadable, --cert without --key, https://
    /// without --cacert); exit 2.
    Tls(tls::TlsError),
    /// `keel certs` wrote nothing; exit 1.
    Certs(certs::CertsError),
    /// `keel debug truncate-log` without --yes: nothing was cut; exit 2.
    Unconfirmed(String),
    /// --user and --password do not fit together; exit 2.
    User(String),
    /// `keel watch` was canceled by the server (its start revision is compacted); exit 1.
    Watch(String),
    /// SIGINT and SIGTERM could not be caught, so a held lock could not be given back; exit 1.
    Signals(io::Error),
    /// `keel lock` or `keel elect` (named) did not get what it waited for; exit 1, or 130 when
    /// interrupted.
    Queue(&'static str, Box<session::QueueError>),
    /// The lock's lease was lost while held (the command, if any, stopped); exit 1.
    LockLost(lock::LockLost),
    /// The leadership's lease was lost while held; exit 1.
    LeadershipLost(elect::LeadershipLost),
    /// `keel lock` could not start or wait for its command; exit 1.
    Spawn(io::Error),
    /// `keel lock`'s command exited with this non-zero code (or 128 + the signal that ended it):
    /// keel exits with it and prints nothing.
    CommandExit(u8),
    /// `keel elect -l` lost the stream on every endpoint, three rounds in a row; exit 1.
    Observe(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Client(_)
            | CliError::Stdin(_)
            | CliError::Bench(_)
            | CliError::Debug(_)
            | CliError::Snapshot(_)
            | CliError::Certs(_)
            | CliError::Watch(_)
            | CliError::Signals(_)
            | CliError::LockLost(_)
            | CliError::LeadershipLost(_)
            | CliError::Spawn(_)
            | CliError::Observe(_) => ExitCode::from(1),
            CliError::Queue(_, e) if matches!(**e, session::QueueError::Interrupted) => ExitCode::from(130),
            CliError::Queue(..) => ExitCode::from(1),
            CliError::CommandExit(code) => ExitCode::from(*code),
            CliError::Txn(_)
            | CliError::EmptyKey
            | CliError::BenchUsage(_)
            | CliError::Unconfirmed(_)
            | CliError::User(_)
            | CliError::Tls(_) => ExitCode::from(2),
            CliError::Demo(e) => ExitCode::from(e.exit_code()),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Client(e) => write!(f, "{e}"),
            CliError::Stdin(e) => write!(f, "cannot read stdin: {e}"),
            CliError::Txn(e) => write!(f, "invalid txn: {e}"),
            CliError::EmptyKey => write!(f, "the key must not be empty"),
            CliError::BenchUsage(e) => write!(f, "{e}"),
            CliError::Bench(e) => write!(f, "{e}"),
            CliError::Demo(e) => write!(f, "{e}"),
            CliError::Debug(e) => write!(f, "{e}"),
            CliError::Snapshot(e) => write!(f, "{e}"),
            CliError::Tls(e) => write!(f, "{e}"),
            CliError::Certs(e) => write!(f, "{e}"),
            CliError::Unconfirmed(e) => write!(f, "{e}"),
            CliError::User(e) => write!(f, "{e}"),
            CliError::Watch(e) => write!(f, "{e}"),
            CliError::Signals(e) => write!(f, "cannot catch SIGINT and SIGTERM: {e}"),
            CliError::Queue(what, e) => write!(f, "keel {what}: {e}"),
            CliError::LockLost(e) => write!(f, "{e}"),
            CliError::LeadershipLost(e) => write!(f, "{e}"),
            CliError::Spawn(e) => write!(f, "cannot run the command: {e}"),
            CliError::CommandExit(code) => write!(f, "the command exited with {code}"),
            CliError::Observe(e) => write!(f, "{e}"),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::RunTied { parent, command } = &cli.command {
        // Becomes the command: no runtime, nothing else of keel's in the process.
        return lock::run_tied(*parent, command);
    }
    // One request at a time needs one thread; the load generator needs every core.
    let runtime = if matches!(cli.command, Command::Bench(_)) {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => Err(CliError::Bench(BenchError::Runtime(e))),
    };
    match result {
        Ok(text) => match io::stdout().lock().write_all(text.as_bytes()) {
            // A closed pipe (`keel get --prefix "" | head`) is the reader's choice, not a failure.
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(io::stderr(), "error: cannot write the output: {e}");
                ExitCode::from(1)
            }
        },
        // The command said what it had to say; its status is keel's.
        Err(e @ CliError::CommandExit(_)) => e.exit_code(),
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: {e}");
            e.exit_code()
        }
    }
}

/// Runs one command; returns what to print on stdout.
/// The user and password of `--user NAME[:PASSWORD]` and `--password` (etcdctl's split: the first
/// colon ends the name).
fn credentials(user: Option<&str>, password: Option<&str>) -> Result<Option<(String, String)>, CliError> {
    let Some(user) = user else {
        return match password {
            Some(_) => Err(CliError::User("--password needs --user NAME".into())),
            None => Ok(None),
        };
    };
    let (name, password) = match (user.split_once(':'), password) {
        (Some(_), Some(_)) => {
            return Err(CliError::User(
                "give the password once: --user NAME:PASSWORD or --user NAME --password".into(),
            ))
        }
        (Some((name, inline)), None) => (name, inline),
        (None, Some(p)) => (user, p),
        (None, None) => {
            return Err(CliError::User(format!(
                "no password for user {user:?}: --user {user}:PASSWORD, --password or KEEL_PASSWORD"
            )))
        }
    };
    if name.is_empty() {
        return Err(CliError::User("--user needs a name".into()));
    }
    Ok(Some((name.to_string(), password.to_string())))
}

async fn run(cli: Cli) -> Result<String, CliError> {
    let json = cli.json;
    // Commands that dial no endpoint need no TLS files (`keel certs` writes them).
    match cli.command {
        Command::Certs(cmd) => return certs::run(cmd).map_err(CliError::Certs),
        Command::Demo(args) => return demo::run(args).await.map_err(CliError::Demo),
        _ => {}
    }
    let files = tls::TlsFiles { cacert: cli.cacert.clone(), cert: cli.cert.clone(), key: cli.key.clone() };
    let tls = tls::ClientTls::load(&files).map_err(CliError::Tls)?;
    let endpoints = cli
        .endpoints
        .iter()
        .map(|e| e.clone().secured(tls.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::Tls)?;
    let mut client = Client::new(endpoints.clone(), cli.timeout, tls);
    if let Some((name, password)) = credentials(cli.user.as_deref(), cli.password.as_deref())? {
        client = client.with_user(&name, &password).map_err(CliError::User)?;
    }
    let client = &client;
    match cli.command {
        Command::Put { key, value, prev_kv, lease, ignore_lease } => {
            put(client, json, key, value, PutFlags { prev_kv, lease, ignore_lease }).await
        }
        Command::Get(args) => get(client, json, args).await,
        Command::Del { key, prefix, prev_kv } => del(client, json, key, prefix, prev_kv).await,
        Command::Txn => run_txn(client, json).await,
        Command::Watch { key, prefix, rev, prev_kv } => watch(client, json, key, prefix, rev, prev_kv).await,
        Command::Compaction { revision, physical } => {
            let mut params = vec![("revision", revision.to_string().into_bytes())];
            if physical {
                params.push(("physical", b"true".to_vec()));
            }
            let answer = client.call(&ApiRequest::post_empty(with_query("/v1/compact", &params))).await?;
            if json {
                return Ok(output::json_line(&answer.body));
            }
            Ok(format!("compacted revision {revision}\n"))
        }
        Command::Lease(cmd) => lease::run(client, json, cmd).await,
        Command::Lock(args) => lock::run(client, json, args).await,
        Command::Elect(args) => elect::run(client, json, args).await,
        Command::Cluster(cmd) => cluster(client, json, cmd).await,
        Command::Certs(_) | Command::Demo(_) => Ok(String::new()), // run above
        Command::Debug(DebugCommand::DataDir { path }) => {
            debug::data_dir(&path, json).map_err(CliError::Debug)
        }
        Command::Debug(DebugCommand::TruncateLog { data_dir, offset, file, yes }) => {
            match debug::truncate_log(&data_dir, file.as_deref(), offset, yes, json) {
                Ok(debug::Truncated::Cut(text)) => Ok(text),
                Ok(debug::Truncated::NotConfirmed(plan)) => {
                    // The plan is the output; the refusal goes to stderr with exit 2.
                    let _ = io::stdout().lock().write_all(plan.as_bytes());
                    Err(CliError::Unconfirmed(
                        "nothing cut: run again with --yes to cut the log as shown".into(),
                    ))
                }
                Err(e) => Err(CliError::Debug(e)),
            }
        }
        Command::Snapshot(cmd) => {
            snapshot::run(cmd, &endpoints, cli.timeout, json).await.map_err(CliError::Snapshot)
        }
        Command::Bench(args) => {
            let plan = args.plan().map_err(CliError::BenchUsage)?;
            bench::run(&endpoints, cli.timeout, json, plan).await.map_err(CliError::Bench)
        }
        // Handled in `main`, before a runtime exists.
        Command::RunTied { .. } => Ok(String::new()),
    }
}

/// `keel watch`: streams `GET /v1/watch` and prints each event as it comes. When the stream
/// breaks, it resumes on the next endpoint (round robin) from the revision after the last one
/// printed, so nothing is missed or printed twice; a compacted start revision ends it.
async fn watch(
    client: &Client,
    json: bool,
    key: OsString,
    prefix: bool,
    rev: Option<i64>,
    prev_kv: bool,
) -> Result<String, CliError> {
    let key = key_bytes(key)?;
    let mut next: Option<i64> = rev.filter(|r| *r > 0);
    let endpoints = client.endpoints().to_vec();
    let mut failures = 0usize;
    for endpoint in endpoints.iter().cycle() {
        let mut params = vec![(if prefix { "prefix" } else { "key" }, key.clone())];
        if let Some(next) = next {
            params.push(("start_revision", next.to_string().into_bytes()));
        }
        if prev_kv {
            params.push(("prev_kv", b"true".to_vec()));
        }
        let mut compacted = None;
        let mut printed_any = false;
        let result = client
            .stream(endpoint, &with_query("/v1/watch", &params), |message| {
                let mut out = io::stdout().lock();
                if message.get("created").is_some() {
                    // A watch from now: later reconnections resume after this revision.
                    if next.is_none() {
                        next = message.get("revision").and_then(serde_json::Value::as_i64).map(|r| r + 1);
                    }
                    return Ok(());
                }
                if message.get("canceled").is_some() {
                    compacted = message.get("compact_revision").and_then(serde_json::Value::as_i64);
                    return Ok(());
                }
                let events =
                    message.get("events").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
                if json {
                    writeln!(out, "{message}")?;
                } else {
                    for event in &events {
                        out.write_all(output::watch_event(event).as_bytes())?;
                    }
                }
                out.flush()?;
                printed_any |= !events.is_empty();
                if let Some(last) = events
                    .last()
                    .and_then(|e| e.pointer("/kv/mod_revision"))
                    .and_then(serde_json::Value::as_i64)
                {
                    next = Some(last + 1);
                }
                Ok(())
            })
            .await;
        if let Some(c) = compacted {
            return Err(CliError::Watch(format!(
                "watch canceled: revision {} has been compacted (compacted up to {c})",
                next.unwrap_or(0)
            )));
        }
        match result {
            Err(ClientError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(String::new()),
            Err(e @ (ClientError::Server { .. } | ClientError::Output(_))) => return Err(e.into()),
            Err(e) => {
                failures = if printed_any { 1 } else { failures + 1 };
                if failures >= 3 * endpoints.len() {
                    return Err(e.into());
                }
                eprintln!("keel watch: {e}; resuming on the next endpoint");
                tokio::time::sleep(Duration::from_millis(200)).await; // pace reconnections
            }
            Ok(()) => failures = 0,
        }
    }
    Ok(String::new())
}

/// Command-line bytes as given (on Unix, any bytes: keys need not be UTF-8).
fn key_bytes(key: OsString) -> Result<Vec<u8>, CliError> {
    let bytes = key.into_encoded_bytes();
    if bytes.is_empty() {
        return Err(CliError::EmptyKey);
    }
    Ok(bytes)
}

/// `keel put` flags beside the key and the value.
struct PutFlags {
    prev_kv: bool,
    lease: Option<LeaseId>,
    ignore_lease: bool,
}

async fn put(
    client: &Client,
    json: bool,
    key: OsString,
    value: OsString,
    flags: PutFlags,
) -> Result<String, CliError> {
    let key = key_bytes(key)?;
    let value = if value == "-" {
        let mut buf = Vec::new();
        io::stdin().lock().read_to_end(&mut buf).map_err(CliError::Stdin)?;
        buf
    } else {
        value.into_encoded_bytes()
    };
    let mut params: Vec<(&str, Vec<u8>)> = Vec::new();
    if flags.prev_kv {
        params.push(("prev_kv", b"true".to_vec()));
    }
    if let Some(lease) = flags.lease {
        params.push(("lease", lease.0.to_string().into_bytes()));
    }
    if flags.ignore_lease {
        params.push(("ignore_lease", b"true".to_vec()));
    }
    let answer = client.call(&ApiRequest::put_bytes(with_query(&kv_path(&key), &params), value)).await?;
    if json {
        return Ok(output::json_line(&answer.body));
    }
    let decoded: PutAnswer = answer.decode()?;
    let prev = decode_kvs(&answer.endpoint, decoded.prev_kv.as_slice())?;
    Ok(output::put(prev.first()))
}

async fn get(client: &Client, json: bool, mut args: GetArgs) -> Result<String, CliError> {
    let key = std::mem::take(&mut args.key).into_encoded_bytes();
    let consistency: Vec<(&str, Vec<u8>)> =
        if args.serializable { vec![("consistency", b"serializable".to_vec())] } else { Vec::new() };

    if !args.prefix && !args.from_key {
        return get_one(client, json, key, &args, &consistency).await;
    }
    let mut params: Vec<(&str, Vec<u8>)> = Vec::new();
    match (args.prefix, key.is_empty()) {
        (true, false) => params.push(("prefix", key)),
        // Every key: keys are never empty, so "from \0" is all of them without relying on the
        // server accepting an empty prefix.
        (_, true) => params.push(("from", vec![0])),
        (false, false) => params.push(("from", key)),
    }
    if let Some(limit) = args.limit {
        params.push(("limit", limit.to_string().into_bytes()));
    }
    if args.keys_only {
        params.push(("keys_only", b"true".to_vec()));
    }
    if args.count_only {
        params.push(("count_only", b"true".to_vec()));
    }
    params.extend(consistency);
    let answer = client.call(&ApiRequest::get(with_query("/v1/kv", &params))).await?;
    if json {
        return Ok(output::json_line(&answer.body));
    }
    let range: RangeAnswer = answer.decode()?;
    let kvs = decode_kvs(&answer.endpoint, &range.kvs)?;
    Ok(output::get(&kvs, range.count, args.keys_only, args.count_only))
}

/// One key through `GET /v1/kv/{key}`, shown in the shape of a range answer: a missing key is an
/// empty result, not an error (as in etcdctl), and `--json` prints `{"revision", "kvs", "count",
/// "more"}` whether or not the key exists.
async fn get_one(
    client: &Client,
    json: bool,
    key: Vec<u8>,
    args: &GetArgs,
    consistency: &[(&str, Vec<u8>)],
) -> Result<String, CliError> {
    if key.is_empty() {
        return Err(CliError::EmptyKey);
    }
    let found = match client.call(&ApiRequest::get(with_query(&kv_path(&key), consistency))).await {
        Ok(answer) => Some(answer),
        Err(e) if e.code() == Some("key_not_found") => None,
        Err(e) => return Err(e.into()),
    };
    let (revision, kv_json) = match &found {
        None => (None, None),
        Some(Answer { body, .. }) => {
            let mut kv = body.clone();
            let revision = kv.as_object_mut().and_then(|o| o.remove("revision"));
            if args.keys_only {
                if let Some(o) = kv.as_object_mut() {
                    o.remove("value");
                    o.remove("value_base64");
                }
            }
            (revision, Some(kv))
        }
    };
    let count = u64::from(found.is_some());
    if json {
        let mut out = serde_json::Map::new();
        if let Some(rev) = revision {
            out.insert("revision".into(), rev);
        }
        let kvs = if args.count_only { Vec::new() } else { kv_json.into_iter().collect() };
        out.insert("kvs".into(), Value::from(kvs));
        out.insert("count".into(), Value::from(count));
        out.insert("more".into(), Value::Bool(false));
        return Ok(output::json_line(&Value::Object(out)));
    }
    let kvs = match &found {
        None => Vec::new(),
        Some(answer) => {
            let wire: WireKv = answer.decode()?;
            decode_kvs(&answer.endpoint, std::slice::from_ref(&wire))?
        }
    };
    Ok(output::get(&kvs, count, args.keys_only, args.count_only))
}

async fn del(
    client: &Client,
    json: bool,
    key: OsString,
    prefix: bool,
    prev_kv: bool,
) -> Result<String, CliError> {
    let key = key_bytes(key)?;
    let mut params: Vec<(&str, Vec<u8>)> = Vec::new();
    if prefix {
        params.push(("prefix", b"true".to_vec()));
    }
    if prev_kv {
        params.push(("prev_kv", b"true".to_vec()));
    }
    let answer = client.call(&ApiRequest::delete(with_query(&kv_path(&key), &params))).await?;
    if json {
        return Ok(output::json_line(&answer.body));
    }
    let deleted: DeleteAnswer = answer.decode()?;
    let prev = decode_kvs(&answer.endpoint, &deleted.prev_kvs)?;
    Ok(output::delete(deleted.deleted, &prev))
}

/// Reads the txn: all of stdin when piped; line by line with etcdctl's prompts (on stderr) at a
/// terminal, stopping at the blank line that ends the failure ops.
fn read_txn() -> Result<txn::Txn, CliError> {
    let stdin = io::stdin();
    if !stdin.is_terminal() {
        let mut input = Vec::new();
        stdin.lock().read_to_end(&mut input).map_err(CliError::Stdin)?;
        return txn::parse_txn(&input).map_err(CliError::Txn);
    }
    let mut parser = TxnParser::default();
    let mut shown = None;
    let mut lines = stdin.lock();
    loop {
        let section = parser.section();
        if shown != Some(section) {
            let prompt = match section {
                Section::Compares => "compares:",
                Section::Success => "success requests (get, put, del):",
                Section::Failure => "failure requests (get, put, del):",
                Section::Done => break,
            };
            let _ = writeln!(io::stderr(), "{prompt}");
            shown = Some(section);
        }
        let mut line = Vec::new();
        if lines.read_until(b'\n', &mut line).map_err(CliError::Stdin)? == 0 {
            break;
        }
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        parser.push_line(line).map_err(CliError::Txn)?;
    }
    Ok(parser.finish())
}

async fn run_txn(client: &Client, json: bool) -> Result<String, CliError> {
    let txn = read_txn()?;
    let answer = client.call(&ApiRequest::post_json("/v1/txn".into(), &txn.to_json())).await?;
    if json {
        return Ok(output::json_line(&answer.body));
    }
    let decoded: TxnAnswer = answer.decode()?;
    let results = decoded.results(&answer.endpoint)?;
    Ok(output::txn(decoded.succeeded, &results))
}

async fn cluster(client: &Client, json: bool, cmd: ClusterCommand) -> Result<String, CliError> {
    let (request, done) = match cmd {
        ClusterCommand::Status => return cluster_status(client, json).await,
        ClusterCommand::Members => (ApiRequest::get("/v1/cluster/members".into()), String::new()),
        ClusterCommand::Init { members } => {
            let request = match &members {
                Some(members) => ApiRequest::post_json("/v1/cluster/init".into(), &members.to_json()),
                None => ApiRequest::post_empty("/v1/cluster/init".into()),
            };
            let answer = client.call(&request).await?;
            if json {
                return Ok(output::json_line(&answer.body));
            }
            return Ok(match members {
                Some(m) => format!("initialized a cluster of {} members\n", m.0.len()),
                None => format!("initialized a single-node cluster of {}\n", answer.endpoint),
            });
        }
        ClusterCommand::AddLearner { id, peer_addr, client_addr } => {
            let mut body = json!({"id": id, "peer_addr": peer_addr});
            if let (Some(addr), Some(obj)) = (client_addr, body.as_object_mut()) {
                obj.insert("client_addr".into(), Value::from(addr));
            }
            (ApiRequest::post_json("/v1/cluster/add-learner".into(), &body), format!("added learner {id}\n"))
        }
        ClusterCommand::Promote { id } => (
            ApiRequest::post_json("/v1/cluster/promote".into(), &json!({"id": id})),
            format!("promoted {id} to voter\n"),
        ),
        ClusterCommand::Remove { id } => (
            ApiRequest::post_json("/v1/cluster/remove".into(), &json!({"id": id})),
            format!("removed {id}\n"),
        ),
        ClusterCommand::TransferLeader { id } => {
            let answer = client
                .call(&ApiRequest::post_json("/v1/cluster/transfer-leader".into(), &json!({"id": id})))
                .await?;
            if json {
                return Ok(output::json_line(&answer.body));
            }
            let transfer: TransferAnswer = answer.decode()?;
            let leader = transfer.leader.unwrap_or(id);
            return Ok(format!("leader is now {leader}\n"));
        }
    };
    let answer = client.call(&request).await?;
    if json {
        return Ok(output::json_line(&answer.body));
    }
    let members: MembersAnswer = answer.decode()?;
    Ok(done + &output::members(&members))
}

/// Asks every member for its own status, all at once, each with the request timeout; a member
/// that does not answer still gets a row, with the reason.
async fn cluster_status(client: &Client, json: bool) -> Result<String, CliError> {
    let answer = client.call(&ApiRequest::get("/v1/cluster/members".into())).await?;
    let members: MembersAnswer = answer.decode()?;
    let mut queries = Vec::new();
    for member in &members.members {
        let client = client.clone();
        let addr = member.client_addr.clone().unwrap_or_default();
        queries.push(tokio::spawn(async move { member_status(&client, &addr).await }));
    }
    let mut gathered = Vec::new();
    for (member, query) in members.members.iter().zip(queries) {
        let result = query.await.unwrap_or_else(|e| Err(format!("status query failed: {e}")));
        gathered.push((member.clone(), result));
    }
    if json {
        let rows: Vec<Value> = gathered
            .iter()
            .map(|(m, r)| match r {
                Ok((raw, _)) => json!({"id": m.id, "client_addr": m.client_addr, "status": raw}),
                Err(why) => json!({"id": m.id, "client_addr": m.client_addr, "error": why}),
            })
            .collect();
        return Ok(output::json_line(&json!({"leader": members.leader, "members": rows})));
    }
    let statuses: Vec<MemberStatus> = gathered
        .into_iter()
        .map(|(member, r)| MemberStatus { member, status: r.map(|(_, status)| status) })
        .collect();
    Ok(output::status(members.leader, &statuses))
}

/// One member's `/v1/cluster/status` from its own client address: the raw JSON and its decoding,
/// or the reason it could not be had, phrased for the REACHABLE column.
async fn member_status(client: &Client, addr: &str) -> Result<(Value, StatusAnswer), String> {
    if addr.is_empty() {
        return Err("no client address".to_owned());
    }
    let endpoint = client.endpoint(addr)?;
    let request = ApiRequest::get("/v1/cluster/status".into());
    match client.call_one(&endpoint, &request).await {
        Ok(answer) => {
            let status: StatusAnswer = answer.decode().map_err(|e| e.to_string())?;
            Ok((answer.body, status))
        }
        Err(ClientError::NoEndpoint(attempts)) => {
            Err(attempts.into_iter().map(|a| a.failure.to_string()).collect::<Vec<_>>().join(", "))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere_and_endpoints_split() {
        let cli = Cli::try_parse_from([
            "keel",
            "get",
            "k",
            "--endpoints",
            "127.0.0.1:2379,http://127.0.0.1:22379",
            "--json",
            "--timeout",
            "0.5",
        ])
        .expect("parses");
        let shown: Vec<String> = cli.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["127.0.0.1:2379", "127.0.0.1:22379"]);
        assert!(cli.json);
        assert_eq!(cli.timeout, Duration::from_millis(500));
        assert!(Cli::try_parse_from(["keel", "--endpoints", "ftp://a:1", "get", "k"]).is_err());
        let cli = Cli::try_parse_from([
            "keel",
            "get",
            "k",
            "--endpoints",
            "https://a:1",
            "--cacert",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ])
        .expect("parses");
        assert_eq!(cli.cacert, Some(PathBuf::from("ca.pem")));
        assert_eq!((cli.cert.is_some(), cli.key.is_some()), (true, true));
        assert!(Cli::try_parse_from(["keel", "--timeout", "0", "get", "k"]).is_err());
        assert!(Cli::try_parse_from(["keel", "--timeout", "-1", "get", "k"]).is_err());
        assert!(Cli::try_parse_from(["keel", "--timeout", "NaN", "get", "k"]).is_err());
    }

    #[test]
    fn put_accepts_dash_and_hyphenated_values() {
        let cli = Cli::try_parse_from(["keel", "put", "k", "-5"]).expect("parses");
        assert!(matches!(cli.command, Command::Put { value, .. } if value == "-5"));
    }

    #[test]
    fn lock_takes_the_rest_of_the_line_as_its_command() {
        let command = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").command {
            Command::Lock(l) => {
                (l.ttl, l.command.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>())
            }
            other => panic!("not a lock: {other:?}"),
        };
        assert_eq!(command(&["keel", "lock", "n"]), (10, vec![]));
        assert_eq!(
            command(&["keel", "lock", "n", "--ttl", "3", "--", "ls", "-l"]),
            (3, vec!["ls".into(), "-l".into()])
        );
        // Without `--` too, as etcdctl takes it; flags after the command are the command's.
        assert_eq!(
            command(&["keel", "lock", "n", "sh", "-c", "exit 1", "--ttl", "3"]),
            (10, vec!["sh".into(), "-c".into(), "exit 1".into(), "--ttl".into(), "3".into()])
        );
        assert!(Cli::try_parse_from(["keel", "lock", "n", "--ttl", "0"]).is_err());
        // Keel's own flags before the command are keel's.
        let cli = Cli::try_parse_from(["keel", "lock", "n", "--json", "--", "true"]).expect("parses");
        assert!(cli.json);
        let cli = Cli::try_parse_from(["keel", "lock", "n", "--json"]).expect("parses");
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Lock(l) if l.command.is_empty()));
    }

    #[test]
    fn elect_needs_a_value_unless_it_listens() {
        assert!(Cli::try_parse_from(["keel", "elect", "e", "v"]).is_ok());
        assert!(Cli::try_parse_from(["keel", "elect", "-l", "e"]).is_ok());
        assert!(Cli::try_parse_from(["keel", "elect", "e", "--listen"]).is_ok());
        assert!(Cli::try_parse_from(["keel", "elect", "e"]).is_err());
        assert!(Cli::try_parse_from(["keel", "elect", "-l", "e", "v"]).is_err());
    }

    #[test]
    fn put_takes_a_lease_in_hex_or_decimal_or_keeps_its_own() {
        let lease = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").command {
            Command::Put { lease, ignore_lease, .. } => (lease, ignore_lease),
            other => panic!("not a put: {other:?}"),
        };
        assert_eq!(
            lease(&["keel", "put", "k", "v", "--lease", "694d5765fc71500b"]).0,
            Some(LeaseId(0x694d_5765_fc71_500b))
        );
        assert_eq!(lease(&["keel", "put", "k", "v", "--lease", "42"]).0, Some(LeaseId(42)));
        assert_eq!(lease(&["keel", "put", "k", "v", "--ignore-lease"]), (None, true));
        assert!(Cli::try_parse_from(["keel", "put", "k", "v", "--lease", "2a", "--ignore-lease"]).is_err());
        assert!(Cli::try_parse_from(["keel", "put", "k", "v", "--lease", "nope"]).is_err());
    }

    #[test]
    fn init_members_parse() {
        let m = parse_init_members("1=127.0.0.1:2380@127.0.0.1:2379,2=10.0.0.2:2380@10.0.0.2:2379")
            .expect("parses");
        assert_eq!(
            m.to_json(),
            json!({"members": {
                "1": {"peer_addr": "127.0.0.1:2380", "client_addr": "127.0.0.1:2379"},
                "2": {"peer_addr": "10.0.0.2:2380", "client_addr": "10.0.0.2:2379"}}})
        );
        assert_eq!(
            parse_init_members("1=a:1").expect_err("rejected"),
            "'1=a:1' is not ID=PEER_ADDR@CLIENT_ADDR"
        );
        assert_eq!(
            parse_init_members("x=a:1@b:2").expect_err("rejected"),
            "'x' in 'x=a:1@b:2' is not a node id"
        );
        assert_eq!(
            parse_init_members("1=@b:2").expect_err("rejected"),
            "'1=@b:2' is not ID=PEER_ADDR@CLIENT_ADDR"
        );
        assert_eq!(
            parse_init_members("1=a:1@b:2,1=c:1@d:2").expect_err("rejected"),
            "node id 1 is given twice"
        );
    }
}
