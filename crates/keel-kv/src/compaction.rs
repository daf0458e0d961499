//! Compaction after the fact: each node removes the history below the compaction revision in
//! bounded steps ([`compactor`]), and the leader compacts on its own schedule when asked to
//! ([`auto_compact`], etcd's `--auto-compaction-mode` / `--auto-compaction-retention`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use keel::Node;
use tokio::time::Instant;

use crate::config::AutoCompactionMode;
use crate::history;
use crate::store;
use crate::store::KvCommand;
use crate::store::KvStore;

/// Events one compaction step removes (with the versions they ended): applies wait for a step,
/// so it stays around a millisecond.
pub const STEP_EVENTS: usize = 1000;

/// Removes history below the compaction revision on this node, a step at a time, whenever the
/// compaction revision moves; reports progress to the watch hub. Ends when the node stops.
pub async fn compactor(node: Arc<Node<KvStore>>) {
    let hub = node.state_machine().hub().clone();
    let mut progress = hub.compaction();
    loop {
        if progress.wait_for(|p| !p.done()).await.is_err() {
            return;
        }
        let n = node.clone();
        let step =
            tokio::task::spawn_blocking(move || n.maintain(|_, txn| history::compact_step(txn, STEP_EVENTS)))
                .await;
        match step {
            Ok(Ok(p)) => {
                if p.done() {
                    tracing::debug!(revision = p.target, "history below the compaction revision removed");
                }
                hub.compacted_physically(p);
            }
            Ok(Err(e)) => {
                // The state machine has stopped (keeld exits on it); nothing more to do.
                tracing::warn!("compaction step failed: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("compaction step panicked: {e}");
                return;
            }
        }
        // Let applies and reads in between steps.
        tokio::task::yield_now().await;
    }
}

/// etcd's automatic compaction, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    Off,
    /// Keep `retention` of history: once per period (the retention, at most an hour), compact to
    /// the revision that was current `retention` ago (sampled every tenth of the period).
    Periodic(Duration),
    /// Keep the last `n` revisions: every 5 minutes, compact to `current - n`.
    Revision(i64),
}

/// How often revision mode looks (etcd's fixed 5 minutes).
const REVISION_INTERVAL: Duration = Duration::from_secs(300);

impl AutoCompaction {
    pub fn parse(mode: AutoCompactionMode, retention: &str) -> Result<Self, String> {
        let retention = retention.trim();
        if retention.is_empty() || retention == "0" {
            return Ok(AutoCompaction::Off);
        }
        match mode {
            AutoCompactionMode::Revision => match retention.parse::<i64>() {
                Ok(n) if n > 0 => Ok(AutoCompaction::Revision(n)),
                _ => Err(format!("{retention:?} is not a number of revisions (revision mode)")),
            },
            AutoCompactionMode::Periodic => {
                // A bare number is hours (etcd's backward-compatible form).
                if let Ok(hours) = retention.parse::<u64>() {
                    return Ok(AutoCompaction::Periodic(Duration::from_secs(hours * 3600)));
                }
                parse_go_duration(retention)
                    .filter(|d| !d.is_zero())
                    .map(AutoCompaction::Periodic)
                    .ok_or_else(|| {
                        format!("{retention:?} is not a duration like 1h, 30m or 90s (periodic mode)")
                    })
            }
        }
    }
}

/// A Go duration: numbers with units h, m, s, ms, concatenated (`1h30m`, `90s`, `500ms`).
fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(n * secs).ok()?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Runs the configured automatic compaction on this node while it leads (as etcd, only the
/// leader compacts; the compaction goes through Raft). Ends when the node stops.
pub async fn auto_compact(node: Arc<Node<KvStore>>, policy: AutoCompaction) {
    match policy {
        AutoCompaction::Off => {}
        AutoCompaction::Revision(keep) => loop {
            tokio::time::sleep(REVISION_INTERVAL).await;
            if node.is_leader() {
                let current = current_revision(&node);
                compact_to(&node, current - keep).await;
            }
        },
        AutoCompaction::Periodic(retention) => {
            // Sample the revision every tenth of the period; compact to the sample from one
            // retention ago (etcd: the period is the retention, at most an hour).
            let period = retention.min(Duration::from_secs(3600));
            let tick = period / 10;
            let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
            let mut interval = tokio::time::interval(tick.max(Duration::from_millis(10)));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_compaction = Instant::now();
            loop {
                interval.tick().await;
                if !node.is_leader() {
                    samples.clear();
                    last_compaction = Instant::now();
                    continue;
                }
                let now = Instant::now();
                samples.push_back((now, current_revision(&node)));
                // Keep one sample at least `retention` old: the newest such is the target.
                while samples.len() >= 2 && now.duration_since(samples[1].0) >= retention {
                    samples.pop_front();
                }
                if let Some(&(at, rev)) = samples.front() {
                    if now.duration_since(at) >= retention && now.duration_since(last_compaction) >= period {
                        compact_to(&node, rev).await;
                        last_compaction = now;
                    }
                }
            }
        }
    }
}

fn current_revision(node: &Node<KvStore>) -> i64 {
    node.read_local(|_, txn| store::revision(txn)).ok().and_then(Result::ok).unwrap_or(0)
}

async fn compact_to(node: &Node<KvStore>, revision: i64) {
    let compacted = node.read_local(|_, txn| store::compact_revision(txn)).ok().and_then(Result::ok);
    if revision <= compacted.unwrap_or(0) || revision <= 0 {
        return;
    }
    match node.propose(KvCommand::Compact { revision }).await {
        Ok(resp) => match resp.result {
            Ok(_) => tracing::info!(revision, "auto-compaction: compacted"),
            Err(e) => tracing::debug!(revision, "auto-compaction: {e}"),
        },
        Err(e) => tracing::warn!(revision, "auto-compaction failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_read_as_etcd_reads_it() {
        use AutoCompactionMode::*;
        assert_eq!(Ok(AutoCompaction::Off), AutoCompaction::parse(Periodic, "0"));
        assert_eq!(
            Ok(AutoCompaction::Periodic(Duration::from_secs(7200))),
            AutoCompaction::parse(Periodic, "2")
        );
        assert_eq!(
            Ok(AutoCompaction::Periodic(Duration::from_secs(5400))),
            AutoCompaction::parse(Periodic, "1h30m")
        );
        assert_eq!(
            Ok(AutoCompaction::Periodic(Duration::from_millis(1500))),
            AutoCompaction::parse(Periodic, "1.5s")
        );
        assert_eq!(Ok(AutoCompaction::Revision(1000)), AutoCompaction::parse(Revision, "1000"));
        assert!(AutoCompaction::parse(Revision, "1h").is_err());
        assert!(AutoCompaction::parse(Periodic, "5 parsecs").is_err());
        assert!(AutoCompaction::parse(Revision, "-3").is_err());
    }
}
