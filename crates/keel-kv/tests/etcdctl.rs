//! etcdctl acceptance: Debian's `etcdctl` 3.4, unmodified, against a three-node keeld cluster of
//! separate processes on loopback. Asserts on etcdctl's exact output, which is what it prints for
//! the same commands against etcd (ids aside: Keel's member ids are small integers, and etcdctl
//! pads them as it pads etcd's with `%16x`).
//!
//! Needs `etcdctl` on PATH (`apt-get install etcd-client`); the test fails without it.

use std::fs::File;
use std::io::Read;
use std::io::Write;
use std::net::SocketAddr;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_kv::api::cluster_id;
use keel_kv::etcd::SERVER_VERSION;

/// How long a node may take to become ready, and a cluster change to show everywhere.
const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// A loopback address on a port reserved for this test process ([`keel_testkit::free_port`]).
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], keel_testkit::free_port()))
}

/// Polls `check` until it answers `Ok`, or fails the test with its last answer after `DEADLINE`.
fn wait_until<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > DEADLINE => {
                panic!("{what}: still not true after {DEADLINE:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// `GET /ready` over plain HTTP/1.0: Ok on a 200.
fn http_ready(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    write!(s, "GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    match answer.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(answer),
    }
}

/// One keeld process.
struct Keeld {
    id: u64,
    client: SocketAddr,
    peer: SocketAddr,
    child: Child,
    stderr: PathBuf,
}

/// A keeld exited because another process took one of the ports picked for it before it bound
/// them (`free_addr` keeps them from Keel's tests, not from anything else): start it again on
/// other ports.
#[derive(Debug)]
struct PortTaken(String);

/// How many times to pick ports again after a [`PortTaken`].
const PORT_ATTEMPTS: usize = 5;

/// keeld processes under one temp dir. Dropping it kills them all (also when a test panics, and
/// then it prints each node's stderr).
struct Cluster {
    dir: tempfile::TempDir,
    nodes: Vec<Keeld>,
    /// keeld processes started so far: names each one's data dir and stderr file apart.
    started: usize,
}

impl Cluster {
    /// Starts nodes 1..=3 as a new cluster and waits until each is ready.
    fn start() -> Cluster {
        for attempt in 1..=PORT_ATTEMPTS {
            let addrs: Vec<(u64, SocketAddr, SocketAddr)> =
                (1..=3).map(|id| (id, free_addr(), free_addr())).collect();
            let initial =
                addrs.iter().map(|(id, _, peer)| format!("{id}={peer}")).collect::<Vec<_>>().join(",");
            let mut c =
                Cluster { dir: tempfile::tempdir().expect("temp dir"), nodes: Vec::new(), started: 0 };
            for (id, client, peer) in addrs {
                c.spawn(id, client, peer, &["--initial-cluster", &initial]);
            }
            match (1..=3).try_for_each(|id| c.wait_ready(id)) {
                Ok(()) => return c,
                // Dropping `c` stops the nodes that did start.
                Err(PortTaken(why)) => eprintln!("attempt {attempt}: {why}; starting again on other ports"),
            }
        }
        panic!("no cluster after {PORT_ATTEMPTS} attempts: a port was taken each time");
    }

    fn spawn(&mut self, id: u64, client: SocketAddr, peer: SocketAddr, extra: &[&str]) {
        self.started += 1;
        let name = format!("n{id}-{}", self.started);
        let stderr = self.dir.path().join(format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_keeld"))
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .arg("--client-addr")
            .arg(client.to_string())
            .arg("--peer-addr")
            .arg(peer.to_string())
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("create the stderr file"))
            .spawn()
            .expect("start keeld");
        self.nodes.push(Keeld { id, client, peer, child, stderr });
    }

    fn node(&mut self, id: u64) -> &mut Keeld {
        self.nodes.iter_mut().find(|n| n.id == id).expect("a node of this cluster")
    }

    /// Forgets node `id`, which has exited.
    fn forget(&mut self, id: u64) {
        self.nodes.retain(|n| n.id != id);
    }

    /// Waits until node `id` answers `GET /ready` with 200. Fails the test if it exits, unless
    /// because one of its ports was taken.
    fn wait_ready(&mut self, id: u64) -> Result<(), PortTaken> {
        let node = self.node(id);
        let client = node.client;
        wait_until(&format!("keeld {id} ready at {client}"), || {
            if let Some(status) = node.child.try_wait().map_err(|e| e.to_string())? {
                let log = std::fs::read_to_string(&node.stderr).unwrap_or_default();
                if log.contains("Address already in use") {
                    return Ok(Err(PortTaken(format!("keeld {id}: {}", log.trim()))));
                }
                panic!("keeld {id} exited before it was ready: {status}");
            }
            http_ready(client).map(Ok)
        })
    }

    /// The founding members' client addresses, as etcdctl's `--endpoints`.
    fn endpoints(&self) -> String {
        self.nodes.iter().filter(|n| n.id <= 3).map(|n| n.client.to_string()).collect::<Vec<_>>().join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(&n.stderr).unwrap_or_else(|e| format!("(unreadable: {e})"));
                eprintln!("----- keeld {} (client {}, peer {}) stderr -----\n{log}", n.id, n.client, n.peer);
            }
        }
    }
}

/// Runs etcdctl (v3 API) with bounded dial and command timeouts.
struct Etcdctl(PathBuf);

impl Etcdctl {
    /// Finds `etcdctl` on PATH, or fails the test saying how to install it.
    fn find() -> Etcdctl {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path).map(|dir| dir.join("etcdctl")).find(|p| p.is_file()).map(Etcdctl).expect(
            "etcdctl is not on PATH: this test runs the real etcdctl; install it with \
             `apt-get install etcd-client`",
        )
    }

    fn run(&self, endpoints: &str, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(&self.0)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=5s", "--command-timeout=10s"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start etcdctl");
        // Dropping stdin after the input closes it (etcdctl's txn reads until EOF). A write error
        // means etcdctl exited early; its output says why.
        let _ = child.stdin.take().expect("piped stdin").write_all(stdin.as_bytes());
        child.wait_with_output().expect("etcdctl's output")
    }

    /// Runs a command that must succeed; answers its stdout.
    fn ok(&self, endpoints: &str, args: &[&str]) -> String {
        self.ok_with_input(endpoints, args, "")
    }

    fn ok_with_input(&self, endpoints: &str, args: &[&str], stdin: &str) -> String {
        let out = self.run(endpoints, args, stdin);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "etcdctl {args:?} failed ({}):\n{stdout}{stderr}", out.status);
        stdout.into_owned()
    }

    /// Runs `args` until it prints `expected` (a change that reaches members one by one).
    fn wait_output(&self, endpoints: &str, args: &[&str], expected: &str) {
        wait_until(&format!("etcdctl {args:?} prints {expected:?}"), || {
            let out = self.run(endpoints, args, "");
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && stdout == expected {
                Ok(())
            } else {
                Err(format!("{}{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr)))
            }
        });
    }
}

#[test]
fn kv_commands() {
    let ctl = Etcdctl::find();
    let c = Cluster::start();
    let all = c.endpoints();

    assert_eq!("OK\n", ctl.ok(&all, &["put", "k", "v"]));
    assert_eq!("k\nv\n", ctl.ok(&all, &["get", "k"]));
    assert_eq!("", ctl.ok(&all, &["get", "missing"]));
    for n in &c.nodes {
        // A linearizable read through this member first: its serializable read then sees the put.
        let ep = n.client.to_string();
        assert_eq!("k\nv\n", ctl.ok(&ep, &["get", "k"]), "linearizable get at node {}", n.id);
        assert_eq!(
            "k\nv\n",
            ctl.ok(&ep, &["get", "k", "--consistency=s"]),
            "serializable get at node {}",
            n.id
        );
    }

    for (k, v) in [("p1", "a"), ("p2", "b"), ("p3", "c"), ("q", "x")] {
        assert_eq!("OK\n", ctl.ok(&all, &["put", k, v]));
    }
    assert_eq!("p1\na\np2\nb\np3\nc\n", ctl.ok(&all, &["get", "--prefix", "p"]));
    assert_eq!("p1\na\np2\nb\n", ctl.ok(&all, &["get", "--prefix", "p", "--limit", "2"]));
    assert_eq!("p1\n\np2\n\np3\n\n", ctl.ok(&all, &["get", "--prefix", "p", "--keys-only"]));

    assert_eq!("1\n", ctl.ok(&all, &["del", "k"]));
    assert_eq!("0\n", ctl.ok(&all, &["del", "k"]));
    assert_eq!("", ctl.ok(&all, &["get", "k"]));
    assert_eq!("3\n", ctl.ok(&all, &["del", "--prefix", "p"]));
    assert_eq!("", ctl.ok(&all, &["get", "--prefix", "p"]));
    assert_eq!("q\nx\n", ctl.ok(&all, &["get", "q"]), "a key outside the prefix stays");

    // txn reads compares, a blank line, success ops, a blank line, failure ops.
    assert_eq!("OK\n", ctl.ok(&all, &["put", "k", "v"]));
    let succeeds = "value(\"k\") = \"v\"\nversion(\"k\") = \"1\"\n\nput k v2\nget k\n\nput k wrong\n\n";
    assert_eq!("SUCCESS\n\nOK\n\nk\nv2\n", ctl.ok_with_input(&all, &["txn"], succeeds));
    assert_eq!("k\nv2\n", ctl.ok(&all, &["get", "k"]));
    let fails = "value(\"k\") = \"v\"\n\nput k v3\n\nput f yes\nget k\ndel nothing\n\n";
    assert_eq!("FAILURE\n\nOK\n\nk\nv2\n\n0\n", ctl.ok_with_input(&all, &["txn"], fails));
    assert_eq!("k\nv2\n", ctl.ok(&all, &["get", "k"]), "the success branch did not run");
    assert_eq!("f\nyes\n", ctl.ok(&all, &["get", "f"]), "the failure branch ran");
}

/// One line of `endpoint status`: (endpoint, member id, is leader).
fn endpoint_status(ctl: &Etcdctl, endpoints: &str) -> Vec<(String, u64, bool)> {
    let out = ctl.ok(endpoints, &["endpoint", "status"]);
    out.lines()
        .map(|line| {
            // endpoint, id, version, db size, is leader, is learner, raft term, raft index,
            // raft applied index, errors
            let f: Vec<&str> = line.split(", ").collect();
            assert_eq!(10, f.len(), "endpoint status line {line:?}");
            assert_eq!((SERVER_VERSION, "false", ""), (f[2], f[5], f[9]), "endpoint status line {line:?}");
            assert!(f[6..9].iter().all(|n| n.parse::<u64>().is_ok()), "endpoint status line {line:?}");
            let id = u64::from_str_radix(f[1], 16).expect("a hex member id");
            (f[0].to_string(), id, f[4] == "true")
        })
        .collect()
}

/// The one member that `endpoint status` shows as leader.
fn the_leader(status: &[(String, u64, bool)]) -> u64 {
    let leaders: Vec<u64> = status.iter().filter(|s| s.2).map(|s| s.1).collect();
    assert_eq!(1, leaders.len(), "exactly one leader in {status:?}");
    leaders[0]
}

#[test]
fn cluster_commands() {
    let ctl = Etcdctl::find();
    let mut c = Cluster::start();
    let all = c.endpoints();
    let cluster = cluster_id("keel");
    let line = |n: &Keeld| {
        format!("{:x}, started, keel{}, http://{}, http://{}, false\n", n.id, n.id, n.peer, n.client)
    };
    let founders: String = c.nodes.iter().map(line).collect();

    // Each member's view of the others' published addresses arrives with the log.
    ctl.wait_output(&all, &["member", "list"], &founders);

    let status = endpoint_status(&ctl, &all);
    let expected: Vec<(String, u64)> = c.nodes.iter().map(|n| (n.client.to_string(), n.id)).collect();
    assert_eq!(expected, status.iter().map(|s| (s.0.clone(), s.1)).collect::<Vec<_>>());
    let leader = the_leader(&status);

    let out = ctl.run(&all, &["endpoint", "health"], "");
    assert!(out.status.success(), "endpoint health: {out:?}");
    // etcdctl 3.4 prints health to stderr, one line per endpoint in the order they answer.
    let mut healthy: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| l.split_once(" took = ").map_or(l, |(head, _)| head).to_string())
        .collect();
    healthy.sort();
    let mut expected: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("{} is healthy: successfully committed proposal:", n.client))
        .collect();
    expected.sort();
    assert_eq!(expected, healthy);

    // move-leader finds the leader among the endpoints and asks it to hand over.
    let target = c.nodes.iter().map(|n| n.id).find(|id| *id != leader).expect("a follower");
    assert_eq!(
        format!("Leadership transferred from {leader:x} to {target:x}\n"),
        ctl.ok(&all, &["move-leader", &format!("{target:x}")])
    );
    assert_eq!(target, the_leader(&endpoint_status(&ctl, &all)));

    // A learner joins, catches up, is promoted, and is removed again.
    let not_in_sync = |stderr: &str| {
        stderr.contains("not in sync")
            || stderr.contains("can only promote a learner member which is in sync with leader")
    };
    let removed = |id: u64| format!("Member {id:16x} removed from cluster {cluster:16x}\n");
    let mut attempt = 1;
    let (id4, hex, client4, peer4) = loop {
        let (client4, peer4) = (free_addr(), free_addr());
        let added =
            ctl.ok(&all, &["member", "add", "n4", "--learner", &format!("--peer-urls=http://{peer4}")]);
        let hex = added.split_whitespace().nth(1).expect("the new member's id").to_string();
        let id4 = u64::from_str_radix(&hex, 16).expect("a hex member id");
        let initial: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("keel{}=http://{}", n.id, n.peer))
            .chain([format!("n4=http://{peer4}")])
            .collect();
        assert_eq!(
            format!(
                "Member {id4:16x} added to cluster {cluster:16x}\n\n\
                 ETCD_NAME=\"n4\"\n\
                 ETCD_INITIAL_CLUSTER=\"{}\"\n\
                 ETCD_INITIAL_ADVERTISE_PEER_URLS=\"http://{peer4}\"\n\
                 ETCD_INITIAL_CLUSTER_STATE=\"existing\"\n",
                initial.join(",")
            ),
            added
        );
        let unstarted = format!("{id4:x}, unstarted, , http://{peer4}, , true\n");
        ctl.wait_output(&all, &["member", "list"], &format!("{founders}{unstarted}"));

        // The leader refuses to promote a learner until it holds most of the leader's log.
        let out = ctl.run(&all, &["member", "promote", &hex], "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && not_in_sync(&stderr), "promoting a learner that never ran: {out:?}");

        c.spawn(id4, client4, peer4, &["--initial-cluster-state", "existing"]);
        match c.wait_ready(id4) {
            Ok(()) => break (id4, hex, client4, peer4),
            Err(PortTaken(why)) if attempt < PORT_ATTEMPTS => {
                eprintln!("attempt {attempt}: {why}; adding the learner again on other ports");
                c.forget(id4);
                assert_eq!(removed(id4), ctl.ok(&all, &["member", "remove", &hex]));
                ctl.wait_output(&all, &["member", "list"], &founders);
                attempt += 1;
            }
            Err(PortTaken(why)) => panic!("{why}, {PORT_ATTEMPTS} times"),
        }
    };
    let promoted = wait_until("member promote", || {
        let out = ctl.run(&all, &["member", "promote", &hex], "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        assert!(not_in_sync(&stderr), "member promote failed: {stderr}");
        Err(stderr.into_owned())
    });
    assert_eq!(format!("Member {id4:16x} promoted in cluster {cluster:16x}\n"), promoted);
    let voter4 = format!("{id4:x}, started, keel{id4}, http://{peer4}, http://{client4}, false\n");
    ctl.wait_output(&all, &["member", "list"], &format!("{founders}{voter4}"));

    assert_eq!(removed(id4), ctl.ok(&all, &["member", "remove", &hex]));
    ctl.wait_output(&all, &["member", "list"], &founders);
    assert_eq!(
        target,
        the_leader(&endpoint_status(&ctl, &all)),
        "the removed member did not disturb the leader"
    );
    assert_eq!("OK\n", ctl.ok(&all, &["put", "after", "remove"]));
}
