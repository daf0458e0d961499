//! A replicated counter: three Keel nodes in one process. Proposes, reads, loses the leader, and
//! keeps counting. Run: `cargo run -p counter`.

use std::collections::BTreeMap;
use std::time::Duration;

use keel::redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use keel::{Config, InProcessRouter, Node, NodeInfo, StateMachine, StateMachineError};
use serde::{Deserialize, Serialize};

const COUNTERS: TableDefinition<&str, i64> = TableDefinition::new("counters");

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    name: String,
    delta: i64,
}

/// All state is in the `counters` table; the struct holds nothing.
struct Counters;

impl StateMachine for Counters {
    type Command = Add;
    type Response = i64; // the counter's new value

    fn apply(&self, txn: &WriteTransaction, cmds: Vec<Add>) -> Result<Vec<i64>, StateMachineError> {
        let mut table = txn.open_table(COUNTERS)?;
        let mut out = Vec::with_capacity(cmds.len());
        for Add { name, delta } in cmds {
            let value = table.get(name.as_str())?.map_or(0, |v| v.value()) + delta;
            table.insert(name.as_str(), value)?;
            out.push(value);
        }
        Ok(out)
    }

    fn snapshot(&self, txn: &ReadTransaction, out: &mut dyn std::io::Write) -> Result<(), StateMachineError> {
        keel::dump_table(txn, COUNTERS, out)
    }

    fn restore(
        &self,
        txn: &WriteTransaction,
        input: &mut dyn std::io::Read,
    ) -> Result<(), StateMachineError> {
        keel::load_table(txn, COUNTERS, input)
    }
}

fn get(txn: &ReadTransaction, name: &str) -> i64 {
    let table = txn.open_table(COUNTERS).ok();
    table.and_then(|t| t.get(name).ok().flatten().map(|v| v.value())).unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("keel-counter-{}", std::process::id()));
    let router = InProcessRouter::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let node =
            Node::start(Config::new(id, dir.join(format!("n{id}"))), Counters, router.network(id)).await?;
        router.register(id, node.service());
        nodes.insert(id, node);
    }
    let members = (1..=3).map(|id| (id, NodeInfo::default())).collect();
    nodes[&1].initialize(members).await?;

    let leader = nodes[&1].wait_for_leader(Duration::from_secs(10), None).await?;
    println!("leader: node {leader}");
    for _ in 0..10 {
        nodes[&leader].propose(Add { name: "visits".into(), delta: 1 }).await?;
    }
    println!(
        "visits = {} (linearizable read on the leader)",
        nodes[&leader].read(|_, t| get(t, "visits")).await?
    );

    println!("stopping node {leader}");
    router.unregister(leader);
    nodes.remove(&leader).expect("leader is running").shutdown().await?;

    let survivor = nodes.values().next().expect("two nodes remain");
    let leader = survivor.wait_for_leader(Duration::from_secs(10), Some(leader)).await?;
    println!("new leader: node {leader}");
    let (v, index) = nodes[&leader].propose_indexed(Add { name: "visits".into(), delta: 5 }).await?;
    println!("visits = {v} after +5 on the new leader (log index {index})");
    for (id, node) in &nodes {
        node.wait_applied(index, Duration::from_secs(5)).await?; // read your own write anywhere
        println!("node {id} reads visits = {}", node.read_local(|_, t| get(t, "visits"))?);
    }
    for (_, node) in nodes {
        node.shutdown().await?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
