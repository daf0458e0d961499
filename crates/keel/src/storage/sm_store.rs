//! openraft's `RaftStateMachine` over a user [`StateMachine`] kept in redb, with file snapshots.
//!
//! # Durability contract
//!
//! - Each applied batch is written in a redb write transaction that also records `last_applied`
//!   and the membership: state and position always agree, and a restart resumes from there
//!   without re-applying anything already applied.
//! - That transaction stays open for the batches that follow, and is committed before anything
//!   reads the database (`SmShared::publish`, which `SmShared::begin_read` calls for every read and
//!   snapshot; installs and close call it too), or once it holds `OPEN_MAX_ENTRIES` entries or
//!   `OPEN_MAX_BYTES` of commands. For a batch of one put, beginning and committing a transaction
//!   of its own was over half the cost of applying it.
//! - Commits are fsync'ed every `sync_every_entries` / `sync_interval_ms` and on close; between
//!   syncs the entries are still in the durable log (it is purged only behind a durable snapshot),
//!   so a crash reverts to the last durable commit and openraft re-applies the rest.
//! - Responses to proposers are sent once their batch is applied; any read begun after that sees
//!   it, because it commits the open transaction first.
//! - If applying fails, the open transaction is lost with the batches in it, so the store refuses
//!   every read and apply from then on (openraft stops the node); a restart re-applies from the
//!   log.
//! - A snapshot reads one redb read transaction: a point-in-time view while applies continue.
//! - Installing a snapshot publishes the file first (rename + dir fsync) and then loads it in one
//!   transaction. A crash between the two leaves `last_applied` behind the snapshot, and openraft
//!   restores from the snapshot file on restart.

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::Stream;
use futures_util::TryStreamExt;
use openraft::storage::ApplyResponder;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use redb::MultimapTableHandle;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use redb::TableHandle;

use crate::codec;
use crate::config::StateMachineConfig;
use crate::state_machine::StateMachine;
use crate::state_machine::StateMachineError;
use crate::storage::snapshot::SnapshotDir;
use crate::storage::snapshot::SnapshotFile;
use crate::storage::snapshot::SnapshotFileError;
use crate::storage::snapshot::SnapshotReader;
use crate::storage::snapshot::SnapshotWriter;
use crate::types::Command;
use crate::types::EntryPayload;
use crate::types::KeelTypes;
use crate::types::LogId;
use crate::types::NodeId;
use crate::types::Reply;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;

/// Keel's own bookkeeping table inside the state machine database.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("keel.meta");
const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_NODE_ID: &str = "node_id";

/// The state machine database failed to open or does not belong to this node.
#[derive(Debug, thiserror::Error)]
pub enum SmOpenError {
    #[error("state machine database {path}: {source}")]
    Database { path: PathBuf, source: redb::Error },
    #[error(
        "state machine database {path} belongs to node {found}, but this node is configured as {configured}"
    )]
    WrongNode { path: PathBuf, found: NodeId, configured: NodeId },
    #[error("state machine database {path}: record `{key}` does not decode: {source}")]
    BadMeta { path: PathBuf, key: &'static str, source: io::Error },
    #[error(transparent)]
    Snapshot(#[from] SnapshotFileError),
}

/// What the adapter shares between openraft's state machine worker, snapshot builders and readers.
pub(crate) struct SmShared<SM> {
    pub db: redb::Database,
    pub sm: SM,
    pub snapshots: SnapshotDir,
    sync: std::sync::Mutex<SyncState>,
    /// Declared last, so dropped after `db`: its receiver learns the database is closed.
    pub closed: Option<tokio::sync::oneshot::Sender<()>>,
}

/// When applied state was last made durable, and the batches applied since.
struct SyncState {
    every_entries: u64,
    interval: std::time::Duration,
    last_sync: std::time::Instant,
    /// Entries applied since `last_sync` (held open, or committed without fsync).
    unsynced: u64,
    /// The applied position after the last applied batch (committed or open), once read.
    applied: Option<AppliedState>,
    /// Applied batches not yet committed: readers commit them first ([`SmShared::publish`]).
    open: Option<OpenBatches>,
    /// Why applying failed. The open transaction was lost with the failing batch, so this
    /// database no longer holds everything openraft counts as applied: reads are refused.
    failed: Option<String>,
}

impl SyncState {
    /// Whether the open transaction, once it holds `entries` entries and `bytes` bytes of
    /// commands with `unsynced` entries applied since the last fsync, is committed now: `None` if
    /// it stays open, else whether that commit is fsync'ed.
    fn commit_due(&self, unsynced: u64, entries: u64, bytes: usize) -> Option<bool> {
        let durable = unsynced >= self.every_entries || self.last_sync.elapsed() >= self.interval;
        (durable || entries >= OPEN_MAX_ENTRIES || bytes >= OPEN_MAX_BYTES).then_some(durable)
    }
}

/// A write transaction that holds applied batches, kept open so that the next batch need not
/// begin and commit its own (together over half of an apply's cost for a single put).
struct OpenBatches {
    txn: redb::WriteTransaction,
    entries: u64,
    bytes: usize,
}

/// An open transaction is committed once it holds this many entries...
const OPEN_MAX_ENTRIES: u64 = 1024;
/// ...or this many bytes of commands, whichever comes first; or when anything reads.
const OPEN_MAX_BYTES: usize = 4 << 20;

/// A batch of at most this many entries, whose apply commits nothing, is applied on openraft's
/// state machine task itself rather than on a blocking thread: writing a few rows into the open
/// transaction takes microseconds, and the two thread hand-offs cost more than that at one
/// client. Batches that commit (fsync'ed or not) keep the blocking thread.
const INLINE_MAX_ENTRIES: usize = 8;
/// ...and at most this many bytes of commands.
const INLINE_MAX_BYTES: usize = 64 << 10;

/// The applied position recorded in a state machine database.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

fn read_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &'static str,
) -> io::Result<Option<T>> {
    match table.get(key).map_err(io::Error::other)? {
        Some(v) => codec::from_bytes(v.value()).map(Some),
        None => Ok(None),
    }
}

/// Reads Keel's bookkeeping from any read transaction.
pub fn applied_state_in(txn: &redb::ReadTransaction) -> io::Result<AppliedState> {
    let table = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(AppliedState::default()),
        Err(e) => return Err(io::Error::other(e)),
    };
    applied_state_from(&table)
}

fn applied_state_from(table: &impl ReadableTable<&'static str, &'static [u8]>) -> io::Result<AppliedState> {
    Ok(AppliedState {
        last_applied: read_meta(table, KEY_LAST_APPLIED)?.flatten(),
        membership: read_meta(table, KEY_MEMBERSHIP)?.unwrap_or_default(),
    })
}

/// Records `state` in `txn`: the membership only if it changed (decoding and re-encoding it for
/// every batch cost a put a tenth of its apply).
fn write_last_applied(
    txn: &redb::WriteTransaction,
    state: &AppliedState,
    membership: bool,
) -> Result<(), StateMachineError> {
    if membership {
        return write_meta(txn, state);
    }
    let mut table = txn.open_table(META)?;
    table.insert(KEY_LAST_APPLIED, codec::to_bytes(&state.last_applied)?.as_slice())?;
    Ok(())
}

fn write_meta(txn: &redb::WriteTransaction, state: &AppliedState) -> Result<(), StateMachineError> {
    let mut table = txn.open_table(META)?;
    table.insert(KEY_LAST_APPLIED, codec::to_bytes(&state.last_applied)?.as_slice())?;
    table.insert(KEY_MEMBERSHIP, codec::to_bytes(&state.membership)?.as_slice())?;
    Ok(())
}

impl<SM: StateMachine> SmShared<SM> {
    /// Opens (creating) the database and the snapshot directory under `data_dir`.
    pub fn open(
        data_dir: &Path,
        node_id: NodeId,
        config: &StateMachineConfig,
        sm: SM,
    ) -> Result<Self, SmOpenError> {
        std::fs::create_dir_all(data_dir).map_err(|e| SmOpenError::Database {
            path: data_dir.to_path_buf(),
            source: redb::Error::Io(e),
        })?;
        let path = data_dir.join("state.redb");
        let db_err = |e: redb::Error| SmOpenError::Database { path: path.clone(), source: e };
        let db = redb::Database::builder()
            .set_cache_size(config.cache_bytes as usize)
            .set_check_integrity_on_open(config.verify_on_start)
            .create(&path)
            .map_err(|e| db_err(e.into()))?;

        // Bind the database to this node id on first open; refuse another id afterwards.
        let txn = db.begin_write().map_err(|e| db_err(e.into()))?;
        {
            let mut table = txn.open_table(META).map_err(|e| db_err(e.into()))?;
            let found = read_meta::<NodeId>(&table, KEY_NODE_ID).map_err(|source| SmOpenError::BadMeta {
                path: path.clone(),
                key: KEY_NODE_ID,
                source,
            })?;
            match found {
                Some(found) if found != node_id => {
                    return Err(SmOpenError::WrongNode { path: path.clone(), found, configured: node_id })
                }
                Some(_) => {}
                None => {
                    let id = codec::to_bytes(&node_id).map_err(|e| db_err(redb::Error::Io(e)))?;
                    table.insert(KEY_NODE_ID, id.as_slice()).map_err(|e| db_err(e.into()))?;
                }
            }
        }
        txn.commit().map_err(|e| db_err(e.into()))?;

        let snapshots = SnapshotDir::open(&data_dir.join("snapshots"))?;
        Ok(Self {
            db,
            sm,
            snapshots,
            sync: std::sync::Mutex::new(SyncState {
                every_entries: config.sync_every_entries,
                interval: std::time::Duration::from_millis(config.sync_interval_ms),
                last_sync: std::time::Instant::now(),
                unsynced: 0,
                applied: None,
                open: None,
                failed: None,
            }),
            closed: None,
        })
    }

    /// Commits the applied batches held open, so that a read transaction begun after this sees
    /// every batch applied so far.
    fn publish(&self) -> io::Result<()> {
        let mut sync = self.sync.lock().expect("sync state mutex poisoned by an earlier panic");
        if let Some(why) = &sync.failed {
            return Err(io::Error::other(format!("the state machine failed to apply: {why}")));
        }
        if let Some(open) = sync.open.take() {
            commit(&mut sync, open.txn, false).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// A read transaction that sees every batch applied so far: the only way this module and
    /// [`crate::Node`] begin one.
    pub(crate) fn begin_read(&self) -> io::Result<redb::ReadTransaction> {
        self.publish()?;
        self.db.begin_read().map_err(io::Error::other)
    }

    pub fn applied_state(&self) -> io::Result<AppliedState> {
        applied_state_in(&self.begin_read()?)
    }

    /// Runs `f` on the state machine's write transaction between applied batches, then commits
    /// (without fsync). For housekeeping that no read, apply or snapshot can tell apart from not
    /// having happened (removing rows nothing can see any more): it is not replicated and not in
    /// the log, and a crash before the next durable commit undoes it. Applies wait while `f` runs,
    /// so keep each call short. An error stops the state machine, as a failed apply does.
    pub(crate) fn maintain<R>(
        &self,
        f: impl FnOnce(&SM, &redb::WriteTransaction) -> Result<R, StateMachineError>,
    ) -> Result<R, StateMachineError> {
        let mut sync = self.sync.lock().expect("sync state mutex poisoned by an earlier panic");
        if let Some(why) = &sync.failed {
            return Err(StateMachineError::other(format!("the state machine failed earlier: {why}")));
        }
        let txn = match sync.open.take() {
            Some(open) => open.txn,
            None => {
                let mut txn = self.db.begin_write()?;
                txn.set_durability(redb::Durability::None).map_err(StateMachineError::other)?;
                txn
            }
        };
        match f(&self.sm, &txn) {
            Ok(r) => {
                commit(&mut sync, txn, false)?;
                Ok(r)
            }
            Err(e) => {
                // Dropping `txn` aborts it, and with it any applied batches it held.
                sync.applied = None;
                sync.failed = Some(format!("maintenance failed: {e}"));
                Err(e)
            }
        }
    }

    /// Whether applying a batch of `n_entries` entries holding `n_bytes` of commands would
    /// commit the open transaction (see [`Self::apply_in_open`]).
    fn would_commit(&self, n_entries: u64, n_bytes: usize) -> bool {
        let sync = self.sync.lock().expect("sync state mutex poisoned by an earlier panic");
        let (open_entries, open_bytes) = sync.open.as_ref().map_or((0, 0), |o| (o.entries, o.bytes));
        sync.commit_due(sync.unsynced + n_entries, open_entries + n_entries, open_bytes + n_bytes).is_some()
    }

    /// Applies one batch of committed entries in one transaction; returns the replies in order.
    fn apply_batch(&self, entries: Vec<crate::types::Entry>) -> Result<Vec<Reply>, StateMachineError> {
        let mut sync = self.sync.lock().expect("sync state mutex poisoned by an earlier panic");
        if let Some(why) = &sync.failed {
            return Err(StateMachineError::other(format!("the state machine failed earlier: {why}")));
        }
        let result = self.apply_in_open(&mut sync, entries);
        if let Err(e) = &result {
            // The open transaction was taken and dropped: the batches before this one are gone too.
            sync.failed = Some(e.to_string());
        }
        result
    }

    fn apply_in_open(
        &self,
        sync: &mut SyncState,
        entries: Vec<crate::types::Entry>,
    ) -> Result<Vec<Reply>, StateMachineError> {
        let n_entries = entries.len() as u64;
        let n_bytes = command_bytes(&entries);
        let open = match sync.open.take() {
            Some(open) => open,
            None => {
                let mut txn = self.db.begin_write()?;
                // Made durable at commit time when due; until then the log holds these entries
                // (it is purged only behind a durable snapshot), a crash reverts this database to
                // its last durable commit (state and `last_applied` together) and openraft
                // re-applies the rest from the log.
                txn.set_durability(redb::Durability::None).map_err(StateMachineError::other)?;
                OpenBatches { txn, entries: 0, bytes: 0 }
            }
        };
        let txn = &open.txn;
        let mut state = match sync.applied.take() {
            Some(state) => state,
            None => applied_state_in_write(txn)?,
        };
        let mut membership_changed = false;
        let mut commands = Vec::new();
        // Each entry's reply: `None` where it comes from the user's responses, in order.
        let mut replies: Vec<Option<Reply>> = Vec::with_capacity(entries.len());
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Some(Reply::default())),
                EntryPayload::Normal(Command(bytes)) => match codec::from_bytes(&bytes) {
                    Ok(cmd) => {
                        commands.push(cmd);
                        replies.push(None);
                    }
                    // The leader decodes every command before proposing it, so this is an entry
                    // from an older or a broken leader. Every replica decodes the same bytes the
                    // same way: all refuse it alike, and the replicas stay identical.
                    Err(e) => {
                        tracing::warn!(
                            log_id = %entry.log_id,
                            "log entry holds a command this state machine cannot decode; refused: {e}"
                        );
                        replies.push(Some(Reply::Refused(format!(
                            "log entry {} holds a command this state machine cannot decode: {e}",
                            entry.log_id
                        ))));
                    }
                },
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    membership_changed = true;
                    replies.push(Some(Reply::default()));
                }
            }
        }
        let n_commands = commands.len();
        let responses = if commands.is_empty() { Vec::new() } else { self.sm.apply(txn, commands)? };
        if responses.len() != n_commands {
            return Err(StateMachineError::other(format!(
                "StateMachine::apply returned {} responses for {} commands",
                responses.len(),
                n_commands
            )));
        }
        write_last_applied(txn, &state, membership_changed)?;
        sync.applied = Some(state);
        sync.unsynced += n_entries;
        let open = OpenBatches { entries: open.entries + n_entries, bytes: open.bytes + n_bytes, ..open };
        match sync.commit_due(sync.unsynced, open.entries, open.bytes) {
            Some(durable) => commit(sync, open.txn, durable)?,
            None => sync.open = Some(open),
        }

        let mut responses = responses.into_iter();
        replies
            .into_iter()
            .map(|reply| match reply {
                Some(reply) => Ok(reply),
                None => {
                    let r = responses.next().expect("counted: one response per command");
                    Ok(Reply::Response(codec::to_bytes(&r)?))
                }
            })
            .collect()
    }

    /// Replaces the whole state with a snapshot file's contents, in one transaction.
    pub(crate) fn restore_from(&self, path: &Path, meta: &SnapshotMeta) -> Result<(), StateMachineError> {
        let (_, mut reader) = SnapshotReader::open(path).map_err(io::Error::from)?;
        self.publish()?;
        self.sync.lock().expect("sync state mutex poisoned by an earlier panic").applied = None;
        let txn = self.db.begin_write()?;
        let user_tables: Vec<String> =
            txn.list_tables()?.map(|t| t.name().to_string()).filter(|n| n != META.name()).collect();
        for name in user_tables {
            txn.delete_table(redb::TableDefinition::<&[u8], &[u8]>::new(&name))?;
        }
        let multimaps: Vec<String> = txn.list_multimap_tables()?.map(|t| t.name().to_string()).collect();
        for name in multimaps {
            txn.delete_multimap_table(redb::MultimapTableDefinition::<&[u8], &[u8]>::new(&name))?;
        }
        self.sm.restore(&txn, &mut reader)?;
        // The user may stop reading early; the rest must still verify before we trust the file.
        io::copy(&mut reader, &mut io::sink())?;
        write_meta(
            &txn,
            &AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() },
        )?;
        txn.commit()?;
        Ok(())
    }
}

impl<SM> Drop for SmShared<SM> {
    /// A clean close leaves nothing to re-apply: one last durable commit if anything is unsynced.
    fn drop(&mut self) {
        let Ok(sync) = self.sync.get_mut() else { return };
        if sync.failed.is_some() {
            return; // the open transaction is gone; the log re-applies on restart
        }
        let open = sync.open.take();
        if sync.unsynced == 0 && open.is_none() {
            return;
        }
        let res = match open {
            Some(open) => commit(sync, open.txn, true).map_err(|e| e.to_string()),
            None => self
                .db
                .begin_write()
                .map_err(redb::Error::from)
                .and_then(|txn| txn.commit().map_err(Into::into))
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = res {
            tracing::warn!("final state machine sync failed (the log re-applies on restart): {e}");
        }
    }
}

/// Commits `txn`, fsync'ed if `durable` (and then recorded in `sync`).
fn commit(
    sync: &mut SyncState,
    mut txn: redb::WriteTransaction,
    durable: bool,
) -> Result<(), StateMachineError> {
    if durable {
        txn.set_durability(redb::Durability::Immediate).map_err(StateMachineError::other)?;
    }
    let started = std::time::Instant::now();
    let committed = txn.commit();
    crate::metrics::storage().state_commit_seconds.observe(started.elapsed().as_secs_f64());
    if let Err(e) = committed {
        // The batches in it are gone, although openraft counts them as applied.
        sync.applied = None;
        sync.failed = Some(format!("commit failed: {e}"));
        return Err(e.into());
    }
    if durable {
        sync.unsynced = 0;
        sync.last_sync = std::time::Instant::now();
    }
    Ok(())
}

fn applied_state_in_write(txn: &redb::WriteTransaction) -> Result<AppliedState, StateMachineError> {
    Ok(applied_state_from(&txn.open_table(META)?)?)
}

/// openraft's view of the state machine.
pub struct SmStore<SM> {
    pub(crate) shared: Arc<SmShared<SM>>,
}

impl<SM: StateMachine> SmStore<SM> {
    /// Opens the state machine database and snapshot directory under `data_dir` on their own,
    /// without a Raft node (for storage tests, benchmarks and offline tools).
    pub fn open(
        data_dir: &Path,
        node_id: NodeId,
        config: &StateMachineConfig,
        sm: SM,
    ) -> Result<Self, SmOpenError> {
        Ok(Self { shared: Arc::new(SmShared::open(data_dir, node_id, config, sm)?) })
    }

    /// The applied position recorded in the database.
    pub fn applied(&self) -> io::Result<AppliedState> {
        self.shared.applied_state()
    }

    /// Runs `f` on a read transaction of the current state.
    pub fn read<R>(&self, f: impl FnOnce(&SM, &redb::ReadTransaction) -> R) -> io::Result<R> {
        Ok(f(&self.shared.sm, &self.shared.begin_read()?))
    }
}

impl<SM> Clone for SmStore<SM> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

/// Bytes of user commands in `entries`.
fn command_bytes(entries: &[crate::types::Entry]) -> usize {
    entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(Command(bytes)) => bytes.len(),
            _ => 0,
        })
        .sum()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

impl<SM: StateMachine> RaftStateMachine<KeelTypes> for SmStore<SM> {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder<SM>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let st = self.shared.applied_state()?;
        Ok((st.last_applied, st.membership))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<KeelTypes>, io::Error>> + Unpin + OptionalSend,
    {
        let items: Vec<EntryResponder<KeelTypes>> = entries.try_collect().await?;
        let (entries, responders): (Vec<_>, Vec<Option<ApplyResponder<KeelTypes>>>) =
            items.into_iter().unzip();
        let shared = self.shared.clone();
        let n_bytes = command_bytes(&entries);
        let inline = entries.len() <= INLINE_MAX_ENTRIES
            && n_bytes <= INLINE_MAX_BYTES
            && !shared.would_commit(entries.len() as u64, n_bytes);
        let replies = if inline {
            shared.apply_batch(entries)?
        } else {
            blocking(move || Ok(shared.apply_batch(entries)?)).await?
        };
        for (responder, reply) in responders.into_iter().zip(replies) {
            if let Some(r) = responder {
                r.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // The read transaction is taken here, in the state machine worker, between two applies:
        // the snapshot is exactly the state after the last applied batch.
        let txn = self.shared.begin_read();
        SnapshotBuilder { shared: self.shared.clone(), txn: Some(txn) }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        blocking(move || {
            let SnapshotFile { path, file } = snapshot;
            drop(file);
            let (meta, path) = match shared.snapshots.current() {
                Some((_, current)) if current == path => (meta, path),
                _ => shared.snapshots.publish(&path, &meta)?,
            };
            shared.restore_from(&path, &meta)?;
            tracing::info!(last = ?meta.last_log_id, "installed snapshot");
            Ok(())
        })
        .await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<KeelTypes, SnapshotFile>>, io::Error> {
        match self.shared.snapshots.current() {
            None => Ok(None),
            Some((meta, path)) => Ok(Some(openraft::Snapshot { meta, snapshot: SnapshotFile::open(&path)? })),
        }
    }
}

/// Builds a snapshot from the read transaction taken when openraft asked for it.
pub struct SnapshotBuilder<SM> {
    shared: Arc<SmShared<SM>>,
    txn: Option<io::Result<redb::ReadTransaction>>,
}

impl<SM: StateMachine> RaftSnapshotBuilder<KeelTypes> for SnapshotBuilder<SM> {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<KeelTypes, SnapshotFile>, io::Error> {
        let txn = self.txn.take().ok_or_else(|| io::Error::other("snapshot builder used twice"))??;
        let shared = self.shared.clone();
        blocking(move || {
            let state = applied_state_in(&txn)?;
            let meta = SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership };
            let temp = shared.snapshots.temp_path();
            let result = (|| {
                let mut writer = SnapshotWriter::create(&temp, &meta)?;
                shared.sm.snapshot(&txn, &mut writer)?;
                writer.finish()?;
                Ok::<_, StateMachineError>(())
            })();
            if let Err(e) = result {
                let _ = std::fs::remove_file(&temp);
                return Err(e.into());
            }
            // A snapshot installed meanwhile may be newer; then that one is the answer.
            let (meta, path) = shared.snapshots.publish(&temp, &meta)?;
            tracing::info!(last = ?meta.last_log_id, "built snapshot");
            Ok(openraft::Snapshot { meta, snapshot: SnapshotFile::open(&path)? })
        })
        .await
    }
}

/// Writes the state visible in `txn`, with Keel's record of the log position and membership it
/// is at, to `out` in the snapshot file format (`docs/formats.md`): the bytes a snapshot built
/// from `txn` would hold. `txn` is a point-in-time view, so applies go on meanwhile; called twice
/// on one `txn` it writes the same bytes twice (a backup measures its size first that way).
pub fn export_snapshot<SM: StateMachine, W: io::Write>(
    sm: &SM,
    txn: &redb::ReadTransaction,
    out: W,
) -> Result<(SnapshotMeta, W), StateMachineError> {
    let state = applied_state_in(txn)?;
    let meta = SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership };
    let mut writer = SnapshotWriter::new(out, &meta)?;
    sm.snapshot(txn, &mut writer)?;
    Ok((meta, writer.finish_into()?))
}

/// The node id recorded in a read transaction of the state machine database.
pub(crate) fn node_id_in(txn: &redb::ReadTransaction) -> io::Result<Option<NodeId>> {
    match txn.open_table(META) {
        Ok(t) => read_meta::<NodeId>(&t, KEY_NODE_ID),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// The node id a data dir belongs to, without starting a node: `None` for a data dir no node has
/// used yet. (The node must not be running: this opens the database.)
pub fn stored_node_id(data_dir: &Path) -> Result<Option<NodeId>, SmOpenError> {
    let path = data_dir.join("state.redb");
    if !path.exists() {
        return Ok(None);
    }
    let db_err = |e: redb::Error| SmOpenError::Database { path: path.clone(), source: e };
    let db = redb::Database::open(&path).map_err(|e| db_err(e.into()))?;
    let txn = redb::ReadableDatabase::begin_read(&db).map_err(|e| db_err(e.into()))?;
    let table = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(db_err(e.into())),
    };
    read_meta::<NodeId>(&table, KEY_NODE_ID).map_err(|source| SmOpenError::BadMeta {
        path: path.clone(),
        key: KEY_NODE_ID,
        source,
    })
}
