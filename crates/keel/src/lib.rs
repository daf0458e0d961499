//! Keel: replicate your own state machine with Raft.
//!
//! Implement [`StateMachine`] (apply a batch of commands, write a snapshot, restore one) over the
//! redb database Keel hands you, build a [`Node`] from a [`Config`], and Keel provides the durable
//! log, snapshots, membership changes and linearizable reads, on openraft.
//!
//! # Layout
//!
//! - [`types`]: the openraft type configuration and Raft vocabulary (`NodeId`, `LogIndex`, …).
//! - [`config`]: TOML-loadable, validated node configuration.
//! - [`faults`]: planted bugs for fault-test negative controls (`KEEL_FAULT_INJECTION`, debug
//!   builds only).
//! - [`state_machine`]: the trait users implement.
//! - [`node`]: `Node<SM>` — start, propose, read, membership, metrics, shutdown.
//! - [`storage`]: the durable Raft log (raft-log WAL), the state machine adapter (redb), snapshot
//!   files, and an in-memory log for tests.
//! - [`network`]: the peer transport seam ([`network::RaftService`]), the gRPC
//!   transport (tonic) and the in-process transport.
//! - [`forward`]: how a follower hands writes, read indexes and membership changes to the leader.
//! - [`inspect`]: offline inspection of a data dir.
//! - [`metrics`]: the storage's timings as Prometheus histograms, for the embedding program.
//! - [`error`]: one error enum per operation family.
//! - [`codec`]: the byte encodings on disk.

pub mod codec;
pub mod config;
pub mod error;
pub mod faults;
pub mod forward;
pub mod inspect;
pub mod metrics;
pub mod network;
pub mod node;
pub mod state_machine;
pub mod storage;
pub mod tls;
pub mod types;

pub use config::Config;
pub use error::AdminError;
pub use error::NotLeader;
pub use error::ProposeError;
pub use error::ReadError;
pub use error::StartError;
pub use error::WaitTimeout;
pub use network::in_process::InProcessRouter;
pub use node::Node;
pub use openraft;
/// The embedded database state machines keep their state in.
pub use redb;
pub use state_machine::dump_table;
pub use state_machine::load_table;
pub use state_machine::scan_table;
pub use state_machine::Refusal;
pub use state_machine::StateMachine;
pub use state_machine::StateMachineError;
pub use types::LogIndex;
pub use types::NodeId;
pub use types::NodeInfo;
pub use types::Term;
