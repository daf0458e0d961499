//! Seeded random lock histories from a simulated lease and lock service: histories of the correct
//! service never break a rule; the same service with leases that expire a TTL after their grant
//! however they are kept alive (the planted bug keeld can run with) is caught in every seed; and
//! two mutations of correct histories — a lease acknowledged as renewed but expired anyway (an
//! acknowledged keep-alive inserted before another holder's acquisition), a token given twice —
//! are each caught with the right rule. Every failure names its seed.
//!
//! The simulation is event-driven on one clock: requests take 1–15 ms each way, some answers are
//! lost (the request applied or not), and fault windows take the service down until a new leader,
//! which gives every lease its full TTL plus an election timeout (etcd's rule). Lock clients
//! follow etcd's client-side mutex recipe; lease clients put a key with a lease, keep it alive for
//! a while, stop, and read the key until it is gone.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::Rng;
use keel_check::lock::{
    check_lock, Abandon, Acquire, Attach, Bounds, FaultRecord, Fenced, Finding, Grant, Keepalive,
    KeepaliveOutcome, LockHistory, LockRecord, LockReport, LockVerdict, Probe, Release, Revoke, Rule, Stop,
};
use keel_check::Outcome;

const MS: u64 = 1000;
const SEC: u64 = 1_000_000;
const TIMEOUT: u64 = 500 * MS;
const ELECTION_TIMEOUT_MS: u64 = 1000;
const BOUNDS: Bounds = Bounds { election_timeout_ms: ELECTION_TIMEOUT_MS, recovery_ms: 5000, grace_ms: 2000 };

#[derive(Debug, Clone)]
struct SimSpec {
    lock_clients: usize,
    lease_clients: usize,
    locks: usize,
    /// Simulated seconds during which clients start new rounds.
    seconds: u64,
    /// Answers lost (the request applied or not).
    p_lost: f64,
    faults: bool,
    /// The planted bug: a keep-alive is acknowledged but does not renew.
    early_expiry: bool,
}

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            lock_clients: 4,
            lease_clients: 2,
            locks: 2,
            seconds: 40,
            p_lost: 0.03,
            faults: true,
            early_expiry: false,
        }
    }
}

#[derive(Debug, Clone)]
enum Req {
    Grant {
        ttl: i64,
    },
    Keepalive {
        lease: i64,
    },
    Create {
        key: String,
        lease: i64,
    },
    /// Is my key there, and is any key of the lock with a smaller create revision?
    Check {
        lock: String,
        key: String,
        mine: i64,
    },
    Fenced {
        key: String,
        token: i64,
        resource: String,
    },
    Release {
        key: String,
    },
    Revoke {
        lease: i64,
    },
    Attach {
        key: String,
        lease: i64,
    },
    Probe {
        key: String,
    },
}

#[derive(Debug, Clone)]
enum Rep {
    Granted { lease: i64, ttl: i64 },
    Ttl(i64),
    Created(Option<i64>),
    Checked { mine: bool, smaller: bool },
    Written(Option<i64>),
    Done,
    Present(bool),
}

/// Who sends: a client's main agent, or its keep-alive agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Agent {
    client: usize,
    keepalive: bool,
}

#[derive(Debug)]
enum Ev {
    Arrive { agent: Agent, op: u64, req: Req, reply: bool },
    Reply { agent: Agent, op: u64, rep: Rep },
    GiveUp { agent: Agent, op: u64 },
    Wake { agent: Agent, epoch: u64 },
    Expire { lease: i64, expiry: u64 },
    Fault,
    Heal,
    Leader,
}

struct LeaseState {
    ttl_us: u64,
    expiry: u64,
    keys: Vec<String>,
}

#[derive(Default)]
struct Server {
    rev: i64,
    next_lease: i64,
    /// key -> (create revision, lease)
    keys: BTreeMap<String, (i64, i64)>,
    leases: HashMap<i64, LeaseState>,
    /// No leader: requests are dropped and nothing expires.
    down: bool,
}

/// What a client's main agent is doing.
#[derive(Debug, Clone)]
enum Step {
    Idle,
    Granting,
    Creating { lease: i64, lock: String, key: String, first_sent: u64 },
    Checking { lease: i64, lock: String, key: String, mine: i64, first_sent: u64 },
    Holding { lease: i64, lock: String, key: String, token: i64, writes_left: u32 },
    Releasing { lease: i64, lock: String, token: i64 },
    Revoking { lease: i64 },
    Attaching { lease: i64, key: String },
    Kept { lease: i64, key: String },
    Probing { lease: i64, key: String, until: u64 },
}

struct Client {
    lock_client: bool,
    step: Step,
    /// The op in flight per agent, and when it was sent.
    in_flight: HashMap<bool, (u64, u64, Req)>,
    /// The lease its keep-alive agent renews (`None`: stopped).
    kept: Option<(i64, u64)>,
    /// Epochs per agent: a wake-up of an older epoch is stale.
    epoch: HashMap<bool, u64>,
    /// The earliest the client's lease may expire, by what it knows.
    floor: u64,
    rounds: u64,
}

struct World<'r> {
    spec: SimSpec,
    rng: &'r mut Rng,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    server: Server,
    clients: Vec<Client>,
    records: Vec<LockRecord>,
    next_op: u64,
    writes: u64,
}

impl World<'_> {
    fn at(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((time, self.seq), ev);
    }

    fn latency(&mut self) -> u64 {
        (1 + self.rng.below(15)) * MS
    }

    fn send(&mut self, agent: Agent, req: Req) {
        self.next_op += 1;
        let op = self.next_op;
        let c = &mut self.clients[agent.client];
        c.in_flight.insert(agent.keepalive, (op, self.now, req.clone()));
        let lost = self.rng.chance(self.spec.p_lost);
        let arrives = !lost || self.rng.chance(0.5);
        if arrives {
            let t = self.now + self.latency();
            self.at(t, Ev::Arrive { agent, op, req, reply: !lost });
        }
        self.at(self.now + TIMEOUT, Ev::GiveUp { agent, op });
    }

    fn wake(&mut self, agent: Agent, after: u64) {
        let e = self.clients[agent.client].epoch.entry(agent.keepalive).or_insert(0);
        *e += 1;
        let epoch = *e;
        self.at(self.now + after, Ev::Wake { agent, epoch });
    }

    /// The lease's clock starts again now (a grant, or a keep-alive: not with the bug planted).
    fn renew(&mut self, lease: i64) {
        let Some(l) = self.server.leases.get_mut(&lease) else { return };
        l.expiry = self.now + l.ttl_us;
        let expiry = l.expiry;
        // The leader's expiry sweep runs now and then.
        let sweep = self.rng.below(500) * MS;
        self.at(expiry + sweep, Ev::Expire { lease, expiry });
    }

    fn delete_lease(&mut self, lease: i64) {
        if let Some(l) = self.server.leases.remove(&lease) {
            let mut any = false;
            for k in l.keys {
                any |= self.server.keys.remove(&k).is_some();
            }
            if any {
                self.server.rev += 1;
            }
        }
    }

    fn serve(&mut self, req: &Req) -> Rep {
        let s = &mut self.server;
        match req {
            Req::Grant { ttl } => {
                s.next_lease += 1;
                let lease = 0x1000 + s.next_lease;
                s.leases.insert(lease, LeaseState { ttl_us: *ttl as u64 * SEC, expiry: 0, keys: vec![] });
                self.renew(lease);
                Rep::Granted { lease, ttl: *ttl }
            }
            Req::Keepalive { lease } => match s.leases.get(lease) {
                Some(l) => {
                    let ttl = (l.ttl_us / SEC) as i64;
                    if !self.spec.early_expiry {
                        self.renew(*lease);
                    }
                    Rep::Ttl(ttl)
                }
                None => Rep::Ttl(0),
            },
            Req::Create { key, lease } => {
                if let Some(&(create, _)) = s.keys.get(key) {
                    return Rep::Created(Some(create));
                }
                let Some(l) = s.leases.get_mut(lease) else { return Rep::Created(None) };
                s.rev += 1;
                l.keys.push(key.clone());
                s.keys.insert(key.clone(), (s.rev, *lease));
                Rep::Created(Some(s.rev))
            }
            Req::Check { lock, key, mine } => {
                let prefix = format!("{lock}/");
                let mine_there = s.keys.get(key).is_some_and(|&(c, _)| c == *mine);
                let smaller = s.keys.iter().any(|(k, &(c, _))| k.starts_with(&prefix) && c < *mine);
                Rep::Checked { mine: mine_there, smaller }
            }
            Req::Fenced { key, token, .. } => match s.keys.get(key) {
                Some(&(c, _)) if c == *token => {
                    s.rev += 1;
                    Rep::Written(Some(s.rev))
                }
                _ => Rep::Written(None),
            },
            Req::Release { key } => match s.keys.remove(key) {
                Some(_) => {
                    s.rev += 1;
                    Rep::Written(Some(s.rev))
                }
                None => Rep::Written(None),
            },
            Req::Revoke { lease } => {
                self.delete_lease(*lease);
                Rep::Done
            }
            Req::Attach { key, lease } => {
                let Some(l) = s.leases.get_mut(lease) else { return Rep::Written(None) };
                s.rev += 1;
                l.keys.push(key.clone());
                s.keys.insert(key.clone(), (s.rev, *lease));
                Rep::Written(Some(s.rev))
            }
            Req::Probe { key } => Rep::Present(s.keys.contains_key(key)),
        }
    }

    fn run(mut self) -> LockHistory {
        self.records.push(LockRecord::Bounds(BOUNDS));
        for c in 0..self.clients.len() {
            let t = self.rng.below(200) * MS;
            self.at(t, Ev::Wake { agent: Agent { client: c, keepalive: false }, epoch: 0 });
        }
        if self.spec.faults {
            let mut t = 2 * SEC;
            while t < self.spec.seconds * SEC {
                t += (3 + self.rng.below(6)) * SEC;
                self.at(t, Ev::Fault);
                t += (500 + self.rng.below(2500)) * MS;
                self.at(t, Ev::Heal);
            }
        }
        while let Some(((time, _), ev)) = self.queue.pop_first() {
            self.now = time;
            self.step(ev);
        }
        LockHistory { records: self.records }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Fault => {
                self.server.down = true;
                self.records.push(LockRecord::Fault(FaultRecord { at_us: self.now, what: "down".into() }));
            }
            Ev::Heal => {
                self.records.push(LockRecord::Heal(FaultRecord { at_us: self.now, what: "up".into() }));
                let t = self.now + (100 + self.rng.below(1900)) * MS;
                self.at(t, Ev::Leader);
            }
            Ev::Leader => {
                // A new leader: every lease gets its full TTL plus an election timeout.
                self.server.down = false;
                let leases: Vec<i64> = self.server.leases.keys().copied().collect();
                for lease in leases {
                    let l = self.server.leases.get_mut(&lease).expect("listed just above");
                    l.expiry = self.now + l.ttl_us + ELECTION_TIMEOUT_MS * MS;
                    let expiry = l.expiry;
                    self.at(expiry, Ev::Expire { lease, expiry });
                }
            }
            Ev::Expire { lease, expiry } => {
                let current = self.server.leases.get(&lease).map(|l| l.expiry);
                if !self.server.down && current == Some(expiry) {
                    self.delete_lease(lease);
                }
            }
            Ev::Arrive { agent, op, req, reply } => {
                if self.server.down {
                    return;
                }
                let rep = self.serve(&req);
                if reply {
                    let t = self.now + self.latency();
                    self.at(t, Ev::Reply { agent, op, rep });
                }
            }
            Ev::Reply { agent, op, rep } => {
                let c = &mut self.clients[agent.client];
                match c.in_flight.get(&agent.keepalive) {
                    Some(&(o, sent, _)) if o == op => {
                        let (_, _, req) = c.in_flight.remove(&agent.keepalive).expect("just seen");
                        self.answered(agent, sent, req, Some(rep));
                    }
                    _ => {}
                }
            }
            Ev::GiveUp { agent, op } => {
                let c = &mut self.clients[agent.client];
                match c.in_flight.get(&agent.keepalive) {
                    Some(&(o, sent, _)) if o == op => {
                        let (_, _, req) = c.in_flight.remove(&agent.keepalive).expect("just seen");
                        self.answered(agent, sent, req, None);
                    }
                    _ => {}
                }
            }
            Ev::Wake { agent, epoch } => {
                if self.clients[agent.client].epoch.get(&agent.keepalive).copied().unwrap_or(0) == epoch {
                    self.woken(agent);
                }
            }
        }
    }

    /// Starts (or restarts) a client's keep-alive agent on `lease`, every `ttl / 3`.
    fn keep_alive(&mut self, client: usize, lease: i64, ttl: i64) {
        self.clients[client].kept = Some((lease, ttl as u64 * SEC / 3));
        self.wake(Agent { client, keepalive: true }, ttl as u64 * SEC / 3);
    }

    fn stop_keep_alive(&mut self, client: usize) {
        if let Some((lease, _)) = self.clients[client].kept.take() {
            let c = &mut self.clients[client];
            *c.epoch.entry(true).or_insert(0) += 1;
            c.in_flight.remove(&true);
            self.records.push(LockRecord::Stop(Stop { client: client as u64, lease, at_us: self.now }));
        }
    }

    /// Stops keeping `lease` alive and revokes it.
    fn revoke(&mut self, client: usize, lease: i64) {
        self.stop_keep_alive(client);
        self.clients[client].step = Step::Revoking { lease };
        self.send(Agent { client, keepalive: false }, Req::Revoke { lease });
    }

    fn woken(&mut self, agent: Agent) {
        let client = agent.client;
        if agent.keepalive {
            if let Some((lease, _)) = self.clients[client].kept {
                self.send(agent, Req::Keepalive { lease });
            }
            return;
        }
        let main = Agent { client, keepalive: false };
        let step = self.clients[client].step.clone();
        match step {
            Step::Idle => {
                if self.now >= self.spec.seconds * SEC {
                    return;
                }
                self.clients[client].rounds += 1;
                self.clients[client].step = Step::Granting;
                let ttl = 2 + self.rng.below(3) as i64;
                self.send(main, Req::Grant { ttl });
            }
            Step::Checking { lock, key, mine, .. } => self.send(main, Req::Check { lock, key, mine }),
            Step::Holding { lease, lock, key, token, writes_left } => {
                let abandon = |reason: &str| {
                    LockRecord::Abandon(Abandon {
                        client: client as u64,
                        lock: lock.clone(),
                        token,
                        at_us: self.now,
                        reason: reason.into(),
                    })
                };
                if self.now + 100 * MS >= self.clients[client].floor {
                    // A careful holder stops acting once its lease may have expired.
                    self.records.push(abandon("lease may have expired"));
                    self.stop_keep_alive(client);
                    self.clients[client].step = Step::Idle;
                    self.wake(main, 10 * MS);
                } else if writes_left > 0 {
                    self.writes += 1;
                    let resource = format!("res-{lock}");
                    self.send(main, Req::Fenced { key, token, resource });
                } else if self.rng.chance(0.2) {
                    // Walk away: stop keeping the lease alive; it expires with the key.
                    self.records.push(abandon("walked away"));
                    self.stop_keep_alive(client);
                    self.clients[client].step = Step::Idle;
                    self.wake(main, 10 * MS);
                } else {
                    self.clients[client].step = Step::Releasing { lease, lock, token };
                    self.send(main, Req::Release { key });
                }
            }
            Step::Kept { lease, key } => {
                self.stop_keep_alive(client);
                let until = self.now + 20 * SEC;
                self.clients[client].step = Step::Probing { lease, key: key.clone(), until };
                self.send(main, Req::Probe { key });
            }
            Step::Probing { key, until, .. } => {
                if self.now > until {
                    self.clients[client].step = Step::Idle;
                    self.wake(main, 10 * MS);
                } else {
                    self.send(main, Req::Probe { key });
                }
            }
            _ => {}
        }
    }

    fn answered(&mut self, agent: Agent, sent: u64, req: Req, rep: Option<Rep>) {
        let client = agent.client;
        let id = client as u64;
        let now = self.now;
        let main = Agent { client, keepalive: false };
        if agent.keepalive {
            let Req::Keepalive { lease } = req else {
                unreachable!("the keep-alive agent sends keep-alives")
            };
            let Some((kept, period)) = self.clients[client].kept else { return };
            let (outcome, ttl) = match rep {
                Some(Rep::Ttl(t)) if t > 0 => (KeepaliveOutcome::Ok, Some(t)),
                Some(_) => (KeepaliveOutcome::Gone, None),
                None => (KeepaliveOutcome::Unknown, None),
            };
            self.records.push(LockRecord::Keepalive(Keepalive {
                client: id,
                lease,
                sent_us: sent,
                at_us: now,
                outcome,
                ttl,
            }));
            if let Some(t) = ttl {
                let c = &mut self.clients[client];
                c.floor = c.floor.max(sent + t as u64 * SEC);
            }
            if outcome == KeepaliveOutcome::Gone {
                self.clients[client].kept = None;
                return;
            }
            if kept == lease {
                let next = period.saturating_sub(now - sent);
                self.wake(agent, next.max(MS));
            }
            return;
        }
        let step = self.clients[client].step.clone();
        match (step, req, rep) {
            (Step::Granting, _, None) => self.wake(main, 10 * MS),
            (Step::Granting, Req::Grant { .. }, Some(Rep::Granted { lease, ttl })) => {
                self.records.push(LockRecord::Grant(Grant {
                    client: id,
                    lease,
                    ttl,
                    sent_us: sent,
                    at_us: now,
                }));
                self.clients[client].floor = sent + ttl as u64 * SEC;
                self.keep_alive(client, lease, ttl);
                let n = self.clients[client].rounds;
                if self.clients[client].lock_client {
                    let lock = format!("lock{}", self.rng.below(self.spec.locks as u64));
                    let key = format!("{lock}/{lease:x}");
                    self.clients[client].step =
                        Step::Creating { lease, lock, key: key.clone(), first_sent: now };
                    self.send(main, Req::Create { key, lease });
                } else {
                    let key = format!("lease/{client}-{n}");
                    self.clients[client].step = Step::Attaching { lease, key: key.clone() };
                    self.send(main, Req::Attach { key, lease });
                }
            }
            // Unknown: retry (the create is idempotent).
            (Step::Creating { .. }, req, None) => self.send(main, req),
            (Step::Creating { lease, lock, key, first_sent }, _, Some(Rep::Created(Some(mine)))) => {
                self.clients[client].step =
                    Step::Checking { lease, lock: lock.clone(), key: key.clone(), mine, first_sent };
                self.send(main, Req::Check { lock, key, mine });
            }
            (
                Step::Creating { lease, .. } | Step::Checking { lease, .. },
                _,
                Some(Rep::Created(None) | Rep::Checked { mine: false, .. }),
            ) => {
                // The lease is gone: give it up and start over.
                self.revoke(client, lease);
            }
            (Step::Checking { .. }, req, None) => self.send(main, req),
            (
                Step::Checking { lease, lock, key, mine, first_sent },
                _,
                Some(Rep::Checked { smaller, .. }),
            ) => {
                if smaller {
                    self.wake(main, 100 * MS);
                    return;
                }
                self.records.push(LockRecord::Acquire(Acquire {
                    client: id,
                    lock: lock.clone(),
                    lease,
                    key: key.clone(),
                    token: mine,
                    sent_us: first_sent,
                    at_us: now,
                }));
                let writes_left = 1 + self.rng.below(25) as u32;
                self.clients[client].step = Step::Holding { lease, lock, key, token: mine, writes_left };
                self.wake(main, 0);
            }
            (Step::Holding { lease, lock, key, token, writes_left }, Req::Fenced { resource, .. }, rep) => {
                let (outcome, revision) = match rep {
                    Some(Rep::Written(Some(r))) => (Outcome::Ok, Some(r)),
                    Some(_) => (Outcome::Fail, None),
                    None => (Outcome::Unknown, None),
                };
                self.records.push(LockRecord::Fenced(Fenced {
                    client: id,
                    lock: lock.clone(),
                    token,
                    resource,
                    value: format!("c{client}-{}", self.writes),
                    sent_us: sent,
                    at_us: now,
                    outcome,
                    revision,
                }));
                let writes_left = if outcome == Outcome::Fail { 0 } else { writes_left - 1 };
                self.clients[client].step = Step::Holding { lease, lock, key, token, writes_left };
                self.wake(main, 100 * MS);
            }
            (Step::Releasing { lease, lock, token }, Req::Release { .. }, rep) => {
                let (outcome, revision) = match rep {
                    Some(Rep::Written(Some(r))) => (Outcome::Ok, Some(r)),
                    Some(_) => (Outcome::Fail, None),
                    None => (Outcome::Unknown, None),
                };
                self.records.push(LockRecord::Release(Release {
                    client: id,
                    lock,
                    token,
                    sent_us: sent,
                    at_us: now,
                    outcome,
                    revision,
                }));
                self.revoke(client, lease);
            }
            (Step::Revoking { lease }, _, rep) => {
                let outcome = if rep.is_some() { Outcome::Ok } else { Outcome::Unknown };
                self.records.push(LockRecord::Revoke(Revoke {
                    client: id,
                    lease,
                    sent_us: sent,
                    at_us: now,
                    outcome,
                }));
                self.clients[client].step = Step::Idle;
                self.wake(main, 10 * MS);
            }
            (Step::Attaching { lease, key }, _, rep) => match rep {
                Some(Rep::Written(Some(revision))) => {
                    self.records.push(LockRecord::Attach(Attach {
                        client: id,
                        lease,
                        key: key.clone(),
                        sent_us: sent,
                        at_us: now,
                        revision,
                    }));
                    let (_, period) = self.clients[client].kept.unwrap_or((lease, SEC));
                    // Kept alive for 1 to 2 TTLs (period is TTL / 3), then stopped.
                    let hold = period * (3 + self.rng.below(4));
                    self.clients[client].step = Step::Kept { lease, key };
                    self.wake(main, hold);
                }
                _ => self.revoke(client, lease),
            },
            (Step::Probing { lease, key, until }, _, rep) => {
                if let Some(Rep::Present(present)) = rep {
                    self.records.push(LockRecord::Probe(Probe {
                        client: id,
                        lease,
                        key: key.clone(),
                        sent_us: sent,
                        at_us: now,
                        present,
                    }));
                    if !present {
                        self.clients[client].step = Step::Idle;
                        self.wake(main, 10 * MS);
                        return;
                    }
                }
                self.clients[client].step = Step::Probing { lease, key, until };
                self.wake(main, 150 * MS);
            }
            (step, req, rep) => panic!("unexpected: {step:?} {req:?} {rep:?}"),
        }
    }
}

/// A history of the simulated service.
fn simulate(seed: u64, spec: &SimSpec) -> LockHistory {
    let mut rng = Rng::new(seed);
    let clients = (0..spec.lock_clients + spec.lease_clients)
        .map(|i| Client {
            lock_client: i < spec.lock_clients,
            step: Step::Idle,
            in_flight: HashMap::new(),
            kept: None,
            epoch: HashMap::new(),
            floor: 0,
            rounds: 0,
        })
        .collect();
    let world = World {
        spec: spec.clone(),
        rng: &mut rng,
        now: 0,
        seq: 0,
        queue: BTreeMap::new(),
        server: Server::default(),
        clients,
        records: Vec::new(),
        next_op: 0,
        writes: 0,
    };
    let h = world.run();
    h.validate().unwrap_or_else(|e| panic!("seed {seed}: the simulation wrote an invalid history: {e}"));
    h
}

fn check(seed: u64, h: &LockHistory) -> LockReport {
    check_lock(h).unwrap_or_else(|e| panic!("seed {seed}: {e}"))
}

const SEEDS: u64 = 40;

fn specs() -> Vec<(&'static str, SimSpec)> {
    vec![
        ("default", SimSpec::default()),
        ("no faults", SimSpec { faults: false, ..SimSpec::default() }),
        (
            "one lock, many clients, lossy",
            SimSpec { lock_clients: 6, locks: 1, p_lost: 0.1, ..SimSpec::default() },
        ),
    ]
}

#[test]
fn histories_of_a_correct_service_break_no_rule() {
    for (name, spec) in specs() {
        let mut totals = (0, 0, 0, 0);
        for seed in 0..SEEDS {
            let h = simulate(seed, &spec);
            let report = check(seed, &h);
            assert_eq!(report.verdict, LockVerdict::Valid, "sim {name:?} seed {seed}:\n{report}");
            let s = &report.summary;
            totals.0 += s.acquisitions;
            totals.1 += s.fenced_ok;
            totals.2 += s.late_expiry_decided;
            totals.3 += s.keepalives_unknown + s.fenced_unknown;
        }
        // The histories exercise what the rules judge (a generator that produced nothing would
        // pass vacuously).
        let (acquisitions, fenced_ok, decided, unknown) = totals;
        assert!(acquisitions > 10 * SEEDS as usize, "sim {name:?}: only {acquisitions} acquisitions");
        assert!(fenced_ok > 50 * SEEDS as usize, "sim {name:?}: only {fenced_ok} fenced writes");
        assert!(decided > 3 * SEEDS as usize, "sim {name:?}: only {decided} late-expiry decisions");
        assert!(unknown > 0, "sim {name:?}: no unknown outcome at all");
    }
}

#[test]
fn leases_acknowledged_but_not_renewed_are_caught_in_every_seed() {
    for (name, spec) in specs() {
        let spec = SimSpec { early_expiry: true, ..spec };
        for seed in 0..SEEDS {
            let h = simulate(seed, &spec);
            let report = check(seed, &h);
            let counts = report.counts();
            assert!(
                counts.get(&Rule::EarlyExpiry).copied().unwrap_or(0) > 0,
                "sim {name:?} seed {seed}: the planted early expiry went unnoticed:\n{report}"
            );
        }
    }
}

/// The holding of `records[i]` (an acquire) and its lease's records, as the test needs them.
fn acquire(h: &LockHistory, i: usize) -> &Acquire {
    match &h.records[i] {
        LockRecord::Acquire(a) => a,
        other => panic!("not an acquire: {other:?}"),
    }
}

/// Inserts an acknowledged keep-alive of an earlier holder's lease, sent so that its TTL reaches
/// past a later holder's acquisition: the server acknowledged a renewal and let the lease go
/// anyway. `None` if no pair of holders fits.
fn mutate_expiry(h: &LockHistory, rng: &mut Rng) -> Option<LockHistory> {
    let acquires: Vec<usize> =
        (0..h.records.len()).filter(|&i| matches!(h.records[i], LockRecord::Acquire(_))).collect();
    let grant = |lease: i64| {
        h.records.iter().find_map(|r| match r {
            LockRecord::Grant(g) if g.lease == lease => Some(g.clone()),
            _ => None,
        })
    };
    let mut candidates = Vec::new();
    for &i in &acquires {
        let a = acquire(h, i);
        // Released or revoked before the later acquisition: the later one is legitimate.
        let ended = |before: u64| {
            h.records.iter().any(|r| match r {
                LockRecord::Release(r) => r.client == a.client && r.token == a.token && r.sent_us <= before,
                LockRecord::Revoke(r) => r.lease == a.lease && r.sent_us <= before,
                _ => false,
            })
        };
        for &j in &acquires {
            let b = acquire(h, j);
            if b.lock != a.lock || b.at_us <= a.at_us || b.client == a.client || ended(b.at_us) {
                continue;
            }
            // The later holder must itself be valid for a while after acquiring: its lease's
            // floor by its grant alone, or by a keep-alive acknowledged before it acquired.
            let later_floor = h
                .records
                .iter()
                .filter_map(|r| match r {
                    LockRecord::Keepalive(k) if k.lease == b.lease && k.outcome == KeepaliveOutcome::Ok => {
                        Some(k.sent_us + k.ttl.unwrap_or(0) as u64 * SEC)
                    }
                    _ => None,
                })
                .chain(grant(b.lease).map(|g| g.sent_us + g.ttl as u64 * SEC))
                .max()
                .unwrap_or(0);
            if later_floor > b.at_us + MS {
                candidates.push((i, j));
            }
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let &(i, j) = rng.pick(&candidates);
    let (a, b) = (acquire(h, i).clone(), acquire(h, j).clone());
    let ttl = grant(a.lease).expect("granted").ttl;
    // Sent after the earlier holder acquired, before the later one did, reaching past it.
    let sent = a.at_us.max(b.at_us.saturating_sub(ttl as u64 * SEC / 2));
    let mut out = h.clone();
    out.records.insert(
        i + 1,
        LockRecord::Keepalive(Keepalive {
            client: a.client,
            lease: a.lease,
            sent_us: sent,
            at_us: sent + MS,
            outcome: KeepaliveOutcome::Ok,
            ttl: Some(ttl),
        }),
    );
    Some(out)
}

/// Gives one acquisition the token of another acquisition of the same lock (and its fenced
/// writes and release with it).
fn mutate_token(h: &LockHistory, rng: &mut Rng) -> Option<LockHistory> {
    let acquires: Vec<usize> =
        (0..h.records.len()).filter(|&i| matches!(h.records[i], LockRecord::Acquire(_))).collect();
    let pairs: Vec<(usize, usize)> = acquires
        .iter()
        .flat_map(|&i| acquires.iter().map(move |&j| (i, j)))
        .filter(|&(i, j)| {
            let (a, b) = (acquire(h, i), acquire(h, j));
            i < j && a.lock == b.lock && a.client != b.client
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let &(i, j) = rng.pick(&pairs);
    let (from, to) = (acquire(h, j).clone(), acquire(h, i).token);
    let mut out = h.clone();
    for r in &mut out.records {
        match r {
            LockRecord::Acquire(a)
                if a.client == from.client && a.token == from.token && a.lock == from.lock =>
            {
                a.token = to
            }
            LockRecord::Fenced(f)
                if f.client == from.client && f.token == from.token && f.lock == from.lock =>
            {
                f.token = to
            }
            LockRecord::Release(x)
                if x.client == from.client && x.token == from.token && x.lock == from.lock =>
            {
                x.token = to
            }
            LockRecord::Abandon(x)
                if x.client == from.client && x.token == from.token && x.lock == from.lock =>
            {
                x.token = to
            }
            _ => {}
        }
    }
    Some(out)
}

#[test]
fn a_renewal_acknowledged_then_ignored_breaks_mutual_exclusion() {
    let mut mutated = 0;
    for seed in 0..SEEDS {
        let h = simulate(seed, &SimSpec::default());
        let mut rng = Rng::new(seed ^ 0xfeed);
        let Some(bad) = mutate_expiry(&h, &mut rng) else { continue };
        mutated += 1;
        let report = check(seed, &bad);
        let overlaps: Vec<_> = report.violations.iter().filter(|v| v.rule == Rule::MutualExclusion).collect();
        assert!(!overlaps.is_empty(), "seed {seed}: the mutation was not caught:\n{report}");
        assert!(
            overlaps.iter().all(|v| matches!(v.finding, Finding::Overlap { .. })),
            "seed {seed}:\n{report}"
        );
    }
    assert!(mutated > SEEDS as usize / 2, "only {mutated} of {SEEDS} histories could be mutated");
}

#[test]
fn a_token_given_twice_is_caught() {
    let mut mutated = 0;
    for seed in 0..SEEDS {
        let h = simulate(seed, &SimSpec::default());
        let mut rng = Rng::new(seed ^ 0xbeef);
        let Some(bad) = mutate_token(&h, &mut rng) else { continue };
        mutated += 1;
        let report = check(seed, &bad);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.rule == Rule::Tokens && matches!(v.finding, Finding::TokenReused { .. })),
            "seed {seed}: the reused token was not caught:\n{report}"
        );
    }
    assert!(mutated > SEEDS as usize / 2, "only {mutated} of {SEEDS} histories could be mutated");
}
