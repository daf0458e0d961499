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
use std::process::ChildStdin;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

mod procs;

use keel_kv::api::cluster_id;
use keel_kv::etcd::SERVER_VERSION;
use procs::Etcd;

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

/// The file `name` in a directory of PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// Runs etcdctl (v3 API) with bounded dial and command timeouts.
struct Etcdctl(PathBuf);

impl Etcdctl {
    /// Finds `etcdctl` on PATH, or fails the test saying how to install it.
    fn find() -> Etcdctl {
        on_path("etcdctl").map(Etcdctl).expect(
            "etcdctl is not on PATH: this test runs the real etcdctl; install it with \
             `apt-get install etcd-client`",
        )
    }

    fn command(&self, endpoints: &str, args: &[&str]) -> Command {
        let mut c = Command::new(&self.0);
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=5s", "--command-timeout=10s"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, endpoints: &str, args: &[&str], stdin: &str) -> Output {
        let mut child = self.command(endpoints, args).spawn().expect("start etcdctl");
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
    endpoint_status_with(ctl, endpoints, &[])
}

fn endpoint_status_with(ctl: &Etcdctl, endpoints: &str, flags: &[&str]) -> Vec<(String, u64, bool)> {
    let out = ctl.ok(endpoints, &[&["endpoint", "status"], flags].concat());
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
    // `--cluster` dials the member list's URLs, and etcdctl 3.4 then sends `http://host:port` as
    // HTTP/2's `:authority` (see keel-kv's h2_authority); so do `http://` endpoints.
    let urls: Vec<String> = c.nodes.iter().map(|n| format!("http://{}", n.client)).collect();
    let mut by_cluster = endpoint_status_with(&ctl, &urls[0], &["--cluster"]);
    by_cluster.sort();
    let mut by_url = endpoint_status(&ctl, &urls.join(","));
    by_url.sort();
    let mut listed: Vec<(String, u64, bool)> =
        status.iter().map(|(ep, id, l)| (format!("http://{ep}"), *id, *l)).collect();
    listed.sort();
    assert_eq!((&listed, &listed), (&by_cluster, &by_url));
    let hashes = ctl.ok(&urls[0], &["endpoint", "hashkv", "--cluster"]);
    assert_eq!(
        3,
        hashes.lines().filter(|l| l.starts_with("http://") && l.contains(", ")).count(),
        "{hashes}"
    );

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

// ---------------------------------------------------------------------------------------------
// Watch, reads at past revisions and compaction: one etcdctl script, run against etcd 3.4 first
// (a single-member cluster) and then against keeld. Every expectation in the scripts is what
// etcdctl printed for that command against Debian's etcd 3.4.23; running it against etcd first
// checks that this is still so, and a failure then says which system printed what.
// ---------------------------------------------------------------------------------------------

/// A system a script runs against.
struct Target {
    name: &'static str,
    /// Every member, as one `--endpoints` list (writes, compactions).
    all: String,
    /// Every member alone (the reads that must see a compaction).
    members: Vec<String>,
    /// The members the watches run on, each its own: keeld's leader and a follower; etcd's one
    /// member twice, so that both systems run the very same commands.
    watchers: Vec<String>,
}

impl Target {
    fn etcd(e: &Etcd) -> Target {
        let ep = e.client.clone();
        Target { name: "etcd", all: ep.clone(), members: vec![ep.clone()], watchers: vec![ep.clone(), ep] }
    }

    fn keel(ctl: &Etcdctl, c: &Cluster) -> Target {
        let all = c.endpoints();
        let leader = the_leader(&endpoint_status(ctl, &all));
        let addr = |id: u64| c.nodes.iter().find(|n| n.id == id).expect("a member").client.to_string();
        let follower = c.nodes.iter().map(|n| n.id).find(|id| *id != leader).expect("a follower");
        Target {
            name: "keeld",
            all,
            members: c.nodes.iter().map(|n| n.client.to_string()).collect(),
            watchers: vec![addr(leader), addr(follower)],
        }
    }
}

/// What a pipe of a running etcdctl has delivered so far.
#[derive(Default)]
struct Pipe {
    bytes: Vec<u8>,
    /// The pipe reached its end: the process has exited (or closed it).
    closed: bool,
}

/// Copies `from` into a shared [`Pipe`] as it arrives, on a thread of its own.
fn collect(mut from: impl Read + Send + 'static) -> (Arc<Mutex<Pipe>>, JoinHandle<()>) {
    let pipe = Arc::new(Mutex::new(Pipe::default()));
    let to = pipe.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            let n = from.read(&mut chunk).unwrap_or(0);
            let mut p = to.lock().expect("pipe lock");
            if n == 0 {
                p.closed = true;
                return;
            }
            p.bytes.extend_from_slice(&chunk[..n]);
        }
    });
    (pipe, reader)
}

/// An etcdctl that runs until it is stopped (a watch), its output collected as it comes.
/// Dropping it kills it.
struct Running {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Pipe>>,
    err: Arc<Mutex<Pipe>>,
    readers: Vec<JoinHandle<()>>,
    /// Bytes of stdout a probe took: later expectations are on what follows them.
    taken: usize,
}

impl Etcdctl {
    fn spawn(&self, endpoint: &str, args: &[&str]) -> Running {
        let mut child = self.command(endpoint, args).spawn().expect("start etcdctl");
        let (out, r1) = collect(child.stdout.take().expect("piped stdout"));
        let (err, r2) = collect(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take();
        Running {
            what: format!("etcdctl {args:?} at {endpoint}"),
            child,
            stdin,
            out,
            err,
            readers: vec![r1, r2],
            taken: 0,
        }
    }

    /// Runs a command that must fail: its exit code and the last line it printed on stderr
    /// (etcdctl logs a JSON line with a timestamp before its `Error: ...` line).
    fn fails(&self, endpoints: &str, args: &[&str]) -> (Option<i32>, String) {
        let out = self.run(endpoints, args, "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "etcdctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        (out.status.code(), stderr.lines().last().unwrap_or_default().to_string())
    }
}

impl Running {
    /// What it printed on stdout after what the probes took.
    fn stdout(&self) -> String {
        let p = self.out.lock().expect("pipe lock");
        String::from_utf8_lossy(&p.bytes[self.taken.min(p.bytes.len())..]).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().expect("pipe lock").bytes).into_owned()
    }

    fn closed(&self) -> bool {
        self.out.lock().expect("pipe lock").closed && self.err.lock().expect("pipe lock").closed
    }

    /// Writes one line of input (interactive mode's commands).
    fn input(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").unwrap_or_else(|e| panic!("{}: write {line:?}: {e}", self.what));
    }

    /// Waits until stdout (after the probes) is exactly `expected`. Fails at once when it is
    /// anything `expected` does not begin with, or when the process has exited without printing
    /// all of it.
    #[track_caller]
    fn expect_stdout(&self, expected: &str) {
        self.expect(expected, "stdout", Running::stdout);
    }

    /// As [`expect_stdout`](Self::expect_stdout), for everything on stderr.
    #[track_caller]
    fn expect_stderr(&self, expected: &str) {
        self.expect(expected, "stderr", Running::stderr);
    }

    #[track_caller]
    fn expect(&self, expected: &str, which: &str, printed: fn(&Running) -> String) {
        wait_until(&format!("{} prints {expected:?} on {which}", self.what), || {
            let closed = self.closed();
            let now = printed(self);
            if now == expected {
                return Ok(());
            }
            if !expected.starts_with(&now) || closed {
                panic!(
                    "{}: {which} is {now:?}, expected {expected:?}{}\nstdout: {:?}\nstderr: {:?}",
                    self.what,
                    if closed { " (it has exited)" } else { "" },
                    self.stdout(),
                    self.stderr()
                );
            }
            Err(now)
        });
    }

    /// Closes stdin and waits for the process to exit (and its pipes to close): its exit code,
    /// stdout (after the probes) and stderr.
    fn finish(mut self) -> (Option<i32>, String, String) {
        drop(self.stdin.take());
        let status = wait_until(&format!("{} exits", self.what), || {
            match self.child.try_wait().map_err(|e| e.to_string())? {
                Some(status) if self.closed() => Ok(status),
                _ => Err(format!("stdout {:?}, stderr {:?}", self.stdout(), self.stderr())),
            }
        });
        (status.code(), self.stdout(), self.stderr())
    }

    /// Kills it; what it printed on stdout (after the probes).
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            r.join().expect("a pipe reader panicked");
        }
        self.stdout()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a watch started without `--rev` (from "now") is shown to be in place: etcdctl prints
/// nothing when the server has created it, so a probe writes until the watch prints the write.
#[derive(Clone)]
enum Probe {
    /// Puts this key with the values `probe-1`, `probe-2`, ...
    Key(String),
    /// Puts a new key each round, this prefix and the round (for a watch with `--prev-kv`).
    Fresh(String),
}

impl Probe {
    /// Round `n`'s write: (key, value).
    fn write(&self, n: usize) -> (String, String) {
        match self {
            Probe::Key(k) => (k.clone(), format!("probe-{n}")),
            Probe::Fresh(p) => (format!("{p}{n}"), "probe".to_string()),
        }
    }

    /// What a watch prints for rounds `from..=to`.
    fn printed(&self, from: usize, to: usize) -> String {
        (from..=to).map(|n| self.write(n)).map(|(k, v)| format!("PUT\n{k}\n{v}\n")).collect()
    }
}

/// How long one probe round waits for a watch that has printed nothing before it writes again.
const PROBE_ROUND: Duration = Duration::from_millis(500);

/// Waits until every watch (started without `--rev`) is in place, by writing each one's probe
/// round after round until each has printed the newest round; then sets what they printed
/// aside. A watch prints every round from the first one after it was created, in order, and
/// nothing else: anything else fails the test.
fn probe(ctl: &Etcdctl, all: &str, watches: &mut [(&mut Running, Probe)]) {
    let start = Instant::now();
    let mut round = 0;
    loop {
        round += 1;
        let mut writes: Vec<(String, String)> = watches.iter().map(|(_, p)| p.write(round)).collect();
        writes.sort();
        writes.dedup();
        for (k, v) in &writes {
            assert_eq!("OK\n", ctl.ok(all, &["put", k, v]), "probe put {k}");
        }
        let round_start = Instant::now();
        loop {
            // Per watch: None (nothing yet), Some(false) (some rounds, not yet this one), Some(true).
            let states: Vec<Option<bool>> = watches
                .iter()
                .map(|(w, p)| {
                    let out = w.stdout();
                    if out.is_empty() {
                        return None;
                    }
                    if (1..=round).any(|from| p.printed(from, round) == out) {
                        return Some(true);
                    }
                    if (1..=round).any(|from| p.printed(from, round).starts_with(&out)) {
                        return Some(false);
                    }
                    panic!("{}: a probed watch printed {out:?}; stderr {:?}", w.what, w.stderr())
                })
                .collect();
            if states.iter().all(|s| *s == Some(true)) {
                for (w, _) in watches.iter_mut() {
                    w.taken += w.stdout().len();
                }
                return;
            }
            assert!(start.elapsed() < DEADLINE, "watches still not in place after {DEADLINE:?}: {states:?}");
            let waiting = states.contains(&Some(false));
            if !waiting && round_start.elapsed() > PROBE_ROUND {
                break; // a watch not in place yet: write again
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The store's revision now (`get -w json`'s header).
fn revision(ctl: &Etcdctl, all: &str) -> i64 {
    let out = ctl.ok(all, &["get", "revision-of-the-store", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["header"]["revision"].as_i64().unwrap_or_else(|| panic!("no header revision in {out}"))
}

const COMPACTED: &str = "Error: etcdserver: mvcc: required revision has been compacted";
const FUTURE: &str = "Error: etcdserver: mvcc: required revision is a future revision";
/// What `etcdctl watch --rev R` prints on stderr for an R below the compaction, and its exit code.
const WATCH_COMPACTED: &str = "watch was canceled (etcdserver: mvcc: required revision has been compacted)\n\
                               Error: watch is canceled by the server\n";
const WATCH_CANCELED_EXIT: Option<i32> = Some(5);

/// Runs a watch that the server cancels at once (its start revision is compacted): it prints
/// nothing on stdout and etcd's two lines on stderr, and exits with 5.
#[track_caller]
fn watch_is_compacted(ctl: &Etcdctl, t: &Target, ep: &str, args: &[&str]) {
    let w = ctl.spawn(ep, args);
    w.expect_stderr(WATCH_COMPACTED);
    let (code, out, err) = w.finish();
    assert_eq!(
        (WATCH_CANCELED_EXIT, "", WATCH_COMPACTED),
        (code, out.as_str(), err.as_str()),
        "{}: etcdctl {args:?} at {ep}",
        t.name
    );
}

/// `etcdctl watch` (a key, a prefix with `--prev-kv`, a range, `--rev`, an exec command),
/// `get --rev` and `compaction [--physical]`, with the reads and watches below a compaction.
fn watch_script(ctl: &Etcdctl, t: &Target) {
    let all = t.all.as_str();
    let name = t.name;
    let put = |k: &str, v: &str| assert_eq!("OK\n", ctl.ok(all, &["put", k, v]), "{name}: put {k} {v}");
    let del = |k: &str| assert_eq!("1\n", ctl.ok(all, &["del", k]), "{name}: del {k}");
    let spawn_all =
        |args: &[&str]| -> Vec<Running> { t.watchers.iter().map(|ep| ctl.spawn(ep, args)).collect() };

    // Watches from now, on each watching member: a key, a prefix with prev_kv, the range [b, d).
    let mut key_w = spawn_all(&["watch", "k"]);
    let mut prefix_w = spawn_all(&["watch", "--prefix", "p", "--prev-kv"]);
    let mut range_w = spawn_all(&["watch", "b", "d"]);
    let mut probes: Vec<(&mut Running, Probe)> = Vec::new();
    probes.extend(key_w.iter_mut().map(|w| (w, Probe::Key("k".into()))));
    probes.extend(prefix_w.iter_mut().map(|w| (w, Probe::Fresh("p/probe-".into()))));
    probes.extend(range_w.iter_mut().map(|w| (w, Probe::Key("b".into()))));
    probe(ctl, all, &mut probes);

    let base = revision(ctl, all);
    let r = |n: i64| (base + n).to_string();
    put("k", "v1"); // base + 1
    put("k", "v2"); // 2
    put("p/a", "1"); // 3
    put("p/a", "2"); // 4
    del("k"); // 5
    del("p/a"); // 6
    put("c", "3"); // 7
    put("d", "4"); // 8
                   // 9: one revision, two keys, written out of key order: events come in the order written.
    assert_eq!("SUCCESS\n\nOK\n\nOK\n", ctl.ok_with_input(all, &["txn"], "\nput p/y 2\nput p/x 1\n\n\n"));
    put("q", "x"); // 10
                   // 11..=13: the last write each watch sees, so that nothing unexpected came before it.
    put("k", "end");
    put("p/z", "end");
    put("b", "end");

    let key_events = "PUT\nk\nv1\nPUT\nk\nv2\nDELETE\nk\n\nPUT\nk\nend\n";
    let prefix_events = "PUT\np/a\n1\nPUT\np/a\n1\np/a\n2\nDELETE\np/a\n2\np/a\n\n\
                         PUT\np/y\n2\nPUT\np/x\n1\nPUT\np/z\nend\n";
    let range_events = "PUT\nc\n3\nPUT\nb\nend\n";
    for (ws, expected) in [(key_w, key_events), (prefix_w, prefix_events), (range_w, range_events)] {
        for w in ws {
            w.expect_stdout(expected);
            assert_eq!(expected, w.stop(), "{name}: nothing after the last write");
        }
    }

    // Watches from a past revision replay history, then go on live.
    let everything = "PUT\nk\nv1\nPUT\nk\nv2\nPUT\np/a\n1\nPUT\np/a\n2\nDELETE\nk\n\nDELETE\np/a\n\n\
                      PUT\nc\n3\nPUT\nd\n4\nPUT\np/y\n2\nPUT\np/x\n1\nPUT\nq\nx\n\
                      PUT\nk\nend\nPUT\np/z\nend\nPUT\nb\nend\n";
    // An exec command runs once per event, after the response's events are printed; a replay
    // is one response, whose header has the store's revision.
    let exec = [
        "sh",
        "-c",
        "echo \"$ETCD_WATCH_REVISION $ETCD_WATCH_EVENT_TYPE $ETCD_WATCH_KEY $ETCD_WATCH_VALUE\"",
    ];
    let rev1 = format!("--rev={}", r(1));
    let mut exec_args = vec!["watch", rev1.as_str(), "--prefix", "p/"];
    exec_args.push("--");
    exec_args.extend(exec);
    let now = r(13);
    let exec_printed = format!(
        "PUT\np/a\n1\nPUT\np/a\n2\nDELETE\np/a\n\nPUT\np/y\n2\nPUT\np/x\n1\nPUT\np/z\nend\n\
         {now} \"PUT\" \"p/a\" \"1\"\n{now} \"PUT\" \"p/a\" \"2\"\n{now} \"DELETE\" \"p/a\" \"\"\n\
         {now} \"PUT\" \"p/y\" \"2\"\n{now} \"PUT\" \"p/x\" \"1\"\n{now} \"PUT\" \"p/z\" \"end\"\n"
    );
    let replay_key = spawn_all(&["watch", &rev1, "k"]);
    let replay_all = spawn_all(&["watch", &rev1, "--prefix", ""]);
    let replay_exec = spawn_all(&exec_args);
    for w in &replay_key {
        w.expect_stdout(key_events);
    }
    for w in &replay_all {
        w.expect_stdout(everything);
    }
    for w in &replay_exec {
        w.expect_stdout(&exec_printed);
    }
    put("k", "last"); // 14
    for w in replay_key {
        w.expect_stdout(&format!("{key_events}PUT\nk\nlast\n"));
        w.stop();
    }
    for w in replay_all {
        w.expect_stdout(&format!("{everything}PUT\nk\nlast\n"));
        w.stop();
    }
    for w in replay_exec {
        assert_eq!(exec_printed, w.stop(), "{name}: a watch on p/ sees nothing of k");
    }

    // Reads at past revisions.
    assert_eq!("k\nv1\n", ctl.ok(all, &["get", "k", "--rev", &r(1)]), "{name}");
    assert_eq!("k\nv2\n", ctl.ok(all, &["get", "k", "--rev", &r(4)]), "{name}");
    assert_eq!("", ctl.ok(all, &["get", "k", "--rev", &r(5)]), "{name}: deleted at that revision");
    assert_eq!("p/a\n2\n", ctl.ok(all, &["get", "p/a", "--rev", &r(4)]), "{name}");
    assert_eq!("", ctl.ok(all, &["get", "p/q", "p/z", "--rev", &r(8)]), "{name}");
    assert_eq!("p/x\n1\np/y\n2\n", ctl.ok(all, &["get", "p/q", "p/z", "--rev", &r(9)]), "{name}");
    assert_eq!("p/a\n\n", ctl.ok(all, &["get", "p/a", "--rev", &r(3), "--keys-only"]), "{name}");
    assert_eq!((Some(1), FUTURE.to_string()), ctl.fails(all, &["get", "k", "--rev", &r(100)]), "{name}");

    // Compaction at base + 4 (a put that replaced an older version of p/a).
    assert_eq!(format!("compacted revision {}\n", r(4)), ctl.ok(all, &["compaction", &r(4)]), "{name}");
    for m in &t.members {
        // Linearizable: also makes sure this member has applied the compaction.
        assert_eq!(
            (Some(1), COMPACTED.to_string()),
            ctl.fails(m, &["get", "k", "--rev", &r(3)]),
            "{name}: {m}"
        );
        assert_eq!("k\nv2\n", ctl.ok(m, &["get", "k", "--rev", &r(4)]), "{name}: {m}");
        assert_eq!("p/a\n2\n", ctl.ok(m, &["get", "p/a", "--rev", &r(4)]), "{name}: {m}");
    }
    for ep in &t.watchers {
        watch_is_compacted(ctl, t, ep, &["watch", "--rev", &r(3), "k"]);
        watch_is_compacted(ctl, t, ep, &["watch", "--rev", &r(1), "--prefix", ""]);
        // From the compaction revision on is still there; the event at it has no prev_kv (the
        // version it replaced is compacted), later ones do.
        let w = ctl.spawn(ep, &["watch", "--rev", &r(4), "--prefix", "p", "--prev-kv"]);
        w.expect_stdout("PUT\np/a\n2\nDELETE\np/a\n2\np/a\n\nPUT\np/y\n2\nPUT\np/x\n1\nPUT\np/z\nend\n");
        w.stop();
        let w = ctl.spawn(ep, &["watch", "--rev", &r(4), "k"]);
        w.expect_stdout("DELETE\nk\n\nPUT\nk\nend\nPUT\nk\nlast\n");
        w.stop();
    }

    // A physical compaction at base + 10; compacting again, or past the store, fails.
    assert_eq!(
        format!("compacted revision {}\n", r(10)),
        ctl.ok(all, &["compaction", "--physical", &r(10)]),
        "{name}"
    );
    assert_eq!((Some(1), COMPACTED.to_string()), ctl.fails(all, &["compaction", &r(10)]), "{name}");
    assert_eq!((Some(1), COMPACTED.to_string()), ctl.fails(all, &["compaction", &r(6)]), "{name}");
    assert_eq!((Some(1), FUTURE.to_string()), ctl.fails(all, &["compaction", &r(100)]), "{name}");
    for m in &t.members {
        assert_eq!(
            (Some(1), COMPACTED.to_string()),
            ctl.fails(m, &["get", "k", "--rev", &r(9)]),
            "{name}: {m}"
        );
        assert_eq!("q\nx\n", ctl.ok(m, &["get", "q", "--rev", &r(10)]), "{name}: {m}");
    }
    for ep in &t.watchers {
        watch_is_compacted(ctl, t, ep, &["watch", "--rev", &r(9), "--prefix", "p"]);
        let w = ctl.spawn(ep, &["watch", "--rev", &r(10), "--prefix", ""]);
        w.expect_stdout("PUT\nq\nx\nPUT\nk\nend\nPUT\np/z\nend\nPUT\nb\nend\nPUT\nk\nlast\n");
        w.stop();
    }
    // A watch from a revision still to come sees nothing before it.
    let future = spawn_all(&["watch", "--rev", &r(16), "--prefix", "f"]);
    put("f/1", "not seen"); // 15
    put("f/2", "seen"); // 16
    for w in future {
        w.expect_stdout("PUT\nf/2\nseen\n");
        w.stop();
    }
}

/// `etcdctl watch -i`: watch commands read from stdin, each its own watch on one stream; a bad
/// command is reported and skipped; a watch below the compaction is canceled and the others go
/// on; the end of input ends etcdctl. (etcdctl 3.4's interactive mode has no cancel command.)
fn interactive_script(ctl: &Etcdctl, t: &Target, ep: &str, run: usize) {
    let all = t.all.as_str();
    let name = t.name;
    let put = |k: &str, v: &str| assert_eq!("OK\n", ctl.ok(all, &["put", k, v]), "{name}: put {k} {v}");
    let mut w = ctl.spawn(ep, &["watch", "-i"]);
    w.input("watch k");
    probe(ctl, all, &mut [(&mut w, Probe::Key("k".into()))]);
    w.input("watch --prefix p --prev-kv");
    probe(ctl, all, &mut [(&mut w, Probe::Fresh(format!("p/probe-{run}-")))]);
    w.input("bogus k");
    w.input("watch");
    let mut stderr = "Invalid command bogus k (only support watch)\n\
                      Invalid command watch (command type or key is not provided)\n"
        .to_string();
    w.expect_stderr(&stderr);

    let base = revision(ctl, all);
    let r = |n: i64| (base + n).to_string();
    let mut stdout = String::new();
    let mut step = |w: &Running, write: &dyn Fn(), printed: &str| {
        write();
        stdout.push_str(printed);
        w.expect_stdout(&stdout);
    };
    step(&w, &|| put("k", "i1"), "PUT\nk\ni1\n"); // base + 1
    step(&w, &|| put("p/b", "i2"), "PUT\np/b\ni2\n"); // 2
    step(&w, &|| put("p/b", "i3"), "PUT\np/b\ni2\np/b\ni3\n"); // 3
    step(&w, &|| assert_eq!("1\n", ctl.ok(all, &["del", "p/b"])), "DELETE\np/b\ni3\np/b\n\n"); // 4
    assert_eq!(format!("compacted revision {}\n", r(2)), ctl.ok(all, &["compaction", &r(2)]), "{name}");
    assert_eq!((Some(1), COMPACTED.to_string()), ctl.fails(ep, &["get", "p/b", "--rev", &r(1)]), "{name}");
    w.input(&format!("watch --rev={} r", r(1)));
    stderr.push_str("watch was canceled (etcdserver: mvcc: required revision has been compacted)\n");
    w.expect_stderr(&stderr);
    w.input(&format!("watch --rev={} p/b", r(2)));
    step(&w, &|| {}, "PUT\np/b\ni2\nPUT\np/b\ni3\nDELETE\np/b\n\n");
    step(&w, &|| put("k", "i4"), "PUT\nk\ni4\n");
    let (code, out, err) = w.finish();
    stderr.push_str("Error: Error reading watch request line: EOF\n");
    assert_eq!((Some(3), stdout, stderr), (code, out, err), "{name}: watch -i at {ep}, stdin closed");
}

/// `etcdctl watch -w json`: the responses themselves, ids aside (the header's cluster id, member
/// id and raft term differ between the systems).
fn json_script(ctl: &Etcdctl, t: &Target) {
    let all = t.all.as_str();
    let name = t.name;
    let base = revision(ctl, all);
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    for (k, v) in [("j", "a"), ("j", "b")] {
        assert_eq!("OK\n", ctl.ok(all, &["put", k, v]), "{name}");
    }
    assert_eq!("1\n", ctl.ok(all, &["del", "j"]), "{name}");
    assert_eq!("SUCCESS\n\nOK\n\nOK\n", ctl.ok_with_input(all, &["txn"], "\nput j2 y\nput j1 x\n\n\n"));
    let kv = |key: &str, value: &str, create: i64, modified: i64, version: i64| {
        serde_json::json!({"key": b64(key), "create_revision": base + create, "mod_revision": base + modified,
            "version": version, "value": b64(value)})
    };
    let deleted = serde_json::json!({"key": b64("j"), "mod_revision": base + 3});
    let response = |events: Vec<serde_json::Value>| {
        serde_json::json!({"Header": {"revision": base + 4}, "Events": events, "CompactRevision": 0,
            "Canceled": false, "Created": false})
    };
    let replay = response(vec![
        serde_json::json!({"kv": kv("j", "a", 1, 1, 1)}),
        serde_json::json!({"kv": kv("j", "b", 1, 2, 2), "prev_kv": kv("j", "a", 1, 1, 1)}),
        serde_json::json!({"type": 1, "kv": deleted, "prev_kv": kv("j", "b", 1, 2, 2)}),
        serde_json::json!({"kv": kv("j2", "y", 4, 4, 1)}),
        serde_json::json!({"kv": kv("j1", "x", 4, 4, 1)}),
    ]);
    let after_compaction = response(vec![
        serde_json::json!({"kv": kv("j", "b", 1, 2, 2)}),
        serde_json::json!({"type": 1, "kv": deleted, "prev_kv": kv("j", "b", 1, 2, 2)}),
        serde_json::json!({"kv": kv("j2", "y", 4, 4, 1)}),
        serde_json::json!({"kv": kv("j1", "x", 4, 4, 1)}),
    ]);
    let canceled = serde_json::json!({"Header": {}, "Events": [], "CompactRevision": base + 2,
        "Canceled": true, "Created": false});

    let rev = |n: i64| format!("--rev={}", base + n);
    let watch_json = |ep: &str, args: &[&str]| -> serde_json::Value {
        let w = ctl.spawn(ep, args);
        let line = wait_until(&format!("{name}: etcdctl {args:?} prints a response"), || {
            let out = w.stdout();
            match out.split_once('\n') {
                Some((line, _)) => Ok(line.to_string()),
                None if w.closed() => panic!("{name}: etcdctl {args:?} exited: {out:?} {:?}", w.stderr()),
                None => Err(out),
            }
        });
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let header = v["Header"].as_object_mut().unwrap_or_else(|| panic!("no header in {line}"));
        for id in ["cluster_id", "member_id", "raft_term"] {
            assert!(header.remove(id).is_some(), "{name}: no {id} in {line}");
        }
        let rest = w.stop();
        assert_eq!(format!("{line}\n"), rest, "{name}: one response");
        v
    };
    for ep in &t.watchers {
        assert_eq!(
            replay,
            watch_json(ep, &["watch", &rev(1), "--prefix", "j", "--prev-kv", "-w", "json"]),
            "{name}"
        );
    }
    assert_eq!(
        format!("compacted revision {}\n", base + 2),
        ctl.ok(all, &["compaction", &(base + 2).to_string()])
    );
    for m in &t.members {
        assert_eq!(
            (Some(1), COMPACTED.to_string()),
            ctl.fails(m, &["get", "j", "--rev", &(base + 1).to_string()])
        );
    }
    for ep in &t.watchers {
        let args = ["watch", &rev(2), "--prefix", "j", "--prev-kv", "-w", "json"];
        assert_eq!(after_compaction, watch_json(ep, &args), "{name}");
        let args = ["watch", &rev(1), "--prefix", "j", "-w", "json"];
        assert_eq!(canceled, watch_json(ep, &args), "{name}: the cancel for a compacted start");
    }
}

#[test]
fn watch_get_rev_and_compaction_as_etcd() {
    let ctl = Etcdctl::find();
    {
        let e = Etcd::start(&[]);
        watch_script(&ctl, &Target::etcd(&e));
    }
    let c = Cluster::start();
    watch_script(&ctl, &Target::keel(&ctl, &c));
}

#[test]
fn interactive_watch_as_etcd() {
    let ctl = Etcdctl::find();
    {
        let e = Etcd::start(&[]);
        let t = Target::etcd(&e);
        for (run, ep) in t.watchers.iter().enumerate() {
            interactive_script(&ctl, &t, ep, run);
        }
    }
    let c = Cluster::start();
    let t = Target::keel(&ctl, &c);
    for (run, ep) in t.watchers.iter().enumerate() {
        interactive_script(&ctl, &t, ep, run);
    }
}

#[test]
fn watch_json_output_as_etcd() {
    let ctl = Etcdctl::find();
    {
        let e = Etcd::start(&[]);
        json_script(&ctl, &Target::etcd(&e));
    }
    let c = Cluster::start();
    json_script(&ctl, &Target::keel(&ctl, &c));
}

// ---------------------------------------------------------------------------------------------
// Leases, `lock` and `elect`: run against etcd 3.4 first (a single member), then against keeld,
// through its leader and a follower (which forwards keep-alives and time-to-live to the leader).
// etcdctl's `lock` and `elect` are etcd's client recipes (a session lease kept alive, txns,
// watches), not the Lock and Election services.
// ---------------------------------------------------------------------------------------------

/// The lease id in `lease <id> granted with TTL(<ttl>s)`, after checking the line is exactly that.
#[track_caller]
fn granted(name: &str, out: &str, ttl: i64) -> String {
    let id = out.split(' ').nth(1).unwrap_or_default().to_string();
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{name}: a %016x lease id in {out:?}"
    );
    assert_eq!(format!("lease {id} granted with TTL({ttl}s)\n"), out, "{name}");
    id
}

/// The remaining seconds `lease timetolive` printed, after checking the line is `expected` with
/// them filled in at `{r}`; and that they are between `low` and `high`.
#[track_caller]
fn remaining(name: &str, out: &str, expected: &str, low: i64, high: i64) -> i64 {
    let r: i64 = out
        .split_once("remaining(")
        .and_then(|(_, rest)| rest.split_once("s)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no remaining TTL in {out:?}"));
    assert_eq!(expected.replace("{r}", &r.to_string()), keys_sorted(out), "{name}");
    assert!((low..=high).contains(&r), "{name}: remaining({r}s), expected {low}..={high}: {out:?}");
    r
}

/// `lease timetolive --keys` output with the attached keys sorted: etcd lists them in the order
/// of a Go map, which changes from one call to the next.
fn keys_sorted(out: &str) -> String {
    let Some((head, rest)) = out.split_once("attached keys([") else { return out.to_string() };
    let Some((keys, tail)) = rest.split_once("])") else { return out.to_string() };
    let mut keys: Vec<&str> = keys.split(' ').collect();
    keys.sort_unstable();
    format!("{head}attached keys([{}]){tail}", keys.join(" "))
}

/// `get KEY -w json` without the ids that differ between the systems (cluster, member, term).
fn get_json(ctl: &Etcdctl, ep: &str, key: &str) -> serde_json::Value {
    let out = ctl.ok(ep, &["get", key, "-w", "json"]);
    let mut v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let header = v["header"].as_object_mut().unwrap_or_else(|| panic!("no header in {out}"));
    for id in ["cluster_id", "member_id", "raft_term"] {
        assert!(header.remove(id).is_some(), "no {id} in {out}");
    }
    v
}

const LEASE_NOT_FOUND: &str = "Error: etcdserver: requested lease not found";

/// `lease grant / timetolive [--keys] / keep-alive --once / list / revoke`, `put --lease`, `get -w
/// json`, through each of the target's watching members, and the errors for an unknown lease.
fn lease_script(ctl: &Etcdctl, t: &Target) {
    let all = t.all.as_str();
    for ep in &t.watchers {
        let name = format!("{} at {ep}", t.name);
        let name = name.as_str();
        let ep = ep.as_str();
        let base = revision(ctl, all);
        let start = Instant::now();
        let id = granted(name, &ctl.ok(ep, &["lease", "grant", "30"]), 30);
        let lease = format!("--lease={id}");
        assert_eq!("OK\n", ctl.ok(ep, &["put", &lease, "lk1", "v1"]), "{name}");
        assert_eq!("OK\n", ctl.ok(ep, &["put", &lease, "lk2", "v2"]), "{name}");
        let left = 30 - start.elapsed().as_secs() as i64;
        let with_keys =
            format!("lease {id} granted with TTL(30s), remaining({{r}}s), attached keys([lk1 lk2])\n");
        let out = ctl.ok(ep, &["lease", "timetolive", &id, "--keys"]);
        remaining(name, &out, &with_keys, left - 2, 29);
        let out = ctl.ok(ep, &["lease", "timetolive", &id]);
        remaining(
            name,
            &out,
            &format!("lease {id} granted with TTL(30s), remaining({{r}}s)\n"),
            left - 2,
            29,
        );
        assert_eq!(
            format!("lease {id} keepalived with TTL(30)\n"),
            ctl.ok(ep, &["lease", "keep-alive", "--once", &id]),
            "{name}"
        );
        // Kept alive: the whole TTL again (less the second being counted).
        let out = ctl.ok(ep, &["lease", "timetolive", &id]);
        remaining(name, &out, &format!("lease {id} granted with TTL(30s), remaining({{r}}s)\n"), 28, 29);
        assert_eq!(format!("found 1 leases\n{id}\n"), ctl.ok(ep, &["lease", "list"]), "{name}");

        let lease_dec = i64::from_str_radix(&id, 16).expect("a hex lease id");
        let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
        let expected = serde_json::json!({"header": {"revision": base + 2}, "kvs": [{"key": b64("lk1"),
            "create_revision": base + 1, "mod_revision": base + 1, "version": 1, "value": b64("v1"),
            "lease": lease_dec}], "count": 1});
        assert_eq!(expected, get_json(ctl, ep, "lk1"), "{name}: the key's lease");

        assert_eq!(format!("lease {id} revoked\n"), ctl.ok(ep, &["lease", "revoke", &id]), "{name}");
        assert_eq!("", ctl.ok(ep, &["get", "--prefix", "lk"]), "{name}: the keys went with the lease");
        assert_eq!(base + 3, revision(ctl, all), "{name}: both deletes at one revision");
        let expired = format!("lease {id} already expired\n");
        assert_eq!(expired, ctl.ok(ep, &["lease", "timetolive", &id]), "{name}");
        assert_eq!(expired, ctl.ok(ep, &["lease", "timetolive", &id, "--keys"]), "{name}");
        assert_eq!(
            (Some(2), LEASE_NOT_FOUND.to_string()),
            ctl.fails(ep, &["lease", "keep-alive", "--once", &id]),
            "{name}: a revoked lease"
        );
        assert_eq!(
            (Some(1), LEASE_NOT_FOUND.to_string()),
            ctl.fails(ep, &["put", &lease, "lk1", "v"]),
            "{name}"
        );
        assert_eq!("found 0 leases\n", ctl.ok(ep, &["lease", "list"]), "{name}");

        // A lease nobody granted.
        assert_eq!(
            (Some(1), LEASE_NOT_FOUND.to_string()),
            ctl.fails(ep, &["put", "--lease=1234abcd", "k", "v"]),
            "{name}"
        );
        assert_eq!(
            (Some(1), "Error: failed to revoke lease (etcdserver: requested lease not found)".to_string()),
            ctl.fails(ep, &["lease", "revoke", "1234abcd"]),
            "{name}"
        );
        assert_eq!(
            (Some(2), LEASE_NOT_FOUND.to_string()),
            ctl.fails(ep, &["lease", "keep-alive", "--once", "1234abcd"]),
            "{name}"
        );
        assert_eq!(
            "lease 000000001234abcd already expired\n",
            ctl.ok(ep, &["lease", "timetolive", "1234abcd", "--keys"]),
            "{name}"
        );
        // TTLs: below the minimum raised to it (2 s: 1.5 default election timeouts, rounded up),
        // above the maximum refused.
        let short = granted(name, &ctl.ok(ep, &["lease", "grant", "1"]), 2);
        assert_eq!(format!("lease {short} revoked\n"), ctl.ok(ep, &["lease", "revoke", &short]), "{name}");
        assert_eq!(
            (Some(1), "Error: failed to grant lease (etcdserver: too large lease TTL)".to_string()),
            ctl.fails(ep, &["lease", "grant", "9000000001"]),
            "{name}"
        );
    }
}

/// Two leases granted with TTL 1 (raised to 2 s), each with a key. `etcdctl lease keep-alive`
/// (through the second watching member) keeps one alive: it and its key are still there after
/// twice the TTL, until revoked. Nobody keeps the other: its key goes by itself, never before the
/// TTL from the grant and at most `slack` after it.
fn lease_expiry_script(ctl: &Etcdctl, t: &Target, slack: Duration) {
    let name = t.name;
    let all = t.all.as_str();
    let ttl = Duration::from_secs(2);
    let kept = granted(name, &ctl.ok(all, &["lease", "grant", "1"]), 2);
    assert_eq!("OK\n", ctl.ok(all, &["put", &format!("--lease={kept}"), "kept", "v"]), "{name}");
    let keep_alive = ctl.spawn(&t.watchers[1], &["lease", "keep-alive", &kept]);
    let sent = Instant::now();
    let id = granted(name, &ctl.ok(all, &["lease", "grant", "1"]), 2);
    assert_eq!("OK\n", ctl.ok(all, &["put", &format!("--lease={id}"), "expiring", "v"]), "{name}");
    // The first read that finds it gone ended after the key went, which is after the grant was
    // sent plus the TTL.
    let gone = loop {
        let out = ctl.ok(all, &["get", "expiring"]);
        let at = sent.elapsed();
        if out.is_empty() {
            break at;
        }
        assert_eq!("expiring\nv\n", out, "{name}");
        assert!(at < ttl + slack, "{name}: the key is still there {at:?} after the grant");
        std::thread::sleep(POLL);
    };
    eprintln!("{name}: a lease of {ttl:?} expired {gone:?} after its grant was sent");
    assert!(gone >= ttl, "{name}: the key went {gone:?} after the grant was sent: before its TTL");
    assert_eq!(format!("lease {id} already expired\n"), ctl.ok(all, &["lease", "timetolive", &id]), "{name}");

    // Meanwhile, and for twice its TTL, the lease kept alive stays.
    while sent.elapsed() < 2 * ttl {
        assert_eq!(
            "kept\nv\n",
            ctl.ok(all, &["get", "kept"]),
            "{name}: a lease kept alive, {:?}",
            sent.elapsed()
        );
        std::thread::sleep(POLL);
    }
    assert_eq!(format!("found 1 leases\n{kept}\n"), ctl.ok(all, &["lease", "list"]), "{name}");
    assert_eq!(format!("lease {kept} revoked\n"), ctl.ok(all, &["lease", "revoke", &kept]), "{name}");
    // keep-alive says so, and ends.
    let (code, out, err) = keep_alive.finish();
    let renewed = format!("lease {kept} keepalived with TTL(2)\n");
    let times = out.matches(&renewed).count();
    assert_eq!(
        (Some(0), format!("{}lease {kept} expired or revoked.\n", renewed.repeat(times)), String::new()),
        (code, out, err),
        "{name}: lease keep-alive"
    );
    // At least one keep-alive for each TTL.
    assert!(times >= 3, "{name}: {times} keep-alives answered");
    assert_eq!("", ctl.ok(all, &["get", "kept"]), "{name}");
    assert_eq!("found 0 leases\n", ctl.ok(all, &["lease", "list"]), "{name}");
}

#[test]
fn lease_commands_as_etcd() {
    let ctl = Etcdctl::find();
    {
        let e = Etcd::start(&[]);
        let t = Target::etcd(&e);
        lease_script(&ctl, &t);
        // etcd looks for expired leases every 500 ms.
        lease_expiry_script(&ctl, &t, Duration::from_secs(2));
    }
    let c = Cluster::start();
    let t = Target::keel(&ctl, &c);
    lease_script(&ctl, &t);
    // keeld's leader looks every 100 ms, then a revoke goes through Raft.
    lease_expiry_script(&ctl, &t, Duration::from_secs(2));
}

/// A running `etcdctl lock` whose command records, in a shared log, when it starts and ends
/// holding the lock; it holds it until its release file exists. Started in a process group of
/// its own, so that a SIGKILL takes the command with it.
struct Holder {
    name: &'static str,
    run: Running,
}

impl Holder {
    fn start(ctl: &Etcdctl, ep: &str, dir: &std::path::Path, name: &'static str, ttl: u32) -> Holder {
        use std::os::unix::process::CommandExt as _;
        let log = dir.join("log");
        let release = dir.join(format!("release-{name}"));
        // The shell waits for a file the test creates: a condition, polled.
        let script = format!(
            "echo \"start $0 $ETCD_LOCK_KEY $ETCD_LOCK_REV\" >> {log}; \
             until [ -e {release} ]; do sleep 0.02; done; echo \"end $0\" >> {log}",
            log = log.display(),
            release = release.display()
        );
        let ttl = format!("--ttl={ttl}");
        let args = ["lock", ttl.as_str(), "lk", "--", "sh", "-c", script.as_str(), name];
        let mut cmd = ctl.command(ep, &args);
        cmd.process_group(0);
        let mut child = cmd.spawn().expect("start etcdctl lock");
        let (out, r1) = collect(child.stdout.take().expect("piped stdout"));
        let (err, r2) = collect(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take();
        let what = format!("etcdctl lock ({name}) at {ep}");
        Holder { name, run: Running { what, child, stdin, out, err, readers: vec![r1, r2], taken: 0 } }
    }

    fn release(&self, dir: &std::path::Path) {
        File::create(dir.join(format!("release-{}", self.name))).expect("create the release file");
    }

    /// SIGKILLs etcdctl and its command (its process group).
    fn kill(self) {
        let group = format!("-{}", self.run.child.id());
        let status = Command::new("kill").args(["-KILL", "--", &group]).status().expect("run kill");
        assert!(status.success(), "kill -KILL -- {group}: {status}");
        self.run.stop();
    }

    /// Waits for etcdctl to exit after its command ended: it must exit 0 having printed nothing.
    fn exits(self, name: &str) {
        let what = self.run.what.clone();
        assert_eq!((Some(0), String::new(), String::new()), self.run.finish(), "{name}: {what}");
    }
}

/// The log's lines.
fn log_lines(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("log")).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Waits until the log has `n` lines; answers them.
fn wait_log(name: &str, dir: &std::path::Path, n: usize) -> Vec<String> {
    wait_until(&format!("{name}: {n} lines in the lock log"), || {
        let lines = log_lines(dir);
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!("{lines:?}"))
        }
    })
}

/// Waits until `n` contenders' keys are under `prefix`.
fn wait_in_line(ctl: &Etcdctl, all: &str, name: &str, prefix: &str, n: usize) {
    wait_until(&format!("{name}: {n} keys under {prefix}"), || {
        let out = ctl.ok(all, &["get", "--prefix", prefix, "--keys-only"]);
        let keys = out.lines().filter(|l| !l.is_empty()).count();
        if keys == n {
            Ok(())
        } else {
            Err(out)
        }
    });
}

/// A holder's `start NAME KEY REV` line: (name, key, rev).
fn started(line: &str) -> (String, String, i64) {
    let f: Vec<&str> = line.split(' ').collect();
    assert!(f.len() == 4 && f[0] == "start", "a start line: {line:?}");
    (f[1].to_string(), f[2].to_string(), f[3].parse().unwrap_or_else(|_| panic!("a revision in {line:?}")))
}

/// Three `etcdctl lock` processes on one lock, through different members: one holder at a time,
/// in the order they asked; then a holder SIGKILLed lets the next one in once its session lease
/// expires, not before.
fn lock_script(ctl: &Etcdctl, t: &Target) {
    let name = t.name;
    let all = t.all.as_str();
    let (first, second) = (t.watchers[0].as_str(), t.watchers[1].as_str());
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();

    let a = Holder::start(ctl, first, dir, "A", 10);
    wait_log(name, dir, 1);
    let b = Holder::start(ctl, second, dir, "B", 10);
    wait_in_line(ctl, all, name, "lk/", 2);
    let c = Holder::start(ctl, first, dir, "C", 10);
    wait_in_line(ctl, all, name, "lk/", 3);
    assert_eq!(1, log_lines(dir).len(), "{name}: only A holds the lock: {:?}", log_lines(dir));
    a.release(dir);
    wait_log(name, dir, 3);
    a.exits(name);
    b.release(dir);
    wait_log(name, dir, 5);
    b.exits(name);
    c.release(dir);
    wait_log(name, dir, 6);
    c.exits(name);
    let lines = log_lines(dir);
    assert_eq!(6, lines.len(), "{name}: {lines:?}");
    let holders: Vec<(String, String, i64)> = [&lines[0], &lines[2], &lines[4]].map(|l| started(l)).into();
    let order: Vec<&str> = holders.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(vec!["A", "B", "C"], order, "{name}: in the order they asked: {lines:?}");
    assert_eq!(["end A", "end B", "end C"], [&lines[1], &lines[3], &lines[5]].map(String::as_str), "{name}");
    assert!(holders.iter().all(|h| h.1.starts_with("lk/")), "{name}: {holders:?}");
    let revs: Vec<i64> = holders.iter().map(|h| h.2).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{name}: each holder's revision grows: {revs:?}");
    assert_eq!("", ctl.ok(all, &["get", "--prefix", "lk/"]), "{name}: every key unlocked");

    // A holder killed: its session lease (TTL 3 s, kept alive every second until the kill) must
    // run out before the next one gets the lock.
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    const TTL: u32 = 3;
    let a = Holder::start(ctl, second, dir, "A", TTL);
    wait_log(name, dir, 1);
    let held = Instant::now();
    let b = Holder::start(ctl, first, dir, "B", TTL);
    wait_in_line(ctl, all, name, "lk/", 2);
    // A's session keeps its lease alive: for longer than its TTL, B still waits.
    let ttl = Duration::from_secs(TTL.into());
    while held.elapsed() < ttl + Duration::from_secs(1) {
        assert_eq!(1, log_lines(dir).len(), "{name}: B got the lock while A held it: {:?}", log_lines(dir));
        std::thread::sleep(POLL);
    }
    let killed = Instant::now();
    a.kill();
    let lines = wait_log(name, dir, 2);
    let waited = killed.elapsed();
    eprintln!("{name}: the lock passed on {waited:?} after its holder was killed (session TTL {TTL} s)");
    assert_eq!("B", started(&lines[1]).0, "{name}: {lines:?}");
    // The last keep-alive was at most a third of the TTL before the kill.
    assert!(
        waited >= ttl / 2,
        "{name}: the lock passed on {waited:?} after the kill: before the lease ran out"
    );
    assert!(
        waited <= ttl + Duration::from_secs(3),
        "{name}: the lock passed on only {waited:?} after the kill"
    );
    b.release(dir);
    wait_log(name, dir, 3);
    b.exits(name);
    assert_eq!("", ctl.ok(all, &["get", "--prefix", "lk/"]), "{name}: every key unlocked");
}

#[test]
fn lock_excludes_queues_and_passes_on_as_etcd() {
    let ctl = Etcdctl::find();
    {
        let e = Etcd::start(&[]);
        lock_script(&ctl, &Target::etcd(&e));
    }
    let c = Cluster::start();
    lock_script(&ctl, &Target::keel(&ctl, &c));
}

impl Running {
    /// Sends SIGINT.
    fn interrupt(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-INT", &pid]).status().expect("run kill");
        assert!(status.success(), "kill -INT {pid}: {status}");
    }
}

/// `etcdctl elect -l` observing while `etcdctl elect NAME one` leads and `... two` waits; the
/// first is interrupted (it resigns), and the observer prints the second.
fn elect_script(ctl: &Etcdctl, t: &Target) {
    let name = t.name;
    let all = t.all.as_str();
    let (first, second) = (t.watchers[0].as_str(), t.watchers[1].as_str());
    let observer = ctl.spawn(second, &["elect", "-l", "el"]);
    let one = ctl.spawn(first, &["elect", "el", "one"]);
    // The leader prints its key (`el/<lease id in hex>`) and its value.
    let printed_one = wait_until(&format!("{name}: elect el one leads"), || {
        let out = one.stdout();
        if out.ends_with("\none\n") || one.closed() {
            Ok(out)
        } else {
            Err(out)
        }
    });
    let key_one = printed_one.strip_suffix("\none\n").unwrap_or_default();
    assert!(
        key_one
            .strip_prefix("el/")
            .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit())),
        "{name}: {printed_one:?}"
    );
    observer.expect_stdout(&printed_one);
    let two = ctl.spawn(second, &["elect", "el", "two"]);
    wait_in_line(ctl, all, name, "el/", 2);
    assert_eq!("", two.stdout(), "{name}: the second campaigner waits");
    one.interrupt();
    let (code, out, err) = one.finish();
    assert_eq!(
        (Some(0), printed_one.clone(), String::new()),
        (code, out, err),
        "{name}: elect one, interrupted"
    );
    let printed_two = wait_until(&format!("{name}: elect el two leads"), || {
        let out = two.stdout();
        if out.ends_with("\ntwo\n") || two.closed() {
            Ok(out)
        } else {
            Err(out)
        }
    });
    assert_ne!(printed_one.replace("one", "two"), printed_two, "{name}: another key");
    observer.expect_stdout(&format!("{printed_one}{printed_two}"));
    two.interrupt();
    assert_eq!((Some(0), printed_two.clone(), String::new()), two.finish(), "{name}: elect two, interrupted");
    assert_eq!("", ctl.ok(all, &["get", "--prefix", "el/"]), "{name}: both resigned");
    observer.interrupt();
    let (_, out, _) = observer.finish();
    assert_eq!(format!("{printed_one}{printed_two}"), out, "{name}: nothing more observed");
}

#[test]
fn elect_as_etcd() {
    let ctl = Etcdctl::find();
    {
        let e = Etcd::start(&[]);
        elect_script(&ctl, &Target::etcd(&e));
    }
    let c = Cluster::start();
    elect_script(&ctl, &Target::keel(&ctl, &c));
}
