//! Leases across a whole-cluster SIGKILL and across a snapshot, with real keeld processes: the
//! leases and their keys are still there, no remaining TTL is cut short (after a restart or a
//! leader change every lease gets its whole TTL plus an election timeout, `keel_kv::lease`), a
//! lease nobody keeps alive still expires, and keep-alives go on working.

mod procs;

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use etcd_client::Client;
use etcd_client::GetOptions;
use etcd_client::LeaseTimeToLiveOptions;
use etcd_client::PutOptions;
use procs::post_json;
use procs::wait_until;
use procs::Procs;
use procs::DEADLINE;

/// keeld's default timing, written out: the bounds below are in election timeouts.
const CONFIG: &str = "
[raft]
heartbeat_interval_ms = 100
election_timeout_min_ms = 500
election_timeout_max_ms = 1000
";
const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
/// What a lease may outlive its time by, past the bounds the guarantee gives: the leader's 100 ms
/// tick, the revoke through Raft, the client's polling, a loaded machine.
const SLACK: Duration = Duration::from_secs(2);

const ALL: [u64; 3] = [1, 2, 3];

async fn connect(eps: &[String]) -> Client {
    let eps: Vec<String> = eps.iter().map(|e| format!("http://{e}")).collect();
    Client::connect(eps.clone(), None).await.unwrap_or_else(|e| panic!("connect to {eps:?}: {e}"))
}

fn with_lease(id: i64) -> Option<PutOptions> {
    Some(PutOptions::new().with_lease(id))
}

/// Keys under `prefix` and the lease of each (a linearizable read).
async fn keys_under(c: &mut Client, prefix: &str) -> Vec<(String, i64)> {
    let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await.expect("get");
    r.kvs().iter().map(|kv| (kv.key_str().expect("a UTF-8 key").to_string(), kv.lease())).collect()
}

async fn leases(c: &mut Client) -> BTreeSet<i64> {
    c.leases().await.expect("leases").leases().iter().map(etcd_client::LeaseStatus::id).collect()
}

/// (remaining, granted) TTL of lease `id` and its keys.
async fn ttl(c: &mut Client, id: i64) -> (i64, i64, Vec<String>) {
    let t = c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.expect("ttl");
    let mut keys: Vec<String> = t.keys().iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    keys.sort();
    (t.ttl(), t.granted_ttl(), keys)
}

/// Polls until no key is under `prefix`; answers when the read that found none ended.
async fn wait_gone(c: &mut Client, prefix: &str, deadline: Duration) -> Instant {
    let start = Instant::now();
    loop {
        let keys = keys_under(c, prefix).await;
        let at = Instant::now();
        if keys.is_empty() {
            return at;
        }
        assert!(start.elapsed() < deadline, "{prefix} still has {keys:?} after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn leases_and_their_keys_survive_a_whole_cluster_sigkill_and_their_ttls_are_not_cut_short() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut p = Procs::start(3, 0, CONFIG);
    p.wait_leader(&ALL, DEADLINE);
    let eps = p.clients(ALL);
    const LONG: i64 = 30;
    const SHORT: i64 = 4;
    let (long, short, left_before) = rt.block_on(async {
        let mut c = connect(&eps).await;
        let long = c.lease_grant(LONG, None).await.expect("grant").id();
        let short = c.lease_grant(SHORT, None).await.expect("grant").id();
        c.put("a/1", "1", with_lease(long)).await.expect("put");
        c.put("a/2", "2", with_lease(long)).await.expect("put");
        c.put("s/1", "1", with_lease(short)).await.expect("put");
        let (left, granted, keys) = ttl(&mut c, long).await;
        assert_eq!((LONG, vec!["a/1".to_string(), "a/2".into()]), (granted, keys));
        assert_eq!(1, keys_under(&mut c, "s/").await.len(), "the short lease has not run out yet");
        (long, short, left)
    });

    let killed = Instant::now();
    p.kill_and_restart_all();
    let ready = Instant::now();
    eprintln!("the whole cluster SIGKILLed and ready again in {:?}", ready - killed);
    let leader = p.wait_leader(&ALL, DEADLINE);
    let follower = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    rt.block_on(async {
        let mut c = connect(&eps).await;
        // Not cut short: the whole TTL again, and an election timeout, from when the new leader
        // took up the timers (after the restart): at least what it had left before the kill, less
        // the time since the restart beyond the election timeout.
        let (left, granted, keys) = ttl(&mut c, long).await;
        let since_restart = killed.elapsed();
        eprintln!("{left} s left {since_restart:?} after the restart, {left_before} s before the kill");
        assert_eq!((LONG, vec!["a/1".to_string(), "a/2".into()]), (granted, keys));
        let beyond = since_restart.saturating_sub(ELECTION_TIMEOUT).as_secs_f64().ceil() as i64;
        assert!(
            left >= left_before - beyond,
            "{left} s left after the restart, {left_before} s before the kill"
        );
        let whole = LONG + ELECTION_TIMEOUT.as_secs() as i64;
        let since = since_restart.as_secs_f64().ceil() as i64;
        assert!(
            left >= whole - since,
            "{left} s left {since_restart:?} after the restart: less than the whole TTL"
        );
        assert_eq!(BTreeSet::from([long, short]), leases(&mut c).await, "the leases after the restart");
        assert_eq!(vec![("a/1".to_string(), long), ("a/2".into(), long)], keys_under(&mut c, "a/").await);
        assert_eq!(vec![("s/1".to_string(), short)], keys_under(&mut c, "s/").await);
        let (left, _, keys) = ttl(&mut c, short).await;
        assert!(left > 0 && keys == ["s/1"], "the short lease after the restart: {left} s, {keys:?}");

        // Nobody keeps the short lease alive: it runs out, never before its whole TTL and an
        // election timeout from the restart, and its keys go; the long one's stay.
        let gone = wait_gone(&mut c, "s/", DEADLINE).await;
        let (since_kill, since_ready) = (gone - killed, gone - ready);
        eprintln!(
            "the short lease ran out {since_ready:?} after the restart ({since_kill:?} after the kill)"
        );
        let whole = Duration::from_secs(SHORT as u64) + ELECTION_TIMEOUT;
        assert!(since_kill >= whole, "the short lease ran out {since_kill:?} after the kill");
        assert!(
            since_ready <= whole + SLACK,
            "the short lease ran out only {since_ready:?} after the restart"
        );
        assert_eq!(BTreeSet::from([long]), leases(&mut c).await);
        assert_eq!(2, keys_under(&mut c, "a/").await.len(), "the long lease's keys stay");

        // A keep-alive through a follower after the restart: the whole TTL again.
        let mut f = connect(&[p.client(follower)]).await;
        f.lease_keep_alive(long).await.expect("keep-alive through a follower");
        let (left, _, _) = ttl(&mut f, long).await;
        assert!(left >= LONG - 1, "kept alive after the restart: {left} s left");
    });
}

/// Keeps lease `id` alive through `eps` every second until `stop`, opening a new stream after an
/// error (a leader change may end one). Records when the last keep-alive that was answered with
/// the TTL was sent, and whether one was answered TTL 0 (the lease gone).
struct Keeper {
    stop: Arc<AtomicBool>,
    last_acked_send: Arc<Mutex<Option<Instant>>>,
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    fn start(rt: &tokio::runtime::Runtime, eps: Vec<String>, id: i64) -> Keeper {
        let stop = Arc::new(AtomicBool::new(false));
        let last_acked_send = Arc::new(Mutex::new(None));
        let lost = Arc::new(AtomicBool::new(false));
        let (s, l, g) = (stop.clone(), last_acked_send.clone(), lost.clone());
        let task = rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !s.load(Ordering::SeqCst) {
                let sent = Instant::now();
                let opened = async { connect(&eps).await.lease_keep_alive(id).await };
                let (mut keeper, mut answers) =
                    match tokio::time::timeout(Duration::from_secs(5), opened).await {
                        Ok(Ok(stream)) => stream,
                        // The first answer was TTL 0.
                        Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                            g.store(true, Ordering::SeqCst);
                            return;
                        }
                        _ => {
                            tick.tick().await;
                            continue;
                        }
                    };
                // Opening the stream answered the first keep-alive with a positive TTL.
                *l.lock().expect("lock") = Some(sent);
                loop {
                    tick.tick().await;
                    if s.load(Ordering::SeqCst) {
                        return;
                    }
                    let sent = Instant::now();
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(5), answers.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => *l.lock().expect("lock") = Some(sent),
                        Ok(Ok(Some(_))) => {
                            g.store(true, Ordering::SeqCst);
                            return;
                        }
                        _ => break,
                    }
                }
            }
        });
        Keeper { stop, last_acked_send, lost, task }
    }

    /// Stops it; when the last answered keep-alive was sent.
    fn stop(self, rt: &tokio::runtime::Runtime) -> Instant {
        self.stop.store(true, Ordering::SeqCst);
        rt.block_on(self.task).expect("the keeper task");
        assert!(!self.lost.load(Ordering::SeqCst), "a lease kept alive was answered TTL 0");
        self.last_acked_send.lock().expect("lock").expect("at least one keep-alive answered")
    }

    fn is_kept(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }
}

#[test]
fn a_follower_that_receives_the_leases_in_a_snapshot_keeps_their_time_once_it_leads() {
    // A snapshot every 200 entries, 10 kept behind it: what the follower misses is no longer in
    // the leader's log.
    let config = format!("{CONFIG}snapshot_every = 200\nlogs_to_keep_after_snapshot = 10\n");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut p = Procs::start(3, 0, &config);
    let leader = p.wait_leader(&ALL, DEADLINE);
    let behind = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    p.kill(behind);
    let live: Vec<u64> = ALL.into_iter().filter(|id| *id != behind).collect();
    let live_eps = p.clients(live.iter().copied());

    const TTL: i64 = 5;
    let (expiring, kept) = rt.block_on(async {
        let mut c = connect(&live_eps).await;
        let expiring = c.lease_grant(TTL, None).await.expect("grant").id();
        let kept = c.lease_grant(TTL, None).await.expect("grant").id();
        c.put("x/1", "1", with_lease(expiring)).await.expect("put");
        c.put("x/2", "2", with_lease(expiring)).await.expect("put");
        c.put("y/1", "1", with_lease(kept)).await.expect("put");
        (expiring, kept)
    });
    // Both kept alive through the leader's peer (a follower: forwarded) until the node behind leads.
    let other = live.iter().copied().find(|id| *id != leader).expect("the other live node");
    let keep_expiring = Keeper::start(&rt, vec![p.client(other)], expiring);
    let keep_kept = Keeper::start(&rt, vec![p.client(other)], kept);
    let granted_at = p.status(leader).expect("status")["committed_index"].as_u64().expect("an index");
    rt.block_on(async {
        let mut c = connect(&live_eps).await;
        for i in 0..400 {
            c.put(format!("fill/{i:03}"), "v", None).await.expect("put");
        }
    });
    wait_until("the leader purges its log past the grants", DEADLINE, || {
        let st = p.status(leader)?;
        // Purged, not only snapshotted: the leader keeps entries a replication stream still
        // reads (the stopped follower's, until it gives up), and then the follower would catch
        // up from the log.
        match st["purged_index"].as_u64() {
            Some(purged) if purged > granted_at => Ok(()),
            _ => Err(st.to_string()),
        }
    });

    p.restart(behind);
    p.wait_ready(behind);
    p.wait_caught_up(behind, leader);
    let log = std::fs::read_to_string(&p.node(behind).log).expect("read the node's log");
    assert!(log.contains("installed snapshot"), "node {behind} caught up without a snapshot:\n{log}");
    rt.block_on(async {
        // Its own state (a read served locally after the read index) has the leases and keys.
        let mut b = connect(&[p.client(behind)]).await;
        assert_eq!(BTreeSet::from([expiring, kept]), leases(&mut b).await, "node {behind}'s leases");
        let x = keys_under(&mut b, "x/").await;
        assert_eq!(vec![("x/1".to_string(), expiring), ("x/2".into(), expiring)], x);
    });

    post_json(&p.client(leader), "/v1/cluster/transfer-leader", &serde_json::json!({"id": behind}))
        .expect("transfer the leadership");
    let new_leader = p.wait_leader(&ALL, DEADLINE);
    assert_eq!(behind, new_leader, "the node that was behind leads");
    // One keep-alive answered since it leads: it has taken up the timers.
    let promoted = Instant::now();
    wait_until("a keep-alive answered by the new leader", DEADLINE, || {
        match *keep_kept.last_acked_send.lock().expect("lock") {
            Some(at) if at > promoted => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let last_kept_alive = keep_expiring.stop(&rt);
    rt.block_on(async {
        let mut c = connect(&p.clients(ALL)).await;
        // Nobody keeps `expiring` alive now: it runs out, never before its TTL from its last
        // acknowledged keep-alive, and at most TTL + an election timeout after the new leader
        // took over.
        let gone = wait_gone(&mut c, "x/", DEADLINE).await;
        let (since_ack, since_transfer) = (gone - last_kept_alive, gone - promoted);
        eprintln!("lease {expiring:x} ran out {since_ack:?} after its last keep-alive, {since_transfer:?} after the transfer");
        let ttl_d = Duration::from_secs(TTL as u64);
        assert!(since_ack >= ttl_d, "ran out {since_ack:?} after its last acknowledged keep-alive");
        assert!(
            since_transfer <= ttl_d + ELECTION_TIMEOUT + SLACK,
            "ran out only {since_transfer:?} after the leadership moved"
        );
        // `kept`, kept alive by the same means through the leader change, stays.
        assert!(keep_kept.is_kept(), "lease {kept:x} was answered TTL 0");
        assert_eq!(vec![("y/1".to_string(), kept)], keys_under(&mut c, "y/").await);
        let mut l = connect(&[p.client(behind)]).await;
        let (left, granted, keys) = ttl(&mut l, kept).await;
        assert_eq!((TTL, vec!["y/1".to_string()]), (granted, keys));
        assert!(left >= TTL - 2, "lease {kept:x} kept alive: {left} s left");
        assert_eq!(BTreeSet::from([kept]), leases(&mut l).await);
    });
    // Both leases got the same time when the new leader took over; `kept` outlives that by the
    // keep-alives alone.
    let gone_at = Instant::now();
    while gone_at.elapsed() < SLACK {
        assert!(keep_kept.is_kept(), "lease {kept:x} was answered TTL 0");
        std::thread::sleep(Duration::from_millis(200));
    }
    keep_kept.stop(&rt);
    rt.block_on(async {
        let mut c = connect(&p.clients(ALL)).await;
        assert_eq!(vec![("y/1".to_string(), kept)], keys_under(&mut c, "y/").await, "kept alive");
    });
}
