//! The durable Raft log: openraft's `RaftLogStorage` on the `raft-log` WAL.
//!
//! # Durability contract
//!
//! - `save_vote` returns only after the vote record is fsync'ed: a vote reply never leaves the node
//!   for a vote that a crash could forget.
//! - `append` returns once entries are readable in memory and calls the flush callback only after
//!   they are fsync'ed. Appends that arrive while an fsync runs are synced together by the next
//!   one (group commit: many entries, one fsync), see [`LogStore`].
//! - `truncate_after` returns after the truncation is fsync'ed.
//! - `save_committed` is best-effort (no fsync of its own; it rides on the next append's fsync). A
//!   lost committed index only means the state machine re-learns it from the leader.
//! - Every WAL record carries a CRC32. On open, a torn last record is cut off: when it is short,
//!   zeros from its first byte (raft-log's own rule), or a record type followed by zeros to the end
//!   of the last chunk file, its CRC included (a file extended before its data landed: the rule is
//!   in [`super::wal_repair`]). Any other record that does not read back fails the open with the
//!   chunk and offset, like damage anywhere else. A cut record was never fsync'ed whole, so no one
//!   was told it was durable.
//!
//! A debug build can break the `append` contract on purpose, for fault tests' negative controls:
//! see [`LogStore::plant_ack_before_fsync`].

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Duration;

use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::Decode;
use raft_log::codeq::Encode;
use raft_log::RaftLog;

use crate::codec;
use crate::config::LogConfig;
use crate::types::Entry;
use crate::types::EntryPayload;
use crate::types::KeelTypes;
use crate::types::LogId;
use crate::types::Vote;

/// The raft-log type binding: what Keel stores in each WAL record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WalTypes;

/// A log id as stored in a WAL record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WalLogId(pub LogId);
/// An entry payload as stored in a WAL record.
#[derive(Debug, Clone)]
pub struct WalPayload(pub EntryPayload);
/// A vote as stored in a WAL record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd)]
pub struct WalVote(pub Vote);

macro_rules! framed_codec {
    ($t:ident) => {
        impl Encode for $t {
            fn encode<W: io::Write>(&self, w: W) -> Result<usize, io::Error> {
                codec::write_framed(&self.0, w)
            }
        }
        impl Decode for $t {
            fn decode<R: io::Read>(r: R) -> Result<Self, io::Error> {
                codec::read_framed(r).map($t)
            }
        }
    };
}
framed_codec!(WalLogId);
framed_codec!(WalPayload);
framed_codec!(WalVote);

impl raft_log::Types for WalTypes {
    type LogId = WalLogId;
    type LogPayload = WalPayload;
    type Vote = WalVote;
    type Callback = FlushCallback;
    type UserData = String;

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.0.index
    }

    fn payload_size(payload: &WalPayload) -> u64 {
        match &payload.0 {
            EntryPayload::Normal(cmd) => cmd.0.len() as u64 + 16,
            _ => 128,
        }
    }
}

/// Who is told when a WAL flush completes.
pub enum FlushCallback {
    /// openraft's notifications that appended entries are durable: one group commit, issued
    /// at the instant given (timed into [`crate::metrics`]).
    Group(Vec<IOFlushed<KeelTypes>>, Arc<GroupCommit>, std::time::Instant),
    /// A caller of this module waiting for its own write (vote, truncation) to be durable.
    Wait(tokio::sync::oneshot::Sender<io::Result<()>>),
}

impl raft_log::Callback for FlushCallback {
    fn send(self, res: Result<(), io::Error>) {
        match self {
            FlushCallback::Group(waiters, group, issued) => {
                crate::metrics::storage().log_flush_seconds.observe(issued.elapsed().as_secs_f64());
                for w in waiters {
                    w.io_completed(match &res {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    });
                }
                group.flushed();
            }
            FlushCallback::Wait(tx) => {
                // The waiter may have gone away (its task was cancelled); nothing to tell then.
                let _ = tx.send(res);
            }
        }
    }
}

/// The log failed to open; the message names the directory and, for damage, the chunk and offset.
#[derive(Debug, thiserror::Error)]
#[error("raft log in {dir}: {source}")]
pub struct LogOpenError {
    pub dir: PathBuf,
    #[source]
    pub source: io::Error,
}

/// No group flush is queued or running.
const IDLE: u8 = 0;
/// One is, and no append waits for the next.
const FLUSHING: u8 = 1;
/// One is, and appends wait in [`Wal::waiting`] for the next.
const PENDING: u8 = 2;

/// Where group commit stands, shared with the flush callback. The callback runs on the WAL's
/// flush worker thread and must not take the log's lock nor issue a flush (a flush may block on
/// that worker's queue), so the next group flush, when appends wait for one, is issued by the
/// committer thread; when none waits, the callback only marks the log idle: a lone append costs
/// no wake-up of another thread.
pub struct GroupCommit {
    state: AtomicU8,
    /// Wakes the committer thread.
    wake: std::sync::mpsc::Sender<()>,
}

impl GroupCommit {
    /// A group flush completed.
    fn flushed(&self) {
        if self.state.compare_exchange(FLUSHING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // PENDING: appends wait; the committer flushes them.
            let _ = self.wake.send(());
        }
    }
}

/// The WAL plus the group-commit state that must change atomically with it.
struct Wal {
    log: RaftLog<WalTypes>,
    /// Appends made while a group flush was in flight; the next group flush covers them. Changed
    /// only under the lock, with `group.state` set to PENDING after a push.
    waiting: Vec<IOFlushed<KeelTypes>>,
    group: Arc<GroupCommit>,
    /// Set only by [`LogStore::plant_ack_before_fsync`]: appends are acknowledged at once and
    /// flushed late. `None` keeps the contract.
    #[cfg(debug_assertions)]
    late_flush: Option<LateFlush>,
    /// Declared last, so dropped after `log` (whose drop joins the WAL worker and releases the
    /// directory lock): its receiver learns the log is fully closed.
    _closed: tokio::sync::oneshot::Sender<()>,
}

/// Durable Raft log storage. Cloning shares the same log (the clone serves as the log reader).
///
/// Group commit: at most one synced flush of appended entries is in flight. Appends that arrive
/// meanwhile are written to the WAL buffer and wait; when the flush completes, one more flush
/// covers all of them. A lone append is flushed at once, with no batching delay.
#[derive(Clone)]
pub struct LogStore {
    log: Arc<Mutex<Wal>>,
}

impl LogStore {
    /// Opens (creating if needed) the log in `dir`, replaying and verifying every record.
    pub fn open(dir: &Path, config: &LogConfig) -> Result<Self, LogOpenError> {
        Self::open_with_close_signal(dir, config).map(|(store, _)| store)
    }

    /// Like [`open`](Self::open); the receiver completes once the last clone is dropped and the
    /// WAL is closed (its directory lock released).
    pub fn open_with_close_signal(
        dir: &Path,
        config: &LogConfig,
    ) -> Result<(Self, tokio::sync::oneshot::Receiver<()>), LogOpenError> {
        let open_error = |source| LogOpenError { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(open_error)?;
        if let Some(torn) = super::wal_repair::cut_torn_tail(dir).map_err(open_error)? {
            tracing::warn!(
                file = %torn.file.display(),
                offset = torn.offset,
                bytes_cut = torn.cut,
                "cut a torn last WAL record (a record type, then zeros to the end of the file): \
                 the file now ends at that offset"
            );
        }
        let mut wal = raft_log::chunked_wal::Config::new(dir.display());
        wal.chunk_max_size = Some(config.chunk_max_bytes as usize);
        wal.truncate_incomplete_record = Some(true);
        wal.flush_batch_wait = Some(Duration::from_micros(config.flush_batch_wait_us));
        let raft_config = raft_log::Config {
            wal,
            log_cache_max_items: None,
            log_cache_capacity: Some(config.cache_max_bytes as usize),
        };
        let log = RaftLog::open(Arc::new(raft_config)).map_err(open_error)?;
        let (wake, done_rx) = std::sync::mpsc::channel();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let wal = Arc::new(Mutex::new(Wal {
            log,
            waiting: Vec::new(),
            group: Arc::new(GroupCommit { state: AtomicU8::new(IDLE), wake }),
            #[cfg(debug_assertions)]
            late_flush: None,
            _closed: closed_tx,
        }));
        let weak = Arc::downgrade(&wal);
        std::thread::Builder::new()
            .name("keel-log-committer".into())
            .spawn(move || Self::run_committer(weak, done_rx))
            .map_err(open_error)?;
        Ok((Self { log: wal }, closed_rx))
    }

    /// Issues the next group flush each time one completes with appends waiting; exits when the
    /// log is dropped. No flush callback can run meanwhile: the last one woke this thread, and the
    /// next group flush is issued here (appends, under the same lock, see PENDING).
    fn run_committer(wal: std::sync::Weak<Mutex<Wal>>, done: std::sync::mpsc::Receiver<()>) {
        while done.recv().is_ok() {
            let Some(wal) = wal.upgrade() else { return };
            let mut w = wal.lock().expect("raft log mutex poisoned by an earlier panic");
            if w.waiting.is_empty() {
                w.group.state.store(IDLE, Ordering::Release);
                continue;
            }
            let waiters = std::mem::take(&mut w.waiting);
            w.group.state.store(FLUSHING, Ordering::Release);
            let cb = FlushCallback::Group(waiters, w.group.clone(), std::time::Instant::now());
            if let Err(e) = w.log.flush(true, Some(cb)) {
                // The callback was dropped with the failed request; nobody will be told. Stopping
                // here is what makes openraft see the append as never flushed: it halts.
                tracing::error!("raft log flush failed: {e}");
                w.group.state.store(IDLE, Ordering::Release);
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Wal> {
        // A poisoned lock means a panic mid-write; the in-memory view may be half updated, and
        // continuing could ack entries that are not in the WAL. Stopping is the only safe answer.
        self.log.lock().expect("raft log mutex poisoned by an earlier panic")
    }

    /// Queues a sync flush and waits until it completes.
    async fn flush_and_wait(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.lock().log.flush(true, Some(FlushCallback::Wait(tx)))?;
        rx.await.map_err(|_| io::Error::other("raft log flush worker stopped before reporting"))?
    }

    /// Purges the log up to `log_id` and waits until that is fsync'ed, from a thread that may
    /// block (not a runtime worker). For seeding a data dir offline ([`super::seed`]).
    pub(crate) fn purge_blocking(&self, log_id: LogId) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut w = self.lock();
            w.log.purge(WalLogId(log_id))?;
            w.log.flush(true, Some(FlushCallback::Wait(tx)))?;
        }
        rx.blocking_recv().map_err(|_| io::Error::other("raft log flush worker stopped before reporting"))?
    }

    /// Log boundaries as recorded in the WAL: (vote, purged, last, committed).
    pub fn state(&self) -> (Option<Vote>, Option<LogId>, Option<LogId>, Option<LogId>) {
        let w = self.lock();
        let st = w.log.log_state();
        (
            st.vote().map(|v| v.0),
            st.purged().map(|l| l.0),
            st.last().map(|l| l.0),
            st.committed().map(|l| l.0),
        )
    }

    /// Bytes the WAL occupies on disk.
    pub fn on_disk_bytes(&self) -> u64 {
        self.lock().log.on_disk_size()
    }
}

fn index_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<KeelTypes> for LogStore {
    async fn try_get_log_entries<RB>(&mut self, range: RB) -> Result<Vec<Entry>, io::Error>
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        let (start, end) = index_range(&range);
        let w = self.lock();
        w.log.read(start, end).map(|res| res.map(|(id, payload)| Entry::new(id.0, payload.0))).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().log.log_state().vote().map(|v| v.0))
    }
}

impl RaftLogStorage<KeelTypes> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<KeelTypes>, io::Error> {
        let w = self.lock();
        let st = w.log.log_state();
        let last_purged_log_id = st.purged().map(|l| l.0);
        let last_log_id = st.last().map(|l| l.0).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.lock().log.save_vote(WalVote(*vote))?;
        self.flush_and_wait().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        if let Some(committed) = committed {
            let mut w = self.lock();
            // Buffered only: it reaches disk with the next synced write (an append's group
            // flush). Writing it out on its own would cost a hand-off to the flush thread and a
            // write(2) per commit, for a record that is allowed to be lost.
            w.log.commit(WalLogId(committed))?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().log.log_state().committed().map(|l| l.0))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<KeelTypes>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut w = self.lock();
        w.log.append(entries.into_iter().map(|e| (WalLogId(e.log_id), WalPayload(e.payload))))?;
        #[cfg(debug_assertions)]
        if let Some(late) = &mut w.late_flush {
            // The planted bug: "durable" while the entries exist only in this process's memory.
            callback.io_completed(Ok(()));
            return late.schedule();
        }
        w.waiting.push(callback);
        // Only the flush callback changes the state meanwhile (FLUSHING to IDLE, without the lock).
        loop {
            let state = &w.group.state;
            match state.load(Ordering::Acquire) {
                IDLE => {
                    if state.compare_exchange(IDLE, FLUSHING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        let waiters = std::mem::take(&mut w.waiting);
                        let cb = FlushCallback::Group(waiters, w.group.clone(), std::time::Instant::now());
                        return w
                            .log
                            .flush(true, Some(cb))
                            .inspect_err(|_| w.group.state.store(IDLE, Ordering::Release));
                    }
                }
                FLUSHING => {
                    if state.compare_exchange(FLUSHING, PENDING, Ordering::AcqRel, Ordering::Acquire).is_ok()
                    {
                        return Ok(());
                    }
                }
                _ => return Ok(()), // PENDING: the committer will flush it with the others
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let first_removed = last_log_id.map_or(0, |l| l.index + 1);
        {
            let mut w = self.lock();
            let next = w.log.log_state().last().map_or(0, |l| l.0.index + 1);
            if first_removed >= next {
                return Ok(()); // nothing after `last_log_id`
            }
            w.log.truncate(first_removed)?;
        }
        self.flush_and_wait().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut w = self.lock();
        w.log.purge(WalLogId(log_id))?;
        // A sync flush is what lets the WAL delete chunk files the purge made obsolete.
        w.log.flush(true, None)
    }
}

/// The `ack-before-fsync` planted bug's flusher: one thread that writes and fsyncs what appends
/// left in the WAL buffer, `hold` after the first of them.
#[cfg(debug_assertions)]
struct LateFlush {
    /// Wakes the late-flush thread.
    wake: std::sync::mpsc::Sender<()>,
    /// Invariant: true from a wake-up until the thread has issued the flush that covers every
    /// append made before it; so at most one wake-up is ever queued.
    scheduled: bool,
}

#[cfg(debug_assertions)]
impl LateFlush {
    fn schedule(&mut self) -> io::Result<()> {
        if self.scheduled {
            return Ok(());
        }
        // The thread stops only when a flush failed: then, as in `run_committer`, the append
        // fails and openraft halts.
        self.wake.send(()).map_err(|_| io::Error::other("raft log late-flush thread stopped"))?;
        self.scheduled = true;
        Ok(())
    }
}

/// Planted bugs for fault tests (debug builds only; see [`crate::faults`]).
#[cfg(debug_assertions)]
impl LogStore {
    /// Breaks the durability contract of `append`, for a fault-testing runner's negative control
    /// (`KEEL_FAULT_INJECTION=ack-before-fsync`): from now on, `append` calls openraft's flush
    /// callback with `Ok` at once, while the entries are only in the WAL's user-space buffer, and
    /// they are written and fsync'ed `hold` later (sooner if a vote, truncation or purge flushes
    /// first). A `kill -9` within `hold` of an acknowledgement loses the entries. A clean shutdown
    /// still writes them (closing the WAL flushes its buffer).
    pub fn plant_ack_before_fsync(&self, hold: Duration) -> io::Result<()> {
        let (wake, woken) = std::sync::mpsc::channel();
        let wal = Arc::downgrade(&self.log);
        std::thread::Builder::new()
            .name("keel-log-late-flush".into())
            .spawn(move || Self::run_late_flush(wal, woken, hold))?;
        self.lock().late_flush = Some(LateFlush { wake, scheduled: false });
        Ok(())
    }

    /// Each wake-up: waits `hold` (the point of the planted bug), then flushes the WAL buffer with
    /// an fsync. Exits when the log is dropped.
    fn run_late_flush(
        wal: std::sync::Weak<Mutex<Wal>>,
        woken: std::sync::mpsc::Receiver<()>,
        hold: Duration,
    ) {
        while woken.recv().is_ok() {
            std::thread::sleep(hold);
            let Some(wal) = wal.upgrade() else { return };
            let mut w = wal.lock().expect("raft log mutex poisoned by an earlier panic");
            if let Some(late) = &mut w.late_flush {
                late.scheduled = false;
            }
            if let Err(e) = w.log.flush(true, None) {
                tracing::error!("raft log late flush failed: {e}");
                return;
            }
        }
    }
}
