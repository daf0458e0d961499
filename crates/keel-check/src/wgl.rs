//! The Wing–Gong–Lowe search for one key: find an order of the key's ops that respects real time
//! and the register's semantics, backtracking over choices, with a memo of the (set of ops placed,
//! register value) pairs already explored so that no such pair is explored twice.
//!
//! The required ops (ok, failed cas) are a list of call and return events by time. Scanning from
//! its head, every call before the first return is an op that may go next; placing one removes its
//! events, and a return reached means the op it belongs to should have been placed by now. Ops of
//! unknown outcome have no return: they sit in a second list, by invoke time, and may be placed
//! anywhere after their invoke, or never. At each point the search tries the required ops that may
//! go next, then the optional ones invoked by then; when nothing fits, it undoes the last placement
//! and goes on with the candidates after it. It succeeds once every required op is placed.
//!
//! What keeps realistic histories fast, each only skipping branches that cannot succeed:
//! - An optional op is only placed right before an op it enables: one that does not fit the
//!   register as it was before the optional op (and is only tried where some op that may go next
//!   wants the value it leaves). If some order works, one of that shape does: an
//!   optional op followed by an op that also fit before it can be moved after that op (the op
//!   leaves the register alone: a read, a failed cas) or dropped (the op overwrites it, or the
//!   optional op rewrote the value already there), and an op of unknown outcome never holds
//!   another op back in real time.
//! - Required ops are tried before optional ones at each point, and a configuration that only
//!   adds optional ops to one already explored without success (same required ops, same value,
//!   same constraint on the next op) is not explored: whatever works with the extra optional ops
//!   placed works without them.
//! - A value written at most once that a pending required op still needs to read can never come
//!   back once replaced, so a step that replaces it is not taken.
//! - Optional blind ops of one class (unknown writes of unobserved values; unknown deletes) are
//!   interchangeable when both may go next: only the first of them is tried at each point.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

use crate::model::{Entry, KeyModel, State, Step};

/// Event ids are `u32`; this marks "no event" in the linked list.
const NIL: u32 = u32::MAX;

/// "No constraint on the next op" (no register state is `u32::MAX`).
const FREE: State = State::MAX;

/// How a search ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Linearizable,
    /// No order exists. `best` is the longest sequence of entries the search managed to place.
    NotLinearizable {
        best: Vec<u32>,
    },
    /// Gave up before deciding.
    GaveUp {
        limit: Limit,
        best: Vec<u32>,
    },
}

/// Which bound stopped a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Deadline,
    Memory,
}

/// Bounds on one search.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) deadline: Instant,
    /// Bytes the memo may hold before the search gives up.
    pub(crate) max_memo_bytes: usize,
}

/// Counters of one search, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Distinct (placed set, value) pairs explored.
    pub(crate) states: usize,
}

/// A placement on the search stack, with what is needed to undo it.
#[derive(Debug, Clone, Copy)]
struct Frame {
    entry: u32,
    prev_state: State,
    /// The constraint on this placement (see `search`), restored on undo.
    after: State,
    /// The scan's horizon when this op was placed, restored on undo.
    horizon: u64,
    /// The memo entry of the configuration this placement reached: explored without success once
    /// this frame is undone.
    memo: u32,
    /// The classes already tried at this point of the scan, restored on undo.
    tried: u8,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    time: u64,
    is_return: bool,
    entry: u32,
}

/// The doubly linked list of events still to place, threaded through two arrays; node `head` is the
/// sentinel before the first event. Removed nodes keep their links, so undoing removals in reverse
/// order restores the list exactly.
struct EventList {
    next: Vec<u32>,
    prev: Vec<u32>,
    head: u32,
}

impl EventList {
    fn new(len: usize) -> EventList {
        let head = len as u32;
        let mut next = vec![NIL; len + 1];
        let mut prev = vec![NIL; len + 1];
        let mut last = head;
        for i in 0..len as u32 {
            next[last as usize] = i;
            prev[i as usize] = last;
            last = i;
        }
        EventList { next, prev, head }
    }

    fn first(&self) -> u32 {
        self.next[self.head as usize]
    }

    fn after(&self, node: u32) -> u32 {
        self.next[node as usize]
    }

    fn remove(&mut self, node: u32) {
        let (p, n) = (self.prev[node as usize], self.next[node as usize]);
        self.next[p as usize] = n;
        if n != NIL {
            self.prev[n as usize] = p;
        }
    }

    fn restore(&mut self, node: u32) {
        let (p, n) = (self.prev[node as usize], self.next[node as usize]);
        self.next[p as usize] = node;
        if n != NIL {
            self.prev[n as usize] = node;
        }
    }
}

/// The memo: sets of placed entries (bitsets, stored end to end in one arena) with the register
/// value, found through a 64-bit hash of the *required* entries placed and the value (kept up to
/// date incrementally: each entry has a random 64-bit tag, the hash of a set is the xor of its
/// tags). Sets are compared in full, so a hash collision costs time, never a wrong answer.
struct Memo {
    words: usize,
    /// Which entries are required, as a bitset.
    required: Vec<u64>,
    by_hash: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
    bits: Vec<u64>,
    states: Vec<State>,
    /// The constraint on the next op in that configuration: `FREE`, or the register value an
    /// optional op just replaced (the next op must not fit it).
    after: Vec<State>,
    /// Explored without success.
    done: Vec<bool>,
    /// Next memo entry with the same hash, or `NIL`.
    chain: Vec<u32>,
}

impl Memo {
    fn new(required: Vec<u64>) -> Memo {
        Memo {
            words: required.len(),
            required,
            by_hash: HashMap::default(),
            bits: Vec::new(),
            states: Vec::new(),
            after: Vec::new(),
            done: Vec::new(),
            chain: Vec::new(),
        }
    }

    /// Records the configuration `(set, state, after)` and returns its id, or `None` if it need
    /// not be explored: it is already recorded, or a configuration explored without success had
    /// at least its freedom (the same required entries and value, a subset of its optional
    /// entries placed, and no constraint or the same one on the next op). A recorded configuration
    /// still being explored is an ancestor on the search stack, with fewer entries placed: it never
    /// equals a new one.
    fn visit(&mut self, hash: u64, set: &[u64], state: State, after: State) -> Option<u32> {
        let head = self.by_hash.get(&hash).copied().unwrap_or(NIL);
        let mut at = head;
        while at != NIL {
            let i = at as usize;
            if self.states[i] == state {
                let old = &self.bits[i * self.words..(i + 1) * self.words];
                let mut same_required = true;
                let mut old_within_new = true;
                let mut equal = true;
                for ((&o, &n), &r) in old.iter().zip(set).zip(&self.required) {
                    same_required &= (o ^ n) & r == 0;
                    old_within_new &= o & !n == 0;
                    equal &= o == n;
                }
                let looser = self.after[i] == FREE || self.after[i] == after;
                if (equal && self.after[i] == after)
                    || (same_required && old_within_new && looser && self.done[i])
                {
                    return None;
                }
            }
            at = self.chain[i];
        }
        let id = self.states.len() as u32;
        self.bits.extend_from_slice(set);
        self.states.push(state);
        self.after.push(after);
        self.done.push(false);
        self.chain.push(head);
        self.by_hash.insert(hash, id);
        Some(id)
    }

    fn finished(&mut self, id: u32) {
        self.done[id as usize] = true;
    }

    fn len(&self) -> usize {
        self.states.len()
    }

    fn bytes(&self) -> usize {
        self.bits.len() * 8 + self.states.len() * 13 + self.by_hash.len() * 16
    }
}

/// The memo's keys are already uniformly random hashes: use them as they are.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; this keeps other callers correct, if slow.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// splitmix64: the entries' random tags, fixed so that runs are reproducible.
pub(crate) fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How many loop turns between looks at the clock.
const CLOCK_EVERY: u64 = 256;

/// Searches for a linearization of `model`'s entries.
pub(crate) fn search(model: &KeyModel, limits: &Limits) -> (Outcome, Stats) {
    let entries = &model.entries;
    let mut remaining = entries.iter().filter(|e| e.required).count();
    if remaining == 0 {
        return (Outcome::Linearizable, Stats::default());
    }

    // Required ops: their call and return events by time, in one list.
    let mut events = Vec::with_capacity(remaining * 2);
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.required) {
        events.push(Event { time: e.invoke, is_return: false, entry: i as u32 });
        events.push(Event { time: e.complete, is_return: true, entry: i as u32 });
    }
    // Calls before returns at equal times: ops whose times touch count as concurrent.
    events.sort_unstable_by_key(|e| (e.time, e.is_return, e.entry));
    let mut call_of = vec![NIL; entries.len()];
    let mut return_of = vec![NIL; entries.len()];
    for (at, e) in events.iter().enumerate() {
        let slot = if e.is_return { &mut return_of } else { &mut call_of };
        slot[e.entry as usize] = at as u32;
    }
    // Optional ops have no return: they sit in a list of their own, by invoke time, so that
    // scanning for required ops does not walk over every optional op still pending.
    let mut optional: Vec<u32> =
        (0..entries.len() as u32).filter(|&i| !entries[i as usize].required).collect();
    optional.sort_unstable_by_key(|&i| (entries[i as usize].invoke, i));
    let mut node_of = vec![NIL; entries.len()];
    for (node, &entry) in optional.iter().enumerate() {
        node_of[entry as usize] = node as u32;
    }
    let tags: Vec<u64> = (0..entries.len() as u64).map(splitmix64).collect();

    let words = entries.len().div_ceil(64);
    let mut required = vec![0u64; words];
    for (i, e) in entries.iter().enumerate() {
        if e.required {
            set_bit(&mut required, i as u32, true);
        }
    }
    let mut lists = Lists {
        entries,
        events: &events,
        optional: &optional,
        required: EventList::new(events.len()),
        pending: EventList::new(optional.len()),
    };
    let mut memo = Memo::new(required);
    let mut placed = vec![0u64; words];
    // The hash of the required entries placed (optional ones do not change it; see `Memo`).
    let mut placed_hash = 0u64;
    let mut state = model.initial;
    let mut needed = model.needed_by.clone();
    let mut stack: Vec<Frame> = Vec::new();
    let mut best = Best::default();

    // The scan: pass 0 walks the required list up to its first return, whose time is the
    // `horizon`; pass 1 walks the optional ops invoked by the horizon. These are the ops that may
    // go next.
    let mut pass = 0u8;
    let mut at = lists.required.first();
    let mut horizon = u64::MAX;
    // After an optional op is placed, the next op must be one it enables: one that does not fit
    // `after`, the register before the optional op. `FREE` otherwise.
    let mut after = FREE;
    // In pass 1: the values some op that may go next needs and the register does not hold.
    let mut demand = Demand::default();
    let mut tried = 0u8;
    let mut turns = 0u64;
    loop {
        if remaining == 0 {
            return (Outcome::Linearizable, Stats { states: memo.len() });
        }
        turns += 1;
        if turns.is_multiple_of(CLOCK_EVERY) {
            let limit = if memo.bytes() > limits.max_memo_bytes {
                Some(Limit::Memory)
            } else if Instant::now() >= limits.deadline {
                Some(Limit::Deadline)
            } else {
                None
            };
            if let Some(limit) = limit {
                return (Outcome::GaveUp { limit, best: best.entries }, Stats { states: memo.len() });
            }
        }

        let candidate = match pass {
            0 => (at != NIL && !events[at as usize].is_return).then(|| events[at as usize].entry),
            _ => lists.pending_at(at, horizon),
        };
        let Some(entry) = candidate else {
            if pass == 0 {
                // Every required op that may go next was tried: now the optional ones.
                horizon = if at == NIL { u64::MAX } else { events[at as usize].time };
                pass = 1;
                demand = lists.demand(horizon, state);
                // Nothing wanted: no optional op can help here.
                at = if demand.is_empty() { NIL } else { lists.pending.first() };
                continue;
            }
            // Nothing fits: undo the last placement and go on with the candidates after it.
            let Some(frame) = stack.pop() else {
                return (Outcome::NotLinearizable { best: best.entries }, Stats { states: memo.len() });
            };
            best.popped(&stack);
            memo.finished(frame.memo);
            let e = &entries[frame.entry as usize];
            if e.required {
                lists.required.restore(return_of[frame.entry as usize]);
                lists.required.restore(call_of[frame.entry as usize]);
                remaining += 1;
                if let Some(v) = e.step.needs() {
                    needed[v as usize] += 1;
                }
                placed_hash ^= tags[frame.entry as usize];
                pass = 0;
                at = lists.required.after(call_of[frame.entry as usize]);
            } else {
                lists.pending.restore(node_of[frame.entry as usize]);
                pass = 1;
                at = lists.pending.after(node_of[frame.entry as usize]);
            }
            set_bit(&mut placed, frame.entry, false);
            state = frame.prev_state;
            after = frame.after;
            horizon = frame.horizon;
            tried = frame.tried | e.class;
            if pass == 1 {
                demand = lists.demand(horizon, state);
            }
            continue;
        };

        let e = &entries[entry as usize];
        let enabled = after == FREE || e.step.apply(after).is_none();
        if e.class & tried == 0 && enabled {
            if let Some(next) = e.step.apply(state) {
                // An optional op is worth placing only if some op that may go next fits after it
                // and not before (see the module's doc). The op itself fits before, so it is not
                // among those.
                let useful = e.required || (next != state && demand.wants(next));
                if useful && !hides(model, &needed, e.step, state, next) {
                    set_bit(&mut placed, entry, true);
                    let hash = if e.required { placed_hash ^ tags[entry as usize] } else { placed_hash };
                    let next_after = if e.required { FREE } else { state };
                    if let Some(id) =
                        memo.visit(hash ^ splitmix64(u64::from(next)), &placed, next, next_after)
                    {
                        stack.push(Frame { entry, prev_state: state, after, horizon, memo: id, tried });
                        best.pushed(&stack);
                        placed_hash = hash;
                        state = next;
                        after = next_after;
                        if e.required {
                            lists.required.remove(call_of[entry as usize]);
                            lists.required.remove(return_of[entry as usize]);
                            remaining -= 1;
                            if let Some(v) = e.step.needs() {
                                needed[v as usize] -= 1;
                            }
                        } else {
                            lists.pending.remove(node_of[entry as usize]);
                        }
                        pass = 0;
                        at = lists.required.first();
                        tried = 0;
                        continue;
                    }
                    set_bit(&mut placed, entry, false);
                }
            }
            tried |= e.class;
        }
        at = if pass == 0 { lists.required.after(at) } else { lists.pending.after(at) };
    }
}

/// What the ops that may go next, in some configuration, need that the register does not hold:
/// an optional op is worth placing there only if its result is wanted.
#[derive(Debug, Default)]
struct Demand {
    values: Vec<State>,
    /// Some op fits any value but the current one (a failed cas).
    any: bool,
}

impl Demand {
    fn wants(&self, value: State) -> bool {
        self.any || self.values.contains(&value)
    }

    fn is_empty(&self) -> bool {
        !self.any && self.values.is_empty()
    }
}

/// The two lists of ops still to place.
struct Lists<'a> {
    entries: &'a [Entry],
    events: &'a [Event],
    /// Optional entries by invoke time: `pending`'s nodes.
    optional: &'a [u32],
    /// Events of the required ops not yet placed.
    required: EventList,
    /// Optional ops not yet placed.
    pending: EventList,
}

impl Lists<'_> {
    /// The optional entry at `node`, if it is invoked by `horizon`.
    fn pending_at(&self, node: u32, horizon: u64) -> Option<u32> {
        let entry = *self.optional.get(node as usize)?;
        (self.entries[entry as usize].invoke <= horizon).then_some(entry)
    }

    /// What the ops that may go next and do not fit `state` would need the register to hold.
    fn demand(&self, horizon: u64, state: State) -> Demand {
        let mut demand = Demand::default();
        let mut note = |e: &Entry| {
            if e.step.apply(state).is_some() {
                return;
            }
            match e.step {
                Step::Read(v) | Step::Cas { expect: v, .. } => demand.values.push(v),
                // It failed to fit because the register holds its `expect`: any other value will do.
                Step::CasFailed { .. } => demand.any = true,
                Step::Write(_) | Step::Delete => {}
            }
        };
        let mut at = self.required.first();
        while at != NIL && !self.events[at as usize].is_return {
            note(&self.entries[self.events[at as usize].entry as usize]);
            at = self.required.after(at);
        }
        let mut at = self.pending.first();
        while let Some(other) = self.pending_at(at, horizon) {
            note(&self.entries[other as usize]);
            at = self.pending.after(at);
        }
        demand
    }
}

/// True if going from `from` to `to` replaces a value that can never come back while a required
/// op other than this one still has to read it.
fn hides(model: &KeyModel, needed: &[u32], step: Step, from: State, to: State) -> bool {
    if from == to || !model.unique[from as usize] {
        return false;
    }
    let own = u32::from(step.needs() == Some(from));
    needed[from as usize] > own
}

/// Whether `hides` would refuse this step; used to explain why an op could not go next.
pub(crate) fn would_hide(model: &KeyModel, placed: &[bool], step: Step, from: State) -> bool {
    let Some(to) = step.apply(from) else { return false };
    if from == to || !model.unique[from as usize] {
        return false;
    }
    let pending = model
        .entries
        .iter()
        .zip(placed)
        .filter(|(e, &p)| !p && e.required && e.step.needs() == Some(from))
        .count();
    pending > usize::from(step.needs() == Some(from))
}

fn set_bit(bits: &mut [u64], i: u32, on: bool) {
    let (word, bit) = ((i / 64) as usize, i % 64);
    if on {
        bits[word] |= 1 << bit;
    } else {
        bits[word] &= !(1 << bit);
    }
}

/// The longest stack seen. Kept without copying the whole stack at every step: `common` entries
/// of `entries` are known to equal the bottom of the current stack.
#[derive(Default)]
struct Best {
    entries: Vec<u32>,
    common: usize,
}

impl Best {
    fn pushed(&mut self, stack: &[Frame]) {
        if stack.len() > self.entries.len() {
            self.entries.truncate(self.common);
            self.entries.extend(stack[self.common..].iter().map(|f| f.entry));
            self.common = stack.len();
        }
    }

    fn popped(&mut self, stack: &[Frame]) {
        self.common = self.common.min(stack.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_list_restores_in_reverse_order() {
        let mut list = EventList::new(4);
        list.remove(1);
        list.remove(2);
        list.remove(0);
        assert_eq!(list.first(), 3);
        list.restore(0);
        list.restore(2);
        list.restore(1);
        let mut order = Vec::new();
        let mut at = list.first();
        while at != NIL {
            order.push(at);
            at = list.after(at);
        }
        assert_eq!(order, vec![0, 1, 2, 3]);
    }

    #[test]
    fn memo_compares_in_full_on_equal_hashes() {
        let mut memo = Memo::new(vec![0b11]);
        assert_eq!(memo.visit(7, &[0b01], 3, FREE), Some(0));
        assert_eq!(memo.visit(7, &[0b01], 3, FREE), None);
        assert_eq!(memo.visit(7, &[0b10], 3, FREE), Some(1), "same hash, different set");
        assert_eq!(memo.visit(7, &[0b01], 4, FREE), Some(2), "same hash and set, different value");
        assert_eq!(memo.visit(7, &[0b01], 3, 5), Some(3), "same configuration, constrained");
        assert_eq!(memo.len(), 4);
    }

    #[test]
    fn memo_skips_extra_optional_ops_only_after_failure() {
        // Entry 0 required, entries 1 and 2 optional.
        let mut memo = Memo::new(vec![0b001]);
        let id = memo.visit(7, &[0b011], 3, FREE).expect("new");
        // Adding optional entry 2 to a configuration still being explored: explore it.
        assert!(memo.visit(7, &[0b111], 3, FREE).is_some());
        memo.finished(id);
        let mut memo2 = Memo::new(vec![0b001]);
        let id = memo2.visit(7, &[0b011], 3, FREE).expect("new");
        memo2.finished(id);
        assert_eq!(memo2.visit(7, &[0b111], 3, FREE), None, "dominated by a failed configuration");
        assert_eq!(memo2.visit(7, &[0b111], 3, 5), None, "dominated: the failed one was unconstrained");
        assert!(memo2.visit(7, &[0b101], 3, FREE).is_some(), "lacks optional entry 1: not dominated");
        assert!(memo2.visit(7, &[0b110], 3, FREE).is_some(), "different required entries");
        let id = memo2.visit(9, &[0b001], 4, 5).expect("new");
        memo2.finished(id);
        assert!(memo2.visit(9, &[0b011], 4, FREE).is_some(), "the failed one was constrained");
        assert!(memo2.visit(9, &[0b011], 4, 6).is_some(), "the failed one was constrained differently");
        assert_eq!(memo2.visit(9, &[0b011], 4, 5), None);
    }
}
