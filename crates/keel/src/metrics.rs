//! Timings of the node's storage, as Prometheus histograms ([`prometheus_client`]), for the
//! program embedding Keel to register in its own registry (keeld exposes them under etcd's
//! names: `etcd_disk_wal_fsync_duration_seconds`, `etcd_disk_backend_commit_duration_seconds`).
//!
//! They are process-wide: a process that runs several nodes (tests do) sees their sum.

use std::sync::OnceLock;

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
