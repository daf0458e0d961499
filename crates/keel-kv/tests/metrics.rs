//! `GET /metrics` on a real keeld: etcd's series under etcd's names (what dashboards written for
//! etcd read), with gRPC calls from etcdctl counted by method and code.

mod procs;

use std::collections::BTreeMap;
use std::time::Duration;

use procs::Procs;

/// Every sample of the exposition: `name{labels}` → value.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = procs::http(addr, "GET", "/metrics", b"", Duration::from_secs(5)).expect("metrics");
    assert_eq!(200, status, "{body}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF:\n{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {l:?}"));
            (name.to_string(), value.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        })
        .collect()
}

fn etcdctl(addr: &str, args: &[&str]) -> bool {
    procs::etcdctl(addr, args).status.success()
}

#[test]
fn etcd_series_count_what_happened() {
    let c = Procs::start(1, 0, "");
    let addr = c.client(1);
    assert!(etcdctl(&addr, &["put", "k", "v"]));
    assert!(etcdctl(&addr, &["put", "k", "w"]));
    assert!(etcdctl(&addr, &["get", "k"]));
    // Refused by the server: an unknown lease.
    assert!(!etcdctl(&addr, &["put", "k", "x", "--lease=1234"]));

    let m = scrape(&addr);
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("no {name} in {m:#?}"));
    assert_eq!(1.0, get("etcd_server_has_leader"));
    assert_eq!(1.0, get("etcd_server_is_leader"));
    assert_eq!(1.0, get("etcd_server_leader_changes_seen_total"));
    assert_eq!(0.0, get("etcd_server_proposals_pending"));
    assert!(get("etcd_server_proposals_applied_total") >= 3.0, "two puts and the membership");
    assert!(get("etcd_server_proposals_committed_total") >= get("etcd_server_proposals_applied_total"));
    assert!(get("etcd_mvcc_db_total_size_in_bytes") > 0.0);
    assert!(get("etcd_disk_wal_fsync_duration_seconds_count") >= 2.0, "each put's log flush");
    assert!(get("etcd_disk_backend_commit_duration_seconds_count") >= 1.0);
    let put = r#"grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put""#;
    assert_eq!(3.0, get(&format!("grpc_server_started_total{{{put}}}")));
    assert_eq!(2.0, get(&format!(r#"grpc_server_handled_total{{{put},grpc_code="OK"}}"#)));
    assert_eq!(1.0, get(&format!(r#"grpc_server_handled_total{{{put},grpc_code="NotFound"}}"#)));
    assert_eq!(3.0, get(&format!("grpc_server_handling_seconds_count{{{put}}}")));
    let range = r#"grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Range",grpc_code="OK""#;
    assert_eq!(1.0, get(&format!("grpc_server_handled_total{{{range}}}")));
}

/// etcd's peer round-trip histogram: the leader times its heartbeats to each follower, labelled
/// with the follower's member id in hex as etcd labels it.
#[test]
fn the_leader_times_round_trips_to_each_peer() {
    let mut c = Procs::start(3, 0, "");
    let leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(30));
    let addr = c.client(leader);
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    let m = procs::wait_until("heartbeats to both followers timed", Duration::from_secs(30), || {
        let m = scrape(&addr);
        let timed = followers.iter().all(|f| {
            m.get(&format!(r#"etcd_network_peer_round_trip_time_seconds_count{{To="{f:x}"}}"#))
                .is_some_and(|&n| n >= 1.0)
        });
        if timed {
            Ok(m)
        } else {
            Err(format!("{m:#?}"))
        }
    });
    for f in followers {
        let count = m[&format!(r#"etcd_network_peer_round_trip_time_seconds_count{{To="{f:x}"}}"#)];
        let sum = m[&format!(r#"etcd_network_peer_round_trip_time_seconds_sum{{To="{f:x}"}}"#)];
        // On loopback a heartbeat answers in well under its 100 ms interval.
        assert!(sum > 0.0 && sum / count < 0.05, "mean round trip to {f}: {sum} s / {count}");
        // etcd's buckets: 100 µs up, doubling.
        assert!(
            m.contains_key(&format!(
                r#"etcd_network_peer_round_trip_time_seconds_bucket{{le="0.0001",To="{f:x}"}}"#
            )) || m.contains_key(&format!(
                r#"etcd_network_peer_round_trip_time_seconds_bucket{{To="{f:x}",le="0.0001"}}"#
            ))
        );
    }
    assert!(
        !m.keys().any(|k| k.contains(&format!(r#"To="{leader:x}""#))),
        "no round trips to the leader itself"
    );
}
