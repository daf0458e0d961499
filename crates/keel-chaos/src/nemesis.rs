//! The faults: what each nemesis does to the cluster, and how everything is healed.
//!
//! A nemesis alternates: a quiet spell, one fault held for a few seconds, heal; over and over until
//! the run's time is up. Every fault and heal is logged with its time (and marked in the nodes'
//! logs), so a failing history can be read against what the cluster went through.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::Rng as _;

use crate::cluster::Cluster;
use crate::cluster::ClusterError;
use crate::proxy::Delay;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nemesis {
    /// No faults: the baseline.
    None,
    /// SIGKILL a random node, restart it.
    KillRandom,
    /// SIGKILL the leader, restart it.
    KillLeader,
    /// SIGKILL a majority at once, restart them.
    KillMajority,
    /// SIGKILL every node at once (a power cut), restart them.
    KillAll,
    /// SIGSTOP a random node (the leader half of the time), SIGCONT it.
    Pause,
    /// Cut the leader off from every other node.
    PartitionLeader,
    /// Split the nodes into a random majority and minority.
    PartitionHalves,
    /// Two halves that cannot talk, and one node that talks to both.
    PartitionBridge,
    /// Packets from the leader to the others are dropped; the others' still reach it.
    PartitionOneWay,
    /// Drop 20-40 % of the packets between all nodes: retransmissions delay and bunch messages
    /// (`tc netem` is not available here to add latency directly).
    Lossy,
    /// Delay the bytes between nodes through the proxy: every link by 20-150 ms (plus up to half
    /// that again of jitter), or every link of one node (the leader half the time) by 100-400 ms.
    Latency,
    /// Replace a random member by a new one (remove, then a fresh node joins), Keel only. Most
    /// times during another fault: the member killed or cut off first (an operator replacing a
    /// dead or unreachable node), the links slowed, or the leader killed as the new member joins.
    Membership,
    /// A random one of the above each time.
    Mixed,
}

impl Nemesis {
    /// Every single nemesis (not `None`, not `Mixed`).
    pub const SINGLE: [Nemesis; 12] = [
        Nemesis::KillRandom,
        Nemesis::KillLeader,
        Nemesis::KillMajority,
        Nemesis::KillAll,
        Nemesis::Pause,
        Nemesis::PartitionLeader,
        Nemesis::PartitionHalves,
        Nemesis::PartitionBridge,
        Nemesis::PartitionOneWay,
        Nemesis::Lossy,
        Nemesis::Latency,
        Nemesis::Membership,
    ];

    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_string()).unwrap_or_default()
    }
}

/// How faults are timed.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub quiet: Duration,
    pub fault_min: Duration,
    pub fault_max: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            quiet: Duration::from_secs(2),
            fault_min: Duration::from_secs(2),
            fault_max: Duration::from_secs(5),
        }
    }
}

/// Applies one fault of kind `n` (for `Mixed`, a random kind; membership only for Keel). Returns
/// a description of what was done.
pub async fn inject(n: Nemesis, cluster: &mut Cluster, rng: &mut StdRng) -> Result<String, ClusterError> {
    let nodes = cluster.nodes();
    let all: Vec<usize> = (1..=nodes).collect();
    let kind = match n {
        Nemesis::Mixed => {
            let keel = cluster.system.name() == "keel";
            let choices: Vec<Nemesis> =
                Nemesis::SINGLE.into_iter().filter(|k| keel || *k != Nemesis::Membership).collect();
            *choices.choose(rng).expect("non-empty")
        }
        other => other,
    };
    let leader = cluster.leader().await;
    let random = *all.choose(rng).expect("at least one node");
    let what = match kind {
        Nemesis::None | Nemesis::Mixed => "nothing".to_string(),
        Nemesis::KillRandom => {
            cluster.kill(random);
            format!("kill -9 node {random}")
        }
        Nemesis::KillLeader => {
            let l = leader.unwrap_or(random);
            cluster.kill(l);
            format!("kill -9 leader node {l}")
        }
        Nemesis::KillMajority => {
            let mut victims = all.clone();
            victims.shuffle(rng);
            victims.truncate(nodes / 2 + 1);
            victims.sort();
            for &v in &victims {
                cluster.kill(v);
            }
            format!("kill -9 nodes {victims:?} at once")
        }
        Nemesis::KillAll => {
            for &v in &all {
                cluster.kill(v);
            }
            "kill -9 every node at once".to_string()
        }
        Nemesis::Pause => {
            let v = if rng.gen_bool(0.5) { leader.unwrap_or(random) } else { random };
            cluster.pause(v);
            format!("SIGSTOP node {v}")
        }
        Nemesis::PartitionLeader => {
            let l = leader.unwrap_or(random);
            let rest: Vec<usize> = all.iter().copied().filter(|&x| x != l).collect();
            cluster.net.partition(&[l], &rest)?;
            format!("isolate leader node {l} from {rest:?}")
        }
        Nemesis::PartitionHalves => {
            let mut shuffled = all.clone();
            shuffled.shuffle(rng);
            let (a, b) = split_sorted(&shuffled, nodes / 2);
            cluster.net.partition(&a, &b)?;
            format!("partition minority {a:?} | majority {b:?}")
        }
        Nemesis::PartitionBridge => {
            let mut shuffled = all.clone();
            shuffled.shuffle(rng);
            let bridge = shuffled[0];
            let rest = &shuffled[1..];
            let (a, b) = split_sorted(rest, rest.len() / 2);
            cluster.net.partition(&a, &b)?;
            format!("bridge: {a:?} | {b:?}, node {bridge} reaches both")
        }
        Nemesis::PartitionOneWay => {
            let l = leader.unwrap_or(random);
            for &x in &all {
                if x != l {
                    cluster.net.cut(l, x)?;
                }
            }
            format!("one-way: packets from leader node {l} to the others dropped")
        }
        Nemesis::Lossy => {
            let percent = rng.gen_range(20..=40);
            cluster.net.lossy(percent)?;
            format!("{percent} % of packets between nodes dropped")
        }
        Nemesis::Latency => {
            if rng.gen_bool(0.5) {
                let delay = slow_all(cluster, rng, 20..=150);
                format!("every link slowed by {delay}")
            } else {
                let v = if rng.gen_bool(0.5) { leader.unwrap_or(random) } else { random };
                let base = Duration::from_millis(rng.gen_range(100..=400));
                let delay = Delay { base, jitter: base / 4 };
                for x in all.iter().copied().filter(|&x| x != v) {
                    cluster.net.slow(v, x, delay);
                    cluster.net.slow(x, v, delay);
                }
                format!("node {v}'s links slowed by {}", describe(delay))
            }
        }
        Nemesis::Membership => {
            if cluster.system.name() != "keel" {
                "membership change skipped (keel only)".to_string()
            } else {
                membership_change(cluster, rng, random, &all).await?
            }
        }
    };
    for i in 1..=nodes {
        cluster.mark(i, &format!("fault: {what}"));
    }
    Ok(what)
}

/// Slows every link by a base delay drawn from `millis` plus up to half of it again; describes it.
fn slow_all(cluster: &mut Cluster, rng: &mut StdRng, millis: std::ops::RangeInclusive<u64>) -> String {
    let base = Duration::from_millis(rng.gen_range(millis));
    let delay = Delay { base, jitter: base / 2 };
    let n = cluster.nodes();
    for from in 1..=n {
        for to in (1..=n).filter(|&to| to != from) {
            cluster.net.slow(from, to, delay);
        }
    }
    describe(delay)
}

fn describe(d: Delay) -> String {
    format!("{} ms + up to {} ms", d.base.as_millis(), d.jitter.as_millis())
}

/// Replaces member `victim`, alone or during another fault (left in place: the heal undoes it).
async fn membership_change(
    cluster: &mut Cluster,
    rng: &mut StdRng,
    victim: usize,
    all: &[usize],
) -> Result<String, ClusterError> {
    let during = match rng.gen_range(0..5) {
        0 => None,
        1 => {
            cluster.kill(victim);
            Some(format!("kill -9 node {victim}"))
        }
        2 => {
            let rest: Vec<usize> = all.iter().copied().filter(|&x| x != victim).collect();
            cluster.net.partition(&[victim], &rest)?;
            // Ask the others' leader, not a cut-off one that still believes it leads.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while cluster.leader().await.is_none_or(|l| l == victim) && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(format!("isolate node {victim} from {rest:?}"))
        }
        3 => Some(format!("every link slowed by {}", slow_all(cluster, rng, 20..=100))),
        _ => {
            // The leader dies right after the new member asked it to join.
            let replaced = replace_or_say(cluster, victim).await;
            let what = match cluster.leader().await {
                Some(l) => {
                    cluster.kill(l);
                    format!("kill -9 leader node {l}")
                }
                None => "no leader to kill".to_string(),
            };
            return Ok(format!("{replaced}; then {what}"));
        }
    };
    let replaced = replace_or_say(cluster, victim).await;
    Ok(match during {
        Some(fault) => format!("{fault}; then {replaced}"),
        None => replaced,
    })
}

/// Replaces `victim`; a failure is described, not returned: the fault before it stays in place
/// and must be healed like any other.
async fn replace_or_say(cluster: &mut Cluster, victim: usize) -> String {
    match cluster.replace(victim).await {
        Ok(what) => what,
        Err(e) => format!("replacing node {victim} failed: {e}"),
    }
}

/// `nodes[..at]` and `nodes[at..]`, each sorted (for readable fault descriptions).
fn split_sorted(nodes: &[usize], at: usize) -> (Vec<usize>, Vec<usize>) {
    let (mut a, mut b) = (nodes[..at].to_vec(), nodes[at..].to_vec());
    a.sort();
    b.sort();
    (a, b)
}

/// Undoes every fault: links restored, paused nodes resumed, killed nodes restarted.
pub fn heal(cluster: &mut Cluster) -> Result<String, ClusterError> {
    let mut done = Vec::new();
    if cluster.net.faulty() {
        cluster.net.heal()?;
        done.push("links restored".to_string());
    }
    for i in 1..=cluster.nodes() {
        if cluster.is_paused(i) {
            cluster.resume(i);
            done.push(format!("SIGCONT node {i}"));
        } else if !cluster.is_running(i) {
            cluster.revive(i)?;
            done.push(format!("restart node {i}"));
        }
    }
    let what = if done.is_empty() { "nothing to heal".to_string() } else { done.join(", ") };
    for i in 1..=cluster.nodes() {
        cluster.mark(i, &format!("heal: {what}"));
    }
    Ok(what)
}
