//! In-process keeld clusters for tests: real `Server`s (storage, Raft, gRPC peer transport, client
//! server) on loopback ports, in one test process.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_kv::config::KeeldConfig;
use keel_kv::server::Server;

/// How long a test waits for a condition before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub use keel_testkit::free_port;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub struct Cluster {
    pub servers: BTreeMap<u64, Server>,
    pub dir: tempfile::TempDir,
}

/// Test timing: short elections so failovers are quick.
pub fn config(id: u64, dir: &std::path::Path, peer: u16, client: u16, initial: &str) -> KeeldConfig {
    let mut c = KeeldConfig {
        id,
        data_dir: dir.join(format!("n{id}")),
        cluster_name: "kv-test".into(),
        client_addr: format!("127.0.0.1:{client}"),
        peer_addr: format!("127.0.0.1:{peer}"),
        initial_cluster: initial.into(),
        ..KeeldConfig::default()
    };
    c.raft.heartbeat_interval_ms = 50;
    c.raft.election_timeout_min_ms = 300;
    c.raft.election_timeout_max_ms = 600;
    c.state_machine.verify_on_start = false;
    c
}

impl Cluster {
    /// Starts `n` founding nodes (`tune` adjusts each config) and waits until every node is ready.
    pub async fn start(n: u64, tune: impl Fn(&mut KeeldConfig)) -> Cluster {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u64, u16, u16)> = (1..=n).map(|id| (id, free_port(), free_port())).collect();
        let initial =
            ports.iter().map(|(id, peer, _)| format!("{id}=127.0.0.1:{peer}")).collect::<Vec<_>>().join(",");
        let mut servers = BTreeMap::new();
        for (id, peer, client) in &ports {
            let mut c = config(*id, dir.path(), *peer, *client, &initial);
            tune(&mut c);
            servers.insert(*id, Server::start(c).await.expect("server starts"));
        }
        let cluster = Cluster { servers, dir };
        cluster.wait_ready().await;
        cluster
    }

    /// Waits until every node knows the leader and has published its client address.
    pub async fn wait_ready(&self) {
        let n = self.servers.len();
        for (id, s) in &self.servers {
            s.node()
                .wait_for(WAIT, "ready", |m| {
                    let members = m.membership_config.membership();
                    m.current_leader.is_some()
                        && members.nodes().count() == n
                        && members.nodes().all(|(_, info)| !info.client_addr.is_empty())
                })
                .await
                .unwrap_or_else(|e| panic!("node {id} not ready: {e}"));
        }
    }

    pub fn leader(&self) -> u64 {
        let s = self.servers.values().next().expect("a server");
        s.node().leader().expect("a leader is known")
    }

    pub fn follower(&self) -> u64 {
        let leader = self.leader();
        *self.servers.keys().find(|id| **id != leader).expect("a follower")
    }

    pub fn endpoint(&self, id: u64) -> String {
        format!("http://{}", self.servers[&id].client_addr)
    }

    pub async fn shutdown(self) {
        for (id, s) in self.servers {
            s.shutdown().await.unwrap_or_else(|e| panic!("node {id} shuts down cleanly: {e}"));
        }
    }
}
