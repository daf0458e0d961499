//! etcd users' migration path: `etcdctl make-mirror` copies a live etcd 3.4 into a Keel cluster
//! and then follows it (puts and deletes) until stopped.

mod procs;

use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use procs::wait_until;
use procs::Etcd;
use procs::Procs;

fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = procs::etcdctl(endpoint, args);
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills make-mirror when the test ends, however it ends.
struct Mirror(Child);

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn make_mirror_copies_a_live_etcd_into_keel_and_follows_it() {
    let etcd = Etcd::start(&[]);
    let keel = Procs::start(3, 0, "");
    let dest = keel.clients([1, 2, 3]).join(",");
    for i in 0..100 {
        ok(&etcd.client, &["put", &format!("app/{i:03}"), &format!("v{i}")]);
    }
    ok(&etcd.client, &["put", "other", "x"]);

    let mirror = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.client))
        .args(["make-mirror", "--dest-prefix=", "--prefix=app/", &keel.client(1)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcdctl make-mirror");
    let _mirror = Mirror(mirror);
    let keys = |ep: &str| {
        ok(ep, &["get", "--prefix", "app/", "--keys-only"]).lines().filter(|l| !l.is_empty()).count()
    };
    wait_until("the copy", Duration::from_secs(30), || match keys(&dest) {
        100 => Ok(()),
        n => Err(format!("{n} of 100 keys copied")),
    });
    // Then it follows: a put, an overwrite and a delete made on etcd after the copy.
    ok(&etcd.client, &["put", "app/new", "fresh"]);
    ok(&etcd.client, &["put", "app/000", "changed"]);
    ok(&etcd.client, &["del", "app/001"]);
    let expected = ok(&etcd.client, &["get", "--prefix", "app/", "--print-value-only"]);
    wait_until("the mirror to follow", Duration::from_secs(30), || {
        let got = ok(&dest, &["get", "--prefix", "app/", "--print-value-only"]);
        if got == expected {
            Ok(())
        } else {
            Err(format!("{} lines on Keel, {} on etcd", got.lines().count(), expected.lines().count()))
        }
    });
    assert_eq!("", ok(&dest, &["get", "other"]), "only the mirrored prefix is copied");
}
