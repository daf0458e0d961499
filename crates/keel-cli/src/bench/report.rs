//! What a run measured: per-client tallies (latency histogram, errors), merged into one row,
//! printed as a table or as one JSON line. Pure: tests assert on strings.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Plan, WatchSpec, Workload};
use crate::output;

/// Distinct error messages kept (with their counts) for the report; later ones are only counted.
pub const DISTINCT_ERRORS_SHOWN: usize = 5;
/// Latencies above this (60 s, far over any request timeout) are recorded as this.
const HIGHEST_US: u64 = 60_000_000;

/// One client's (or, merged, the run's) measurements.
#[derive(Clone, Debug)]
pub struct Tally {
    /// Latency of each successful measured request, in microseconds.
    pub latency_us: Histogram<u64>,
    pub errors: ErrorTally,
}

impl Default for Tally {
    #[allow(clippy::expect_used)]
    fn default() -> Self {
        Tally {
            latency_us: Histogram::new_with_bounds(1, HIGHEST_US, 3)
                .expect("constant bounds: low 1 >= 1, high >= 2 * low, 3 significant figures <= 5"),
            errors: ErrorTally::default(),
        }
    }
}

impl Tally {
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, HIGHEST_US);
        self.latency_us.saturating_record(us);
    }

    pub fn merge(&mut self, other: &Tally) {
        // Both have the same bounds, so adding cannot fail; if it ever did the counts would
        // show it (ops lower than expected) rather than abort the report.
        let _ = self.latency_us.add(&other.latency_us);
        self.errors.merge(&other.errors);
    }
}

/// Failed requests: the total, and the first few distinct messages with their counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorTally {
    pub total: u64,
    /// In order of first appearance; at most `DISTINCT_ERRORS_SHOWN`.
    pub first: Vec<(String, u64)>,
}

impl ErrorTally {
    pub fn add(&mut self, message: String) {
        self.add_n(message, 1);
    }

    fn add_n(&mut self, message: String, n: u64) {
        self.total += n;
        if let Some((_, count)) = self.first.iter_mut().find(|(m, _)| *m == message) {
            *count += n;
        } else if self.first.len() < DISTINCT_ERRORS_SHOWN {
            self.first.push((message, n));
        }
    }

    pub fn merge(&mut self, other: &ErrorTally) {
        let listed: u64 = other.first.iter().map(|(_, n)| n).sum();
        for (message, n) in &other.first {
            self.add_n(message.clone(), *n);
        }
        self.total += other.total - listed;
    }

    /// Lines for stderr: the total, then each distinct message kept.
    pub fn describe(&self) -> String {
        if self.total == 0 {
            return String::new();
        }
        let mut out = format!("errors: {}\n", self.total);
        for (message, n) in &self.first {
            out.push_str(&format!("  {n} x {message}\n"));
        }
        let listed: u64 = self.first.iter().map(|(_, n)| n).sum();
        if self.total > listed {
            out.push_str(&format!("  {} x other errors\n", self.total - listed));
        }
        out
    }
}

/// The result of a run, as one table row and one JSON line (fields in this order).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub op: &'static str,
    /// How gets read; `null` for `--op put`.
    pub consistency: Option<&'static str>,
    /// Fraction of gets with `--op mixed`, else `null`.
    pub read_ratio: Option<f64>,
    pub clients: usize,
    pub conns: usize,
    pub value_size: usize,
    /// Successful measured requests.
    pub ops: u64,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub errors: u64,
    /// From the start of the measurement to the last measured answer.
    pub duration_s: f64,
    /// `--op keepalive` and `--op lease-load`: the leases granted; absent for other ops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<u64>,
    /// `--op lease-load`: lease 0's id (key 0 is attached to it), for `--op lease-ready`; absent
    /// for other ops, and if lease 0 failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_lease: Option<i64>,
}

impl Row {
    pub fn new(plan: &Plan, tally: &Tally, elapsed: Duration) -> Row {
        let h = &tally.latency_us;
        let ops = h.len();
        let secs = elapsed.as_secs_f64();
        let ops_per_s = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
        let at = |q: f64| if ops == 0 { 0 } else { h.value_at_quantile(q) };
        Row {
            op: plan.workload.name(),
            consistency: match plan.workload {
                Workload::Get | Workload::Mixed { .. } => Some(plan.consistency.name()),
                _ => None,
            },
            read_ratio: match plan.workload {
                Workload::Mixed { read_ratio } => Some(read_ratio),
                _ => None,
            },
            clients: plan.clients,
            conns: plan.conns,
            value_size: plan.value_size,
            ops,
            ops_per_s: round_to(ops_per_s, 1),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: if ops == 0 { 0 } else { h.max() },
            errors: tally.errors.total,
            duration_s: round_to(secs, 3),
            leases: None,
            sample_lease: None,
        }
    }

    /// The JSON line (with its newline).
    pub fn json_line(&self) -> String {
        // Straight from the struct (not through a `Value`, which would sort the fields). A struct
        // of numbers, strings and options always serializes.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// The table: a header and one row.
    pub fn table(&self) -> String {
        let op = match (self.consistency, self.read_ratio) {
            (None, _) => match self.leases {
                Some(n) => format!("{} ({n} leases)", self.op),
                None => self.op.to_owned(),
            },
            (Some(c), None) => format!("{} ({c})", self.op),
            (Some(c), Some(r)) => format!("{} {:.0}% get ({c})", self.op, r * 100.0),
        };
        let row = vec![
            op,
            self.clients.to_string(),
            self.conns.to_string(),
            self.ops.to_string(),
            format!("{:.1}", self.ops_per_s),
            self.p50_us.to_string(),
            self.p90_us.to_string(),
            self.p99_us.to_string(),
            self.p999_us.to_string(),
            self.max_us.to_string(),
            self.errors.to_string(),
            format!("{:.3}", self.duration_s),
        ];
        output::table(
            &[
                "OP",
                "CLIENTS",
                "CONNS",
                "OPS",
                "OPS/S",
                "P50 µs",
                "P90 µs",
                "P99 µs",
                "P99.9 µs",
                "MAX µs",
                "ERRORS",
                "SECS",
            ],
            &[row],
        )
    }
}

/// The result of a watch run (`--op watch`), as one table row and one JSON line (fields in this
/// order). Latencies are from just before a put is sent to a watcher's receipt of its event, one
/// sample per watcher and measured put, as etcd's `benchmark watch-latency` measures them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WatchRow {
    pub op: &'static str,
    pub watchers: usize,
    pub streams: usize,
    pub conns: usize,
    /// Most puts in flight.
    pub clients: usize,
    /// Puts per second asked for.
    pub rate: u64,
    pub value_size: usize,
    /// Measured puts acknowledged.
    pub puts: u64,
    /// Put sent → put acknowledged.
    pub put_p50_us: u64,
    pub put_p99_us: u64,
    /// Events of measured puts received, over all watchers.
    pub events: u64,
    pub events_per_s: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Acknowledged puts (warm-up included) whose event a watcher never got, summed over watchers.
    pub missed: u64,
    /// Failed puts, broken streams, canceled watchers, unexpected events.
    pub errors: u64,
    /// From the start of the measurement to the last measured event received (or the last put
    /// sent, if later).
    pub duration_s: f64,
}

impl WatchRow {
    pub fn new(
        plan: &Plan,
        spec: WatchSpec,
        puts: &Tally,
        events: &Tally,
        missed: u64,
        errors: u64,
        elapsed: Duration,
    ) -> WatchRow {
        let secs = elapsed.as_secs_f64();
        let n = events.latency_us.len();
        WatchRow {
            op: "watch",
            watchers: spec.watchers,
            streams: spec.streams,
            conns: plan.conns,
            clients: plan.clients,
            rate: spec.rate,
            value_size: plan.value_size,
            puts: puts.latency_us.len(),
            put_p50_us: quantile(puts, 0.5),
            put_p99_us: quantile(puts, 0.99),
            events: n,
            events_per_s: round_to(if secs > 0.0 { n as f64 / secs } else { 0.0 }, 1),
            p50_us: quantile(events, 0.5),
            p90_us: quantile(events, 0.9),
            p99_us: quantile(events, 0.99),
            p999_us: quantile(events, 0.999),
            max_us: if n == 0 { 0 } else { events.latency_us.max() },
            missed,
            errors,
            duration_s: round_to(secs, 3),
        }
    }

    /// The JSON line (with its newline).
    pub fn json_line(&self) -> String {
        // As Row::json_line: a struct of numbers and strings always serializes.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// The table: a header and one row.
    pub fn table(&self) -> String {
        let row = vec![
            self.op.to_owned(),
            self.watchers.to_string(),
            self.streams.to_string(),
            self.conns.to_string(),
            self.puts.to_string(),
            self.put_p99_us.to_string(),
            self.events.to_string(),
            format!("{:.1}", self.events_per_s),
            self.p50_us.to_string(),
            self.p90_us.to_string(),
            self.p99_us.to_string(),
            self.p999_us.to_string(),
            self.max_us.to_string(),
            self.missed.to_string(),
            self.errors.to_string(),
            format!("{:.3}", self.duration_s),
        ];
        output::table(
            &[
                "OP",
                "WATCHERS",
                "STREAMS",
                "CONNS",
                "PUTS",
                "PUT P99 µs",
                "EVENTS",
                "EVENTS/S",
                "P50 µs",
                "P90 µs",
                "P99 µs",
                "P99.9 µs",
                "MAX µs",
                "MISSED",
                "ERRORS",
                "SECS",
            ],
            &[row],
        )
    }
}

/// What `--op lease-ready` found: when a restarted store first answered the Range, and when it was
/// ready (the LeaseTimeToLive answered too), as wall-clock times that a script can compare with
/// the moment it started the server.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReadyRow {
    pub op: &'static str,
    pub lease: i64,
    /// The TTL LeaseTimeToLive answered.
    pub ttl: i64,
    /// Attempts made, the successful one included.
    pub attempts: u64,
    /// When the linearizable Range first succeeded, in µs since the Unix epoch.
    pub range_unix_us: u64,
    /// When LeaseTimeToLive succeeded (after the Range), in µs since the Unix epoch.
    pub ready_unix_us: u64,
    /// From the probe's start to ready.
    pub waited_s: f64,
}

impl ReadyRow {
    pub fn new(
        lease: i64,
        ttl: i64,
        attempts: u64,
        range_unix_us: u64,
        ready_unix_us: u64,
        waited: Duration,
    ) -> Self {
        ReadyRow {
            op: "lease-ready",
            lease,
            ttl,
            attempts,
            range_unix_us,
            ready_unix_us,
            waited_s: round_to(waited.as_secs_f64(), 3),
        }
    }

    /// The JSON line (with its newline).
    pub fn json_line(&self) -> String {
        // As Row::json_line: a struct of numbers and strings always serializes.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// The table: a header and one row.
    pub fn table(&self) -> String {
        let row = vec![
            self.op.to_owned(),
            self.lease.to_string(),
            self.ttl.to_string(),
            self.attempts.to_string(),
            format!("{:.3}", self.waited_s),
        ];
        output::table(&["OP", "LEASE", "TTL", "ATTEMPTS", "WAITED S"], &[row])
    }
}

fn quantile(tally: &Tally, q: f64) -> u64 {
    if tally.latency_us.is_empty() {
        0
    } else {
        tally.latency_us.value_at_quantile(q)
    }
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{BenchArgs, Consistency, OpArg};
    use super::*;

    /// Counts per distinct message, whatever the order they were first seen in.
    fn counts(errors: &ErrorTally) -> BTreeMap<String, u64> {
        errors.first.iter().cloned().collect()
    }

    fn plan_args() -> BenchArgs {
        BenchArgs {
            clients: 64,
            conns: 4,
            op: OpArg::Put,
            read_ratio: None,
            consistency: Consistency::Serializable,
            key_space: 1000,
            value_size: 256,
            duration: None,
            ops: None,
            warmup: Duration::ZERO,
            target_leader: false,
            preload: 0,
            watchers: None,
            streams: None,
            rate: None,
            leases: None,
            ttl: None,
            window: None,
            lease_id: None,
        }
    }

    fn plan(op: OpArg, read_ratio: Option<f64>) -> Plan {
        BenchArgs { op, read_ratio, ..plan_args() }.plan().expect("valid plan")
    }

    fn tally(latencies_us: impl IntoIterator<Item = u64>) -> Tally {
        let mut t = Tally::default();
        for us in latencies_us {
            t.record(Duration::from_micros(us));
        }
        t
    }

    #[test]
    fn json_line_has_the_fields_in_order() {
        let mut t = tally(1..=1000);
        t.errors.add("Unavailable: leader changed".to_owned());
        let row = Row::new(&plan(OpArg::Get, None), &t, Duration::from_millis(2000));
        assert_eq!(
            row.json_line(),
            "{\"op\":\"get\",\"consistency\":\"serializable\",\"read_ratio\":null,\"clients\":64,\"conns\":4,\
             \"value_size\":256,\"ops\":1000,\"ops_per_s\":500.0,\"p50_us\":500,\"p90_us\":900,\"p99_us\":990,\
             \"p999_us\":999,\"max_us\":1000,\"errors\":1,\"duration_s\":2.0}\n"
        );
        let row = Row::new(&plan(OpArg::Put, None), &t, Duration::from_millis(2000));
        assert!(row.json_line().starts_with("{\"op\":\"put\",\"consistency\":null,\"read_ratio\":null,"));
        let row = Row::new(&plan(OpArg::Mixed, Some(0.9)), &t, Duration::from_millis(2000));
        assert!(row
            .json_line()
            .starts_with("{\"op\":\"mixed\",\"consistency\":\"serializable\",\"read_ratio\":0.9,"));
    }

    #[test]
    fn a_watch_row_has_its_fields_in_order() {
        let plan = BenchArgs {
            op: OpArg::Watch,
            clients: 8,
            conns: 2,
            watchers: Some(100),
            streams: Some(4),
            rate: None,
            consistency: Consistency::Linearizable,
            ..plan_args()
        }
        .plan()
        .expect("valid plan");
        let Workload::Watch(spec) = plan.workload else { panic!("a watch plan") };
        let mut puts = tally([1000, 2000]);
        puts.errors.add("put: Unavailable: leader changed".to_owned());
        let row = WatchRow::new(&plan, spec, &puts, &tally(1..=1000), 3, 1, Duration::from_millis(500));
        assert_eq!(
            row.json_line(),
            "{\"op\":\"watch\",\"watchers\":100,\"streams\":4,\"conns\":2,\"clients\":8,\"rate\":100,\
             \"value_size\":256,\"puts\":2,\"put_p50_us\":1000,\"put_p99_us\":2000,\"events\":1000,\
             \"events_per_s\":2000.0,\"p50_us\":500,\"p90_us\":900,\"p99_us\":990,\"p999_us\":999,\
             \"max_us\":1000,\"missed\":3,\"errors\":1,\"duration_s\":0.5}\n"
        );
        let text = row.table();
        assert!(
            text.starts_with("OP     WATCHERS  STREAMS  CONNS  PUTS  PUT P99 µs  EVENTS  EVENTS/S"),
            "{text}"
        );
        assert!(
            text.lines().nth(1).expect("a row").starts_with("watch  100       4        2      2     2000 "),
            "{text}"
        );
        let empty = WatchRow::new(&plan, spec, &Tally::default(), &Tally::default(), 0, 0, Duration::ZERO);
        assert_eq!((empty.events_per_s, empty.p99_us, empty.put_p99_us, empty.max_us), (0.0, 0, 0, 0));
    }

    #[test]
    fn an_empty_run_reports_zeros_not_garbage() {
        let row = Row::new(&plan(OpArg::Put, None), &Tally::default(), Duration::ZERO);
        assert_eq!((row.ops, row.ops_per_s, row.p99_us, row.max_us, row.duration_s), (0, 0.0, 0, 0, 0.0));
    }

    #[test]
    fn latencies_are_clamped_into_the_histogram() {
        let t = tally([0, 120_000_000]);
        assert_eq!(t.latency_us.len(), 2);
        assert_eq!(t.latency_us.min(), 1);
        assert!(t.latency_us.max() >= HIGHEST_US);
    }

    #[test]
    fn table_has_a_header_and_one_row() {
        let row = Row::new(&plan(OpArg::Mixed, Some(0.25)), &tally([100, 200]), Duration::from_secs(1));
        let text = row.table();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("OP "));
        assert!(lines[1].starts_with("mixed 25% get (serializable)  64 "), "{text}");
    }

    #[test]
    fn errors_keep_the_first_distinct_messages_and_count_all() {
        let mut a = ErrorTally::default();
        for i in 0..8 {
            a.add(format!("e{}", i % 7));
        }
        assert_eq!(a.total, 8);
        assert_eq!(a.first.len(), DISTINCT_ERRORS_SHOWN);
        assert_eq!(a.first[0], ("e0".to_owned(), 2));
        let mut b = ErrorTally::default();
        b.add("e1".to_owned());
        b.add("x".to_owned());
        let mut merged = b.clone();
        merged.merge(&a);
        assert_eq!(merged.total, 10);
        assert_eq!(counts(&merged)["e1"], 2);
        assert_eq!(counts(&merged)["x"], 1);
        assert!(merged.describe().starts_with("errors: 10\n  2 x e1\n  1 x x\n"), "{}", merged.describe());
        assert!(merged.describe().ends_with("  3 x other errors\n"), "{}", merged.describe());
        assert_eq!(ErrorTally::default().describe(), "");
    }
}
