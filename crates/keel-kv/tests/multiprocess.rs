//! A cluster's life with real keeld processes on loopback, under write load: the leader SIGKILLed,
//! every node restarted in turn, a node replaced by one that joins, the whole cluster SIGKILLed
//! at once, and a node that slept through 100k writes and compactions catching up by snapshot.
//!
//! Writers retry a failed write against the next endpoint (a put of the same key and value is
//! idempotent); what every test checks in the end is that each acknowledged write is served by
//! every node, and that no write failed with an error a client could not retry.

mod procs;

use std::time::Duration;
use std::time::Instant;

use procs::assert_all_present;
use procs::post_json;
use procs::wait_until;
use procs::Load;
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

const ALL: [u64; 3] = [1, 2, 3];

#[test]
fn leader_sigkilled_under_write_load() {
    let mut c = Procs::start(3, 0, CONFIG);
    let leader = c.wait_leader(&ALL, DEADLINE);
    let load = Load::start(c.clients(ALL), 4, "w/");
    load.wait_more(200, DEADLINE);

    let killed = Instant::now();
    c.kill(leader);
    let new_leader = c.wait_leader(&ALL, DEADLINE);
    let elected = killed.elapsed();
    load.wait_more(1, DEADLINE);
    let serving = killed.elapsed();
    eprintln!(
        "leader {leader} killed: node {new_leader} leads after {elected:?}, serves writes after {serving:?}"
    );
    assert_ne!(new_leader, leader);
    // A follower notices the silence after one election timeout; a split vote costs another.
    assert!(
        serving < 10 * ELECTION_TIMEOUT,
        "writes resumed {serving:?} after the leader died: more than 10 election timeouts"
    );
    load.wait_more(200, DEADLINE);

    c.restart(leader);
    c.wait_ready(leader);
    let report = load.stop();
    report.assert_no_failures();
    eprintln!("{} writes acknowledged, {} retried attempts", report.acked.len(), report.retried);
    let now_leader = c.wait_leader(&ALL, DEADLINE);
    for id in ALL {
        assert_all_present(&c, id, "w/", &report.acked, false);
        c.wait_caught_up(id, now_leader);
        assert_all_present(&c, id, "w/", &report.acked, true);
    }
}

#[test]
fn rolling_restart_under_write_load() {
    let mut c = Procs::start(3, 0, CONFIG);
    c.wait_leader(&ALL, DEADLINE);
    let load = Load::start(c.clients(ALL), 4, "w/");
    load.wait_more(100, DEADLINE);
    for id in ALL {
        let status = c.terminate(id);
        assert!(status.success(), "keeld {id} stopped on SIGTERM with {status}");
        c.restart(id);
        c.wait_ready(id);
        let leader = c.wait_leader(&ALL, DEADLINE);
        c.wait_caught_up(id, leader);
        load.wait_more(100, DEADLINE);
    }
    let report = load.stop();
    report.assert_no_failures();
    eprintln!(
        "{} writes acknowledged, {} retried attempts, slowest write {:?}",
        report.acked.len(),
        report.retried,
        report.longest
    );
    let leader = c.wait_leader(&ALL, DEADLINE);
    for id in ALL {
        c.wait_caught_up(id, leader);
        assert_all_present(&c, id, "w/", &report.acked, true);
    }
}

#[test]
fn node_replaced_by_a_joiner_under_write_load() {
    let mut c = Procs::start(3, 1, CONFIG);
    c.wait_leader(&ALL, DEADLINE);
    let load = Load::start(c.clients(ALL), 4, "w/");
    load.wait_more(100, DEADLINE);

    // Node 4 joins through node 2, with no id: the cluster assigns the next unused one.
    let via = c.client(2);
    c.spawn(4, &["--join", &via]);
    c.wait_ready(4);
    let st = c.status(4).expect("status of the joiner");
    assert_eq!(st["id"], 4, "the cluster assigned id 4: {st}");
    wait_until("node 4 promoted to voter", DEADLINE, || {
        let members = procs::get_json(&via, "/v1/cluster/members")?;
        let voter =
            members["members"].as_array().into_iter().flatten().any(|m| m["id"] == 4 && m["voter"] == true);
        voter.then_some(()).ok_or(members.to_string())
    });
    load.wait_more(100, DEADLINE);

    post_json(&via, "/v1/cluster/remove", &serde_json::json!({"id": 1})).expect("remove node 1");
    let status = wait_until("the removed node 1 to stop", DEADLINE, || c.exited(1).ok_or_else(String::new));
    assert!(!status.success(), "a removed node exits with an error status, got {status}");
    load.wait_more(100, DEADLINE);
    let report = load.stop();
    report.assert_no_failures();

    let members = [2, 3, 4];
    let leader = c.wait_leader(&members, DEADLINE);
    for id in members {
        c.wait_caught_up(id, leader);
        assert_all_present(&c, id, "w/", &report.acked, true);
    }
    assert_all_present(&c, 4, "w/", &report.acked, false);

    // Its old data does not bring node 1 back.
    c.restart(1);
    let status =
        wait_until("node 1 to refuse its data dir", DEADLINE, || c.exited(1).ok_or_else(String::new));
    assert!(!status.success(), "a removed node's data dir must not start: {status}");
}

#[test]
fn whole_cluster_sigkilled_at_once_keeps_acknowledged_writes() {
    let mut c = Procs::start(3, 0, CONFIG);
    c.wait_leader(&ALL, DEADLINE);
    let load = Load::start(c.clients(ALL), 6, "w/");
    load.wait_more(300, DEADLINE);
    c.kill_all();
    let report = load.stop();
    report.assert_no_failures();
    assert!(report.acked.len() >= 300);

    for id in ALL {
        c.restart(id);
    }
    for id in ALL {
        c.wait_ready(id);
    }
    let leader = c.wait_leader(&ALL, DEADLINE);
    for id in ALL {
        assert_all_present(&c, id, "w/", &report.acked, false);
        c.wait_caught_up(id, leader);
        assert_all_present(&c, id, "w/", &report.acked, true);
    }
    // And the cluster takes writes again.
    let load = Load::start(c.clients(ALL), 2, "after/");
    load.wait_more(20, DEADLINE);
    load.stop().assert_no_failures();
}

#[test]
fn node_down_through_100k_writes_and_compactions_catches_up_by_snapshot() {
    // A snapshot every 10k entries, 1k entries kept behind it: the leader's log no longer holds
    // what node 3 misses.
    let config = format!("{CONFIG}snapshot_every = 10000\nlogs_to_keep_after_snapshot = 1000\n");
    let mut c = Procs::start(3, 0, &config);
    let leader = c.wait_leader(&ALL, DEADLINE);
    let behind = ALL.into_iter().find(|id| *id != leader).expect("a follower");
    c.kill(behind);
    let live: Vec<u64> = ALL.into_iter().filter(|id| *id != behind).collect();

    let endpoints = c.clients(live.iter().copied());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let written = Instant::now();
    let compactions = rt.block_on(write_100k_and_compact(endpoints));
    eprintln!("100k puts and {compactions} compactions in {:?}", written.elapsed());
    let leader = c.wait_leader(&live, DEADLINE);
    let leader_status = c.status(leader).expect("leader status");
    assert!(
        leader_status["snapshot_index"].as_u64() > Some(90_000),
        "the leader snapshotted the writes: {leader_status}"
    );

    c.restart(behind);
    c.wait_ready(behind);
    c.wait_caught_up(behind, leader);
    let log = std::fs::read_to_string(&c.node(behind).log).expect("read the node's log");
    assert!(log.contains("installed snapshot"), "node {behind} caught up without a snapshot:\n{log}");

    let want = c.read_prefix(leader, "big/", false).expect("read from the leader");
    assert_eq!(want.len(), 100_000);
    let got = c.read_prefix(behind, "big/", true).expect("read from the node that was behind");
    assert!(got == want, "node {behind} serves {} keys, the leader {}", got.len(), want.len());
    let (a, b) = (c.status(leader).expect("status"), c.status(behind).expect("status"));
    assert_eq!(a["revision"], b["revision"], "same revision: {a} / {b}");
}

/// 100k puts of distinct keys through `endpoints`, 64 in flight, with a compaction after every
/// 25k; the number of compactions.
async fn write_100k_and_compact(endpoints: Vec<String>) -> usize {
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 25_000;
    const IN_FLIGHT: usize = 64;
    let client = etcd_client::Client::connect(endpoints, None).await.expect("connect");
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|t| {
                let mut kv = client.kv_client();
                tokio::spawn(async move {
                    for i in (t..PER_ROUND).step_by(IN_FLIGHT) {
                        let n = round * PER_ROUND + i;
                        kv.put(format!("big/{n:06}"), format!("value-{n:06}-{}", "x".repeat(40)), None)
                            .await
                            .unwrap_or_else(|e| panic!("put big/{n:06}: {e}"));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer task");
        }
        let mut kv = client.kv_client();
        let rev = kv.get("big/000000", None).await.expect("get").header().expect("header").revision();
        kv.compact(rev, None).await.unwrap_or_else(|e| panic!("compact at {rev}: {e}"));
    }
    ROUNDS
}

/// The openraft example's way, as the README shows it with curl: nodes that wait to be added,
/// `init` on one, `add-learner` for the others, then `change-membership`.
#[test]
fn manual_formation_with_the_admin_api() {
    let mut c = Procs::new(3, CONFIG);
    for id in ALL {
        c.spawn(id, &["--id", &id.to_string(), "--initial-cluster-state", "existing"]);
    }
    for id in ALL {
        let client = c.client(id);
        wait_until(&format!("node {id} answers, not ready: it is in no cluster yet"), DEADLINE, || {
            match procs::http(&client, "GET", "/ready", b"", Duration::from_secs(2))? {
                (503, _) => Ok(()),
                (code, body) => Err(format!("{code} {body}")),
            }
        });
    }
    let one = c.client(1);
    post_json(&one, "/v1/cluster/init", &serde_json::json!({})).expect("init node 1 alone");
    c.wait_ready(1);
    for id in [2, 3] {
        let learner =
            serde_json::json!({"id": id, "peer_addr": c.node(id).peer, "client_addr": c.client(id)});
        post_json(&one, "/v1/cluster/add-learner", &learner).expect("add a learner");
    }
    let members = post_json(&one, "/v1/cluster/change-membership", &serde_json::json!({"voters": [1, 2, 3]}))
        .expect("make all three voters");
    let voters: Vec<u64> = members["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["voter"] == true)
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert_eq!(voters, ALL, "{members}");
    for id in ALL {
        c.wait_ready(id);
    }
    let load = Load::start(c.clients(ALL), 2, "w/");
    load.wait_more(50, DEADLINE);
    let report = load.stop();
    report.assert_no_failures();
    let leader = c.wait_leader(&ALL, DEADLINE);
    for id in ALL {
        c.wait_caught_up(id, leader);
        assert_all_present(&c, id, "w/", &report.acked, true);
    }
}
