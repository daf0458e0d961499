//! What the commands print: etcdctl-like text for people, one JSON object per command for
//! scripts. Pure functions from decoded answers to the text, so tests assert on strings.

use base64::Engine as _;

use crate::client::{Kv, Member, MembersAnswer, OpResult, StatusAnswer};
use crate::lease::LeaseId;

/// Printed before a key or value whose bytes are not UTF-8, followed by their base64.
pub const BASE64_MARKER: &str = "(base64) ";

/// Bytes as a line of text: verbatim when UTF-8, else the base64 marker and the base64.
pub fn show_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!("{BASE64_MARKER}{}", base64::engine::general_purpose::STANDARD.encode(bytes)),
    }
}

/// One watch event as etcdctl prints it: `PUT` or `DELETE`, the key, the value (a delete: an
/// empty line), then the previous key and value when the watch asked for them.
pub fn watch_event(event: &serde_json::Value) -> String {
    let kind = if event.get("type").and_then(serde_json::Value::as_str) == Some("delete") {
        "DELETE"
    } else {
        "PUT"
    };
    let field = |kv: &serde_json::Value, name: &str| -> String {
        if let Some(text) = kv.get(name).and_then(serde_json::Value::as_str) {
            return text.to_owned();
        }
        match kv.get(format!("{name}_base64")).and_then(serde_json::Value::as_str) {
            Some(b64) => format!("{BASE64_MARKER}{b64}"),
            None => String::new(),
        }
    };
    let mut out = format!("{kind}\n");
    let kv = event.get("kv").cloned().unwrap_or_default();
    if let Some(prev) = event.get("prev_kv") {
        out.push_str(&format!("{}\n{}\n", field(prev, "key"), field(prev, "value")));
    }
    out.push_str(&format!("{}\n{}\n", field(&kv, "key"), field(&kv, "value")));
    out
}

/// A JSON value on one line, for `--json`.
pub fn json_line(value: &serde_json::Value) -> String {
    format!("{value}\n")
}

fn push_kvs(out: &mut String, kvs: &[Kv], keys_only: bool) {
    for kv in kvs {
        out.push_str(&show_bytes(&kv.key));
        out.push('\n');
        if let (false, Some(value)) = (keys_only, &kv.value) {
            out.push_str(&show_bytes(value));
            out.push('\n');
        }
    }
}

/// `keel get`: key then value lines (keys only with `--keys-only`), or the count.
pub fn get(kvs: &[Kv], count: u64, keys_only: bool, count_only: bool) -> String {
    if count_only {
        return format!("{count}\n");
    }
    let mut out = String::new();
    push_kvs(&mut out, kvs, keys_only);
    out
}

/// `keel put`: `OK`, then the previous key-value with `--prev-kv`.
pub fn put(prev: Option<&Kv>) -> String {
    let mut out = String::from("OK\n");
    push_kvs(&mut out, prev.map(std::slice::from_ref).unwrap_or_default(), false);
    out
}

/// `keel del`: the number deleted, then the deleted key-values with `--prev-kv`.
pub fn delete(deleted: u64, prev_kvs: &[Kv]) -> String {
    let mut out = format!("{deleted}\n");
    push_kvs(&mut out, prev_kvs, false);
    out
}

/// `keel txn`: SUCCESS or FAILURE, then each response after a blank line, as etcdctl does.
pub fn txn(succeeded: bool, results: &[OpResult]) -> String {
    let mut out = String::from(if succeeded { "SUCCESS\n" } else { "FAILURE\n" });
    for result in results {
        out.push('\n');
        match result {
            OpResult::Put => out.push_str(&put(None)),
            OpResult::Get(kvs) => push_kvs(&mut out, kvs, false),
            OpResult::Delete(n) => out.push_str(&delete(*n, &[])),
        }
    }
    out
}

/// `keel lease grant`, as etcdctl prints it.
pub fn lease_granted(id: LeaseId, ttl: i64) -> String {
    format!("lease {id} granted with TTL({ttl}s)\n")
}

/// `keel lease revoke`.
pub fn lease_revoked(id: LeaseId) -> String {
    format!("lease {id} revoked\n")
}

/// One renewal of `keel lease keep-alive` (etcdctl's words: no unit after the TTL).
pub fn lease_kept_alive(id: LeaseId, ttl: i64) -> String {
    format!("lease {id} keepalived with TTL({ttl})\n")
}

/// `keel lease ttl`: the granted and remaining TTL, and with `--keys` the attached keys as
/// etcdctl prints them (Go's `%v` of a list: `[a b]`).
pub fn lease_ttl(id: LeaseId, granted_ttl: i64, remaining: i64, keys: Option<&[Vec<u8>]>) -> String {
    let mut out = format!("lease {id} granted with TTL({granted_ttl}s), remaining({remaining}s)");
    if let Some(keys) = keys {
        let shown: Vec<String> = keys.iter().map(|k| show_bytes(k)).collect();
        out.push_str(&format!(", attached keys([{}])", shown.join(" ")));
    }
    out.push('\n');
    out
}

/// `keel lease ttl` of a lease that is gone, as etcdctl says it.
pub fn lease_expired(id: LeaseId) -> String {
    format!("lease {id} already expired\n")
}

/// `keel lease list`.
pub fn leases(ids: &[LeaseId]) -> String {
    let mut out = format!("found {} leases\n", ids.len());
    for id in ids {
        out.push_str(&format!("{id}\n"));
    }
    out
}

/// Columns padded to their widest cell, two spaces apart; no trailing spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let width = widths.get(i).copied().unwrap_or(0);
            line.extend(std::iter::repeat_n(' ', width.saturating_sub(cell.chars().count())));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn sorted(members: &[Member]) -> Vec<&Member> {
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_by_key(|m| m.id);
    sorted
}

fn client_addr(member: &Member) -> String {
    match member.client_addr.as_deref() {
        Some(addr) if !addr.is_empty() => addr.to_owned(),
        _ => "-".to_owned(),
    }
}

/// `keel cluster members` (and the membership changes): one row per member, by id.
pub fn members(answer: &MembersAnswer) -> String {
    let rows: Vec<Vec<String>> = sorted(&answer.members)
        .into_iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                if m.voter { "voter" } else { "learner" }.to_owned(),
                m.peer_addr.clone(),
                client_addr(m),
                if answer.leader == Some(m.id) { "yes" } else { "" }.to_owned(),
            ]
        })
        .collect();
    table(&["ID", "MEMBERSHIP", "PEER ADDRESS", "CLIENT ADDRESS", "LEADER"], &rows)
}

/// One member's status, as `keel cluster status` gathered it.
#[derive(Clone, Debug)]
pub struct MemberStatus {
    pub member: Member,
    /// The member's own `/v1/cluster/status`, or why it could not be had.
    pub status: Result<StatusAnswer, String>,
}

fn number<T: ToString>(n: Option<T>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// `keel cluster status`: every member gets a row, reachable or not. LAG comes from the
/// leader's `replication` map, so it is `-` when no reachable node says it is the leader.
pub fn status(leader_id: Option<u64>, statuses: &[MemberStatus]) -> String {
    // The node that says it leads; when several do (a stale leader not yet told), trust the one
    // the membership answer named.
    let leaders: Vec<(u64, &StatusAnswer)> = statuses
        .iter()
        .filter_map(|s| match &s.status {
            Ok(st) if st.state.as_deref() == Some("leader") => Some((s.member.id, st)),
            _ => None,
        })
        .collect();
    let leader = leaders.iter().find(|(id, _)| Some(*id) == leader_id).or_else(|| leaders.first()).copied();

    let mut ordered: Vec<&MemberStatus> = statuses.iter().collect();
    ordered.sort_by_key(|s| s.member.id);
    let rows: Vec<Vec<String>> = ordered
        .into_iter()
        .map(|s| {
            let lag = match leader {
                None => "-".to_owned(),
                Some((lid, lst)) => {
                    let progress = lst.replication.as_ref().and_then(|r| r.get(&s.member.id.to_string()));
                    match progress {
                        Some(p) => match (p.lag, p.matched_index, lst.last_log_index) {
                            (Some(lag), _, _) => lag.to_string(),
                            (None, Some(matched), Some(last)) => last.saturating_sub(matched).to_string(),
                            _ => "-".to_owned(),
                        },
                        None if lid == s.member.id => "0".to_owned(),
                        None => "-".to_owned(),
                    }
                }
            };
            let (role, term, last_log, applied, reachable) = match &s.status {
                Ok(st) => (
                    st.state.clone().unwrap_or_else(|| "-".to_owned()),
                    number(st.term),
                    number(st.last_log_index),
                    number(st.applied_index),
                    "yes".to_owned(),
                ),
                Err(why) => ("-".into(), "-".into(), "-".into(), "-".into(), why.clone()),
            };
            vec![
                s.member.id.to_string(),
                client_addr(&s.member),
                role,
                term,
                last_log,
                applied,
                lag,
                reachable,
            ]
        })
        .collect();
    table(&["ID", "ADDRESS", "ROLE", "TERM", "LAST LOG", "APPLIED", "LAG", "REACHABLE"], &rows)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::client::Replication;

    fn kv(key: &[u8], value: Option<&[u8]>) -> Kv {
        Kv { key: key.to_vec(), value: value.map(<[u8]>::to_vec) }
    }

    fn member(id: u64, voter: bool, client: Option<&str>) -> Member {
        Member {
            id,
            peer_addr: format!("127.0.0.1:{}", 2380 + id * 10000),
            client_addr: client.map(str::to_owned),
            voter,
        }
    }

    #[test]
    fn get_prints_key_then_value_like_etcdctl() {
        let kvs = [kv(b"foo", Some(b"bar")), kv(b"k2", Some(b"line1\nline2"))];
        assert_eq!(get(&kvs, 2, false, false), "foo\nbar\nk2\nline1\nline2\n");
        assert_eq!(get(&kvs, 2, true, false), "foo\nk2\n");
        assert_eq!(get(&kvs, 7, false, true), "7\n");
        assert_eq!(get(&[], 0, false, false), "");
        // A keys_only answer has no values at all.
        assert_eq!(get(&[kv(b"a", None)], 1, false, false), "a\n");
    }

    #[test]
    fn non_utf8_is_base64_with_a_marker() {
        assert_eq!(show_bytes(b"plain"), "plain");
        assert_eq!(show_bytes(&[0xde, 0xad, 0xbe, 0xef]), "(base64) 3q2+7w==");
        assert_eq!(
            get(&[kv(&[0xff], Some(&[0x00, 0xfe]))], 1, false, false),
            "(base64) /w==\n(base64) AP4=\n"
        );
    }

    #[test]
    fn put_del_and_txn_read_like_etcdctl() {
        assert_eq!(put(None), "OK\n");
        assert_eq!(put(Some(&kv(b"k", Some(b"old")))), "OK\nk\nold\n");
        assert_eq!(delete(0, &[]), "0\n");
        assert_eq!(delete(1, &[kv(b"k", Some(b"v"))]), "1\nk\nv\n");
        let results = [OpResult::Put, OpResult::Get(vec![kv(b"k", Some(b"v"))]), OpResult::Delete(2)];
        assert_eq!(txn(true, &results), "SUCCESS\n\nOK\n\nk\nv\n\n2\n");
        assert_eq!(txn(false, &[]), "FAILURE\n");
    }

    #[test]
    fn lease_lines_read_like_etcdctl() {
        let id = LeaseId(0x694d_5765_fc71_500b);
        assert_eq!(lease_granted(id, 10), "lease 694d5765fc71500b granted with TTL(10s)\n");
        assert_eq!(lease_revoked(LeaseId(10)), "lease 000000000000000a revoked\n");
        assert_eq!(lease_kept_alive(id, 10), "lease 694d5765fc71500b keepalived with TTL(10)\n");
        assert_eq!(
            lease_ttl(id, 10, 7, None),
            "lease 694d5765fc71500b granted with TTL(10s), remaining(7s)\n"
        );
        assert_eq!(
            lease_ttl(id, 10, 7, Some(&[b"a".to_vec(), vec![0xff]])),
            "lease 694d5765fc71500b granted with TTL(10s), remaining(7s), attached keys([a (base64) /w==])\n"
        );
        assert_eq!(
            lease_ttl(id, 10, 7, Some(&[])),
            "lease 694d5765fc71500b granted with TTL(10s), remaining(7s), attached keys([])\n"
        );
        assert_eq!(lease_expired(id), "lease 694d5765fc71500b already expired\n");
        assert_eq!(leases(&[id, LeaseId(1)]), "found 2 leases\n694d5765fc71500b\n0000000000000001\n");
        assert_eq!(leases(&[]), "found 0 leases\n");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![vec!["1".to_owned(), "long value".to_owned()], vec!["22".to_owned(), "x".to_owned()]];
        assert_eq!(table(&["ID", "V"], &rows), "ID  V\n1   long value\n22  x\n");
    }

    #[test]
    fn members_table_marks_the_leader_and_learners() {
        let answer = MembersAnswer {
            leader: Some(1),
            members: vec![member(2, false, None), member(1, true, Some("127.0.0.1:2379"))],
        };
        assert_eq!(
            members(&answer),
            "\
ID  MEMBERSHIP  PEER ADDRESS     CLIENT ADDRESS  LEADER
1   voter       127.0.0.1:12380  127.0.0.1:2379  yes
2   learner     127.0.0.1:22380  -
"
        );
    }

    #[test]
    fn status_table_has_a_row_per_member_and_lag_from_the_leader() {
        let leader = StatusAnswer {
            state: Some("leader".into()),
            term: Some(3),
            last_log_index: Some(120),
            applied_index: Some(120),
            replication: Some(BTreeMap::from([
                ("2".to_owned(), Replication { matched_index: Some(118), lag: Some(2) }),
                ("3".to_owned(), Replication { matched_index: Some(100), lag: None }),
            ])),
        };
        let follower = StatusAnswer {
            state: Some("follower".into()),
            term: Some(3),
            last_log_index: Some(118),
            applied_index: Some(117),
            ..StatusAnswer::default()
        };
        let statuses = vec![
            MemberStatus {
                member: member(3, true, Some("127.0.0.1:32379")),
                status: Err("connection refused".into()),
            },
            MemberStatus { member: member(1, true, Some("127.0.0.1:2379")), status: Ok(leader) },
            MemberStatus { member: member(2, true, Some("127.0.0.1:22379")), status: Ok(follower) },
            MemberStatus { member: member(4, false, None), status: Err("no client address".into()) },
        ];
        assert_eq!(
            status(Some(1), &statuses),
            "\
ID  ADDRESS          ROLE      TERM  LAST LOG  APPLIED  LAG  REACHABLE
1   127.0.0.1:2379   leader    3     120       120      0    yes
2   127.0.0.1:22379  follower  3     118       117      2    yes
3   127.0.0.1:32379  -         -     -         -        20   connection refused
4   -                -         -     -         -        -    no client address
"
        );
        // Without a reachable leader there is no lag to show, but every member still has a row.
        assert_eq!(
            status(Some(1), &statuses[2..]),
            "\
ID  ADDRESS          ROLE      TERM  LAST LOG  APPLIED  LAG  REACHABLE
2   127.0.0.1:22379  follower  3     118       117      -    yes
4   -                -         -     -         -        -    no client address
"
        );
    }
}
