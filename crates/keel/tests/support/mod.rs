//! Shared by the integration tests: a ledger state machine whose state proves exactly-once apply,
//! and helpers to start nodes.
#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::time::Duration;

use keel::redb::ReadTransaction;
use keel::redb::ReadableTable;
use keel::redb::ReadableTableMetadata;
use keel::redb::TableDefinition;
use keel::redb::WriteTransaction;
use keel::Config;
use keel::StateMachine;
use keel::StateMachineError;
use serde::Deserialize;
use serde::Serialize;

/// seq -> command id, in apply order.
pub const LEDGER: TableDefinition<u64, u64> = TableDefinition::new("ledger");
/// "sum" -> sum of all ids; "count" -> number of rows.
pub const TOTALS: TableDefinition<&str, u64> = TableDefinition::new("totals");

/// Appends command ids to a ledger. Each command's response is the sequence number it got, so a
/// client can check its acknowledged command sits exactly where the reply said.
#[derive(Default)]
pub struct Ledger;

#[derive(Debug, Serialize, Deserialize)]
pub struct Append(pub u64);

/// A command id the ledger refuses to take (its `validate` says so).
pub const RESERVED_ID: u64 = u64::MAX;

impl StateMachine for Ledger {
    type Command = Append;
    type Response = u64;

    fn validate(&self, cmd: &Append) -> Result<(), keel::Refusal> {
        match cmd {
            Append(RESERVED_ID) => Err(keel::Refusal::new("command id u64::MAX is reserved")),
            Append(_) => Ok(()),
        }
    }

    fn apply(&self, txn: &WriteTransaction, cmds: Vec<Append>) -> Result<Vec<u64>, StateMachineError> {
        let mut ledger = txn.open_table(LEDGER)?;
        let mut totals = txn.open_table(TOTALS)?;
        let mut count = totals.get("count")?.map_or(0, |v| v.value());
        let mut sum = totals.get("sum")?.map_or(0, |v| v.value());
        let mut out = Vec::with_capacity(cmds.len());
        for Append(id) in cmds {
            ledger.insert(count, id)?;
            out.push(count);
            count += 1;
            sum = sum.wrapping_add(id);
        }
        totals.insert("count", count)?;
        totals.insert("sum", sum)?;
        Ok(out)
    }

    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError> {
        keel::dump_table(txn, LEDGER, out)?;
        keel::dump_table(txn, TOTALS, out)
    }

    fn restore(&self, txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError> {
        keel::load_table(txn, LEDGER, input)?;
        keel::load_table(txn, TOTALS, input)
    }
}

/// The ledger's rows in order, and its (count, sum) totals.
pub fn read_ledger(txn: &ReadTransaction) -> (Vec<u64>, u64, u64) {
    let rows = match txn.open_table(LEDGER) {
        Ok(t) => {
            assert_eq!(t.len().expect("len"), t.iter().expect("iter").count() as u64);
            t.iter().expect("iter").map(|r| r.expect("row").1.value()).collect()
        }
        Err(_) => Vec::new(),
    };
    let (count, sum) = match txn.open_table(TOTALS) {
        Ok(t) => (
            t.get("count").expect("get").map_or(0, |v| v.value()),
            t.get("sum").expect("get").map_or(0, |v| v.value()),
        ),
        Err(_) => (0, 0),
    };
    (rows, count, sum)
}

/// Checks the ledger is internally consistent: totals match rows, no id applied twice.
pub fn check_ledger(rows: &[u64], count: u64, sum: u64) {
    assert_eq!(rows.len() as u64, count, "count total disagrees with rows");
    assert_eq!(rows.iter().fold(0u64, |a, b| a.wrapping_add(*b)), sum, "sum total disagrees with rows");
    let mut seen = std::collections::HashSet::new();
    for id in rows {
        assert!(seen.insert(id), "command {id} applied twice");
    }
}

/// A config with fast elections for tests.
pub fn test_config(id: u64, dir: &Path) -> Config {
    let mut c = Config::new(id, dir);
    c.raft.heartbeat_interval_ms = 50;
    c.raft.election_timeout_min_ms = 300;
    c.raft.election_timeout_max_ms = 600;
    c
}

pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
