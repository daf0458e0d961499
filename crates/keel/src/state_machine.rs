//! The trait a user implements to replicate their own state.
//!
//! A state machine keeps its state in the redb database Keel hands it: `apply` writes through a
//! [`WriteTransaction`], reads and snapshots see a [`ReadTransaction`]. Keel commits each applied
//! batch in the same transaction as its own record of the last applied log id and the membership,
//! so the state and the position it describes can never disagree after a crash.

use std::fmt::Debug;
use std::io;

pub use redb::ReadTransaction;
pub use redb::WriteTransaction;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A user state machine. Keel calls `apply` for one batch at a time, in log order, on a blocking
/// thread; reads and snapshots run concurrently with it on their own read transactions.
///
/// All state must live in the database: on restart Keel resumes from what the database holds, and
/// a follower that installs a snapshot gets only what `snapshot` wrote. Fields of `Self` are for
/// configuration and handles, not for state.
pub trait StateMachine: Send + Sync + 'static {
    /// What a client proposes. Encoded into the Raft log, so keep it backward compatible.
    type Command: Serialize + DeserializeOwned + Send + Sync + Debug + 'static;
    /// What `apply` answers for each command.
    type Response: Serialize + DeserializeOwned + Send + Sync + Debug + 'static;

    /// Applies a batch of committed commands, in order, and returns one response per command.
    ///
    /// Must be deterministic: every replica applies the same commands and must reach the same
    /// state. Business failures (a missing account, a failed compare) belong in `Response`; an
    /// `Err` means the state machine cannot go on, and the node stops rather than diverge.
    fn apply(
        &self,
        txn: &WriteTransaction,
        commands: Vec<Self::Command>,
    ) -> Result<Vec<Self::Response>, StateMachineError>;

    /// Writes the whole state visible in `txn` to `out`.
    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn io::Write) -> Result<(), StateMachineError>;

    /// Rebuilds the state from bytes `snapshot` wrote. Keel has already deleted every user table
    /// in `txn`, so this only loads.
    fn restore(&self, txn: &WriteTransaction, input: &mut dyn io::Read) -> Result<(), StateMachineError>;
}

/// A state machine failure. Any of these stops the node: it is never returned to a client as a
/// business answer.
#[derive(Debug, thiserror::Error)]
pub enum StateMachineError {
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("encoding: {0}")]
    Codec(#[from] postcard::Error),
    #[error("{0}")]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl StateMachineError {
    pub fn other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Other(e.into())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StateMachineError {
            fn from(e: $t) -> Self {
                Self::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TableError,
    redb::StorageError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

impl From<StateMachineError> for io::Error {
    fn from(e: StateMachineError) -> Self {
        match e {
            StateMachineError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}
