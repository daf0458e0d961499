//! `keel txn`: etcdctl's interactive txn syntax (compares, blank line, success ops, blank line,
//! failure ops) parsed into the JSON body of `POST /v1/txn` (`docs/http-api.md`).
//!
//! ```text
//! value("k") = "v"          compare: target("key") op "operand"; targets value|val,
//! version("n") > "3"                 version|ver, create|c, mod|m; ops = != > <
//!
//! put "a b" "c d"           success ops: put KEY VALUE, get KEY [--prefix], del KEY [--prefix]
//!
//! del k                     failure ops, until a blank line or the end of input
//! ```
//!
//! Quoting follows etcdctl: `"..."` with Go escapes (`\n`, `\"`, `\xff`, `\u00e9`, ...), `'...'`
//! taken literally, or a bare word. `\xNN` escapes make non-UTF-8 keys and values possible.

use std::fmt;

use base64::Engine as _;
use serde_json::{json, Map, Value};

/// A parsed transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub result: CompareOp,
    pub target: Target,
}

/// What a compare looks at, with the operand it is compared to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Value(Vec<u8>),
    Version(i64),
    Create(i64),
    Mod(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Get { key: Vec<u8>, prefix: bool },
    Delete { key: Vec<u8>, prefix: bool },
}

/// The part of the input being read. Each blank line moves to the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Compares,
    Success,
    Failure,
    /// The failure ops ended with a blank line; only blank lines may follow.
    Done,
}

/// A syntax error, with the 1-based line it is on and that line's text.
#[derive(Debug, PartialEq, Eq)]
pub struct TxnError {
    pub line: usize,
    pub text: String,
    pub kind: TxnErrorKind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TxnErrorKind {
    NotUtf8,
    MissingOpenParen,
    UnknownTarget(String),
    UnquotedKey,
    MissingCloseParen,
    UnknownOperator(String),
    MissingOperand,
    TooManyOperands,
    BadNumber { target: &'static str, operand: String },
    EmptyKey,
    UnterminatedQuote,
    BadEscape(String),
    TextAfterQuote,
    UnknownOp(String),
    Usage(&'static str),
    UnknownFlag { op: &'static str, flag: String },
    TrailingInput,
}

impl fmt::Display for TxnErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use TxnErrorKind as K;
        match self {
            K::NotUtf8 => write!(f, "not UTF-8 (write other bytes as \\xNN escapes in quotes)"),
            K::MissingOpenParen => write!(f, r#"malformed comparison, expected target("key") op "operand""#),
            K::UnknownTarget(t) => {
                write!(f, "unknown comparison target '{t}' (expected value, version, create or mod)")
            }
            K::UnquotedKey => write!(f, r#"the compared key must be quoted, as in value("k")"#),
            K::MissingCloseParen => write!(f, "missing ')' after the compared key"),
            K::UnknownOperator(o) if o.is_empty() => write!(f, "missing operator (=, !=, > or <)"),
            K::UnknownOperator(o) => write!(f, "unknown operator '{o}' (expected =, !=, > or <)"),
            K::MissingOperand => write!(f, "missing the operand after the operator"),
            K::TooManyOperands => write!(f, "unexpected text after the operand"),
            K::BadNumber { target, operand } => write!(f, "{target} compares to an integer, not '{operand}'"),
            K::EmptyKey => write!(f, "empty key"),
            K::UnterminatedQuote => write!(f, "unterminated quote"),
            K::BadEscape(e) => write!(f, "bad escape '{e}' in a double-quoted string"),
            K::TextAfterQuote => write!(f, "text right after a closing quote (separate words with spaces)"),
            K::UnknownOp(o) => write!(f, "unknown operation '{o}' (expected put, get or del)"),
            K::Usage(usage) => write!(f, "usage: {usage}"),
            K::UnknownFlag { op, flag } => write!(f, "unknown flag '{flag}' for {op} (only --prefix)"),
            K::TrailingInput => write!(f, "input after the end of the failure ops (a blank line ends them)"),
        }
    }
}

impl fmt::Display for TxnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.kind, self.text)
    }
}

impl std::error::Error for TxnError {}

/// Reads a txn line by line, so an interactive caller can prompt as each section starts.
#[derive(Debug)]
pub struct TxnParser {
    section: Section,
    line: usize,
    txn: Txn,
}

impl Default for TxnParser {
    fn default() -> Self {
        TxnParser { section: Section::Compares, line: 0, txn: Txn::default() }
    }
}

impl TxnParser {
    pub fn section(&self) -> Section {
        self.section
    }

    /// Feeds one line, without its `\n` (a trailing `\r` is ignored). A blank line ends the
    /// current section.
    pub fn push_line(&mut self, raw: &[u8]) -> Result<(), TxnError> {
        self.line += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let fail = |kind, text: &str| TxnError { line: self.line, text: text.to_owned(), kind };
        let text = std::str::from_utf8(raw)
            .map_err(|_| fail(TxnErrorKind::NotUtf8, &String::from_utf8_lossy(raw)))?;
        if text.trim().is_empty() {
            self.section = match self.section {
                Section::Compares => Section::Success,
                Section::Success => Section::Failure,
                Section::Failure | Section::Done => Section::Done,
            };
            return Ok(());
        }
        match self.section {
            Section::Compares => self.txn.compare.push(parse_compare(text).map_err(|k| fail(k, text))?),
            Section::Success => self.txn.success.push(parse_op(text).map_err(|k| fail(k, text))?),
            Section::Failure => self.txn.failure.push(parse_op(text).map_err(|k| fail(k, text))?),
            Section::Done => return Err(fail(TxnErrorKind::TrailingInput, text)),
        }
        Ok(())
    }

    /// The txn read so far; the end of input ends whatever section was open.
    pub fn finish(self) -> Txn {
        self.txn
    }
}

/// Parses a whole input (piped stdin).
pub fn parse_txn(input: &[u8]) -> Result<Txn, TxnError> {
    let mut parser = TxnParser::default();
    // A final line without '\n' still counts; the empty piece after a final '\n' does not.
    let body = input.strip_suffix(b"\n").unwrap_or(input);
    if !input.is_empty() {
        for line in body.split(|&b| b == b'\n') {
            parser.push_line(line)?;
        }
    }
    Ok(parser.finish())
}

fn parse_compare(line: &str) -> Result<Compare, TxnErrorKind> {
    let (target, rest) = line.split_once('(').ok_or(TxnErrorKind::MissingOpenParen)?;
    let target = target.trim();
    let mut cur = Cursor::new(rest);
    cur.skip_ws();
    let key = match cur.peek() {
        Some('"' | '\'') => cur.word()?.bytes,
        _ => return Err(TxnErrorKind::UnquotedKey),
    };
    if key.is_empty() {
        return Err(TxnErrorKind::EmptyKey);
    }
    cur.skip_ws();
    if cur.peek() != Some(')') {
        return Err(TxnErrorKind::MissingCloseParen);
    }
    cur.bump();
    cur.skip_ws();
    let op: String = cur.take_while(|c| matches!(c, '=' | '!' | '<' | '>'));
    let result = match op.as_str() {
        "=" | "==" => CompareOp::Equal,
        "!=" => CompareOp::NotEqual,
        ">" => CompareOp::Greater,
        "<" => CompareOp::Less,
        _ => {
            let shown = if op.is_empty() { cur.take_while(|c| !c.is_whitespace()) } else { op };
            return Err(TxnErrorKind::UnknownOperator(shown));
        }
    };
    let mut operands = cur.words()?;
    if operands.len() > 1 {
        return Err(TxnErrorKind::TooManyOperands);
    }
    let operand = operands.pop().ok_or(TxnErrorKind::MissingOperand)?.bytes;
    let number = |name: &'static str| -> Result<i64, TxnErrorKind> {
        std::str::from_utf8(&operand).ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
            TxnErrorKind::BadNumber { target: name, operand: String::from_utf8_lossy(&operand).into_owned() }
        })
    };
    let target = match target {
        "value" | "val" => Target::Value(operand.clone()),
        "version" | "ver" => Target::Version(number("version")?),
        "create" | "c" => Target::Create(number("create")?),
        "mod" | "m" => Target::Mod(number("mod")?),
        other => return Err(TxnErrorKind::UnknownTarget(other.to_owned())),
    };
    Ok(Compare { key, result, target })
}

fn parse_op(line: &str) -> Result<Op, TxnErrorKind> {
    let words = Cursor::new(line).words()?;
    let (name, args) = match words.split_first() {
        Some((name, args)) => (name, args),
        None => return Err(TxnErrorKind::UnknownOp(String::new())),
    };
    match name.bytes.as_slice() {
        b"put" => match args {
            [key, value] if !key.is_flag() && !value.is_flag() => {
                Ok(Op::Put { key: non_empty(key)?, value: value.bytes.clone() })
            }
            _ => Err(TxnErrorKind::Usage("put KEY VALUE")),
        },
        b"get" => {
            let (key, prefix) = key_and_prefix("get", args, "get KEY [--prefix]")?;
            Ok(Op::Get { key, prefix })
        }
        b"del" | b"delete" => {
            let (key, prefix) = key_and_prefix("del", args, "del KEY [--prefix]")?;
            Ok(Op::Delete { key, prefix })
        }
        other => Err(TxnErrorKind::UnknownOp(String::from_utf8_lossy(other).into_owned())),
    }
}

fn key_and_prefix(
    op: &'static str,
    args: &[Word],
    usage: &'static str,
) -> Result<(Vec<u8>, bool), TxnErrorKind> {
    let mut key = None;
    let mut prefix = false;
    for arg in args {
        if arg.is_flag() {
            match arg.bytes.as_slice() {
                b"--prefix" => prefix = true,
                other => {
                    let flag = String::from_utf8_lossy(other).into_owned();
                    return Err(TxnErrorKind::UnknownFlag { op, flag });
                }
            }
        } else if key.is_none() {
            key = Some(arg);
        } else {
            return Err(TxnErrorKind::Usage(usage));
        }
    }
    let key = key.ok_or(TxnErrorKind::Usage(usage))?;
    // An empty key is allowed with --prefix only ("every key"), as in etcdctl.
    let key = if prefix { key.bytes.clone() } else { non_empty(key)? };
    Ok((key, prefix))
}

fn non_empty(word: &Word) -> Result<Vec<u8>, TxnErrorKind> {
    if word.bytes.is_empty() {
        Err(TxnErrorKind::EmptyKey)
    } else {
        Ok(word.bytes.clone())
    }
}

/// One argument: its bytes after unquoting, and whether it was quoted (a quoted `"--prefix"` is
/// a key, not a flag).
#[derive(Debug, PartialEq, Eq)]
struct Word {
    bytes: Vec<u8>,
    quoted: bool,
}

impl Word {
    fn is_flag(&self) -> bool {
        !self.quoted && self.bytes.starts_with(b"--")
    }
}

/// A character cursor over one line.
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor { chars: text.chars().peekable() }
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        self.chars.next()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let mut out = String::new();
        while let Some(c) = self.peek().filter(|&c| keep(c)) {
            out.push(c);
            self.bump();
        }
        out
    }

    /// All remaining words.
    fn words(&mut self) -> Result<Vec<Word>, TxnErrorKind> {
        let mut words = Vec::new();
        loop {
            self.skip_ws();
            if self.peek().is_none() {
                return Ok(words);
            }
            let word = self.word()?;
            if self.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(TxnErrorKind::TextAfterQuote);
            }
            words.push(word);
        }
    }

    /// One word at the cursor: double-quoted, single-quoted or bare (up to whitespace).
    fn word(&mut self) -> Result<Word, TxnErrorKind> {
        match self.peek() {
            Some('"') => {
                self.bump();
                Ok(Word { bytes: self.double_quoted()?, quoted: true })
            }
            Some('\'') => {
                self.bump();
                let mut bytes = Vec::new();
                loop {
                    match self.bump() {
                        None => return Err(TxnErrorKind::UnterminatedQuote),
                        Some('\'') => return Ok(Word { bytes, quoted: true }),
                        Some(c) => push_char(&mut bytes, c),
                    }
                }
            }
            _ => Ok(Word { bytes: self.take_while(|c| !c.is_whitespace()).into_bytes(), quoted: false }),
        }
    }

    /// The rest of a `"..."` string after its opening quote, with Go's escapes.
    fn double_quoted(&mut self) -> Result<Vec<u8>, TxnErrorKind> {
        let mut bytes = Vec::new();
        loop {
            match self.bump() {
                None => return Err(TxnErrorKind::UnterminatedQuote),
                Some('"') => return Ok(bytes),
                Some('\\') => self.escape(&mut bytes)?,
                Some(c) => push_char(&mut bytes, c),
            }
        }
    }

    fn escape(&mut self, out: &mut Vec<u8>) -> Result<(), TxnErrorKind> {
        let c = self.bump().ok_or(TxnErrorKind::UnterminatedQuote)?;
        let simple = match c {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            '"' => Some(b'"'),
            '\'' => Some(b'\''),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            return Ok(());
        }
        let (digits, radix) = match c {
            'x' => (2, 16),
            'u' => (4, 16),
            'U' => (8, 16),
            '0'..='7' => (2, 8), // the first octal digit is `c` itself
            _ => return Err(TxnErrorKind::BadEscape(format!("\\{c}"))),
        };
        let mut text = String::new();
        if radix == 8 {
            text.push(c);
        }
        for _ in 0..digits {
            match self.peek().filter(|d| d.is_digit(radix)) {
                Some(d) => {
                    text.push(d);
                    self.bump();
                }
                None => {
                    let shown = if radix == 8 { format!("\\{text}") } else { format!("\\{c}{text}") };
                    return Err(TxnErrorKind::BadEscape(shown));
                }
            }
        }
        let shown = || if radix == 8 { format!("\\{text}") } else { format!("\\{c}{text}") };
        let n = u32::from_str_radix(&text, radix).map_err(|_| TxnErrorKind::BadEscape(shown()))?;
        match c {
            // \xNN and octal are raw bytes; \u and \U are Unicode code points, UTF-8 encoded.
            'x' | '0'..='7' => out.push(u8::try_from(n).map_err(|_| TxnErrorKind::BadEscape(shown()))?),
            _ => push_char(out, char::from_u32(n).ok_or_else(|| TxnErrorKind::BadEscape(shown()))?),
        }
        Ok(())
    }
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

// ---------------------------------------------------------------------------------------------
// JSON body
// ---------------------------------------------------------------------------------------------

/// Adds `name: text` when the bytes are UTF-8, else `name_base64: ...`, mirroring the answers.
fn put_bytes(obj: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => obj.insert(name.to_owned(), Value::from(text)),
        Err(_) => obj.insert(
            format!("{name}_base64"),
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
}

impl Compare {
    fn to_json(&self) -> Value {
        let mut obj = Map::new();
        put_bytes(&mut obj, "key", &self.key);
        let (target, operand_field, operand) = match &self.target {
            Target::Value(v) => {
                put_bytes(&mut obj, "value", v);
                ("value", None, 0)
            }
            Target::Version(n) => ("version", Some("version"), *n),
            Target::Create(n) => ("create", Some("create_revision"), *n),
            Target::Mod(n) => ("mod", Some("mod_revision"), *n),
        };
        obj.insert("target".into(), Value::from(target));
        let result = match self.result {
            CompareOp::Equal => "equal",
            CompareOp::NotEqual => "not_equal",
            CompareOp::Greater => "greater",
            CompareOp::Less => "less",
        };
        obj.insert("result".into(), Value::from(result));
        if let Some(field) = operand_field {
            obj.insert(field.into(), Value::from(operand));
        }
        Value::Object(obj)
    }
}

impl Op {
    fn to_json(&self) -> Value {
        let mut obj = Map::new();
        match self {
            Op::Put { key, value } => {
                put_bytes(&mut obj, "key", key);
                put_bytes(&mut obj, "value", value);
                json!({ "put": obj })
            }
            Op::Get { key, prefix } => {
                put_bytes(&mut obj, "key", key);
                if *prefix {
                    obj.insert("prefix".into(), Value::Bool(true));
                }
                json!({ "get": obj })
            }
            Op::Delete { key, prefix } => {
                put_bytes(&mut obj, "key", key);
                obj.insert("prefix".into(), Value::Bool(*prefix));
                json!({ "delete": obj })
            }
        }
    }
}

impl Txn {
    /// The body of `POST /v1/txn`.
    pub fn to_json(&self) -> Value {
        json!({
            "compare": self.compare.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": self.success.iter().map(Op::to_json).collect::<Vec<_>>(),
            "failure": self.failure.iter().map(Op::to_json).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &str) -> TxnError {
        parse_txn(input.as_bytes()).expect_err("a syntax error")
    }

    #[test]
    fn the_documented_example_round_trips() {
        let txn = parse_txn(b"value(\"k\") = \"v\"\nversion(\"n\") > \"2\"\n\nput k v2\nget k\n\ndel k\n")
            .expect("parses");
        assert_eq!(
            txn.to_json(),
            json!({
                "compare": [{"key": "k", "target": "value", "result": "equal", "value": "v"},
                            {"key": "n", "target": "version", "result": "greater", "version": 2}],
                "success": [{"put": {"key": "k", "value": "v2"}}, {"get": {"key": "k"}}],
                "failure": [{"delete": {"key": "k", "prefix": false}}]
            })
        );
    }

    #[test]
    fn every_target_and_operator() {
        let txn = parse_txn(
            br#"create("a") < "5"
mod("b") != "7"
val('c') == 'x'
ver("d") = 0
c("e") > "1"
m("f") < "-1"
"#,
        )
        .expect("parses");
        let got: Vec<Value> = txn.compare.iter().map(Compare::to_json).collect();
        assert_eq!(
            got,
            vec![
                json!({"key": "a", "target": "create", "result": "less", "create_revision": 5}),
                json!({"key": "b", "target": "mod", "result": "not_equal", "mod_revision": 7}),
                json!({"key": "c", "target": "value", "result": "equal", "value": "x"}),
                json!({"key": "d", "target": "version", "result": "equal", "version": 0}),
                json!({"key": "e", "target": "create", "result": "greater", "create_revision": 1}),
                json!({"key": "f", "target": "mod", "result": "less", "mod_revision": -1}),
            ]
        );
        assert!(txn.success.is_empty() && txn.failure.is_empty());
    }

    #[test]
    fn quoting_like_etcdctl() {
        let txn = parse_txn(
            b"\nput \"a b\" \"c d\"\nput 'it''s' x\nput \"q\\\"uote\" \"tab\\there\\n\"\nput \"\\xff\\x00\" \"\\u00e9\\101\"\ndel \"\" --prefix\nget \"--prefix\"\n",
        );
        // 'it''s' is two adjacent quoted words: an error, not a silent join.
        assert_eq!(txn.expect_err("a syntax error").kind, TxnErrorKind::TextAfterQuote);

        let txn = parse_txn(
            b"\nput \"a b\" \"c d\"\nput \"q\\\"uote\" \"tab\\there\\n\"\nput \"\\xff\\x00\" \"\\u00e9\\101\"\ndel \"\" --prefix\nget \"--prefix\"\n",
        )
        .expect("parses");
        assert_eq!(
            txn.success,
            vec![
                Op::Put { key: b"a b".to_vec(), value: b"c d".to_vec() },
                Op::Put { key: b"q\"uote".to_vec(), value: b"tab\there\n".to_vec() },
                Op::Put { key: vec![0xff, 0x00], value: "éA".as_bytes().to_vec() },
                Op::Delete { key: Vec::new(), prefix: true },
                Op::Get { key: b"--prefix".to_vec(), prefix: false },
            ]
        );
        // Non-UTF-8 bytes travel as *_base64.
        assert_eq!(txn.success[2].to_json(), json!({"put": {"key_base64": "/wA=", "value": "éA"}}));
        assert_eq!(txn.success[3].to_json(), json!({"delete": {"key": "", "prefix": true}}));
    }

    #[test]
    fn blank_lines_and_end_of_input_close_sections() {
        // No compares, no failure ops, no final newline.
        let txn = parse_txn(b"\nput k v").expect("parses");
        assert_eq!(txn.success, vec![Op::Put { key: b"k".to_vec(), value: b"v".to_vec() }]);
        // CRLF and whitespace-only lines; trailing blank lines after the failure section are fine.
        let txn =
            parse_txn(b"mod(\"k\") > \"0\"\r\n  \r\nget k\r\n\r\ndelete k\r\n\r\n\r\n").expect("parses");
        assert_eq!(txn.compare.len(), 1);
        assert_eq!(txn.failure, vec![Op::Delete { key: b"k".to_vec(), prefix: false }]);
        assert_eq!(parse_txn(b"").expect("parses"), Txn::default());
    }

    #[test]
    fn the_parser_reports_sections_for_prompts() {
        let mut p = TxnParser::default();
        assert_eq!(p.section(), Section::Compares);
        p.push_line(b"value(\"k\") = \"v\"").expect("a compare");
        p.push_line(b"").expect("blank line");
        assert_eq!(p.section(), Section::Success);
        p.push_line(b"").expect("blank line");
        assert_eq!(p.section(), Section::Failure);
        p.push_line(b"").expect("blank line");
        assert_eq!(p.section(), Section::Done);
    }

    #[test]
    fn bad_compares_say_what_is_wrong() {
        let e = err("vale(\"k\") = \"v\"\n");
        assert_eq!(e.line, 1);
        assert_eq!(e.kind, TxnErrorKind::UnknownTarget("vale".into()));
        assert_eq!(
            e.to_string(),
            "line 1: unknown comparison target 'vale' (expected value, version, create or mod): vale(\"k\") = \"v\""
        );
        assert_eq!(err("value k = v").kind, TxnErrorKind::MissingOpenParen);
        assert_eq!(err("value(k) = \"v\"").kind, TxnErrorKind::UnquotedKey);
        assert_eq!(err("value(\"k\" = \"v\"").kind, TxnErrorKind::MissingCloseParen);
        assert_eq!(err("value(\"k\") ~ \"v\"").kind, TxnErrorKind::UnknownOperator("~".into()));
        assert_eq!(err("value(\"k\") >= \"v\"").kind, TxnErrorKind::UnknownOperator(">=".into()));
        assert_eq!(err("value(\"k\") =").kind, TxnErrorKind::MissingOperand);
        assert_eq!(err("value(\"k\") = \"v\" \"w\"").kind, TxnErrorKind::TooManyOperands);
        assert_eq!(err("value(\"\") = \"v\"").kind, TxnErrorKind::EmptyKey);
        assert_eq!(err("value(\"k) = \"v\"").kind, TxnErrorKind::MissingCloseParen);
        assert_eq!(err("value(\"k\") = \"v").kind, TxnErrorKind::UnterminatedQuote);
        assert_eq!(
            err("version(\"k\") > \"three\"").kind,
            TxnErrorKind::BadNumber { target: "version", operand: "three".into() }
        );
        assert_eq!(
            err("mod(\"k\") > \"99999999999999999999\"").kind,
            TxnErrorKind::BadNumber { target: "mod", operand: "99999999999999999999".into() }
        );
    }

    #[test]
    fn bad_ops_say_what_is_wrong() {
        let e = err("\nput k v\nupdate k v\n");
        assert_eq!((e.line, e.kind), (3, TxnErrorKind::UnknownOp("update".into())));
        assert_eq!(err("\nput k").kind, TxnErrorKind::Usage("put KEY VALUE"));
        assert_eq!(err("\nput k v w").kind, TxnErrorKind::Usage("put KEY VALUE"));
        assert_eq!(err("\nput \"\" v").kind, TxnErrorKind::EmptyKey);
        assert_eq!(err("\nget").kind, TxnErrorKind::Usage("get KEY [--prefix]"));
        assert_eq!(err("\nget a b").kind, TxnErrorKind::Usage("get KEY [--prefix]"));
        assert_eq!(
            err("\n\ndel k --prev-kv").kind,
            TxnErrorKind::UnknownFlag { op: "del", flag: "--prev-kv".into() }
        );
        assert_eq!(err("\nput \"a\\q\" v").kind, TxnErrorKind::BadEscape("\\q".into()));
        assert_eq!(err("\nput \"a\\xZ1\" v").kind, TxnErrorKind::BadEscape("\\x".into()));
        assert_eq!(err("\nput \"\\777\" v").kind, TxnErrorKind::BadEscape("\\777".into()));
        assert_eq!(err("\nput \"\\ud800\" v").kind, TxnErrorKind::BadEscape("\\ud800".into()));
        assert_eq!(err("\nput 'k v").kind, TxnErrorKind::UnterminatedQuote);
        assert_eq!(err("\nput \"a\"b v").kind, TxnErrorKind::TextAfterQuote);
        let e = parse_txn(b"\nput k \xff\n").expect_err("a syntax error");
        assert_eq!((e.line, e.kind), (2, TxnErrorKind::NotUtf8));
        let e = err("\n\n\n\nput k v\n");
        assert_eq!((e.line, e.kind), (5, TxnErrorKind::TrailingInput));
    }
}
