//! The real `keel` binary against a real three-node keeld cluster, each node its own process on
//! loopback (`support/`): what every command prints, failover across endpoints, writes through
//! followers, and membership changes.

mod support;

use keel_testkit::free_ports;
use serde_json::json;
use support::{keel, keel_with_input, leader, wait_until, Cluster};
/// A table's rows as whitespace-separated cells, after checking its header. A trailing cell made
/// of several words (`connection refused`) stays one cell.
#[track_caller]
fn table(text: &str, header: &str, columns: usize) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    assert_eq!(
        lines.next().map(|h| h.split_whitespace().collect::<Vec<_>>().join(" ")).as_deref(),
        Some(header)
    );
    lines
        .map(|line| {
            let mut cells: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            if cells.len() > columns {
                let last = cells.split_off(columns - 1).join(" ");
                cells.push(last);
            }
            cells
        })
        .collect()
}

const MEMBERS_HEADER: &str = "ID MEMBERSHIP PEER ADDRESS CLIENT ADDRESS LEADER";
const STATUS_HEADER: &str = "ID ADDRESS ROLE TERM LAST LOG APPLIED LAG REACHABLE";

/// `keel cluster members` output: each row as `[id, voter|learner, peer, client]`, and the ids
/// of the rows marked as leader.
#[track_caller]
fn members_table(text: &str) -> (Vec<Vec<String>>, Vec<u64>) {
    let mut leaders = Vec::new();
    let rows = table(text, MEMBERS_HEADER, 5)
        .into_iter()
        .map(|mut row| {
            if row.len() == 5 && row[4] == "yes" {
                leaders.extend(row[0].parse::<u64>().ok());
                row.pop();
            }
            row
        })
        .collect();
    (rows, leaders)
}

/// Checks `keel cluster members` output: exactly `members` (id, is a voter) with their
/// addresses, one voter marked as leader. Answers that leader.
#[track_caller]
fn check_members(c: &Cluster, text: &str, members: &[(u64, bool)]) -> u64 {
    let (rows, leaders) = members_table(text);
    let expected: Vec<Vec<String>> = members
        .iter()
        .map(|&(id, voter)| {
            let membership = if voter { "voter" } else { "learner" };
            vec![id.to_string(), membership.to_owned(), c.peer(id), c.client(id)]
        })
        .collect();
    assert_eq!(rows, expected, "{text}");
    let is_voter = |id: &u64| members.contains(&(*id, true));
    assert!(leaders.len() == 1 && leaders.iter().all(is_voter), "one voter leads: {text}");
    leaders[0]
}

/// Polls `keel cluster status` until exactly `ids` have rows, each with its client address, one
/// member leads (`leader` if given), every other member follows, and all are reachable except
/// `down`. Answers the rows and the leader.
#[track_caller]
fn wait_status(
    c: &Cluster,
    endpoints: &str,
    ids: &[u64],
    leader: Option<u64>,
    down: Option<u64>,
) -> (Vec<Vec<String>>, u64) {
    let what = format!("cluster status of {ids:?} with leader {leader:?} and {down:?} down");
    wait_until(&what, || {
        let run = keel(endpoints, &["cluster", "status"]);
        if run.code != Some(0) {
            return Err(run.stderr);
        }
        let rows = table(&run.stdout, STATUS_HEADER, 8);
        let shown: Vec<u64> = rows.iter().map(|r| shown_id(r)).collect();
        let leaders: Vec<u64> = rows
            .iter()
            .filter(|r| r.get(2).is_some_and(|role| role == "leader"))
            .map(|r| shown_id(r))
            .collect();
        let the_leader = match (leaders.as_slice(), leader) {
            ([one], None) => *one,
            ([one], Some(l)) if *one == l => l,
            _ => return Err(run.stdout),
        };
        let as_expected = |r: &Vec<String>| {
            let id = shown_id(r);
            let (role, reachable) = match id {
                _ if Some(id) == down => ("-", "connection refused"),
                _ if id == the_leader => ("leader", "yes"),
                _ => ("follower", "yes"),
            };
            r.len() == 8 && r[1] == c.client(id) && r[2] == role && r[7] == reachable
        };
        if shown == ids && rows.iter().all(as_expected) {
            Ok((rows, the_leader))
        } else {
            Err(run.stdout)
        }
    })
}

fn shown_id(row: &[String]) -> u64 {
    row.first().and_then(|id| id.parse().ok()).unwrap_or(0)
}

/// Some voter of nodes 1-3 other than `leader`.
fn a_follower(leader: u64) -> u64 {
    (1..=3).find(|id| *id != leader).expect("three voters")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// put, get (one key, ranges, every output flag), del, with text and `--json` output as
/// docs/cli.md shows them. Writes go through a follower, which forwards them to the leader.
#[test]
fn key_value_commands_print_as_documented() {
    let c = Cluster::start();
    let leader = leader(&c.endpoints(&[1, 2, 3]));
    let follower = c.endpoints(&[a_follower(leader)]);
    let on_leader = c.endpoints(&[leader]);

    // Each write through the follower is one revision, applied by the leader.
    assert_eq!(keel(&follower, &["put", "greeting", "hello"]).ok(), "OK\n");
    assert_eq!(keel(&follower, &["put", "greeting", "hey", "--prev-kv"]).ok(), "OK\ngreeting\nhello\n");
    assert_eq!(keel(&follower, &["put", "greeting", "hi", "--json"]).json(), json!({"revision": 4}));
    for (key, value) in [("app/1", "x"), ("app/2", "y"), ("app/3", "z")] {
        assert_eq!(keel(&follower, &["put", key, value]).ok(), "OK\n");
    }
    let notes = keel_with_input(&follower, &["put", "notes", "-"], b"line 1\nline 2\n");
    assert_eq!(notes.ok(), "OK\n");

    assert_eq!(keel(&follower, &["get", "greeting"]).ok(), "greeting\nhi\n");
    assert_eq!(keel(&follower, &["get", "notes"]).ok(), "notes\nline 1\nline 2\n\n");
    assert_eq!(keel(&follower, &["get", "greeting", "--keys-only"]).ok(), "greeting\n");
    assert_eq!(keel(&follower, &["get", "greeting", "--count-only"]).ok(), "1\n");
    assert_eq!(
        keel(&follower, &["get", "greeting", "--json"]).json(),
        json!({"count": 1, "more": false, "revision": 8, "kvs": [
            {"key": "greeting", "value": "hi", "create_revision": 2, "mod_revision": 4, "version": 3}]})
    );

    // A missing key prints nothing and succeeds, as etcdctl does; --json keeps the range shape.
    let missing = keel(&follower, &["get", "missing"]);
    assert_eq!((missing.code, missing.stdout.as_str(), missing.stderr.as_str()), (Some(0), "", ""));
    assert_eq!(
        keel(&follower, &["get", "missing", "--json"]).json(),
        json!({"count": 0, "kvs": [], "more": false})
    );

    assert_eq!(keel(&follower, &["get", "app/", "--prefix"]).ok(), "app/1\nx\napp/2\ny\napp/3\nz\n");
    assert_eq!(keel(&follower, &["get", "app/", "--prefix", "--limit", "2"]).ok(), "app/1\nx\napp/2\ny\n");
    assert_eq!(keel(&follower, &["get", "app/", "--prefix", "--keys-only"]).ok(), "app/1\napp/2\napp/3\n");
    assert_eq!(keel(&follower, &["get", "app/", "--prefix", "--count-only"]).ok(), "3\n");
    assert_eq!(
        keel(&follower, &["get", "app/2", "--from-key", "--keys-only"]).ok(),
        "app/2\napp/3\ngreeting\nnotes\n"
    );
    assert_eq!(
        keel(&follower, &["get", "", "--prefix", "--keys-only"]).ok(),
        "app/1\napp/2\napp/3\ngreeting\nnotes\n"
    );
    assert_eq!(
        keel(&follower, &["get", "app/", "--prefix", "--limit", "2", "--keys-only", "--json"]).json(),
        json!({"count": 3, "more": true, "revision": 8, "kvs": [
            {"key": "app/1", "create_revision": 5, "mod_revision": 5, "version": 1},
            {"key": "app/2", "create_revision": 6, "mod_revision": 6, "version": 1}]})
    );

    // Serializable reads answer from the contacted node's own state: the leader applied every
    // write before answering it; the follower catches up.
    let all_app = "app/1\nx\napp/2\ny\napp/3\nz\n";
    assert_eq!(keel(&on_leader, &["get", "app/", "--prefix", "--serializable"]).ok(), all_app);
    assert_eq!(
        keel(&on_leader, &["get", "greeting", "--serializable", "--json"]).json()["kvs"][0]["value"],
        json!("hi")
    );
    wait_until("the follower's serializable read shows every write", || {
        let out = keel(&follower, &["get", "app/", "--prefix", "--serializable"]).ok();
        if out == all_app {
            Ok(())
        } else {
            Err(out)
        }
    });

    assert_eq!(keel(&follower, &["del", "greeting"]).ok(), "1\n");
    assert_eq!(keel(&follower, &["del", "greeting"]).ok(), "0\n");
    assert_eq!(
        keel(&follower, &["del", "app/", "--prefix", "--prev-kv"]).ok(),
        "3\napp/1\nx\napp/2\ny\napp/3\nz\n"
    );
    assert_eq!(
        keel(&follower, &["del", "notes", "--json"]).json(),
        json!({"revision": 11, "deleted": 1, "prev_kvs": []})
    );
    assert_eq!(keel(&on_leader, &["get", "", "--prefix"]).ok(), "");

    // A server error prints its message and code, exit 1.
    let long_key = "x".repeat(9000);
    let too_large = keel(&follower, &["get", &long_key]);
    assert_eq!(too_large.code, Some(1));
    assert!(
        too_large.stderr.starts_with("error: ") && too_large.stderr.ends_with(" (key_too_large)\n"),
        "{}",
        too_large.stderr
    );
}

/// `keel txn` from stdin through a follower: the documented example takes the success branch, a
/// failing compare the failure branch, and only that branch's writes happen.
#[test]
fn txn_runs_one_branch() {
    let c = Cluster::start();
    let follower = c.endpoints(&[a_follower(leader(&c.endpoints(&[1, 2, 3])))]);
    keel(&follower, &["put", "greeting", "hey"]).ok();
    for n in ["1", "2", "3", "4"] {
        keel(&follower, &["put", "counter", n]).ok();
    }

    let example = "value(\"greeting\") = \"hey\"\nmod(\"counter\") > \"3\"\n\nput \"a b\" \"c d\"\nget greeting\n\ndel greeting\n";
    let run = keel_with_input(&follower, &["txn"], example.as_bytes());
    assert_eq!(run.ok(), "SUCCESS\n\nOK\n\ngreeting\nhey\n");
    assert_eq!(keel(&follower, &["get", "a b"]).ok(), "a b\nc d\n");
    assert_eq!(
        keel(&follower, &["get", "greeting"]).ok(),
        "greeting\nhey\n",
        "the failure branch did not run"
    );

    let failing = "value(\"greeting\") = \"nope\"\n\nput never x\n\nput f v\nget greeting\ndel counter\n";
    let run = keel_with_input(&follower, &["txn"], failing.as_bytes());
    assert_eq!(run.ok(), "FAILURE\n\nOK\n\ngreeting\nhey\n\n1\n");
    assert_eq!(keel(&follower, &["get", "never"]).ok(), "", "the success branch did not run");
    assert_eq!(keel(&follower, &["get", "f"]).ok(), "f\nv\n");
    assert_eq!(keel(&follower, &["get", "counter"]).ok(), "");

    // Revisions: greeting 1, counter 2-5, the two txns 6 and 7, this one 8.
    let run =
        keel_with_input(&follower, &["txn", "--json"], b"version(\"f\") = 1\n\nput g 1\nget f\n\ndel f\n");
    assert_eq!(
        run.json(),
        json!({"revision": 9, "succeeded": true, "responses": [
            {"put": {"revision": 9}},
            {"get": {"count": 1, "kvs": [
                {"key": "f", "value": "v", "create_revision": 8, "mod_revision": 8, "version": 1}]}}]})
    );
}

/// members and status; a learner added, started, promoted once in sync, and removed; leadership
/// handed to a follower. Changes go through followers as well as the leader.
#[test]
fn membership_changes_and_leader_transfer() {
    let mut c = Cluster::start();
    let all = c.endpoints(&[1, 2, 3]);
    let voters = [(1, true), (2, true), (3, true)];
    let leader = check_members(&c, &keel(&all, &["cluster", "members"]).ok(), &voters);
    let (status, _) = wait_status(&c, &all, &[1, 2, 3], Some(leader), None);
    let terms: Vec<&str> = status.iter().map(|r| r[3].as_str()).collect();
    assert!(terms.iter().all(|t| *t == terms[0]), "one term everywhere: {status:?}");
    let follower = c.endpoints(&[a_follower(leader)]);

    // Add node 4 as a learner (through a follower), then start it to join.
    let (peer4, client4) = (c.peer(4), c.client(4));
    let added = keel(&follower, &["cluster", "add-learner", "4", &peer4, "--client-addr", &client4]).ok();
    let (first, members) = added.split_once('\n').expect("a line, then the members");
    assert_eq!(first, "added learner 4");
    check_members(&c, members, &[(1, true), (2, true), (3, true), (4, false)]);
    c.spawn(4, &["--initial-cluster-state", "existing"]);
    c.wait_ready(4);

    // The leader refuses the promotion until the learner has caught up.
    let promoted = wait_until("node 4 promoted", || {
        let run = keel(&all, &["cluster", "promote", "4"]);
        match run.code {
            Some(0) => Ok(run.stdout),
            _ if run.stderr.contains("not in sync") => Err(run.stderr),
            _ => panic!("{}: {}", run.command, run.stderr),
        }
    });
    let (first, members) = promoted.split_once('\n').expect("a line, then the members");
    assert_eq!(first, "promoted 4 to voter");
    check_members(&c, members, &[(1, true), (2, true), (3, true), (4, true)]);
    wait_status(&c, &c.endpoints(&[1, 2, 3, 4]), &[1, 2, 3, 4], None, None);
    // The new voter serves, and has what was written before it joined.
    keel(&all, &["put", "k", "v"]).ok();
    assert_eq!(keel(&c.endpoints(&[4]), &["get", "k"]).ok(), "k\nv\n");

    let removed = keel(&follower, &["cluster", "remove", "4"]).ok();
    let (first, members) = removed.split_once('\n').expect("a line, then the members");
    assert_eq!(first, "removed 4");
    check_members(&c, members, &voters);
    c.kill(4);
    let (_, leader) = wait_status(&c, &all, &[1, 2, 3], None, None);

    // Hand leadership to a follower, asking the other follower.
    let target = a_follower(leader);
    let via = c.endpoints(&[(1..=3).find(|id| *id != target && *id != leader).expect("three voters")]);
    let transfer = keel(&via, &["cluster", "transfer-leader", &target.to_string()]);
    assert_eq!(transfer.ok(), format!("leader is now {target}\n"));
    wait_status(&c, &all, &[1, 2, 3], Some(target), None);
    wait_until("the members name the new leader", || {
        let members = keel(&all, &["cluster", "members"]).ok();
        match check_members(&c, &members, &voters) {
            l if l == target => Ok(()),
            _ => Err(members),
        }
    });

    let unknown = keel(&all, &["cluster", "transfer-leader", "9"]);
    assert_eq!(unknown.code, Some(1));
    assert!(
        unknown.stderr.starts_with("error: ") && unknown.stderr.ends_with(" (unknown_member)\n"),
        "{}",
        unknown.stderr
    );
}

/// A dead endpoint before a live one, and a SIGKILLed follower: reads and writes go on through the
/// remaining endpoints, and `cluster status` shows the dead member's row.
#[test]
fn commands_fail_over_to_live_endpoints() {
    let mut c = Cluster::start();
    let voters = [(1, true), (2, true), (3, true)];

    // Nothing listens on `dead`: a refused connection certainly applied nothing, so even writes
    // move on to the next endpoint.
    let dead = format!("127.0.0.1:{}", free_ports(1)[0]);
    let dead_then_live = format!("{dead},{}", c.client(1));
    assert_eq!(keel(&dead_then_live, &["put", "k", "v1"]).ok(), "OK\n");
    assert_eq!(keel(&dead_then_live, &["get", "k"]).ok(), "k\nv1\n");
    assert_eq!(keel_with_input(&dead_then_live, &["txn"], b"\nput t 1\n").ok(), "SUCCESS\n\nOK\n");
    assert_eq!(keel(&dead_then_live, &["del", "t"]).ok(), "1\n");
    let leader = check_members(&c, &keel(&dead_then_live, &["cluster", "members"]).ok(), &voters);

    // SIGKILL a follower and list it first: every command moves on to the others. The other
    // follower comes next, so writes are forwarded too.
    let victim = a_follower(leader);
    let other = (1..=3).find(|id| *id != victim && *id != leader).expect("three voters");
    c.kill(victim);
    let endpoints = c.endpoints(&[victim, other, leader]);
    assert_eq!(keel(&endpoints, &["put", "k", "v2"]).ok(), "OK\n");
    assert_eq!(keel(&endpoints, &["get", "k"]).ok(), "k\nv2\n");
    let txn = b"value(\"k\") = \"v2\"\n\nput k v3\n\nput k bad\n";
    assert_eq!(keel_with_input(&endpoints, &["txn"], txn).ok(), "SUCCESS\n\nOK\n");
    assert_eq!(keel(&endpoints, &["get", "k"]).ok(), "k\nv3\n");
    wait_until("the surviving follower's serializable read shows the txn", || {
        match keel(&endpoints, &["get", "k", "--serializable"]).ok() {
            out if out == "k\nv3\n" => Ok(()),
            out => Err(out),
        }
    });
    assert_eq!(keel(&endpoints, &["del", "k"]).ok(), "1\n");
    check_members(&c, &keel(&endpoints, &["cluster", "members"]).ok(), &voters);
    wait_status(&c, &endpoints, &[1, 2, 3], None, Some(victim));

    // With only the dead node listed, nothing answers, and the user is told why.
    let alone = c.endpoints(&[victim]);
    for args in [&["get", "k"][..], &["put", "k", "v"][..]] {
        let run = keel(&alone, args);
        assert_eq!(run.code, Some(1), "{}", run.command);
        assert_eq!(run.stderr, format!("error: no endpoint answered: {alone} (connection refused)\n"));
    }
}
