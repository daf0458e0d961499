//! Cutting the WAL: the torn last record that start-up cuts before raft-log opens the log, and
//! the cut an operator asks for offline (`keel debug truncate-log`).
//!
//! # The torn-tail rule
//!
//! raft-log cuts a last record that is short, or zeros from its first byte. A crash while the
//! file grows can also leave a record whose head landed and whose rest did not: the filesystem
//! extended the file (zeros) before the data blocks were written. raft-log refuses that ("Non-zero
//! byte detected"). Start-up cuts it too, when all of these hold:
//!
//! 1. it is in the last chunk file (the one being written; earlier chunks were complete and
//!    fsync'ed before the next was started, so damage there is never a torn write);
//! 2. it is the first record there that does not read back (decode or CRC fails);
//! 3. its first 4 bytes are a record type raft-log writes (0..=5, big-endian);
//! 4. from some point inside it, every byte to the end of the file is zero, and at least the last
//!    4 (its CRC) are: the record was never completely written, so its fsync never completed and
//!    no one was told it was durable.
//!
//! Anything else that does not read back — a bad record followed by non-zero bytes, a CRC that
//! landed but does not match, damage in an earlier chunk — still stops start-up, naming the file.

use std::fs::File;
use std::io;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;

use raft_log::chunked_wal::ChunkedWal;
use raft_log::chunked_wal::WalLock;
use raft_log::codeq::Decode;
use raft_log::RaftLogAction;
use raft_log::WALRecord;

use crate::storage::log_store::WalTypes;

type Record = raft_log::RaftLogRecord<WalTypes>;
type Wal = ChunkedWal<raft_log::RaftWalTypes<WalTypes>>;

/// Record types raft-log writes (a record's first 4 bytes, big-endian): 0..=4 actions, 5 checkpoint.
const MAX_RECORD_TYPE: u32 = 5;
/// A record ends with its CRC32.
const CRC_BYTES: u64 = 4;

/// A torn last record that start-up cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    /// Where the torn record began: the file's new length.
    pub offset: u64,
    /// Bytes cut (the torn record and the zeros after it).
    pub cut: u64,
}

/// One record read back from a chunk file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    pub file: PathBuf,
    /// Byte offset of the record in its file.
    pub offset: u64,
    /// The log index a record appends, if it is an append.
    pub appends: Option<u64>,
    /// What the record is, e.g. `append index 7 (term 2)`.
    pub what: String,
}

/// A chunk file read record by record, up to the first record that does not read back.
struct ChunkScan {
    size: u64,
    records: Vec<RecordInfo>,
    /// Where the readable records end (the start of the first unreadable one, or `size`).
    readable_end: u64,
    unreadable: Option<io::Error>,
}

/// The WAL directory lock (raft-log's `LOCK` file, an exclusive `flock`): held while a running
/// node has the log open, so holding it proves no node uses the dir.
fn lock(dir: &Path) -> io::Result<WalLock> {
    Wal::acquire_lock(&raft_log::chunked_wal::Config::new(dir.display()))
}

/// The chunk files of `dir`, in log order.
fn chunk_files(dir: &Path, lock: &WalLock) -> io::Result<Vec<PathBuf>> {
    let config = raft_log::chunked_wal::Config::new(dir.display());
    let ids = Wal::load_chunk_ids(&config, lock)?;
    Ok(ids.into_iter().map(|id| PathBuf::from(config.chunk_path(id))).collect())
}

/// Counts the bytes read, so each record's offset is known.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn describe(record: &Record) -> (Option<u64>, String) {
    match record {
        WALRecord::Checkpoint(_) => (None, "checkpoint (the log state at the chunk's start)".into()),
        WALRecord::Action(action) => match action {
            RaftLogAction::SaveVote(v) => (None, format!("vote {}", v.0)),
            RaftLogAction::Append(id, _) => {
                (Some(id.0.index), format!("append index {} (term {})", id.0.index, id.0.leader_id.term))
            }
            RaftLogAction::Commit(id) => (None, format!("commit up to index {}", id.0.index)),
            RaftLogAction::TruncateAfter(id) => {
                (None, format!("truncate after index {}", id.as_ref().map_or(0, |l| l.0.index)))
            }
            RaftLogAction::PurgeUpto(id) => (None, format!("purge up to index {}", id.0.index)),
        },
    }
}

fn scan_chunk(path: &Path) -> io::Result<ChunkScan> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut r = Counting { inner: io::BufReader::with_capacity(1 << 20, f), read: 0 };
    let mut records = Vec::new();
    let mut unreadable = None;
    let mut readable_end = 0;
    while r.read < size {
        readable_end = r.read;
        match Record::decode(&mut r) {
            Ok(record) => {
                let (appends, what) = describe(&record);
                records.push(RecordInfo { file: path.to_path_buf(), offset: readable_end, appends, what });
            }
            Err(e) => {
                unreadable = Some(e);
                break;
            }
        }
    }
    if unreadable.is_none() {
        readable_end = size;
    }
    Ok(ChunkScan { size, records, readable_end, unreadable })
}

/// Whether the bytes of `f` from `start` to `size` are a torn record (see the module docs): a
/// known record type, then anything, then at least [`CRC_BYTES`] zeros to the end.
fn is_torn_tail(f: &File, start: u64, size: u64) -> io::Result<bool> {
    if size < start + CRC_BYTES {
        return Ok(false); // short: raft-log's own rule (cut a short last record) covers it
    }
    let mut head = [0u8; 4];
    f.read_exact_at(&mut head, start)?;
    if u32::from_be_bytes(head) > MAX_RECORD_TYPE {
        return Ok(false);
    }
    // Walk back from the end: where does the zero tail begin?
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = size;
    while end > start {
        let from = end.saturating_sub(buf.len() as u64).max(start);
        let n = (end - from) as usize;
        f.read_exact_at(&mut buf[..n], from)?;
        if let Some(last) = buf[..n].iter().rposition(|b| *b != 0) {
            let zeros = size - (from + last as u64 + 1);
            return Ok(zeros >= CRC_BYTES);
        }
        end = from;
    }
    Ok(true) // zeros from the record's first byte
}

fn cut_file(path: &Path, len: u64) -> io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Cuts a torn last record of the log in `dir` (the rule is in the module docs), before raft-log
/// opens it. Answers what was cut, if anything; every other kind of damage is left for raft-log's
/// open to refuse, naming the file. Fails if a running node holds the dir.
pub fn cut_torn_tail(dir: &Path) -> io::Result<Option<TornTail>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let lock = lock(dir)?;
    let Some(last) = chunk_files(dir, &lock)?.pop() else { return Ok(None) };
    let scan = scan_chunk(&last)?;
    if scan.unreadable.is_none() {
        return Ok(None);
    }
    let f = File::open(&last)?;
    if !is_torn_tail(&f, scan.readable_end, scan.size)? {
        return Ok(None);
    }
    cut_file(&last, scan.readable_end)?;
    Ok(Some(TornTail { file: last, offset: scan.readable_end, cut: scan.size - scan.readable_end }))
}

/// Every readable record of the log in `log_dir`, in log order (each chunk up to its first
/// unreadable record). Read-only; refuses a dir a running node holds.
pub fn records(log_dir: &Path) -> io::Result<Vec<RecordInfo>> {
    let lock = lock(log_dir)?;
    let mut all = Vec::new();
    for file in chunk_files(log_dir, &lock)? {
        all.extend(scan_chunk(&file)?.records);
    }
    Ok(all)
}

/// What cutting the log at a point removes.
#[derive(Debug, Clone)]
pub struct LogCut {
    /// The chunk file cut, and its new length.
    pub file: PathBuf,
    pub offset: u64,
    /// Readable records removed, in log order (this file's after `offset`, then later files').
    pub lost: Vec<RecordInfo>,
    /// Bytes after the readable records that do not read back as records (a damaged tail).
    pub unreadable_bytes: u64,
    /// Later chunk files, removed whole (the log must stay contiguous).
    pub removed_files: Vec<PathBuf>,
}

impl LogCut {
    /// The lowest and highest log index of the appends lost.
    pub fn lost_indexes(&self) -> Option<(u64, u64)> {
        let mut appended = self.lost.iter().filter_map(|r| r.appends);
        let first = appended.next()?;
        Some(appended.fold((first, first), |(lo, hi), i| (lo.min(i), hi.max(i))))
    }
}

/// Why `keel debug truncate-log` cut nothing.
#[derive(Debug, thiserror::Error)]
pub enum TruncateLogError {
    #[error("{0} holds no Raft log (no chunk files in it)")]
    NoLog(PathBuf),
    #[error("{path} is in use by a running node (stop it first): {reason}")]
    InUse { path: PathBuf, reason: String },
    #[error("{file:?} is not a chunk file of {dir} (its chunk files: {known})")]
    NoSuchFile { file: String, dir: PathBuf, known: String },
    #[error("offset {offset} in {} is not where a record starts; record starts nearby: {nearby}", file.display())]
    NotARecordStart { file: PathBuf, offset: u64, nearby: String },
    #[error("offset 0 of {} would remove its first record, the checkpoint every chunk opens with; cut the chunk before it instead", file.display())]
    ChunkStart { file: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Plans a cut of the log in `log_dir` at byte `offset` of chunk file `file` (its name; default:
/// the last chunk), asks `confirm` with the plan, and makes it if `confirm` says yes: the file is
/// cut to `offset` and fsync'ed, later chunk files are removed, the directory is fsync'ed. Holds
/// the WAL lock throughout, so refuses a dir a running node holds. `offset` must be where a
/// readable record starts, or where the readable records end (which cuts only a damaged tail).
/// Answers the plan and whether it was carried out.
pub fn truncate_log(
    log_dir: &Path,
    file: Option<&str>,
    offset: u64,
    confirm: impl FnOnce(&LogCut) -> bool,
) -> Result<(LogCut, bool), TruncateLogError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TruncateLogError::Io { path, source }
    };
    if !log_dir.is_dir() {
        return Err(TruncateLogError::NoLog(log_dir.to_path_buf()));
    }
    let lock = lock(log_dir).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => {
            TruncateLogError::InUse { path: log_dir.to_path_buf(), reason: e.to_string() }
        }
        _ => TruncateLogError::Io { path: log_dir.to_path_buf(), source: e },
    })?;
    let files = chunk_files(log_dir, &lock).map_err(io_err(log_dir))?;
    if files.is_empty() {
        return Err(TruncateLogError::NoLog(log_dir.to_path_buf()));
    }
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let at = match file {
        None => files.len() - 1,
        Some(f) => {
            let wanted = name(Path::new(f));
            files.iter().position(|p| name(p) == wanted).ok_or_else(|| TruncateLogError::NoSuchFile {
                file: f.to_string(),
                dir: log_dir.to_path_buf(),
                known: files.iter().map(|p| name(p)).collect::<Vec<_>>().join(", "),
            })?
        }
    };
    let target = &files[at];
    let scan = scan_chunk(target).map_err(io_err(target))?;
    if offset == 0 {
        return Err(TruncateLogError::ChunkStart { file: target.clone() });
    }
    let starts: Vec<u64> = scan.records.iter().map(|r| r.offset).chain([scan.readable_end]).collect();
    if !starts.contains(&offset) {
        let before = starts.iter().rev().find(|s| **s < offset);
        let after = starts.iter().find(|s| **s > offset);
        let nearby = [before, after].into_iter().flatten().map(u64::to_string).collect::<Vec<_>>();
        return Err(TruncateLogError::NotARecordStart {
            file: target.clone(),
            offset,
            nearby: nearby.join(", "),
        });
    }
    let mut lost: Vec<RecordInfo> = scan.records.iter().filter(|r| r.offset >= offset).cloned().collect();
    let mut unreadable_bytes = scan.size - scan.readable_end;
    let removed_files = files[at + 1..].to_vec();
    for later in &removed_files {
        let s = scan_chunk(later).map_err(io_err(later))?;
        lost.extend(s.records);
        unreadable_bytes += s.size - s.readable_end;
    }
    let cut = LogCut { file: target.clone(), offset, lost, unreadable_bytes, removed_files };
    if !confirm(&cut) {
        return Ok((cut, false));
    }
    // Later files first: a crash in between leaves a log that ends earlier, never one with a gap
    // in the middle.
    for later in cut.removed_files.iter().rev() {
        std::fs::remove_file(later).map_err(io_err(later))?;
    }
    cut_file(target, offset).map_err(io_err(target))?;
    sync_dir(log_dir).map_err(io_err(log_dir))?;
    drop(lock);
    Ok((cut, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut t, bytes).expect("write");
        let f = t.reopen().expect("reopen");
        (t, f)
    }

    #[test]
    fn a_known_record_type_then_zeros_covering_the_crc_is_a_torn_tail() {
        let mut torn = vec![0, 0, 0, 1, 9, 9, 9];
        torn.extend([0; 8]);
        let (_t, f) = file_with(&torn);
        assert!(is_torn_tail(&f, 0, torn.len() as u64).expect("read"));
        // Zeros from the first byte: torn too.
        let (_t, f) = file_with(&[0; 40]);
        assert!(is_torn_tail(&f, 0, 40).expect("read"));
        // Ahead of the record, anything: only the bytes from `start` count.
        let mut later = vec![7; 10];
        later.extend(&torn);
        let (_t, f) = file_with(&later);
        assert!(is_torn_tail(&f, 10, later.len() as u64).expect("read"));
    }

    #[test]
    fn a_landed_crc_an_unknown_type_or_a_short_tail_is_not_a_torn_tail() {
        // The last 4 bytes are not all zero: the record was written whole, and is damaged.
        let (_t, f) = file_with(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert!(!is_torn_tail(&f, 0, 12).expect("read"));
        // Not a record type raft-log writes.
        let (_t, f) = file_with(&[0, 0, 0, 6, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!is_torn_tail(&f, 0, 12).expect("read"));
        // Shorter than a CRC: raft-log's own rule.
        let (_t, f) = file_with(&[0, 0, 1]);
        assert!(!is_torn_tail(&f, 0, 3).expect("read"));
        // A zero run longer than the read buffer before a non-zero byte near the end.
        let mut long = vec![0, 0, 0, 1];
        long.extend(vec![0; 200_000]);
        long.extend([1, 0, 0]);
        let (_t, f) = file_with(&long);
        assert!(!is_torn_tail(&f, 0, long.len() as u64).expect("read"));
        long.extend([0, 0]);
        let (_t, f) = file_with(&long);
        assert!(is_torn_tail(&f, 0, long.len() as u64).expect("read"));
    }
}
