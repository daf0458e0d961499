//! keeld: a Keel KV node. Parses flags and the TOML config, then runs until SIGINT/SIGTERM.
//!
//! `keeld` with no flags runs a single-node cluster with data in `./keel-data`, clients on
//! 127.0.0.1:2379 (etcd v3 gRPC and HTTP/JSON) and peers on 127.0.0.1:2380.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keel_kv::config::ClusterState;
use keel_kv::config::KeeldConfig;

/// A put allocates and frees dozens of small buffers on several threads (HTTP/2 frames, protobuf
/// messages, log entries, redb pages). On a leader at 64 clients glibc's malloc/free were ~15 % of
/// CPU samples, mimalloc's are ~7 % (`perf record`, bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Keel node: a replicated key-value store with an etcd v3-compatible API.
///
/// Every flag is also a key of the TOML file given with --config (e.g. `data_dir = "..."`);
/// a flag overrides the file.
#[derive(Parser, Debug)]
#[command(name = "keeld", version)]
struct Flags {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's id: a positive integer, unique in the cluster and never reused. Default: the
    /// id the data dir belongs to; for a new node 1, or one the cluster assigns with --join.
    #[arg(long)]
    id: Option<u64>,
    /// Where the node keeps its log, state and snapshots [default: ./keel-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address for clients: etcd v3 gRPC and HTTP/JSON [default: 127.0.0.1:2379].
    #[arg(long, value_name = "HOST:PORT")]
    client_addr: Option<String>,
    /// Address for Raft traffic from peers [default: 127.0.0.1:2380].
    #[arg(long, value_name = "HOST:PORT")]
    peer_addr: Option<String>,
    /// Founding members, `1=HOST:PORT,2=HOST:PORT,...` (peer addresses); give every founding node
    /// the same list. Ignored when the data dir already holds a cluster.
    #[arg(long, value_name = "ID=HOST:PORT,...")]
    initial_cluster: Option<String>,
    /// `new`: found the cluster in --initial-cluster; `existing`: wait to be added by a member.
    #[arg(long, value_enum)]
    initial_cluster_state: Option<ClusterState>,
    /// Join an existing cluster through any member's client address (HOST:PORT): this node is
    /// added as a learner, catches up and is promoted to voter. Without --id the cluster assigns one.
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// On SIGTERM/SIGINT, remove this node from the cluster before stopping.
    #[arg(long)]
    leave_on_shutdown: bool,
    /// A name shared by all members; messages from another cluster are refused [default: keel].
    #[arg(long)]
    cluster_name: Option<String>,
    /// Largest client request in bytes [default: 1572864].
    #[arg(long)]
    max_request_bytes: Option<usize>,
    /// Largest key in bytes [default: 8192].
    #[arg(long)]
    max_key_bytes: Option<usize>,
    /// Largest snapshot accepted from a leader, in bytes [default: 8589934592 (8 GiB)].
    #[arg(long)]
    max_snapshot_bytes: Option<u64>,
    /// Space quota of the state machine database in bytes; a write that would take it there
    /// raises the NOSPACE alarm and is refused (etcd's). 0: the default [default: 2147483648].
    #[arg(long, value_name = "BYTES")]
    quota_backend_bytes: Option<u64>,
    /// Largest range answer in bytes (keys, values, metadata); a range over it is refused and
    /// must be read in pages with `limit` [default: 67108864].
    #[arg(long)]
    max_response_bytes: Option<usize>,
    /// Open client connections at most; more are closed at once [default: 4096].
    #[arg(long)]
    max_client_connections: Option<usize>,
    /// A client connection's first request, every HTTP/1 request header, and every request's
    /// body (from its header) must arrive within this many milliseconds [default: 10000].
    #[arg(long, value_name = "MS")]
    client_header_timeout_ms: Option<u64>,
    /// A client connection with no request in flight for this many milliseconds is closed
    /// [default: 300000].
    #[arg(long, value_name = "MS")]
    client_idle_timeout_ms: Option<u64>,
    /// HTTP/2 keep-alive ping interval in milliseconds; 0 disables [default: 60000].
    #[arg(long, value_name = "MS")]
    client_keepalive_interval_ms: Option<u64>,
    /// Requests open at once on one HTTP/2 client connection [default: 1000].
    #[arg(long)]
    max_concurrent_streams: Option<u32>,
    /// Automatic compaction: `periodic` (keep a duration of history) or `revision` (keep a number
    /// of revisions), as etcd [default: periodic].
    #[arg(long, value_enum)]
    auto_compaction_mode: Option<keel_kv::config::AutoCompactionMode>,
    /// History automatic compaction keeps: `0` (off), a duration in periodic mode (`1h`, `30m`;
    /// a bare number is hours), a number of revisions in revision mode [default: 0].
    #[arg(long, value_name = "RETENTION")]
    auto_compaction_retention: Option<String>,
    /// How often an idle watch that asked for progress notifications gets one, in milliseconds
    /// (etcd's --experimental-watch-progress-notify-interval) [default: 600000].
    #[arg(long, value_name = "MS")]
    watch_progress_notify_interval_ms: Option<u64>,
    /// TLS certificate of the client port (PEM): the port then serves TLS only, gRPC and
    /// HTTP/JSON alike. Use one valid for TLS client use too (members present it to each other).
    #[arg(long, value_name = "FILE", help_heading = "TLS (etcd's flags)")]
    cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", help_heading = "TLS (etcd's flags)")]
    key_file: Option<PathBuf>,
    /// CA that signs client certificates (PEM): clients must present one it signed.
    #[arg(long, value_name = "FILE", help_heading = "TLS (etcd's flags)")]
    trusted_ca_file: Option<PathBuf>,
    /// Require client certificates (needs --trusted-ca-file); with auth on, a request without a
    /// token is the user the certificate's CN names.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "TLS (etcd's flags)")]
    client_cert_auth: Option<bool>,
    /// This member's certificate for the peer port (PEM), presented to peers both ways: peer TLS on.
    #[arg(long, value_name = "FILE", help_heading = "TLS (etcd's flags)")]
    peer_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", help_heading = "TLS (etcd's flags)")]
    peer_key_file: Option<PathBuf>,
    /// The cluster CA (PEM): only peers with a certificate it signed are accepted and trusted.
    #[arg(long, value_name = "FILE", help_heading = "TLS (etcd's flags)")]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Accepted for etcd's command lines: peer TLS always requires the peers' certificates.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "TLS (etcd's flags)")]
    peer_client_cert_auth: Option<bool>,
    /// Accept only peers whose certificate's subject CN is this.
    #[arg(long, value_name = "CN", help_heading = "TLS (etcd's flags)")]
    peer_cert_allowed_cn: Option<String>,
    /// Token kind: `simple` (signed tokens every member checks) [default: simple].
    #[arg(long, value_name = "KIND", help_heading = "Auth (etcd's flags)")]
    auth_token: Option<String>,
    /// Seconds a token from Authenticate stays good [default: 300].
    #[arg(long, value_name = "SECONDS", help_heading = "Auth (etcd's flags)")]
    auth_token_ttl: Option<u64>,
    /// bcrypt cost of the password hashes this node makes [default: 10].
    #[arg(long, value_name = "COST", help_heading = "Auth (etcd's flags)")]
    bcrypt_cost: Option<u32>,
}

fn config(flags: Flags) -> Result<KeeldConfig, keel::config::ConfigError> {
    let (mut c, file_sets_id) = match &flags.config {
        Some(path) => {
            let c = KeeldConfig::load(path)?;
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let sets_id = text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("id"));
            (c, sets_id)
        }
        None => (KeeldConfig::default(), false),
    };
    if flags.leave_on_shutdown {
        c.leave_on_shutdown = true;
    }
    if flags.id == Some(0) || (file_sets_id && c.id == 0) {
        return Err(keel::config::ConfigError::Invalid {
            field: "id",
            reason: "must be a positive integer".into(),
        });
    }
    // No id given: the data dir's own id, else one the cluster assigns (--join), else 1.
    if flags.id.is_none() && !file_sets_id {
        c.id = 0;
    }
    macro_rules! set {
        ($($f:ident),*) => {$( if let Some(v) = flags.$f { c.$f = v; } )*};
    }
    set!(id, data_dir, client_addr, peer_addr, initial_cluster, initial_cluster_state, cluster_name, join);
    set!(max_request_bytes, max_key_bytes, max_snapshot_bytes, quota_backend_bytes);
    set!(max_response_bytes, max_client_connections);
    set!(
        client_header_timeout_ms,
        client_idle_timeout_ms,
        client_keepalive_interval_ms,
        max_concurrent_streams,
        auto_compaction_mode,
        auto_compaction_retention,
        watch_progress_notify_interval_ms
    );
    set!(cert_file, key_file, trusted_ca_file, client_cert_auth);
    set!(peer_cert_file, peer_key_file, peer_trusted_ca_file, peer_client_cert_auth, peer_cert_allowed_cn);
    set!(auth_token, auth_token_ttl, bcrypt_cost);
    c.validate()?;
    Ok(c)
}

/// Installs the SIGTERM/SIGINT handlers now (the default action would kill keeld mid-start) and
/// returns what completes when one arrives. Must be called inside the runtime.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::signal;
    use tokio::signal::unix::SignalKind;
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stop keeld with SIGKILL");
            return std::future::pending().await;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received");
    }
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rustls warns once per TLS connection whose client names an IP address as the
                // server name (node.js does): a log line per connection, nothing to act on.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,openraft=warn,rustls::msgs::handshake=error")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = match config(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keeld: {e}");
            return ExitCode::from(2);
        }
    };
    // Test-only planted bugs (debug builds); a release build refuses the variable outright.
    config.faults = match keel::faults::Faults::from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("keeld: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keeld: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { keel_kv::server::run(config, shutdown_signal()).await }) {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e @ (keel_kv::server::RunError::Config(_) | keel_kv::server::RunError::Tls(_))) => {
            eprintln!("keeld: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("keeld: {e}");
            ExitCode::FAILURE
        }
    }
}
