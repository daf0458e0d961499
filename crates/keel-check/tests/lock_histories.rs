//! The lock checker on hand-built histories: a good one passes; each bad one is the good one (or a
//! small variant) with one thing broken, and must be reported under its rule with the records that
//! show it; and what cannot be decided (unknown outcomes, unanswered keep-alives) is never counted
//! against the service. Also the `keel-check lock` binary: summary output and exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

use keel_check::lock::{
    check_lock, Acquire, Attach, FaultRecord, Fenced, Finding, FloorBy, GoneBy, Grant, Keepalive,
    KeepaliveOutcome, LockHistory, LockRecord, LockReport, LockVerdict, Probe, Release, Revoke, Rule, Stop,
};
use keel_check::Outcome;

const S: u64 = 1_000_000;
const MS: u64 = 1000;

// ---- terse constructors -----------------------------------------------------------------------

fn grant(client: u64, lease: i64, ttl: i64, sent: u64) -> LockRecord {
    LockRecord::Grant(Grant { client, lease, ttl, sent_us: sent, at_us: sent + MS })
}
fn ka(client: u64, lease: i64, sent: u64, outcome: KeepaliveOutcome) -> LockRecord {
    let ttl = (outcome == KeepaliveOutcome::Ok).then_some(3);
    let at = if outcome == KeepaliveOutcome::Unknown { sent + S } else { sent + MS };
    LockRecord::Keepalive(Keepalive { client, lease, sent_us: sent, at_us: at, outcome, ttl })
}
fn acquire(client: u64, lease: i64, token: i64, sent: u64, at: u64) -> LockRecord {
    LockRecord::Acquire(Acquire {
        client,
        lock: "L".into(),
        lease,
        key: format!("L/{lease:x}"),
        token,
        sent_us: sent,
        at_us: at,
    })
}
fn fenced(client: u64, token: i64, sent: u64, outcome: Outcome, revision: Option<i64>) -> LockRecord {
    LockRecord::Fenced(Fenced {
        client,
        lock: "L".into(),
        token,
        resource: "R".into(),
        value: format!("c{client}-{sent}"),
        sent_us: sent,
        at_us: sent + MS,
        outcome,
        revision,
    })
}
fn release(client: u64, token: i64, sent: u64, revision: Option<i64>) -> LockRecord {
    let outcome = if revision.is_some() { Outcome::Ok } else { Outcome::Unknown };
    LockRecord::Release(Release {
        client,
        lock: "L".into(),
        token,
        sent_us: sent,
        at_us: sent + MS,
        outcome,
        revision,
    })
}
fn revoke(client: u64, lease: i64, sent: u64) -> LockRecord {
    LockRecord::Revoke(Revoke { client, lease, sent_us: sent, at_us: sent + MS, outcome: Outcome::Ok })
}
fn attach(client: u64, lease: i64, key: &str, sent: u64) -> LockRecord {
    LockRecord::Attach(Attach {
        client,
        lease,
        key: key.into(),
        sent_us: sent,
        at_us: sent + MS,
        revision: 5,
    })
}
fn probe(client: u64, lease: i64, key: &str, sent: u64, present: bool) -> LockRecord {
    LockRecord::Probe(Probe { client, lease, key: key.into(), sent_us: sent, at_us: sent + MS, present })
}
fn stop(client: u64, lease: i64, at: u64) -> LockRecord {
    LockRecord::Stop(Stop { client, lease, at_us: at })
}
fn fault(at: u64) -> LockRecord {
    LockRecord::Fault(FaultRecord { at_us: at, what: "kill -9 leader".into() })
}
fn heal(at: u64) -> LockRecord {
    LockRecord::Heal(FaultRecord { at_us: at, what: "restart".into() })
}

fn check(records: Vec<LockRecord>) -> LockReport {
    check_lock(&LockHistory { records }).expect("a valid history")
}

fn rules(report: &LockReport) -> Vec<Rule> {
    report.violations.iter().map(|v| v.rule).collect()
}

/// Two clients take lock L in turn with 3 s leases kept alive every second, each writing to R
/// through its fence; the first releases, the second walks away and lets its lease expire.
fn good() -> Vec<LockRecord> {
    vec![
        grant(1, 0xa, 3, 0),
        grant(2, 0xb, 3, 100 * MS),
        acquire(1, 0xa, 10, 10 * MS, 20 * MS),
        // Client 2 created its key (token 11) and waits.
        ka(1, 0xa, S, KeepaliveOutcome::Ok),
        ka(2, 0xb, S, KeepaliveOutcome::Ok),
        fenced(1, 10, S + 100 * MS, Outcome::Ok, Some(12)),
        fenced(1, 10, S + 300 * MS, Outcome::Ok, Some(13)),
        release(1, 10, S + 500 * MS, Some(14)),
        revoke(1, 0xa, S + 600 * MS),
        acquire(2, 0xb, 11, 110 * MS, S + 520 * MS),
        fenced(2, 11, S + 600 * MS, Outcome::Ok, Some(15)),
        ka(2, 0xb, 2 * S, KeepaliveOutcome::Ok),
        fenced(2, 11, 2 * S + 100 * MS, Outcome::Ok, Some(16)),
        stop(2, 0xb, 2 * S + 200 * MS),
    ]
}

#[test]
fn a_good_history_passes() {
    let report = check(good());
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    assert_eq!(report.summary.acquisitions, 2);
    assert_eq!(report.summary.fenced_ok, 4);
}

#[test]
fn validities_that_only_touch_do_not_overlap() {
    // Client 1's lease floor is exactly when client 2 acquires (grant sent at 0, TTL 3 s).
    let report = check(vec![
        grant(1, 0xa, 3, 0),
        grant(2, 0xb, 3, 10 * MS),
        acquire(1, 0xa, 10, MS, 2 * MS),
        acquire(2, 0xb, 11, 20 * MS, 3 * S),
    ]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
}

#[test]
fn a_lease_that_expired_early_lets_two_hold_the_lock() {
    // Client 1's keep-alive sent at 1 s was acknowledged (valid until 4 s), yet client 2 acquired at
    // 2.5 s: client 1's key was deleted before its lease could expire.
    let report = check(vec![
        grant(1, 0xa, 3, 0),
        grant(2, 0xb, 3, 100 * MS),
        acquire(1, 0xa, 10, 10 * MS, 20 * MS),
        ka(1, 0xa, S, KeepaliveOutcome::Ok),
        ka(2, 0xb, S, KeepaliveOutcome::Ok),
        acquire(2, 0xb, 11, 110 * MS, 2500 * MS),
    ]);
    assert_eq!(rules(&report), vec![Rule::MutualExclusion], "{report}");
    let v = &report.violations[0];
    let Finding::Overlap { holder, other, from_us, to_us } = &v.finding else { panic!("{v}") };
    assert_eq!((holder.client, other.client), (2, 1));
    assert_eq!((*from_us, *to_us), (2500 * MS, 4 * S));
    assert_eq!(v.record, 5, "{v}");
    assert!(v.to_string().contains("last acknowledged keep-alive sent + TTL (record #3)"), "{v}");
}

#[test]
fn a_lock_granted_to_two_is_caught_even_with_leases_that_never_expire() {
    let mut h = good();
    // Client 2 acquires while client 1 still holds (before its release was sent).
    h[9] = acquire(2, 0xb, 11, 110 * MS, S + 200 * MS);
    let report = check(h);
    assert!(rules(&report).contains(&Rule::MutualExclusion), "{report}");
}

#[test]
fn an_unanswered_keep_alive_extends_nothing_and_counts_against_nothing() {
    // As the early-expiry case, but client 1's keep-alive got no answer: its validity ended at 3 s,
    // and client 2 acquiring at 3.5 s is fine.
    let report = check(vec![
        grant(1, 0xa, 3, 0),
        grant(2, 0xb, 3, 100 * MS),
        acquire(1, 0xa, 10, 10 * MS, 20 * MS),
        ka(1, 0xa, S, KeepaliveOutcome::Unknown),
        ka(2, 0xb, S, KeepaliveOutcome::Ok),
        acquire(2, 0xb, 11, 110 * MS, 3500 * MS),
        fenced(1, 10, 3400 * MS, Outcome::Unknown, None),
    ]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    assert_eq!((report.summary.keepalives_unknown, report.summary.fenced_unknown), (1, 1));
    assert!(report.to_string().contains("not decided: "), "{report}");
}

#[test]
fn a_token_given_twice_is_caught() {
    let mut h = good();
    h[9] = acquire(2, 0xb, 10, 110 * MS, S + 520 * MS);
    h[10] = fenced(2, 10, S + 600 * MS, Outcome::Ok, Some(15));
    h[12] = fenced(2, 10, 2 * S + 100 * MS, Outcome::Ok, Some(16));
    let report = check(h);
    let reused: Vec<_> =
        report.violations.iter().filter(|v| matches!(v.finding, Finding::TokenReused { .. })).collect();
    assert_eq!(reused.len(), 1, "{report}");
    assert_eq!((reused[0].client, reused[0].record), (2, 9));
}

#[test]
fn tokens_must_grow_in_acquisition_order() {
    // Client 2 asked for the lock at 2 s, after client 1 had acquired with token 20, and got 15.
    let report = check(vec![
        grant(1, 0xa, 3, 0),
        grant(2, 0xb, 3, 0),
        acquire(1, 0xa, 20, 10 * MS, 20 * MS),
        release(1, 20, 500 * MS, Some(21)),
        acquire(2, 0xb, 15, 2 * S, 2100 * MS),
    ]);
    assert_eq!(rules(&report), vec![Rule::Tokens], "{report}");
    assert!(matches!(
        report.violations[0].finding,
        Finding::TokenOutOfOrder { other_token: 20, token: 15, .. }
    ));
    // Concurrent acquisitions may come in either order.
    let report = check(vec![
        grant(1, 0xa, 3, 0),
        grant(2, 0xb, 3, 0),
        acquire(1, 0xa, 20, 10 * MS, 20 * MS),
        release(1, 20, 500 * MS, Some(21)),
        acquire(2, 0xb, 15, 15 * MS, 2100 * MS),
    ]);
    assert!(!rules(&report).contains(&Rule::Tokens), "{report}");
}

#[test]
fn fenced_writes_out_of_token_order_are_caught() {
    let mut h = good();
    // Client 1's write (token 10) lands after client 2's (token 11).
    h[6] = fenced(1, 10, S + 300 * MS, Outcome::Ok, Some(17));
    let report = check(h);
    let found: Vec<_> =
        report.violations.iter().filter(|v| matches!(v.finding, Finding::FenceOutOfOrder { .. })).collect();
    assert!(!found.is_empty(), "{report}");
    assert!(found.iter().all(|v| v.record == 6), "{report}");
}

#[test]
fn a_fenced_write_after_a_successor_acquired_is_caught() {
    let mut h = good();
    // Client 1's release was in doubt, and a write it sent after client 2 acquired succeeded.
    h[7] = release(1, 10, S + 500 * MS, None);
    h.push(fenced(1, 10, S + 700 * MS, Outcome::Ok, Some(18)));
    let report = check(h);
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v.finding, Finding::FenceAfterSuccessor { successor_token: 11, .. })),
        "{report}"
    );
}

#[test]
fn a_fenced_write_after_its_own_release_is_caught() {
    let mut h = good();
    // Sent before the release, but applied after it (revision 15 > 14): the key was already gone.
    h[6] = fenced(1, 10, S + 300 * MS, Outcome::Ok, Some(15));
    h[10] = fenced(2, 11, S + 600 * MS, Outcome::Ok, Some(17));
    h[12] = fenced(2, 11, 2 * S + 100 * MS, Outcome::Ok, Some(18));
    let report = check(h);
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v.finding, Finding::FenceAfterRelease { release_revision: 14, .. })),
        "{report}"
    );
}

#[test]
fn a_lease_seen_gone_before_its_floor_is_caught_three_ways() {
    let base = || {
        vec![
            grant(1, 0xa, 3, 0),
            acquire(1, 0xa, 10, 10 * MS, 20 * MS),
            ka(1, 0xa, S, KeepaliveOutcome::Ok),
            grant(3, 0xc, 3, 0),
            attach(3, 0xc, "t/1", 10 * MS),
            ka(3, 0xc, S, KeepaliveOutcome::Ok),
        ]
    };
    // A keep-alive answered "gone" at 2 s, though the one sent at 1 s was acknowledged.
    let mut h = base();
    h.push(ka(1, 0xa, 2 * S, KeepaliveOutcome::Gone));
    let report = check(h);
    assert_eq!(rules(&report), vec![Rule::EarlyExpiry], "{report}");
    assert!(
        matches!(&report.violations[0].finding, Finding::GoneEarly { by: GoneBy::Keepalive, floor_us, .. } if *floor_us == 4 * S)
    );
    // The attached key read absent at 3.5 s.
    let mut h = base();
    h.push(stop(3, 0xc, 2 * S));
    h.push(probe(3, 0xc, "t/1", 3500 * MS, false));
    let report = check(h);
    assert_eq!(rules(&report), vec![Rule::EarlyExpiry], "{report}");
    assert!(matches!(&report.violations[0].finding, Finding::GoneEarly { by: GoneBy::Probe { .. }, .. }));
    // A fenced write of the holder refused at 2 s: its lock key was gone.
    let mut h = base();
    h.push(fenced(1, 10, 2 * S, Outcome::Fail, None));
    let report = check(h);
    assert_eq!(rules(&report), vec![Rule::EarlyExpiry], "{report}");
    assert!(matches!(&report.violations[0].finding, Finding::GoneEarly { by: GoneBy::Fenced { .. }, .. }));
    // A revoke the client sent only after seeing the lease gone excuses nothing, and the report
    // names the keep-alive that set the floor.
    let mut h = base();
    h.push(ka(1, 0xa, 2 * S, KeepaliveOutcome::Gone));
    h.push(revoke(1, 0xa, 2100 * MS));
    let report = check(h);
    assert_eq!(rules(&report), vec![Rule::EarlyExpiry], "{report}");
    assert!(matches!(
        &report.violations[0].finding,
        Finding::GoneEarly { floor_by: FloorBy::Keepalive { record: 2 }, floor_us, .. } if *floor_us == 4 * S
    ));
    // None of these after the floor, or after the holder's own release or revoke, is a violation.
    let mut h = base();
    h.push(ka(1, 0xa, 4100 * MS, KeepaliveOutcome::Gone));
    h.push(stop(3, 0xc, 2 * S));
    h.push(probe(3, 0xc, "t/1", 4100 * MS, false));
    h.push(release(1, 10, 1500 * MS, Some(20)));
    h.push(fenced(1, 10, 1600 * MS, Outcome::Fail, None));
    let report = check(h);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    let mut h = base();
    h.push(revoke(1, 0xa, 1900 * MS));
    h.push(ka(1, 0xa, 2 * S, KeepaliveOutcome::Gone));
    let report = check(h);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    // A probe sent before the put was acknowledged says nothing.
    let report =
        check(vec![grant(3, 0xc, 3, 0), attach(3, 0xc, "t/1", 10 * MS), probe(3, 0xc, "t/1", 5 * MS, false)]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
}

/// A lease kept alive until 1 s (TTL 3 s) then stopped; its key read at `reads` (sent times, all
/// present but the last if `last_absent`). Default bounds: grace 2 s, so the deadline is
/// 1.001 + 3 + 2 s.
fn stopped_reads(reads: &[u64], last_absent: bool, extra: Vec<LockRecord>) -> LockReport {
    let mut h =
        vec![grant(3, 0xc, 3, 0), attach(3, 0xc, "t/1", 10 * MS), ka(3, 0xc, S, KeepaliveOutcome::Ok)];
    h.push(stop(3, 0xc, S + 10 * MS));
    h.extend(extra);
    for (i, &at) in reads.iter().enumerate() {
        h.push(probe(3, 0xc, "t/1", at, !last_absent || i + 1 < reads.len()));
    }
    check(h)
}

fn stopped(reads: &[u64], extra: Vec<LockRecord>) -> LockReport {
    stopped_reads(reads, true, extra)
}

#[test]
fn a_key_that_outlives_its_lease_is_caught() {
    let report = stopped(&[2 * S, 4 * S, 6100 * MS, 6500 * MS], vec![]);
    assert_eq!(rules(&report), vec![Rule::LateExpiry], "{report}");
    let Finding::Lingered { deadline_us, probe_sent_us, .. } = report.violations[0].finding else { panic!() };
    assert_eq!((deadline_us, probe_sent_us), (6001 * MS, 6100 * MS));
    // Gone in time: fine, and decided.
    let report = stopped(&[2 * S, 4 * S, 5900 * MS], vec![]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    assert_eq!((report.summary.late_expiry_decided, report.summary.late_expiry_undecided), (1, 0));
    // Never read after its deadline: undecided, not a violation.
    let report = stopped_reads(&[2 * S, 4 * S, 5 * S], false, vec![]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    assert_eq!(report.summary.late_expiry_undecided, 1);
}

#[test]
fn a_fault_while_the_lease_lives_pushes_its_deadline() {
    // A leader killed at 3 s, the cluster healed at 5 s: the new leader may give the lease its full
    // TTL again plus an election timeout, up to 5 s (recovery) after the heal. Deadline:
    // 5 + 5 + 3 + 1 + 2 = 16 s.
    let report = stopped(&[2 * S, 15 * S, 16500 * MS], vec![fault(3 * S), heal(5 * S)]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    let report = stopped(&[2 * S, 16100 * MS, 16500 * MS], vec![fault(3 * S), heal(5 * S)]);
    assert_eq!(rules(&report), vec![Rule::LateExpiry], "{report}");
    // A fault that starts after the deadline changes nothing.
    let report = stopped(&[2 * S, 6100 * MS, 16500 * MS], vec![fault(7 * S), heal(9 * S)]);
    assert_eq!(rules(&report), vec![Rule::LateExpiry], "{report}");
    // A fault never healed: undecided.
    let report = stopped(&[2 * S, 30 * S], vec![fault(3 * S)]);
    assert_eq!(report.verdict, LockVerdict::Valid, "{report}");
    assert_eq!(report.summary.late_expiry_undecided, 1);
}

// ---- the binary --------------------------------------------------------------------------------

fn file(name: &str, records: Vec<LockRecord>) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keel-check-lock");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join(name);
    let mut bytes = Vec::new();
    LockHistory { records }.write_to(&mut bytes).expect("in memory");
    std::fs::write(&path, bytes).expect("scratch file");
    path
}

fn keel_check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-check")).args(args).output().expect("runs")
}

#[test]
fn the_binary_exits_0_on_a_good_history_and_1_on_a_bad_one() {
    let ok = file("good.jsonl", good());
    let out = keel_check(&["lock", ok.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["leases: 2 by 2 clients", "acquisitions 2", "violations: none", "verdict: LOCKS VALID"] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let mut h = good();
    h[9] = acquire(2, 0xb, 11, 110 * MS, S + 200 * MS);
    let bad = file("bad.jsonl", h);
    let out = keel_check(&["lock", bad.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("mutual_exclusion: lock \"L\""), "{stdout}");
    assert!(stdout.contains("verdict: LOCKS INVALID"), "{stdout}");
    let out = keel_check(&["lock", "--json", bad.to_str().expect("utf-8 path")]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(json["verdict"], "invalid");
    assert_eq!(json["violations"][0]["rule"], "mutual_exclusion");
}

#[test]
fn the_binary_exits_2_on_a_bad_line_and_names_it() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("keel-check-lock");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("broken.jsonl");
    std::fs::write(&path, "{\"kind\":\"stop\",\"client\":1,\"lease\":9,\"at_us\":5}\n")
        .expect("scratch file");
    let out = keel_check(&["lock", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1") && stderr.contains("lease 9"), "{stderr}");
}
