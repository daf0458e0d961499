//! `keel --user` against a real cluster with auth on: users, roles and auth set up with etcdctl
//! 3.4 as an operator would, then keel's commands as root and as a user with one prefix.

mod support;

use std::process::Command;

use support::{keel, Cluster};

fn etcdctl(endpoints: &str, args: &[&str]) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output()
        .expect("run etcdctl (apt-get install etcd-client)");
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn keel_sends_requests_as_the_user_it_is_given() {
    let c = Cluster::start();
    let eps = c.endpoints(&[1, 2, 3]);
    etcdctl(&eps, &["user", "add", "root:rootpw"]);
    etcdctl(&eps, &["role", "add", "app"]);
    etcdctl(&eps, &["role", "grant-permission", "app", "readwrite", "a/", "--prefix"]);
    etcdctl(&eps, &["user", "add", "alice:alicepw"]);
    etcdctl(&eps, &["user", "grant-role", "alice", "app"]);
    etcdctl(&eps, &["auth", "enable"]);

    // No user: refused, and said so.
    let run = keel(&eps, &["put", "a/1", "v"]);
    assert_eq!(Some(1), run.code, "{}", run.stderr);
    assert!(run.stderr.contains("user name is empty"), "{}", run.stderr);

    // root: everything, admin commands included.
    assert_eq!("OK\n", keel(&eps, &["--user", "root:rootpw", "put", "a/1", "v1"]).ok());
    let members = keel(&eps, &["--user", "root:rootpw", "cluster", "members", "--json"]).json();
    assert_eq!(3, members["members"].as_array().map_or(0, Vec::len), "{members}");

    // alice: her prefix, with the password given either way, and nothing else.
    assert_eq!("a/1\nv1\n", keel(&eps, &["--user", "alice", "--password", "alicepw", "get", "a/1"]).ok());
    assert_eq!("OK\n", keel(&eps, &["--user", "alice:alicepw", "put", "a/2", "v2"]).ok());
    let denied = keel(&eps, &["--user", "alice:alicepw", "put", "b", "v"]);
    assert_eq!(Some(1), denied.code, "{}", denied.stderr);
    assert!(denied.stderr.contains("permission denied"), "{}", denied.stderr);
    let denied = keel(&eps, &["--user", "alice:alicepw", "compaction", "2"]);
    assert!(denied.stderr.contains("permission denied"), "{}", denied.stderr);

    // A wrong password, and flags that do not fit together: clear errors, nothing sent.
    let wrong = keel(&eps, &["--user", "alice:nope", "get", "a/1"]);
    assert_eq!(Some(1), wrong.code, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("authentication failed"), "{}", wrong.stderr);
    let no_password = keel(&eps, &["--user", "alice", "get", "a/1"]);
    assert_eq!(Some(2), no_password.code, "{}", no_password.stderr);
    assert!(no_password.stderr.contains("no password for user \"alice\""), "{}", no_password.stderr);
    let twice = keel(&eps, &["--user", "alice:x", "--password", "y", "get", "a/1"]);
    assert_eq!(Some(2), twice.code, "{}", twice.stderr);
}
