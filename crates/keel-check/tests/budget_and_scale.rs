//! The search's bounds: a pathological history ends as "unknown" within its budget instead of
//! hanging, and a realistic history of ~20k ops checks in a few seconds (debug build).

mod common;

use std::time::{Duration, Instant};

use common::*;
use keel_check::{check, CheckOptions, KeyVerdict, UnknownReason, Verdict};

/// 40 concurrent unknown writes, each read by one of 40 concurrent reads, then a read of "absent"
/// with no delete anywhere: not linearizable, but proving it means trying every subset of the 40
/// write-read pairs.
fn pathological() -> keel_check::History {
    let mut ops = Vec::new();
    for i in 0..40u64 {
        ops.push(w_unknown(i, &format!("u{i}"), i));
        ops.push(r(100 + i, Some(&format!("u{i}")), 100, 200));
    }
    ops.push(r(999, None, 300, 310));
    history(ops)
}

#[test]
fn pathological_history_is_unknown_within_the_budget() {
    let budget = Duration::from_millis(1500);
    let started = Instant::now();
    let report = check(&pathological(), None, &CheckOptions::with_budget(budget)).expect("valid ops");
    let elapsed = started.elapsed();
    println!("pathological history: {:?} in {elapsed:?}", report.verdict);
    assert_eq!(report.verdict, Verdict::Unknown, "{report}");
    assert!(matches!(
        report.linearizability.keys[K],
        KeyVerdict::Unknown { reason: UnknownReason::BudgetExhausted { .. } }
    ));
    assert!(elapsed < budget + Duration::from_secs(2), "took {elapsed:?} for a budget of {budget:?}");
    let text = report.to_string();
    assert!(text.contains("time budget exhausted") && text.contains("verdict: UNKNOWN"), "{text}");
}

#[test]
fn a_full_memo_also_ends_the_search() {
    let options = CheckOptions { budget: Duration::from_secs(30), max_memo_bytes: 64 * 1024 };
    let report = check(&pathological(), None, &options).expect("valid ops");
    assert!(
        matches!(
            report.linearizability.keys[K],
            KeyVerdict::Unknown { reason: UnknownReason::MemoFull { .. } }
        ),
        "{report}"
    );
}

#[test]
fn a_violation_on_one_key_is_reported_even_when_another_is_unknown() {
    let mut h = pathological();
    h.ops.push(on("k2", w(1, "a", 0, 10)));
    h.ops.push(on("k2", r(2, Some("zzz"), 20, 30)));
    let report = check(&h, None, &CheckOptions::with_budget(Duration::from_millis(500))).expect("valid ops");
    assert_eq!(report.verdict, Verdict::NotLinearizable, "{report}");
    assert!(matches!(report.linearizability.keys["k2"], KeyVerdict::NotLinearizable { .. }));
    assert!(matches!(report.linearizability.keys[K], KeyVerdict::Unknown { .. }));
}

#[test]
fn twenty_thousand_ops_check_in_seconds() {
    let sim = Sim {
        clients: 10,
        keys: 10,
        ops: 20_000,
        window: 10,
        p_unknown: 0.05,
        p_read_unknown: 0.02,
        p_rejected: 0.01,
        ..Sim::default()
    };
    let seed = 20_000;
    let (h, final_state) = simulate(seed, &sim);
    let started = Instant::now();
    let report = check(&h, Some(&final_state), &CheckOptions::with_budget(Duration::from_secs(60)))
        .expect("valid ops");
    let elapsed = started.elapsed();
    println!(
        "{} ops ({} unknown) on {} keys: {:?} in {elapsed:?} (search {} ms)",
        report.summary.ops,
        report.summary.unknown,
        report.summary.keys,
        report.verdict,
        report.linearizability.elapsed_ms
    );
    assert_eq!(report.verdict, Verdict::Linearizable, "seed {seed}:\n{report}");
    // Generous against a loaded machine; it takes well under a second when idle.
    assert!(elapsed < Duration::from_secs(20), "seed {seed}: took {elapsed:?}");
}

#[test]
fn twenty_thousand_ops_with_one_stale_read_are_caught() {
    let sim = Sim { clients: 10, keys: 10, ops: 20_000, window: 10, p_unknown: 0.05, ..Sim::default() };
    let seed = 20_001;
    let (mut h, final_state) = simulate(seed, &sim);
    // Late in the history, make a read return the key's first ever written value.
    let (ri, first) = h
        .ops
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, op)| {
            let first = h.ops.iter().find(|w| {
                w.key == op.key && w.op == keel_check::OpKind::Write && w.outcome == keel_check::Outcome::Ok
            })?;
            (op.op == keel_check::OpKind::Read && op.outcome == keel_check::Outcome::Ok && i > 15_000)
                .then(|| (i, first.value.clone()))
        })
        .expect("a late ok read");
    h.ops[ri].read = Some(first);
    let started = Instant::now();
    let report = check(&h, Some(&final_state), &CheckOptions::with_budget(Duration::from_secs(60)))
        .expect("valid ops");
    println!("stale read among 20k ops: {:?} in {:?}", report.verdict, started.elapsed());
    assert_eq!(report.verdict, Verdict::NotLinearizable, "seed {seed}");
    assert!(matches!(report.linearizability.verdict(), Verdict::NotLinearizable), "seed {seed}");
    let violation = report.linearizability.violation.as_ref().expect("a violation report");
    assert_eq!(violation.key, h.ops[ri].key);
}
