//! TLS on both ports, against real keeld processes: etcdctl 3.4 with `--cacert/--cert/--key`
//! against a cluster with TLS and client certificates on the client port and mutual TLS between
//! members; what must be refused (a wrong CA, a certificate another CA signed, an expired one,
//! none, plaintext on a TLS port; on the peer port, a peer without a certificate of the cluster
//! CA, or with the wrong CN); and certificates replaced on disk taking effect without a restart.
//!
//! Needs `etcdctl` on PATH (`apt-get install etcd-client`).

use std::fs::File;
use std::io::Read as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::net::TcpStream;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use keel_testkit::pki::Ca;
use keel_testkit::pki::CertFiles;
use keel_testkit::pki::Use;

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

#[track_caller]
fn wait_until<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
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

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], keel_testkit::free_port()))
}

/// The certificates of one test: the cluster CA and what it signed, and a stranger CA.
struct Pki {
    /// Holds the files until the test ends.
    _dir: tempfile::TempDir,
    ca: Ca,
    other: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new(dir.path(), "ca");
        let other = Ca::new(dir.path(), "other");
        Pki { _dir: dir, ca, other }
    }
}

struct Node {
    client: SocketAddr,
    peer: SocketAddr,
    child: Child,
    stderr: PathBuf,
}

/// keeld processes; killed on drop, their logs printed if the test failed.
struct Cluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` founding members with TLS on both ports (client certificates required on both),
    /// each with the flags `extra(i)` adds.
    fn start(pki: &Pki, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let addrs: Vec<(SocketAddr, SocketAddr)> = (0..n).map(|_| (free_addr(), free_addr())).collect();
        let initial = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("{}={p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for (i, (client, peer)) in addrs.into_iter().enumerate() {
            let id = i + 1;
            let cert = pki.ca.issue(&format!("n{id}"), Use::Member);
            let mut args = tls_flags(&pki.ca.cert, &cert);
            args.extend(["--id".into(), id.to_string(), "--initial-cluster".into(), initial.clone()]);
            args.extend(extra(id));
            nodes.push(spawn(dir.path(), &format!("n{id}"), client, peer, &args));
        }
        Cluster { nodes, dir }
    }

    fn endpoints(&self) -> String {
        self.nodes.iter().map(|n| format!("https://{}", n.client)).collect::<Vec<_>>().join(",")
    }
}

/// TLS on both ports with `cert` (the member's) and `ca`, client certificates required.
fn tls_flags(ca: &Path, cert: &CertFiles) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    vec![
        "--cert-file".into(),
        p(&cert.cert),
        "--key-file".into(),
        p(&cert.key),
        "--trusted-ca-file".into(),
        p(ca),
        "--client-cert-auth".into(),
        "--peer-cert-file".into(),
        p(&cert.cert),
        "--peer-key-file".into(),
        p(&cert.key),
        "--peer-trusted-ca-file".into(),
        p(ca),
        "--peer-client-cert-auth".into(),
    ]
}

fn spawn(dir: &Path, name: &str, client: SocketAddr, peer: SocketAddr, args: &[String]) -> Node {
    let stderr = dir.join(format!("{name}.stderr"));
    let child = Command::new(env!("CARGO_BIN_EXE_keeld"))
        .arg("--data-dir")
        .arg(dir.join(name))
        .arg("--client-addr")
        .arg(client.to_string())
        .arg("--peer-addr")
        .arg(peer.to_string())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start keeld");
    Node { client, peer, child, stderr }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(&n.stderr).unwrap_or_default();
                eprintln!("----- keeld (client {}, peer {}) -----\n{log}", n.client, n.peer);
            }
        }
    }
}

/// etcdctl's flags for a client presenting `who`'s certificate and trusting the cluster CA.
fn client_flags<'a>(pki: &'a Pki, who: &'a CertFiles) -> [(&'static str, &'a Path); 3] {
    [("cacert", pki.ca.cert.as_path()), ("cert", who.cert.as_path()), ("key", who.key.as_path())]
}

/// etcdctl with bounded timeouts and `tls` flags (`--cacert` etc.).
fn etcdctl(endpoints: &str, tls: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(["--dial-timeout=2s", "--command-timeout=4s"]);
    for (flag, path) in tls {
        cmd.arg(format!("--{flag}={}", path.display()));
    }
    cmd.args(args).stdin(Stdio::null()).output().expect("run etcdctl (is it on PATH?)")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> Result<String, String> {
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(text(&o))
    }
}

/// Connects to `addr` with TLS trusting `ca`, presenting `identity`, and reads the server's first
/// bytes after sending the HTTP/2 preface: the session was accepted only if the server sends
/// something (its SETTINGS). Answers the server certificate's CN. Under TLS 1.3 the client's
/// certificate is judged after the client thinks the handshake is done, so the refusal shows in
/// the read.
fn tls_session(addr: SocketAddr, ca: &Path, identity: Option<&CertFiles>) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        use tokio::io::AsyncReadExt as _;
        use tokio::io::AsyncWriteExt as _;
        let tls = keel::tls::ClientTls::new(
            ca,
            identity.map(|c| (c.cert.as_path(), c.key.as_path())),
            keel::tls::ALPN_H2,
        )
        .map_err(|e| e.to_string())?;
        let mut stream =
            tls.connect(&addr.to_string(), Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        let cn = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(keel::tls::common_name)
            .unwrap_or_default();
        stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| e.to_string())?;
        stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(cn),
            Ok(Ok(_)) => Err("closed without a word".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    })
}

/// What a plaintext client gets from a TLS port: the raw bytes of the answer to `request`.
fn plaintext(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(request).expect("write");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn etcdctl_over_tls_with_client_certificates_and_mutual_tls_between_members() {
    let pki = Pki::new();
    let c = Cluster::start(&pki, 3, |_| vec![]);
    let root = pki.ca.issue("root", Use::Client);
    let good = client_flags(&pki, &root);
    let all = c.endpoints();
    wait_until("the TLS cluster answers etcdctl", || ok(etcdctl(&all, &good, &["put", "foo", "bar"])));
    assert_eq!("foo\nbar\n", ok(etcdctl(&all, &good, &["get", "foo"])).expect("get"));
    let members = ok(etcdctl(&all, &good, &["member", "list"])).expect("member list");
    for n in &c.nodes {
        assert!(members.contains(&format!("https://{}", n.client)), "client URLs are https: {members}");
        assert!(members.contains(&format!("https://{}", n.peer)), "peer URLs are https: {members}");
    }
    // Every member, leader or not: a follower forwards keep-alives to the leader's client port,
    // over TLS with its own certificate.
    for n in &c.nodes {
        let one = format!("https://{}", n.client);
        let granted = ok(etcdctl(&one, &good, &["lease", "grant", "30"])).expect("lease grant");
        let id = granted.split_whitespace().nth(1).expect("lease id").to_string();
        let kept = ok(etcdctl(&one, &good, &["lease", "keep-alive", "--once", &id])).expect("keep-alive");
        assert!(kept.contains("keepalived with TTL(30)"), "{kept}");
    }

    // Refused: each differs from `good` in one thing, and `good` works right after each.
    let first = format!("https://{}", c.nodes[0].client);
    let stranger = pki.other.issue("root", Use::Client);
    let expired = pki.ca.issue_expired("expired", Use::Client);
    let cases: Vec<(&str, Vec<(&str, &Path)>)> = vec![
        (
            "a CA that did not sign the server's certificate",
            vec![
                ("cacert", pki.other.cert.as_path()),
                ("cert", root.cert.as_path()),
                ("key", root.key.as_path()),
            ],
        ),
        (
            "a client certificate another CA signed",
            vec![
                ("cacert", pki.ca.cert.as_path()),
                ("cert", stranger.cert.as_path()),
                ("key", stranger.key.as_path()),
            ],
        ),
        (
            "an expired client certificate",
            vec![
                ("cacert", pki.ca.cert.as_path()),
                ("cert", expired.cert.as_path()),
                ("key", expired.key.as_path()),
            ],
        ),
        ("no client certificate", vec![("cacert", pki.ca.cert.as_path())]),
    ];
    for (what, flags) in cases {
        let o = etcdctl(&first, &flags, &["get", "foo"]);
        assert!(!o.status.success(), "{what}: etcdctl was served: {}", text(&o));
        ok(etcdctl(&first, &good, &["get", "foo"])).unwrap_or_else(|e| panic!("after {what}: {e}"));
    }
    let plain = etcdctl(&format!("http://{}", c.nodes[0].client), &[], &["get", "foo"]);
    assert!(!plain.status.success(), "plaintext gRPC was served: {}", text(&plain));
    let http1 = plaintext(c.nodes[0].client, b"GET /v1/kv/foo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(http1.starts_with("HTTP/1.1 400") && http1.contains("requires TLS"), "{http1}");
    let h2 = plaintext(c.nodes[0].client, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
    assert!(h2.contains("requires TLS"), "a plaintext gRPC client is told in a GOAWAY: {h2:?}");

    // The peer port: only a certificate of the cluster CA gets a session.
    let peer = c.nodes[0].peer;
    let member = pki.ca.issue("n9", Use::Member);
    let cn = tls_session(peer, &pki.ca.cert, Some(&member)).expect("a cluster certificate is accepted");
    assert_eq!("n1", cn, "node 1 presents its own certificate on the peer port");
    let forged = pki.other.issue("n2", Use::Member);
    let e = tls_session(peer, &pki.ca.cert, Some(&forged)).expect_err("another CA's certificate");
    assert!(!e.is_empty());
    tls_session(peer, &pki.ca.cert, None).expect_err("no certificate");
    let h2 = plaintext(peer, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
    assert!(h2.contains("requires TLS"), "{h2:?}");
    ok(etcdctl(&all, &good, &["put", "foo", "still"])).expect("the cluster is unharmed");
}

/// A node whose certificates another CA signed cannot join: the members refuse its certificate
/// on their client port (its join request) and would on their peer port; it exits with the reason.
#[test]
fn a_node_without_the_cluster_ca_cannot_join() {
    let pki = Pki::new();
    let c = Cluster::start(&pki, 1, |_| vec![]);
    let root = pki.ca.issue("root", Use::Client);
    let good = client_flags(&pki, &root);
    wait_until("the cluster answers", || ok(etcdctl(&c.endpoints(), &good, &["put", "a", "1"])));

    let intruder = pki.other.issue("n2", Use::Member);
    let mut args = tls_flags(&pki.ca.cert, &intruder);
    args.extend(["--join".into(), c.nodes[0].client.to_string()]);
    let mut node = spawn(c.dir.path(), "intruder", free_addr(), free_addr(), &args);
    let status = wait_until("the intruder exits", || {
        node.child.try_wait().map_err(|e| e.to_string())?.ok_or("running".into())
    });
    assert!(!status.success());
    let log = std::fs::read_to_string(&node.stderr).unwrap_or_default();
    assert!(log.contains("cannot join the cluster"), "{log}");
    let members = ok(etcdctl(&c.endpoints(), &good, &["member", "list"])).expect("member list");
    assert_eq!(1, members.lines().count(), "nobody was added: {members}");
}

/// `--peer-cert-allowed-cn`: a certificate of the cluster CA with another CN is refused.
#[test]
fn the_peer_port_accepts_only_the_allowed_cn() {
    let pki = Pki::new();
    let c = Cluster::start(&pki, 1, |_| vec!["--peer-cert-allowed-cn".into(), "member".into()]);
    let peer = c.nodes[0].peer;
    let allowed = pki.ca.issue("member", Use::Member);
    let other = pki.ca.issue("visitor", Use::Member);
    wait_until("the allowed CN gets a session", || tls_session(peer, &pki.ca.cert, Some(&allowed)));
    tls_session(peer, &pki.ca.cert, Some(&other)).expect_err("another CN is refused");
}

/// Certificates replaced on disk are served to new connections without a restart; connections
/// and the cluster carry on.
#[test]
fn replaced_certificates_take_effect_without_a_restart() {
    let pki = Pki::new();
    let c = Cluster::start(&pki, 1, |_| vec![]);
    let root = pki.ca.issue("root", Use::Client);
    let good = client_flags(&pki, &root);
    wait_until("the cluster answers", || ok(etcdctl(&c.endpoints(), &good, &["put", "a", "1"])));
    let client = c.nodes[0].client;
    assert_eq!("n1", tls_session(client, &pki.ca.cert, Some(&root)).expect("session"));

    // As an operator rotates: new files written beside, then renamed over the old ones.
    let fresh = pki.ca.issue("n1-rotated", Use::Member);
    let current = pki.ca.issue("n1", Use::Member); // the paths node 1 was started with
    std::fs::rename(&fresh.key, &current.key).expect("replace the key");
    std::fs::rename(&fresh.cert, &current.cert).expect("replace the certificate");
    // (`issue` above rewrote n1's files once more before the rename: the node reloads them too.)
    wait_until("the client port presents the new certificate", || {
        match tls_session(client, &pki.ca.cert, Some(&root))? {
            cn if cn == "n1-rotated" => Ok(()),
            cn => Err(format!("still {cn}")),
        }
    });
    wait_until("the peer port presents the new certificate", || {
        match tls_session(c.nodes[0].peer, &pki.ca.cert, Some(&root))? {
            cn if cn == "n1-rotated" => Ok(()),
            cn => Err(format!("still {cn}")),
        }
    });
    assert_eq!("a\n1\n", ok(etcdctl(&c.endpoints(), &good, &["get", "a"])).expect("get after rotation"));
}

/// With `--client-cert-auth` and auth on, a request without a token acts as the user its
/// certificate's CN names (as etcd does): alice's certificate gets alice's permissions, root's
/// gets everything, a CN that names no user gets nothing.
#[test]
fn with_client_certificates_the_cn_is_the_user() {
    let pki = Pki::new();
    let c = Cluster::start(&pki, 1, |_| vec![]);
    let cert = |cn: &str| pki.ca.issue(cn, Use::Client);
    let (root, alice, mallory) = (cert("root"), cert("alice"), cert("mallory"));
    let as_ = |who: &CertFiles, args: &[&str]| etcdctl(&c.endpoints(), &client_flags(&pki, who), args);
    wait_until("the cluster answers", || ok(as_(&root, &["put", "other/x", "0"])));
    for args in [
        &["user", "add", "root:root-pw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "alice:alice-pw"],
        &["role", "add", "app"],
        &["role", "grant-permission", "app", "readwrite", "--prefix=true", "app/"],
        &["user", "grant-role", "alice", "app"],
        &["auth", "enable"],
    ] {
        ok(as_(&root, args)).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    ok(as_(&alice, &["put", "app/x", "1"])).expect("alice's certificate writes under app/");
    let denied = as_(&alice, &["put", "other/x", "1"]);
    assert!(!denied.status.success() && text(&denied).contains("permission denied"), "{}", text(&denied));
    ok(as_(&root, &["put", "other/x", "2"])).expect("root's certificate writes anywhere");
    let stranger = as_(&mallory, &["get", "app/x"]);
    assert!(!stranger.status.success(), "a CN that names no user: {}", text(&stranger));
    assert_eq!("other/x\n2\n", ok(as_(&root, &["get", "other/x"])).expect("root reads"));
}
