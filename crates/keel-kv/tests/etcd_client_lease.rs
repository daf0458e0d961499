//! etcd's Lease, Lock and Election APIs through the Rust `etcd-client` crate, unmodified, against a
//! 3-node cluster of real keeld processes: grants (server- and client-chosen ids, the minimum TTL),
//! time-to-live with keys, the list, keep-alive streams on the leader and on a follower, revokes
//! that delete every attached key in one revision, `ignore_lease` and moving a key to another
//! lease; locks (waiters in line, the holder's create revision as a fencing token, a waiter that
//! goes away); elections (campaign, proclaim, leader, observe, resign).
//!
//! Every scenario runs against etcd 3.4 first (Debian's `etcd-server`, a single member): what it
//! asserts — answers, error codes and messages, TTLs, whether the header revision moves — is what
//! etcd answers, checked each time, and then asserted of keeld.

mod procs;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;
use std::time::Instant;

use etcd_client::Client;
use etcd_client::EventType;
use etcd_client::GetOptions;
use etcd_client::LeaderKey;
use etcd_client::LeaseGrantOptions;
use etcd_client::LeaseTimeToLiveOptions;
use etcd_client::LockOptions;
use etcd_client::ProclaimOptions;
use etcd_client::PutOptions;
use etcd_client::ResignOptions;
use etcd_client::WatchOptions;
use procs::Etcd;
use procs::Procs;
use procs::DEADLINE;
use tonic::Code;

const ALL: [u64; 3] = [1, 2, 3];

/// How long a test waits for one answer that must come.
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(25);

/// A system the scenarios run against: where to write, and two members to be clients of
/// (keeld's leader and a follower; etcd's one member twice, so that both run the same steps).
struct Sys {
    name: &'static str,
    writer: String,
    members: [String; 2],
}

impl Sys {
    fn etcd(e: &Etcd) -> Sys {
        let ep = format!("http://{}", e.client);
        Sys { name: "etcd", writer: ep.clone(), members: [ep.clone(), ep] }
    }

    fn keel(p: &mut Procs) -> Sys {
        let leader = p.wait_leader(&ALL, DEADLINE);
        let follower = ALL.into_iter().find(|id| *id != leader).expect("a follower");
        let ep = |id: u64| format!("http://{}", p.client(id));
        Sys { name: "keeld", writer: ep(leader), members: [ep(leader), ep(follower)] }
    }
}

/// Runs `scenario` against etcd, then against a fresh 3-node keeld cluster.
async fn as_etcd<F, Fut>(scenario: F)
where
    F: Fn(Sys) -> Fut,
    Fut: Future<Output = ()>,
{
    {
        let e = Etcd::start(&[]);
        scenario(Sys::etcd(&e)).await;
    }
    let mut p = Procs::start(3, 0, "");
    let s = Sys::keel(&mut p);
    scenario(s).await;
}

async fn connect(ep: &str) -> Client {
    Client::connect([ep], None).await.unwrap_or_else(|e| panic!("connect to {ep}: {e}"))
}

/// The store's revision, as a linearizable read through `c` answers it.
async fn revision(c: &mut Client) -> i64 {
    c.get("revision-of-the-store", None).await.expect("get").header().expect("header").revision()
}

/// A key's create revision and lease, if it exists (a linearizable read).
async fn key_of(c: &mut Client, key: &str) -> Option<(i64, i64, String)> {
    let r = c.get(key, None).await.unwrap_or_else(|e| panic!("get {key}: {e}"));
    r.kvs()
        .first()
        .map(|kv| (kv.create_revision(), kv.lease(), kv.value_str().expect("a UTF-8 value").to_string()))
}

/// Every key under `prefix` (a linearizable read).
async fn keys_under(c: &mut Client, prefix: &str) -> Vec<String> {
    let r = c.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("get");
    r.kvs().iter().map(|kv| kv.key_str().expect("a UTF-8 key").to_string()).collect()
}

/// Polls `check` until it answers `Ok`, or fails the test with its last answer after [`WAIT`].
async fn wait_for<T, Fut>(what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() > WAIT => {
                panic!("{what}: still not so after {WAIT:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// A future that must finish within [`WAIT`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("{what}: no answer in {WAIT:?}"))
}

/// A gRPC error's code and message.
#[track_caller]
fn code<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (Code, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

const LEASE_NOT_FOUND: (Code, &str) = (Code::NotFound, "etcdserver: requested lease not found");

fn not_found() -> (Code, String) {
    (LEASE_NOT_FOUND.0, LEASE_NOT_FOUND.1.to_string())
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.expect("a response header").revision()
}

fn with_lease(id: i64) -> Option<PutOptions> {
    Some(PutOptions::new().with_lease(id))
}

fn sorted_keys(keys: &[Vec<u8>]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    keys.sort();
    keys
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

/// Grants, time-to-live with keys, the list, `ignore_lease`, a key moved to another lease, a
/// revoke that deletes its keys in one revision (one watch response), and the errors.
async fn grant_attach_and_revoke(s: Sys) {
    let name = s.name;
    let mut c = connect(&s.writer).await;
    let base = revision(&mut c).await;

    // A grant writes no key: the header's revision does not move.
    let granted = Instant::now();
    let g = c.lease_grant(30, None).await.expect("grant");
    assert!(g.id() > 0, "{name}: a server-chosen id: {g:?}");
    assert_eq!((30, "", base), (g.ttl(), g.error(), header_rev(g.header())), "{name}: {g:?}");
    let a = g.id();
    let b = 0x1ea5_e0b0;
    let g = c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(b))).await.expect("grant");
    assert_eq!((b, 30, base), (g.id(), g.ttl(), header_rev(g.header())), "{name}: a client-chosen id");
    assert_eq!(
        (Code::FailedPrecondition, "etcdserver: lease already exists".to_string()),
        code(c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(b))).await),
        "{name}: the same id again"
    );
    // Shorter TTLs are raised to the minimum: 2 s with the default election timeout.
    for ttl in [1, 0, -5] {
        let g = c.lease_grant(ttl, None).await.expect("grant");
        assert_eq!(2, g.ttl(), "{name}: TTL {ttl} is raised to the minimum");
        // Revoked at once; on a slow machine it may have run out already, and then it is gone.
        if let Err(e) = c.lease_revoke(g.id()).await {
            assert_eq!(not_found(), code::<()>(Err(e)), "{name}: revoking lease {:x}", g.id());
        }
    }
    let empty = c.lease_grant(30, None).await.expect("grant").id();
    assert_eq!(
        (Code::OutOfRange, "etcdserver: too large lease TTL".to_string()),
        code(c.lease_grant(9_000_000_001, None).await),
        "{name}"
    );

    c.put("k1", "1", with_lease(a)).await.expect("put"); // base + 1
    c.put("k2", "2", with_lease(a)).await.expect("put"); // 2
    c.put("k3", "3", with_lease(a)).await.expect("put"); // 3
                                                         // ignore_lease: a new value, the same lease.
    c.put("k3", "3b", Some(PutOptions::new().with_ignore_lease())).await.expect("put"); // 4
    assert_eq!(Some((base + 3, a, "3b".into())), key_of(&mut c, "k3").await, "{name}: ignore_lease");
    // A key put with another lease moves to it.
    c.put("km", "a", with_lease(a)).await.expect("put"); // 5
    c.put("km", "b", with_lease(b)).await.expect("put"); // 6
    assert_eq!(Some((base + 5, b, "b".into())), key_of(&mut c, "km").await, "{name}: moved to lease b");
    // And a put without a lease detaches it.
    c.put("kd", "a", with_lease(a)).await.expect("put"); // 7
    c.put("kd", "none", None).await.expect("put"); // 8
    assert_eq!(Some((base + 7, 0, "none".into())), key_of(&mut c, "kd").await, "{name}: detached");
    assert_eq!(not_found(), code(c.put("kx", "x", with_lease(0x7777)).await), "{name}: no such lease");

    let keys = || Some(LeaseTimeToLiveOptions::new().with_keys());
    let t = c.lease_time_to_live(a, keys()).await.expect("time to live");
    let left = 30 - granted.elapsed().as_secs() as i64;
    assert_eq!((a, 30, base + 8), (t.id(), t.granted_ttl(), header_rev(t.header())), "{name}: {t:?}");
    assert!((left - 1..=30).contains(&t.ttl()), "{name}: {} s left of 30, expected about {left}", t.ttl());
    assert_eq!(vec!["k1", "k2", "k3"], sorted_keys(t.keys()), "{name}: lease a's keys");
    let t = c.lease_time_to_live(b, keys()).await.expect("time to live");
    assert_eq!((b, 30, vec!["km".to_string()]), (t.id(), t.granted_ttl(), sorted_keys(t.keys())), "{name}");
    let t = c.lease_time_to_live(b, None).await.expect("time to live");
    assert!(t.keys().is_empty(), "{name}: keys only when asked: {t:?}");
    // No such lease: answered, TTL -1.
    let t = c.lease_time_to_live(0x7777, keys()).await.expect("time to live");
    assert_eq!((0x7777, -1, 0, 0), (t.id(), t.ttl(), t.granted_ttl(), t.keys().len()), "{name}: {t:?}");

    let listed: BTreeSet<i64> =
        c.leases().await.expect("leases").leases().iter().map(etcd_client::LeaseStatus::id).collect();
    let expected = BTreeSet::from([a, b, empty]);
    assert_eq!(expected, listed, "{name}: the lease list");

    // A watch on each member sees lease a's revoke as one response: every key deleted at one
    // revision, in key order.
    let mut watches = Vec::new();
    for ep in &s.members {
        let mut w = connect(ep).await;
        assert_eq!(base + 8, revision(&mut w).await, "{name} at {ep}: caught up");
        let opts = WatchOptions::new().with_prefix().with_start_revision(base + 9);
        let stream = w.watch("k", Some(opts)).await.expect("watch");
        watches.push((ep.clone(), w, stream));
    }
    for (ep, _, stream) in &mut watches {
        let r = within("the created response", stream.message()).await.expect("watch").expect("a response");
        assert!(r.created(), "{name} at {ep}: {r:?}");
    }
    let revoked = c.lease_revoke(a).await.expect("revoke");
    assert_eq!(base + 9, header_rev(revoked.header()), "{name}: the revoke's deletes are one revision");
    for (ep, _, stream) in &mut watches {
        let r = within("the revoke's events", stream.message()).await.expect("watch").expect("a response");
        let events: Vec<(EventType, String, i64)> = r
            .events()
            .iter()
            .map(|e| {
                let kv = e.kv().expect("a kv");
                (e.event_type(), kv.key_str().expect("utf8").to_string(), kv.mod_revision())
            })
            .collect();
        let deleted = |k: &str| (EventType::Delete, k.to_string(), base + 9);
        assert_eq!(
            vec![deleted("k1"), deleted("k2"), deleted("k3")],
            events,
            "{name} at {ep}: one response with all the deletes"
        );
    }
    drop(watches);
    assert!(keys_under(&mut c, "k").await.iter().all(|k| k == "km" || k == "kd"), "{name}");
    assert_eq!(Some((base + 5, b, "b".into())), key_of(&mut c, "km").await, "{name}: km left lease a");
    assert_eq!(Some((base + 7, 0, "none".into())), key_of(&mut c, "kd").await, "{name}: kd left lease a");
    let t = c.lease_time_to_live(a, keys()).await.expect("time to live");
    assert_eq!((-1, 0, 0), (t.ttl(), t.granted_ttl(), t.keys().len()), "{name}: a revoked lease: {t:?}");
    assert_eq!(not_found(), code(c.lease_revoke(a).await), "{name}: revoked twice");
    assert_eq!(not_found(), code(c.put("k1", "x", with_lease(a)).await), "{name}: a revoked lease");

    // A lease without keys: the revoke writes nothing, the revision stays.
    let r = c.lease_revoke(empty).await.expect("revoke");
    assert_eq!(base + 9, header_rev(r.header()), "{name}: a revoke without keys");
    let r = c.lease_revoke(b).await.expect("revoke");
    assert_eq!(base + 10, header_rev(r.header()), "{name}");
    assert_eq!(None, key_of(&mut c, "km").await, "{name}: km went with lease b");
    assert!(c.leases().await.expect("leases").leases().is_empty(), "{name}: no leases left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grant_attach_and_revoke_as_etcd() {
    as_etcd(grant_attach_and_revoke).await;
}

/// Keep-alive streams, one on each member (keeld: the leader and a follower, which forwards
/// them): several keep-alives on one stream, each answered with the id and the granted TTL; kept
/// alive past its TTL, the lease and its key stay; once revoked, a keep-alive is answered TTL 0.
async fn keep_alive_streams(s: Sys) {
    let name = s.name;
    let runs = s.members.iter().enumerate().map(|(i, ep)| {
        let writer = s.writer.clone();
        async move {
            let what = format!("{name} at {ep}");
            let mut c = connect(ep).await;
            let mut w = connect(&writer).await;
            let key = format!("ka/{i}");
            const TTL: i64 = 3;
            let granted = Instant::now();
            let id = c.lease_grant(TTL, None).await.expect("grant").id();
            c.put(key.as_str(), "v", with_lease(id)).await.expect("put");
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await.expect("keep-alive");
            assert_eq!(id, keeper.id(), "{what}");
            // Kept alive every second for twice its TTL.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut answered = 0;
            while granted.elapsed() < Duration::from_secs(2 * TTL as u64) {
                tick.tick().await;
                keeper.keep_alive().await.expect("send a keep-alive");
                let r = within(&what, stream.message()).await.expect("keep-alive").expect("an answer");
                assert_eq!((id, TTL), (r.id(), r.ttl()), "{what}: {r:?}");
                let now = revision(&mut w).await;
                assert!(header_rev(r.header()) <= now, "{what}: {r:?} is ahead of the store ({now})");
                answered += 1;
            }
            assert!(answered >= 5, "{what}: {answered} keep-alives");
            assert_eq!(Some(id), key_of(&mut c, &key).await.map(|k| k.1), "{what}: kept alive past its TTL");
            let t = c.lease_time_to_live(id, None).await.expect("time to live");
            assert!(t.ttl() >= TTL - 2 && t.ttl() <= TTL, "{what}: just kept alive: {t:?}");

            // Revoked by another client: the stream's next keep-alive is answered TTL 0.
            w.lease_revoke(id).await.expect("revoke");
            keeper.keep_alive().await.expect("send a keep-alive");
            let r = within(&what, stream.message()).await.expect("keep-alive").expect("an answer");
            assert_eq!((id, 0), (r.id(), r.ttl()), "{what}: a revoked lease: {r:?}");
            assert_eq!(None, key_of(&mut c, &key).await, "{what}: the key went with the lease");
            // A new stream for it: the first answer is TTL 0, which the client reports.
            match c.lease_keep_alive(id).await {
                Err(etcd_client::Error::LeaseKeepAliveError(m)) => {
                    assert_eq!("lease not found", m, "{what}")
                }
                other => panic!("{what}: a keep-alive stream for a revoked lease: {other:?}"),
            }
        }
    });
    futures_util::future::join_all(runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_streams_as_etcd() {
    as_etcd(keep_alive_streams).await;
}

// ---------------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------------

/// Lock and unlock; a second locker (through the other member) waits until the first unlocks and
/// gets a larger create revision (the fencing token); a waiter whose request is dropped leaves no
/// key behind; a holder whose lease goes lets the next one in.
async fn locks(s: Sys) {
    let name = s.name;
    let [ep_a, ep_b] = &s.members;
    let mut a = connect(ep_a).await;
    let mut kv = connect(&s.writer).await;

    // Uncontended: the key is `name/<lease in hex>`, and the answer is at its creation.
    let la = a.lease_grant(30, None).await.expect("grant").id();
    let held = a.lock("lk", Some(LockOptions::new().with_lease(la))).await.expect("lock");
    let key_a = String::from_utf8(held.key().to_vec()).expect("a UTF-8 key");
    assert_eq!(format!("lk/{la:x}"), key_a, "{name}");
    let (rev_a, lease, _) = key_of(&mut kv, &key_a).await.expect("the holder's key");
    assert_eq!((rev_a, la), (header_rev(held.header()), lease), "{name}: the uncontended lock's answer");

    // Contended: B waits behind A.
    let mut b = connect(ep_b).await;
    let lb = b.lease_grant(30, None).await.expect("grant").id();
    let waiting = tokio::spawn(async move { b.lock("lk", Some(LockOptions::new().with_lease(lb))).await });
    let key_b = format!("lk/{lb:x}");
    let rev_b = wait_for(&format!("{name}: B's key in line"), || {
        let (mut kv, key_b) = (kv.clone(), key_b.clone());
        async move { key_of(&mut kv, &key_b).await.map(|k| k.0).ok_or_else(|| "not yet".to_string()) }
    })
    .await;
    assert!(rev_b > rev_a, "{name}: B's key {rev_b} after A's {rev_a}");
    // One more round trip through B's member: a lock granted to B would have been answered by now.
    revision(&mut connect(ep_b).await).await;
    assert!(!waiting.is_finished(), "{name}: B got the lock while A held it: {:?}", waiting.await);
    let unlocked = a.unlock(key_a.as_str()).await.expect("unlock");
    let unlock_rev = header_rev(unlocked.header());
    assert!(unlock_rev > rev_b, "{name}: the unlock is a delete: {unlocked:?}");
    let got = within("B's lock", waiting).await.expect("the task").expect("lock");
    assert_eq!(key_b.as_bytes(), got.key(), "{name}");
    assert!(header_rev(got.header()) >= unlock_rev, "{name}: B's lock answered before A's unlock: {got:?}");
    assert_eq!(None, key_of(&mut kv, &key_a).await, "{name}: A's key is gone");

    // A waiter that goes away: its key is withdrawn, and it holds up nobody.
    let mut c = connect(ep_a).await;
    let lc = c.lease_grant(30, None).await.expect("grant").id();
    let dropped = tokio::spawn(async move { c.lock("lk", Some(LockOptions::new().with_lease(lc))).await });
    let key_c = format!("lk/{lc:x}");
    wait_for(&format!("{name}: C's key in line"), || {
        let (mut kv, key_c) = (kv.clone(), key_c.clone());
        async move { key_of(&mut kv, &key_c).await.ok_or_else(|| "not yet".to_string()) }
    })
    .await;
    dropped.abort();
    assert!(dropped.await.is_err_and(|e| e.is_cancelled()), "{name}: C's lock was still waiting");
    wait_for(&format!("{name}: C's key withdrawn"), || {
        let mut kv = kv.clone();
        let key_b = key_b.clone();
        async move {
            let keys = keys_under(&mut kv, "lk/").await;
            if keys == [key_b] {
                Ok(())
            } else {
                Err(format!("{keys:?}"))
            }
        }
    })
    .await;
    // Lease C still exists: only the key goes.
    assert!(kv.lease_time_to_live(lc, None).await.expect("ttl").ttl() > 0, "{name}");

    // D waits behind B; B's lease is revoked, which lets D in.
    let mut d = connect(ep_a).await;
    let ld = d.lease_grant(30, None).await.expect("grant").id();
    let waiting = tokio::spawn(async move { d.lock("lk", Some(LockOptions::new().with_lease(ld))).await });
    let key_d = format!("lk/{ld:x}");
    let rev_d = wait_for(&format!("{name}: D's key in line"), || {
        let (mut kv, key_d) = (kv.clone(), key_d.clone());
        async move { key_of(&mut kv, &key_d).await.map(|k| k.0).ok_or_else(|| "not yet".to_string()) }
    })
    .await;
    let revoked = header_rev(kv.lease_revoke(lb).await.expect("revoke").header());
    let got = within("D's lock", waiting).await.expect("the task").expect("lock");
    assert_eq!(key_d.as_bytes(), got.key(), "{name}");
    assert!(header_rev(got.header()) >= revoked, "{name}: {got:?}");
    assert!(rev_d > rev_b, "{name}: the fencing token grows: {rev_b} then {rev_d}");
    kv.unlock(key_d.as_str()).await.expect("unlock");

    // Without a lease, the server grants one (etcd's session TTL, 60 s) and keeps the key with it.
    let held = kv.lock("lk", None).await.expect("lock");
    let key = String::from_utf8(held.key().to_vec()).expect("a UTF-8 key");
    let (_, lease, _) = key_of(&mut kv, &key).await.expect("the key");
    assert_eq!(format!("lk/{lease:x}"), key, "{name}");
    let t = kv.lease_time_to_live(lease, None).await.expect("ttl");
    assert_eq!(60, t.granted_ttl(), "{name}: the session lease of a lock without one");
    kv.unlock(key.as_str()).await.expect("unlock");
    // Unlocking a key that is not there is no error.
    let r = kv.unlock(key.as_str()).await.expect("unlock again");
    assert_eq!(revision(&mut kv).await, header_rev(r.header()), "{name}: nothing deleted");

    assert!(keys_under(&mut kv, "lk/").await.is_empty(), "{name}: nothing left in line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_as_etcd() {
    as_etcd(locks).await;
}

// ---------------------------------------------------------------------------------------------
// Elections
// ---------------------------------------------------------------------------------------------

fn kv_value(r: &etcd_client::LeaderResponse) -> (String, String) {
    let kv = r.kv().expect("a leader kv");
    (kv.key_str().expect("utf8").to_string(), kv.value_str().expect("utf8").to_string())
}

/// Observes election `name` through `ep`: every answer, as it comes. (The stream's first
/// answer only comes with a leader: etcd sends its response headers with it, so the client's
/// `observe` returns only then.)
fn observe(ep: &str, name: &'static str) -> tokio::sync::mpsc::Receiver<etcd_client::LeaderResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let ep = ep.to_string();
    tokio::spawn(async move {
        let mut stream = connect(&ep).await.observe(name).await.expect("observe");
        // Ends when the test drops the receiver, or the server goes away after the test.
        while let Ok(Some(r)) = stream.message().await {
            if tx.send(r).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Campaign, leader, proclaim, observe (every leader and value in order), resign; a proclaim
/// with a stale leader key fails; `leader` with no candidates errors.
async fn elections(s: Sys) {
    let name = s.name;
    let [ep_a, ep_b] = &s.members;
    let mut a = connect(ep_a).await;
    let mut kv = connect(&s.writer).await;
    let no_leader = (Code::Unknown, "election: no leader".to_string());
    let not_leader = (Code::Unknown, "election: not leader".to_string());

    assert_eq!(no_leader, code(a.leader("el").await), "{name}: no candidates");
    let mut observed = observe(ep_b, "el");

    let la = a.lease_grant(30, None).await.expect("grant").id();
    let before = revision(&mut kv).await;
    let won = a.campaign("el", "a1", la).await.expect("campaign");
    let lk_a = won.leader().expect("a leader key").clone();
    let key_a = format!("el/{la:x}");
    assert_eq!(
        ("el".as_bytes(), key_a.as_bytes(), before + 1, la, before + 1),
        (lk_a.name(), lk_a.key(), lk_a.rev(), lk_a.lease(), header_rev(won.header())),
        "{name}: the leader key"
    );
    let r = within("the first leader observed", observed.recv()).await.expect("observed");
    assert_eq!((key_a.clone(), "a1".to_string()), kv_value(&r), "{name}");
    assert_eq!(before + 1, header_rev(r.header()), "{name}: {r:?}");
    let r = connect(ep_b).await.leader("el").await.expect("leader");
    assert_eq!((key_a.clone(), "a1".to_string()), kv_value(&r), "{name}");
    assert_eq!(before + 1, header_rev(r.header()), "{name}");

    let p = a.proclaim("a2", Some(ProclaimOptions::new().with_leader(lk_a.clone()))).await.expect("proclaim");
    assert_eq!(before + 2, header_rev(p.header()), "{name}: a proclaim is a put");
    let r = within("the proclaimed value observed", observed.recv()).await.expect("observed");
    assert_eq!((key_a.clone(), "a2".to_string()), kv_value(&r), "{name}");
    assert_eq!(before + 2, header_rev(r.header()), "{name}: {r:?}");

    // Campaigning again with the same lease (through another member) keeps the place and
    // proclaims the new value; the answer's header is that of the txn that found the key.
    let again = connect(ep_b).await.campaign("el", "a3", la).await.expect("campaign again");
    let lk = again.leader().expect("a leader key");
    assert_eq!(
        (lk_a.key(), lk_a.rev(), lk_a.lease()),
        (lk.key(), lk.rev(), lk.lease()),
        "{name}: the same place"
    );
    assert_eq!(before + 2, header_rev(again.header()), "{name}: {again:?}");
    let r = within("the value campaigned again observed", observed.recv()).await.expect("observed");
    assert_eq!((key_a.clone(), "a3".to_string()), kv_value(&r), "{name}");
    assert_eq!(before + 3, header_rev(r.header()), "{name}: {r:?}");

    // B campaigns through the other member and waits.
    let mut b = connect(ep_b).await;
    let lb = b.lease_grant(30, None).await.expect("grant").id();
    let campaigning = tokio::spawn(async move { b.campaign("el", "b1", lb).await });
    let key_b = format!("el/{lb:x}");
    wait_for(&format!("{name}: B's key in line"), || {
        let (mut kv, key_b) = (kv.clone(), key_b.clone());
        async move { key_of(&mut kv, &key_b).await.ok_or_else(|| "not yet".to_string()) }
    })
    .await;
    assert_eq!(before + 4, revision(&mut kv).await, "{name}");
    revision(&mut connect(ep_b).await).await;
    assert!(!campaigning.is_finished(), "{name}: B leads while A does: {:?}", campaigning.await);

    // A stale leader key (another creation) cannot proclaim.
    let stale = lk_a.clone().with_rev(lk_a.rev() + 100);
    assert_eq!(
        not_leader,
        code(a.proclaim("x", Some(ProclaimOptions::new().with_leader(stale.clone()))).await),
        "{name}: a stale leader key"
    );
    // Resigning with a stale key deletes nothing and is no error.
    let r = a.resign(Some(ResignOptions::new().with_leader(stale))).await.expect("resign");
    assert_eq!(before + 4, header_rev(r.header()), "{name}: a stale resign writes nothing");
    assert_eq!(
        (key_a.clone(), "a3".to_string()),
        kv_value(&a.leader("el").await.expect("leader")),
        "{name}: A still leads"
    );

    let r = a.resign(Some(ResignOptions::new().with_leader(lk_a.clone()))).await.expect("resign");
    assert_eq!(before + 5, header_rev(r.header()), "{name}: a resign is a delete");
    let won = within("B's campaign", campaigning).await.expect("the task").expect("campaign");
    let lk_b = won.leader().expect("a leader key").clone();
    assert_eq!(
        (key_b.as_bytes(), before + 4, lb),
        (lk_b.key(), lk_b.rev(), lk_b.lease()),
        "{name}: B's leader key"
    );
    assert!(header_rev(won.header()) >= before + 4, "{name}: B's campaign answer: {won:?}");
    let r = within("the second leader observed", observed.recv()).await.expect("observed");
    assert_eq!((key_b.clone(), "b1".to_string()), kv_value(&r), "{name}");
    assert_eq!(
        (key_b.clone(), "b1".to_string()),
        kv_value(&kv.leader("el").await.expect("leader")),
        "{name}"
    );
    assert_eq!(
        not_leader,
        code(a.proclaim("x", Some(ProclaimOptions::new().with_leader(lk_a))).await),
        "{name}: a resigned leader"
    );

    // B's lease goes: no leader, and the observer sees nothing until a new one.
    kv.lease_revoke(lb).await.expect("revoke");
    assert_eq!(no_leader, code(kv.leader("el").await), "{name}: B's lease revoked");
    let lc = kv.lease_grant(30, None).await.expect("grant").id();
    let won = kv.campaign("el", "c1", lc).await.expect("campaign");
    let lk_c: LeaderKey = won.leader().expect("a leader key").clone();
    let r = within("the third leader observed", observed.recv()).await.expect("observed");
    assert_eq!((format!("el/{lc:x}"), "c1".to_string()), kv_value(&r), "{name}: right after b1");
    assert_eq!(lk_c.rev(), header_rev(r.header()), "{name}: {r:?}");
    kv.resign(Some(ResignOptions::new().with_leader(lk_c))).await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elections_as_etcd() {
    as_etcd(elections).await;
}

/// What etcd's lock and election servers answer where they pass on their client recipes' own
/// results: errors as gRPC's UNKNOWN with the recipe's message, and a campaign that waited
/// answered with the header of the put that queued it (not of the read after the wait).
async fn recipe_answers(s: Sys) {
    let name = s.name;
    let [ep_a, ep_b] = &s.members;
    let mut a = connect(ep_a).await;
    assert_eq!(
        (Code::Unknown, LEASE_NOT_FOUND.1.to_string()),
        code(a.lock("shape", Some(LockOptions::new().with_lease(0x7777))).await),
        "{name}: a lock with no such lease"
    );
    assert_eq!(
        (Code::Unknown, "\"leader\" field must be provided".to_string()),
        code(a.proclaim("x", None).await),
        "{name}: a proclaim without a leader key"
    );
    assert_eq!(
        (Code::Unknown, "\"leader\" field must be provided".to_string()),
        code(a.resign(None).await),
        "{name}: a resign without a leader key"
    );
    assert_eq!(
        (Code::Unknown, LEASE_NOT_FOUND.1.to_string()),
        code(a.campaign("shape", "v", 0x7777).await),
        "{name}: a campaign with no such lease"
    );

    let la = a.lease_grant(30, None).await.expect("grant").id();
    let lk_a = a.campaign("shape", "a", la).await.expect("campaign").leader().expect("a leader key").clone();
    let mut b = connect(ep_b).await;
    let lb = b.lease_grant(30, None).await.expect("grant").id();
    let campaigning = tokio::spawn(async move { b.campaign("shape", "b", lb).await });
    let key_b = format!("shape/{lb:x}");
    let queued = wait_for(&format!("{name}: B's key in line"), || {
        let (mut kv, key_b) = (a.clone(), key_b.clone());
        async move { key_of(&mut kv, &key_b).await.map(|k| k.0).ok_or_else(|| "not yet".to_string()) }
    })
    .await;
    let resigned = a.resign(Some(ResignOptions::new().with_leader(lk_a))).await.expect("resign");
    assert_eq!(queued + 1, header_rev(resigned.header()), "{name}");
    let won = within("B's campaign", campaigning).await.expect("the task").expect("campaign");
    assert_eq!(
        (queued, queued),
        (won.leader().expect("a leader key").rev(), header_rev(won.header())),
        "{name}: a campaign that waited: its leader key and header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_and_election_answers_as_etcd() {
    as_etcd(recipe_answers).await;
}
