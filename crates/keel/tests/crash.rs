//! Crash loop: a child process proposes and prints every acknowledged command; the test SIGKILLs it
//! at random points, restarts it on the same data dir, and checks after every crash that each
//! acknowledged command is applied exactly once, at the position its reply named, and that the
//! ledger only ever grows (nothing applied is lost or reordered).
//!
//! Replay a failing run with `KEEL_CRASH_SEED=<seed printed on failure>`.

mod support;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::io::BufReader;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use keel::InProcessRouter;
use keel::Node;
use keel::NodeInfo;
use rand::Rng;
use rand::SeedableRng;
use support::check_ledger;
use support::read_ledger;
use support::test_config;
use support::Append;
use support::Ledger;
use support::WAIT;

const ENV_DIR: &str = "KEEL_CRASH_DIR";
const ENV_START: &str = "KEEL_CRASH_START";

fn crash_config(dir: &std::path::Path) -> keel::Config {
    let mut c = test_config(1, dir);
    // Snapshot and purge often, so crashes land inside snapshot builds and log purges too.
    c.raft.snapshot_every = 64;
    c.raft.logs_to_keep_after_snapshot = 16;
    c
}

async fn open_single(dir: &std::path::Path) -> Node<Ledger> {
    let router = InProcessRouter::new();
    let node = Node::start(crash_config(dir), Ledger, router.network(1)).await.expect("node starts");
    router.register(1, node.service());
    if !node.raft().is_initialized().await.expect("running") {
        node.initialize([(1, NodeInfo::default())].into()).await.expect("initialize");
    }
    node.wait_for_leader(WAIT, None).await.expect("leader");
    node
}

/// The child: not a test on its own (ignored), run by `crash_loop` with its environment set.
#[test]
#[ignore = "run as a child process by crash_loop_keeps_every_acknowledged_command"]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else { return };
    let start: u64 = std::env::var(ENV_START).expect("start id").parse().expect("number");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let node = Arc::new(open_single(std::path::Path::new(&dir)).await);
        println!("ready");
        let next = Arc::new(AtomicU64::new(start));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (node, next) = (node.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                // Bounded: the parent normally kills us long before this.
                for _ in 0..20_000 {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let seq = node.propose(Append(id)).await.expect("propose on a single node");
                    println!("ack {id} {seq}");
                }
            }));
        }
        for t in tasks {
            t.await.expect("proposer task");
        }
    });
}

fn spawn_child(dir: &std::path::Path, start: u64) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ENV_DIR, dir)
        .env(ENV_START, start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child")
}

#[test]
fn crash_loop_keeps_every_acknowledged_command() {
    support::init_tracing();
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let iterations: u64 =
        std::env::var("KEEL_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    eprintln!("crash loop: seed {seed}, {iterations} iterations (replay with KEEL_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");

    let mut acked: BTreeMap<u64, u64> = BTreeMap::new(); // id -> seq
    let mut prev_rows: Vec<u64> = Vec::new();
    let mut total_acks = 0u64;
    for iteration in 0..iterations {
        // Disjoint id ranges per run, so an id in the ledger names exactly one proposal.
        let start = (iteration + 1) * 1_000_000;
        let kill_after: u64 = if rng.gen_bool(0.1) { 0 } else { rng.gen_range(1..400) };
        let mut child = spawn_child(dir.path(), start);
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ready = false;
        let mut acks = 0u64;
        while !ready || acks < kill_after {
            let line = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let out = child.wait_with_output().expect("child output");
                    panic!(
                        "iteration {iteration} (seed {seed}): child went silent or died; stderr:\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            };
            if line.ends_with("ready") {
                // libtest prints "test crash_child ... " on the same line first.
                ready = true;
            } else if let Some(rest) = line.strip_prefix("ack ") {
                let mut parts = rest.split(' ').map(|p| p.parse::<u64>().expect("number"));
                let (id, seq) = (parts.next().expect("id"), parts.next().expect("seq"));
                assert!(acked.insert(id, seq).is_none(), "id {id} acknowledged twice");
                acks += 1;
            }
        }
        child.kill().expect("SIGKILL child");
        child.wait().expect("reap child");
        reader.join().expect("reader thread");
        // Lines the child printed before dying but we had not read yet are acknowledged too.
        while let Ok(line) = rx.try_recv() {
            if let Some(rest) = line.strip_prefix("ack ") {
                let mut parts = rest.split(' ').map(|p| p.parse::<u64>().expect("number"));
                let (id, seq) = (parts.next().expect("id"), parts.next().expect("seq"));
                assert!(acked.insert(id, seq).is_none(), "id {id} acknowledged twice");
                acks += 1;
            }
        }
        total_acks += acks;

        // Recover in this process and check the model.
        let rows = rt.block_on(async {
            let node = open_single(dir.path()).await;
            let (rows, count, sum) = node.read(|_, t| read_ledger(t)).await.expect("linearizable read");
            node.shutdown().await.expect("shutdown");
            check_ledger(&rows, count, sum);
            rows
        });
        assert!(
            rows.len() >= prev_rows.len() && rows[..prev_rows.len()] == prev_rows[..],
            "iteration {iteration} (seed {seed}): the ledger lost or reordered applied commands"
        );
        for (&id, &seq) in &acked {
            assert_eq!(
                rows.get(seq as usize),
                Some(&id),
                "iteration {iteration} (seed {seed}): acknowledged command {id} is not at slot {seq}"
            );
        }
        prev_rows = rows;
    }
    eprintln!(
        "crash loop: {iterations} kills, {total_acks} acknowledged commands, ledger of {}",
        prev_rows.len()
    );
    assert!(total_acks > iterations, "the loop must actually acknowledge writes");
}
