//! Backup and restore with real processes: `etcdctl snapshot save` and `keel snapshot save` from a
//! three-node keeld cluster under writes, `keel snapshot restore` into a NEW cluster that serves
//! every write acknowledged before the save began; damaged files and used data dirs refused. The
//! file is etcd's (a bbolt database): `etcdctl snapshot status|restore` read Keel's, and a real
//! etcd restored from it serves the same keys, history, leases and users; `keel snapshot restore`
//! reads a real etcd's.
//!
//! Needs `etcd` and `etcdctl` (3.4, `apt-get install etcd-server etcd-client`) on PATH.

mod support;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use support::{keel, wait_until, Cluster, Run};

/// One HTTP/1.0 `PUT /v1/kv/{key}`: the revision it answered, or why not.
fn http_put(addr: &str, key: &str, value: &str) -> Result<i64, String> {
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "PUT /v1/kv/{key} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{value}", value.len())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| answer.clone())?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(answer);
    }
    let body: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    body["revision"].as_i64().ok_or_else(|| body.to_string())
}

/// An acknowledged put: its key, value and the revision it answered.
type Acked = (String, String, i64);

/// A writer thread putting `load/{seq}` through the endpoints in turn (a failed put is retried on
/// the next one: the same put twice leaves the same state), recording every acknowledged put.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    thread: JoinHandle<Vec<String>>,
}

impl Writer {
    fn start(endpoints: Vec<String>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut at = 0;
            for seq in 0u64.. {
                let (key, value) = (format!("load/{seq:08}"), format!("v{seq}"));
                loop {
                    if s.load(Ordering::Relaxed) {
                        return failures;
                    }
                    match http_put(&endpoints[at], &key, &value) {
                        Ok(revision) => {
                            a.lock().expect("no panic holds it").push((key.clone(), value.clone(), revision));
                            break;
                        }
                        Err(e) => {
                            failures.push(e);
                            at = (at + 1) % endpoints.len();
                        }
                    }
                }
            }
            failures
        });
        Writer { stop, acked, thread }
    }

    /// Every put acknowledged so far.
    fn acked(&self) -> Vec<Acked> {
        self.acked.lock().expect("no panic holds it").clone()
    }

    #[track_caller]
    fn wait_for(&self, n: usize) {
        wait_until(&format!("{n} acknowledged puts"), || {
            let got = self.acked.lock().expect("no panic holds it").len();
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got}"))
            }
        });
    }

    fn stop(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.thread.join().expect("the writer does not panic");
        assert!(failures.len() < 50, "the writer failed too often on a healthy cluster: {failures:?}");
        Arc::try_unwrap(self.acked).expect("the writer has stopped").into_inner().expect("no panic holds it")
    }
}

/// Runs `etcdctl` (API v3) against `endpoint`.
fn etcdctl(endpoint: &str, args: &[&str]) -> Run {
    let endpoint = format!("--endpoints=http://{endpoint}");
    let mut full = vec![endpoint.as_str(), "--command-timeout=30s"];
    full.extend_from_slice(args);
    etcdctl_offline(&full)
}

/// `keel snapshot restore FILE` for member `id` of `new` (its data dir, all of `ids` as members).
fn restore(file: &Path, new: &Cluster, id: u64, ids: &[u64], extra: &[&str]) -> Run {
    let initial: Vec<String> = ids.iter().map(|i| format!("{i}={}", new.peer(*i))).collect();
    let data_dir = new.data_dir(id);
    let mut args = vec![
        "snapshot",
        "restore",
        file.to_str().expect("utf-8 path"),
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
        "--initial-cluster",
    ];
    let initial = initial.join(",");
    let id = id.to_string();
    args.extend([initial.as_str(), "--id", &id]);
    args.extend(extra);
    keel("127.0.0.1:1", &args)
}

/// Restores `file` into a new cluster of members `ids`, starts it and waits until every member
/// serves with its client address published.
fn restored_cluster(file: &Path, ids: &[u64]) -> Cluster {
    let mut new = Cluster::unstarted();
    for &id in ids {
        let out = restore(file, &new, id, ids, &["--initial-cluster-token", "restored"]).ok();
        assert!(out.contains(&format!("as member {id} of a new cluster")), "{out}");
    }
    let initial: Vec<String> = ids.iter().map(|i| format!("{i}={}", new.peer(*i))).collect();
    let initial = initial.join(",");
    for &id in ids {
        // The same flags as a fresh cluster: --initial-cluster is ignored, the data dir holds one.
        new.spawn(id, &["--initial-cluster", &initial, "--cluster-name", "restored"]);
    }
    for &id in ids {
        new.wait_ready(id);
    }
    new.wait_published(ids);
    new
}

/// Every `load/` key the cluster at `endpoint` serves, and the revision of the read.
fn read_load(endpoint: &str) -> (BTreeMap<String, String>, i64) {
    let v = keel(endpoint, &["get", "load/", "--prefix", "--json"]).json();
    let kvs = v["kvs"].as_array().expect("kvs").iter().map(|kv| {
        (
            kv["key"].as_str().expect("utf-8 key").to_owned(),
            kv["value"].as_str().expect("utf-8 value").to_owned(),
        )
    });
    (kvs.collect(), v["revision"].as_i64().expect("revision"))
}

/// Asserts that `served` holds every put of `acked`, and a revision at least the last of them.
#[track_caller]
fn assert_holds(served: &(BTreeMap<String, String>, i64), acked: &[Acked]) {
    let missing: Vec<&Acked> = acked.iter().filter(|(k, v, _)| served.0.get(k) != Some(v)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} puts acknowledged before the save are missing, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    let last = acked.iter().map(|a| a.2).max().unwrap_or(0);
    assert!(served.1 >= last, "revision {} is behind {last}, acknowledged before the save", served.1);
}

#[test]
fn a_snapshot_saved_under_writes_restores_a_new_cluster_with_every_write_acknowledged_before_it() {
    let old = Cluster::start();
    let endpoints: Vec<String> = (1..=3).map(|id| old.client(id)).collect();
    let writer = Writer::start(endpoints.clone());
    writer.wait_for(300);

    let dir = tempfile::tempdir().expect("temp dir");
    let etcd_file = dir.path().join("etcdctl.snap");
    let before_etcdctl = writer.acked();
    let saved = etcdctl(&old.client(2), &["snapshot", "save", etcd_file.to_str().expect("utf-8")]);
    assert_eq!(saved.code, Some(0), "etcdctl snapshot save: {}{}", saved.stdout, saved.stderr);
    assert!(saved.stdout.contains("Snapshot saved at"), "{}", saved.stdout);
    writer.wait_for(before_etcdctl.len() + 100);

    let keel_file = dir.path().join("keel.snap");
    let before_keel = writer.acked();
    let out = keel(&endpoints.join(","), &["snapshot", "save", keel_file.to_str().expect("utf-8")]).ok();
    assert!(out.starts_with(&format!("Snapshot saved at {}", keel_file.display())), "{out}");
    assert!(!PathBuf::from(format!("{}.part", keel_file.display())).exists(), "the .part file is left");
    writer.wait_for(before_keel.len() + 100);
    let all = writer.stop();

    // Both files end in the SHA-256 of what comes before, and say what they hold.
    for (file, before) in [(&etcd_file, &before_etcdctl), (&keel_file, &before_keel)] {
        let bytes = std::fs::read(file).expect("read the snapshot");
        let (payload, trailer) = bytes.split_at(bytes.len() - 32);
        let sha = sha256sum(payload);
        assert_eq!(trailer, &sha[..], "{} does not end in its SHA-256", file.display());
        assert_eq!(payload[16..20], 0xED0C_DAEDu32.to_le_bytes(), "not a bbolt database");
        let status =
            keel("127.0.0.1:1", &["snapshot", "status", file.to_str().expect("utf-8"), "-w", "json"]).json();
        assert_eq!(status["hash"], "ok", "{status}");
        assert_eq!(status["totalSize"].as_u64(), Some(bytes.len() as u64), "{status}");
        let last = before.iter().map(|a| a.2).max().unwrap_or(0);
        assert!(status["revision"].as_i64() >= Some(last), "{status} is behind revision {last}");
        assert!(status["totalKey"].as_u64() >= Some(before.len() as u64), "{status}");
        assert!(status["totalKey"].as_u64() <= Some(all.len() as u64), "{status}");
        let text = keel("127.0.0.1:1", &["snapshot", "status", file.to_str().expect("utf-8")]).ok();
        assert!(text.contains("hash:             ok"), "{text}");
        // etcd's own tool reads it: bbolt's consistency check, every bucket, the last revision.
        let etcd_status =
            etcdctl_offline(&["snapshot", "status", file.to_str().expect("utf-8"), "-w", "json"]);
        let etcd_status = etcd_status.json();
        assert_eq!(etcd_status["revision"], status["revision"], "{etcd_status} vs {status}");
        assert_eq!(etcd_status["totalSize"].as_u64(), Some(bytes.len() as u64 - 32), "{etcd_status}");
    }
    drop(old);

    // A new three-node cluster from etcdctl's file.
    let new = restored_cluster(&etcd_file, &[1, 2, 3]);
    let all_endpoints = new.endpoints(&[1, 2, 3]);
    for id in 1..=3 {
        assert_holds(&read_load(&new.client(id)), &before_etcdctl);
    }
    // It takes writes, and its membership is the new one.
    let put = keel(&all_endpoints, &["put", "after-restore", "yes"]).ok();
    assert_eq!(put, "OK\n");
    let got = keel(&new.client(3), &["get", "after-restore"]).ok();
    assert_eq!(got, "after-restore\nyes\n");
    let members = etcdctl(&new.client(1), &["member", "list", "-w", "json"]);
    assert_eq!(members.code, Some(0), "{}", members.stderr);
    let members: Value = serde_json::from_str(&members.stdout).expect("member list JSON");
    let mut listed: Vec<(u64, String, String)> = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            let url = |field: &str| m[field][0].as_str().unwrap_or_default().to_owned();
            (m["ID"].as_u64().expect("ID"), url("peerURLs"), url("clientURLs"))
        })
        .collect();
    listed.sort();
    let expected: Vec<(u64, String, String)> = (1..=3)
        .map(|id| (id, format!("http://{}", new.peer(id)), format!("http://{}", new.client(id))))
        .collect();
    assert_eq!(listed, expected);
    drop(new);

    // keel's file as a one-member cluster.
    let single = restored_cluster(&keel_file, &[1]);
    assert_holds(&read_load(&single.client(1)), &before_keel);
    assert_eq!(keel(&single.client(1), &["put", "single", "yes"]).ok(), "OK\n");
}

/// SHA-256 by `sha256sum`, so the test does not check the file with the code that wrote it.
fn sha256sum(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let bytes = bytes.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&bytes));
    let out = child.wait_with_output().expect("sha256sum exits");
    feeder.join().expect("feeder").expect("write sha256sum's stdin");
    let hex = String::from_utf8_lossy(&out.stdout);
    let hex = hex.split_whitespace().next().expect("a digest");
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
}

/// A failed `keel snapshot` run: exit 1, nothing on stdout, `needle` in the message.
#[track_caller]
fn assert_refused(run: Run, needle: &str) {
    assert_eq!(run.code, Some(1), "{} should fail: {}{}", run.command, run.stdout, run.stderr);
    assert_eq!(run.stdout, "", "{}", run.command);
    assert!(run.stderr.contains(needle), "{}: expected {needle:?} in {:?}", run.command, run.stderr);
}

#[test]
fn only_root_saves_with_auth_on_and_damaged_files_and_used_data_dirs_are_refused() {
    let old = Cluster::start();
    for i in 0..50 {
        keel(&old.client(1), &["put", &format!("k{i:02}"), &format!("v{i}")]).ok();
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.snap");
    keel(&old.client(3), &["snapshot", "save", good.to_str().expect("utf-8")]).ok();

    // With auth on, only root may take a snapshot (etcd's answers).
    for args in [&["user", "add", "root:rootpw"][..], &["user", "add", "alice:alicepw"], &["auth", "enable"]]
    {
        let run = etcdctl(&old.client(1), args);
        assert_eq!(run.code, Some(0), "{}: {}", run.command, run.stderr);
    }
    let authed = dir.path().join("authed.snap");
    let authed = authed.to_str().expect("utf-8");
    for (user, refusal) in [(None, "user name is empty"), (Some("alice:alicepw"), "permission denied")] {
        let mut args = vec!["snapshot", "save", authed];
        args.extend(user.iter().flat_map(|u| ["--user", *u]));
        let run = etcdctl(&old.client(1), &args);
        assert!(run.code != Some(0) && run.stderr.contains(refusal), "{}: {}", run.command, run.stderr);
    }
    let run = etcdctl(&old.client(1), &["snapshot", "save", authed, "--user", "root:rootpw"]);
    assert_eq!(run.code, Some(0), "{}: {}", run.command, run.stderr);
    drop(old);
    let bytes = std::fs::read(&good).expect("read the snapshot");
    let new = Cluster::unstarted();
    let variant = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write a variant");
        path
    };
    let status = |path: &Path| keel("127.0.0.1:1", &["snapshot", "status", path.to_str().expect("utf-8")]);
    let mismatch = "SHA-256 mismatch: the file is corrupt or truncated";

    // Truncated: anywhere, even by one byte, or down to less than a header. etcd's rule: a file
    // has a trailer if its size is a multiple of 512 plus 32.
    let no_trailer = "has no SHA-256 trailer";
    for cut in [1, 32, 33, bytes.len() / 2, bytes.len() - 20] {
        let path = variant(&format!("cut{cut}.snap"), &bytes[..bytes.len() - cut]);
        assert_refused(status(&path), no_trailer);
        assert_refused(restore(&path, &new, 1, &[1], &[]), no_trailer);
        assert!(!new.data_dir(1).exists(), "a refused restore created the data dir");
    }
    // Cut by a page, trailer and all: still refused with --skip-hash-check (pages are missing).
    let path = variant("cut-page.snap", &bytes[..bytes.len() - 32 - 4096]);
    assert_refused(restore(&path, &new, 1, &[1], &["--skip-hash-check"]), "truncated");
    assert_refused(status(&variant("short.snap", &bytes[..100])), no_trailer);

    // One flipped byte, in the payload or in the trailer.
    for at in [bytes.len() / 2, bytes.len() - 1] {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x01;
        let path = variant(&format!("flip{at}.snap"), &flipped);
        assert_refused(status(&path), mismatch);
        assert_refused(restore(&path, &new, 1, &[1], &[]), mismatch);
        assert!(!new.data_dir(1).exists(), "a refused restore created the data dir");
    }
    // --skip-hash-check still checks the structure: damaged meta pages are refused...
    let mut flipped = bytes.clone();
    for meta in [0, 4096] {
        flipped[meta + 16 + 60] ^= 0x01; // each meta page's checksum
    }
    let path = variant("flip-meta.snap", &flipped);
    assert_refused(restore(&path, &new, 1, &[1], &["--skip-hash-check"]), "no valid meta page");
    assert!(!new.data_dir(1).exists(), "a refused restore created the data dir");
    // ...a flipped trailer byte is restored, with a warning.
    let mut flipped = bytes.clone();
    flipped[bytes.len() - 1] ^= 0x01;
    let path = variant("flip-trailer.snap", &flipped);
    let out = restore(&path, &new, 1, &[1], &["--skip-hash-check"]).ok();
    assert!(out.contains("the SHA-256 was not checked"), "{out}");

    // Not a snapshot at all, or only the first bytes of a bbolt one.
    assert_refused(status(&variant("text.snap", &[b'x'; 100])), "is neither an etcd snapshot");
    let mut bolt = vec![0u8; 4096 + 32];
    bolt[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
    let sha = sha256sum(&bolt[..4096]);
    bolt[4096..].copy_from_slice(&sha);
    assert_refused(status(&variant("bolt.db", &bolt)), "is not a sound bbolt database");

    // A data dir that holds anything is refused, and left as it was.
    let used = new.data_dir(2);
    std::fs::create_dir_all(&used).expect("create a data dir");
    std::fs::write(used.join("keep-me"), "precious").expect("write a file");
    assert_refused(restore(&good, &new, 2, &[1, 2], &[]), "is not empty");
    let left: Vec<_> =
        std::fs::read_dir(&used).expect("read the dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("keep-me")]);
    assert_eq!(std::fs::read_to_string(used.join("keep-me")).expect("read it"), "precious");
    // So is the member data dir restored above: restore never writes over one.
    assert_refused(restore(&good, &new, 1, &[1], &[]), "is not empty");
    // A member that --initial-cluster does not list is refused.
    assert_refused(restore(&good, &new, 3, &[1, 2], &[]), "does not list member 3");
}

/// Runs `etcdctl` (API v3) with `args` alone: `snapshot status|restore` need no endpoint.
fn etcdctl_offline(args: &[&str]) -> Run {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .expect("run etcdctl (apt-get install etcd-client)");
    Run {
        command: format!("etcdctl {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`etcdctl`] as `user:password`, which must succeed; answers its stdout.
#[track_caller]
fn etcdctl_ok(endpoint: &str, user: Option<&str>, args: &[&str]) -> String {
    let mut all: Vec<&str> = args.to_vec();
    if let Some(u) = user {
        all.extend(["--user", u]);
    }
    let run = etcdctl(endpoint, &all);
    assert_eq!(run.code, Some(0), "{}: {}{}", run.command, run.stdout, run.stderr);
    run.stdout
}

/// A real etcd 3.4 member on loopback ports, SIGKILLed on drop (its log printed if the test is
/// failing).
struct Etcd {
    child: std::process::Child,
    client: String,
    log: PathBuf,
}

impl Etcd {
    /// Starts etcd `name` on `data_dir` (fresh, or restored with the same name and peer URL).
    fn start(name: &str, data_dir: &Path, client: u16, peer: u16) -> Etcd {
        let log = data_dir.with_extension("log");
        let out = std::fs::File::create(&log).expect("etcd log");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let client_url = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(["--name", name, "--data-dir", data_dir.to_str().expect("utf-8")])
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{name}={peer_url}")])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("run etcd (apt-get install etcd-server)");
        let etcd = Etcd { child, client: format!("127.0.0.1:{client}"), log };
        wait_until("etcd serves", || {
            let run = etcdctl(&etcd.client, &["endpoint", "health"]);
            // With auth on (a restored member), health's read is refused: it answered, it serves.
            if run.code == Some(0) || run.stderr.contains("user name is empty") {
                Ok(())
            } else {
                Err(run.stderr)
            }
        });
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- etcd log {}:\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The writes both directions replay, through etcdctl (etcd's client), at revisions 2..=9:
/// puts and deletes, a key on a lease, a compaction at 4 (so one version older than it survives
/// at it: `b` put at 3), users and a role, auth on. Answers the lease's id (hex).
const ROOT: &str = "root:rootpw";
fn write_history(endpoint: &str) -> String {
    let run = |args: &[&str]| etcdctl_ok(endpoint, None, args);
    run(&["put", "a", "1"]); // 2
    run(&["put", "b", "2"]); // 3
    run(&["put", "a", "3"]); // 4
    run(&["del", "b"]); // 5
    let grant = run(&["lease", "grant", "600"]);
    let lease = grant.split_whitespace().nth(1).expect("lease <id> granted").to_owned();
    run(&["put", "c", "4", "--lease", &lease]); // 6
    run(&["compact", "4"]);
    run(&["put", "d", "5"]); // 7
    run(&["put", "a", "6"]); // 8
    run(&["del", "d"]); // 9
    for args in [
        &["user", "add", ROOT][..],
        &["user", "add", "alice:alicepw"],
        &["role", "add", "reader"],
        &["role", "grant-permission", "reader", "read", "a"],
        &["user", "grant-role", "alice", "reader"],
        &["auth", "enable"],
    ] {
        run(args);
    }
    lease
}

/// Every key (as JSON: key, revisions, version, value, lease) that `endpoint` serves at `rev`, or
/// its refusal.
fn keys_at(endpoint: &str, rev: i64) -> Result<Value, String> {
    let run =
        etcdctl(endpoint, &["get", "", "--from-key", "-w", "json", &format!("--rev={rev}"), "--user", ROOT]);
    if run.code != Some(0) {
        return Err(run.stderr.lines().last().unwrap_or_default().to_owned());
    }
    let v: Value = serde_json::from_str(&run.stdout).map_err(|e| e.to_string())?;
    Ok(v["kvs"].clone())
}

/// Asserts that `a` and `b` serve the same keys at every revision 1..=9 (compacted below 4 on
/// both), the same lease, and the same users: alice reads `a` and may not write it.
#[track_caller]
fn assert_same_state(a: &str, b: &str, lease: &str) {
    for rev in 1..=9 {
        let (x, y) = (keys_at(a, rev), keys_at(b, rev));
        assert_eq!(x, y, "at revision {rev}");
        if rev < 4 {
            assert!(x.is_err_and(|e| e.contains("compacted")), "revision {rev} is compacted");
        }
    }
    let now = keys_at(b, 9).expect("read");
    assert_eq!(now.as_array().map(Vec::len), Some(2), "a and c: {now}");
    for endpoint in [a, b] {
        let leases = etcdctl_ok(endpoint, Some(ROOT), &["lease", "list"]);
        assert!(leases.contains(lease), "{endpoint}: {leases} lacks {lease}");
        assert_eq!(etcdctl_ok(endpoint, Some("alice:alicepw"), &["get", "a", "--print-value-only"]), "6\n");
        let denied = etcdctl(endpoint, &["put", "a", "7", "--user", "alice:alicepw"]);
        assert!(denied.stderr.contains("permission denied"), "{endpoint}: {}", denied.stderr);
        let wrong = etcdctl(endpoint, &["get", "a", "--user", "alice:wrong"]);
        assert!(wrong.stderr.contains("authentication failed"), "{endpoint}: {}", wrong.stderr);
    }
}

#[test]
fn a_keel_snapshot_restored_by_etcdctl_serves_the_same_keys_history_leases_and_users_on_etcd() {
    let keel_cluster = Cluster::start();
    let endpoint = keel_cluster.client(1);
    let lease = write_history(&endpoint);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("from-keel.db");
    etcdctl_ok(&endpoint, Some(ROOT), &["snapshot", "save", file.to_str().expect("utf-8")]);

    let status = etcdctl_offline(&["snapshot", "status", file.to_str().expect("utf-8"), "-w", "json"]).json();
    assert_eq!(status["revision"], 9, "{status}");

    let ports = keel_testkit::free_ports(2);
    let data_dir = dir.path().join("etcd");
    let peer_url = format!("http://127.0.0.1:{}", ports[1]);
    let restored = etcdctl_offline(&[
        "snapshot",
        "restore",
        file.to_str().expect("utf-8"),
        "--data-dir",
        data_dir.to_str().expect("utf-8"),
        "--name",
        "restored",
        "--initial-cluster",
        &format!("restored={peer_url}"),
        "--initial-advertise-peer-urls",
        &peer_url,
    ]);
    assert_eq!(restored.code, Some(0), "{}{}", restored.stdout, restored.stderr);
    let etcd = Etcd::start("restored", &data_dir, ports[0], ports[1]);
    assert_same_state(&endpoint, &etcd.client, &lease);
    // The restored etcd goes on from Keel's revision.
    etcdctl_ok(&etcd.client, Some(ROOT), &["put", "e", "7"]);
    let e = etcdctl_ok(&etcd.client, Some(ROOT), &["get", "e", "-w", "json"]);
    let e: Value = serde_json::from_str(&e).expect("json");
    assert_eq!(e["kvs"][0]["mod_revision"], 10, "{e}");
}

#[test]
fn an_etcd_snapshot_restored_by_keel_serves_the_same_keys_history_leases_and_users_on_keeld() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = keel_testkit::free_ports(2);
    let etcd = Etcd::start("source", &dir.path().join("etcd"), ports[0], ports[1]);
    let lease = write_history(&etcd.client);
    let file = dir.path().join("from-etcd.db");
    etcdctl_ok(&etcd.client, Some(ROOT), &["snapshot", "save", file.to_str().expect("utf-8")]);

    let status =
        keel("127.0.0.1:1", &["snapshot", "status", file.to_str().expect("utf-8"), "-w", "json"]).json();
    assert_eq!(status["format"], "etcd (bbolt)", "{status}");
    assert_eq!(
        (status["revision"].as_i64(), status["compactRevision"].as_i64()),
        (Some(9), Some(4)),
        "{status}"
    );
    assert_eq!((status["totalKey"].as_u64(), status["leases"].as_u64()), (Some(2), Some(1)), "{status}");

    let new = restored_cluster(&file, &[1, 2, 3]);
    for id in 1..=3 {
        assert_same_state(&etcd.client, &new.client(id), &lease);
    }
    // Keel goes on from etcd's revision.
    etcdctl_ok(&new.client(2), Some(ROOT), &["put", "e", "7"]);
    let e = etcdctl_ok(&new.client(3), Some(ROOT), &["get", "e", "-w", "json"]);
    let e: Value = serde_json::from_str(&e).expect("json");
    assert_eq!(e["kvs"][0]["mod_revision"], 10, "{e}");
}
