//! openraft's storage conformance suite, on the durable log and on the in-memory log.

mod support;

use keel::config::LogConfig;
use keel::config::StateMachineConfig;
use keel::openraft::testing::log::StoreBuilder;
use keel::openraft::testing::log::Suite;
use keel::openraft::StorageError;
use keel::storage::LogStore;
use keel::storage::MemLogStore;
use keel::storage::SmStore;
use keel::types::KeelTypes;
use support::Ledger;
use tempfile::TempDir;

struct Durable;

impl StoreBuilder<KeelTypes, LogStore, SmStore<Ledger>, TempDir> for Durable {
    async fn build(&self) -> Result<(TempDir, LogStore, SmStore<Ledger>), StorageError<KeelTypes>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("log"), &LogConfig::default()).expect("open log");
        let sm = SmStore::open(dir.path(), 1, &StateMachineConfig::default(), Ledger).expect("open sm");
        Ok((dir, log, sm))
    }
}

struct InMemory;

impl StoreBuilder<KeelTypes, MemLogStore, SmStore<Ledger>, TempDir> for InMemory {
    async fn build(&self) -> Result<(TempDir, MemLogStore, SmStore<Ledger>), StorageError<KeelTypes>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let sm = SmStore::open(dir.path(), 1, &StateMachineConfig::default(), Ledger).expect("open sm");
        Ok((dir, MemLogStore::new(), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_log_passes_openraft_suite() -> Result<(), StorageError<KeelTypes>> {
    support::init_tracing();
    Suite::test_all(Durable).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_log_passes_openraft_suite() -> Result<(), StorageError<KeelTypes>> {
    support::init_tracing();
    Suite::test_all(InMemory).await
}
