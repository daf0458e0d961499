//! Keel's key-value store: etcd's data model as a Keel state machine ([`store`]), served over an
//! etcd v3-compatible gRPC API ([`etcd`]), the same as etcd's grpc-gateway JSON ([`gateway`]), and
//! an HTTP/JSON API ([`http`]) on one client address,
//! by a node that [`server`] runs (the `keeld` binary is a thin wrapper around [`server::run`]).

pub mod api;
pub mod auth;
pub mod backup;
pub mod bbolt;
pub mod client_port;
pub mod compaction;
pub mod config;
pub mod etcd;
pub mod etcd_db;
pub mod gateway;
pub mod h2_authority;
pub mod history;
pub mod http;
pub mod lease;
pub mod limits;
pub mod lock;
pub mod metrics;
pub mod server;
pub mod store;
pub mod watch;
