//! Hand-built histories that are linearizable: no check may report anything.

mod common;

use common::*;
use keel_check::{Op, Verdict};

#[test]
fn empty_history() {
    assert_linearizable(&history(vec![]), None);
    assert_linearizable(&history(vec![]), Some(&finals(&[("k", None)])));
}

#[test]
fn concurrent_writes_read_in_either_order() {
    // Two overlapping writes; readers overlapping both may see either, in either order, as long as
    // they agree on one order.
    let h = history(vec![
        w(1, "a", 0, 100),
        w(2, "b", 10, 90),
        r(3, Some("b"), 5, 40),
        r(3, Some("a"), 50, 60),
        r(4, Some("a"), 70, 120),
    ]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("a"))])));
    let h = history(vec![
        w(1, "a", 0, 100),
        w(2, "b", 10, 90),
        r(3, Some("a"), 5, 40),
        r(3, Some("b"), 50, 60),
        r(4, Some("b"), 70, 120),
    ]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("b"))])));
}

#[test]
fn read_concurrent_with_its_write_sees_old_or_new() {
    let h =
        history(vec![w(1, "a", 0, 10), w(1, "b", 20, 40), r(2, Some("a"), 25, 30), r(3, Some("b"), 25, 30)]);
    assert_linearizable(&h, None);
}

#[test]
fn touching_intervals_count_as_concurrent() {
    // The read completes at the very microsecond the write is invoked.
    let h = history(vec![r(1, Some("a"), 0, 10), w(2, "a", 10, 20)]);
    assert_linearizable(&h, None);
}

#[test]
fn ten_unknown_writes_some_read_later() {
    let mut ops = Vec::new();
    for i in 0..10u64 {
        ops.push(w_unknown(i + 1, &format!("u{i}"), i * 5));
    }
    // u3 and u7 were seen; the others may or may not have happened.
    ops.push(r(20, Some("u3"), 100, 110));
    ops.push(r(20, Some("u7"), 120, 130));
    ops.push(w(21, "z", 140, 150));
    ops.push(r(22, Some("z"), 160, 170));
    ops.push(r(22, Some("u9"), 180, 190)); // an unknown write may land long after its invoke
    let h = history(ops);
    assert_linearizable(&h, Some(&finals(&[(K, Some("u9"))])));
    // A final value from an unknown write that nobody read is fine too, and so is the last ok
    // write's value.
    assert_linearizable(&h, Some(&finals(&[(K, Some("u1"))])));
}

#[test]
fn unknown_writes_that_failed_cas_relies_on() {
    // The failed cas proves the register was not "a" at some point: only the unknown write of a
    // value nobody read can explain it.
    let h = history(vec![w(1, "a", 0, 10), w_unknown(2, "x", 15), cas_fail(3, Some("a"), "b", 20, 30)]);
    assert_linearizable(&h, None);
}

#[test]
fn unknown_cas_read_or_not() {
    let h = history(vec![
        w(1, "a", 0, 10),
        cas_unknown(2, Some("a"), "b", 20),
        r(3, Some("a"), 30, 40),
        r(3, Some("b"), 50, 60),
    ]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("b"))])));
    // Never happened.
    let h = history(vec![w(1, "a", 0, 10), cas_unknown(2, Some("a"), "b", 20), r(3, Some("a"), 30, 40)]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("a"))])));
}

#[test]
fn failed_cas_is_a_read_of_something_else() {
    let h = history(vec![
        w(1, "a", 0, 10),
        cas_fail(2, Some("x"), "b", 20, 30),
        cas_fail(2, None, "c", 40, 50),
        cas(3, Some("a"), "d", 60, 70),
        r(4, Some("d"), 80, 90),
    ]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("d"))])));
}

#[test]
fn unknown_delete_explains_absence() {
    let h = history(vec![w(1, "a", 0, 10), del_unknown(2, 20), r(3, None, 30, 40)]);
    assert_linearizable(&h, Some(&finals(&[(K, None)])));
    // ... and an absent final value.
    let h = history(vec![w(1, "a", 0, 10), del_unknown(2, 20)]);
    assert_linearizable(&h, Some(&finals(&[(K, None)])));
}

#[test]
fn absent_can_come_back() {
    // Deletes can restore "absent" any number of times: not a non-monotonic read.
    let h = history(vec![
        r(1, None, 0, 5),
        w(2, "a", 10, 20),
        r(1, Some("a"), 30, 40),
        del(2, 50, 60),
        r(1, None, 70, 80),
        w(2, "b", 90, 100),
        r(1, Some("b"), 110, 120),
        del(2, 130, 140),
        r(1, None, 150, 160),
    ]);
    assert_linearizable(&h, Some(&finals(&[(K, None)])));
}

#[test]
fn rejected_and_unanswered_ops_carry_no_weight() {
    let h = history(vec![
        w(1, "a", 0, 10),
        Op::write(2, K, "b", 20).rejected(21, "not leader"),
        Op::read(3, K, 30).unknown(),
        Op::delete(4, K, 30).rejected(31, "no quorum"),
        w_fail(5, "c", 40, 50),
        r(6, Some("a"), 60, 70),
    ]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("a"))])));
}

#[test]
fn initial_values_from_the_header() {
    let mut h = history(vec![
        r(1, Some("init"), 0, 10),
        cas(2, Some("init"), "b", 20, 30),
        on("k2", r(1, None, 0, 5)),
    ]);
    h.initial = finals(&[(K, Some("init"))]);
    assert_linearizable(&h, Some(&finals(&[(K, Some("b")), ("k2", None)])));
}

#[test]
fn long_sequential_history() {
    let mut ops = Vec::new();
    let mut t = 0;
    let mut current: Option<String> = None;
    for i in 0..300u64 {
        let c = i % 3;
        let op = match i % 5 {
            0 | 1 => {
                let v = format!("v{i}");
                current = Some(v.clone());
                w(c, &v, t, t + 3)
            }
            2 => r(c, current.as_deref(), t, t + 3),
            3 => {
                let v = format!("c{i}");
                let op = cas(c, current.as_deref(), &v, t, t + 3);
                current = Some(v);
                op
            }
            _ => {
                if i % 15 == 4 {
                    current = None;
                    del(c, t, t + 3)
                } else {
                    cas_fail(c, Some("never"), "x", t, t + 3)
                }
            }
        };
        ops.push(op);
        t += 5;
    }
    let final_state = finals(&[(K, current.as_deref())]);
    let report = assert_linearizable(&history(ops), Some(&final_state));
    assert_eq!(report.summary.ops, 300);
}

#[test]
fn many_keys_independently() {
    let mut ops = Vec::new();
    for k in 0..20u64 {
        let key = format!("key{k}");
        ops.push(on(&key, w(k, &format!("a{k}"), k, k + 10)));
        ops.push(on(&key, r(k + 100, Some(&format!("a{k}")), k + 20, k + 30)));
    }
    let report = assert_linearizable(&history(ops), None);
    assert_eq!(report.linearizability.keys.len(), 20);
    assert_eq!(report.linearizability.verdict(), Verdict::Linearizable);
}
