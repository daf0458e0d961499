//! `keel debug data-dir`: what a stopped node's data dir holds, read without starting the node;
//! `keel debug truncate-log`: cut a stopped node's Raft log by hand.

use std::fmt::Write;
use std::path::Path;

use keel::inspect::inspect_data_dir;
use serde_json::json;

/// Inspects `path`; returns the text (or JSON line) to print.
pub fn data_dir(path: &Path, json: bool) -> Result<String, String> {
    let (r, keys) = inspect_data_dir(path, |txn| {
        let keys = keel_kv::store::key_count(txn).map_err(|e| e.to_string());
        let revision = keel_kv::store::revision(txn).map_err(|e| e.to_string());
        (keys, revision)
    })
    .map_err(|e| e.to_string())?;
    let (keys, revision) = match keys {
        Some((k, r)) => (k?, r?),
        None => (0, 0),
    };
    let membership = r.membership.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let learners: Vec<u64> = membership.learner_ids().collect();
    let nodes: Vec<_> = membership
        .nodes()
        .map(|(id, n)| json!({"id": id, "peer_addr": n.peer_addr, "client_addr": n.client_addr, "voter": voters.contains(id)}))
        .collect();
    let idx =
        |l: &Option<keel::openraft::alias::LogIdOf<keel::types::KeelTypes>>| l.as_ref().map(|l| l.index);
    let snapshot = r.snapshot.as_ref().map(|(meta, file)| {
        json!({"last_index": idx(&meta.last_log_id), "file": file.display().to_string(),
               "bytes": std::fs::metadata(file).map_or(0, |m| m.len())})
    });
    let vote = r.vote.as_ref().map(|v| json!({"term": v.leader_id().term, "node": Some(v.leader_id().node_id), "committed": v.is_committed()}));
    if json {
        let out = json!({
            "data_dir": path.display().to_string(),
            "node_id": r.node_id,
            "vote": vote,
            "log": {"first_index": r.log_first_index, "last_index": idx(&r.log_last), "committed_index": idx(&r.committed),
                    "purged_index": idx(&r.purged), "records": r.log_records, "bytes": r.log_bytes},
            "state": {"last_applied_index": idx(&r.last_applied), "revision": revision, "keys": keys, "bytes": r.state_bytes},
            "membership": {"log_index": idx(r.membership.log_id()), "voters": voters, "learners": learners, "nodes": nodes},
            "snapshot": snapshot,
        });
        return Ok(format!("{out}\n"));
    }
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut out = String::new();
    let _ = writeln!(out, "data dir:      {}", path.display());
    let _ = writeln!(out, "node id:       {}", r.node_id.map_or("-".into(), |id| id.to_string()));
    let _ = writeln!(
        out,
        "vote:          {}",
        r.vote.as_ref().map_or("-".to_string(), |v| format!(
            "term {}, for node {}{}",
            v.leader_id().term,
            opt(Some(v.leader_id().node_id)),
            if v.is_committed() { " (committed: a leader)" } else { "" }
        ))
    );
    let range = match (r.log_first_index, idx(&r.log_last)) {
        (Some(f), Some(l)) => format!("{f}..={l}"),
        _ => "empty".to_string(),
    };
    let _ = writeln!(
        out,
        "log:           {range} (committed {}, purged through {}; {} records, {} bytes)",
        opt(idx(&r.committed)),
        opt(idx(&r.purged)),
        r.log_records,
        r.log_bytes
    );
    let _ = writeln!(
        out,
        "applied:       index {} (revision {revision}, {keys} keys, {} bytes)",
        opt(idx(&r.last_applied)),
        r.state_bytes
    );
    let _ = writeln!(
        out,
        "membership:    at index {}: voters {voters:?}, learners {learners:?}",
        opt(idx(r.membership.log_id()))
    );
    for (id, n) in membership.nodes() {
        let _ = writeln!(
            out,
            "  node {id}: peer {}, client {}",
            n.peer_addr,
            if n.client_addr.is_empty() { "-" } else { &n.client_addr }
        );
    }
    match &r.snapshot {
        Some((meta, file)) => {
            let _ = writeln!(
                out,
                "snapshot:      up to index {} ({})",
                opt(idx(&meta.last_log_id)),
                file.display()
            );
        }
        None => {
            let _ = writeln!(out, "snapshot:      none");
        }
    }
    Ok(out)
}

/// What `keel debug truncate-log` did.
pub enum Truncated {
    /// The log was cut; the text says what was lost.
    Cut(String),
    /// No `--yes`: the text says what would be lost.
    NotConfirmed(String),
}

/// Records listed one by one before the rest are summed up.
const LIST_RECORDS: usize = 20;

/// Cuts the log of `data_dir` at `offset` of `file` (default: the last chunk) if `yes`.
pub fn truncate_log(
    data_dir: &Path,
    file: Option<&str>,
    offset: u64,
    yes: bool,
    json: bool,
) -> Result<Truncated, String> {
    let log_dir = data_dir.join("log");
    let (cut, done) = keel::storage::wal_repair::truncate_log(&log_dir, file, offset, |_| yes)
        .map_err(|e| e.to_string())?;
    let name =
        |p: &Path| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into());
    let text = if json {
        let lost: Vec<_> = cut
            .lost
            .iter()
            .map(|r| json!({"file": name(&r.file), "offset": r.offset, "index": r.appends, "record": r.what}))
            .collect();
        let out = json!({
            "log_dir": log_dir.display().to_string(),
            "file": name(&cut.file),
            "offset": cut.offset,
            "cut": done,
            "lost_indexes": cut.lost_indexes().map(|(lo, hi)| json!({"first": lo, "last": hi})),
            "lost_records": lost,
            "unreadable_bytes": cut.unreadable_bytes,
            "removed_files": cut.removed_files.iter().map(|p| name(p)).collect::<Vec<_>>(),
        });
        format!("{out}\n")
    } else {
        let mut out = String::new();
        let verb = if done { "cut" } else { "would cut" };
        let _ = writeln!(out, "log:        {}", log_dir.display());
        let _ = writeln!(out, "{verb:<11} {} at offset {}", name(&cut.file), cut.offset);
        let _ = match cut.lost_indexes() {
            Some((lo, hi)) => {
                writeln!(out, "lost:       log indexes {lo}..={hi} ({} records)", cut.lost.len())
            }
            None => writeln!(out, "lost:       no log entries ({} records)", cut.lost.len()),
        };
        for r in cut.lost.iter().take(LIST_RECORDS) {
            let _ = writeln!(out, "            {} @ {}: {}", name(&r.file), r.offset, r.what);
        }
        if cut.lost.len() > LIST_RECORDS {
            let _ = writeln!(out, "            ... and {} more records", cut.lost.len() - LIST_RECORDS);
        }
        if cut.unreadable_bytes > 0 {
            let _ =
                writeln!(out, "unreadable: {} bytes that do not read back as records", cut.unreadable_bytes);
        }
        for f in &cut.removed_files {
            let _ = writeln!(out, "removed:    {} (a later chunk file)", name(f));
        }
        if cut.lost.iter().any(|r| r.what.starts_with("vote")) {
            let _ = writeln!(
                out,
                "warning:    vote records are lost: the node forgets a vote it cast and could vote twice in one term; \
                 in a cluster, start it only once the others have elected a leader in a later term"
            );
        }
        if cut.lost_indexes().is_some() {
            let _ = writeln!(
                out,
                "note:       a member re-fetches lost entries from the leader; a lone node or a lost quorum loses them"
            );
        }
        out
    };
    Ok(if done { Truncated::Cut(text) } else { Truncated::NotConfirmed(text) })
}
