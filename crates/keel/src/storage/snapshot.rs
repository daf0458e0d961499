//! Snapshot files: a checksummed, framed container for one state machine image, and the directory
//! that holds the current one.
//!
//! # Format (see `docs/formats.md`)
//!
//! ```text
//! header: magic "KEELSNAP" | version u8 (=1) | 7 zero bytes                 (16 bytes)
//! frame:  kind u8 | len u32 LE | crc32 u32 LE over (kind, len, body) | body (len bytes)
//!   kind 1 META  first frame; body = postcard(SnapshotMeta)
//!   kind 2 DATA  the state machine's bytes, at most FRAME_DATA_MAX per frame
//!   kind 3 END   last frame; body = u64 LE total DATA bytes; nothing may follow
//! ```
//!
//! # Durability contract
//!
//! A snapshot is written to a temp file in the snapshot directory, fsync'ed, renamed to its final
//! name and the directory fsync'ed, before anyone (openraft, and so log purge) is told it exists.
//! A reader verifies every frame, so a flipped byte is reported with the file and offset.

use std::fs;
use std::fs::File;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::codec;
use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"KEELSNAP";
const VERSION: u8 = 1;
const HEADER_LEN: u64 = 16;
const FRAME_HEADER_LEN: u64 = 9;
/// Largest DATA frame body. Also the unit a snapshot travels in over the network.
pub const FRAME_DATA_MAX: usize = 64 * 1024;
/// Largest META body we accept (membership of a big cluster is still far below this).
const META_MAX: usize = 16 << 20;

const KIND_META: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_END: u8 = 3;

/// A snapshot file that is damaged or not a snapshot file at all.
#[derive(Debug, Clone, thiserror::Error)]
#[error("snapshot file {path} at offset {offset}: {reason}")]
pub struct SnapshotFileError {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl From<SnapshotFileError> for io::Error {
    fn from(e: SnapshotFileError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

fn frame_crc(kind: u8, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&(body.len() as u32).to_le_bytes());
    h.update(body);
    h.finalize()
}

/// Writes a snapshot in the file format above to `W` (a file by default). Bytes written through
/// `io::Write` become DATA frames.
pub struct SnapshotWriter<W: Write = BufWriter<File>> {
    out: W,
    buf: Vec<u8>,
    total: u64,
}

impl SnapshotWriter<BufWriter<File>> {
    /// Creates the file at `path` (which must not exist) and writes the header and META.
    pub fn create(path: &Path, meta: &SnapshotMeta) -> io::Result<Self> {
        let file = fs::OpenOptions::new().write(true).create_new(true).open(path)?;
        Self::new(BufWriter::with_capacity(256 * 1024, file), meta)
    }

    /// Writes the END frame and fsyncs the file. The file is complete and durable on return.
    pub fn finish(self) -> io::Result<()> {
        let out = self.finish_into()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header and META to `out`; DATA follows through `io::Write`.
    pub fn new(out: W, meta: &SnapshotMeta) -> io::Result<Self> {
        let mut w = Self { out, buf: Vec::new(), total: 0 };
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8] = VERSION;
        w.out.write_all(&header)?;
        w.write_frame(KIND_META, &codec::to_bytes(meta)?)?;
        w.buf.reserve(FRAME_DATA_MAX);
        Ok(w)
    }

    fn write_frame(&mut self, kind: u8, body: &[u8]) -> io::Result<()> {
        self.out.write_all(&[kind])?;
        self.out.write_all(&(body.len() as u32).to_le_bytes())?;
        self.out.write_all(&frame_crc(kind, body).to_le_bytes())?;
        self.out.write_all(body)
    }

    fn flush_data(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let body = std::mem::take(&mut self.buf);
            self.write_frame(KIND_DATA, &body)?;
            self.total += body.len() as u64;
            self.buf = body;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the last DATA frame and END, and hands back the output (not flushed or synced).
    pub fn finish_into(mut self) -> io::Result<W> {
        self.flush_data()?;
        let total = self.total.to_le_bytes();
        self.write_frame(KIND_END, &total)?;
        Ok(self.out)
    }
}

impl<W: Write> Write for SnapshotWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = FRAME_DATA_MAX - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FRAME_DATA_MAX {
            self.flush_data()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and verifies a snapshot file; `io::Read` yields the DATA bytes.
pub struct SnapshotReader<R> {
    input: R,
    path: PathBuf,
    offset: u64,
    frame: Vec<u8>,
    pos: usize,
    total: u64,
    done: bool,
    /// Zero bytes allowed after END (a backup file pads its snapshot; `docs/formats.md`).
    zero_padding: usize,
    /// The first failure: every read after it answers it again (the input is past the frame).
    failed: Option<SnapshotFileError>,
}

impl SnapshotReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<(SnapshotMeta, Self), SnapshotFileError> {
        let file = File::open(path).map_err(|e| SnapshotFileError {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("cannot open: {e}"),
        })?;
        Self::new(BufReader::with_capacity(256 * 1024, file), path)
    }
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(mut input: R, path: &Path) -> Result<(SnapshotMeta, Self), SnapshotFileError> {
        let err = |offset, reason: String| SnapshotFileError { path: path.to_path_buf(), offset, reason };
        let mut header = [0u8; HEADER_LEN as usize];
        input.read_exact(&mut header).map_err(|e| err(0, format!("cannot read header: {e}")))?;
        if &header[..8] != MAGIC {
            return Err(err(0, "not a Keel snapshot (bad magic)".into()));
        }
        if header[8] != VERSION {
            return Err(err(8, format!("unsupported snapshot version {}", header[8])));
        }
        if let Some(i) = header[9..].iter().position(|&b| b != 0) {
            return Err(err(9 + i as u64, "reserved header byte is not zero".into()));
        }
        let mut reader = Self {
            input,
            path: path.to_path_buf(),
            offset: HEADER_LEN,
            frame: Vec::new(),
            pos: 0,
            total: 0,
            done: false,
            zero_padding: 0,
            failed: None,
        };
        let at = reader.offset;
        let (kind, body) = reader.read_frame(META_MAX)?;
        if kind != KIND_META {
            return Err(err(at, format!("expected META frame, found kind {kind}")));
        }
        let meta =
            codec::from_bytes(&body).map_err(|e| err(at, format!("META frame does not decode: {e}")))?;
        Ok((meta, reader))
    }

    /// Accepts up to `max` zero bytes after END (and nothing else), as a backup file pads its
    /// snapshot to a multiple of 512 bytes.
    pub fn allow_zero_padding(mut self, max: usize) -> Self {
        self.zero_padding = max;
        self
    }

    /// The bytes of the snapshot read so far; after a verified END, its length (padding not
    /// counted).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn error(&self, offset: u64, reason: String) -> SnapshotFileError {
        SnapshotFileError { path: self.path.clone(), offset, reason }
    }

    fn read_frame(&mut self, max: usize) -> Result<(u8, Vec<u8>), SnapshotFileError> {
        let at = self.offset;
        let mut head = [0u8; FRAME_HEADER_LEN as usize];
        self.input
            .read_exact(&mut head)
            .map_err(|e| self.error(at, format!("truncated frame header: {e}")))?;
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let crc = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if !(KIND_META..=KIND_END).contains(&kind) {
            return Err(self.error(at, format!("unknown frame kind {kind}")));
        }
        if len > max {
            return Err(self.error(at, format!("frame length {len} exceeds limit {max}")));
        }
        let mut body = vec![0u8; len];
        self.input.read_exact(&mut body).map_err(|e| self.error(at, format!("truncated frame body: {e}")))?;
        if frame_crc(kind, &body) != crc {
            return Err(self.error(at, "checksum mismatch".into()));
        }
        self.offset += FRAME_HEADER_LEN + len as u64;
        Ok((kind, body))
    }

    /// Loads the next DATA frame; false at a verified END. A failure is final.
    fn next_data(&mut self) -> Result<bool, SnapshotFileError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let next = self.read_data();
        if let Err(e) = &next {
            self.failed = Some(e.clone());
        }
        next
    }

    fn read_data(&mut self) -> Result<bool, SnapshotFileError> {
        if self.done {
            return Ok(false);
        }
        let at = self.offset;
        let (kind, body) = self.read_frame(FRAME_DATA_MAX)?;
        match kind {
            KIND_DATA => {
                self.total += body.len() as u64;
                self.frame = body;
                self.pos = 0;
                Ok(true)
            }
            KIND_END => {
                let total = <[u8; 8]>::try_from(body.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| self.error(at, "END frame body is not 8 bytes".into()))?;
                if total != self.total {
                    return Err(self.error(at, format!("END says {total} data bytes, found {}", self.total)));
                }
                let mut rest = Vec::new();
                let limit = self.zero_padding as u64 + 1;
                if let Err(e) = (&mut self.input).take(limit).read_to_end(&mut rest) {
                    return Err(self.error(self.offset, format!("read error: {e}")));
                }
                if rest.len() > self.zero_padding || rest.iter().any(|&b| b != 0) {
                    return Err(self.error(self.offset, "bytes after END frame".into()));
                }
                self.done = true;
                Ok(false)
            }
            other => Err(self.error(at, format!("unexpected frame kind {other} in data section"))),
        }
    }

    /// Reads to the end, verifying every frame.
    pub fn verify_to_end(mut self) -> Result<u64, SnapshotFileError> {
        while self.next_data()? {}
        Ok(self.total)
    }
}

impl<R: Read> Read for SnapshotReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.frame.len() {
            if !self.next_data()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.frame.len() - self.pos);
        out[..n].copy_from_slice(&self.frame[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Verifies a whole snapshot file and returns its metadata.
pub fn verify_file(path: &Path) -> Result<SnapshotMeta, SnapshotFileError> {
    let (meta, reader) = SnapshotReader::open(path)?;
    reader.verify_to_end()?;
    Ok(meta)
}

/// A snapshot file handed to openraft: an open handle, so it stays readable even if a newer
/// snapshot replaces it in the directory while it is being sent.
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
}

impl SnapshotFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self { path: path.to_path_buf(), file: File::open(path)? })
    }
}

/// The snapshot directory: at most one current snapshot, plus temp files being written.
pub struct SnapshotDir {
    dir: PathBuf,
    current: Mutex<Option<(SnapshotMeta, PathBuf)>>,
    seq: AtomicU64,
}

const SNAP_SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".tmp";

impl SnapshotDir {
    /// Opens the directory: removes temp files a crash left, verifies the newest snapshot in full,
    /// removes older ones. A damaged current snapshot is an error, never silently skipped.
    pub fn open(dir: &Path) -> Result<Self, SnapshotFileError> {
        let io_err =
            |e: io::Error| SnapshotFileError { path: dir.to_path_buf(), offset: 0, reason: e.to_string() };
        fs::create_dir_all(dir).map_err(io_err)?;
        let mut snaps = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(TMP_SUFFIX) {
                fs::remove_file(&path).map_err(io_err)?;
            } else if name.ends_with(SNAP_SUFFIX) {
                snaps.push((name, path));
            }
        }
        // Names start with the zero-padded last index, so the newest sorts last.
        snaps.sort();
        let current = match snaps.pop() {
            Some((_, path)) => Some((verify_file(&path)?, path)),
            None => None,
        };
        for (_, old) in snaps {
            fs::remove_file(&old).map_err(io_err)?;
        }
        sync_dir(dir).map_err(io_err)?;
        Ok(Self { dir: dir.to_path_buf(), current: Mutex::new(current), seq: AtomicU64::new(0) })
    }

    /// The newest snapshot in `dir`, verified, without changing anything (for offline inspection).
    pub fn peek(dir: &Path) -> Result<Option<(SnapshotMeta, PathBuf)>, SnapshotFileError> {
        let io_err =
            |e: io::Error| SnapshotFileError { path: dir.to_path_buf(), offset: 0, reason: e.to_string() };
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let mut newest: Option<(String, PathBuf)> = None;
        for entry in entries {
            let path = entry.map_err(io_err)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(SNAP_SUFFIX) && newest.as_ref().is_none_or(|(n, _)| name > *n) {
                newest = Some((name, path));
            }
        }
        match newest {
            Some((_, path)) => Ok(Some((verify_file(&path)?, path))),
            None => Ok(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(SnapshotMeta, PathBuf)>> {
        self.current.lock().expect("snapshot dir mutex poisoned by an earlier panic")
    }

    pub fn current(&self) -> Option<(SnapshotMeta, PathBuf)> {
        self.lock().clone()
    }

    /// A fresh temp path in this directory (same file system, so `publish` can rename it).
    pub fn temp_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        self.dir.join(format!("incoming-{nanos}-{n}{TMP_SUFFIX}"))
    }

    /// Makes a complete, fsync'ed temp file the current snapshot (rename + directory fsync) and
    /// removes the one it replaces. A snapshot older than the current one is discarded instead.
    /// Returns the current snapshot afterwards: `meta` and its new path, or the newer one kept.
    pub fn publish(&self, temp: &Path, meta: &SnapshotMeta) -> io::Result<(SnapshotMeta, PathBuf)> {
        let mut current = self.lock();
        if let Some((cur_meta, cur_path)) = current.as_ref() {
            if cur_meta.last_log_id >= meta.last_log_id && cur_path != temp {
                fs::remove_file(temp)?;
                return Ok((cur_meta.clone(), cur_path.clone()));
            }
        }
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("snap-{index:020}-{n}{SNAP_SUFFIX}"));
        fs::rename(temp, &path)?;
        sync_dir(&self.dir)?;
        if let Some((_, old)) = current.replace((meta.clone(), path.clone())) {
            fs::remove_file(old)?;
            sync_dir(&self.dir)?;
        }
        Ok((meta.clone(), path))
    }
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
