//! The real `keel` binary against addresses where no keeld answers: exit codes and the messages a
//! user sees. (Tests against a running keeld live with keeld.)

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

#[test]
fn a_silent_endpoint_times_out_and_the_next_is_tried() {
    // Listening but never accepting: the kernel completes the handshake and no answer ever comes.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let silent_addr = silent.local_addr().expect("bound address").to_string();
    let dead = dead_endpoint();
    let endpoints = format!("{silent_addr},{dead}");
    let out = keel(&["--timeout", "0.2", "--endpoints", &endpoints, "del", "k"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "error: no endpoint answered: {silent_addr} (timed out after 200ms), {dead} (connection refused)"
        )
    );
    drop(silent);
}
