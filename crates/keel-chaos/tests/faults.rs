//! The short fault suite CI runs: each nemesis for 30 s against 3 real keeld processes in network
//! namespaces (root), one mixed run, the same workload against etcd (the harness must find no
//! violation in a known-good system), and the negative controls (planted bugs must be caught).
//! Every run also has its watchers (`--watchers`, 4 by default) checked against etcd's watch
//! guarantees. The lock runs add lock and lease clients, checked by `keel-check lock` (mutual
//! exclusion, tokens, fencing, lease expiry neither early nor late), on keeld and on etcd.
//! Each test runs the `keel-chaos` binary and fails with its output, which names the failing
//! history. Every test uses its own network id, so they can run in parallel.

use std::path::PathBuf;
use std::process::Command;

const DURATION: &str = "30";

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel-chaos"))
        .parent()
        .expect("the binary lives in a directory")
        .to_path_buf()
}

/// Runs `keel-chaos ARGS`; returns its exit code and output.
fn chaos(net_id: u8, args: &[&str]) -> (i32, String) {
    let out_dir = target_dir().join("chaos-tests").join(format!("net{net_id}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(env!("CARGO_BIN_EXE_keel-chaos"))
        .args(args)
        .args(["--net-id", &net_id.to_string(), "--duration", DURATION, "--seed", &seed().to_string()])
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("run keel-chaos");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `KEEL_CHAOS_SEED` replays a run; otherwise a fresh seed each time (printed in the output).
fn seed() -> u64 {
    std::env::var("KEEL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

fn passes(net_id: u8, args: &[&str]) {
    let (code, text) = chaos(net_id, args);
    println!("{text}");
    assert_eq!(code, 0, "keel-chaos {args:?} found a problem or could not run (exit {code}):\n{text}");
    assert!(text.contains("LINEARIZABLE"), "no verdict in the output:\n{text}");
}

/// Keel's watchers also request progress notifications, which must be held back until a watcher
/// has caught up (the etcd run cannot: etcd 3.4.23 answers them at once, its bug #15220, which the
/// watch check finds).
fn keel_run(net_id: u8, nemesis: &str) {
    passes(net_id, &["run", "--nemesis", nemesis, "--watch-progress-every", "0.5"]);
}

#[test]
fn kill_random() {
    keel_run(11, "kill-random");
}

#[test]
fn kill_leader() {
    keel_run(12, "kill-leader");
}

#[test]
fn kill_majority() {
    keel_run(13, "kill-majority");
}

#[test]
fn kill_all() {
    keel_run(25, "kill-all");
}

#[test]
fn pause() {
    keel_run(14, "pause");
}

#[test]
fn partition_leader() {
    keel_run(15, "partition-leader");
}

#[test]
fn partition_halves() {
    keel_run(16, "partition-halves");
}

#[test]
fn partition_bridge() {
    keel_run(17, "partition-bridge");
}

#[test]
fn partition_one_way() {
    keel_run(18, "partition-one-way");
}

#[test]
fn lossy() {
    keel_run(24, "lossy");
}

#[test]
fn latency() {
    keel_run(26, "latency");
}

#[test]
fn membership() {
    keel_run(19, "membership");
}

#[test]
fn mixed() {
    keel_run(20, "mixed");
}

#[test]
fn etcd_mixed_has_no_violation() {
    passes(21, &["--system", "etcd", "run", "--nemesis", "mixed"]);
}

/// The lock and lease clients beside a lighter register load (the lock check is the point here).
const LOCK_ARGS: [&str; 10] =
    ["--lock-clients", "4", "--lease-clients", "2", "--clients", "2", "--rate", "50", "--watchers", "0"];

/// A run with lock and lease clients: it must pass, and its lock check must have judged
/// something (a run whose lock or lease clients got nowhere fails by itself; the summary line says
/// so too).
fn lock_run(net_id: u8, system: &str, nemesis: &str) {
    let mut args = vec!["--system", system];
    args.extend(LOCK_ARGS);
    args.extend(["run", "--nemesis", nemesis]);
    let (code, text) = chaos(net_id, &args);
    println!("{text}");
    assert_eq!(code, 0, "keel-chaos {args:?} found a problem or could not run (exit {code}):\n{text}");
    let line = text.lines().find(|l| l.contains("; locks: ")).unwrap_or_default();
    assert!(line.contains(" 0 violations") && !line.contains("IDLE"), "lock check: {line:?}\n{text}");
}

#[test]
fn locks_without_faults() {
    lock_run(28, "keel", "none");
}

#[test]
fn locks_kill_leader() {
    lock_run(29, "keel", "kill-leader");
}

#[test]
fn locks_pause() {
    lock_run(30, "keel", "pause");
}

#[test]
fn locks_partition_leader() {
    lock_run(31, "keel", "partition-leader");
}

#[test]
fn locks_kill_all() {
    lock_run(32, "keel", "kill-all");
}

/// Not `pause`: etcd 3.4.23 revokes leases early there, its bug #15247 (a leader stopped while
/// leases ran out revokes them once it runs again, after another leader acknowledged
/// keep-alives; fixed by etcd #16822), which the lock check finds (`docs/lock-check.md`).
#[test]
fn etcd_locks_kill_leader_have_no_violation() {
    lock_run(33, "etcd", "kill-leader");
}

#[test]
fn etcd_locks_partition_leader_have_no_violation() {
    lock_run(34, "etcd", "partition-leader");
}

fn caught(net_id: u8, fault: &str) {
    caught_with(net_id, fault, &[], "3");
}

fn caught_with(net_id: u8, fault: &str, extra: &[&str], max_runs: &str) {
    let mut args = extra.to_vec();
    args.extend(["negative", "--fault", fault, "--max-runs", max_runs]);
    let (code, text) = chaos(net_id, &args);
    println!("{text}");
    assert_eq!(code, 0, "planted bug {fault} was not caught (exit {code}):\n{text}");
    assert!(text.contains("caught in run"), "{text}");
}

#[test]
fn negative_control_stale_reads_is_caught() {
    caught(22, "stale-reads");
}

#[test]
fn negative_control_ack_before_fsync_is_caught() {
    caught(23, "ack-before-fsync");
}

#[test]
fn negative_control_watch_drop_event_is_caught() {
    // Caught by the watch check only: `keel-chaos negative` does not count other findings.
    caught(27, "watch-drop-event");
}

#[test]
fn negative_control_lease_early_expiry_is_caught() {
    // Caught by the lock check only: `keel-chaos negative` does not count other findings. Under
    // kill-leader every new leader gives the leases their whole TTL again, which hides the bug in
    // some runs (caught in 5 of 6 single runs measured): up to 5 runs.
    caught_with(35, "lease-early-expiry", &LOCK_ARGS, "5");
}
