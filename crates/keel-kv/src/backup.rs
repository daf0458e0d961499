//! Backups: the point-in-time snapshot `Maintenance.Snapshot` streams (`etcdctl snapshot save`,
//! `keel snapshot save`), and reading such a file back (`keel snapshot status|restore`).
//!
//! # The backup file (`docs/formats.md`, Backup files)
//!
//! ```text
//! payload: a Keel snapshot file (magic "KEELSNAP", version 1, META, DATA frames, END)
//!          then zero bytes up to a multiple of 512 bytes
//! trailer: SHA-256 of the payload                                             32 bytes
//! ```
//!
//! The padding is etcdctl's due: `etcdctl snapshot save` refuses a file whose size is not a
//! multiple of 512 plus 32 ("sha256 checksum not found"), as a bbolt file always is.
//!
//! The payload is exactly what a snapshot built at that point would hold: Keel's log position and
//! membership in META, then [`KvStore`]'s tables (keys with their history, leases, users and
//! roles). As etcd does, the stream carries the payload in chunks whose `remaining_bytes` counts
//! down to 0, then one more chunk holding the SHA-256 (with `remaining_bytes` 0), so that a client
//! that writes every blob in order writes the file above.
//!
//! # Point in time, bounded memory
//!
//! The snapshot is read from one redb read transaction (applies go on meanwhile) on a blocking
//! thread, twice: once to count its bytes (etcd announces the total in the first chunk, and a
//! Keel snapshot is not stored with its size), once to send it. Chunks go through a channel of
//! [`CHANNEL_CHUNKS`]: a slow client holds the thread, never more memory. A client that goes
//! away ends the read.

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
        let result = node.read_local(|sm, txn| {
            let (_, counted) =
                keel::storage::sm_store::export_snapshot(sm, txn, Counter(0)).map_err(|e| e.to_string())?;
            let revision = crate::store::revision(txn).map_err(|e| e.to_string())?;
            let sender = ChunkSender {
                tx: tx.clone(),
                revision,
                hash: ring::digest::Context::new(&ring::digest::SHA256),
                buf: Vec::with_capacity(CHUNK_BYTES),
                padding: padding(counted.0),
                total: counted.0 + padding(counted.0),
                sent: 0,
            };
            let (_, sender) =
                keel::storage::sm_store::export_snapshot(sm, txn, sender).map_err(|e| e.to_string())?;
            Ok::<_, String>(sender)
        });
        let sender = match result.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(sender) => sender,
            // The client went away: nobody to tell.
            Err(_) if tx.is_closed() => return,
            Err(e) => {
                let _ = tx.blocking_send(Err(StreamError::Read(e)));
                return;
            }
        };
        if let Err(e) = sender.finish() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Zero bytes after a snapshot of `len` bytes, up to a multiple of [`PAD_TO`].
fn padding(len: u64) -> u64 {
    (PAD_TO - len % PAD_TO) % PAD_TO
}

/// Counts what is written to it.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Cuts what is written to it into chunks, hashes them and sends them (blocking while the
/// channel is full).
struct ChunkSender {
    tx: mpsc::Sender<Result<Chunk, StreamError>>,
    revision: i64,
    hash: ring::digest::Context,
    buf: Vec<u8>,
    /// Zero bytes to send after the snapshot.
    padding: u64,
    /// The payload's size: the snapshot's and the padding.
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

    /// Sends what is left, the padding, and then the SHA-256 trailer.
    fn finish(mut self) -> Result<(), StreamError> {
        let zeros = vec![0u8; self.padding as usize];
        if self.write_all(&zeros).is_err() {
            return Ok(()); // the client went away, or more than counted (reported below)
        }
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
    #[error("{path} is {len} bytes, too short for a Keel snapshot (truncated?)")]
    TooShort { path: PathBuf, len: u64 },
    #[error(
        "{path} is an etcd snapshot (a bbolt database): Keel cannot read it; restore it with etcdutl \
         into etcd, or take the snapshot from keeld (`etcdctl snapshot save`, `keel snapshot save`)"
    )]
    Etcd { path: PathBuf },
    #[error("{path} is not a Keel snapshot (it does not start with \"KEELSNAP\")")]
    NotKeel { path: PathBuf },
    #[error(
        "{path}: SHA-256 mismatch: the file is corrupt or truncated (its last 32 bytes are {stored}, \
         the bytes before them hash to {computed}); restoring it anyway: --skip-hash-check"
    )]
    HashMismatch { path: PathBuf, stored: String, computed: String },
    #[error("{0}")]
    Damaged(#[from] SnapshotFileError),
    #[error("{path}: the state machine data does not read back: {reason}")]
    Contents { path: PathBuf, reason: String },
}

/// How a backup file's hash was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashCheck {
    /// The trailer is the SHA-256 of the payload.
    Ok,
    /// Not checked (`--skip-hash-check`); the file has a 32-byte trailer after its payload.
    SkippedWithTrailer,
    /// Not checked (`--skip-hash-check`); the file is a bare snapshot (e.g. copied from a data
    /// dir's `snapshots/`), with no trailer.
    SkippedNoTrailer,
}

/// A backup file whose hash (unless skipped) and every frame verified.
#[derive(Debug, Clone)]
pub struct BackupFile {
    pub path: PathBuf,
    /// The whole file's size.
    pub size: u64,
    /// Bytes of the payload (the snapshot and its padding; without the trailer).
    pub payload_bytes: u64,
    /// Bytes of the snapshot in it (without padding and trailer).
    pub snapshot_bytes: u64,
    pub hash: HashCheck,
    /// SHA-256 of the payload, hex.
    pub sha256: String,
    /// The source cluster's log position and membership.
    pub meta: SnapshotMeta,
    pub summary: SnapshotSummary,
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

/// Opens `path` as a backup file: checks its magic, its SHA-256 trailer (unless `skip_hash`), and
/// every frame of the snapshot in it; reads its summary.
pub fn check(path: &Path, skip_hash: bool) -> Result<BackupFile, BackupFileError> {
    let io_err = |source| BackupFileError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let mut head = Vec::with_capacity(20);
    Read::take(&mut file, 20).read_to_end(&mut head).map_err(io_err)?;
    // bbolt's first page: a 16-byte page header, then the meta page's magic 0xED0CDAED.
    if head.len() == 20 && head[16..20] == 0xED0C_DAEDu32.to_le_bytes() {
        return Err(BackupFileError::Etcd { path: path.to_path_buf() });
    }
    if !head.starts_with(MAGIC) {
        return Err(BackupFileError::NotKeel { path: path.to_path_buf() });
    }
    if size < 16 + TRAILER_BYTES {
        return Err(BackupFileError::TooShort { path: path.to_path_buf(), len: size });
    }
    let payload = size - TRAILER_BYTES;
    let sha = sha256_of(&mut file, payload).map_err(io_err)?;
    if !skip_hash {
        let mut stored = [0u8; TRAILER_BYTES as usize];
        file.read_exact(&mut stored).map_err(io_err)?;
        if stored[..] != sha[..] {
            return Err(BackupFileError::HashMismatch {
                path: path.to_path_buf(),
                stored: hex(&stored),
                computed: hex(&sha),
            });
        }
        let (meta, summary, snapshot_bytes) = read_payload(&mut file, path, payload)?;
        return Ok(BackupFile {
            path: path.to_path_buf(),
            size,
            payload_bytes: payload,
            snapshot_bytes,
            hash: HashCheck::Ok,
            sha256: hex(&sha),
            meta,
            summary,
        });
    }
    // Unchecked: the frames decide whether the last 32 bytes are a trailer or the snapshot's own.
    // If neither reading verifies, the first (a backup file, the usual case) names the damage.
    let (payload_bytes, hash, sha, (meta, summary, snapshot_bytes)) =
        match read_payload(&mut file, path, payload) {
            Ok(found) => (payload, HashCheck::SkippedWithTrailer, sha, found),
            Err(first) => match read_payload(&mut file, path, size) {
                Ok(found) => {
                    (size, HashCheck::SkippedNoTrailer, sha256_of(&mut file, size).map_err(io_err)?, found)
                }
                Err(_) => return Err(first),
            },
        };
    Ok(BackupFile {
        path: path.to_path_buf(),
        size,
        payload_bytes,
        snapshot_bytes,
        hash,
        sha256: hex(&sha),
        meta,
        summary,
    })
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

/// The snapshot's bytes in a checked backup file, for restoring (without padding and trailer).
pub fn payload(backup: &BackupFile) -> Result<impl Read, BackupFileError> {
    let file = File::open(&backup.path)
        .map_err(|source| BackupFileError::Io { path: backup.path.clone(), source })?;
    Ok(io::BufReader::with_capacity(256 * 1024, file.take(backup.snapshot_bytes)))
}
