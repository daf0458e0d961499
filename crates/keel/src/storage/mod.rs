//! Storage: the durable Raft log, the state machine database, and snapshot files.

pub mod log_store;
pub mod mem_log_store;
pub mod seed;
pub mod sm_store;
pub mod snapshot;
pub mod wal_repair;

pub use log_store::LogStore;
pub use mem_log_store::MemLogStore;
pub use sm_store::SmStore;
