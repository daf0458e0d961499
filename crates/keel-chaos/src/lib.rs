//! keel-chaos: Jepsen-style fault runs. Real `keeld` processes (or etcd's, to validate the harness
//! against a known-good system), each in its own network namespace; concurrent clients on a few
//! keys, and watchers of those keys; a nemesis that kills, pauses, partitions and replaces nodes;
//! then every history is checked for linearizability by `keel-check`, every acknowledged write
//! looked for in the final state, the replicas' states compared, and what the watchers received
//! checked against etcd's watch guarantees (`keel-check watch`); and, with lock and lease
//! clients, leases, locks and fenced writes checked for mutual exclusion, fencing and lease timing
//! (`keel-check lock`).
//!
//! # Layout
//!
//! - [`net`]: namespaces, veths, the bridge, and iptables cuts between nodes
//! - [`proxy`]: the delaying proxy on every link between nodes (the latency fault)
//! - [`cluster`]: the processes (keeld or etcd), their status, kill / pause / restart / replace
//! - [`workload`]: the clients and the history they record
//! - [`watchers`]: the watch streams and the watch history they record
//! - [`locks`]: the lock and lease clients and the lock history they record
//! - [`nemesis`]: the faults and the healing
//! - [`run`](mod@run): one run end to end, with its files (history, final state, faults, report)
//! - [`suite`]: many runs, the summary, and the negative controls (planted bugs must be caught)

pub mod cluster;
pub mod locks;
pub mod nemesis;
pub mod net;
pub mod proxy;
pub mod run;
pub mod suite;
pub mod watchers;
pub mod workload;
