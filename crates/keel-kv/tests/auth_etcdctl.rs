//! etcdctl 3.4's auth flows, unmodified, against etcd 3.4 and against a three-node keeld cluster
//! of separate processes: every command's stdout, stderr and exit code must be the same on both.
//! On keeld each command goes to the next member in turn, so followers serve them too.
//!
//! Needs `etcd` and `etcdctl` on PATH (`apt-get install etcd-server etcd-client`).

use std::io::Write;
use std::process::Command;
use std::process::Stdio;

mod procs;

use procs::Etcd;
use procs::Procs;

/// One command's answer: exit code, stdout, stderr without the client library's JSON log lines
/// (they carry timestamps and source lines).
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn etcdctl(endpoint: &str, args: &[&str], stdin: &str) -> Answer {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--dial-timeout=5s", "--command-timeout=10s"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start etcdctl (is it on PATH? apt-get install etcd-client)");
    // A write error means etcdctl exited early; its output says why.
    let _ = child.stdin.take().expect("piped stdin").write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("etcdctl's output");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("{\"level\""))
        .map(|l| format!("{l}\n"))
        .collect();
    Answer { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr }
}

/// The script: `(arguments, stdin)`. Users, roles and permissions of every shape, etcd's refusals,
/// then auth on: a user's reads and writes inside and outside its permissions, root's rules,
/// a password change, and auth off again.
fn script() -> Vec<(&'static str, &'static str)> {
    vec![
        ("user add root:rootpw", ""),
        ("user add root:x", ""),
        ("role add reader", ""),
        ("role add reader", ""),
        ("role add writer", ""),
        ("role grant-permission reader read foo", ""),
        ("role grant-permission --prefix writer readwrite app/", ""),
        ("role grant-permission reader read a z", ""),
        ("role grant-permission reader write b", ""),
        ("role grant-permission reader read --from-key x", ""),
        ("role grant-permission reader readwrite foo", ""),
        ("role grant-permission nosuch read foo", ""),
        ("role get reader", ""),
        ("role get writer", ""),
        ("role list", ""),
        ("user add alice:alicepw", ""),
        ("user add bob:bobpw", ""),
        ("user grant-role alice reader", ""),
        ("user grant-role alice reader", ""),
        ("user grant-role bob writer", ""),
        ("user get alice", ""),
        ("user get --detail alice", ""),
        ("user list", ""),
        ("user grant-role alice nosuch", ""),
        ("user grant-role nobody reader", ""),
        ("user revoke-role alice writer", ""),
        ("role revoke-permission reader nope", ""),
        ("role revoke-permission reader a z", ""),
        ("role revoke-permission nosuch a z", ""),
        ("user get nobody", ""),
        ("role get nosuch", ""),
        ("user delete nobody", ""),
        ("role delete nosuch", ""),
        ("auth enable", ""),
        ("role list --user root:rootpw", ""),
        ("user get root --user root:rootpw", ""),
        ("get foo --user alice:wrong", ""),
        ("get foo --user nobody:pw", ""),
        ("put app/x 1 --user root:rootpw", ""),
        ("get foo --user alice:alicepw", ""),
        ("put foo v --user alice:alicepw", ""),
        ("get foo --user alice:alicepw", ""),
        ("get app/x --user bob:bobpw", ""),
        ("get --prefix app/ --user bob:bobpw", ""),
        ("put app/y 2 --user bob:bobpw", ""),
        ("get foo", ""),
        ("put foo v", ""),
        ("get foo --user bob:bobpw", ""),
        ("get --prefix app/ --user alice:alicepw", ""),
        ("put app/x 2 --user alice:alicepw", ""),
        ("put b 1 --user alice:alicepw", ""),
        ("get b --user alice:alicepw", ""),
        ("del foo --user alice:alicepw", ""),
        ("put foo v2 --user alice:alicepw", ""),
        ("role list --user alice:alicepw", ""),
        ("user list --user bob:bobpw", ""),
        ("user get alice --user alice:alicepw", ""),
        ("user get bob --user alice:alicepw", ""),
        ("role get reader --user alice:alicepw", ""),
        ("role get writer --user alice:alicepw", ""),
        ("user add eve:x --user alice:alicepw", ""),
        ("auth disable --user alice:alicepw", ""),
        ("user delete root --user root:rootpw", ""),
        ("user revoke-role root root --user root:rootpw", ""),
        ("role delete root --user root:rootpw", ""),
        ("auth enable --user root:rootpw", ""),
        ("user passwd bob --interactive=false --user root:rootpw", "bobpw2\n"),
        ("get app/x --user bob:bobpw", ""),
        ("get app/x --user bob:bobpw2", ""),
        ("user revoke-role bob writer --user root:rootpw", ""),
        ("get app/x --user bob:bobpw2", ""),
        ("auth disable --user root:rootpw", ""),
        ("auth disable", ""),
        ("get foo", ""),
        ("user delete alice", ""),
        ("role delete reader", ""),
        ("user list", ""),
        ("role list", ""),
        ("user get bob", ""),
    ]
}

/// Runs the script, command `i` at `endpoint(i)`; answers each command with its answer.
fn run(endpoint: impl Fn(usize) -> String) -> Vec<(String, Answer)> {
    script()
        .into_iter()
        .enumerate()
        .map(|(i, (args, stdin))| {
            let argv: Vec<&str> = args.split_whitespace().collect();
            (args.to_string(), etcdctl(&endpoint(i), &argv, stdin))
        })
        .collect()
}

#[test]
fn auth_commands_answer_as_etcd() {
    let etcd = {
        let e = Etcd::start(&[]);
        run(|_| e.client.clone())
    };
    let keel = {
        let procs = Procs::start(3, 0, "");
        run(|i| procs.client(i as u64 % 3 + 1))
    };
    // The script does what it means to on etcd (not, say, fail to connect throughout).
    let etcd_said = |cmd: &str| &etcd.iter().find(|(c, _)| c == cmd).expect("a command of the script").1;
    assert_eq!("Role reader updated\n", etcd_said("role grant-permission reader read a z").stdout);
    assert_eq!(
        "Error: etcdserver: permission denied\n",
        etcd_said("get --prefix app/ --user alice:alicepw").stderr
    );
    assert_eq!("Error: etcdserver: user name is empty\n", etcd_said("get foo").stderr);
    assert_eq!("alice\nbob\nroot\n", etcd_said("user list").stdout);
    for ((cmd, want), (_, got)) in etcd.iter().zip(&keel) {
        assert_eq!(want, got, "etcdctl {cmd}: etcd answered the first, keeld the second");
    }
}
