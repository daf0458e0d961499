//! Node configuration: one TOML file per node, every field defaulted, validated before use.

use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use crate::faults::Faults;
use crate::types::NodeId;

/// Why a configuration was refused. Each variant names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid TOML in {origin}: {source}")]
    Parse { origin: String, source: toml::de::Error },
    #[error("invalid config: `{field}` {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// How a linearizable read confirms that the leader is still the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPolicy {
    /// ReadIndex: one heartbeat round to a quorum per read (batched). Safe under any clock.
    #[default]
    ReadIndex,
    /// Leader lease: no round trip while the lease holds. Assumes bounded clock drift.
    LeaseRead,
}

/// Configuration of one Keel node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id: unique in the cluster, never reused, never zero.
    pub id: NodeId,
    /// Where the log, the state machine and snapshots live.
    pub data_dir: PathBuf,
    /// A name all members share; messages from another cluster are refused.
    pub cluster_name: String,
    pub raft: RaftConfig,
    pub log: LogConfig,
    pub state_machine: StateMachineConfig,
    pub limits: LimitsConfig,
    /// TLS between members (`[peer_tls]`): off unless `cert_file` is set. The node itself does
    /// not listen: whoever serves its peer port passes [`PeerTlsConfig::server`] to
    /// [`crate::network::grpc::serve_tls`], and [`PeerTlsConfig::client`] to
    /// [`crate::network::grpc::GrpcNetwork::with_tls`].
    pub peer_tls: crate::tls::PeerTlsConfig,
    /// Planted bugs for fault tests (debug builds only). Never read from TOML: a test sets it, or
    /// `keeld` from `KEEL_FAULT_INJECTION` (see [`crate::faults`]).
    #[serde(skip)]
    pub faults: Faults,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot once this many entries were applied since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the latest snapshot, so a slightly lagging follower catches
    /// up from the log rather than by a full snapshot.
    pub logs_to_keep_after_snapshot: u64,
    /// Most entries sent in one AppendEntries request.
    pub max_payload_entries: u64,
    pub read_policy: ReadPolicy,
    /// Pre-vote keeps a partitioned node from inflating terms and disrupting the leader on return.
    pub pre_vote: bool,
    /// How long a follower keeps trying to hand a request to the leader (across elections) before
    /// it answers "no leader". 0 turns forwarding off: followers answer `NotLeader` at once.
    pub forward_timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// How long the WAL's flush worker waits for more writes before an fsync. Keel already groups
    /// every append made during an fsync into the next one, so the default is 0: no added latency.
    pub flush_batch_wait_us: u64,
    /// Size at which a WAL chunk file is closed and a new one started.
    pub chunk_max_bytes: u64,
    /// Bytes of recent entries kept in memory for replication and apply.
    pub cache_max_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateMachineConfig {
    /// Walk the whole state machine file and verify every page checksum at start-up.
    pub verify_on_start: bool,
    /// redb page cache, bytes.
    pub cache_bytes: u64,
    /// Make applied state durable (fsync) at least every this many entries...
    pub sync_every_entries: u64,
    /// ...and at least this often. Between syncs, applied batches are committed to the database
    /// without fsync; a crash loses only those, and they are re-applied from the log on restart.
    pub sync_interval_ms: u64,
}

/// Bounds on what a node accepts from clients and peers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest encoded command a node proposes: a larger one is refused before it enters the
    /// log. It also bounds every peer message (an AppendEntries carries at least one entry).
    pub max_command_bytes: u64,
    /// The largest snapshot a node accepts from a leader; a transfer past it is cut off and its
    /// temp file removed. Set it above the state machine's largest expected size.
    pub max_snapshot_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_command_bytes: 8 << 20, max_snapshot_bytes: 8 << 30 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: 1,
            data_dir: PathBuf::from("./keel-data"),
            cluster_name: "keel".to_string(),
            raft: RaftConfig::default(),
            log: LogConfig::default(),
            state_machine: StateMachineConfig::default(),
            limits: LimitsConfig::default(),
            peer_tls: crate::tls::PeerTlsConfig::default(),
            faults: Faults::default(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            // etcd's defaults (--snapshot-count, and the entries it keeps for catching up): at
            // 10k, snapshots of a 100k-key store every few seconds under load tripled put p99.
            snapshot_every: 100_000,
            logs_to_keep_after_snapshot: 5_000,
            max_payload_entries: 512,
            read_policy: ReadPolicy::ReadIndex,
            pre_vote: true,
            forward_timeout_ms: 5_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { flush_batch_wait_us: 0, chunk_max_bytes: 256 << 20, cache_max_bytes: 256 << 20 }
    }
}

impl Default for StateMachineConfig {
    fn default() -> Self {
        Self {
            verify_on_start: true,
            cache_bytes: 256 << 20,
            sync_every_entries: 100_000,
            sync_interval_ms: 60_000,
        }
    }
}

impl Config {
    /// A default configuration for node `id` keeping its data in `data_dir`.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>) -> Self {
        Self { id, data_dir: data_dir.into(), ..Self::default() }
    }

    /// Parses TOML text; `origin` names where it came from in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { origin: origin.to_string(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a TOML file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .expect("Config always serializes: it holds only TOML-representable fields")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.to_string() });
        if self.id == 0 {
            return invalid("id", "must be at least 1 (0 is reserved)");
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty");
        }
        if self.cluster_name.is_empty() {
            return invalid("cluster_name", "must not be empty");
        }
        if let Err(reason) = self.peer_tls.validate() {
            return invalid("peer_tls", &reason);
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return invalid("raft.heartbeat_interval_ms", "must be at least 1");
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return invalid(
                "raft.election_timeout_min_ms",
                &format!(
                    "({}) must exceed raft.heartbeat_interval_ms ({}), or followers time out between heartbeats",
                    r.election_timeout_min_ms, r.heartbeat_interval_ms
                ),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return invalid(
                "raft.election_timeout_max_ms",
                &format!(
                    "({}) must exceed raft.election_timeout_min_ms ({})",
                    r.election_timeout_max_ms, r.election_timeout_min_ms
                ),
            );
        }
        if r.snapshot_every == 0 {
            return invalid("raft.snapshot_every", "must be at least 1");
        }
        if r.max_payload_entries == 0 {
            return invalid("raft.max_payload_entries", "must be at least 1");
        }
        if self.log.flush_batch_wait_us > 100_000 {
            return invalid("log.flush_batch_wait_us", "must be at most 100000 (100 ms)");
        }
        if self.state_machine.sync_every_entries == 0 {
            return invalid("state_machine.sync_every_entries", "must be at least 1");
        }
        if self.log.chunk_max_bytes < 1 << 20 {
            return invalid("log.chunk_max_bytes", "must be at least 1048576 (1 MiB)");
        }
        if self.limits.max_command_bytes < 1024 || self.limits.max_command_bytes > 128 << 20 {
            return invalid(
                "limits.max_command_bytes",
                "must be between 1024 (1 KiB) and 134217728 (128 MiB)",
            );
        }
        if self.limits.max_snapshot_bytes < 1 << 20 {
            return invalid("limits.max_snapshot_bytes", "must be at least 1048576 (1 MiB)");
        }
        Ok(())
    }

    /// The largest peer message this node sends or accepts: one command of the largest size, or
    /// an AppendEntries batch, with room for the framing.
    pub fn max_peer_message_bytes(&self) -> usize {
        let largest = (self.limits.max_command_bytes as usize).max(crate::network::grpc::MAX_APPEND_BYTES);
        largest + (1 << 20)
    }

    /// The openraft configuration this node runs with.
    pub(crate) fn to_openraft(&self) -> Result<openraft::Config, ConfigError> {
        let r = &self.raft;
        let config = openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every),
            max_in_snapshot_log_to_keep: r.logs_to_keep_after_snapshot,
            max_payload_entries: r.max_payload_entries,
            enable_pre_vote: Some(r.pre_vote),
            // A restarted leader stands for election like any node instead of resuming its term.
            // Resuming is unsafe here (openraft says so for a state machine that is not fsync'ed
            // per apply and a commit index saved lazily, both true of Keel), and it breaks Raft
            // even with a perfect state machine: a leader killed before its own fsync loses log
            // entries its followers already hold, then reuses their (term, index) for new entries,
            // and the replicas diverge. Found by keel-chaos kill-all: stale reads right after a
            // restart, and two replicas at the same applied index with different revisions.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        config.validate().map_err(|e| ConfigError::Invalid { field: "raft", reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_is_the_default() {
        let config = Config::from_toml("", "test").expect("empty config is valid");
        assert_eq!(Config::default(), config);
        config.to_openraft().expect("defaults are valid for openraft");
    }

    #[test]
    fn round_trips_through_toml() {
        let mut config = Config::new(7, "/tmp/x");
        config.raft.read_policy = ReadPolicy::LeaseRead;
        let back = Config::from_toml(&config.to_toml(), "test").expect("valid");
        assert_eq!(config, back);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[raft]\nheartbeat_ms = 5\n", "node.toml").expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("node.toml") && msg.contains("heartbeat_ms"), "{msg}");
    }

    #[test]
    fn inconsistent_timeouts_are_refused() {
        let err =
            Config::from_toml("[raft]\nheartbeat_interval_ms = 500\nelection_timeout_min_ms = 400\n", "t")
                .expect_err("must fail");
        assert!(err.to_string().contains("raft.election_timeout_min_ms"), "{err}");
        let err = Config::from_toml("id = 0", "t").expect_err("must fail");
        assert!(err.to_string().contains("`id`"), "{err}");
    }
}
