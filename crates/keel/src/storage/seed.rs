//! Seeding a fresh data dir from a snapshot, as one member of a new cluster: the offline half of
//! restoring a backup (`keel snapshot restore`).
//!
//! # What a seeded data dir holds
//!
//! Every member of the new cluster is seeded from the same snapshot with the same member list,
//! and so holds the same Raft state, which is what lets openraft take them for one cluster:
//!
//! - the snapshot, re-written as this data dir's current snapshot with META
//!   `last_log_id = L` and `last_membership = (L, the new members, all voters)`, where
//!   `L = LogId { leader: (term 0, node 0), index: the source snapshot's last index }`. Term 0 and
//!   node 0 (no node has id 0) sort below every log id a leader of the new cluster writes, as the
//!   entry `Raft::initialize` writes does;
//! - the state machine database loaded from it, with `last_applied = L` and that membership, and
//!   bound to this member's id;
//! - the log purged up to `L` (empty, its purge point at `L`); no vote.
//!
//! A node started on it finds itself initialized (it has a membership and a log position), so it
//! never runs `initialize`; the members elect a leader of term 1 among themselves. The old
//! cluster's log position, vote and membership are not carried over: a seeded member can never
//! join the old cluster by mistake, since its log does not match the old leader's.
//!
//! Seeding writes through the same storage types a running node uses ([`SnapshotWriter`],
//! [`SnapshotDir::publish`], [`SmShared::restore_from`], [`LogStore`]), and is durable on return.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io;
use std::io::Read;
use std::path::Path;
use std::path::PathBuf;

use openraft::vote::RaftLeaderId;

use crate::config::Config;
use crate::state_machine::StateMachine;
use crate::state_machine::StateMachineError;
use crate::storage::log_store::LogOpenError;
use crate::storage::sm_store::SmOpenError;
use crate::storage::sm_store::SmShared;
use crate::storage::snapshot::SnapshotDir;
use crate::storage::snapshot::SnapshotFileError;
use crate::storage::snapshot::SnapshotReader;
use crate::storage::snapshot::SnapshotWriter;
use crate::storage::LogStore;
use crate::types::KeelTypes;
use crate::types::LogId;
use crate::types::Membership;
use crate::types::NodeId;
use crate::types::NodeInfo;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;

/// Why a data dir could not be seeded. The data dir is left as it was found (absent or empty).
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("data dir {0} is not empty: restore writes a fresh data dir (choose a new or empty one)")]
    NotEmpty(PathBuf),
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error("member list: {0}")]
    Members(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotFileError),
    #[error(transparent)]
    Log(#[from] LogOpenError),
    #[error(transparent)]
    StateMachine(#[from] SmOpenError),
    #[error("loading the snapshot into the state machine: {0}")]
    Restore(#[from] StateMachineError),
}

/// What a seeded data dir holds (the same on every member seeded from one snapshot and list).
#[derive(Debug, Clone)]
pub struct Seeded {
    /// The snapshot's new META: its log id and the new membership.
    pub meta: SnapshotMeta,
    /// The source snapshot's META, as it was in the old cluster.
    pub source: SnapshotMeta,
}

/// Refuses a data dir that exists and holds anything; creates it otherwise. Answers whether it
/// existed (empty).
fn fresh_dir(dir: &Path) -> Result<bool, SeedError> {
    let io_err = |source| SeedError::DataDir { path: dir.to_path_buf(), source };
    let existed = match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SeedError::NotEmpty(dir.to_path_buf()));
            }
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(e)),
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    Ok(existed)
}

/// The log id a seeded cluster starts from: term 0, node 0, at `index` (see the module docs).
pub fn seed_log_id(index: u64) -> LogId {
    let leader = openraft::alias::LeaderIdOf::<KeelTypes>::new(0, 0);
    LogId::new(leader.to_committed(), index)
}

/// Seeds `config.data_dir` (absent or empty) as member `config.id` of a new cluster of `members`
/// (all voters), holding the state of the snapshot file read from `input` (`name` names it in
/// errors). The snapshot is verified frame by frame as it is copied; a damaged one fails the seed.
///
/// Blocking: it writes and fsyncs files and waits for the log's flush. Call it from a thread that
/// may block (`spawn_blocking`, `block_in_place`), never on a runtime worker: it would panic there.
pub fn seed_data_dir<SM: StateMachine>(
    config: &Config,
    sm: SM,
    input: impl Read,
    name: &Path,
    members: BTreeMap<NodeId, NodeInfo>,
) -> Result<Seeded, SeedError> {
    if !members.contains_key(&config.id) {
        return Err(SeedError::Members(format!("does not list this member (id {})", config.id)));
    }
    if members.contains_key(&0) {
        return Err(SeedError::Members("0 is not a member id".into()));
    }
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let membership = Membership::new(vec![voters], members).map_err(|e| SeedError::Members(e.to_string()))?;
    let (source, mut reader) = SnapshotReader::new(input, name)?;
    let last = seed_log_id(source.last_log_id.map_or(0, |l| l.index));
    let meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), membership),
    };

    let data_dir = &config.data_dir;
    let existed = fresh_dir(data_dir)?;
    let seeded = write_seed(config, sm, &mut reader, &meta, last);
    if seeded.is_err() {
        // Leave the dir as it was found: nothing half-written for a node to start on.
        let _ = std::fs::remove_dir_all(data_dir);
        if existed {
            let _ = std::fs::create_dir(data_dir);
        }
    }
    seeded?;
    Ok(Seeded { meta, source })
}

/// Writes the snapshot, the state and the log of a seeded data dir (see the module docs).
fn write_seed<SM: StateMachine>(
    config: &Config,
    sm: SM,
    reader: &mut impl Read,
    meta: &SnapshotMeta,
    last: LogId,
) -> Result<(), SeedError> {
    let data_dir = &config.data_dir;
    // The snapshot first, as an install publishes it: a member with a snapshot and no state loads
    // it at start-up anyway.
    let snapshots = SnapshotDir::open(&data_dir.join("snapshots"))?;
    let temp = snapshots.temp_path();
    let io_err = |source| SeedError::DataDir { path: temp.clone(), source };
    let mut writer = SnapshotWriter::create(&temp, meta).map_err(io_err)?;
    io::copy(reader, &mut writer).map_err(|e| match e.downcast::<SnapshotFileError>() {
        Ok(damage) => SeedError::Snapshot(damage),
        Err(e) => io_err(e),
    })?;
    writer.finish().map_err(io_err)?;
    let (_, path) = snapshots.publish(&temp, meta).map_err(io_err)?;
    drop(snapshots);

    let shared = SmShared::open(data_dir, config.id, &config.state_machine, sm)?;
    shared.restore_from(&path, meta)?;
    drop(shared);

    let log = LogStore::open(&data_dir.join("log"), &config.log)?;
    log.purge_blocking(last).map_err(|source| SeedError::DataDir { path: data_dir.join("log"), source })
}
