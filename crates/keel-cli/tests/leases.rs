//! `keel lease`, `keel put --lease`, `keel lock` and `keel elect`, the real binary against a real
//! three-node keeld cluster (`support/`): what they print, that a lease's keys go with it, that
//! lock holders never overlap and pass the lock on in order with growing fencing tokens, that a
//! killed holder's lock (and command) goes with its lease, and that leadership is handed over
//! and observed.
//!
//! Every wait polls a condition against a deadline (`support::wait_until`); the only timing
//! asserted is a lower bound the lease guarantees (a killed holder's lock is not taken before its
//! lease can have expired).

mod support;

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use support::{keel, leader, wait_until, Cluster};

/// Some voter of nodes 1-3 other than `leader`.
fn a_follower(leader: u64) -> u64 {
    (1..=3).find(|id| *id != leader).expect("three voters")
}

/// The keys under `prefix`, read through `endpoints`.
fn keys_under(endpoints: &str, prefix: &str) -> Vec<String> {
    keel(endpoints, &["get", prefix, "--prefix", "--keys-only"]).ok().lines().map(str::to_owned).collect()
}

/// The lines of a file the commands append to (none yet if it does not exist).
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// `lease 0123456789abcdef granted with TTL(60s)` → the id's hex digits.
#[track_caller]
fn granted_id(line: &str, ttl: u64) -> String {
    let id = line
        .strip_prefix("lease ")
        .and_then(|rest| rest.strip_suffix(&format!(" granted with TTL({ttl}s)\n")))
        .unwrap_or_else(|| panic!("not a grant of TTL {ttl}: {line:?}"));
    assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{line:?}");
    id.to_owned()
}

/// A `keel` that runs on (lock, elect, keep-alive): its output gathered as it comes, its stdin a
/// pipe the test closes when it likes. SIGKILLed and reaped if still running when dropped.
struct Running {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    fn start(endpoints: &str, args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["--endpoints", endpoints])
            .args(args)
            .env_remove("KEEL_ENDPOINTS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run keel");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let readers = vec![gather(out, Arc::clone(&stdout)), gather(err, Arc::clone(&stderr))];
        Running {
            what: format!("keel {}", args.join(" ")),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout gatherer").clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr gatherer").clone()
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits an i32"))
    }

    fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal keel");
    }

    /// Ends the command's input: a `read` in it returns.
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the process to exit; answers its exit code (None: killed by a signal) once all
    /// its output is gathered.
    #[track_caller]
    fn exit(&mut self) -> Option<i32> {
        let what = self.what.clone();
        let status = wait_until(&format!("{what} exits"), || match self.child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err(format!("running; stdout {:?}, stderr {:?}", self.stdout(), self.stderr())),
            Err(e) => panic!("{what}: {e}"),
        });
        // The output pipes close once every process holding them is gone: keel, and the command
        // of a `keel lock`, which must not outlive it.
        wait_until(&format!("{what}'s output closed"), || {
            match self.readers.iter().all(JoinHandle::is_finished) {
                true => Ok(()),
                false => Err(format!("stdout so far {:?}", self.stdout())),
            }
        });
        status.code()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Errors only mean it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gather(mut from: impl std::io::Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock().expect("gathered output").push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

/// grant (chosen and picked ids, a TTL raised to the minimum), list, put --lease with the id in
/// hex and in decimal, ttl --keys, keep-alive --once, put --ignore-lease, revoke (the keys go
/// with the lease), and what each says about a lease that is gone. Through a follower, which
/// forwards keep-alives and TTL reads to the leader.
#[test]
fn lease_commands_print_as_documented() {
    let c = Cluster::start();
    let follower = c.endpoints(&[a_follower(leader(&c.endpoints(&[1, 2, 3])))]);
    let f = follower.as_str();

    assert_eq!(
        keel(f, &["lease", "grant", "60", "--id", "0x2a"]).ok(),
        "lease 000000000000002a granted with TTL(60s)\n"
    );
    let taken = keel(f, &["lease", "grant", "60", "--id", "42"]);
    assert_eq!(taken.code, Some(1), "42 is 0x2a");
    assert!(taken.stderr.ends_with(" (lease_exists)\n"), "{}", taken.stderr);
    let picked = granted_id(&keel(f, &["lease", "grant", "60"]).ok(), 60);

    let list = keel(f, &["lease", "list"]).ok();
    let mut listed: Vec<&str> = list.lines().collect();
    assert_eq!(listed.remove(0), "found 2 leases", "{list}");
    listed.sort_unstable();
    let mut expected = vec!["000000000000002a", picked.as_str()];
    expected.sort_unstable();
    assert_eq!(listed, expected);

    // The same lease, by its hex id (as printed) and by its decimal id (as in JSON).
    assert_eq!(keel(f, &["put", "app/a", "1", "--lease", "000000000000002a"]).ok(), "OK\n");
    assert_eq!(keel(f, &["put", "app/b", "2", "--lease", "42"]).ok(), "OK\n");
    assert_eq!(keel(f, &["put", "app/c", "3"]).ok(), "OK\n");
    let got = keel(f, &["get", "app/a", "--json"]).json();
    assert_eq!(got["kvs"][0]["lease"], json!(42), "{got}");

    let ttl = keel(f, &["lease", "ttl", "2a", "--keys"]).ok();
    let remaining: u64 = ttl
        .strip_prefix("lease 000000000000002a granted with TTL(60s), remaining(")
        .and_then(|rest| rest.strip_suffix("s), attached keys([app/a app/b])\n"))
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("{ttl:?}"));
    assert!((50..=60).contains(&remaining), "{ttl}");
    let ttl = keel(f, &["lease", "ttl", "42", "--keys", "--json"]).json();
    assert_eq!((&ttl["id"], &ttl["granted_ttl"]), (&json!(42), &json!(60)), "{ttl}");
    assert_eq!(ttl["keys"], json!([{"key": "app/a"}, {"key": "app/b"}]));
    assert_eq!(
        keel(f, &["lease", "ttl", "2a"]).ok().split(", remaining").next(),
        Some("lease 000000000000002a granted with TTL(60s)")
    );

    assert_eq!(
        keel(f, &["lease", "keep-alive", "2a", "--once"]).ok(),
        "lease 000000000000002a keepalived with TTL(60)\n"
    );
    assert_eq!(
        keel(f, &["lease", "keep-alive", "0x2a", "--once", "--json"]).json(),
        json!({"id": 42, "ttl": 60})
    );

    // --ignore-lease keeps the key's lease through a new value.
    assert_eq!(keel(f, &["put", "app/a", "1b", "--ignore-lease"]).ok(), "OK\n");
    let got = keel(f, &["get", "app/a", "--json"]).json();
    assert_eq!((&got["kvs"][0]["value"], &got["kvs"][0]["lease"]), (&json!("1b"), &json!(42)), "{got}");

    // Revoking deletes the lease's keys (and only those).
    assert_eq!(keel(f, &["lease", "revoke", "2a"]).ok(), "lease 000000000000002a revoked\n");
    assert_eq!(keys_under(f, "app/"), ["app/c"]);
    assert_eq!(keel(f, &["lease", "ttl", "2a"]).ok(), "lease 000000000000002a already expired\n");
    assert_eq!(
        keel(f, &["lease", "ttl", "2a", "--json"]).json(),
        json!({"id": 42, "ttl": -1, "granted_ttl": 0, "keys": []})
    );
    for args in [
        &["lease", "revoke", "2a"][..],
        &["lease", "keep-alive", "2a", "--once"][..],
        &["put", "app/d", "4", "--lease", "2a"][..],
    ] {
        let run = keel(f, args);
        assert_eq!(run.code, Some(1), "{}", run.command);
        assert!(run.stderr.ends_with(" (lease_not_found)\n"), "{}: {}", run.command, run.stderr);
    }
    assert_eq!(keel(f, &["lease", "list"]).ok(), format!("found 1 leases\n{picked}\n"));

    // A TTL under the cluster's minimum (1.5 election timeouts of 1 s, rounded up) is raised.
    let short = keel(f, &["lease", "grant", "1", "--json"]).json();
    assert_eq!(short["ttl"], json!(2), "{short}");
    assert!(short["id"].is_i64() && short["revision"].is_i64(), "{short}");

    let bad = keel(f, &["lease", "revoke", "xyz"]);
    assert_eq!(bad.code, Some(2), "a malformed id is bad usage");
}

/// `keel lease keep-alive` keeps a short lease (and its key) alive well past its TTL, renewing
/// every third of it, until SIGTERM (exit 0); the key then goes with the lease. A keep-alive
/// whose lease is revoked meanwhile exits 1.
#[test]
fn keep_alive_holds_a_lease_until_stopped() {
    let c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let follower = c.endpoints(&[a_follower(leader(&all))]);

    assert_eq!(
        keel(&all, &["lease", "grant", "2", "--id", "0x2b"]).ok(),
        "lease 000000000000002b granted with TTL(2s)\n"
    );
    let granted = Instant::now();
    assert_eq!(keel(&all, &["put", "session", "up", "--lease", "2b"]).ok(), "OK\n");
    let mut keeping = Running::start(&follower, &["lease", "keep-alive", "2b"]);
    // Ten renewals, a third of the TTL apart: three TTLs.
    wait_until("ten renewals", || match keeping.stdout().lines().count() {
        n if n >= 10 => Ok(()),
        n => Err(format!("{n} so far; stderr {:?}", keeping.stderr())),
    });
    assert!(granted.elapsed() > Duration::from_secs(4), "renewals every third of the TTL");
    assert_eq!(keys_under(&all, "session"), ["session"], "kept past its TTL");
    keeping.signal(Signal::SIGTERM);
    assert_eq!(keeping.exit(), Some(0), "stopped by SIGTERM: {}", keeping.stderr());
    let renewals = keeping.stdout();
    assert!(renewals.lines().all(|l| l == "lease 000000000000002b keepalived with TTL(2)"), "{renewals}");
    wait_until("the key goes with the lease", || match keys_under(&all, "session") {
        keys if keys.is_empty() => Ok(()),
        keys => Err(format!("{keys:?}")),
    });
    assert_eq!(keel(&all, &["lease", "ttl", "2b"]).ok(), "lease 000000000000002b already expired\n");

    assert_eq!(
        keel(&all, &["lease", "grant", "3", "--id", "0x2c"]).ok(),
        "lease 000000000000002c granted with TTL(3s)\n"
    );
    let mut keeping = Running::start(&all, &["lease", "keep-alive", "2c"]);
    wait_until("a first renewal", || match keeping.stdout().lines().count() {
        0 => Err(keeping.stderr()),
        _ => Ok(()),
    });
    keel(&all, &["lease", "revoke", "2c"]).ok();
    assert_eq!(keeping.exit(), Some(1));
    assert!(keeping.stderr().ends_with(" (lease_not_found)\n"), "{}", keeping.stderr());
}

/// Two `keel lock` on one name: the second waits in line while the first's command runs, runs
/// its own once the first is done, and the fencing tokens (each holder key's create revision)
/// grow. Then two loops of `keel lock` race for another lock: their commands never interleave.
#[test]
fn contending_locks_run_their_commands_one_after_the_other() {
    let c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let dir = tempfile::tempdir().expect("temp dir");
    let order = dir.path().join("order");
    let script = |who: &str| {
        format!(
            r#"echo "start {who} $KEEL_LOCK_REVISION $KEEL_LOCK_KEY" >> '{log}'; read line; echo "end {who} $KEEL_LOCK_REVISION" >> '{log}'"#,
            log = order.display()
        )
    };
    let script_a = script("a");
    let mut a = Running::start(&all, &["lock", "job", "--", "sh", "-c", &script_a]);
    wait_until("a runs its command", || match lines_of(&order).len() {
        1 => Ok(()),
        _ => Err(a.stderr()),
    });
    let script_b = script("b");
    let mut b = Running::start(&c.endpoints(&[2, 3, 1]), &["lock", "job", "--", "sh", "-c", &script_b]);
    wait_until("b waits in line", || match keys_under(&all, "job/").len() {
        2 => Ok(()),
        _ => Err(b.stderr()),
    });
    let started = lines_of(&order);
    assert_eq!(started.len(), 1, "b waits while a holds the lock: {started:?}");
    let fields: Vec<&str> = started[0].split(' ').collect();
    let (token_a, key_a) = (fields[2].to_owned(), fields[3].to_owned());
    assert!(key_a.starts_with("job/"), "{started:?}");
    let held = keel(&all, &["get", &key_a, "--json"]).json();
    assert_eq!(
        held["kvs"][0]["create_revision"].to_string(),
        token_a,
        "the token is the key's create revision: {held}"
    );

    a.close_stdin();
    assert_eq!(a.exit(), Some(0), "{}", a.stderr());
    wait_until("b runs its command", || match lines_of(&order).len() {
        3 => Ok(()),
        _ => Err(b.stderr()),
    });
    b.close_stdin();
    assert_eq!(b.exit(), Some(0), "{}", b.stderr());
    let lines = lines_of(&order);
    let (start_b, end_b) = (lines[2].split(' ').collect::<Vec<_>>(), lines[3].split(' ').collect::<Vec<_>>());
    assert_eq!(lines[1], format!("end a {token_a}"));
    assert_eq!(
        (start_b[0], start_b[1], end_b[..2].join(" ")),
        ("start", "b", "end b".to_owned()),
        "{lines:?}"
    );
    assert_eq!(start_b[2], end_b[2]);
    let (ta, tb): (i64, i64) = (token_a.parse().expect("a number"), start_b[2].parse().expect("a number"));
    assert!(tb > ta, "tokens grow: {lines:?}");
    assert_ne!(start_b[3], key_a);
    // Released, and the leases revoked: nothing left.
    assert!(keys_under(&all, "job/").is_empty());
    assert_eq!(keel(&all, &["lease", "list"]).ok(), "found 0 leases\n");

    // keel exits with the command's status.
    let failed = keel(&all, &["lock", "job", "--", "sh", "-c", "exit 7"]);
    assert_eq!((failed.code, failed.stderr.as_str()), (Some(7), ""));

    // Two loops race: every command's start and end are adjacent, tokens grow.
    let race = dir.path().join("race");
    let racer = format!(
        r#"echo "start $KEEL_LOCK_REVISION" >> '{log}'; echo "end $KEEL_LOCK_REVISION" >> '{log}'"#,
        log = race.display()
    );
    let loops: Vec<JoinHandle<Vec<Option<i32>>>> = [c.endpoints(&[1, 2, 3]), c.endpoints(&[3, 2, 1])]
        .into_iter()
        .map(|endpoints| {
            let racer = racer.clone();
            std::thread::spawn(move || {
                (0..5).map(|_| keel(&endpoints, &["lock", "race", "--", "sh", "-c", &racer]).code).collect()
            })
        })
        .collect();
    for racing in loops {
        assert_eq!(racing.join().expect("racing loop"), [Some(0); 5]);
    }
    let lines = lines_of(&race);
    assert_eq!(lines.len(), 20, "{lines:?}");
    let mut last = 0;
    for pair in lines.chunks(2) {
        let token: i64 = pair[0].strip_prefix("start ").and_then(|t| t.parse().ok()).expect("a start line");
        assert_eq!(pair[1], format!("end {token}"), "no overlap: {lines:?}");
        assert!(token > last, "tokens grow: {lines:?}");
        last = token;
    }
}

/// A holder SIGKILLed while its command runs: the command dies with it (SIGTERM from the kernel),
/// and the waiter gets the lock once the holder's lease has expired, not before.
#[test]
fn a_killed_holders_lock_passes_to_the_waiter_after_its_ttl() {
    let c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let dir = tempfile::tempdir().expect("temp dir");
    let order = dir.path().join("order");
    let log = order.display();
    let hold =
        format!(r#"echo "start a $$ $KEEL_LOCK_REVISION" >> '{log}'; read line; echo "end a" >> '{log}'"#);
    let mut a = Running::start(&all, &["lock", "job", "--ttl", "2", "--", "sh", "-c", &hold]);
    wait_until("a runs its command", || match lines_of(&order).len() {
        1 => Ok(()),
        _ => Err(a.stderr()),
    });
    let take = format!(r#"echo "start b $KEEL_LOCK_REVISION" >> '{log}'"#);
    let mut b = Running::start(&all, &["lock", "job", "--ttl", "2", "--", "sh", "-c", &take]);
    wait_until("b waits in line", || match keys_under(&all, "job/").len() {
        2 => Ok(()),
        _ => Err(b.stderr()),
    });

    let killed = Instant::now();
    a.signal(Signal::SIGKILL);
    assert_eq!(a.exit(), None, "killed");
    wait_until("b runs its command", || match lines_of(&order).len() {
        2 => Ok(()),
        _ => Err(b.stderr()),
    });
    let waited = killed.elapsed();
    // a's last keep-alive went at most a third of the TTL before the kill, and the lease lives a
    // TTL (2 s) after it was received: not before 1.33 s.
    assert!(
        waited >= Duration::from_millis(1200),
        "the lock passed after {waited:?}, before the lease could expire"
    );
    assert_eq!(b.exit(), Some(0), "{}", b.stderr());

    let lines = lines_of(&order);
    let a_fields: Vec<&str> = lines[0].split(' ').collect();
    let b_fields: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(
        (a_fields[0], a_fields[1], b_fields[0], b_fields[1]),
        ("start", "a", "start", "b"),
        "{lines:?}"
    );
    let (ta, tb): (i64, i64) =
        (a_fields[3].parse().expect("a number"), b_fields[2].parse().expect("a number"));
    assert!(tb > ta, "tokens grow: {lines:?}");
    // a's command got SIGTERM when a died: it never finished, and it is gone (or a zombie no one
    // has reaped yet, where the test runs without an init that reaps).
    let stat = format!("/proc/{}/stat", a_fields[2]);
    wait_until("a's command is gone", || match std::fs::read_to_string(&stat) {
        Err(_) => Ok(()),
        Ok(s) if s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => Ok(()),
        Ok(s) => Err(s),
    });
    assert_eq!(lines.len(), 2, "a's command never finished: {lines:?}");
    assert!(keys_under(&all, "job/").is_empty());
}

/// Two `keel elect` on one election and a `keel elect -l`: the first leads, the second waits; when
/// the first is stopped (SIGTERM: it resigns) the second leads, and the listener prints both
/// leaders in turn.
#[test]
fn elect_hands_leadership_over_and_listeners_see_it() {
    let c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let follower = c.endpoints(&[a_follower(leader(&all))]);
    let listener = Running::start(&follower, &["elect", "-l", "chief"]);

    let mut a = Running::start(&all, &["elect", "chief", "alpha"]);
    let key_a = wait_until("a leads", || match a.stdout().split_once('\n') {
        Some((key, "alpha\n")) => Ok(key.to_owned()),
        _ => Err(format!("{:?} {:?}", a.stdout(), a.stderr())),
    });
    assert!(key_a.starts_with("chief/"), "{key_a}");
    let mut b = Running::start(&follower, &["elect", "chief", "beta"]);
    wait_until("b waits in line", || match keys_under(&all, "chief/").len() {
        2 => Ok(()),
        _ => Err(b.stderr()),
    });
    assert_eq!(b.stdout(), "", "b does not lead while a does");
    let leader = keel(&all, &["get", &key_a, "--json"]).json();
    assert_eq!(leader["kvs"][0]["value"], json!("alpha"));
    wait_until("the listener shows a", || match listener.stdout() {
        out if out == format!("{key_a}\nalpha\n") => Ok(()),
        out => Err(format!("{out:?} {:?}", listener.stderr())),
    });

    a.signal(Signal::SIGTERM);
    assert_eq!(a.exit(), Some(0), "a resigns and exits: {}", a.stderr());
    let key_b = wait_until("b leads", || match b.stdout().split_once('\n') {
        Some((key, "beta\n")) => Ok(key.to_owned()),
        _ => Err(format!("{:?} {:?}", b.stdout(), b.stderr())),
    });
    assert_ne!(key_b, key_a);
    wait_until("the listener shows the hand-over", || match listener.stdout() {
        out if out == format!("{key_a}\nalpha\n{key_b}\nbeta\n") => Ok(()),
        out => Err(format!("{out:?} {:?}", listener.stderr())),
    });
    // A listener that comes later starts with the leader of now.
    let late = Running::start(&all, &["elect", "--listen", "chief", "--json"]);
    let shown: Value = wait_until("the late listener shows b", || {
        let out = late.stdout();
        let line = out.lines().next().ok_or_else(|| late.stderr())?;
        serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))
    });
    assert_eq!((&shown["kv"]["key"], &shown["kv"]["value"]), (&json!(key_b), &json!("beta")), "{shown}");

    b.signal(Signal::SIGINT);
    assert_eq!(b.exit(), Some(0), "b resigns and exits: {}", b.stderr());
    assert!(keys_under(&all, "chief/").is_empty());
    assert_eq!(keel(&all, &["lease", "list"]).ok(), "found 0 leases\n");
    assert_eq!(listener.stderr(), "", "the listener's stream never broke");
}

/// A lock whose lease is lost while its command runs: revoked (the keep-alive is told it is gone),
/// or no longer confirmed because no member answers for a whole TTL. Either way the command gets
/// SIGTERM and `keel lock` exits 1, saying why.
#[test]
fn a_lock_whose_lease_is_lost_stops_its_command() {
    let mut c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let dir = tempfile::tempdir().expect("temp dir");
    let order = dir.path().join("order");
    let log = order.display();
    let hold = format!(
        r#"trap 'echo "stopped $1" >> '{log}'; exit 143' TERM; echo "start $1 $KEEL_LOCK_KEY" >> '{log}'; while :; do read line || exit 0; done"#
    );

    // Revoked from elsewhere.
    let mut a = Running::start(&all, &["lock", "job", "--ttl", "3", "--", "sh", "-c", &hold, "sh", "a"]);
    let key = wait_until("a runs its command", || match lines_of(&order).first() {
        Some(line) => Ok(line.rsplit(' ').next().unwrap_or_default().to_owned()),
        None => Err(a.stderr()),
    });
    // The key ends in the lease id in hex, unpadded: padded, it reads as hex whatever its digits.
    let lease = format!("{:0>16}", key.strip_prefix("job/").expect("a key under the lock's name"));
    assert_eq!(keel(&all, &["lease", "revoke", &lease]).ok(), format!("lease {lease} revoked\n"));
    assert_eq!(a.exit(), Some(1));
    assert_eq!(
        a.stderr(),
        format!("error: lock lost: lease {lease}: it expired or was revoked; the command was stopped with SIGTERM\n")
    );
    assert_eq!(lines_of(&order)[1], "stopped a");

    // No member answers: after the TTL without an acknowledged keep-alive, the lock is lost.
    let mut b = Running::start(&all, &["lock", "job", "--ttl", "2", "--", "sh", "-c", &hold, "sh", "b"]);
    wait_until("b runs its command", || match lines_of(&order).len() {
        3 => Ok(()),
        _ => Err(b.stderr()),
    });
    for id in 1..=3 {
        c.kill(id);
    }
    assert_eq!(b.exit(), Some(1));
    let said = b.stderr();
    assert!(
        said.starts_with("error: lock lost: lease ")
            && said.contains(": no keep-alive was acknowledged for its whole TTL (2s); last failure: ")
            && said.ends_with("; the command was stopped with SIGTERM\n"),
        "{said}"
    );
    assert_eq!(lines_of(&order)[3], "stopped b");
}

/// A waiter whose endpoint dies while it waits: the wait broke off after it took its place, so it
/// revokes that lease and waits again under a new one on the next endpoint, and still gets the
/// lock after the holder, never with it.
#[test]
fn a_waiter_whose_endpoint_dies_waits_again_under_a_new_lease() {
    let mut c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let leader = leader(&all);
    let victim = a_follower(leader);
    let other = (1..=3).find(|id| *id != victim && *id != leader).expect("three voters");
    let dir = tempfile::tempdir().expect("temp dir");
    let order = dir.path().join("order");
    let log = order.display();
    let hold = format!(
        r#"echo "start a $KEEL_LOCK_REVISION $KEEL_LOCK_KEY" >> '{log}'; read line; echo "end a $KEEL_LOCK_REVISION" >> '{log}'"#
    );
    let mut a = Running::start(&c.endpoints(&[leader, other]), &["lock", "job", "--", "sh", "-c", &hold]);
    let key_a = wait_until("a runs its command", || match lines_of(&order).first() {
        Some(line) => Ok(line.rsplit(' ').next().unwrap_or_default().to_owned()),
        None => Err(a.stderr()),
    });
    // Keys list in key order, not in line order: b's is the one that is not a's.
    let b_key = |keys: &[String]| match keys {
        [x, y] if *x == key_a => Some(y.clone()),
        [x, y] if *y == key_a => Some(x.clone()),
        _ => None,
    };
    let take = format!(r#"echo "start b $KEEL_LOCK_REVISION" >> '{log}'"#);
    let mut b = Running::start(&c.endpoints(&[victim, other]), &["lock", "job", "--", "sh", "-c", &take]);
    let first = wait_until("b waits in line", || {
        let keys = keys_under(&all, "job/");
        b_key(&keys).ok_or_else(|| format!("{keys:?} {}", b.stderr()))
    });

    c.kill(victim);
    let all = c.endpoints(&[leader, other]);
    wait_until("b waits again under a new lease", || {
        let keys = keys_under(&all, "job/");
        match b_key(&keys) {
            Some(again) if again != first && b.stderr().contains("; waiting again under a new lease\n") => {
                Ok(())
            }
            _ => Err(format!("{keys:?} {}", b.stderr())),
        }
    });
    assert_eq!(lines_of(&order).len(), 1, "b still waits for a");
    a.close_stdin();
    assert_eq!(a.exit(), Some(0), "{}", a.stderr());
    assert_eq!(b.exit(), Some(0), "{}", b.stderr());
    let lines = lines_of(&order);
    let ta: i64 = lines[0]
        .strip_prefix("start a ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("a's start");
    assert_eq!(lines[1], format!("end a {ta}"));
    let tb: i64 = lines[2].strip_prefix("start b ").and_then(|t| t.parse().ok()).expect("b's start");
    assert!(tb > ta, "tokens grow: {lines:?}");
    assert!(keys_under(&all, "job/").is_empty());
    assert_eq!(keel(&all, &["lease", "list"]).ok(), "found 0 leases\n", "b's first lease was revoked");
}
