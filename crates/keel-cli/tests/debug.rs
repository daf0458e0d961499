//! `keel debug data-dir` against a real keeld's data dir: refused while the node runs, then read
//! offline after it stopped — snapshot, purged log, membership and key count as written.

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
    let mut node = Kill(
        Command::new(keeld())
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--client-addr", &client, "--peer-addr", &format!("127.0.0.1:{}", free_port())])
            .stderr(std::fs::File::create(dir.path().join("keeld.log")).expect("log"))
            .spawn()
            .expect("spawn keeld"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(&client, "GET", "/ready", "") != Some(200) {
        assert!(Instant::now() < deadline, "keeld not ready");
        assert!(node.0.try_wait().expect("wait").is_none(), "keeld exited early");
        std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition wait
    }
    for i in 0..300 {
        assert_eq!(Some(200), http(&client, "PUT", &format!("/v1/kv/k{i:03}"), "v"));
    }

    let busy = Command::new(keel()).args(["debug", "data-dir"]).arg(&data).output().expect("run keel");
    assert_eq!(Some(1), busy.status.code());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("in use by a running node"), "{err}");

    Command::new("kill").args(["-TERM", &node.0.id().to_string()]).status().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "keeld did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }

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
