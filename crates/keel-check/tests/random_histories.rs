//! Seeded random histories: ones generated from a real register must all pass; certainly-stale
//! mutations of them must be caught; and on small random histories (valid or not) the search must
//! agree with a brute-force oracle, and the cheap checks must never fire where the oracle finds an
//! order. Every failure message names its seed.

mod common;

use std::time::Duration;

use common::*;
use keel_check::{check, check_linearizable, CheckOptions, History, KeyValues, Op, OpKind, Outcome, Verdict};

fn sims() -> Vec<(&'static str, Sim)> {
    vec![
        ("default", Sim::default()),
        ("many clients", Sim { clients: 8, ops: 80, window: 12, ..Sim::default() }),
        ("keys and initial values", Sim { keys: 3, ops: 90, with_initial: true, ..Sim::default() }),
        ("unknown-heavy", Sim { p_unknown: 0.35, p_read_unknown: 0.2, ops: 50, ..Sim::default() }),
        ("cas-heavy", Sim { p_cas: 0.5, p_read: 0.3, p_delete: 0.1, ..Sim::default() }),
        ("narrow windows", Sim { window: 1, ops: 120, ..Sim::default() }),
    ]
}

const SEEDS_PER_SIM: u64 = 60;

#[test]
fn simulated_histories_are_linearizable() {
    for (name, sim) in sims() {
        for seed in 0..SEEDS_PER_SIM {
            let (h, final_state) = simulate(seed, &sim);
            let report = run(&h, Some(&final_state));
            assert!(
                report.verdict == Verdict::Linearizable && report.cheap_findings() == 0,
                "sim {name:?} seed {seed}: a valid history was reported:\n{report}"
            );
        }
    }
}

/// Replaces one ok read's value with a value that certainly was overwritten before the read began:
/// written by an ok write or cas W, after which an ok mutation M was invoked after W completed and
/// completed before the read was invoked. Returns the mutated history, or `None` if no read qualifies.
fn mutate_stale(h: &History, rng: &mut Rng) -> Option<History> {
    let ops = &h.ops;
    let is_ok_mutation = |o: &Op| o.outcome == Outcome::Ok && o.op != OpKind::Read;
    let mut candidates = Vec::new();
    for (ri, read) in ops.iter().enumerate() {
        if read.op != OpKind::Read || read.outcome != Outcome::Ok {
            continue;
        }
        for (wi, writer) in ops.iter().enumerate() {
            let (true, Some(value), Some(written)) = (
                writer.key == read.key && is_ok_mutation(writer) && writer.op != OpKind::Delete,
                writer.value.as_ref(),
                writer.complete_us,
            ) else {
                continue;
            };
            if read.read.as_ref().and_then(|v| v.as_ref()) == Some(value) {
                continue;
            }
            let buried = ops.iter().enumerate().any(|(mi, m)| {
                mi != wi
                    && m.key == read.key
                    && is_ok_mutation(m)
                    && m.invoke_us > written
                    && m.complete_us.is_some_and(|c| c < read.invoke_us)
            });
            if buried {
                candidates.push((ri, value.clone()));
            }
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let (ri, value) = rng.pick(&candidates).clone();
    let mut mutated = h.clone();
    mutated.ops[ri].read = Some(Some(value));
    Some(mutated)
}

#[test]
fn certainly_stale_mutations_are_caught() {
    let mut tried = 0;
    let mut caught = 0;
    for (name, sim) in sims() {
        for seed in 0..SEEDS_PER_SIM {
            let (h, final_state) = simulate(seed, &sim);
            let mut rng = Rng::new(seed ^ 0x5eed);
            let Some(mutated) = mutate_stale(&h, &mut rng) else { continue };
            tried += 1;
            let report = run(&mutated, Some(&final_state));
            // The mutated history is certainly not linearizable: never "linearizable"; "unknown"
            // only if the budget ran out.
            assert_ne!(
                report.verdict,
                Verdict::Linearizable,
                "sim {name:?} seed {seed}: mutation missed:\n{report}"
            );
            if report.verdict == Verdict::NotLinearizable {
                caught += 1;
            }
        }
    }
    println!("stale mutations: {caught} of {tried} caught");
    assert!(tried >= 200, "too few mutable histories: {tried}");
    assert!(caught * 100 >= tried * 95, "only {caught} of {tried} mutations caught");
}

/// How a small random history's outcomes are drawn.
#[derive(Clone, Copy)]
struct Mix {
    max_ops: u64,
    /// Out of 10: ok, fail, unknown; the rest rejected.
    ok: u64,
    fail: u64,
    unknown: u64,
    /// Reads and cas may name a value nobody writes (which the cheap checks catch at once).
    phantom: bool,
}

const BALANCED: Mix = Mix { max_ops: 7, ok: 6, fail: 2, unknown: 1, phantom: true };
/// Mostly unknown outcomes: exercises where the search may place optional ops.
const UNKNOWN_HEAVY: Mix = Mix { max_ops: 8, ok: 4, fail: 1, unknown: 5, phantom: false };
/// Few failures the cheap checks can see: mostly left to the search.
const SUBTLE: Mix = Mix { max_ops: 8, ok: 7, fail: 1, unknown: 2, phantom: false };

/// A small random history on one key, valid or not: values unique per write, reads and cas
/// expectations drawn from the written values, absent, and a phantom.
fn small_random(seed: u64, mix: Mix) -> (History, Option<KeyValues>) {
    let mut rng = Rng::new(seed);
    let n = 2 + rng.below(mix.max_ops - 1) as usize;
    let values: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
    let mut pool: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
    pool.push(None);
    if mix.phantom {
        pool.push(Some("phantom"));
    }
    let mut ops = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let c = i as u64;
        let invoke = rng.below(20);
        let complete = invoke + rng.below(12);
        let kind = rng.below(4);
        let op = match kind {
            0 => Op::read(c, K, invoke),
            1 => Op::write(c, K, value, invoke),
            2 => Op::cas(c, K, *rng.pick(&pool), value, invoke),
            _ => Op::delete(c, K, invoke),
        };
        let roll = rng.below(10);
        let op = if roll < mix.ok {
            if kind == 0 {
                op.read_ok(complete, *rng.pick(&pool))
            } else {
                op.ok(complete)
            }
        } else if roll < mix.ok + mix.fail {
            op.fail(complete)
        } else if roll < mix.ok + mix.fail + mix.unknown {
            op.unknown()
        } else {
            op.rejected(complete, "rejected")
        };
        ops.push(op);
    }
    let mut h = history(ops);
    if rng.chance(0.2) {
        h.initial = finals(&[(K, Some("v0"))]);
    }
    let final_state = rng.chance(0.4).then(|| finals(&[(K, *rng.pick(&pool))]));
    (h, final_state)
}

#[test]
fn search_agrees_with_brute_force_and_cheap_checks_are_sound() {
    agree_with_brute_force(BALANCED, 4000);
}

#[test]
fn search_agrees_with_brute_force_when_most_outcomes_are_unknown() {
    agree_with_brute_force(UNKNOWN_HEAVY, 8000);
}

#[test]
fn search_agrees_with_brute_force_where_cheap_checks_see_little() {
    agree_with_brute_force(SUBTLE, 8000);
}

fn agree_with_brute_force(mix: Mix, seeds: u64) {
    let options = CheckOptions::with_budget(Duration::from_secs(10));
    let (mut valid, mut invalid, mut cheap_caught) = (0, 0, 0);
    for seed in 0..seeds {
        let (h, final_state) = small_random(seed, mix);
        let expected = oracle(&h, final_state.as_ref());
        let report = check(&h, final_state.as_ref(), &options).expect("valid ops");
        let search = report.linearizability.verdict();
        let want = if expected { Verdict::Linearizable } else { Verdict::NotLinearizable };
        assert_eq!(
            search, want,
            "seed {seed}: search disagrees with brute force on\n{h:#?}\nfinal {final_state:?}\n{report}"
        );
        if report.cheap_findings() > 0 {
            assert!(!expected, "seed {seed}: a cheap check fired on a linearizable history:\n{report}");
            cheap_caught += 1;
        }
        if expected {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    println!("brute force: {valid} valid, {invalid} invalid ({cheap_caught} also caught by cheap checks)");
    // Both kinds must be well represented for the comparison to mean something, including
    // violations only the search sees.
    assert!(valid >= seeds / 8 && invalid >= seeds / 8, "{valid} valid, {invalid} invalid");
    assert!(
        invalid - cheap_caught >= seeds / 20,
        "only {} violations left to the search",
        invalid - cheap_caught
    );
}

#[test]
fn search_agrees_with_brute_force_on_simulated_then_perturbed_histories() {
    // Small simulated histories with one op's outcome or read value perturbed at random.
    let sim = Sim { ops: 7, clients: 3, window: 4, p_unknown: 0.3, ..Sim::default() };
    let mut disagreements = Vec::new();
    let mut valid = 0;
    for seed in 0..1500 {
        let (mut h, final_state) = simulate(seed, &sim);
        let mut rng = Rng::new(seed.wrapping_mul(31));
        let i = rng.below(h.ops.len() as u64) as usize;
        let op = &mut h.ops[i];
        match (op.op, op.outcome) {
            (OpKind::Read, Outcome::Ok) => {
                op.read = Some(Some(format!("v{}-{}", rng.below(3), rng.below(8))))
            }
            (_, Outcome::Ok) => op.outcome = Outcome::Fail,
            (_, Outcome::Fail) if op.error.is_none() && op.op == OpKind::Cas => op.outcome = Outcome::Ok,
            _ => {}
        }
        let f = rng.chance(0.5).then_some(&final_state);
        let expected = oracle(&h, f);
        let got = check_linearizable(&h, f, &CheckOptions::with_budget(Duration::from_secs(10)))
            .expect("valid ops");
        if (got.verdict() == Verdict::Linearizable) != expected {
            disagreements.push(seed);
        }
        valid += usize::from(expected);
    }
    println!("perturbed simulations: {valid} of 1500 still linearizable");
    assert!(
        (300..=1200).contains(&valid),
        "{valid} of 1500 linearizable: the perturbation is too weak or too strong"
    );
    assert!(disagreements.is_empty(), "search disagrees with brute force for seeds {disagreements:?}");
}
