//! `keeld`'s configuration: a TOML file and command-line flags (every flag is also a TOML key;
//! a flag wins over the file). No flags at all: a single-node cluster with data in `./keel-data`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use keel::config::ConfigError;
use keel::config::LogConfig;
use keel::config::RaftConfig;
use keel::config::StateMachineConfig;
use keel::faults::Faults;
use keel::NodeId;
use serde::Deserialize;
use serde::Serialize;

/// etcd's default request size limit.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
pub const DEFAULT_MAX_KEY_BYTES: usize = 8 * 1024;
/// etcd's default space quota (`--quota-backend-bytes` 0 means this, as in etcd).
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 << 30;
/// Above this etcd warns that the quota exceeds the maximum it recommends; Keel does too.
pub const MAX_RECOMMENDED_QUOTA_BACKEND_BYTES: u64 = 8 << 30;
/// The largest range answer: 64 MiB of keys, values and their metadata. A range over more is
/// refused (read it in pages with `limit`). Peak memory per range is a small multiple of this
/// (the rows read, the encoded answer: docs/etcd-api.md "Limits").
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Open client connections at most: a few thousand clients, well under the usual 64 Ki file
/// descriptor limit of a service (and each idle connection costs ~tens of KiB).
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 4096;
/// A client must send a request's header (a new connection: its first request), and then its
/// body, within 10 s.
pub const DEFAULT_CLIENT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// A connection with no request in flight for 5 minutes is closed.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT_MS: u64 = 300_000;
/// HTTP/2 keep-alive pings after 60 s of silence find dead peers (unanswered in 20 s: closed).
pub const DEFAULT_CLIENT_KEEPALIVE_INTERVAL_MS: u64 = 60_000;
/// Requests open at once on one HTTP/2 connection. etcd sets no bound (math.MaxUint32); 1,000 is
/// far above what one client multiplexes (`keel bench` runs 64 per connection) and bounds what one
/// connection can make this node hold.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Whether a node with an empty data dir founds a cluster or waits to be added to one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ClusterState {
    /// Found the cluster listed in `initial_cluster` (the node with the lowest id initializes it).
    #[default]
    New,
    /// Join an existing cluster: wait until a member adds this node (`member add`, `add-learner`).
    Existing,
}

/// One keeld node's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeeldConfig {
    pub id: NodeId,
    #[serde(alias = "data-dir")]
    pub data_dir: PathBuf,
    #[serde(alias = "cluster-name")]
    pub cluster_name: String,
    /// Where clients connect: etcd v3 gRPC and HTTP/JSON on one address.
    #[serde(alias = "client-addr")]
    pub client_addr: String,
    /// Where peers connect for Raft traffic.
    #[serde(alias = "peer-addr")]
    pub peer_addr: String,
    /// The founding members, `ID=HOST:PORT,...` (peer addresses); empty: a single-node cluster of
    /// this node. Ignored once the data dir holds a cluster.
    #[serde(alias = "initial-cluster")]
    pub initial_cluster: String,
    #[serde(alias = "initial-cluster-state")]
    pub initial_cluster_state: ClusterState,
    /// Client address of any member of an existing cluster to join: this node asks to be added
    /// as a learner (with `id`, or an id the cluster assigns when `id` is 0), catches up, and is
    /// promoted to voter automatically. Ignored once the data dir holds a cluster.
    pub join: String,
    /// On SIGTERM/SIGINT, remove this node from the cluster before stopping.
    #[serde(alias = "leave-on-shutdown")]
    pub leave_on_shutdown: bool,
    /// Largest request a client may send (bytes).
    #[serde(alias = "max-request-bytes")]
    pub max_request_bytes: usize,
    /// Largest key (bytes).
    #[serde(alias = "max-key-bytes")]
    pub max_key_bytes: usize,
    /// Largest snapshot this node accepts from a leader (bytes); a larger transfer is cut off.
    #[serde(alias = "max-snapshot-bytes")]
    pub max_snapshot_bytes: u64,
    /// The space quota on the state machine database file (bytes); 0: etcd's default, 2 GiB. A
    /// write that would take the database to it raises the `NOSPACE` alarm (see docs/etcd-api.md).
    /// Unsigned: etcd's negative "no quota" is refused (a quota is what stops ENOSPC).
    #[serde(alias = "quota-backend-bytes")]
    pub quota_backend_bytes: u64,
    /// Largest range answer (bytes of keys, values and metadata); a range over it is refused.
    #[serde(alias = "max-response-bytes")]
    pub max_response_bytes: usize,
    /// Open client connections at most; more are closed as soon as they are accepted.
    #[serde(alias = "max-client-connections")]
    pub max_client_connections: usize,
    /// A client connection's first request, every HTTP/1 request header, and every request's body
    /// (counted from its header) must arrive within this (milliseconds).
    #[serde(alias = "client-header-timeout-ms")]
    pub client_header_timeout_ms: u64,
    /// A client connection with no request in flight for this long is closed (milliseconds).
    #[serde(alias = "client-idle-timeout-ms")]
    pub client_idle_timeout_ms: u64,
    /// HTTP/2 keep-alive ping interval (milliseconds; 0: no pings).
    #[serde(alias = "client-keepalive-interval-ms")]
    pub client_keepalive_interval_ms: u64,
    /// Requests open at once on one HTTP/2 client connection.
    #[serde(alias = "max-concurrent-streams")]
    pub max_concurrent_streams: u32,
    /// etcd's `--auto-compaction-mode`: `periodic` (retention is a duration) or `revision`
    /// (retention is a number of revisions). See [`crate::compaction`].
    #[serde(alias = "auto-compaction-mode")]
    pub auto_compaction_mode: AutoCompactionMode,
    /// etcd's `--auto-compaction-retention`: `0` (off), a duration (`1h`, `30m`, `90s`; a bare
    /// number is hours) in periodic mode, a number of revisions in revision mode.
    #[serde(alias = "auto-compaction-retention")]
    pub auto_compaction_retention: String,
    /// How often a watch that asked for progress notifications gets one while idle
    /// (milliseconds; etcd's `--experimental-watch-progress-notify-interval`).
    #[serde(alias = "watch-progress-notify-interval-ms")]
    pub watch_progress_notify_interval_ms: u64,
    /// The client port's certificate (PEM; etcd's `--cert-file`). Set: the client port serves TLS
    /// only, gRPC and HTTP/JSON alike. Members also present it when they call each other's client
    /// ports (forwarded lease keep-alives, `--join`), so with `client_cert_auth` it must be valid
    /// for TLS client use too (`keel certs node` makes such certificates).
    #[serde(alias = "cert-file")]
    pub cert_file: PathBuf,
    /// Its private key (PEM; `--key-file`).
    #[serde(alias = "key-file")]
    pub key_file: PathBuf,
    /// The CA that signs client certificates (PEM; `--trusted-ca-file`). Set: clients must present
    /// a certificate it signed (as in etcd, it implies `client_cert_auth`). Members also trust it
    /// for each other's client ports.
    #[serde(alias = "trusted-ca-file")]
    pub trusted_ca_file: PathBuf,
    /// Require client certificates signed by `trusted_ca_file` (`--client-cert-auth`); with auth
    /// on, a request without a token is the user its certificate's CN names.
    #[serde(alias = "client-cert-auth")]
    pub client_cert_auth: bool,
    /// This member's certificate for the peer port (`--peer-cert-file`): presented to peers that
    /// dial it and to peers it dials (valid for TLS server and client use). Set: peer TLS on.
    #[serde(alias = "peer-cert-file")]
    pub peer_cert_file: PathBuf,
    #[serde(alias = "peer-key-file")]
    pub peer_key_file: PathBuf,
    /// The cluster CA (`--peer-trusted-ca-file`); required with peer TLS: a member accepts only
    /// peers whose certificate it signed, and trusts only peers it signed.
    #[serde(alias = "peer-trusted-ca-file")]
    pub peer_trusted_ca_file: PathBuf,
    /// etcd's `--peer-client-cert-auth`: Keel always requires peers' certificates under peer TLS;
    /// accepted for etcd's command lines.
    #[serde(alias = "peer-client-cert-auth")]
    pub peer_client_cert_auth: bool,
    /// Accept only peers whose certificate's subject CN is this (`--peer-cert-allowed-cn`).
    #[serde(alias = "peer-cert-allowed-cn")]
    pub peer_cert_allowed_cn: String,
    /// etcd's `--auth-token`: `simple` (the only kind Keel issues: signed tokens any member
    /// checks, see docs/etcd-api.md "Auth"). `jwt,…` is refused with the reason.
    #[serde(alias = "auth-token")]
    pub auth_token: String,
    /// How long a token from `Authenticate` is good for, in seconds (`--auth-token-ttl`).
    #[serde(alias = "auth-token-ttl")]
    pub auth_token_ttl: u64,
    /// bcrypt's cost for the password hashes this node makes (`--bcrypt-cost`, 4..=31).
    #[serde(alias = "bcrypt-cost")]
    pub bcrypt_cost: u32,
    pub raft: RaftConfig,
    pub log: LogConfig,
    pub state_machine: StateMachineConfig,
    /// Planted bugs for fault tests (debug builds only): never from TOML or flags; `keeld` sets
    /// them from `KEEL_FAULT_INJECTION` (see [`keel::faults`]).
    #[serde(skip)]
    pub faults: Faults,
}

impl Default for KeeldConfig {
    fn default() -> Self {
        let node = keel::Config::default();
        Self {
            id: node.id,
            data_dir: node.data_dir,
            cluster_name: node.cluster_name,
            client_addr: "127.0.0.1:2379".into(),
            peer_addr: "127.0.0.1:2380".into(),
            initial_cluster: String::new(),
            initial_cluster_state: ClusterState::New,
            join: String::new(),
            leave_on_shutdown: false,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_snapshot_bytes: node.limits.max_snapshot_bytes,
            quota_backend_bytes: 0,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            auto_compaction_mode: AutoCompactionMode::Periodic,
            auto_compaction_retention: "0".into(),
            watch_progress_notify_interval_ms: 600_000,
            max_client_connections: DEFAULT_MAX_CLIENT_CONNECTIONS,
            client_header_timeout_ms: DEFAULT_CLIENT_HEADER_TIMEOUT_MS,
            client_idle_timeout_ms: DEFAULT_CLIENT_IDLE_TIMEOUT_MS,
            client_keepalive_interval_ms: DEFAULT_CLIENT_KEEPALIVE_INTERVAL_MS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            trusted_ca_file: PathBuf::new(),
            client_cert_auth: false,
            peer_cert_file: PathBuf::new(),
            peer_key_file: PathBuf::new(),
            peer_trusted_ca_file: PathBuf::new(),
            peer_client_cert_auth: false,
            peer_cert_allowed_cn: String::new(),
            auth_token: "simple".into(),
            auth_token_ttl: crate::api::DEFAULT_AUTH_TOKEN_TTL.as_secs(),
            bcrypt_cost: crate::api::DEFAULT_BCRYPT_COST,
            raft: node.raft,
            log: node.log,
            state_machine: node.state_machine,
            faults: node.faults,
        }
    }
}

/// etcd's `--auto-compaction-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AutoCompactionMode {
    #[default]
    Periodic,
    Revision,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, reason: reason.into() }
}

/// Strips an `http://` or `https://` scheme, as etcd tools write addresses.
pub fn bare_addr(addr: &str) -> &str {
    addr.trim().trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/')
}

impl KeeldConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { origin: origin.into(), source })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The library's node configuration.
    pub fn node_config(&self) -> keel::Config {
        keel::Config {
            id: self.id,
            data_dir: self.data_dir.clone(),
            cluster_name: self.cluster_name.clone(),
            raft: self.raft.clone(),
            log: self.log.clone(),
            state_machine: self.state_machine.clone(),
            limits: keel::config::LimitsConfig {
                // A command encodes no larger than the client request it came from (plus the
                // gRPC framing allowance), so the leader's check never refuses what the client
                // API admitted, and a forwarded command cannot exceed it.
                max_command_bytes: (self.max_request_bytes + crate::etcd::GRPC_OVERHEAD_BYTES) as u64,
                max_snapshot_bytes: self.max_snapshot_bytes,
            },
            peer_tls: keel::tls::PeerTlsConfig {
                cert_file: self.peer_cert_file.clone(),
                key_file: self.peer_key_file.clone(),
                trusted_ca_file: self.peer_trusted_ca_file.clone(),
                client_cert_auth: self.peer_client_cert_auth,
                allowed_cn: self.peer_cert_allowed_cn.clone(),
            },
            faults: self.faults,
        }
    }

    /// The state machine this node runs, with the limits its leader enforces.
    pub fn state_machine(&self) -> crate::store::KvStore {
        let store = crate::store::KvStore::new(crate::limits::Limits { max_key_bytes: self.max_key_bytes });
        #[cfg(debug_assertions)]
        if self.faults.watch_drop_event {
            store.hub().plant_drop_event();
        }
        #[cfg(debug_assertions)]
        if self.faults.lease_early_expiry {
            store.lessor().plant_early_expiry();
        }
        store
    }

    /// The founding members by id → peer address; this node alone when `initial_cluster` is empty.
    pub fn initial_members(&self) -> Result<BTreeMap<NodeId, String>, ConfigError> {
        if self.initial_cluster.trim().is_empty() {
            return Ok([(self.id, self.peer_addr.clone())].into_iter().collect());
        }
        let members = parse_initial_cluster(&self.initial_cluster)?;
        match members.get(&self.id) {
            None => Err(invalid(
                "initial_cluster",
                format!("does not list this node (id {}); every founding node must be in it", self.id),
            )),
            Some(addr) if addr != bare_addr(&self.peer_addr) => Err(invalid(
                "initial_cluster",
                format!("lists node {} at {addr} but --peer-addr is {}", self.id, self.peer_addr),
            )),
            Some(_) => Ok(members),
        }
    }

    /// The space quota in effect: `quota_backend_bytes`, or etcd's default for 0.
    pub fn quota_backend_bytes(&self) -> u64 {
        match self.quota_backend_bytes {
            0 => DEFAULT_QUOTA_BACKEND_BYTES,
            q => q,
        }
    }

    /// The client port's limits.
    pub fn client_limits(&self) -> crate::client_port::Limits {
        use std::time::Duration;
        crate::client_port::Limits {
            max_connections: self.max_client_connections,
            header_timeout: Duration::from_millis(self.client_header_timeout_ms),
            idle_timeout: Duration::from_millis(self.client_idle_timeout_ms),
            keepalive_interval: Some(self.client_keepalive_interval_ms)
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis),
            max_concurrent_streams: self.max_concurrent_streams,
        }
    }

    /// Whether the client port serves TLS.
    pub fn client_tls_enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }

    /// The client port's TLS (`None`: plaintext). Loads the files: a bad one is an error now.
    pub fn client_tls(&self) -> Result<Option<Arc<keel::tls::ServerTls>>, keel::tls::TlsError> {
        if !self.client_tls_enabled() {
            return Ok(None);
        }
        let ca = (!self.trusted_ca_file.as_os_str().is_empty()).then_some(self.trusted_ca_file.as_path());
        keel::tls::ServerTls::new(&self.cert_file, &self.key_file, ca, None, keel::tls::ALPN_H2_AND_HTTP1)
            .map(Some)
    }

    /// How this member calls other members' client ports (forwarded keep-alives, `--join`, the
    /// removal check): `None` when client TLS is off. It trusts `trusted_ca_file` (else the peer
    /// CA) and presents `cert_file`; with neither CA set it cannot verify them: an error.
    pub fn member_client_tls(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Option<Arc<keel::tls::ClientTls>>, keel::tls::TlsError> {
        if !self.client_tls_enabled() {
            return Ok(None);
        }
        let ca = [&self.trusted_ca_file, &self.peer_trusted_ca_file]
            .into_iter()
            .find(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| {
                keel::tls::TlsError::Config(
                    "with client TLS, members call each other's client ports only if they can verify \
                     them: set trusted_ca_file or peer_trusted_ca_file"
                        .into(),
                )
            })?;
        keel::tls::ClientTls::new(ca, Some((&self.cert_file, &self.key_file)), alpn).map(Some)
    }

    /// The scheme of this cluster's client URLs (`https` with client TLS).
    pub fn client_scheme(&self) -> &'static str {
        if self.client_tls_enabled() {
            "https"
        } else {
            "http"
        }
    }

    /// Whether this node joins an existing cluster through `join`.
    pub fn joins(&self) -> bool {
        !self.join.trim().is_empty()
    }

    /// Checks the configuration. `id` 0 means "not chosen yet": allowed only when the data dir
    /// already names the node or `join` lets the cluster assign an id (see `server::Server::start`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut node = self.node_config();
        if node.id == 0 {
            node.id = 1; // checked by whoever fills it in
        }
        node.validate()?;
        if self.joins() && !bare_addr(&self.join).contains(':') {
            return Err(invalid(
                "join",
                format!("{:?} is not the HOST:PORT of a member's client address", self.join),
            ));
        }
        for (field, addr) in [("client_addr", &self.client_addr), ("peer_addr", &self.peer_addr)] {
            if !bare_addr(addr).contains(':') {
                return Err(invalid(field, format!("{addr:?} is not HOST:PORT")));
            }
        }
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if self.client_tls_enabled() != set(&self.key_file) {
            return Err(invalid("cert_file", "cert_file and key_file go together"));
        }
        if !self.client_tls_enabled() && (set(&self.trusted_ca_file) || self.client_cert_auth) {
            return Err(invalid(
                "trusted_ca_file",
                "client certificate checks need client TLS: set cert_file and key_file",
            ));
        }
        if self.client_cert_auth && !set(&self.trusted_ca_file) {
            return Err(invalid(
                "client_cert_auth",
                "needs trusted_ca_file, the CA that signs client certificates",
            ));
        }
        match self.auth_token.split(',').next().unwrap_or_default() {
            "simple" => {}
            "jwt" => {
                return Err(invalid(
                    "auth_token",
                    "Keel issues one kind of token, signed ones any member checks (docs/etcd-api.md, Auth): use simple",
                ))
            }
            other => return Err(invalid("auth_token", format!("{other:?} is not a token kind (simple)"))),
        }
        if self.auth_token_ttl == 0 {
            return Err(invalid("auth_token_ttl", "must be at least 1 second"));
        }
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(invalid(
                "bcrypt_cost",
                "must be between 4 and 31 (bcrypt's range; etcd's default is 10)",
            ));
        }
        if self.max_key_bytes == 0 || self.max_key_bytes > self.max_request_bytes {
            return Err(invalid("max_key_bytes", "must be between 1 and max_request_bytes"));
        }
        if self.max_request_bytes < 1024 || self.max_request_bytes > 64 << 20 {
            return Err(invalid("max_request_bytes", "must be between 1 KiB and 64 MiB"));
        }
        if self.max_response_bytes < 1024 {
            return Err(invalid("max_response_bytes", "must be at least 1 KiB"));
        }
        if self.max_client_connections == 0 {
            return Err(invalid("max_client_connections", "must be at least 1"));
        }
        crate::compaction::AutoCompaction::parse(self.auto_compaction_mode, &self.auto_compaction_retention)
            .map_err(|e| invalid("auto_compaction_retention", e))?;
        if self.watch_progress_notify_interval_ms == 0 {
            return Err(invalid("watch_progress_notify_interval_ms", "must be at least 1"));
        }
        if self.max_concurrent_streams == 0 {
            return Err(invalid("max_concurrent_streams", "must be at least 1"));
        }
        for (field, ms) in [
            ("client_header_timeout_ms", self.client_header_timeout_ms),
            ("client_idle_timeout_ms", self.client_idle_timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(field, "must be at least 1 ms"));
            }
        }
        if self.initial_cluster_state == ClusterState::New && !self.joins() && self.id != 0 {
            self.initial_members()?;
        }
        Ok(())
    }
}

/// Parses `ID=HOST:PORT,...` (the `initial_cluster` syntax; `http://` before an address is
/// dropped) into id → peer address: ids positive, each listed once.
pub fn parse_initial_cluster(list: &str) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut members = BTreeMap::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| invalid("initial_cluster", format!("{part:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id.trim().parse().ok().filter(|&id| id != 0).ok_or_else(|| {
            invalid("initial_cluster", format!("{id:?} is not a node id (a positive integer)"))
        })?;
        let addr = bare_addr(addr);
        if addr.is_empty() || !addr.contains(':') {
            return Err(invalid("initial_cluster", format!("member {id}: {addr:?} is not HOST:PORT")));
        }
        if members.insert(id, addr.to_string()).is_some() {
            return Err(invalid("initial_cluster", format!("member {id} is listed twice")));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_valid_single_node_cluster() {
        let c = KeeldConfig::default();
        c.validate().expect("defaults validate");
        assert_eq!(
            vec![(1, "127.0.0.1:2380".to_string())],
            c.initial_members().expect("members").into_iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn initial_cluster_is_parsed_and_checked() {
        let mut c = KeeldConfig {
            initial_cluster: "1=127.0.0.1:2380, 2=http://127.0.0.1:2480".into(),
            ..Default::default()
        };
        assert_eq!(2, c.initial_members().expect("members").len());
        for bad in
            ["1=127.0.0.1:2380,1=127.0.0.1:2480", "x=1:2", "2=127.0.0.1:2480", "1=nohost", "1=127.0.0.1:9"]
        {
            c.initial_cluster = bad.into();
            let e = c.initial_members().expect_err(bad).to_string();
            assert!(e.contains("initial_cluster"), "{bad}: {e}");
        }
    }

    #[test]
    fn quota_zero_means_etcds_default_and_a_negative_one_is_refused() {
        let c = KeeldConfig::default();
        assert_eq!(2 << 30, c.quota_backend_bytes());
        let c = KeeldConfig::from_toml("quota-backend-bytes = 4096\n", "t").expect("parses");
        assert_eq!(4096, c.quota_backend_bytes());
        let e = KeeldConfig::from_toml("quota_backend_bytes = -1\n", "t").expect_err("negative");
        assert!(e.to_string().contains("quota_backend_bytes"), "{e}");
    }

    #[test]
    fn toml_accepts_flag_spellings_and_refuses_unknown_keys() {
        let c = KeeldConfig::from_toml("id = 3\ndata-dir = \"/x\"\nclient_addr = \"0.0.0.0:1\"\n", "t")
            .expect("parses");
        assert_eq!((3, PathBuf::from("/x")), (c.id, c.data_dir));
        let e = KeeldConfig::from_toml("idd = 3\n", "t").expect_err("unknown key").to_string();
        assert!(e.contains("idd"), "{e}");
        let c = KeeldConfig::from_toml(
            "max-client-connections = 7\nclient_header_timeout_ms = 5\nclient-idle-timeout-ms = 6\n\
             max_concurrent_streams = 8\nmax-response-bytes = 4096\nclient_keepalive_interval_ms = 0\n",
            "t",
        )
        .expect("parses");
        let limits = c.client_limits();
        assert_eq!(
            (7, 8, None),
            (limits.max_connections, limits.max_concurrent_streams, limits.keepalive_interval)
        );
        assert_eq!((5, 6), (limits.header_timeout.as_millis(), limits.idle_timeout.as_millis()));
        assert_eq!(4096, c.max_response_bytes);
        let zero = KeeldConfig { max_client_connections: 0, ..Default::default() };
        let e = zero.validate().expect_err("no connections").to_string();
        assert!(e.contains("max_client_connections"), "{e}");
    }
}
