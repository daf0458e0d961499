//! The JSON-lines format shared with the test runner: exact field names, the optional header,
//! round trips through the writer, and errors that name the line.

mod common;

use common::*;
use keel_check::{
    History, HistoryError, HistoryWriter, InvalidOp, KeyValues, Op, OpKind, Outcome, WriteError,
};

const SAMPLE: &str = r#"{"client":3,"op":"write","key":"k1","value":"v-3-17","invoke_us":1234,"complete_us":1290,"outcome":"ok"}
{"client":1,"op":"read","key":"k1","invoke_us":1300,"complete_us":1350,"outcome":"ok","read":"v-3-17"}
{"client":2,"op":"cas","key":"k1","expect":"v-3-17","value":"v-2-5","invoke_us":1400,"complete_us":1500,"outcome":"fail"}
{"client":4,"op":"delete","key":"k2","invoke_us":1400,"outcome":"unknown"}
"#;

#[test]
fn reads_the_documented_example() {
    let h = History::read_from(SAMPLE.as_bytes()).expect("valid history");
    assert!(h.initial.is_empty());
    assert_eq!(
        h.ops,
        vec![
            Op::write(3, "k1", "v-3-17", 1234).ok(1290),
            Op::read(1, "k1", 1300).read_ok(1350, Some("v-3-17")),
            Op::cas(2, "k1", Some("v-3-17"), "v-2-5", 1400).fail(1500),
            Op::delete(4, "k2", 1400).unknown(),
        ]
    );
    // As it stands the example is not linearizable: nothing but "v-3-17" was ever written to k1,
    // so the cas expecting it cannot have failed its comparison.
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let v = report.linearizability.violation.as_ref().expect("a violation report");
    assert!(
        v.stuck.iter().any(|s| s.why == keel_check::StuckReason::CasWouldSucceed
            && matches!(s.op, keel_check::KeyOp::History { index: 2, .. })),
        "{v}"
    );
}

#[test]
fn header_nulls_and_rejections() {
    let text = r#"{"initial":{"k1":"a","k2":null}}

{"client":1,"op":"read","key":"k1","invoke_us":1,"complete_us":2,"outcome":"ok","read":"a"}
{"client":1,"op":"cas","key":"k2","expect":null,"value":"b","invoke_us":3,"complete_us":4,"outcome":"ok"}
{"client":2,"op":"read","key":"k3","invoke_us":5,"complete_us":null,"outcome":"unknown","read":null}
{"client":2,"op":"write","key":"k3","value":"c","invoke_us":6,"outcome":"fail","error":"not leader"}
{"client":2,"op":"read","key":"k3","invoke_us":7,"complete_us":8,"outcome":"ok","read":null,"node":"n2"}
"#;
    let h = History::read_from(text.as_bytes()).expect("valid history");
    assert_eq!(h.initial, finals(&[("k1", Some("a")), ("k2", None)]));
    assert_eq!(h.ops.len(), 5);
    assert_eq!(h.ops[1].expect, Some(None), "expect null = must be absent");
    assert_eq!(h.ops[4].read, Some(None), "read null = absent");
    assert!(h.ops[3].is_rejected());
    assert_linearizable(&h, Some(&finals(&[("k1", Some("a")), ("k2", Some("b")), ("k3", None)])));
}

#[test]
fn writer_round_trips_and_writes_the_exact_fields() {
    let mut h = history(vec![
        Op::write(3, "k1", "v-3-17", 1234).ok(1290),
        Op::read(1, "k1", 1300).read_ok(1350, None),
        Op::cas(2, "k1", None, "v-2-5", 1400).fail(1500),
        Op::delete(4, "k2", 1400).unknown(),
        Op::write(5, "k1", "x", 1500).rejected(1501, "no leader"),
    ]);
    h.initial = finals(&[("k1", Some("init"))]);
    let mut bytes = Vec::new();
    h.write_to(&mut bytes).expect("writing to memory");
    let text = String::from_utf8(bytes).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], r#"{"initial":{"k1":"init"}}"#);
    assert_eq!(
        lines[1],
        r#"{"client":3,"op":"write","key":"k1","value":"v-3-17","invoke_us":1234,"complete_us":1290,"outcome":"ok"}"#
    );
    assert_eq!(
        lines[2],
        r#"{"client":1,"op":"read","key":"k1","invoke_us":1300,"complete_us":1350,"outcome":"ok","read":null}"#
    );
    assert_eq!(
        lines[3],
        r#"{"client":2,"op":"cas","key":"k1","expect":null,"value":"v-2-5","invoke_us":1400,"complete_us":1500,"outcome":"fail"}"#
    );
    assert_eq!(
        lines[4],
        r#"{"client":4,"op":"delete","key":"k2","invoke_us":1400,"complete_us":null,"outcome":"unknown"}"#
    );
    assert!(lines[5].ends_with(r#""outcome":"fail","error":"no leader"}"#), "{}", lines[5]);
    assert_eq!(History::read_from(text.as_bytes()).expect("round trip"), h);
}

#[test]
fn streaming_writer_allows_a_header_only_first() {
    let mut out = HistoryWriter::new(Vec::new());
    out.write_header(&KeyValues::new()).expect("first line");
    out.write_op(&Op::write(1, "k", "a", 1).ok(2)).expect("an op");
    assert!(matches!(out.write_header(&KeyValues::new()), Err(WriteError::HeaderAfterOps)));
    let bytes = out.into_inner();
    let h = History::read_from(bytes.as_slice()).expect("readable");
    assert_eq!(h.ops.len(), 1);
}

fn error_of(text: &str) -> HistoryError {
    History::read_from(text.as_bytes()).expect_err("invalid history")
}

#[test]
fn malformed_lines_are_named_by_number() {
    let good =
        r#"{"client":1,"op":"write","key":"k","value":"a","invoke_us":1,"complete_us":2,"outcome":"ok"}"#;

    let e = error_of(&format!("{good}\n{good}\n{{\"client\":1,\"op\":\"write\"\n"));
    assert!(matches!(e, HistoryError::Json { line: 3, .. }), "{e}");
    assert!(e.to_string().starts_with("line 3: "), "{e}");

    let e = error_of(&format!("{good}\n{}\n", good.replace("\"write\"", "\"increment\"")));
    assert!(matches!(e, HistoryError::Json { line: 2, .. }), "{e}");

    let e = error_of(&format!("\n{good}\n{}\n", good.replace("\"value\":\"a\",", "")));
    assert!(
        matches!(e, HistoryError::Invalid { line: 3, source: InvalidOp::MissingValue { op: OpKind::Write } }),
        "{e}"
    );

    let e = error_of(&format!("{good}\n{}\n", good.replace("\"complete_us\":2", "\"complete_us\":0")));
    assert!(
        matches!(e, HistoryError::Invalid { line: 2, source: InvalidOp::CompletesBeforeInvoke { .. } }),
        "{e}"
    );

    let read_without_value =
        r#"{"client":1,"op":"read","key":"k","invoke_us":1,"complete_us":2,"outcome":"ok"}"#;
    let e = error_of(read_without_value);
    assert!(matches!(e, HistoryError::Invalid { line: 1, source: InvalidOp::MissingRead }), "{e}");

    let cas_without_expect =
        r#"{"client":1,"op":"cas","key":"k","value":"b","invoke_us":1,"complete_us":2,"outcome":"ok"}"#;
    let e = error_of(cas_without_expect);
    assert!(matches!(e, HistoryError::Invalid { line: 1, source: InvalidOp::MissingExpect }), "{e}");

    let e = error_of(&good.replace("\"outcome\":\"ok\"", "\"outcome\":\"ok\",\"read\":\"a\""));
    assert!(
        matches!(
            e,
            HistoryError::Invalid { line: 1, source: InvalidOp::UnexpectedRead { op: OpKind::Write } }
        ),
        "{e}"
    );

    let e = error_of(&format!("{good}\n{{\"initial\":{{\"k\":\"a\"}}}}\n"));
    assert!(matches!(e, HistoryError::MisplacedHeader { line: 2 }), "{e}");
    assert_eq!(e.line(), 2);
}

#[test]
fn checks_validate_histories_built_in_memory() {
    let bad = Op { outcome: Outcome::Ok, complete_us: None, ..Op::write(1, "k", "a", 1) };
    let h = history(vec![Op::write(1, "k", "a", 1).ok(2), bad]);
    let e = keel_check::check(&h, None, &Default::default()).expect_err("invalid op");
    assert_eq!(
        e,
        keel_check::CheckError::InvalidOp {
            index: 1,
            source: InvalidOp::MissingCompletion { outcome: Outcome::Ok }
        }
    );
    assert!(keel_check::check_phantom_reads(&h).is_err());
}

#[test]
fn duplicate_writes_are_reported_and_the_cheap_checks_stay_quiet() {
    // "a" is written twice: reading it again after "b" is fine for a register, and the
    // non-monotonic check must not claim otherwise.
    let h = history(vec![
        w(1, "a", 0, 10),
        r(2, Some("a"), 20, 30),
        w(1, "b", 40, 50),
        r(2, Some("b"), 60, 70),
        w(1, "a", 80, 90),
        r(2, Some("a"), 100, 110),
    ]);
    let report = assert_linearizable(&h, Some(&finals(&[(K, Some("a"))])));
    assert_eq!(report.duplicate_writes.len(), 1);
    assert_eq!(report.duplicate_writes[0].ops, vec![0, 4]);
    assert!(report.to_string().contains("warning: \"a\" written to key \"k\" more than once"));
}
