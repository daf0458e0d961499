//! Backups: the point-in-time snapshot `Maintenance.Snapshot` streams (`etcdctl snapshot save`,
//! `keel snapshot save`), and reading such a file back (`keel snapshot status|restore`).
//!
//! # The backup file (`docs/formats.md`, Backup files)
//!
//! ```text
//! payload: a bbolt database in etcd 3.4's layout (crate::bbolt, crate::etcd_db)
//! trailer: SHA-256 of the payload                                             32 bytes
//! ```
//!
//! This is the file etcd streams, so etcd's tools read Keel's backups (`etcdctl snapshot status`,
//! `etcdctl snapshot restore`: a way from Keel to etcd) and Keel restores etcd's (a way from etcd
//! to Keel). The stream carries the payload in chunks whose `remaining_bytes` counts down to 0,
//! then one more chunk holding the SHA-256 (with `remaining_bytes` 0), so that a client that
//! writes every blob in order writes the file above.
//!
//! Keel's own snapshot format (magic `KEELSNAP`, padded to 512 bytes, then the SHA-256), which
//! `Maintenance.Snapshot` streamed before, is still read: [`check`] tells the two apart by their
//! first bytes.
//!
//! # Point in time, bounded memory
//!
//! The database is written from one redb read transaction (applies go on meanwhile) on a blocking
//! thread, twice: once into nothing, to learn its layout (its meta pages come first and name its
//! root page and page count; etcd announces the total in the first chunk), once to send it.
//! Chunks go through a channel of [`CHANNEL_CHUNKS`]: a slow client holds the thread, never more
//! memory. A client that goes away ends the read.

use std::fs::File;
use std::io;
use std::io::Read;
use std::io::Seek;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use keel::storage::snapshot::SnapshotFileError;
use keel::storage::snapshot::SnapshotReader;
use keel::types::SnapshotMeta;
use keel::Node;
use tokio::sync::mpsc;

use crate::store::KvStore;
use crate::store::SnapshotSummary;

/// Bytes of the SHA-256 trailer.
pub const TRAILER_BYTES: u64 = 32;
/// Payload bytes per streamed chunk (etcd sends 32 KiB).
pub const CHUNK_BYTES: usize = 64 * 1024;
/// The payload's size is a multiple of this (see the module docs).
pub const PAD_TO: u64 = 512;
/// Snapshots streamed at once by this process; one more is refused ([`StreamError::Busy`]). Each
/// holds a blocking thread and a read transaction (which keeps the pages it sees from reuse).
pub const MAX_SNAPSHOTS: usize = 2;
static SNAPSHOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_SNAPSHOTS);
/// Chunks in flight between the reading thread and the client's stream.
const CHANNEL_CHUNKS: usize = 4;
/// The payload's first bytes: a Keel snapshot file's magic.
const MAGIC: &[u8; 8] = b"KEELSNAP";

/// One message of the snapshot stream: payload bytes with the count still to come, or (last) the
/// SHA-256 of the payload with `remaining_bytes` 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The revision the snapshot holds (the same on every chunk).
    pub revision: i64,
    pub remaining_bytes: u64,
    pub blob: Vec<u8>,
}

/// Why the snapshot stream stopped before its trailer.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the state for the snapshot: {0}")]
    Read(String),
    #[error("the snapshot's two reads of one transaction differ ({counted} bytes counted, {sent} sent)")]
    SizeChanged { counted: u64, sent: u64 },
    #[error("{MAX_SNAPSHOTS} snapshots are being sent by this member already; try again later")]
    Busy,
}

/// Starts streaming a snapshot of `node`'s applied state (serializable: what this member has
/// applied, as etcd's is). The receiver yields the chunks, then the trailer, or an error.
pub fn stream(node: Arc<Node<KvStore>>) -> mpsc::Receiver<Result<Chunk, StreamError>> {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let Ok(permit) = SNAPSHOTS.try_acquire() else {
        // The channel has room for this one message.
        let _ = tx.try_send(Err(StreamError::Busy));
        return rx;
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let result = node.read_local(|_, txn| {
            let (layout, _) = crate::etcd_db::write_db(txn, io::sink(), None)?;
            let revision = crate::store::revision(txn)?;
            let sender = ChunkSender {
                tx: tx.clone(),
                revision,
                hash: ring::digest::Context::new(&ring::digest::SHA256),
                buf: Vec::with_capacity(CHUNK_BYTES),
                total: layout.bytes(),
                sent: 0,
            };
            let (_, sender) = crate::etcd_db::write_db(txn, sender, Some(layout))?;
            Ok::<_, crate::etcd_db::ExportError>(sender)
        });
        let sender = match result.map_err(|e| StreamError::Read(e.to_string())).and_then(|r| {
            r.map_err(|e| match e {
                crate::etcd_db::ExportError::Write(crate::bbolt::WriteError::LayoutChanged {
                    expected,
                    got,
                }) => StreamError::SizeChanged { counted: expected.bytes(), sent: got.bytes() },
                e => StreamError::Read(e.to_string()),
            })
        }) {
            Ok(sender) => sender,
            // The client went away: nobody to tell.
            Err(_) if tx.is_closed() => return,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        if let Err(e) = sender.finish() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Cuts what is written to it into chunks, hashes them and sends them (blocking while the
/// channel is full).
struct ChunkSender {
    tx: mpsc::Sender<Result<Chunk, StreamError>>,
    revision: i64,
    hash: ring::digest::Context,
    buf: Vec<u8>,
    /// The payload's size, counted by the first pass.
    total: u64,
    sent: u64,
}

impl ChunkSender {
    fn send_buf(&mut self) -> io::Result<()> {
        let blob = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.sent += blob.len() as u64;
        if self.sent > self.total {
            // Reported by `finish`'s check; nothing more may go out as payload.
            return Err(io::Error::other(format!("more than the {} bytes counted", self.total)));
        }
        self.hash.update(&blob);
        let chunk = Chunk { revision: self.revision, remaining_bytes: self.total - self.sent, blob };
        self.tx.blocking_send(Ok(chunk)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    /// Sends what is left, then the SHA-256 trailer.
    fn finish(mut self) -> Result<(), StreamError> {
        let unsent = self.buf.len() as u64;
        if self.sent + unsent != self.total {
            return Err(StreamError::SizeChanged { counted: self.total, sent: self.sent + unsent });
        }
        if !self.buf.is_empty() && self.send_buf().is_err() {
            return Ok(()); // the client went away
        }
        let sha = self.hash.finish().as_ref().to_vec();
        let _ = self.tx.blocking_send(Ok(Chunk { revision: self.revision, remaining_bytes: 0, blob: sha }));
        Ok(())
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = (CHUNK_BYTES - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading a backup file

/// Why a backup file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackupFileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is {len} bytes, too short for a snapshot (truncated?)")]
    TooShort { path: PathBuf, len: u64 },
    #[error("{path} is neither an etcd snapshot (a bbolt database) nor a Keel snapshot (\"KEELSNAP\")")]
    Unknown { path: PathBuf },
    #[error(
        "{path}: SHA-256 mismatch: the file is corrupt or truncated (its last 32 bytes are {stored}, \
         the bytes before them hash to {computed}); restoring it anyway: --skip-hash-check"
    )]
    HashMismatch { path: PathBuf, stored: String, computed: String },
    #[error(
        "{path} has no SHA-256 trailer (a database file copied from a data dir, or truncated); \
         restoring it anyway: --skip-hash-check"
    )]
    NoTrailer { path: PathBuf },
    #[error("{path} is not a sound bbolt database: {source}")]
    Bbolt { path: PathBuf, source: crate::bbolt::ReadError },
    #[error("{path}: etcd's data does not load: {source}")]
    Etcd { path: PathBuf, source: crate::etcd_db::ImportError },
    #[error("{path}: loading it into a scratch database {scratch}: {reason}")]
    Scratch { path: PathBuf, scratch: PathBuf, reason: String },
    #[error("{0}")]
    Damaged(#[from] SnapshotFileError),
    #[error("{path}: the state machine data does not read back: {reason}")]
    Contents { path: PathBuf, reason: String },
}

/// What a backup file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// etcd's: a bbolt database (what Keel and etcd stream).
    Etcd,
    /// Keel's own snapshot file (what Keel streamed before it streamed etcd's).
    Keel,
}

/// How a backup file's hash was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashCheck {
    /// The trailer is the SHA-256 of the payload.
    Ok,
    /// Not checked (`--skip-hash-check`); the file has a 32-byte trailer after its payload.
    SkippedWithTrailer,
    /// Not checked (`--skip-hash-check`); the file is a bare database or snapshot (e.g. copied
    /// from a data dir), with no trailer.
    SkippedNoTrailer,
}

/// A backup file whose hash (unless skipped) and structure verified.
#[derive(Debug, Clone)]
pub struct BackupFile {
    pub path: PathBuf,
    pub format: Format,
    /// The whole file's size.
    pub size: u64,
    /// Bytes of the payload (without the trailer).
    pub payload_bytes: u64,
    pub hash: HashCheck,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
    /// The source cluster's Raft index (etcd's `consistent_index`).
    pub raft_index: u64,
    /// The source cluster's member ids.
    pub members: Vec<u64>,
    pub summary: SnapshotSummary,
    /// A Keel snapshot: bytes of the snapshot in it (without padding and trailer).
    snapshot_bytes: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the first `len` bytes of `file`, read in bounded pieces.
fn sha256_of(file: &mut File, len: u64) -> io::Result<Vec<u8>> {
    file.rewind()?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut input = Read::take(&mut *file, len);
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().to_vec())
}

/// Opens `path` as a backup file: tells its format by its first bytes, checks its SHA-256 trailer
/// (unless `skip_hash`) and its structure, and reads what it holds. An etcd database is checked as
/// bbolt's `tx.Check()` does and loaded into a scratch database under the system's temporary
/// directory (removed before this returns), which is what counts its contents.
pub fn check(path: &Path, skip_hash: bool) -> Result<BackupFile, BackupFileError> {
    let scratch =
        std::env::temp_dir().join(format!("keel-snapshot-status-{}-{}", std::process::id(), nanos()));
    let result = open(path, skip_hash, &scratch).map(|(b, _)| b);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// What [`restore_input`] hands the restore: the backup and a Keel snapshot file's bytes.
pub type RestoreInput = (BackupFile, Box<dyn Read + Send>);

/// Opens `path` for restoring: [`check`]s it, and answers the Keel snapshot to seed a data dir
/// from (`keel::storage::seed`). An etcd database is converted into one in `scratch` (a directory
/// this creates; the caller removes it once the input is read).
pub fn restore_input(path: &Path, skip_hash: bool, scratch: &Path) -> Result<RestoreInput, BackupFileError> {
    let (backup, converted) = open(path, skip_hash, scratch)?;
    let io_err = |source| BackupFileError::Io { path: path.to_path_buf(), source };
    let input: Box<dyn Read + Send> = match converted {
        Some(snapshot) => {
            Box::new(io::BufReader::with_capacity(256 * 1024, File::open(snapshot).map_err(io_err)?))
        }
        None => {
            let file = File::open(path).map_err(io_err)?;
            Box::new(io::BufReader::with_capacity(256 * 1024, file.take(backup.snapshot_bytes)))
        }
    };
    Ok((backup, input))
}

/// Opens and verifies `path`; for an etcd database, also answers the Keel snapshot it was
/// converted into in `scratch`.
fn open(
    path: &Path,
    skip_hash: bool,
    scratch: &Path,
) -> Result<(BackupFile, Option<PathBuf>), BackupFileError> {
    let io_err = |source| BackupFileError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let mut head = Vec::with_capacity(20);
    Read::take(&mut file, 20).read_to_end(&mut head).map_err(io_err)?;
    // bbolt's first page: a 16-byte page header, then the meta page's magic.
    if head.len() == 20 && head[16..20] == crate::bbolt::MAGIC.to_le_bytes() {
        return open_etcd(path, file, size, skip_hash, scratch);
    }
    if !head.starts_with(MAGIC) {
        return Err(BackupFileError::Unknown { path: path.to_path_buf() });
    }
    open_keel(path, file, size, skip_hash).map(|b| (b, None))
}

/// Reads the SHA-256 trailer that follows the payload and compares it with `sha`, the payload's.
fn check_trailer(file: &mut File, path: &Path, sha: &[u8]) -> Result<(), BackupFileError> {
    let mut stored = [0u8; TRAILER_BYTES as usize];
    file.read_exact(&mut stored)
        .map_err(|source| BackupFileError::Io { path: path.to_path_buf(), source })?;
    if stored[..] != sha[..] {
        return Err(BackupFileError::HashMismatch {
            path: path.to_path_buf(),
            stored: hex(&stored),
            computed: hex(sha),
        });
    }
    Ok(())
}

/// An etcd database: a trailer when its size is a multiple of 512 plus 32 (etcd's own rule).
fn open_etcd(
    path: &Path,
    mut file: File,
    size: u64,
    skip_hash: bool,
    scratch: &Path,
) -> Result<(BackupFile, Option<PathBuf>), BackupFileError> {
    let io_err = |source| BackupFileError::Io { path: path.to_path_buf(), source };
    let has_trailer = size % PAD_TO == TRAILER_BYTES;
    let payload = if has_trailer { size - TRAILER_BYTES } else { size };
    let sha = sha256_of(&mut file, payload).map_err(io_err)?;
    let hash = match (has_trailer, skip_hash) {
        (true, false) => {
            check_trailer(&mut file, path, &sha)?;
            HashCheck::Ok
        }
        (false, false) => return Err(BackupFileError::NoTrailer { path: path.to_path_buf() }),
        (true, true) => HashCheck::SkippedWithTrailer,
        (false, true) => HashCheck::SkippedNoTrailer,
    };
    let bbolt_err = |source| BackupFileError::Bbolt { path: path.to_path_buf(), source };
    let db = crate::bbolt::DbReader::open(file, payload).map_err(bbolt_err)?;
    db.check().map_err(bbolt_err)?;
    let (summary, imported, snapshot) = convert(path, &db, scratch)?;
    let backup = BackupFile {
        path: path.to_path_buf(),
        format: Format::Etcd,
        size,
        payload_bytes: payload,
        hash,
        sha256: hex(&sha),
        raft_index: imported.consistent_index,
        members: imported.members,
        summary,
        snapshot_bytes: 0,
    };
    Ok((backup, Some(snapshot)))
}

/// Loads `db` into a fresh redb database in `scratch`, and writes it out as a Keel snapshot
/// there: the summary, what the import found, and the snapshot's path.
fn convert(
    path: &Path,
    db: &crate::bbolt::DbReader,
    scratch: &Path,
) -> Result<(SnapshotSummary, crate::etcd_db::Imported, PathBuf), BackupFileError> {
    let fail = |reason: String| BackupFileError::Scratch {
        path: path.to_path_buf(),
        scratch: scratch.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(scratch).map_err(|e| fail(e.to_string()))?;
    let database =
        keel::redb::Database::create(scratch.join("import.redb")).map_err(|e| fail(e.to_string()))?;
    let txn = database.begin_write().map_err(|e| fail(e.to_string()))?;
    let imported = crate::etcd_db::import(db, &txn)
        .map_err(|source| BackupFileError::Etcd { path: path.to_path_buf(), source })?;
    txn.commit().map_err(|e| fail(e.to_string()))?;
    let read = keel::redb::ReadableDatabase::begin_read(&database).map_err(|e| fail(e.to_string()))?;
    let summary = crate::store::summary(&read).map_err(|e| fail(e.to_string()))?;
    // The source's position: etcd's applied index (at least 1, below any a new cluster writes).
    let index = imported.consistent_index.max(1);
    let last = keel::storage::seed::seed_log_id(index);
    let meta = SnapshotMeta { last_log_id: Some(last), last_membership: Default::default() };
    let snapshot = scratch.join("import.snap");
    let mut writer =
        keel::storage::snapshot::SnapshotWriter::create(&snapshot, &meta).map_err(|e| fail(e.to_string()))?;
    keel::StateMachine::snapshot(&KvStore::default(), &read, &mut writer).map_err(|e| fail(e.to_string()))?;
    writer.finish().map_err(|e| fail(e.to_string()))?;
    Ok((summary, imported, snapshot))
}

/// A Keel snapshot file with its padding and trailer.
fn open_keel(path: &Path, mut file: File, size: u64, skip_hash: bool) -> Result<BackupFile, BackupFileError> {
    let io_err = |source| BackupFileError::Io { path: path.to_path_buf(), source };
    if size < 16 + TRAILER_BYTES {
        return Err(BackupFileError::TooShort { path: path.to_path_buf(), len: size });
    }
    let payload = size - TRAILER_BYTES;
    let sha = sha256_of(&mut file, payload).map_err(io_err)?;
    let keel_backup =
        |payload_bytes, hash, sha: &[u8], (meta, summary, snapshot_bytes): (SnapshotMeta, _, _)| BackupFile {
            path: path.to_path_buf(),
            format: Format::Keel,
            size,
            payload_bytes,
            hash,
            sha256: hex(sha),
            raft_index: meta.last_log_id.map_or(0, |l| l.index),
            members: meta.last_membership.membership().voter_ids().collect(),
            summary,
            snapshot_bytes,
        };
    if !skip_hash {
        check_trailer(&mut file, path, &sha)?;
        let found = read_payload(&mut file, path, payload)?;
        return Ok(keel_backup(payload, HashCheck::Ok, &sha, found));
    }
    // Unchecked: the frames decide whether the last 32 bytes are a trailer or the snapshot's own.
    // If neither reading verifies, the first (a backup file, the usual case) names the damage.
    match read_payload(&mut file, path, payload) {
        Ok(found) => Ok(keel_backup(payload, HashCheck::SkippedWithTrailer, &sha, found)),
        Err(first) => match read_payload(&mut file, path, size) {
            Ok(found) => {
                let sha = sha256_of(&mut file, size).map_err(io_err)?;
                Ok(keel_backup(size, HashCheck::SkippedNoTrailer, &sha, found))
            }
            Err(_) => Err(first),
        },
    }
}

/// Verifies the snapshot (and its padding) in the first `len` bytes of `file` and summarizes its
/// contents; answers the snapshot's length too.
fn read_payload(
    file: &mut File,
    path: &Path,
    len: u64,
) -> Result<(SnapshotMeta, SnapshotSummary, u64), BackupFileError> {
    file.rewind().map_err(|source| BackupFileError::Io { path: path.to_path_buf(), source })?;
    let input = io::BufReader::with_capacity(256 * 1024, Read::take(&mut *file, len));
    let (meta, reader) = SnapshotReader::new(input, path)?;
    let mut reader = reader.allow_zero_padding(PAD_TO as usize - 1);
    let contents = |reason: String| BackupFileError::Contents { path: path.to_path_buf(), reason };
    let damage = |e: io::Error| match e.downcast::<SnapshotFileError>() {
        Ok(damage) => BackupFileError::Damaged(damage),
        Err(e) => contents(e.to_string()),
    };
    // The first failure names the damage: a frame that failed is not read again after it.
    let summary = crate::store::snapshot_summary(&mut reader).map_err(|e| match e {
        keel::StateMachineError::Io(e) => damage(e),
        other => contents(other.to_string()),
    })?;
    // Whatever the summary left unread (the auth tables) must verify too.
    io::copy(&mut reader, &mut io::sink()).map_err(damage)?;
    Ok((meta, summary, reader.offset()))
}

#[cfg(test)]
mod tests {
    use keel::redb::ReadableDatabase;
    use keel::StateMachine;

    use super::*;

    fn with_trailer(mut payload: Vec<u8>) -> Vec<u8> {
        let sha = ring::digest::digest(&ring::digest::SHA256, &payload);
        payload.extend_from_slice(sha.as_ref());
        payload
    }

    fn empty_state() -> (tempfile::TempDir, keel::redb::Database) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = keel::redb::Database::create(dir.path().join("s.redb")).expect("db");
        (dir, db)
    }

    #[test]
    fn an_etcd_database_and_an_older_keel_backup_both_read() {
        let (dir, db) = empty_state();
        let read = db.begin_read().expect("read");
        // Today's: etcd's database, as the stream writes it.
        let (layout, _) = crate::etcd_db::write_db(&read, io::sink(), None).expect("size");
        let (_, bytes) = crate::etcd_db::write_db(&read, Vec::new(), Some(layout)).expect("write");
        let etcd = dir.path().join("etcd.db");
        std::fs::write(&etcd, with_trailer(bytes)).expect("write file");
        let b = check(&etcd, false).expect("check");
        assert_eq!(
            (b.format, b.hash, b.summary.revision, b.summary.keys),
            (Format::Etcd, HashCheck::Ok, 1, 0)
        );
        // Before: a Keel snapshot file, padded to 512 bytes.
        let meta = SnapshotMeta::default();
        let mut w = keel::storage::snapshot::SnapshotWriter::new(Vec::new(), &meta).expect("writer");
        KvStore::default().snapshot(&read, &mut w).expect("snapshot");
        let mut payload = w.finish_into().expect("finish");
        let snapshot_len = payload.len();
        payload.resize(snapshot_len.div_ceil(512) * 512, 0);
        let old = dir.path().join("old.snap");
        std::fs::write(&old, with_trailer(payload)).expect("write file");
        let b = check(&old, false).expect("check");
        assert_eq!((b.format, b.hash, b.summary.revision), (Format::Keel, HashCheck::Ok, 1));
        let (_, mut input) = restore_input(&old, false, &dir.path().join("scratch")).expect("input");
        let mut restored = Vec::new();
        input.read_to_end(&mut restored).expect("read");
        assert_eq!(snapshot_len, restored.len(), "the snapshot without padding and trailer");
    }
}
