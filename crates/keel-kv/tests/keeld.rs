//! keeld as an operator meets it: no flags at all, restarts, bad configuration, taken ports, and
//! the ordered shutdown that hands leadership over.

mod support;

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use keel_kv::server::Server;
use support::Cluster;

const KEELD: &str = env!("CARGO_BIN_EXE_keeld");

/// A minimal HTTP/1.0 exchange: (status, body), or None when nothing answers.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

fn wait_ready(addr: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + support::WAIT;
    loop {
        if let Some((200, _)) = http(addr, "GET", "/ready", "") {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("keeld exited with {status} before it was ready");
        }
        assert!(Instant::now() < deadline, "keeld at {addr} not ready within {:?}", support::WAIT);
        std::thread::sleep(Duration::from_millis(50)); // polling interval of a condition wait
    }
}

fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    let deadline = Instant::now() + support::WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "keeld did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_flags_is_a_single_node_cluster_that_restarts_with_its_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("keeld.log");
    let start = || {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open log");
        Command::new(KEELD)
            .current_dir(dir.path())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .expect("spawn keeld")
    };
    let logged = || std::fs::read_to_string(&log).unwrap_or_default();
    let addr = "127.0.0.1:2379";
    let mut node = Kill(start());
    wait_ready(addr, &mut node.0);
    assert_eq!(Some(200), http(addr, "PUT", "/v1/kv/k", "v1").map(|r| r.0));
    let status = terminate(&mut node.0);
    assert!(status.success(), "SIGTERM stops keeld cleanly (exit 0), not {status}:\n{}", logged());
    assert!(dir.path().join("keel-data").is_dir(), "data lives in ./keel-data");

    let mut node = Kill(start());
    wait_ready(addr, &mut node.0);
    let (status, body) = http(addr, "GET", "/v1/kv/k", "").expect("answer");
    assert_eq!(200, status, "{body}");
    assert!(body.contains("\"value\":\"v1\""), "the write survived the restart: {body}");
    let status = terminate(&mut node.0);
    assert!(status.success(), "the restarted keeld stops cleanly too, not {status}:\n{}", logged());
}

#[test]
fn bad_configuration_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let toml = dir.path().join("bad.toml");
    std::fs::write(&toml, "id = 1\ndata_dri = \"x\"\n").expect("write config");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--config".into(), toml.display().to_string()], "data_dri"),
        (vec!["--config".into(), "/nonexistent/keel.toml".into()], "/nonexistent/keel.toml"),
        (vec!["--initial-cluster".into(), "2=127.0.0.1:2480".into()], "does not list this node"),
        (vec!["--initial-cluster".into(), "1=127.0.0.1:2380,x=1".into()], "initial_cluster"),
        (vec!["--id".into(), "0".into()], "id"),
        (vec!["--client-addr".into(), "nowhere".into()], "client_addr"),
    ];
    for (args, expect) in cases {
        let out = Command::new(KEELD).args(&args).current_dir(dir.path()).output().expect("run keeld");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(Some(2), out.status.code(), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("keel-data").exists(), "a refused config creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_taken_port_fails_start_up_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = support::config(1, dir.path(), support::free_port(), port, "");
    let err = Server::start(config).await.err().expect("start fails").to_string();
    assert!(err.contains("client address") && err.contains(&port.to_string()), "{err}");
    assert!(!dir.path().join("n1").exists(), "nothing was created before the ports were bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_shutdown_hands_over_and_a_restart_ignores_initial_cluster() {
    let mut c = Cluster::start(3, |_| {}).await;
    let leader = c.leader();
    let server = c.servers.remove(&leader).expect("leader");
    let (peer, client) = (server.peer_addr.port(), server.client_addr.port());
    server.shutdown().await.expect("ordered shutdown");
    // Shutdown returned only after leadership moved: a survivor leads already, no election wait.
    let survivors: Vec<u64> = c.servers.keys().copied().collect();
    let new_leader = c.servers[&survivors[0]].node().leader().expect("a leader right away");
    assert!(survivors.contains(&new_leader), "leadership went to a survivor, not {new_leader}");
    assert!(c.servers[&new_leader].node().is_leader());

    // The old leader restarts on its data dir with a nonsense initial cluster: it is ignored.
    let mut config = support::config(leader, c.dir.path(), peer, client, "");
    config.initial_cluster = format!("{leader}=127.0.0.1:{peer},99=127.0.0.1:1");
    let restarted = Server::start(config).await.expect("restart");
    c.servers.insert(leader, restarted);
    c.wait_ready().await;
    let members = c.servers[&leader].api.members();
    assert_eq!(3, members.len(), "membership comes from the data dir: {members:?}");
    c.shutdown().await;
}
