//! The client port's bounds against a real keeld process, with small limits so they are quick to
//! reach: connections beyond the cap are closed while the node keeps serving; half a header, a
//! bare HTTP/2 preface, a slow body and an idle keep-alive connection are closed after their
//! timeouts; a range
//! over the answer budget is refused (HTTP and etcd gRPC) and the node's peak memory stays bounded.

mod procs;

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use procs::post_json;
use procs::wait_until;
use procs::Procs;
use procs::DEADLINE;

/// Connects to `addr` and checks the server accepted the connection as one of its own (one
/// HTTP/1.1 keep-alive exchange), so the connection holds one of the node's permits.
fn keep_alive(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let (status, _) = exchange(&mut s, addr, "/health").expect("a first request is served");
    assert_eq!(200, status);
    s
}

/// One HTTP/1.1 request on an open connection; answers the status and body. Reads the answer by
/// its Content-Length, so the connection stays open.
fn exchange(s: &mut TcpStream, addr: &str, path: &str) -> Result<(u16, String), String> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no content-length: {head}"))?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let status = status.ok_or_else(|| format!("no status: {head}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn status(s: &mut TcpStream, addr: &str, path: &str) -> Result<u16, String> {
    exchange(s, addr, path).map(|(status, _)| status)
}

/// Waits until the server closes `s` (end of file or reset), failing the test after `deadline`.
/// Answers how long that took.
#[track_caller]
fn closed_within(s: &mut TcpStream, deadline: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(deadline)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue, // e.g. an HTTP/2 SETTINGS frame or GOAWAY before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("connection not closed within {deadline:?}: {e}"),
        }
    }
}

fn metric(addr: &str, name: &str) -> u64 {
    let (_, body) = procs::http(addr, "GET", "/metrics", b"", Duration::from_secs(5)).expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[test]
fn connections_beyond_the_cap_are_closed_while_the_node_keeps_serving() {
    let procs = Procs::start(1, 0, "max_client_connections = 8\nclient_header_timeout_ms = 60000\n");
    let addr = procs.client(1);
    // Procs::start's own readiness checks used connections that are closed now; wait until the
    // node has counted them out.
    wait_until("readiness connections are closed", DEADLINE, || {
        match metric(&addr, "keel_client_connections_open ") {
            1 => Ok(()),
            n => Err(format!("{n} open")),
        }
    });
    let mut client = keep_alive(&addr);
    let held: Vec<TcpStream> = (0..7).map(|_| keep_alive(&addr)).collect();

    // The ninth: accepted by the kernel, closed by keeld without an answer.
    let mut over = TcpStream::connect(&addr).expect("the kernel accepts the ninth");
    let _ = write!(over, "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    closed_within(&mut over, Duration::from_secs(10));
    let mut answer = Vec::new();
    let _ = over.read_to_end(&mut answer);
    assert!(answer.is_empty(), "the ninth connection got an answer: {:?}", String::from_utf8_lossy(&answer));

    // The client inside the cap is still served.
    assert_eq!(Ok(200), status(&mut client, &addr, "/health"), "an existing client is still served");
    let (_, metrics) = exchange(&mut client, &addr, "/metrics").expect("metrics on the existing client");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_client_connections_total{outcome=\"refused\"}"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refused counter in {metrics}"));
    assert!(refused >= 1, "{metrics}");

    // Once connections close, new ones are served again.
    drop(held);
    wait_until("a new connection is served after others closed", DEADLINE, || {
        procs::http(&addr, "GET", "/health", b"", Duration::from_secs(2)).map(|(status, _)| status)
    });
}

#[test]
fn half_a_header_a_bare_http2_preface_and_a_slow_body_are_closed_after_the_header_timeout() {
    let procs = Procs::start(1, 0, "client_header_timeout_ms = 1000\nclient_idle_timeout_ms = 600000\n");
    let addr = procs.client(1);
    let mut half_header = TcpStream::connect(&addr).expect("connect");
    write!(half_header, "GET /v1/kv/x HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").expect("send");
    // Fewer bytes than the HTTP/2 preface: keeld cannot even tell the protocol yet.
    let mut two_bytes = TcpStream::connect(&addr).expect("connect");
    two_bytes.write_all(b"GE").expect("send");
    let mut silent = TcpStream::connect(&addr).expect("connect");
    // An HTTP/2 client that sends its preface and SETTINGS, then no request.
    let mut preface = TcpStream::connect(&addr).expect("connect");
    preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("send");
    preface.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).expect("send SETTINGS");
    // A whole header, then one byte of a promised 1,000-byte body.
    let mut slow_body = TcpStream::connect(&addr).expect("connect");
    write!(slow_body, "POST /v1/txn HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000\r\n\r\n{{")
        .expect("send");

    let opened = Instant::now();
    for (what, s) in [
        ("half a header", &mut half_header),
        ("two bytes", &mut two_bytes),
        ("nothing", &mut silent),
        ("an HTTP/2 preface", &mut preface),
        ("a slow body", &mut slow_body),
    ] {
        closed_within(s, Duration::from_secs(15));
        let after = opened.elapsed();
        eprintln!("{what}: closed {after:?} after it was opened");
        assert!(after >= Duration::from_millis(900), "{what}: closed before the 1 s timeout: {after:?}");
    }
    assert!(metric(&addr, "keel_client_connections_total{outcome=\"timed_out\"}") >= 4);
    // The node still serves.
    let mut fresh = keep_alive(&addr);
    assert_eq!(Ok(200), status(&mut fresh, &addr, "/health"));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let procs = Procs::start(1, 0, "client_header_timeout_ms = 5000\nclient_idle_timeout_ms = 1000\n");
    let addr = procs.client(1);
    let mut s = keep_alive(&addr);
    // Busy for a while: requests keep it open past the idle timeout.
    let busy_until = Instant::now() + Duration::from_millis(2500);
    let mut answered = Instant::now();
    while Instant::now() < busy_until {
        assert_eq!(Ok(200), status(&mut s, &addr, "/health"), "a busy connection stays open");
        answered = Instant::now();
        std::thread::sleep(Duration::from_millis(200)); // the client's pace, not a synchronization
    }
    closed_within(&mut s, Duration::from_secs(15));
    // Idle since the last answer (the pause after it counts: it measured 798 ms once from the
    // end of the pause).
    let idle = answered.elapsed();
    // After the idle timeout (1 s), well before the header timeout (5 s).
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_millis(4500),
        "closed after {idle:?} idle"
    );
}

#[test]
fn a_range_over_the_answer_budget_is_refused_and_peak_memory_stays_bounded() {
    const BUDGET: u64 = 4 << 20;
    let config = format!("max_response_bytes = {BUDGET}\n");
    let procs = Procs::start(1, 0, &config);
    let addr = procs.client(1);
    // 96 MiB of values: 96 txns of 8 puts of 128 KiB.
    let value = "v".repeat(128 << 10);
    for t in 0..96 {
        let puts: Vec<_> = (0..8)
            .map(|i| serde_json::json!({"put": {"key": format!("big/{t:03}/{i}"), "value": value}}))
            .collect();
        post_json(&addr, "/v1/txn", &serde_json::json!({"success": puts})).expect("load");
    }
    let keys = 96 * 8;
    let pid = procs.pid(1);
    let before = procs::proc_status_bytes(pid, "VmHWM");

    // HTTP: refused with a clear error, whatever the number at once.
    let ranges: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                procs::http(&addr, "GET", "/v1/kv?prefix=big/", b"", Duration::from_secs(60)).expect("answer")
            })
        })
        .collect();
    for r in ranges {
        let (status, body) = r.join().expect("range thread");
        assert_eq!(400, status, "{body}");
        assert!(body.contains("response_too_large") && body.contains("limit"), "{body}");
    }
    // etcd gRPC: RESOURCE_EXHAUSTED, naming the way out.
    let etcdctl = std::process::Command::new("etcdctl")
        .args(["--endpoints", &addr, "get", "big/", "--prefix"])
        .output();
    if let Ok(out) = etcdctl {
        assert!(!out.status.success(), "etcdctl got the whole range");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("max_response_bytes") && err.contains("limit"), "{err}");
    }
    let after = procs::proc_status_bytes(pid, "VmHWM");
    eprintln!("peak RSS before the ranges {} MiB, after {} MiB", before >> 20, after >> 20);
    // Without the budget, each range held the 96 MiB of values at least once (and its encoding).
    assert!(after < before + (48 << 20), "peak RSS grew from {before} to {after} bytes");

    // Pages, counts and keys still work.
    let page = procs::get_json(&addr, "/v1/kv?prefix=big/&limit=16").expect("a page");
    assert_eq!((16, true), (page["kvs"].as_array().map_or(0, Vec::len), page["more"] == true), "{page}");
    let count = procs::get_json(&addr, "/v1/kv?prefix=big/&count_only=true").expect("count");
    assert_eq!(serde_json::json!(keys), count["count"]);
    let names = procs::get_json(&addr, "/v1/kv?prefix=big/&keys_only=true").expect("keys only");
    assert_eq!(Some(keys), names["kvs"].as_array().map(Vec::len));
}
