//! `keel debug data-dir` against a real keeld's data dir: refused while the node runs, then read
//! offline after it stopped — snapshot, purged log, membership and key count as written.

use std::ffi::OsStr;
use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use keel_testkit::free_port;

fn keel() -> &'static str {
    env!("CARGO_BIN_EXE_keel")
}

fn keeld() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_keel")).with_file_name("keeld");
    assert!(p.exists(), "{} is missing: build it with `cargo build -p keel-kv`", p.display());
    p
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn data_dir_is_refused_while_running_and_read_offline_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    let config = dir.path().join("keeld.toml");
    std::fs::write(&config, "[raft]\nsnapshot_every = 100\nlogs_to_keep_after_snapshot = 10\n")
        .expect("config");
    let client = format!("127.0.0.1:{}", free_port());
    let mut node = start_keeld(&dir, &data, &client, &[OsStr::new("--config"), config.as_os_str()]);
    for i in 0..300 {
        assert_eq!(Some(200), http(&client, "PUT", &format!("/v1/kv/k{i:03}"), "v"));
    }

    let busy = Command::new(keel()).args(["debug", "data-dir"]).arg(&data).output().expect("run keel");
    assert_eq!(Some(1), busy.status.code());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("in use by a running node"), "{err}");

    stop_keeld(&mut node);

    let out =
        Command::new(keel()).args(["--json", "debug", "data-dir"]).arg(&data).output().expect("run keel");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(serde_json::json!(1), v["node_id"]);
    assert_eq!(serde_json::json!(300), v["state"]["keys"]);
    assert_eq!(serde_json::json!(301), v["state"]["revision"], "empty store at 1, then one revision per put");
    assert_eq!(serde_json::json!([1]), v["membership"]["voters"]);
    let applied = v["state"]["last_applied_index"].as_u64().expect("applied index");
    let last = v["log"]["last_index"].as_u64().expect("last index");
    assert!(applied >= 300 && last >= applied, "{v}");
    let snap = v["snapshot"]["last_index"].as_u64().expect("a snapshot was taken");
    assert!(snap >= 200, "{v}");
    let first = v["log"]["first_index"].as_u64().expect("first index");
    assert!(first > 1 && first <= snap, "the log was purged behind the snapshot: {v}");

    let text = Command::new(keel()).args(["debug", "data-dir"]).arg(&data).output().expect("run keel");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("node id:       1") && text.contains("300 keys"), "{text}");
    let again =
        Command::new(keel()).args(["--json", "debug", "data-dir"]).arg(&data).output().expect("run keel");
    assert_eq!(out.stdout, again.stdout, "inspection changes nothing");
}

#[test]
fn truncate_log_refuses_a_running_node_prints_what_is_lost_and_cuts_only_with_yes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("n1");
    let client = format!("127.0.0.1:{}", free_port());
    let mut node = start_keeld(&dir, &data, &client, &[]);
    for i in 0..20 {
        assert_eq!(Some(200), http(&client, "PUT", &format!("/v1/kv/k{i:02}"), "v"));
    }
    let truncate = |offset: &str, yes: bool| {
        let mut cmd = Command::new(keel());
        cmd.args(["--json", "debug", "truncate-log", "--data-dir"]).arg(&data).args(["--offset", offset]);
        if yes {
            cmd.arg("--yes");
        }
        cmd.output().expect("run keel")
    };

    let busy = truncate("1", true);
    assert_eq!(Some(1), busy.status.code());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("in use by a running node"), "{err}");

    stop_keeld(&mut node);
    let log_dir = data.join("log");
    let chunk = std::fs::read_dir(&log_dir)
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .max()
        .expect("a chunk file");
    let size = std::fs::metadata(&chunk).expect("stat").len();

    // An offset inside a record is refused, naming the record starts around it.
    let inside = truncate(&(size - 1).to_string(), true);
    assert_eq!(Some(1), inside.status.code());
    let err = String::from_utf8_lossy(&inside.stderr);
    assert!(err.contains("not where a record starts"), "{err}");
    let nearby: u64 = err
        .rsplit("nearby: ")
        .next()
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no record start named: {err}"));
    assert!(nearby > 0 && nearby < size, "{err}");

    // Without --yes: what would be lost, exit 2, nothing changed.
    let plan = truncate(&nearby.to_string(), false);
    assert_eq!(Some(2), plan.status.code(), "{}", String::from_utf8_lossy(&plan.stderr));
    assert!(String::from_utf8_lossy(&plan.stderr).contains("--yes"));
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("the plan as JSON");
    assert_eq!(serde_json::json!(false), v["cut"]);
    assert!(!v["lost_records"].as_array().expect("records").is_empty(), "{v}");
    assert_eq!(size, std::fs::metadata(&chunk).expect("stat").len(), "nothing cut without --yes");

    // The text form names the records and log indexes.
    let text = Command::new(keel())
        .args(["debug", "truncate-log", "--data-dir"])
        .arg(&data)
        .args(["--offset", &nearby.to_string()])
        .output()
        .expect("run keel");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("would cut") && text.contains(&format!("at offset {nearby}")), "{text}");

    let before =
        Command::new(keel()).args(["--json", "debug", "data-dir"]).arg(&data).output().expect("run keel");
    let before: serde_json::Value = serde_json::from_slice(&before.stdout).expect("JSON");
    let cut = truncate(&nearby.to_string(), true);
    assert!(cut.status.success(), "{}", String::from_utf8_lossy(&cut.stderr));
    let v: serde_json::Value = serde_json::from_slice(&cut.stdout).expect("what was cut, as JSON");
    assert_eq!(serde_json::json!(true), v["cut"]);
    assert_eq!(nearby, std::fs::metadata(&chunk).expect("stat").len(), "the file ends at the offset");
    let after =
        Command::new(keel()).args(["--json", "debug", "data-dir"]).arg(&data).output().expect("run keel");
    assert!(after.status.success(), "the cut log still reads: {}", String::from_utf8_lossy(&after.stderr));
    let after: serde_json::Value = serde_json::from_slice(&after.stdout).expect("JSON");
    if let Some(lost) = v["lost_indexes"]["first"].as_u64() {
        assert_eq!(Some(lost - 1), after["log"]["last_index"].as_u64(), "before: {before}, after: {after}");
    } else {
        assert_eq!(before["log"]["last_index"], after["log"]["last_index"], "no entry lost: {v}");
    }
}

/// Starts keeld on `data` with `extra` flags, clients on `client`, and waits until it is ready.
fn start_keeld(dir: &tempfile::TempDir, data: &std::path::Path, client: &str, extra: &[&OsStr]) -> Kill {
    let mut node = Kill(
        Command::new(keeld())
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .args(["--client-addr", client, "--peer-addr", &format!("127.0.0.1:{}", free_port())])
            .stderr(std::fs::File::create(dir.path().join("keeld.log")).expect("log"))
            .spawn()
            .expect("spawn keeld"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(client, "GET", "/ready", "") != Some(200) {
        assert!(Instant::now() < deadline, "keeld not ready");
        assert!(node.0.try_wait().expect("wait").is_none(), "keeld exited early");
        std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition wait
    }
    node
}

/// SIGTERMs keeld and waits until it has exited.
fn stop_keeld(node: &mut Kill) {
    Command::new("kill").args(["-TERM", &node.0.id().to_string()]).status().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "keeld did not stop");
        std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition wait
    }
}
