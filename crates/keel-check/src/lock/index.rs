//! The view every lock check starts from: each lease with its keep-alives, revoke, stop, attached
//! keys and probes; each lock's acquisitions with their releases; the fenced writes; the fault
//! windows. Records are referred to by their index in the history.

use std::collections::{BTreeMap, HashMap};

use super::history::{
    Acquire, Attach, Bounds, Fenced, Grant, Keepalive, KeepaliveOutcome, LeaseId, LockHistory, LockRecord,
    Micros, Probe, Release, Revision, Revoke, Stop,
};
use super::violation::{EndBy, FloorBy, Validity};

/// Seconds of TTL in microseconds.
pub(crate) fn ttl_us(ttl: i64) -> Micros {
    u64::try_from(ttl).unwrap_or(0).saturating_mul(1_000_000)
}

/// One lease and everything done with it.
pub(crate) struct LeaseView<'a> {
    pub grant: (usize, &'a Grant),
    pub keepalives: Vec<(usize, &'a Keepalive)>,
    pub stop: Option<(usize, &'a Stop)>,
    /// The first revoke sent.
    pub revoke: Option<(usize, &'a Revoke)>,
    pub attached: Vec<(usize, &'a Attach)>,
    pub probes: Vec<(usize, &'a Probe)>,
}

/// The earliest time a lease may expire, and what set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Floor {
    pub at_us: Micros,
    pub by: FloorBy,
}

impl LeaseView<'_> {
    /// The earliest the server may let the lease go by its own clock: the latest of the grant's
    /// and every acknowledged keep-alive's send time + TTL (the server renewed after the request
    /// was sent). Keep-alives of unknown outcome count for nothing: they may not have arrived.
    pub fn renewal_floor(&self) -> Floor {
        let (gi, g) = self.grant;
        let mut floor = Floor { at_us: g.sent_us + ttl_us(g.ttl), by: FloorBy::Grant { record: gi } };
        for &(i, k) in &self.keepalives {
            if let (KeepaliveOutcome::Ok, Some(ttl)) = (k.outcome, k.ttl) {
                let at = k.sent_us + ttl_us(ttl);
                if at > floor.at_us {
                    floor = Floor { at_us: at, by: FloorBy::Keepalive { record: i } };
                }
            }
        }
        floor
    }

    /// The earliest the lease may end at all: its [renewal floor](Self::renewal_floor), or the
    /// client's own revoke if that was sent first.
    pub fn floor(&self) -> Floor {
        let floor = self.renewal_floor();
        match self.revoke {
            Some((i, r)) if r.sent_us < floor.at_us => {
                Floor { at_us: r.sent_us, by: FloorBy::Revoke { record: i } }
            }
            _ => floor,
        }
    }

    /// The largest TTL the server gave the lease (seconds).
    pub fn ttl(&self) -> i64 {
        self.keepalives.iter().filter_map(|(_, k)| k.ttl).fold(self.grant.1.ttl, i64::max)
    }

    /// The last time the lease may have been renewed by what the client knows of: the latest
    /// answer (or giving up) of any keep-alive, or the grant's answer.
    pub fn last_renewal_us(&self) -> Micros {
        self.keepalives.iter().map(|(_, k)| k.at_us).fold(self.grant.1.at_us, Micros::max)
    }
}

/// One lock holding: its acquisition and, if sent, its release.
pub(crate) struct Holding<'a> {
    pub acquire: (usize, &'a Acquire),
    pub release: Option<(usize, &'a Release)>,
}

/// A fault and the heal that ended it (`None`: never healed in the history).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub from_us: Micros,
    pub to_us: Option<Micros>,
}

pub(crate) struct Indexed<'a> {
    pub bounds: Bounds,
    pub leases: BTreeMap<LeaseId, LeaseView<'a>>,
    /// lock -> its holdings, in record order.
    pub locks: BTreeMap<&'a str, Vec<Holding<'a>>>,
    /// (client, lock, token) -> the holding's position in its lock's holdings.
    holding_at: HashMap<(u64, &'a str, Revision), usize>,
    pub fenced: Vec<(usize, &'a Fenced)>,
    /// Fault windows, by start.
    pub windows: Vec<Window>,
    pub abandoned: usize,
    pub clients: usize,
}

impl<'a> Indexed<'a> {
    /// Indexes a history that [`LockHistory::validate`] accepted.
    pub fn new(history: &'a LockHistory) -> Indexed<'a> {
        let mut leases: BTreeMap<LeaseId, LeaseView<'a>> = BTreeMap::new();
        let mut locks: BTreeMap<&'a str, Vec<Holding<'a>>> = BTreeMap::new();
        let mut holding_at: HashMap<(u64, &'a str, Revision), usize> = HashMap::new();
        let mut fenced = Vec::new();
        let mut windows: Vec<Window> = Vec::new();
        let mut bounds = Bounds::default();
        let mut abandoned = 0;
        let mut clients = std::collections::BTreeSet::new();
        fn lease<'m, 'a>(
            leases: &'m mut BTreeMap<LeaseId, LeaseView<'a>>,
            id: LeaseId,
        ) -> &'m mut LeaseView<'a> {
            leases.get_mut(&id).expect("validated: a lease is granted before its other records")
        }
        for (i, record) in history.records.iter().enumerate() {
            match record {
                LockRecord::Bounds(b) => bounds = *b,
                LockRecord::Grant(g) => {
                    clients.insert(g.client);
                    leases.insert(
                        g.lease,
                        LeaseView {
                            grant: (i, g),
                            keepalives: Vec::new(),
                            stop: None,
                            revoke: None,
                            attached: Vec::new(),
                            probes: Vec::new(),
                        },
                    );
                }
                LockRecord::Keepalive(k) => lease(&mut leases, k.lease).keepalives.push((i, k)),
                LockRecord::Stop(s) => {
                    let l = lease(&mut leases, s.lease);
                    l.stop = l.stop.or(Some((i, s)));
                }
                LockRecord::Revoke(r) => {
                    let l = lease(&mut leases, r.lease);
                    l.revoke = l.revoke.or(Some((i, r)));
                }
                LockRecord::Attach(a) => lease(&mut leases, a.lease).attached.push((i, a)),
                LockRecord::Probe(p) => lease(&mut leases, p.lease).probes.push((i, p)),
                LockRecord::Acquire(a) => {
                    let holdings = locks.entry(a.lock.as_str()).or_default();
                    holding_at.insert((a.client, a.lock.as_str(), a.token), holdings.len());
                    holdings.push(Holding { acquire: (i, a), release: None });
                }
                LockRecord::Release(r) => {
                    let at = holding_at[&(r.client, r.lock.as_str(), r.token)];
                    let h = &mut locks.get_mut(r.lock.as_str()).expect("validated: acquired before")[at];
                    h.release = h.release.or(Some((i, r)));
                }
                LockRecord::Fenced(f) => fenced.push((i, f)),
                LockRecord::Abandon(_) => abandoned += 1,
                LockRecord::Fault(f) => windows.push(Window { from_us: f.at_us, to_us: None }),
                LockRecord::Heal(h) => {
                    // A heal ends every fault still open (the nemesis heals everything at once).
                    for w in windows.iter_mut().filter(|w| w.to_us.is_none() && w.from_us <= h.at_us) {
                        w.to_us = Some(h.at_us);
                    }
                }
            }
        }
        windows.sort_by_key(|w| w.from_us);
        Indexed { bounds, leases, locks, holding_at, fenced, windows, abandoned, clients: clients.len() }
    }

    /// A holding's validity: from its acquisition's answer to the earlier of its release being
    /// sent and its lease's floor.
    pub fn validity(&self, h: &Holding<'a>) -> Validity {
        let (record, a) = h.acquire;
        let floor = self.leases[&a.lease].floor();
        let (to_us, ends_by) = match h.release {
            Some((ri, r)) if r.sent_us < floor.at_us => (r.sent_us, EndBy::Release { record: ri }),
            _ => (floor.at_us, EndBy::Lease(floor.by)),
        };
        Validity { client: a.client, token: a.token, record, from_us: a.at_us, to_us, ends_by }
    }

    /// The holding a fenced write was made under.
    pub fn holding_of(&self, f: &Fenced) -> Option<&Holding<'a>> {
        let &at = self.holding_at.get(&(f.client, f.lock.as_str(), f.token))?;
        self.locks.get(f.lock.as_str())?.get(at)
    }
}
