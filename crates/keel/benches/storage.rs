//! Storage benchmarks: Keel's durable log against a raw `fdatasync` loop on the same disk, and the
//! state machine apply path.
//!
//! Run: `cargo bench -p keel --bench storage` (add `-- --quick` or `KEEL_BENCH_QUICK=1` for a 10x
//! smaller smoke run). Prints one table, the bars with PASS/FAIL, then one JSON line per row
//! (lines starting with `{`). Always exits 0 unless the benchmark itself fails to run.
//!
//! Environment:
//! - `KEEL_BENCH_DIR`: directory to create the temp dir in (default: cargo's target tmp dir).
//! - `KEEL_BENCH_QUICK=1`: scale every default count down 10x.
//! - `KEEL_BENCH_SYNC_OPS`: measured appends in the 1-per-sync loops (default 10000).
//! - `KEEL_BENCH_BATCHES`: measured batches in the 64-per-sync loops (default 1000).
//! - `KEEL_BENCH_SM_KEYS`: puts applied to the state machine (default 1000000).
//! - `KEEL_BENCH_SM_BATCH`: entries per `apply` call (default 1000).
//!
//! See `bench/README.md` at the repository root.

use std::error::Error;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use keel::config::LogConfig;
use keel::config::StateMachineConfig;
use keel::redb::ReadTransaction;
use keel::redb::ReadableTableMetadata;
use keel::redb::TableDefinition;
use keel::redb::WriteTransaction;
use keel::storage::LogStore;
use keel::storage::SmStore;
use keel::types::Command;
use keel::types::Entry;
use keel::types::KeelTypes;
use keel::types::LogId;
use keel::StateMachine;
use keel::StateMachineError;
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;
use openraft::type_config::TypeConfigExt;
use rand::RngCore;
use rand::SeedableRng;
use serde::Deserialize;
use serde::Serialize;

type BoxResult<T> = Result<T, Box<dyn Error>>;

/// Bytes of user command in every log entry of the log benchmarks.
const PAYLOAD_BYTES: usize = 256;
/// Entries (or raw records) per flush in the batched loops.
const BATCH: usize = 64;
/// State machine key and value sizes.
const SM_KEY_BYTES: usize = 16;
const SM_VALUE_BYTES: usize = 256;
/// The log benchmarks run interleaved, in this many rounds.
const ROUNDS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

struct Params {
    quick: bool,
    sync_ops: usize,
    batches: usize,
    sm_keys: usize,
    sm_batch: usize,
}

fn env_count(name: &str, default: usize) -> BoxResult<usize> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(s) => match s.trim().replace('_', "").parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={s:?}: expected a positive integer").into()),
        },
    }
}

impl Params {
    fn from_env() -> BoxResult<Self> {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("KEEL_BENCH_QUICK").is_ok_and(|v| v == "1" || v == "true");
        let scale = if quick { 10 } else { 1 };
        Ok(Self {
            quick,
            sync_ops: env_count("KEEL_BENCH_SYNC_OPS", 10_000 / scale)?,
            batches: env_count("KEEL_BENCH_BATCHES", 1_000 / scale)?,
            sm_keys: env_count("KEEL_BENCH_SM_KEYS", 1_000_000 / scale)?,
            sm_batch: env_count("KEEL_BENCH_SM_BATCH", 1_000)?,
        })
    }

    /// Unmeasured iterations before each measured loop (file creation, first chunk, caches).
    fn warmup(n: usize) -> usize {
        (n / 20).clamp(5, 200)
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// One row of the table.
struct Row {
    key: &'static str,
    name: String,
    /// Units (records, entries or keys) processed in the measured part.
    units: usize,
    /// Units per fsync (per flush, per apply call).
    per_sync: usize,
    unit: &'static str,
    /// Measured time: the sum of the per-operation latencies.
    elapsed: Duration,
    /// Per-operation latencies, sorted.
    lat: Vec<Duration>,
}

impl Row {
    fn new(
        key: &'static str,
        name: impl Into<String>,
        per_sync: usize,
        unit: &'static str,
        mut lat: Vec<Duration>,
    ) -> Self {
        lat.sort_unstable();
        let elapsed = lat.iter().sum();
        Self { key, name: name.into(), units: lat.len() * per_sync, per_sync, unit, elapsed, lat }
    }

    fn rate(&self) -> f64 {
        self.units as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile, microseconds.
    fn pct_us(&self, p: f64) -> f64 {
        if self.lat.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.lat.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.lat.len()) - 1;
        self.lat[i].as_secs_f64() * 1e6
    }
}

/// A bar from the issue: a ratio, its limit, and the direction.
struct Bar {
    key: &'static str,
    name: &'static str,
    value: f64,
    limit: f64,
    higher_is_better: bool,
    unit: &'static str,
}

impl Bar {
    fn pass(&self) -> bool {
        if self.higher_is_better {
            self.value >= self.limit
        } else {
            self.value <= self.limit
        }
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Bench directory
// ---------------------------------------------------------------------------------------------

/// The file system type and device holding `path`, from /proc/mounts (Linux only).
fn fs_of(path: &Path) -> Option<(String, String)> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
            let mnt = mnt.replace("\\040", " ");
            path.starts_with(&mnt).then(|| (mnt.len(), fstype.to_string(), dev.to_string()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, fstype, dev)| (fstype, dev))
}

fn bench_base_dir() -> io::Result<PathBuf> {
    let base = match std::env::var_os("KEEL_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => match option_env!("CARGO_TARGET_TMPDIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::current_dir()?,
        },
    };
    std::fs::create_dir_all(&base)?;
    Ok(base)
}

// ---------------------------------------------------------------------------------------------
// Raw baseline
// ---------------------------------------------------------------------------------------------

/// A fresh file that gets `records_per_sync` records of `record_len` bytes appended and then is
/// `fdatasync`ed, over and over. With `one_write`, the records of one sync go out in one `write`
/// call (as a WAL writes its pending buffer); otherwise one `write` per record.
struct RawLoop {
    file: File,
    record: Vec<u8>,
    batch: Vec<u8>,
    records_per_sync: usize,
    one_write: bool,
}

impl RawLoop {
    fn open(path: &Path, record_len: usize, records_per_sync: usize, one_write: bool) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let record = vec![0xA5u8; record_len];
        let batch = record.repeat(records_per_sync);
        Ok(Self { file, record, batch, records_per_sync, one_write })
    }

    /// `warmup` unmeasured then `syncs` measured rounds; returns each measured round's latency.
    fn run(&mut self, warmup: usize, syncs: usize) -> io::Result<Vec<Duration>> {
        let mut lat = Vec::with_capacity(syncs);
        for i in 0..warmup + syncs {
            let start = Instant::now();
            if self.one_write {
                self.file.write_all(&self.batch)?;
            } else {
                for _ in 0..self.records_per_sync {
                    self.file.write_all(&self.record)?;
                }
            }
            self.file.sync_data()?;
            if i >= warmup {
                lat.push(start.elapsed());
            }
        }
        Ok(lat)
    }
}

// ---------------------------------------------------------------------------------------------
// Keel durable log
// ---------------------------------------------------------------------------------------------

fn log_id(index: u64) -> LogId {
    LogId::new(LeaderId { term: 1, node_id: 1 }, index)
}

fn make_entries(next_index: &mut u64, n: usize) -> Vec<Entry> {
    (0..n)
        .map(|_| {
            let e = Entry::new_normal(log_id(*next_index), Command(vec![0u8; PAYLOAD_BYTES]));
            *next_index += 1;
            e
        })
        .collect()
}

/// One `append` of `entries`, awaiting the flush callback.
async fn append_and_wait(store: &mut LogStore, entries: Vec<Entry>) -> io::Result<()> {
    let (tx, rx) = KeelTypes::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.map_err(|_| io::Error::other("flush callback dropped without reporting"))?
}

/// A fresh Keel log that gets `per_flush` entries appended in one `append` call, then waits for
/// the flush callback, over and over.
struct KeelLoop {
    store: LogStore,
    next_index: u64,
    per_flush: usize,
    /// Issue `per_flush` separate one-entry appends back to back (as openraft does under load)
    /// instead of one append of `per_flush` entries; group commit should fold them into few fsyncs.
    separate_appends: bool,
}

impl KeelLoop {
    fn open(dir: &Path, config: &LogConfig, per_flush: usize) -> BoxResult<Self> {
        Ok(Self { store: LogStore::open(dir, config)?, next_index: 1, per_flush, separate_appends: false })
    }

    /// `warmup` unmeasured then `flushes` measured rounds. The latency is from the `append` call
    /// to the flush callback; entries are built before the clock starts.
    async fn run(&mut self, warmup: usize, flushes: usize) -> BoxResult<Vec<Duration>> {
        let mut lat = Vec::with_capacity(flushes);
        for i in 0..warmup + flushes {
            let entries = make_entries(&mut self.next_index, self.per_flush);
            let start = Instant::now();
            if self.separate_appends {
                let mut waits = Vec::with_capacity(entries.len());
                for e in entries {
                    let (tx, rx) = KeelTypes::oneshot();
                    self.store.append([e], IOFlushed::signal(tx)).await?;
                    waits.push(rx);
                }
                for rx in waits {
                    rx.await.map_err(|_| io::Error::other("flush callback dropped without reporting"))??;
                }
            } else {
                append_and_wait(&mut self.store, entries).await?;
            }
            if i >= warmup {
                lat.push(start.elapsed());
            }
        }
        Ok(lat)
    }
}

/// The WAL bytes one log entry with a `PAYLOAD_BYTES` command takes, so the raw loop writes the
/// same amount per record.
async fn calibrate_record_len(dir: &Path) -> BoxResult<usize> {
    const N: usize = 256;
    let mut store = LogStore::open(dir, &LogConfig::default())?;
    let mut next_index = 1u64;
    append_and_wait(&mut store, make_entries(&mut next_index, 1)).await?;
    let before = store.on_disk_bytes();
    append_and_wait(&mut store, make_entries(&mut next_index, N)).await?;
    let after = store.on_disk_bytes();
    let per_entry = (after.saturating_sub(before) as usize).div_ceil(N);
    if per_entry < PAYLOAD_BYTES {
        return Err(format!("calibration: WAL grew {per_entry} bytes per {PAYLOAD_BYTES}-byte entry").into());
    }
    Ok(per_entry)
}

// ---------------------------------------------------------------------------------------------
// State machine apply
// ---------------------------------------------------------------------------------------------

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

#[derive(Debug, Serialize, Deserialize)]
struct Put {
    #[serde(with = "serde_bytes")]
    key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

/// A minimal key-value state machine: every command is a put.
struct Kv;

impl StateMachine for Kv {
    type Command = Put;
    type Response = ();

    fn apply(&self, txn: &WriteTransaction, commands: Vec<Put>) -> Result<Vec<()>, StateMachineError> {
        let mut table = txn.open_table(KV)?;
        let n = commands.len();
        for Put { key, value } in commands {
            table.insert(key.as_slice(), value.as_slice())?;
        }
        Ok(vec![(); n])
    }

    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError> {
        keel::dump_table(txn, KV, out)
    }

    fn restore(&self, txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError> {
        keel::load_table(txn, KV, input)
    }
}

/// SplitMix64: spreads sequential numbers over the key space.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Key `i`: 8 scattered bytes then `i` itself, so keys are distinct and arrive in random order.
fn sm_key(i: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(SM_KEY_BYTES);
    k.extend_from_slice(&splitmix64(i).to_be_bytes());
    k.extend_from_slice(&i.to_be_bytes());
    k
}

struct SmResult {
    batches: Vec<Duration>,
    per_batch: usize,
    keys: usize,
    wall: Duration,
    db_bytes: u64,
}

/// Applies `keys` puts through `RaftStateMachine::apply`, `batch` entries per call. Only the
/// `apply` calls are timed (entry building and command encoding are not).
async fn sm_apply(dir: &Path, keys: usize, batch: usize) -> BoxResult<SmResult> {
    let config = StateMachineConfig { verify_on_start: false, ..Default::default() };
    // Unlike `LogStore::open`, `SmStore::open` does not create its directory.
    std::fs::create_dir_all(dir)?;
    let mut store = SmStore::open(dir, 1, &config, Kv)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_656c);
    let mut batches = Vec::with_capacity(keys.div_ceil(batch));
    let wall = Instant::now();
    let mut i = 0usize;
    while i < keys {
        let n = batch.min(keys - i);
        let mut entries = Vec::with_capacity(n);
        for k in i..i + n {
            let mut value = vec![0u8; SM_VALUE_BYTES];
            rng.fill_bytes(&mut value);
            let cmd = keel::codec::to_bytes(&Put { key: sm_key(k as u64), value })?;
            entries.push(Entry::new_normal(log_id(k as u64 + 1), Command(cmd)));
        }
        let stream = futures_util::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
        let start = Instant::now();
        store.apply(stream).await?;
        batches.push(start.elapsed());
        i += n;
    }
    let wall = wall.elapsed();

    // Check the work was done: every key is in the table and the applied position is the last.
    let rows = store.read(|_, txn| -> BoxResult<u64> { Ok(txn.open_table(KV)?.len()?) })??;
    if rows != keys as u64 {
        return Err(format!("state machine holds {rows} keys after {keys} distinct puts").into());
    }
    let last = store.applied()?.last_applied.map(|l| l.index);
    if last != Some(keys as u64) {
        return Err(format!("last_applied is {last:?} after {keys} entries").into());
    }
    let db_bytes = std::fs::metadata(dir.join("state.redb")).map(|m| m.len()).unwrap_or(0);
    Ok(SmResult { batches, per_batch: batch, keys, wall, db_bytes })
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn main() -> BoxResult<()> {
    let params = Params::from_env()?;
    let base = bench_base_dir()?;
    let tmp = tempfile::Builder::new().prefix("keel-bench-").tempdir_in(&base)?;
    let dir = tmp.path().to_path_buf();
    let (fstype, dev) = fs_of(&dir).unwrap_or_else(|| ("unknown".into(), "unknown".into()));

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();

    let record_len = rt.block_on(calibrate_record_len(&dir.join("calibrate")))?;

    println!("Keel storage benchmark{}", if params.quick { " (quick: counts / 10)" } else { "" });
    println!("  dir:      {} ({fstype} on {dev})", dir.display());
    if fstype == "tmpfs" || fstype == "ramfs" {
        println!(
            "  WARNING:  {fstype} never reaches a disk; set KEEL_BENCH_DIR to a directory on a real disk"
        );
    }
    println!(
        "  log:      {PAYLOAD_BYTES}-byte commands = {record_len} WAL bytes per entry (measured); raw records \
         are {record_len} bytes"
    );
    println!(
        "  log cfg:  LogConfig::default() (flush_batch_wait_us = {}) unless the row says otherwise",
        LogConfig::default().flush_batch_wait_us
    );
    println!(
        "  counts:   {} x 1/sync, {} x {BATCH}/sync (+warm-up; interleaved in {ROUNDS} rounds), {} state \
         machine puts in batches of {}",
        params.sync_ops, params.batches, params.sm_keys, params.sm_batch
    );
    println!();

    let mut rows = Vec::new();

    // 1 and 2: the raw baseline and the Keel log, interleaved in rounds so that drift in the disk's
    // speed during the run hits all of them alike. Each loop keeps appending to its own file or log.
    let mut raw1 = RawLoop::open(&dir.join("raw-1.dat"), record_len, 1, true)?;
    let mut raw64w = RawLoop::open(&dir.join("raw-64w.dat"), record_len, BATCH, false)?;
    let mut raw64 = RawLoop::open(&dir.join("raw-64.dat"), record_len, BATCH, true)?;
    let mut keel1 = KeelLoop::open(&dir.join("log-1"), &LogConfig::default(), 1)?;
    let mut keel64_separate = KeelLoop::open(&dir.join("log-64-separate"), &LogConfig::default(), BATCH)?;
    keel64_separate.separate_appends = true;
    let mut keel64 = KeelLoop::open(&dir.join("log-64"), &LogConfig::default(), BATCH)?;
    let mut lat: [Vec<Duration>; 6] = Default::default();
    for round in 0..ROUNDS {
        let share = |n: usize| n * (round + 1) / ROUNDS - n * round / ROUNDS;
        let warm = |n: usize| if round == 0 { Params::warmup(n) } else { 0 };
        let (ops, batches) = (params.sync_ops, params.batches);
        lat[0].extend(raw1.run(warm(ops), share(ops))?);
        lat[1].extend(raw64w.run(warm(batches), share(batches))?);
        lat[2].extend(raw64.run(warm(batches), share(batches))?);
        lat[3].extend(rt.block_on(keel1.run(warm(ops), share(ops)))?);
        lat[4].extend(rt.block_on(keel64_separate.run(warm(batches), share(batches)))?);
        lat[5].extend(rt.block_on(keel64.run(warm(batches), share(batches)))?);
    }
    drop((raw1, raw64w, raw64, keel1, keel64_separate, keel64));
    let [l0, l1, l2, l3, l4, l5] = lat;
    rows.push(Row::new("raw_1_per_fdatasync", "raw: write + fdatasync", 1, "records", l0));
    rows.push(Row::new(
        "raw_64_writes_per_fdatasync",
        format!("raw: {BATCH} writes + fdatasync"),
        BATCH,
        "records",
        l1,
    ));
    rows.push(Row::new(
        "raw_64_per_fdatasync",
        format!("raw: 1 write of {BATCH} + fdatasync"),
        BATCH,
        "records",
        l2,
    ));
    rows.push(Row::new("keel_log_1_per_flush", "keel log: 1 entry/flush", 1, "entries", l3));
    rows.push(Row::new(
        "keel_log_64_separate_appends",
        format!("keel log: {BATCH} appends of 1, grouped"),
        BATCH,
        "entries",
        l4,
    ));
    rows.push(Row::new(
        "keel_log_64_per_flush",
        format!("keel log: {BATCH} entries/flush"),
        BATCH,
        "entries",
        l5,
    ));

    // 3. State machine apply.
    let sm = rt.block_on(sm_apply(&dir.join("sm"), params.sm_keys, params.sm_batch))?;
    let sm_row = Row::new(
        "keel_sm_apply",
        format!("keel sm: apply puts, {}/call", sm.per_batch),
        sm.per_batch,
        "keys",
        sm.batches,
    );
    // The last batch may be short: count keys, not batches.
    let sm_row = Row { units: sm.keys, ..sm_row };
    rows.push(sm_row);

    let find = |key: &str| rows.iter().find(|r| r.key == key).expect("every row is pushed above");
    let (raw1, raw64) = (find("raw_1_per_fdatasync"), find("raw_64_per_fdatasync"));
    let (raw64w, keel1, keel64) =
        (find("raw_64_writes_per_fdatasync"), find("keel_log_1_per_flush"), find("keel_log_64_per_flush"));
    let keel64_separate = find("keel_log_64_separate_appends");
    let bars = [
        Bar {
            key: "keel64_rate_pct_of_raw64_appends",
            name: "keel 64/flush entries/s as % of raw (64 appends + fdatasync)",
            value: 100.0 * keel64.rate() / raw64w.rate(),
            limit: 80.0,
            higher_is_better: true,
            unit: "%",
        },
        Bar {
            key: "keel1_p50_over_raw1_p50",
            name: "keel 1/flush p50 latency / raw fdatasync p50",
            value: keel1.pct_us(50.0) / raw1.pct_us(50.0),
            limit: 1.5,
            higher_is_better: false,
            unit: "x",
        },
    ];
    let info = [
        (
            "keel64_rate_pct_of_raw64_one_write",
            "  (stricter: against raw 1 write of 64 + fdatasync)",
            100.0 * keel64.rate() / raw64.rate(),
            "%",
        ),
        (
            "keel1_rate_pct_of_raw1",
            "keel 1/flush entries/s as % of raw 1-per-fdatasync",
            100.0 * keel1.rate() / raw1.rate(),
            "%",
        ),
        (
            "keel1_p99_over_raw1_p99",
            "keel 1/flush p99 latency / raw fdatasync p99",
            keel1.pct_us(99.0) / raw1.pct_us(99.0),
            "x",
        ),
        (
            "keel64_separate_rate_pct_of_raw64",
            "keel 64 separate appends (group commit) entries/s as % of raw 64-per-fdatasync",
            100.0 * keel64_separate.rate() / raw64.rate(),
            "%",
        ),
    ];

    // The table.
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(9);
    println!(
        "| {:<w$} | {:>9} | {:>8} | {:>20} | {:>9} | {:>9} |",
        "benchmark", "count", "per sync", "throughput", "p50 us", "p99 us"
    );
    println!("|-{:-<w$}-|-{:->9}-|-{:->8}-|-{:->20}-|-{:->9}-|-{:->9}-|", "", "", "", "", "", "");
    for r in &rows {
        println!(
            "| {:<w$} | {:>9} | {:>8} | {:>20} | {:>9.1} | {:>9.1} |",
            r.name,
            r.units,
            r.per_sync,
            format!("{:.0} {}/s", r.rate(), r.unit),
            r.pct_us(50.0),
            r.pct_us(99.0),
        );
    }
    println!();
    println!("Bars:");
    for b in &bars {
        let op = if b.higher_is_better { ">=" } else { "<=" };
        println!(
            "  {:<66} {:>7.2}{:<2} (bar {op} {}{})  {}",
            b.name,
            b.value,
            b.unit,
            b.limit,
            b.unit,
            if b.pass() { "PASS" } else { "FAIL" }
        );
    }
    for (_, name, value, unit) in &info {
        println!("  {name:<66} {value:>7.2}{unit}");
    }
    println!();
    println!(
        "State machine: {} keys in {:.1}s wall ({:.1}s in apply), redb file {:.0} MiB",
        sm.keys,
        sm.wall.as_secs_f64(),
        rows.last().map_or(0.0, |r| r.elapsed.as_secs_f64()),
        sm.db_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("Total run time: {:.1}s", started.elapsed().as_secs_f64());
    println!();

    // One JSON line per row, for scripts.
    let dir_json = json_str(&dir.display().to_string());
    for r in &rows {
        println!(
            "{{\"bench\":{},\"name\":{},\"unit\":{},\"count\":{},\"per_sync\":{},\"ops\":{},\"rate_per_s\":{:.1},\
             \"p50_us\":{:.1},\"p99_us\":{:.1},\"record_bytes\":{},\"quick\":{},\"dir\":{dir_json},\"fs\":{}}}",
            json_str(r.key),
            json_str(&r.name),
            json_str(r.unit),
            r.units,
            r.per_sync,
            r.lat.len(),
            r.rate(),
            r.pct_us(50.0),
            r.pct_us(99.0),
            if r.key == "keel_sm_apply" { SM_KEY_BYTES + SM_VALUE_BYTES } else { record_len },
            params.quick,
            json_str(&fstype),
        );
    }
    for b in &bars {
        println!(
            "{{\"check\":{},\"name\":{},\"value\":{:.3},\"bar\":{},\"op\":{},\"pass\":{}}}",
            json_str(b.key),
            json_str(b.name),
            b.value,
            b.limit,
            json_str(if b.higher_is_better { ">=" } else { "<=" }),
            b.pass()
        );
    }
    for (key, name, value, _) in &info {
        println!("{{\"info\":{},\"name\":{},\"value\":{:.3}}}", json_str(key), json_str(name.trim()), value);
    }

    drop(rt);
    tmp.close()?;
    Ok(())
}
