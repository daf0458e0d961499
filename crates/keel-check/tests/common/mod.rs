//! Helpers shared by the integration tests: terse op constructors, a seeded PRNG, a generator of
//! linearizable histories from a simulated register, and a brute-force linearizability oracle.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_check::{check, CheckOptions, History, KeyValues, Op, OpKind, Outcome, Report, Verdict};

pub const K: &str = "k";

// ---- terse constructors, all on key K unless `on` moves them --------------------------------------

pub fn w(client: u64, value: &str, invoke: u64, complete: u64) -> Op {
    Op::write(client, K, value, invoke).ok(complete)
}
pub fn w_unknown(client: u64, value: &str, invoke: u64) -> Op {
    Op::write(client, K, value, invoke).unknown()
}
pub fn w_fail(client: u64, value: &str, invoke: u64, complete: u64) -> Op {
    Op::write(client, K, value, invoke).fail(complete)
}
pub fn r(client: u64, seen: Option<&str>, invoke: u64, complete: u64) -> Op {
    Op::read(client, K, invoke).read_ok(complete, seen)
}
pub fn cas(client: u64, expect: Option<&str>, value: &str, invoke: u64, complete: u64) -> Op {
    Op::cas(client, K, expect, value, invoke).ok(complete)
}
pub fn cas_fail(client: u64, expect: Option<&str>, value: &str, invoke: u64, complete: u64) -> Op {
    Op::cas(client, K, expect, value, invoke).fail(complete)
}
pub fn cas_unknown(client: u64, expect: Option<&str>, value: &str, invoke: u64) -> Op {
    Op::cas(client, K, expect, value, invoke).unknown()
}
pub fn del(client: u64, invoke: u64, complete: u64) -> Op {
    Op::delete(client, K, invoke).ok(complete)
}
pub fn del_unknown(client: u64, invoke: u64) -> Op {
    Op::delete(client, K, invoke).unknown()
}
pub fn on(key: &str, op: Op) -> Op {
    Op { key: key.to_owned(), ..op }
}

pub fn history(ops: Vec<Op>) -> History {
    History { initial: KeyValues::new(), ops }
}

pub fn finals(pairs: &[(&str, Option<&str>)]) -> KeyValues {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned))).collect()
}

pub fn run(history: &History, final_state: Option<&KeyValues>) -> Report {
    check(history, final_state, &CheckOptions::with_budget(Duration::from_secs(20))).expect("valid history")
}

/// Which checks reported something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Found {
    Phantom,
    Final,
    Monotonic,
    Wgl,
}

pub fn found(report: &Report) -> BTreeSet<Found> {
    let mut out = BTreeSet::new();
    if !report.phantom_reads.is_empty() {
        out.insert(Found::Phantom);
    }
    if report.final_state.as_ref().is_some_and(|f| !f.is_empty()) {
        out.insert(Found::Final);
    }
    if !report.non_monotonic_reads.is_empty() {
        out.insert(Found::Monotonic);
    }
    if report.linearizability.verdict() == Verdict::NotLinearizable {
        out.insert(Found::Wgl);
    }
    out
}

/// Asserts that exactly the checks in `expected` report the history, and that the verdict says so.
pub fn assert_caught(history: &History, final_state: Option<&KeyValues>, expected: &[Found]) -> Report {
    let report = run(history, final_state);
    let want: BTreeSet<Found> = expected.iter().copied().collect();
    assert_eq!(found(&report), want, "checks that fired differ; report:\n{report}");
    assert_eq!(report.verdict, Verdict::NotLinearizable, "report:\n{report}");
    report
}

pub fn assert_linearizable(history: &History, final_state: Option<&KeyValues>) -> Report {
    let report = run(history, final_state);
    assert_eq!(report.verdict, Verdict::Linearizable, "report:\n{report}");
    assert_eq!(report.cheap_findings(), 0, "report:\n{report}");
    report
}

// ---- seeded PRNG --------------------------------------------------------------------------------

/// splitmix64: small, seedable, good enough for generating test histories.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / ((1u64 << 53) as f64)) < p
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

// ---- histories from a simulated register ---------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Sim {
    pub clients: u64,
    pub keys: u64,
    pub ops: usize,
    /// Half-width of the window around each op's linearization point.
    pub window: u64,
    pub p_read: f64,
    pub p_cas: f64,
    pub p_delete: f64,
    /// Mutations whose client gets no answer (unknown): they take effect in the window, later
    /// (after the client gave up), or never.
    pub p_unknown: f64,
    /// Reads whose client gets no answer.
    pub p_read_unknown: f64,
    /// Rejected before reaching the leader.
    pub p_rejected: f64,
    pub with_initial: bool,
}

impl Default for Sim {
    fn default() -> Self {
        Sim {
            clients: 4,
            keys: 1,
            ops: 60,
            window: 8,
            p_read: 0.45,
            p_cas: 0.2,
            p_delete: 0.05,
            p_unknown: 0.1,
            p_read_unknown: 0.05,
            p_rejected: 0.03,
            with_initial: false,
        }
    }
}

/// An unknown mutation that takes effect after its client gave up.
struct Delayed {
    at: u64,
    key: String,
    /// `None` for a delete.
    value: Option<String>,
    /// For a cas: what the register must hold.
    expect: Option<Option<String>>,
}

/// A history produced by running ops one at a time on real registers, each op's window drawn at
/// random around the moment it was applied: linearizable by construction. Also returns the final
/// state of every key.
pub fn simulate(seed: u64, sim: &Sim) -> (History, KeyValues) {
    let mut rng = Rng::new(seed);
    let keys: Vec<String> = (0..sim.keys).map(|k| format!("k{k}")).collect();
    let mut registers: BTreeMap<String, Option<String>> = keys.iter().map(|k| (k.clone(), None)).collect();
    let mut initial = KeyValues::new();
    if sim.with_initial {
        for k in &keys {
            if rng.chance(0.5) {
                let v = format!("init-{k}");
                initial.insert(k.clone(), Some(v.clone()));
                registers.insert(k.clone(), Some(v));
            }
        }
    }
    // Every value ever held, per key, for cas expectations.
    let mut seen_values: BTreeMap<String, Vec<Option<String>>> =
        registers.iter().map(|(k, v)| (k.clone(), vec![v.clone()])).collect();
    let mut busy_until = vec![0u64; sim.clients as usize];
    let mut ops = Vec::with_capacity(sim.ops);
    let mut delayed: Vec<Delayed> = Vec::new();
    let mut clock = sim.window + 1;
    let mut seq = 0u64;
    while ops.len() < sim.ops {
        clock += 1 + rng.below(3);
        let free: Vec<usize> = (0..busy_until.len()).filter(|&c| busy_until[c] < clock).collect();
        if free.is_empty() {
            continue;
        }
        let client = *rng.pick(&free);
        // Apply the delayed effects due by now, in time order.
        delayed.sort_by_key(|d| d.at);
        while delayed.first().is_some_and(|d| d.at <= clock) {
            let d = delayed.remove(0);
            let reg = registers.get_mut(&d.key).expect("known key");
            if d.expect.is_none_or(|e| e == *reg) {
                *reg = d.value.clone();
                seen_values.get_mut(&d.key).expect("known key").push(d.value);
            }
        }
        let key = rng.pick(&keys).clone();
        let invoke = (busy_until[client] + 1).max(clock.saturating_sub(rng.below(sim.window + 1)));
        let complete = clock + rng.below(sim.window + 1);
        busy_until[client] = complete;
        seq += 1;
        let value = format!("v{client}-{seq}");
        let c = client as u64;
        let roll = rng.next_u64() as f64 / u64::MAX as f64;
        let kind = if roll < sim.p_read {
            OpKind::Read
        } else if roll < sim.p_read + sim.p_cas {
            OpKind::Cas
        } else if roll < sim.p_read + sim.p_cas + sim.p_delete {
            OpKind::Delete
        } else {
            OpKind::Write
        };
        let expect: Option<String> =
            if rng.chance(0.6) { registers[&key].clone() } else { rng.pick(&seen_values[&key]).clone() };
        let op = match kind {
            OpKind::Read => Op::read(c, &key, invoke),
            OpKind::Write => Op::write(c, &key, &value, invoke),
            OpKind::Cas => Op::cas(c, &key, expect.as_deref(), &value, invoke),
            OpKind::Delete => Op::delete(c, &key, invoke),
        };
        if rng.chance(sim.p_rejected) {
            ops.push(op.rejected(complete, "no leader"));
            continue;
        }
        let reg = registers.get_mut(&key).expect("known key");
        if kind == OpKind::Read {
            if rng.chance(sim.p_read_unknown) {
                ops.push(op.unknown());
            } else {
                let seen = reg.clone();
                ops.push(op.read_ok(complete, seen.as_deref()));
            }
            continue;
        }
        let new_value = match kind {
            OpKind::Delete => None,
            _ => Some(value.clone()),
        };
        let cas_expect = (kind == OpKind::Cas).then(|| expect.clone());
        if rng.chance(sim.p_unknown) {
            // Unknown: now, later, or never.
            match rng.below(3) {
                0 if cas_expect.as_ref().is_none_or(|e| e == reg) => {
                    *reg = new_value.clone();
                    seen_values.get_mut(&key).expect("known key").push(new_value);
                }
                1 => delayed.push(Delayed {
                    at: clock + 1 + rng.below(sim.window * 10 + 1),
                    key: key.clone(),
                    value: new_value,
                    expect: cas_expect,
                }),
                _ => {}
            }
            ops.push(op.unknown());
            continue;
        }
        match cas_expect {
            Some(e) if e != *reg => ops.push(op.fail(complete)),
            _ => {
                *reg = new_value.clone();
                seen_values.get_mut(&key).expect("known key").push(new_value);
                ops.push(op.ok(complete));
            }
        }
    }
    delayed.sort_by_key(|d| d.at);
    for d in delayed {
        let reg = registers.get_mut(&d.key).expect("known key");
        if d.expect.is_none_or(|e| e == *reg) {
            *reg = d.value;
        }
    }
    (History { initial, ops }, registers)
}

// ---- brute-force oracle --------------------------------------------------------------------------

/// One op as the oracle sees it, written straight from the format's semantics.
#[derive(Debug, Clone)]
struct OracleOp {
    kind: OpKind,
    outcome: Outcome,
    read: Option<String>,
    expect: Option<String>,
    value: Option<String>,
    invoke: u64,
    complete: u64,
}

/// Decides linearizability by trying every order of every subset of the optional ops (exponential:
/// for histories of a handful of ops per key).
pub fn oracle(history: &History, final_state: Option<&KeyValues>) -> bool {
    let mut keys: BTreeSet<&str> = history.ops.iter().map(|o| o.key.as_str()).collect();
    if let Some(f) = final_state {
        keys.extend(f.keys().map(String::as_str));
    }
    keys.into_iter().all(|key| {
        let ops: Vec<OracleOp> = history
            .ops
            .iter()
            .filter(|o| o.key == key)
            // Rejected ops and reads without an ok answer say nothing; failed writes and deletes did nothing.
            .filter(|o| !(o.outcome == Outcome::Fail && o.error.is_some()))
            .filter(|o| !(o.op == OpKind::Read && o.outcome != Outcome::Ok))
            .filter(|o| !(matches!(o.op, OpKind::Write | OpKind::Delete) && o.outcome == Outcome::Fail))
            .map(|o| OracleOp {
                kind: o.op,
                outcome: o.outcome,
                read: o.read.clone().flatten(),
                expect: o.expect.clone().flatten(),
                value: o.value.clone(),
                invoke: o.invoke_us,
                complete: if o.outcome == Outcome::Unknown {
                    u64::MAX
                } else {
                    o.complete_us.unwrap_or(u64::MAX)
                },
            })
            .collect();
        let initial = history.initial.get(key).cloned().flatten();
        let final_value = final_state.and_then(|f| f.get(key)).cloned();
        let mut placed = vec![false; ops.len()];
        explore(&ops, &mut placed, initial, final_value.as_ref())
    })
}

fn explore(
    ops: &[OracleOp],
    placed: &mut [bool],
    state: Option<String>,
    final_value: Option<&Option<String>>,
) -> bool {
    let required_left = (0..ops.len()).any(|i| !placed[i] && ops[i].outcome != Outcome::Unknown);
    if !required_left && final_value.is_none_or(|f| *f == state) {
        return true;
    }
    for i in 0..ops.len() {
        if placed[i] {
            continue;
        }
        let op = &ops[i];
        // Real time: an op cannot go before a required op that completed before it was invoked.
        let blocked = (0..ops.len()).any(|j| {
            j != i && !placed[j] && ops[j].outcome != Outcome::Unknown && ops[j].complete < op.invoke
        });
        if blocked {
            continue;
        }
        let next = match (op.kind, op.outcome) {
            (OpKind::Read, _) => (op.read == state).then(|| state.clone()),
            (OpKind::Write, _) => Some(op.value.clone()),
            (OpKind::Delete, _) => Some(None),
            (OpKind::Cas, Outcome::Ok) => (op.expect == state).then(|| op.value.clone()),
            (OpKind::Cas, Outcome::Fail) => (op.expect != state).then(|| state.clone()),
            // An unknown cas that took effect either applied or found another value.
            (OpKind::Cas, Outcome::Unknown) => {
                Some(if op.expect == state { op.value.clone() } else { state.clone() })
            }
        };
        if let Some(next) = next {
            placed[i] = true;
            let ok = explore(ops, placed, next, final_value);
            placed[i] = false;
            if ok {
                return true;
            }
        }
    }
    false
}
