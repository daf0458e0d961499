//! The real `keel` binary against addresses where no keeld answers (nothing listens, a listener
//! that never answers, one that hangs up): exit codes, failover, and the messages a user sees.
//! Tests against a running keeld cluster are in `cluster.rs`.

use std::io::Write as _;
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};

/// A local address where nothing listens: bind port 0, note the port, close it.
fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = listener.local_addr().expect("bound address");
    drop(listener);
    addr.to_string()
}

fn keel(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .env_remove("KEEL_ENDPOINTS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel");
    child.stdin.take().expect("piped stdin").write_all(stdin).expect("write stdin");
    child.wait_with_output().expect("keel exits")
}

#[test]
fn no_endpoint_answered_names_every_endpoint_and_exits_1() {
    let first = dead_endpoint();
    let second = dead_endpoint();
    let endpoints = format!("{first},http://{second}");
    let out = keel(&["--endpoints", &endpoints, "get", "foo"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!("error: no endpoint answered: {first} (connection refused), {second} (connection refused)")
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn the_environment_supplies_endpoints() {
    let dead = dead_endpoint();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["cluster", "members"])
        .env("KEEL_ENDPOINTS", &dead)
        .stdin(Stdio::null())
        .output()
        .expect("run keel");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("no endpoint answered: {dead} (connection refused)")), "{stderr}");
}

#[test]
fn a_txn_syntax_error_exits_2_before_any_request() {
    let dead = dead_endpoint();
    let out = keel(&["--endpoints", &dead, "txn"], b"value(\"k\") = \"v\"\n\nupdate k v\n");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "error: invalid txn: line 3: unknown operation 'update' (expected put, get or del): update k v"
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(keel(&["get"], b"").status.code(), Some(2));
    assert_eq!(keel(&["--endpoints", "https://127.0.0.1:1", "get", "k"], b"").status.code(), Some(2));
    assert_eq!(keel(&["cluster", "init", "1=a"], b"").status.code(), Some(2));
    let out = keel(&["put", "", "v"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end(), "error: the key must not be empty");
}

/// A listener that never accepts: the kernel completes the handshake and no answer ever comes.
fn silent_endpoint() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = listener.local_addr().expect("bound address").to_string();
    (listener, addr)
}

/// Whether anything connected to `listener` (left in its backlog, never accepted).
fn was_contacted(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).expect("set nonblocking");
    match listener.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    }
}

#[test]
fn a_read_that_times_out_moves_on_to_the_next_endpoint() {
    let (silent, silent_addr) = silent_endpoint();
    let dead = dead_endpoint();
    let endpoints = format!("{silent_addr},{dead}");
    let out = keel(&["--timeout", "0.2", "--endpoints", &endpoints, "get", "k"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "error: no endpoint answered: {silent_addr} (timed out after 200ms), {dead} (connection refused)"
        )
    );
    drop(silent);
}

#[test]
fn a_write_that_times_out_is_not_sent_elsewhere() {
    let dead = dead_endpoint();
    let (silent, silent_addr) = silent_endpoint();
    let (next, next_addr) = silent_endpoint();
    // The refused endpoint certainly did not apply the delete, so the silent one is tried; after
    // its timeout the delete may have been applied, so `next` must never be contacted.
    let endpoints = format!("{dead},{silent_addr},{next_addr}");
    let out = keel(&["--timeout", "0.2", "--endpoints", &endpoints, "del", "k"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "error: {silent_addr} (timed out after 200ms): the outcome is unknown, the request may or \
             may not have been applied; it was not sent to another endpoint (tried before: {dead} \
             (connection refused))"
        )
    );
    assert!(out.stdout.is_empty());
    assert!(!was_contacted(&next), "the write was sent on after a timeout");
    drop(silent);
}

#[test]
fn a_write_whose_answer_is_cut_off_is_not_sent_elsewhere() {
    // Reads the request, then closes the connection without answering.
    let hangup = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let hangup_addr = hangup.local_addr().expect("bound address").to_string();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = hangup.accept().expect("accept");
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match std::io::Read::read(&mut conn, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        request
    });
    let (next, next_addr) = silent_endpoint();
    let endpoints = format!("{hangup_addr},{next_addr}");
    let out = keel(&["--endpoints", &endpoints, "txn"], b"\nput k v\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with(&format!("error: {hangup_addr} (")), "{stderr}");
    assert!(stderr.contains("the outcome is unknown"), "{stderr}");
    let request = server.join().expect("hang-up server");
    assert!(request.starts_with(b"POST /v1/txn "), "{}", String::from_utf8_lossy(&request));
    assert!(!was_contacted(&next), "the write was sent on after a cut-off answer");
}
