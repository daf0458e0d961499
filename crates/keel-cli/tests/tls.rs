//! The `keel` client over TLS, with certificates from `keel certs`: `keel bench` (gRPC, ALPN h2)
//! against a real etcd 3.4 that requires client certificates; the HTTP/JSON commands (ALPN
//! http/1.1) and `keel bench` against real keeld processes with TLS on both ports; and the
//! failures a user meets (a wrong CA, no client certificate, TLS to a plaintext port, plaintext
//! to a TLS port) as one clear line.

mod support;

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use keel_testkit::free_ports;
use support::{client_tls_flags, keel, make_certs, wait_until, Cluster, Run};

/// `--cacert CA --cert root.pem --key root-key.pem`, from `dir`.
fn client_flags(ca_dir: &Path, cert_dir: Option<&Path>) -> Vec<String> {
    let mut flags = vec!["--cacert".to_owned(), ca_dir.join("ca.pem").display().to_string()];
    if let Some(dir) = cert_dir {
        flags.extend([
            "--cert".to_owned(),
            dir.join("root.pem").display().to_string(),
            "--key".to_owned(),
            dir.join("root-key.pem").display().to_string(),
        ]);
    }
    flags
}

/// One etcd 3.4 member with TLS on both ports and client certificates required on both, from
/// `keel certs` files; SIGKILLed when dropped (its log printed if the test is failing).
struct Etcd {
    child: Child,
    log: PathBuf,
    client_url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start(certs: &Path) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(2);
        let client_url = format!("https://127.0.0.1:{}", ports[0]);
        let peer_url = format!("https://127.0.0.1:{}", ports[1]);
        let log = dir.path().join("etcd.log");
        let out = File::create(&log).expect("create the log");
        let file = |name: &str| certs.join(name).display().to_string();
        let child = Command::new("etcd")
            .args(["--name", "e1", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e1={peer_url}")])
            .args(["--cert-file", &file("n1.pem"), "--key-file", &file("n1-key.pem")])
            .args(["--trusted-ca-file", &file("ca.pem"), "--client-cert-auth"])
            .args(["--peer-cert-file", &file("n1.pem"), "--peer-key-file", &file("n1-key.pem")])
            .args(["--peer-trusted-ca-file", &file("ca.pem"), "--peer-client-cert-auth"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out)
            .spawn()
            .expect("start etcd (etcd 3.4 on PATH)");
        let mut etcd = Etcd { child, log, client_url, _dir: dir };
        let flags = client_flags(certs, Some(certs));
        wait_until("etcd answers over TLS", || {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!("etcd exited: {status}");
            }
            let run = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &etcd.client_url, "--dial-timeout", "1s"])
                .args(&flags)
                .args(["endpoint", "health"])
                .output()
                .map_err(|e| e.to_string())?;
            if run.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&run.stderr).into_owned())
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
            let mut log = String::new();
            let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut log));
            eprintln!("----- etcd ({}) -----\n{log}", self.log.display());
        }
    }
}

/// `keel --endpoints ENDPOINT FLAGS bench ARGS` (a short run).
fn bench(endpoint: &str, flags: &[String], args: &[&str]) -> Run {
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend(["--timeout", "5", "bench", "--warmup", "0"]);
    all.extend_from_slice(args);
    keel(endpoint, &all)
}

/// The JSON line of a bench run that must succeed (its notes go to stderr).
#[track_caller]
fn bench_json(run: Run) -> serde_json::Value {
    assert_eq!(run.code, Some(0), "{}: {}", run.command, run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{}: {e}: {}", run.command, run.stdout))
}

/// The one line a failed run wrote, which must name the endpoint and say `why`.
#[track_caller]
fn one_line_error(run: &Run, endpoint: &str, why: &str) {
    assert_eq!(run.code, Some(1), "{}: {}", run.command, run.stderr);
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(endpoint) && last.contains(why),
        "{}: {}",
        run.command,
        run.stderr
    );
}

#[test]
fn bench_speaks_grpc_over_tls_to_etcd_with_client_certificates() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    let etcd = Etcd::start(certs.path());
    let flags = client_flags(certs.path(), Some(certs.path()));

    let put = bench_json(bench(
        &etcd.client_url,
        &flags,
        &["--json", "--op", "put", "--clients", "4", "--ops", "200"],
    ));
    assert_eq!(put["errors"], 0, "{put}");
    assert!(put["ops_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{put}");
    let get = bench_json(bench(
        &etcd.client_url,
        &flags,
        &["--json", "--op", "get", "--key-space", "10", "--ops", "50", "--target-leader"],
    ));
    assert_eq!(get["errors"], 0, "{get}");

    // A bare host:port is TLS too once --cacert is given, as with etcdctl.
    let bare = etcd.client_url.trim_start_matches("https://");
    let run = bench_json(bench(bare, &flags, &["--json", "--op", "put", "--ops", "10"]));
    assert_eq!(run["errors"], 0, "{run}");

    // The same flags from the environment.
    let env_run = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["--endpoints", &etcd.client_url, "bench", "--warmup", "0", "--ops", "10", "--json"])
        .env("KEEL_CACERT", certs.path().join("ca.pem"))
        .env("KEEL_CERT", certs.path().join("root.pem"))
        .env("KEEL_KEY", certs.path().join("root-key.pem"))
        .output()
        .expect("run keel");
    assert!(env_run.status.success(), "{}", String::from_utf8_lossy(&env_run.stderr));
}

#[test]
fn bench_over_tls_fails_in_one_line_naming_the_endpoint_and_the_cause() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    let etcd = Etcd::start(certs.path());
    let url = &etcd.client_url;

    // A CA that did not sign etcd's certificate.
    let other = tempfile::tempdir().expect("temp dir");
    make_certs(other.path());
    let wrong_ca = bench(url, &client_flags(other.path(), Some(certs.path())), &["--ops", "10"]);
    one_line_error(&wrong_ca, url, "TLS: the server's certificate is not signed by a CA in --cacert");

    // No client certificate, where etcd requires one.
    let no_cert = bench(url, &client_flags(certs.path(), None), &["--ops", "10"]);
    one_line_error(&no_cert, url, "client certificate (give --cert and --key)");

    // A client certificate from another CA.
    let foreign = bench(url, &client_flags(certs.path(), Some(other.path())), &["--ops", "10"]);
    one_line_error(&foreign, url, "TLS: the server refused the handshake");

    // https:// without --cacert: refused before dialing (usage, exit 2).
    let no_ca = bench(url, &[], &["--ops", "10"]);
    assert_eq!(no_ca.code, Some(2), "{}", no_ca.stderr);
    assert!(no_ca.stderr.contains(&format!("{url} needs --cacert")), "{}", no_ca.stderr);
}

/// A plaintext HTTP server that answers anything with a 400, as a plaintext port answers a TLS
/// ClientHello; and a port that accepts and says nothing.
#[test]
fn tls_to_a_plaintext_port_says_so() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ =
                conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let url = format!("https://{addr}");
    let flags = client_flags(certs.path(), Some(certs.path()));
    let grpc = bench(&url, &flags, &["--ops", "10"]);
    one_line_error(&grpc, &url, "TLS: the server does not speak TLS (is it a plaintext port? use http://)");
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["get", "k"]);
    let http = keel(&url, &args);
    one_line_error(&http, &url, "TLS: the server does not speak TLS (is it a plaintext port? use http://)");
}

/// `keel FLAGS ARGS` against `endpoints`.
fn keel_tls(endpoints: &str, flags: &[String], args: &[&str]) -> Run {
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    keel(endpoints, &all)
}

#[test]
fn the_json_api_commands_and_bench_work_over_tls_against_keeld() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    let cluster = Cluster::start_tls(certs.path());
    let flags = client_tls_flags(certs.path());
    let https: Vec<String> = (1..=3).map(|id| format!("https://{}", cluster.client(id))).collect();
    let all = https.join(",");

    assert_eq!(keel_tls(&all, &flags, &["put", "greeting", "hello"]).ok(), "OK\n");
    assert_eq!(keel_tls(&https[2], &flags, &["get", "greeting"]).ok(), "greeting\nhello\n");
    // A bare host:port is TLS once --cacert is given.
    let bare = cluster.client(2);
    assert_eq!(keel_tls(&bare, &flags, &["get", "greeting", "--serializable"]).ok(), "greeting\nhello\n");
    let txn = support::keel_with_input(
        &all,
        &[flags.iter().map(String::as_str).collect::<Vec<_>>(), vec!["txn"]].concat(),
        b"value(\"greeting\") = \"hello\"\n\nput greeting bye\n\n",
    )
    .ok();
    assert!(txn.starts_with("SUCCESS"), "{txn}");
    // `cluster status` dials every member's client address (bare in the membership) over TLS.
    let status = keel_tls(&all, &flags, &["cluster", "status", "--json"]).json();
    let rows = status["members"].as_array().expect("members");
    assert_eq!(rows.len(), 3, "{status}");
    assert!(rows.iter().all(|r| r.get("error").is_none() && r["status"]["state"].is_string()), "{status}");
    // A lease and a key on it, kept by the keep-alive path over TLS.
    let granted = keel_tls(&all, &flags, &["lease", "grant", "30", "--json"]).json();
    let id = granted["id"].as_i64().expect("lease id").to_string();
    keel_tls(&all, &flags, &["put", "leased", "v", "--lease", &id]).ok();
    keel_tls(&all, &flags, &["lease", "keep-alive", &id, "--once"]).ok();

    // The etcd gRPC API on the same port (ALPN h2).
    let run =
        bench(&all, &flags, &["--json", "--op", "put", "--clients", "4", "--ops", "100", "--target-leader"]);
    let put = bench_json(run);
    assert_eq!(put["errors"], 0, "{put}");
}

#[test]
fn keeld_refusals_read_in_one_line_and_a_refused_write_is_not_an_unknown_outcome() {
    let certs = tempfile::tempdir().expect("temp dir");
    make_certs(certs.path());
    let cluster = Cluster::start_tls(certs.path());
    let url = format!("https://{}", cluster.client(1));

    let other = tempfile::tempdir().expect("temp dir");
    make_certs(other.path());
    let wrong_ca = keel_tls(&url, &client_flags(other.path(), Some(certs.path())), &["get", "k"]);
    one_line_error(&wrong_ca, &url, "(TLS: the server's certificate is not signed by a CA in --cacert)");
    assert!(wrong_ca.stderr.contains("no endpoint answered"), "{}", wrong_ca.stderr);

    // No client certificate: refused at the handshake, so a write moves on to the next endpoint
    // (all refuse: no endpoint answered), never "the outcome is unknown".
    let two = format!("{url},https://{}", cluster.client(2));
    let no_cert = keel_tls(&two, &client_flags(certs.path(), None), &["put", "k", "v"]);
    one_line_error(&no_cert, &url, "(TLS: the server requires a client certificate (give --cert and --key))");
    assert!(no_cert.stderr.starts_with("error: no endpoint answered: "), "{}", no_cert.stderr);
    let bench_no_cert = bench(&url, &client_flags(certs.path(), None), &["--ops", "10"]);
    one_line_error(
        &bench_no_cert,
        &url,
        "TLS: the server requires a client certificate (give --cert and --key)",
    );

    let foreign = keel_tls(&url, &client_flags(certs.path(), Some(other.path())), &["get", "k"]);
    one_line_error(&foreign, &url, "TLS: the server refused the handshake");

    // Plaintext to the TLS port: keeld answers in HTTP what to do.
    let plain = format!("http://{}", cluster.client(1));
    let run = keel(&plain, &["get", "k"]);
    one_line_error(&run, cluster.client(1).as_str(), "this port requires TLS");
    // ... and in HTTP/2, which keel bench reads.
    let run = bench(&plain, &[], &["--ops", "10"]);
    one_line_error(&run, cluster.client(1).as_str(), "(HTTP/2 GOAWAY): this port requires TLS");

    // TLS to a plaintext port: the peer port of a member is TLS too here, so a port that speaks
    // HTTP in plaintext is this test's own (see tls_to_a_plaintext_port_says_so).
}
