//! The history format: one JSON object per line for each operation a client ran, an optional header
//! with the keys' initial values, the reader (with line numbers in its errors) and the writer.
//!
//! ```text
//! {"initial":{"k1":"a"}}
//! {"client":3,"op":"write","key":"k1","value":"v-3-17","invoke_us":1234,"complete_us":1290,"outcome":"ok"}
//! {"client":1,"op":"read","key":"k1","invoke_us":1300,"complete_us":1350,"outcome":"ok","read":"v-3-17"}
//! {"client":2,"op":"cas","key":"k1","expect":"v-3-17","value":"v-2-5","invoke_us":1400,"complete_us":1500,"outcome":"fail"}
//! {"client":4,"op":"delete","key":"k2","invoke_us":1400,"outcome":"unknown"}
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};

use serde::{Deserialize, Deserializer, Serialize};

/// The value of every key after some point: `None` is "absent". Used for the header's initial values
/// and for the final state read from the nodes after the test.
pub type KeyValues = BTreeMap<String, Option<String>>;

/// What an operation does to its key's register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Read,
    Write,
    /// Compare-and-set: writes `value` if the register holds `expect`.
    Cas,
    Delete,
}

/// How an operation ended, as far as its client knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Took effect exactly once, between invoke and complete.
    Ok,
    /// Definitely did not change the register. For a cas without `error` it means the comparison
    /// failed: the cas still happened, as a read that saw something other than `expect`.
    Fail,
    /// May have taken effect at any time after invoke, or never (timeout, broken connection).
    Unknown,
}

/// One operation of one client, as a line of the history.
///
/// Invariant (checked by [`Op::validate`], which the reader and every check run): the fields that
/// `op` and `outcome` call for are present and the others absent; see [`InvalidOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: u64,
    pub op: OpKind,
    pub key: String,
    /// cas: the value the register must hold for the cas to apply; `Some(None)` = "key absent".
    /// Outer `None` = field missing (only valid on ops other than cas).
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub expect: Option<Option<String>>,
    /// write, cas: the value written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub invoke_us: u64,
    /// Absent or null for unknown outcomes (ignored there if present).
    #[serde(default)]
    pub complete_us: Option<u64>,
    pub outcome: Outcome,
    /// An ok read: the value seen; `Some(None)` = "key absent". Ignored on reads that are not ok.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub read: Option<Option<String>>,
    /// A definite error before anything happened (request rejected before reaching the leader).
    /// With outcome `fail` the operation is dropped from the history entirely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Tells a field that is present but `null` (`Some(None)`) from one that is missing (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Why a line is not a valid operation, beyond being valid JSON of the right shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOp {
    #[error("a {op:?} needs a \"value\"")]
    MissingValue { op: OpKind },
    #[error("a {op:?} has no \"value\" field")]
    UnexpectedValue { op: OpKind },
    #[error("a cas needs an \"expect\" (null if the key must be absent)")]
    MissingExpect,
    #[error("only a cas has an \"expect\" field, not a {op:?}")]
    UnexpectedExpect { op: OpKind },
    #[error("an ok read needs a \"read\" (null if the key was absent)")]
    MissingRead,
    #[error("only a read has a \"read\" field, not a {op:?}")]
    UnexpectedRead { op: OpKind },
    #[error("outcome {outcome:?} needs a \"complete_us\"")]
    MissingCompletion { outcome: Outcome },
    #[error("complete_us {complete_us} is before invoke_us {invoke_us}")]
    CompletesBeforeInvoke { invoke_us: u64, complete_us: u64 },
    #[error("an ok operation cannot carry an \"error\"")]
    ErrorOnOk,
}

/// The typed meaning of a valid [`Op`], borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action<'a> {
    Read,
    Write { value: &'a str },
    Cas { expect: Option<&'a str>, value: &'a str },
    Delete,
}

impl Op {
    /// A read invoked at `invoke_us`, not yet completed (outcome unknown until [`Op::read_ok`]).
    pub fn read(client: u64, key: impl Into<String>, invoke_us: u64) -> Op {
        Op::pending(client, OpKind::Read, key.into(), invoke_us)
    }

    /// A write of `value`, not yet completed.
    pub fn write(client: u64, key: impl Into<String>, value: impl Into<String>, invoke_us: u64) -> Op {
        Op { value: Some(value.into()), ..Op::pending(client, OpKind::Write, key.into(), invoke_us) }
    }

    /// A compare-and-set from `expect` (`None` = absent) to `value`, not yet completed.
    pub fn cas(
        client: u64,
        key: impl Into<String>,
        expect: Option<&str>,
        value: impl Into<String>,
        invoke_us: u64,
    ) -> Op {
        Op {
            expect: Some(expect.map(str::to_owned)),
            value: Some(value.into()),
            ..Op::pending(client, OpKind::Cas, key.into(), invoke_us)
        }
    }

    /// A delete, not yet completed.
    pub fn delete(client: u64, key: impl Into<String>, invoke_us: u64) -> Op {
        Op::pending(client, OpKind::Delete, key.into(), invoke_us)
    }

    fn pending(client: u64, op: OpKind, key: String, invoke_us: u64) -> Op {
        Op {
            client,
            op,
            key,
            expect: None,
            value: None,
            invoke_us,
            complete_us: None,
            outcome: Outcome::Unknown,
            read: None,
            error: None,
        }
    }

    /// Completed with outcome ok at `complete_us` (for a read, use [`Op::read_ok`]).
    pub fn ok(self, complete_us: u64) -> Op {
        Op { complete_us: Some(complete_us), outcome: Outcome::Ok, ..self }
    }

    /// A read completed at `complete_us` that saw `seen` (`None` = absent).
    pub fn read_ok(self, complete_us: u64, seen: Option<&str>) -> Op {
        Op { read: Some(seen.map(str::to_owned)), ..self.ok(complete_us) }
    }

    /// Completed with outcome fail at `complete_us`: for a cas, the comparison failed.
    pub fn fail(self, complete_us: u64) -> Op {
        Op { complete_us: Some(complete_us), outcome: Outcome::Fail, ..self }
    }

    /// Rejected with a definite error before anything happened: dropped by the checker.
    pub fn rejected(self, complete_us: u64, error: impl Into<String>) -> Op {
        Op { error: Some(error.into()), ..self.fail(complete_us) }
    }

    /// The client gave up without knowing whether it took effect (timeout, broken connection).
    pub fn unknown(self) -> Op {
        Op { complete_us: None, outcome: Outcome::Unknown, ..self }
    }

    /// Checks that the fields match the kind and the outcome.
    pub fn validate(&self) -> Result<(), InvalidOp> {
        self.action().map(|_| ())
    }

    /// When the operation certainly completed: `None` for unknown outcomes, whose effect may come
    /// at any time after invoke.
    pub fn completed_at(&self) -> Option<u64> {
        match self.outcome {
            Outcome::Unknown => None,
            Outcome::Ok | Outcome::Fail => self.complete_us,
        }
    }

    /// True for an operation that certainly did nothing at all: rejected with a definite error.
    pub fn is_rejected(&self) -> bool {
        self.outcome == Outcome::Fail && self.error.is_some()
    }

    pub(crate) fn action(&self) -> Result<Action<'_>, InvalidOp> {
        let op = self.op;
        let action = match op {
            OpKind::Read | OpKind::Delete => {
                if self.value.is_some() {
                    return Err(InvalidOp::UnexpectedValue { op });
                }
                if op == OpKind::Read {
                    Action::Read
                } else {
                    Action::Delete
                }
            }
            OpKind::Write => {
                Action::Write { value: self.value.as_deref().ok_or(InvalidOp::MissingValue { op })? }
            }
            OpKind::Cas => Action::Cas {
                expect: self.expect.as_ref().ok_or(InvalidOp::MissingExpect)?.as_deref(),
                value: self.value.as_deref().ok_or(InvalidOp::MissingValue { op })?,
            },
        };
        if op != OpKind::Cas && self.expect.is_some() {
            return Err(InvalidOp::UnexpectedExpect { op });
        }
        // A read that did not complete ok may carry `"read": null` or anything: it is dropped.
        if op == OpKind::Read && self.outcome == Outcome::Ok && self.read.is_none() {
            return Err(InvalidOp::MissingRead);
        }
        if op != OpKind::Read && self.read.is_some() {
            return Err(InvalidOp::UnexpectedRead { op });
        }
        if self.outcome == Outcome::Ok && self.error.is_some() {
            return Err(InvalidOp::ErrorOnOk);
        }
        // A rejected op needs no completion: it is dropped whatever its times say.
        if self.outcome != Outcome::Unknown && !self.is_rejected() {
            let complete_us =
                self.complete_us.ok_or(InvalidOp::MissingCompletion { outcome: self.outcome })?;
            if complete_us < self.invoke_us {
                return Err(InvalidOp::CompletesBeforeInvoke { invoke_us: self.invoke_us, complete_us });
            }
        }
        Ok(action)
    }
}

/// `c3 write "k1" = "v-3-17" [1234..1290] ok`: one op on one line, for reports.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{} ", self.client)?;
        describe(self, f)?;
        let end = match self.completed_at() {
            Some(t) => t.to_string(),
            None => "?".to_owned(),
        };
        write!(f, " [{}..{}] {}", self.invoke_us, end, outcome_name(self))
    }
}

/// What the op did, without client or times: `read "k1" -> "v"`, `cas "k1" "a" -> "b"`.
pub(crate) fn describe(op: &Op, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let key = &op.key;
    match op.op {
        OpKind::Read => match &op.read {
            Some(seen) => write!(f, "read {key:?} -> {}", Shown(seen.as_deref())),
            None => write!(f, "read {key:?}"),
        },
        OpKind::Write => write!(f, "write {key:?} = {}", Shown(op.value.as_deref())),
        OpKind::Cas => write!(
            f,
            "cas {key:?} {} -> {}",
            Shown(op.expect.as_ref().and_then(|e| e.as_deref())),
            Shown(op.value.as_deref())
        ),
        OpKind::Delete => write!(f, "delete {key:?}"),
    }
}

pub(crate) fn outcome_name(op: &Op) -> &'static str {
    match (op.outcome, op.is_rejected()) {
        (Outcome::Ok, _) => "ok",
        (Outcome::Fail, true) => "rejected",
        (Outcome::Fail, false) => "fail",
        (Outcome::Unknown, _) => "unknown",
    }
}

/// A register value for humans: `"v"` or `absent`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shown<'a>(pub(crate) Option<&'a str>);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => f.write_str("absent"),
        }
    }
}

/// A whole history: the keys' initial values (absent unless the header says otherwise) and the ops
/// in the order they were logged (the checker does not rely on that order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub initial: KeyValues,
    pub ops: Vec<Op>,
}

/// The optional first line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    initial: KeyValues,
}

/// Why a history could not be read. `line` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: {source}")]
    Io { line: usize, source: std::io::Error },
    #[error("line {line}: not a valid operation: {source}")]
    Json { line: usize, source: serde_json::Error },
    #[error("line {line}: {source}")]
    Invalid { line: usize, source: InvalidOp },
    #[error("line {line}: the {{\"initial\":..}} header must be the first line")]
    MisplacedHeader { line: usize },
}

impl HistoryError {
    /// The 1-based line the error is about.
    pub fn line(&self) -> usize {
        match self {
            HistoryError::Io { line, .. }
            | HistoryError::Json { line, .. }
            | HistoryError::Invalid { line, .. }
            | HistoryError::MisplacedHeader { line } => *line,
        }
    }
}

impl History {
    /// Reads JSON lines: an optional header first, then one op per line. Blank lines are skipped.
    /// Every op is validated ([`Op::validate`]); the first bad line is the error.
    pub fn read_from(mut reader: impl BufRead) -> Result<History, HistoryError> {
        let mut history = History::default();
        let mut buf = String::new();
        let mut line = 0;
        let mut seen_content = false;
        loop {
            buf.clear();
            line += 1;
            let n = reader.read_line(&mut buf).map_err(|source| HistoryError::Io { line, source })?;
            if n == 0 {
                return Ok(history);
            }
            let text = buf.trim();
            if text.is_empty() {
                continue;
            }
            let first = !seen_content;
            seen_content = true;
            if first {
                if let Ok(header) = serde_json::from_str::<Header>(text) {
                    history.initial = header.initial;
                    continue;
                }
            }
            match serde_json::from_str::<Op>(text) {
                Ok(op) => {
                    op.validate().map_err(|source| HistoryError::Invalid { line, source })?;
                    history.ops.push(op);
                }
                Err(source) => {
                    // A late header parses as one, not as an op: say so rather than "missing field".
                    if serde_json::from_str::<Header>(text).is_ok() {
                        return Err(HistoryError::MisplacedHeader { line });
                    }
                    return Err(HistoryError::Json { line, source });
                }
            }
        }
    }

    /// Writes the history in the format [`History::read_from`] reads (a header only if some key
    /// has an initial value).
    pub fn write_to(&self, writer: impl Write) -> Result<(), WriteError> {
        let mut out = HistoryWriter::new(writer);
        if !self.initial.is_empty() {
            out.write_header(&self.initial)?;
        }
        for op in &self.ops {
            out.write_op(op)?;
        }
        out.flush()
    }

    /// Checks every op; `index` in the error is the op's position in `ops`.
    pub fn validate(&self) -> Result<(), crate::CheckError> {
        for (index, op) in self.ops.iter().enumerate() {
            op.validate().map_err(|source| crate::CheckError::InvalidOp { index, source })?;
        }
        Ok(())
    }
}

/// Why a history could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing the history: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding an operation: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("the header must be written before any operation")]
    HeaderAfterOps,
}

/// Streams a history one line at a time, as a test runner records it. Not synchronized: a runner
/// with concurrent clients sends completed ops to one writer (order of lines does not matter).
#[derive(Debug)]
pub struct HistoryWriter<W: Write> {
    inner: W,
    wrote_any: bool,
}

impl<W: Write> HistoryWriter<W> {
    pub fn new(inner: W) -> Self {
        HistoryWriter { inner, wrote_any: false }
    }

    /// Writes the `{"initial":{..}}` header; only allowed as the first line.
    pub fn write_header(&mut self, initial: &KeyValues) -> Result<(), WriteError> {
        if self.wrote_any {
            return Err(WriteError::HeaderAfterOps);
        }
        self.line(&Header { initial: initial.clone() })
    }

    /// Writes one op as one line. Does not validate: the reader does, so a runner's bug shows up
    /// as an error naming the line rather than as a lost record.
    pub fn write_op(&mut self, op: &Op) -> Result<(), WriteError> {
        self.line(op)
    }

    pub fn flush(&mut self) -> Result<(), WriteError> {
        Ok(self.inner.flush()?)
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    fn line(&mut self, item: &impl Serialize) -> Result<(), WriteError> {
        let mut bytes = serde_json::to_vec(item).map_err(WriteError::Encode)?;
        bytes.push(b'\n');
        self.inner.write_all(&bytes)?;
        self.wrote_any = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_missing_fields_differ() {
        let cas: Op = serde_json::from_str(
            r#"{"client":1,"op":"cas","key":"k","expect":null,"value":"v","invoke_us":1,"complete_us":2,"outcome":"ok"}"#,
        )
        .expect("valid line");
        assert_eq!(cas.expect, Some(None));
        let read: Op = serde_json::from_str(
            r#"{"client":1,"op":"read","key":"k","invoke_us":1,"complete_us":2,"outcome":"ok","read":null}"#,
        )
        .expect("valid line");
        assert_eq!(read.read, Some(None));
        assert_eq!(read.expect, None);
        let text = serde_json::to_string(&cas).expect("serializable");
        assert!(text.contains(r#""expect":null"#), "{text}");
        assert!(!text.contains("\"read\""), "{text}");
    }

    #[test]
    fn validation_names_the_problem() {
        let w = Op::write(1, "k", "v", 10);
        assert_eq!(
            Op { value: None, ..w.clone().ok(11) }.validate(),
            Err(InvalidOp::MissingValue { op: OpKind::Write })
        );
        assert_eq!(
            w.clone().ok(9).validate(),
            Err(InvalidOp::CompletesBeforeInvoke { invoke_us: 10, complete_us: 9 })
        );
        assert_eq!(Op::read(1, "k", 1).ok(2).validate(), Err(InvalidOp::MissingRead));
        assert_eq!(
            Op { complete_us: None, ..w.clone().ok(11) }.validate(),
            Err(InvalidOp::MissingCompletion { outcome: Outcome::Ok })
        );
        assert_eq!(
            Op { expect: None, ..Op::cas(1, "k", None, "v", 1).fail(2) }.validate(),
            Err(InvalidOp::MissingExpect)
        );
        // Rejected ops need no completion time; unknown ones ignore it.
        assert_eq!(Op { complete_us: None, ..w.clone().rejected(11, "no leader") }.validate(), Ok(()));
        assert_eq!(Op { complete_us: Some(5), ..w.unknown() }.validate(), Ok(()));
    }
}
