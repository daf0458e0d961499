//! The `keel-check` binary: summary output and exit codes (0 linearizable, 1 violation, 2 unknown
//! or bad input).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use keel_check::History;

/// A file under the test target's scratch directory, unique per test.
fn file(name: &str, contents: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keel-check-cli");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("scratch file");
    path
}

fn history_file(name: &str, h: &History) -> PathBuf {
    let mut bytes = Vec::new();
    h.write_to(&mut bytes).expect("in memory");
    file(name, &String::from_utf8(bytes).expect("utf-8"))
}

fn keel_check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-check")).args(args).output().expect("runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn linearizable_exits_0_with_a_summary() {
    let h = history(vec![w(1, "a", 0, 10), r(2, Some("a"), 20, 30), w_unknown(3, "b", 40)]);
    let path = history_file("ok.jsonl", &h);
    let finals = file("ok-final.json", r#"{"k":"b"}"#);
    let out =
        keel_check(&[path.to_str().expect("utf-8 path"), "--final", finals.to_str().expect("utf-8 path")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for needle in [
        "history: 3 ops, 1 keys, 3 clients; outcomes: 2 ok, 0 fail, 0 rejected, 1 unknown",
        "phantom reads: none",
        "final state: none",
        "non-monotonic reads: none",
        "linearizability of 1 keys: 1 linearizable, 0 not, 0 unknown",
        "verdict: LINEARIZABLE",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn violation_exits_1_and_explains() {
    let h = history(vec![w(1, "a", 0, 10), w(1, "b", 20, 30), r(2, Some("a"), 40, 50)]);
    let path = history_file("bad.jsonl", &h);
    let out = keel_check(&[path.to_str().expect("utf-8 path")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("key \"k\" is not linearizable"), "{stdout}");
    assert!(stdout.contains("verdict: NOT LINEARIZABLE"), "{stdout}");
}

#[test]
fn json_report() {
    let h = history(vec![w(1, "a", 0, 10), r(2, Some("zzz"), 20, 30)]);
    let path = history_file("json.jsonl", &h);
    let out = keel_check(&[path.to_str().expect("utf-8 path"), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["verdict"], "not_linearizable");
    assert_eq!(report["phantom_reads"][0]["cause"]["kind"], "never_written");
    assert_eq!(report["linearizability"]["keys"]["k"]["verdict"], "not_linearizable");
    assert_eq!(report["linearizability"]["violation"]["key"], "k");
    assert!(report["final_state"].is_null());
}

#[test]
fn budget_exceeded_exits_2() {
    let mut ops = Vec::new();
    for i in 0..40u64 {
        ops.push(w_unknown(i, &format!("u{i}"), i));
        ops.push(r(100 + i, Some(&format!("u{i}")), 100, 200));
    }
    ops.push(r(999, None, 300, 310));
    let path = history_file("hard.jsonl", &history(ops));
    let out = keel_check(&[path.to_str().expect("utf-8 path"), "--budget-secs", "0.3"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("verdict: UNKNOWN"), "{stdout}");
}

#[test]
fn malformed_input_exits_2_naming_the_line() {
    let path = file(
        "malformed.jsonl",
        "{\"client\":1,\"op\":\"write\",\"key\":\"k\",\"value\":\"a\",\"invoke_us\":1,\"complete_us\":2,\"outcome\":\"ok\"}\nnot json\n",
    );
    let out = keel_check(&[path.to_str().expect("utf-8 path")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("malformed.jsonl, line 2: not a valid operation"), "{stderr}");

    let out = keel_check(&["/nonexistent/history.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot open history"), "{}", text(&out.stderr));

    let ok = file("ok2.jsonl", "");
    let bad_final = file("bad-final.json", "[1,2]");
    let out =
        keel_check(&[ok.to_str().expect("utf-8 path"), "--final", bad_final.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not a JSON object"), "{}", text(&out.stderr));

    let out = keel_check(&[ok.to_str().expect("utf-8 path"), "--budget-secs", "-1"]);
    assert_eq!(out.status.code(), Some(2));

    let out = keel_check(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
}
