//! Timings of the node's storage and of its peers, as Prometheus histograms
//! ([`prometheus_client`]), for the program embedding Keel to register in its own registry
//! (keeld exposes them under etcd's names: `etcd_disk_wal_fsync_duration_seconds`,
//! `etcd_disk_backend_commit_duration_seconds`, `etcd_network_peer_round_trip_time_seconds`).
//!
//! They are process-wide: a process that runs several nodes (tests do) sees their sum.

use std::sync::OnceLock;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::histogram::Histogram;

/// What the storage layer times.
#[derive(Clone, Debug)]
pub struct StorageMetrics {
    /// Each group flush of the Raft log, from its issue to its fsync's completion (what etcd
    /// times as the WAL fsync).
    pub log_flush_seconds: Histogram,
    /// Each commit of the state machine's write transaction (redb), fsync'ed or not (what etcd
    /// times as the backend commit).
    pub state_commit_seconds: Histogram,
}

/// The process's storage timings.
pub fn storage() -> &'static StorageMetrics {
    static METRICS: OnceLock<StorageMetrics> = OnceLock::new();
    // etcd's buckets for both: 1 ms to 8 s, doubling.
    METRICS.get_or_init(|| StorageMetrics {
        log_flush_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        state_commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
    })
}

/// A peer's label: `To`, its node id in lowercase hex (etcd's label, with its member id there).
pub type PeerLabel = Vec<(&'static str, String)>;

/// What the gRPC transport times.
#[derive(Clone, Debug)]
pub struct NetworkMetrics {
    /// Each heartbeat (an AppendEntries without entries) the leader sends, from its send to its
    /// answer, per peer: the network's round trip plus the peer's handling of a message that
    /// touches no disk (etcd times a probe message the same way).
    pub peer_round_trip_seconds: Family<PeerLabel, Histogram>,
}

impl NetworkMetrics {
    /// The histogram of `peer`'s round trips.
    pub fn peer(&self, peer: crate::NodeId) -> Histogram {
        self.peer_round_trip_seconds.get_or_create(&vec![("To", format!("{peer:x}"))]).clone()
    }
}

/// The process's transport timings.
pub fn network() -> &'static NetworkMetrics {
    static METRICS: OnceLock<NetworkMetrics> = OnceLock::new();
    fn buckets() -> Histogram {
        // etcd's: 100 µs to 3.3 s, doubling.
        Histogram::new(exponential_buckets(0.0001, 2.0, 16))
    }
    METRICS.get_or_init(|| NetworkMetrics {
        peer_round_trip_seconds: Family::new_with_constructor(buckets as fn() -> Histogram),
    })
}
