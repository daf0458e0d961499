//! etcd's space quota and what happens when the disk really fills, on real keeld processes:
//! the `NOSPACE` alarm (raised through Raft, listed by `etcdctl alarm list` on every member, kept
//! across restarts, cleared by `etcdctl alarm disarm`), writes refused with etcd's exact error while
//! reads and deletes go on; and a node whose storage fails (ENOSPC on a full tmpfs, EFBIG past a
//! file size limit) exits non-zero and, restarted with room, serves every write it acknowledged.
//!
//! Needs `etcdctl` (3.4, `apt-get install etcd-client`) on PATH. The tmpfs tests need root; they
//! say so and do nothing without it.

mod procs;

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use procs::assert_all_present;
use procs::http;
use procs::wait_until;
use procs::Procs;
use procs::DEADLINE;

/// etcd's message for a write refused by the space quota (`rpctypes.ErrGRPCNoSpace`).
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
const MIB: u64 = 1 << 20;

/// Runs `etcdctl` (API v3) against `endpoint`: (succeeded, stdout, stderr).
fn etcdctl(endpoint: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write as _;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://{endpoint}"))
        .arg("--command-timeout=15s")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run etcdctl (apt-get install etcd-client)");
    child.stdin.take().expect("stdin is piped").write_all(stdin.as_bytes()).expect("write etcdctl's stdin");
    let out = child.wait_with_output().expect("wait for etcdctl");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// `etcdctl` that must succeed; its stdout.
#[track_caller]
fn etcdctl_ok(endpoint: &str, args: &[&str]) -> String {
    let (ok, out, err) = etcdctl(endpoint, args, "");
    assert!(ok, "etcdctl {args:?} against {endpoint} failed: {err}{out}");
    out
}

/// `etcdctl` that must fail with etcd's space quota error.
#[track_caller]
fn assert_no_space(endpoint: &str, args: &[&str], stdin: &str) {
    let (ok, out, err) = etcdctl(endpoint, args, stdin);
    assert!(!ok && err.contains(NO_SPACE), "etcdctl {args:?} should fail with {NO_SPACE:?}: {out}{err}");
}

/// `etcdctl alarm list` at `endpoint`, one alarm a line.
fn alarm_list(endpoint: &str) -> Vec<String> {
    etcdctl_ok(endpoint, &["alarm", "list"]).lines().map(|l| l.trim().to_owned()).collect()
}

/// PUTs `{prefix}{n}` (values of `value_bytes`) through HTTP until a put is refused for space.
/// Answers the acknowledged writes and the refusal's body; fails the test if any other answer
/// comes, or no refusal within `max_bytes` of values.
#[track_caller]
fn fill_until_refused(
    client: &str,
    prefix: &str,
    value_bytes: usize,
    max_bytes: u64,
) -> (BTreeMap<String, String>, String) {
    let mut acked = BTreeMap::new();
    for n in 0..max_bytes / value_bytes as u64 {
        let key = format!("{prefix}{n:06}");
        let value = format!("{n:06}").repeat(value_bytes / 6);
        match http(client, "PUT", &format!("/v1/kv/{key}"), value.as_bytes(), Duration::from_secs(30)) {
            Ok((200, _)) => {
                acked.insert(key, value);
            }
            Ok((507, body)) => return (acked, body),
            other => panic!("put {key} answered {other:?}"),
        }
    }
    panic!("no write refused after {max_bytes} bytes of values ({} acknowledged)", acked.len())
}

fn alarms_json(client: &str) -> Result<serde_json::Value, String> {
    procs::get_json(client, "/v1/alarms").map(|v| v["alarms"].clone())
}

#[test]
fn a_node_over_its_quota_raises_nospace_and_refuses_puts_but_serves_reads_and_deletes() {
    let quota = (8 * MIB).to_string();
    let mut procs = Procs::new(1, "");
    procs.spawn(1, &["--id", "1", "--quota-backend-bytes", &quota]);
    procs.wait_ready(1);
    let c = procs.client(1);

    let (acked, refusal) = fill_until_refused(&c, "fill/", 16 << 10, 64 * MIB);
    assert!(refusal.contains(NO_SPACE) && refusal.contains("\"no_space\""), "{refusal}");
    assert!(!acked.is_empty(), "the quota refused the very first write");
    assert_eq!(vec!["memberID:1 alarm:NOSPACE".to_string()], alarm_list(&c));
    assert_eq!(serde_json::json!([{"member_id": 1, "alarm": "NOSPACE"}]), alarms_json(&c).expect("alarms"));

    // Every write that may grow the database is refused, however small: the alarm caps them
    // all (etcd's capped applier), not just those over the quota.
    assert_no_space(&c, &["put", "small", "v"], "");
    assert_no_space(&c, &["txn"], "\nput small v\n\n\n");
    // Reads, deletes, txns of deletes and compaction go on.
    let (first, value) = acked.iter().next().expect("one acked");
    assert_eq!(format!("{first}\n{value}\n"), etcdctl_ok(&c, &["get", first]));
    assert_eq!("1\n", etcdctl_ok(&c, &["del", first]));
    let second = acked.keys().nth(1).expect("two acked");
    let (ok, out, err) = etcdctl(&c, &["txn"], &format!("\ndel {second}\n\n\n"));
    assert!(ok && out.starts_with("SUCCESS"), "a txn of deletes: {out}{err}");
    let revision = procs::get_json(&c, "/v1/cluster/status").expect("status")["revision"].to_string();
    etcdctl_ok(&c, &["compaction", &revision]);
    let metrics = http(&c, "GET", "/metrics", b"", Duration::from_secs(5)).expect("metrics").1;
    assert!(metrics.contains("keel_alarms{alarm=\"NOSPACE\"} 1"), "{metrics}");

    // The alarm is state, not memory: a restart keeps it.
    assert!(procs.terminate(1).success());
    procs.spawn(1, &["--quota-backend-bytes", &quota]);
    procs.wait_ready(1);
    assert_eq!(vec!["memberID:1 alarm:NOSPACE".to_string()], alarm_list(&c));
    assert_no_space(&c, &["put", "small", "v"], "");

    // Disarmed while still over the quota: the next growing write raises it again (as etcd).
    assert_eq!("memberID:1 alarm:NOSPACE\n", etcdctl_ok(&c, &["alarm", "disarm"]).replace(" \n", "\n"));
    assert_eq!(Vec::<String>::new(), alarm_list(&c));
    let (_, refusal) = fill_until_refused(&c, "again/", 16 << 10, 64 * MIB);
    assert!(refusal.contains(NO_SPACE), "{refusal}");
    assert_eq!(vec!["memberID:1 alarm:NOSPACE".to_string()], alarm_list(&c));

    // With room (a larger quota) and the alarm disarmed, writes work again.
    assert!(procs.terminate(1).success());
    procs.spawn(1, &["--quota-backend-bytes", &(256 * MIB).to_string()]);
    procs.wait_ready(1);
    assert_no_space(&c, &["put", "small", "v"], "");
    let cleared = procs::post_json(&c, "/v1/alarms/disarm", &serde_json::json!({})).expect("disarm");
    assert_eq!(serde_json::json!({"alarms": [{"member_id": 1, "alarm": "NOSPACE"}]}), cleared);
    assert_eq!(serde_json::json!([]), alarms_json(&c).expect("alarms"));
    assert_eq!("OK\n", etcdctl_ok(&c, &["put", "small", "v"]));
}

#[test]
fn the_nospace_alarm_is_replicated_to_every_member_and_caps_writes_everywhere() {
    let mut procs = Procs::start(3, 0, &format!("quota_backend_bytes = {}\n", 8 * MIB));
    let leader = procs.wait_leader(&[1, 2, 3], DEADLINE);
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let (_, refusal) = fill_until_refused(&procs.client(follower), "fill/", 16 << 10, 64 * MIB);
    assert!(refusal.contains(NO_SPACE), "{refusal}");
    let expected = format!("memberID:{follower} alarm:NOSPACE");
    for id in 1..=3 {
        let c = procs.client(id);
        assert_eq!(vec![expected.clone()], alarm_list(&c), "alarm list on node {id}");
        wait_until(&format!("node {id}'s alarm gauge"), DEADLINE, || {
            let metrics = http(&c, "GET", "/metrics", b"", Duration::from_secs(5))?.1;
            match metrics.contains("keel_alarms{alarm=\"NOSPACE\"} 1") {
                true => Ok(()),
                false => Err(metrics),
            }
        });
    }
    // Every member refuses puts. (One whose own database is over the quota raises an alarm of
    // its own on the way, as etcd does: the list grows, and still holds the first.)
    for id in 1..=3 {
        let c = procs.client(id);
        assert_no_space(&c, &["put", "small", "v"], "");
        assert!(alarm_list(&c).contains(&expected), "alarm list on node {id}");
    }
    // Any member's disarm clears it for all.
    etcdctl_ok(&procs.client(leader), &["alarm", "disarm"]);
    for id in 1..=3 {
        assert_eq!(Vec::<String>::new(), alarm_list(&procs.client(id)), "alarm list on node {id}");
    }
}

#[test]
fn http_alarm_activate_caps_writes_and_etcdctl_disarm_lifts_it() {
    let mut procs = Procs::start(1, 0, "");
    let c = procs.client(1);
    assert_eq!("OK\n", etcdctl_ok(&c, &["put", "k", "v"]));
    // etcdctl has no ACTIVATE command: use the HTTP API's raw form of etcd's AlarmRequest.
    let raised =
        procs::post_json(&c, "/v1/alarms/activate", &serde_json::json!({"member_id": 7, "alarm": "NOSPACE"}))
            .expect("activate");
    assert_eq!(serde_json::json!({"alarms": [{"member_id": 7, "alarm": "NOSPACE"}]}), raised);
    assert_eq!(vec!["memberID:7 alarm:NOSPACE".to_string()], alarm_list(&c));
    assert_no_space(&c, &["put", "k", "w"], "");
    assert_eq!("k\nv\n", etcdctl_ok(&c, &["get", "k"]));
    etcdctl_ok(&c, &["alarm", "disarm"]);
    assert_eq!("OK\n", etcdctl_ok(&c, &["put", "k", "w"]));
    assert!(procs.terminate(1).success());
}

// ---------------------------------------------------------------------------------------------
// A full disk

fn is_root() -> bool {
    // `id -u` rather than libc::geteuid: this crate does not depend on libc.
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A tmpfs mounted on a directory; unmounted (lazily, so a process still in it cannot stop that)
/// when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    #[track_caller]
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let size = format!("size={mib}m");
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir).status();
        assert!(status.is_ok_and(|s| s.success()), "mount -t tmpfs -o {size} tmpfs {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Changes its size in place (the files stay).
    #[track_caller]
    fn resize(&self, mib: u64) {
        let opts = format!("remount,size={mib}m");
        let status = Command::new("mount").args(["-o", &opts]).arg(&self.0).status();
        assert!(status.is_ok_and(|s| s.success()), "mount -o {opts} {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn on_a_small_disk_the_quota_alarm_comes_before_enospc_and_reads_go_on() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root; run as root (CI does)");
        return;
    }
    let mut procs = Procs::new(1, "");
    let _disk = Tmpfs::mount(&procs.node(1).data_dir, 64);
    procs.spawn(1, &["--id", "1", "--quota-backend-bytes", &(8 * MIB).to_string()]);
    procs.wait_ready(1);
    let c = procs.client(1);
    let (acked, refusal) = fill_until_refused(&c, "fill/", 16 << 10, 64 * MIB);
    assert!(refusal.contains(NO_SPACE), "{refusal}");
    assert_eq!(vec!["memberID:1 alarm:NOSPACE".to_string()], alarm_list(&c));
    assert!(procs.exited(1).is_none(), "keeld exited on a disk with room left");
    assert_all_present(&procs, 1, "fill/", &acked, false);
    assert!(procs.terminate(1).success());
}

#[test]
fn a_node_that_runs_out_of_disk_exits_non_zero_and_keeps_every_acknowledged_write() {
    if !is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root; run as root (CI does)");
        return;
    }
    let mut procs = Procs::new(1, "");
    let disk = Tmpfs::mount(&procs.node(1).data_dir, 32);
    let quota = (1024 * MIB).to_string(); // far above the disk: the quota cannot save it
    procs.spawn(1, &["--id", "1", "--quota-backend-bytes", &quota]);
    procs.wait_ready(1);
    let acked = write_until_exit(&mut procs, 1, "fill/");
    assert!(acked.len() > 100, "only {} writes fit on 32 MiB", acked.len());
    let log = std::fs::read_to_string(&procs.node(1).log).expect("read keeld's log");
    assert!(
        log.contains("raft stopped with a fatal error") && log.contains("No space left on device"),
        "keeld's log does not say it stopped for ENOSPC"
    );

    disk.resize(256);
    procs.spawn(1, &["--quota-backend-bytes", &quota]);
    procs.wait_ready(1);
    assert_all_present(&procs, 1, "fill/", &acked, false);
    assert!(procs.terminate(1).success());
}

/// How long a node whose storage failed may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// Writes `{prefix}{n}` until keeld `id` exits, which it must do within [`EXIT_WITHIN`] of its
/// first failed write, with a non-zero exit code (not a signal: it stopped itself). Answers the
/// acknowledged writes.
#[track_caller]
fn write_until_exit(procs: &mut Procs, id: u64, prefix: &str) -> BTreeMap<String, String> {
    let c = procs.client(id);
    let mut acked = BTreeMap::new();
    let mut first_failure: Option<(Instant, String)> = None;
    for n in 0u64.. {
        let status = match &first_failure {
            // Nothing answered: the process is on its way out.
            Some((_, failure)) if failure.contains("Err(") => {
                Some(wait_until(&format!("keeld {id} exits after {failure}"), EXIT_WITHIN, || {
                    procs.exited(id).ok_or_else(|| "still running".to_string())
                }))
            }
            _ => procs.exited(id),
        };
        if let Some(status) = status {
            let (_, failure) = first_failure.expect("keeld exited before any write failed");
            assert!(
                status.code().is_some_and(|code| code != 0),
                "keeld should exit with a non-zero code, not {status}; first failed write: {failure}"
            );
            return acked;
        }
        if let Some((at, failure)) = &first_failure {
            assert!(at.elapsed() < EXIT_WITHIN, "keeld still runs {EXIT_WITHIN:?} after {failure}");
        }
        let key = format!("{prefix}{n:06}");
        let value = format!("{n:06}").repeat(4096 / 6);
        match http(&c, "PUT", &format!("/v1/kv/{key}"), value.as_bytes(), Duration::from_secs(10)) {
            Ok((200, _)) => {
                assert!(first_failure.is_none(), "{key} acknowledged after a failed write");
                acked.insert(key, value);
            }
            failed => {
                first_failure.get_or_insert((Instant::now(), format!("put {key}: {failed:?}")));
            }
        }
    }
    unreachable!("the loop returns when keeld exits")
}

#[test]
fn a_node_whose_files_hit_the_size_limit_exits_non_zero_and_restarts_with_every_write() {
    // RLIMIT_FSIZE makes every write past 16 MiB (32768 blocks of 512 bytes, as dash counts) in one
    // file fail with EFBIG (SIGXFSZ ignored): a storage failure that is not ENOSPC, without root.
    let mut procs = Procs::new(1, "");
    procs.wrapper =
        vec!["sh".into(), "-c".into(), "trap '' XFSZ; ulimit -f 32768 && exec \"$0\" \"$@\"".into()];
    procs.spawn(1, &["--id", "1"]);
    procs.wait_ready(1);
    let acked = write_until_exit(&mut procs, 1, "fill/");
    assert!(acked.len() > 100, "only {} writes before the limit", acked.len());
    let log = std::fs::read_to_string(&procs.node(1).log).expect("read keeld's log");
    assert!(
        log.contains("raft stopped with a fatal error") && log.contains("File too large"),
        "keeld's log does not say it stopped for EFBIG"
    );

    procs.wrapper.clear();
    procs.restart(1);
    procs.wait_ready(1);
    assert_all_present(&procs, 1, "fill/", &acked, false);
    assert!(procs.terminate(1).success());
}

#[test]
fn grpc_alarm_activate_and_deactivate_work_as_etcds_and_the_refusal_is_resource_exhausted() {
    use etcd_client::AlarmAction;
    use etcd_client::AlarmOptions;
    use etcd_client::AlarmType;
    let mut procs = Procs::start(1, 0, "");
    let endpoint = format!("http://{}", procs.client(1));
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let mut client = etcd_client::Client::connect([endpoint], None).await.expect("connect");
        let member = |id| {
            let mut o = AlarmOptions::new();
            o.with_member(id);
            Some(o)
        };
        let raised = |r: &etcd_client::AlarmResponse| -> Vec<(u64, AlarmType)> {
            r.alarms().iter().map(|a| (a.member_id(), a.alarm())).collect()
        };

        let r = client.alarm(AlarmAction::Activate, AlarmType::Nospace, member(7)).await.expect("activate");
        assert_eq!(vec![(7, AlarmType::Nospace)], raised(&r));
        // Activating a raised alarm changes nothing and answers none (etcd's AlarmStore).
        let r = client.alarm(AlarmAction::Activate, AlarmType::Nospace, member(7)).await.expect("again");
        assert_eq!(Vec::<(u64, AlarmType)>::new(), raised(&r));
        let r = client.alarm(AlarmAction::Get, AlarmType::None, None).await.expect("get");
        assert_eq!(vec![(7, AlarmType::Nospace)], raised(&r));

        match client.put("k", "v", None).await {
            Err(etcd_client::Error::GRpcStatus(s)) => {
                assert_eq!((tonic::Code::ResourceExhausted, NO_SPACE), (s.code(), s.message()));
            }
            other => panic!("a put under NOSPACE answered {other:?}"),
        }
        // A txn of only deletes is not capped.
        let txn = etcd_client::Txn::new().and_then([etcd_client::TxnOp::delete("k", None)]);
        assert!(client.txn(txn).await.expect("a txn of deletes").succeeded());
        // Keel raises only NOSPACE: CORRUPT is refused, not silently kept.
        let corrupt = client.alarm(AlarmAction::Activate, AlarmType::Corrupt, member(7)).await;
        assert!(
            matches!(&corrupt, Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::InvalidArgument),
            "{corrupt:?}"
        );

        let r = client.alarm(AlarmAction::Deactivate, AlarmType::Nospace, member(7)).await.expect("deactivate");
        assert_eq!(vec![(7, AlarmType::Nospace)], raised(&r));
        let r = client.alarm(AlarmAction::Get, AlarmType::None, None).await.expect("get");
        assert_eq!(Vec::<(u64, AlarmType)>::new(), raised(&r));
        client.put("k", "v", None).await.expect("a put once the alarm is cleared");
    });
    assert!(procs.terminate(1).success());
}
