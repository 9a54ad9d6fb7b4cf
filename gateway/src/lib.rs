//! MetaStore gateway: the etcd v3 gRPC API over tonic, routing each call to
//! the shards of a metastore-server and merging their answers.
//!
//! Module map (each module's own docs state its invariants):
//!
//! - [`client`]: `ShardClient`, one multiplexed, length-prefixed prost
//!   connection per shard (reconnects, timeouts);
//! - [`shards`]: the [`shards::Transport`] seam, topology discovery, typed
//!   shard calls;
//! - [`backend`]: shared state, retry/backoff policy, response headers;
//! - [`kv`]: Range / Put / DeleteRange / Compact routing and etcd's request
//!   checks;
//! - [`coordinator`]: Txn — single-shard fast path, cross-shard snapshot
//!   reads, two-phase commit;
//! - [`merge`]: pure merge rules for per-shard answers;
//! - [`watch`]: etcd's Watch across shards — watermark merge of per-shard
//!   event streams, shared feeds, per-stream sessions;
//! - [`codec`]: the services' prost codec (small starting buffers);
//! - [`service`]: the tonic services (the only place errors become
//!   `Status`, via [`error`]);
//! - [`server`]: start-up (discover, bind, ready line) and serving;
//! - [`grpc`]: the HTTP/2 server around the services, routing by path;
//! - [`unary`]: KV's unary calls answered without tonic's per-call
//!   machinery (tonic answers anything unusual);
//! - [`authority`]: each accepted connection's bytes pass through it, so an
//!   HTTP/2 `:authority` h2 would refuse (etcdctl 3.4's `http://…`) is
//!   repaired.

/// tonic service traits generated from etcd's `rpc.proto` by `build.rs`;
/// messages are `metastore_proto::etcdserverpb`.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod authority;
pub mod backend;
pub mod client;
pub mod coalesce;
pub mod codec;
pub mod coordinator;
pub mod error;
pub mod grpc;
pub mod kv;
pub mod lease;
pub mod merge;
pub mod server;
pub mod service;
pub mod shards;
pub mod unary;
pub mod watch;

#[cfg(test)]
mod testing;

pub use error::GatewayError;
pub use server::{default_threads, ready_line, runtime, Config, Gateway};
