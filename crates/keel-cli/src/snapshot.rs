//! `keel snapshot save|status|restore`: a backup over etcd's `Maintenance.Snapshot`, what a backup
//! file holds, and a data dir for one member of a new cluster made from it (etcdutl's
//! `snapshot restore`). The file format is `keel_kv::backup`'s (`docs/formats.md`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use keel::NodeId;
use keel::NodeInfo;
use keel_kv::backup;
use keel_kv::backup::BackupFile;
use keel_kv::backup::Format;
use keel_kv::backup::HashCheck;
use keel_kv::config::KeeldConfig;
use keel_kv::etcd::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_kv::etcd::pb::etcdserverpb::SnapshotRequest;
use keel_kv::etcd::pb::etcdserverpb::SnapshotResponse;
use serde_json::json;

use crate::bench;
use crate::client::Endpoint;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a point-in-time snapshot of the whole state (keys and their history, leases, users
    /// and roles) to FILE, from the first endpoint that answers (etcd's Maintenance.Snapshot;
    /// root only with auth on). Written to FILE.part, fsync'ed, then renamed.
    Save {
        /// Where to write the snapshot.
        file: PathBuf,
    },
    /// Check a snapshot file (its SHA-256 and its structure: an etcd/bbolt database as etcd's
    /// `tx.Check()` does, or every frame of an older Keel snapshot) and print what it holds.
    Status {
        file: PathBuf,
        /// Output format (etcdutl's -w): simple text or json (`--json` also gives json).
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = WriteOut::Simple)]
        write_out: WriteOut,
    },
    /// Write a fresh data dir for member --id of a NEW cluster whose members are
    /// --initial-cluster, holding the snapshot's state. Run it once per member (same file, same
    /// --initial-cluster), then start keeld on each dir.
    Restore(RestoreArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WriteOut {
    Simple,
    Json,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot file (from `keel snapshot save`, or `etcdctl snapshot save` against keeld or
    /// etcd: an etcd snapshot is converted, keys with their history since its compaction, leases,
    /// users and roles).
    file: PathBuf,
    /// The data dir to create for this member; must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// This member's id in --initial-cluster (etcd's --name; `keelN` is taken as N).
    #[arg(long, alias = "name", value_name = "ID", value_parser = parse_member_id)]
    id: NodeId,
    /// The new cluster's members, ID=HOST:PORT,... (peer addresses), as keeld's
    /// --initial-cluster; all voters.
    #[arg(long, value_name = "ID=HOST:PORT,...")]
    initial_cluster: String,
    /// The new cluster's name (keeld's --cluster-name; it is a flag of keeld, not stored in the
    /// data dir: shown in the command to start the member).
    #[arg(long, alias = "initial-cluster-token", value_name = "NAME")]
    cluster_name: Option<String>,
    /// Restore even if the SHA-256 trailer does not match, or the file has none (an etcd member's
    /// db file, or a snapshot copied from a data dir's snapshots/); the structure is still checked.
    #[arg(long)]
    skip_hash_check: bool,
}

fn parse_member_id(s: &str) -> Result<NodeId, String> {
    let digits = s.strip_prefix("keel").unwrap_or(s);
    digits
        .parse::<NodeId>()
        .ok()
        .filter(|&id| id != 0)
        .ok_or_else(|| format!("{s:?} is not a member id (a positive integer, or keelN)"))
}

/// Runs one `keel snapshot` command; answers what to print.
pub async fn run(
    cmd: SnapshotCommand,
    endpoints: &[Endpoint],
    timeout: Duration,
    json: bool,
) -> Result<String, String> {
    match cmd {
        SnapshotCommand::Save { file } => save(endpoints, timeout, &file, json).await,
        SnapshotCommand::Status { file, write_out } => {
            let checked = blocking(move || backup::check(&file, false).map_err(|e| e.to_string())).await?;
            Ok(status(&checked, json || write_out == WriteOut::Json))
        }
        SnapshotCommand::Restore(args) => restore(args, json).await,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("task failed: {e}"))?
}

fn status(b: &BackupFile, json: bool) -> String {
    let hash = match b.hash {
        HashCheck::Ok => "ok",
        HashCheck::SkippedWithTrailer | HashCheck::SkippedNoTrailer => "not checked",
    };
    let (members, last_index) = (&b.members, b.raft_index);
    let format = match b.format {
        Format::Etcd => "etcd (bbolt)",
        Format::Keel => "keel",
    };
    let s = &b.summary;
    if json {
        let out = json!({
            "format": format, "hash": hash, "sha256": b.sha256, "revision": s.revision, "totalKey": s.keys,
            "totalSize": b.size, "compactRevision": s.compact_revision,
            "historyEvents": s.history_events, "oldVersions": s.old_versions, "leases": s.leases,
            "raftIndex": last_index, "members": members,
        });
        return format!("{out}\n");
    }
    let mut out = String::new();
    let _ = writeln!(out, "file:             {}", b.path.display());
    let _ = writeln!(out, "format:           {format}");
    let _ = writeln!(out, "hash:             {hash} (SHA-256 {})", b.sha256);
    let _ = writeln!(out, "revision:         {}", s.revision);
    let _ = writeln!(out, "compact revision: {}", s.compact_revision);
    let _ = writeln!(out, "total keys:       {}", s.keys);
    let _ = writeln!(out, "history:          {} events, {} old versions", s.history_events, s.old_versions);
    let _ = writeln!(out, "leases:           {}", s.leases);
    let _ = writeln!(out, "total size:       {} bytes", b.size);
    let _ = writeln!(out, "taken at:         raft index {last_index}, members {members:?}");
    out
}

async fn restore(args: RestoreArgs, json: bool) -> Result<String, String> {
    let members = keel_kv::config::parse_initial_cluster(&args.initial_cluster).map_err(|e| e.to_string())?;
    let Some(peer_addr) = members.get(&args.id).cloned() else {
        return Err(format!("--initial-cluster does not list member {} (--id)", args.id));
    };
    let mut config =
        KeeldConfig { id: args.id, data_dir: args.data_dir.clone(), peer_addr, ..Default::default() };
    if let Some(name) = &args.cluster_name {
        config.cluster_name = name.clone();
    }
    let node_config = config.node_config();
    let nodes = members.iter().map(|(id, peer)| (*id, NodeInfo::new(peer.clone(), ""))).collect();
    let (file, skip) = (args.file.clone(), args.skip_hash_check);
    let sm = config.state_machine();
    // An etcd snapshot is converted into a Keel one beside the data dir first; removed after.
    let scratch = {
        let mut name = args.data_dir.as_os_str().to_owned();
        name.push(format!(".keel-import-{}", std::process::id()));
        PathBuf::from(name)
    };
    let (checked, seeded) = blocking(move || {
        let seeded = backup::restore_input(&file, skip, &scratch).map_err(|e| e.to_string()).and_then(
            |(checked, input)| {
                keel::storage::seed::seed_data_dir(&node_config, sm, input, &file, nodes)
                    .map(|seeded| (checked, seeded))
                    .map_err(|e| format!("restore into {}: {e}", node_config.data_dir.display()))
            },
        );
        let _ = std::fs::remove_dir_all(&scratch);
        seeded
    })
    .await?;
    let index = seeded.meta.last_log_id.map_or(0, |l| l.index);
    let ids: Vec<NodeId> = members.keys().copied().collect();
    let s = &checked.summary;
    if json {
        let out = json!({
            "data_dir": args.data_dir.display().to_string(), "id": args.id, "members": ids,
            "revision": s.revision, "totalKey": s.keys, "raftIndex": index,
            "hash": if checked.hash == HashCheck::Ok { "ok" } else { "not checked" },
        });
        return Ok(format!("{out}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "restored {} (revision {}, {} keys) into {} as member {} of a new cluster of {ids:?}, at raft index {index}",
        args.file.display(),
        s.revision,
        s.keys,
        args.data_dir.display(),
        args.id
    );
    if checked.hash != HashCheck::Ok {
        let _ = writeln!(out, "warning: the SHA-256 was not checked (--skip-hash-check)");
    }
    let name = args.cluster_name.as_deref().map(|n| format!(" --cluster-name {n}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "start it with: keeld --id {} --data-dir {} --peer-addr {} --client-addr HOST:PORT{name}",
        args.id,
        args.data_dir.display(),
        config.peer_addr
    );
    let _ = writeln!(out, "(restore every member from the same file with the same --initial-cluster first)");
    Ok(out)
}

/// Where `keel snapshot save` failed on one endpoint.
fn failed(endpoint: &Endpoint, why: impl std::fmt::Display) -> String {
    format!("{endpoint}: {why}")
}

async fn save(endpoints: &[Endpoint], timeout: Duration, file: &Path, json: bool) -> Result<String, String> {
    let part = {
        let mut name = file.as_os_str().to_owned();
        name.push(".part");
        PathBuf::from(name)
    };
    let mut errors = Vec::new();
    for endpoint in endpoints {
        match save_from(endpoint, timeout, &part).await {
            Ok(saved) => {
                let done = std::fs::rename(&part, file)
                    .and_then(|()| sync_parent(file))
                    .map_err(|e| format!("{}: {e}", file.display()));
                if let Err(e) = done {
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
                if json {
                    let out = json!({"file": file.display().to_string(), "endpoint": endpoint.to_string(),
                                     "revision": saved.revision, "totalSize": saved.size});
                    return Ok(format!("{out}\n"));
                }
                return Ok(format!(
                    "Snapshot saved at {} ({} bytes, revision {}, from {endpoint})\n",
                    file.display(),
                    saved.size,
                    saved.revision
                ));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                errors.push(e);
            }
        }
    }
    Err(format!("no snapshot saved: {}", errors.join("; ")))
}

fn sync_parent(file: &Path) -> std::io::Result<()> {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent)?.sync_all()
}

struct Saved {
    size: u64,
    revision: i64,
}

/// The stream's next message, waited for at most `timeout`.
async fn next(
    stream: &mut tonic::Streaming<SnapshotResponse>,
    timeout: Duration,
) -> Result<Option<SnapshotResponse>, String> {
    match tokio::time::timeout(timeout, stream.message()).await {
        Ok(r) => r.map_err(|s| s.message().to_string()),
        Err(_) => Err(format!("no snapshot data for {timeout:?}")),
    }
}

/// Streams one endpoint's snapshot into `part`, checking the stream as it comes: the payload's
/// `remaining_bytes` counts down to 0, then one 32-byte message that must be the payload's
/// SHA-256, then the end. `timeout` bounds the connection and each message.
async fn save_from(endpoint: &Endpoint, timeout: Duration, part: &Path) -> Result<Saved, String> {
    let channel = bench::connect(endpoint, timeout).await.map_err(|e| e.to_string())?;
    let mut client = MaintenanceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut stream = tokio::time::timeout(timeout, client.snapshot(SnapshotRequest {}))
        .await
        .map_err(|_| failed(endpoint, format!("no answer in {timeout:?}")))?
        .map_err(|s| failed(endpoint, s.message()))?
        .into_inner();
    let out = std::fs::File::create(part).map_err(|e| format!("{}: {e}", part.display()))?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    let write_err = |e: std::io::Error| format!("{}: {e}", part.display());
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut received, mut total, mut revision) = (0u64, None::<u64>, 0);
    let trailer = loop {
        let Some(msg) = next(&mut stream, timeout).await.map_err(|e| failed(endpoint, e))? else {
            return Err(failed(endpoint, "the stream ended before the snapshot's SHA-256"));
        };
        if let Some(h) = &msg.header {
            revision = h.revision;
        }
        let expected = *total.get_or_insert(msg.remaining_bytes + msg.blob.len() as u64);
        if received == expected {
            break msg.blob; // the payload is complete: this is the SHA-256
        }
        received += msg.blob.len() as u64;
        if received > expected || msg.remaining_bytes != expected - received {
            return Err(failed(endpoint, "the stream's remaining_bytes do not add up"));
        }
        hash.update(&msg.blob);
        out.write_all(&msg.blob).map_err(write_err)?;
    };
    if next(&mut stream, timeout).await.map_err(|e| failed(endpoint, e))?.is_some() {
        return Err(failed(endpoint, "the stream goes on after the snapshot's SHA-256"));
    }
    if trailer != hash.finish().as_ref() {
        return Err(failed(endpoint, "the snapshot's SHA-256 does not match its bytes"));
    }
    out.write_all(&trailer).map_err(write_err)?;
    let file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    Ok(Saved { size: received + trailer.len() as u64, revision })
}
