//! Hand-built histories that are not linearizable: each must be reported, by exactly the checks
//! named (the cheap checks where they can prove it, the search always).

mod common;

use common::*;
use keel_check::{FinalStateFinding, KeyVerdict, PhantomCause, StuckReason};

#[test]
fn stale_read_after_an_acknowledged_write() {
    let h = history(vec![w(1, "a", 0, 10), w(1, "b", 20, 30), r(2, Some("a"), 40, 50)]);
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let v = report.linearizability.violation.as_ref().expect("a violation report");
    assert_eq!(v.key, K);
    // "a" is written once and the read still needs it: the search will not let "b" bury it.
    assert_eq!(v.linearized.len(), 1, "{v}");
    assert_eq!(v.register.as_deref(), Some("a"));
    assert_stuck_hiding_a_for_op_2(v);
}

#[test]
fn read_of_a_value_whose_write_failed() {
    let h = history(vec![w_fail(1, "a", 0, 10), r(2, Some("a"), 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Phantom, Found::Wgl]);
    assert!(matches!(report.phantom_reads[0].cause, PhantomCause::WriteFailed { .. }));
}

#[test]
fn read_of_a_value_whose_write_was_rejected() {
    let h =
        history(vec![keel_check::Op::write(1, K, "a", 0).rejected(5, "not leader"), r(2, Some("a"), 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Phantom, Found::Wgl]);
    assert!(matches!(report.phantom_reads[0].cause, PhantomCause::WriteFailed { .. }));
}

#[test]
fn read_of_the_future() {
    // The read completed before the write of what it saw was even invoked.
    let h = history(vec![r(2, Some("a"), 0, 10), w(1, "a", 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Phantom, Found::Wgl]);
    assert!(matches!(report.phantom_reads[0].cause, PhantomCause::WrittenAfterRead { .. }));
}

#[test]
fn read_of_the_future_from_an_unknown_cas() {
    let h = history(vec![w(1, "a", 0, 5), r(2, Some("b"), 10, 20), cas_unknown(3, Some("a"), "b", 30)]);
    assert_caught(&h, None, &[Found::Phantom, Found::Wgl]);
}

#[test]
fn phantom_value() {
    let h = history(vec![w(1, "a", 0, 10), r(2, Some("zzz"), 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Phantom, Found::Wgl]);
    assert_eq!(report.phantom_reads[0].cause, PhantomCause::NeverWritten);
}

#[test]
fn value_written_to_another_key() {
    let h = history(vec![on("k2", w(1, "a", 0, 10)), r(2, Some("a"), 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Phantom, Found::Wgl]);
    assert_eq!(report.phantom_reads[0].cause, PhantomCause::NeverWritten);
}

#[test]
fn lost_write_in_the_final_state() {
    let h = history(vec![w(1, "a", 0, 10), r(2, Some("a"), 20, 30)]);
    let f = finals(&[(K, None)]);
    let report = assert_caught(&h, Some(&f), &[Found::Final, Found::Wgl]);
    let findings = report.final_state.as_ref().expect("final state checked");
    assert!(matches!(findings[0], FinalStateFinding::LostWrite { write: Some(_), .. }), "{report}");
}

#[test]
fn lost_write_when_the_only_delete_came_first() {
    let h = history(vec![del(1, 0, 10), w(2, "a", 100, 110)]);
    let f = finals(&[(K, None)]);
    assert_caught(&h, Some(&f), &[Found::Final, Found::Wgl]);
}

#[test]
fn lost_initial_value() {
    let mut h = history(vec![r(1, Some("init"), 0, 10)]);
    h.initial = finals(&[(K, Some("init"))]);
    let f = finals(&[(K, None)]);
    let report = assert_caught(&h, Some(&f), &[Found::Final, Found::Wgl]);
    let findings = report.final_state.as_ref().expect("final state checked");
    assert!(matches!(findings[0], FinalStateFinding::LostWrite { write: None, .. }), "{report}");
}

#[test]
fn final_value_overwritten_by_a_later_acknowledged_write() {
    let h = history(vec![w(1, "a", 0, 10), w(2, "b", 20, 30)]);
    let f = finals(&[(K, Some("a"))]);
    let report = assert_caught(&h, Some(&f), &[Found::Final, Found::Wgl]);
    let findings = report.final_state.as_ref().expect("final state checked");
    assert!(
        matches!(&findings[0], FinalStateFinding::StaleValue { overwritten_by, .. } if overwritten_by.index == 1)
    );
}

#[test]
fn final_value_deleted_by_a_later_acknowledged_delete() {
    let h = history(vec![w(1, "a", 0, 10), del(2, 20, 30)]);
    let f = finals(&[(K, Some("a"))]);
    assert_caught(&h, Some(&f), &[Found::Final, Found::Wgl]);
}

#[test]
fn final_value_never_written() {
    let h = history(vec![w(1, "a", 0, 10)]);
    let f = finals(&[(K, Some("ghost"))]);
    let report = assert_caught(&h, Some(&f), &[Found::Final, Found::Wgl]);
    let findings = report.final_state.as_ref().expect("final state checked");
    assert!(matches!(findings[0], FinalStateFinding::PhantomValue { .. }));
}

#[test]
fn real_time_order_between_two_writes_seen_by_reads() {
    // a then b in real time; a read invoked after b completed still sees a.
    let h =
        history(vec![w(1, "a", 0, 10), w(2, "b", 20, 30), r(3, Some("b"), 15, 50), r(4, Some("a"), 35, 60)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn two_clients_see_concurrent_writes_in_opposite_orders() {
    let h = history(vec![
        w(1, "a", 0, 100),
        w(2, "b", 0, 100),
        r(3, Some("a"), 10, 20),
        r(3, Some("b"), 30, 40),
        r(4, Some("b"), 10, 20),
        r(4, Some("a"), 30, 40),
    ]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn cas_succeeded_though_its_expect_was_not_current() {
    let h = history(vec![w(1, "a", 0, 10), w(1, "b", 20, 30), cas(2, Some("a"), "c", 40, 50)]);
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let v = report.linearizability.violation.as_ref().expect("a violation report");
    // The search stops as soon as "b" would bury the "a" the cas still needs.
    assert_stuck_hiding_a_for_op_2(v);
}

#[test]
fn two_cas_with_the_same_expect_both_succeed() {
    let h = history(vec![w(1, "a", 0, 10), cas(2, Some("a"), "b", 20, 30), cas(3, Some("a"), "c", 20, 30)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn two_cas_from_absent_both_succeed() {
    let h = history(vec![cas(1, None, "a", 0, 10), cas(2, None, "b", 20, 30)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn failed_cas_whose_expect_was_certainly_current() {
    let h = history(vec![w(1, "a", 0, 10), cas_fail(2, Some("a"), "b", 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let v = report.linearizability.violation.as_ref().expect("a violation report");
    assert!(v.stuck.iter().any(|s| s.why == StuckReason::CasWouldSucceed), "{v}");
}

#[test]
fn failed_cas_from_absent_on_a_fresh_key() {
    let h = history(vec![cas_fail(1, None, "a", 0, 10)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn read_your_write_violation() {
    let h = history(vec![w(1, "a", 0, 10), w(1, "b", 20, 30), r(1, Some("a"), 40, 50)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn read_absent_after_own_write() {
    let h = history(vec![w(1, "a", 0, 10), r(1, None, 20, 30)]);
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let v = report.linearizability.violation.as_ref().expect("a violation report");
    assert_eq!(v.register.as_deref(), Some("a"));
    assert!(
        v.stuck.iter().any(|s| s.why == StuckReason::ReadMismatch
            && matches!(s.op, keel_check::KeyOp::History { index: 1, .. })),
        "{v}"
    );
}

#[test]
fn delete_then_read_of_the_old_value() {
    let h = history(vec![w(1, "a", 0, 10), del(1, 20, 30), r(2, Some("a"), 40, 50)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn non_monotonic_reads() {
    let h = history(vec![
        w(1, "a", 0, 10),
        w(1, "b", 0, 10),
        r(2, Some("a"), 20, 30),
        r(2, Some("b"), 40, 50),
        r(2, Some("a"), 60, 70),
    ]);
    let report = assert_caught(&h, None, &[Found::Monotonic, Found::Wgl]);
    let n = &report.non_monotonic_reads[0];
    assert_eq!((n.first.index, n.other.index, n.again.index), (2, 3, 4));
}

#[test]
fn non_monotonic_reads_through_absent() {
    let h = history(vec![
        cas(1, None, "a", 0, 10),
        r(2, Some("a"), 20, 30),
        r(2, None, 40, 50),
        r(2, Some("a"), 60, 70),
    ]);
    assert_caught(&h, None, &[Found::Monotonic, Found::Wgl]);
}

#[test]
fn stale_initial_value() {
    let mut h = history(vec![w(1, "b", 0, 10), r(2, Some("a"), 20, 30)]);
    h.initial = finals(&[(K, Some("a"))]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn unknown_write_read_then_back_again_after_another_write() {
    // The unknown write of "a" happened (it was read), was overwritten by "b", and came back.
    let h = history(vec![
        w_unknown(1, "a", 0),
        r(2, Some("a"), 10, 20),
        w(3, "b", 30, 40),
        r(4, Some("a"), 50, 60),
    ]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn unknown_delete_cannot_explain_an_earlier_absence() {
    let h = history(vec![w(1, "a", 0, 10), r(2, None, 20, 30), del_unknown(3, 40)]);
    assert_caught(&h, None, &[Found::Wgl]);
}

#[test]
fn only_the_bad_key_fails_and_the_smallest_failing_key_is_reported() {
    let mut ops = vec![
        // k1: fine.
        on("k1", w(1, "a1", 0, 10)),
        on("k1", r(2, Some("a1"), 20, 30)),
        // k2: stale read, with extra ops.
        on("k2", w(1, "a2", 0, 10)),
        on("k2", w(1, "b2", 20, 30)),
        on("k2", r(1, Some("b2"), 35, 38)),
        on("k2", r(2, Some("a2"), 40, 50)),
        // k3: stale read, fewest ops of the failing keys.
        on("k3", w(1, "a3", 0, 10)),
        on("k3", w(1, "b3", 20, 30)),
        on("k3", r(2, Some("a3"), 40, 50)),
    ];
    ops.reverse(); // the checker must not rely on the order of lines
    let h = history(ops);
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let keys = &report.linearizability.keys;
    assert_eq!(keys["k1"], KeyVerdict::Linearizable);
    assert!(matches!(keys["k2"], KeyVerdict::NotLinearizable { .. }));
    assert!(matches!(keys["k3"], KeyVerdict::NotLinearizable { .. }));
    assert_eq!(report.linearizability.violation.as_ref().map(|v| v.key.as_str()), Some("k3"));
}

#[test]
fn the_violation_report_reads_well() {
    let h = history(vec![w(1, "a", 1000, 1010), w(1, "b", 1020, 1030), r(2, Some("a"), 1040, 1050)]);
    let report = assert_caught(&h, None, &[Found::Wgl]);
    let text = report.to_string();
    for needle in [
        "key \"k\" is not linearizable",
        "times in µs after 1000",
        "longest linearizable prefix found: 1 ops",
        "then the register holds \"a\"",
        "write \"k\" = \"b\"",
        "it would replace \"a\" for good (written once), but #2 c2 read \"k\" -> \"a\" still needs it",
        "verdict: NOT LINEARIZABLE",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // Relative times: the read is shown at 40..50.
    assert!(text.contains("40 ..       50]"), "{text}");
}

/// The search gave up because placing the next write would bury "a", which op #2 still has to see.
fn assert_stuck_hiding_a_for_op_2(v: &keel_check::Violation) {
    assert!(
        v.stuck.iter().any(|s| matches!(
            &s.why,
            StuckReason::WouldHide { value, needed_by: keel_check::KeyOp::History { index: 2, .. } } if value == "a"
        )),
        "{v}"
    );
}
