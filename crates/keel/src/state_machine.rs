//! The trait a user implements to replicate their own state.
//!
//! A state machine keeps its state in the redb database Keel hands it: `apply` writes through a
//! [`WriteTransaction`], reads and snapshots see a [`ReadTransaction`]. Keel writes each applied
//! batch in the same transaction as its own record of the last applied log id and the membership,
//! so the state and the position it describes can never disagree after a crash. Consecutive
//! batches may share one transaction: Keel commits it before anything reads, so every read sees
//! every batch applied before it began.

use std::fmt::Debug;
use std::io;

pub use redb::ReadTransaction;
pub use redb::WriteTransaction;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;

/// A user state machine. Keel calls `apply` for one batch at a time, in log order, on a blocking
/// thread. A read or snapshot first commits what was applied before it (waiting for a batch being
/// applied), then runs on its own read transaction, concurrently with later applies.
///
/// All state must live in the database: on restart Keel resumes from what the database holds, and
/// a follower that installs a snapshot gets only what `snapshot` wrote. Fields of `Self` are for
/// configuration and handles, not for state.
pub trait StateMachine: Send + Sync + 'static {
    /// What a client proposes. Encoded into the Raft log, so keep it backward compatible.
    type Command: Serialize + DeserializeOwned + Send + Sync + Debug + 'static;
    /// What `apply` answers for each command.
    type Response: Serialize + DeserializeOwned + Send + Sync + Debug + 'static;

    /// Checks a command before it enters the log, and answers why not.
    ///
    /// The leader calls it for every command it proposes, whichever node the client reached: a
    /// follower's forwarded command is decoded and checked again by the leader, so nothing that a
    /// peer or client sends goes into the log unchecked. Put here every limit `apply` relies on
    /// (sizes, counts, shapes). It may depend on configuration, since only the leader runs it;
    /// `apply` must still take any command that decodes. The default accepts every command.
    fn validate(&self, cmd: &Self::Command) -> Result<(), Refusal> {
        let _ = cmd;
        Ok(())
    }

    /// Applies a batch of committed commands, in order, and returns one response per command.
    ///
    /// Must be deterministic: every replica applies the same commands and must reach the same
    /// state. Business failures (a missing account, a failed compare, a command that makes no
    /// sense) belong in `Response`. An `Err` is for storage failures only: it means this node
    /// cannot go on, and Raft stops (the process should exit and be restarted) rather than let the
    /// replicas diverge. A committed entry whose bytes do not decode as a `Command` never reaches
    /// `apply`: Keel answers it [`Reply::Refused`](crate::types::Reply) on every replica.
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

/// Why [`StateMachine::validate`] refuses a command: a message for the client that sent it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Refusal {
    pub fn new(why: impl Into<String>) -> Self {
        Self(why.into())
    }
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

/// Writes every row of `table` to `out` (a helper for [`StateMachine::snapshot`]).
///
/// Format: row count (u64 LE), then per row `key_len u32 | key | value_len u32 | value`, each part in
/// redb's own byte form for its type. Several tables can be written one after another and read back
/// in the same order with [`load_table`].
pub fn dump_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: redb::TableDefinition<K, V>,
    out: &mut dyn io::Write,
) -> Result<(), StateMachineError> {
    use redb::ReadableTable;
    use redb::ReadableTableMetadata;
    let table = match txn.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            out.write_all(&0u64.to_le_bytes())?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    out.write_all(&table.len()?.to_le_bytes())?;
    for row in table.iter()? {
        let (k, v) = row?;
        for bytes in [K::as_bytes(&k.value()).as_ref(), V::as_bytes(&v.value()).as_ref()] {
            out.write_all(&(bytes.len() as u32).to_le_bytes())?;
            out.write_all(bytes)?;
        }
    }
    Ok(())
}

/// Reads rows written by [`dump_table`] into `table` (a helper for [`StateMachine::restore`]).
pub fn load_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &WriteTransaction,
    table: redb::TableDefinition<K, V>,
    input: &mut dyn io::Read,
) -> Result<(), StateMachineError> {
    let mut table = txn.open_table(table)?;
    scan_table(input, |k, v| {
        table.insert(K::from_bytes(k), V::from_bytes(v))?;
        Ok(())
    })?;
    Ok(())
}

/// Reads one table written by [`dump_table`] from `input` without a database, calling `row` with
/// each key and value in redb's byte form; answers the row count. For tools that summarize a
/// snapshot (`keel snapshot status`). A part's buffer grows only as its bytes arrive, so a
/// damaged length cannot make it allocate more than the input holds.
pub fn scan_table(
    input: &mut dyn io::Read,
    mut row: impl FnMut(&[u8], &[u8]) -> Result<(), StateMachineError>,
) -> Result<u64, StateMachineError> {
    fn read_u32(input: &mut dyn io::Read) -> io::Result<u64> {
        let mut b = [0u8; 4];
        input.read_exact(&mut b)?;
        Ok(u64::from(u32::from_le_bytes(b)))
    }
    fn read_part(input: &mut dyn io::Read, buf: &mut Vec<u8>) -> io::Result<()> {
        let len = read_u32(input)?;
        buf.clear();
        if io::Read::read_to_end(&mut io::Read::take(input, len), buf)? as u64 != len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "table row ends early"));
        }
        Ok(())
    }
    let mut count = [0u8; 8];
    input.read_exact(&mut count)?;
    let count = u64::from_le_bytes(count);
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for _ in 0..count {
        read_part(input, &mut k)?;
        read_part(input, &mut v)?;
        row(&k, &v)?;
    }
    Ok(count)
}
