//! The harness the multi-process tests share: a three-node keeld cluster of real processes on
//! loopback (node 4's addresses reserved for a test that adds it), running the real `keel`
//! against it, and waiting on conditions against a deadline.
//!
//! keeld is the sibling of the `keel` binary in the target directory (`cargo build -p keel-kv`
//! builds it; `cargo nextest run --workspace` builds every binary). Nodes are SIGKILLed when a
//! test ends, and their logs are printed when it fails.

// Each test target uses a different part of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::free_ports;
use serde_json::Value;

/// How long a node may take to become ready, or a cluster change to show.
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it answers `Ok`, or fails the test with its last answer after `DEADLINE`.
#[track_caller]
pub fn wait_until<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > DEADLINE => {
                panic!("{what}: still not so after {DEADLINE:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// A `GET` over plain HTTP/1.0: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    status.map(|s| (s, body)).ok_or(answer)
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

pub struct Keeld {
    pub client: String,
    pub peer: String,
    /// stdout and stderr of the process.
    pub log: PathBuf,
    pub child: Option<Child>,
}

/// Nodes 1-3 found the cluster; node 4's addresses are reserved for a test that adds it.
/// Dropping the cluster SIGKILLs every node, and prints their logs if the test is failing.
pub struct Cluster {
    pub keeld: PathBuf,
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Keeld>,
}

impl Cluster {
    /// Starts nodes 1-3 as a new cluster and waits until every one is ready and every member's
    /// client address is in the membership (`keel cluster status` needs them).
    pub fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// [`Cluster::start`] with TLS on both ports and client certificates required on both, from
    /// the certificates [`make_certs`] wrote in `certs` (node `id`'s is `n<id>`).
    pub fn start_tls(certs: &Path) -> Cluster {
        Cluster::start_with(Some(certs))
    }

    /// Addresses for nodes 1-4 and a temp dir for their data dirs, no node started.
    pub fn unstarted() -> Cluster {
        let keeld = Path::new(env!("CARGO_BIN_EXE_keel")).with_file_name("keeld");
        assert!(
            keeld.is_file(),
            "keeld is not built at {}: build it with `cargo build -p keel-kv` \
             (`cargo nextest run --workspace` builds it too)",
            keeld.display()
        );
        let ports = free_ports(8);
        let nodes = (1..=4u64)
            .zip(ports.chunks(2))
            .map(|(id, p)| {
                let node = Keeld {
                    client: format!("127.0.0.1:{}", p[0]),
                    peer: format!("127.0.0.1:{}", p[1]),
                    log: PathBuf::new(),
                    child: None,
                };
                (id, node)
            })
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        Cluster { keeld, dir, nodes }
    }

    fn start_with(certs: Option<&Path>) -> Cluster {
        let mut cluster = Cluster::unstarted();
        let initial: Vec<String> = (1..=3).map(|id| format!("{id}={}", cluster.node(id).peer)).collect();
        let initial = initial.join(",");
        for id in 1..=3 {
            let mut extra = vec!["--initial-cluster".to_owned(), initial.clone()];
            if let Some(certs) = certs {
                extra.extend(keeld_tls_flags(certs, id));
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            cluster.spawn(id, &extra);
        }
        let clients: Vec<String> = (1..=3).map(|id| cluster.client(id)).collect();
        if let Some(certs) = certs {
            // Ready: every node answers over TLS with the whole membership.
            for id in 1..=3 {
                wait_until(&format!("keeld {id} answers over TLS with every client address"), || {
                    cluster.check_running(id);
                    let mut args = client_tls_flags(certs);
                    args.extend(["cluster".to_owned(), "members".to_owned(), "--json".to_owned()]);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let run = keel(&format!("https://{}", cluster.client(id)), &args);
                    let members: Value =
                        serde_json::from_str(&run.stdout).map_err(|e| format!("{e}: {}", run.stderr))?;
                    check_published(&members, &clients)
                });
            }
            return cluster;
        }
        for id in 1..=3 {
            cluster.wait_ready(id);
        }
        cluster.wait_published(&[1, 2, 3]);
        cluster
    }

    /// Waits until each of `ids` has the client addresses of exactly `ids` in its membership.
    #[track_caller]
    pub fn wait_published(&self, ids: &[u64]) {
        let clients: Vec<String> = ids.iter().map(|id| self.client(*id)).collect();
        for id in ids {
            wait_until(&format!("every client address in node {id}'s membership"), || {
                check_published(&members_json(&self.client(*id))?, &clients)
            });
        }
    }

    /// Node `id`'s data dir.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    /// Fails the test if node `id` has exited.
    #[track_caller]
    pub fn check_running(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("nodes 1 to 4 have addresses");
        if let Some(child) = node.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("keeld {id} exited: {status}");
            }
        }
    }

    pub fn node(&self, id: u64) -> &Keeld {
        self.nodes.get(&id).expect("nodes 1 to 4 have addresses")
    }

    pub fn client(&self, id: u64) -> String {
        self.node(id).client.clone()
    }

    pub fn peer(&self, id: u64) -> String {
        self.node(id).peer.clone()
    }

    /// The client addresses of `ids`, comma-separated, for `--endpoints`.
    pub fn endpoints(&self, ids: &[u64]) -> String {
        ids.iter().map(|id| self.client(*id)).collect::<Vec<_>>().join(",")
    }

    /// Starts node `id` with its reserved addresses, a data dir of its own and `extra` flags.
    pub fn spawn(&mut self, id: u64, extra: &[&str]) {
        let data_dir = self.data_dir(id);
        let log = self.dir.path().join(format!("n{id}.log"));
        let out = File::create(&log).expect("create the node's log");
        let err = out.try_clone().expect("clone the log handle");
        let node = self.nodes.get_mut(&id).expect("nodes 1 to 4 have addresses");
        let child = Command::new(&self.keeld)
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--client-addr", &node.client, "--peer-addr", &node.peer])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start keeld");
        node.log = log;
        node.child = Some(child);
    }

    /// Waits for `GET /ready` to answer 200; fails at once if the process exited.
    #[track_caller]
    pub fn wait_ready(&mut self, id: u64) {
        let client = self.client(id);
        wait_until(&format!("keeld {id} ready"), || {
            let node = self.nodes.get_mut(&id).expect("nodes 1 to 4 have addresses");
            if let Some(child) = node.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("keeld {id} exited before it was ready: {status}");
                }
            }
            match http_get(&client, "/ready")? {
                (200, _) => Ok(()),
                (code, body) => Err(format!("{code} {body}")),
            }
        });
    }

    /// SIGKILLs node `id` and reaps it, so its ports refuse connections from here on.
    pub fn kill(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("nodes 1 to 4 have addresses");
        if let Some(mut child) = node.child.take() {
            // Errors only mean it already exited; also called from `drop`, so never panics.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.kill(id);
        }
        if std::thread::panicking() {
            for (id, node) in &self.nodes {
                if node.log.as_os_str().is_empty() {
                    continue;
                }
                let log = std::fs::read_to_string(&node.log).unwrap_or_else(|e| format!("(unreadable: {e})"));
                eprintln!("----- keeld {id} ({}) -----\n{log}", node.log.display());
            }
        }
    }
}

/// Whether `members` (`GET /v1/cluster/members`) lists exactly `clients` as client addresses.
fn check_published(members: &Value, clients: &[String]) -> Result<(), String> {
    let published: Vec<&str> = members["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["client_addr"].as_str().unwrap_or_default())
        .collect();
    if published == clients {
        Ok(())
    } else {
        Err(members.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// With `keel certs` in `dir`: a CA, `n1`..`n3` for nodes 1-3 (127.0.0.1 and localhost) and
/// `root`'s client certificate.
pub fn make_certs(dir: &Path) {
    let d = dir.to_str().expect("utf-8 path");
    keel("127.0.0.1:1", &["certs", "init", "--dir", d]).ok();
    for n in ["n1", "n2", "n3"] {
        keel("127.0.0.1:1", &["certs", "node", n, "--dir", d, "--host", "127.0.0.1", "--host", "localhost"])
            .ok();
    }
    keel("127.0.0.1:1", &["certs", "client", "root", "--dir", d]).ok();
}

/// etcd's TLS flags for node `id`: its certificate on both ports, client certificates required.
pub fn keeld_tls_flags(certs: &Path, id: u64) -> Vec<String> {
    let file = |name: String| certs.join(name).display().to_string();
    let (cert, key, ca) = (file(format!("n{id}.pem")), file(format!("n{id}-key.pem")), file("ca.pem".into()));
    [
        ("--cert-file", &cert),
        ("--key-file", &key),
        ("--trusted-ca-file", &ca),
        ("--peer-cert-file", &cert),
        ("--peer-key-file", &key),
        ("--peer-trusted-ca-file", &ca),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value.clone()])
    .chain(["--client-cert-auth".to_owned(), "--peer-client-cert-auth".to_owned()])
    .collect()
}

/// `--cacert ca.pem --cert root.pem --key root-key.pem` from `certs`.
pub fn client_tls_flags(certs: &Path) -> Vec<String> {
    let file = |name: &str| certs.join(name).display().to_string();
    ["--cacert", &file("ca.pem"), "--cert", &file("root.pem"), "--key", &file("root-key.pem")]
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// `GET /v1/cluster/members` of one node.
pub fn members_json(addr: &str) -> Result<Value, String> {
    match http_get(addr, "/v1/cluster/members")? {
        (200, body) => serde_json::from_str(&body).map_err(|e| format!("{e}: {body}")),
        (code, body) => Err(format!("{code} {body}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Running keel
// ---------------------------------------------------------------------------------------------

/// What one `keel` run did.
pub struct Run {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The output of a run that must succeed.
    #[track_caller]
    pub fn ok(self) -> String {
        assert_eq!(self.code, Some(0), "{} failed: {}", self.command, self.stderr);
        assert_eq!(self.stderr, "", "{} wrote to stderr", self.command);
        self.stdout
    }

    /// The output of a `--json` run that must succeed, parsed.
    #[track_caller]
    pub fn json(self) -> Value {
        let command = self.command.clone();
        let out = self.ok();
        assert!(out.ends_with('\n') && out.lines().count() == 1, "{command}: not one line: {out:?}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command}: {e}: {out}"))
    }
}

pub fn keel_with_input(endpoints: &str, args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["--endpoints", endpoints])
        .args(args)
        .env_remove("KEEL_ENDPOINTS")
        .env_remove("KEEL_USER")
        .env_remove("KEEL_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel");
    child.stdin.take().expect("piped stdin").write_all(stdin).expect("write keel's stdin");
    let out = child.wait_with_output().expect("keel exits");
    Run {
        command: format!("keel --endpoints {endpoints} {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn keel(endpoints: &str, args: &[&str]) -> Run {
    keel_with_input(endpoints, args, b"")
}

/// The leader named by `keel cluster members --json`, once there is one.
#[track_caller]
pub fn leader(endpoints: &str) -> u64 {
    wait_until("a leader", || {
        let run = keel(endpoints, &["cluster", "members", "--json"]);
        let members: Value = serde_json::from_str(&run.stdout).map_err(|e| format!("{e}: {}", run.stderr))?;
        members["leader"].as_u64().ok_or_else(|| members.to_string())
    })
}
