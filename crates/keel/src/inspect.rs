//! Offline inspection of a node's data dir: what its log, state machine and snapshots hold,
//! without starting the node and without changing anything (the only write is the WAL's own lock
//! file, which is how a running node is detected).

use std::path::Path;
use std::path::PathBuf;

use raft_log::DumpApi;
use raft_log::RaftLogAction;
use raft_log::WALRecord;
use redb::ReadTransaction;

use crate::storage::log_store::WalTypes;
use crate::storage::snapshot::SnapshotDir;
use crate::types::LogId;
use crate::types::NodeId;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::Vote;

/// What a data dir holds.
#[derive(Debug, Clone)]
pub struct DataDirReport {
    pub node_id: Option<NodeId>,
    pub vote: Option<Vote>,
    /// The first entry still in the log (after purges), and the last.
    pub log_first_index: Option<u64>,
    pub log_last: Option<LogId>,
    pub committed: Option<LogId>,
    pub purged: Option<LogId>,
    pub log_records: u64,
    pub log_bytes: u64,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub snapshot: Option<(SnapshotMeta, PathBuf)>,
    pub state_bytes: u64,
}

/// Why a data dir could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{0} is not a Keel data dir (no log/ and no state.redb)")]
    NotADataDir(PathBuf),
    #[error("{path} is in use by a running node (stop it first, or use `keel cluster status`): {reason}")]
    InUse { path: PathBuf, reason: String },
    #[error("log {path}: {reason}")]
    Log { path: PathBuf, reason: String },
    #[error("state machine {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Snapshot(#[from] crate::storage::snapshot::SnapshotFileError),
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

/// Inspects `data_dir`; `read` runs on a read transaction of the state machine database (for the
/// application's own figures, e.g. a key count).
pub fn inspect_data_dir<R>(
    data_dir: &Path,
    read: impl FnOnce(&ReadTransaction) -> R,
) -> Result<(DataDirReport, Option<R>), InspectError> {
    let log_dir = data_dir.join("log");
    let state_path = data_dir.join("state.redb");
    if !log_dir.is_dir() && !state_path.is_file() {
        return Err(InspectError::NotADataDir(data_dir.to_path_buf()));
    }
    let mut report = DataDirReport {
        node_id: None,
        vote: None,
        log_first_index: None,
        log_last: None,
        committed: None,
        purged: None,
        log_records: 0,
        log_bytes: dir_bytes(&log_dir),
        last_applied: None,
        membership: StoredMembership::default(),
        snapshot: None,
        state_bytes: std::fs::metadata(&state_path).map_or(0, |m| m.len()),
    };

    if log_dir.is_dir() {
        let log_err = |reason: String| InspectError::Log { path: log_dir.clone(), reason };
        let config = raft_log::Config {
            wal: raft_log::chunked_wal::Config::new(log_dir.display()),
            ..Default::default()
        };
        let dump = raft_log::Dump::<WalTypes>::new(std::sync::Arc::new(config)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                InspectError::InUse { path: log_dir.clone(), reason: e.to_string() }
            } else {
                log_err(e.to_string())
            }
        })?;
        let mut first_appended: Option<u64> = None;
        dump.write_with(|chunk, index, record| {
            let (_, record) = record
                .map_err(|e| std::io::Error::new(e.kind(), format!("chunk {chunk}, record {index}: {e}")))?;
            report.log_records += 1;
            match record {
                WALRecord::Checkpoint(state) => {
                    report.vote = state.vote().map(|v| v.0);
                    report.log_last = state.last().map(|l| l.0);
                    report.committed = state.committed().map(|l| l.0);
                    report.purged = state.purged().map(|l| l.0);
                }
                WALRecord::Action(action) => match action {
                    RaftLogAction::SaveVote(v) => report.vote = Some(v.0),
                    RaftLogAction::Append(id, _) => {
                        first_appended.get_or_insert(id.0.index);
                        report.log_last = Some(id.0);
                    }
                    RaftLogAction::Commit(id) => report.committed = Some(id.0),
                    RaftLogAction::TruncateAfter(id) => report.log_last = id.map(|l| l.0),
                    RaftLogAction::PurgeUpto(id) => {
                        report.purged = Some(id.0);
                        if report.log_last.is_none_or(|l| l.index < id.0.index) {
                            report.log_last = Some(id.0);
                        }
                    }
                },
            }
            Ok(())
        })
        .map_err(|e| log_err(e.to_string()))?;
        report.log_first_index = match (report.purged, report.log_last) {
            (_, None) => None,
            (Some(p), Some(l)) if p.index >= l.index => None,
            (Some(p), Some(_)) => Some(p.index + 1),
            (None, Some(_)) => first_appended.or(Some(0)),
        };
    }

    let mut app = None;
    if state_path.is_file() {
        let state_err = |reason: String| InspectError::State { path: state_path.clone(), reason };
        let db = redb::ReadOnlyDatabase::open(&state_path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                InspectError::InUse { path: state_path.clone(), reason: e.to_string() }
            }
            other => state_err(format!("{other} (a node that crashed recovers it when it starts)")),
        })?;
        let txn = redb::ReadableDatabase::begin_read(&db).map_err(|e| state_err(e.to_string()))?;
        report.node_id = crate::storage::sm_store::node_id_in(&txn).map_err(|e| state_err(e.to_string()))?;
        let applied =
            crate::storage::sm_store::applied_state_in(&txn).map_err(|e| state_err(e.to_string()))?;
        report.last_applied = applied.last_applied;
        report.membership = applied.membership;
        app = Some(read(&txn));
    }
    report.snapshot = SnapshotDir::peek(&data_dir.join("snapshots"))?;
    Ok((report, app))
}
