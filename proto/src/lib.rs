//! Wire types shared by every MetaStore process.
//!
//! This crate holds the protobuf definitions MetaStore speaks and the Rust
//! types [prost] generates from them. It contains no I/O: the gateway wraps
//! the etcd messages in tonic services, and the shard server frames the
//! shard protocol over its own sockets.
//!
//! # The etcd v3 API
//!
//! `protos/etcdserverpb/rpc.proto`, `protos/mvccpb/kv.proto` and
//! `protos/authpb/auth.proto` were written for this project to match etcd
//! v3.5's wire format exactly: the same proto packages, message names, field
//! names, numbers and types, enum values and oneofs, and the same services
//! and methods. That is what lets `etcdctl`, Go `clientv3` and the Rust
//! `etcd-client` crate talk to the gateway unchanged. gogoproto options and
//! `google.api.http` annotations are left out because they do not change
//! the bytes on the wire. A field etcd names in camel case (`dbSize`,
//! `raftIndex`, `TTL`, `ID`) keeps that proto name; prost turns it into a
//! snake-case Rust field (`db_size`, `raft_index`, `ttl`, `id`).
//!
//! Only messages are generated here. The gateway generates the gRPC service
//! traits from the same `rpc.proto` in its own build script and points them
//! at these types with `extern_path`, so each message has exactly one Rust
//! type across the workspace.
//!
//! # The shard protocol
//!
//! `protos/shardpb/shard.proto` is MetaStore's own protocol between the
//! gateway and the shards of a `metastore-server`: length-prefixed
//! `ShardRequest` / `ShardResponse` frames over plain TCP, one port per
//! shard (no gRPC on that path). It reuses the etcd request and response
//! messages wherever their meaning is the same, and adds the messages
//! needed for topology discovery and cross-shard transactions.
//!
//! [`router`] decides which shard owns a key; [`txn`] holds the shared
//! transaction helpers; [`encode`] encodes a put's messages without
//! prost's per-field clones; [`scenario`] runs the scripted scenario files of
//! the server's and the gateway's deterministic tests.
//!
//! The build script compiles every `.proto` under `protos/`; each proto
//! package becomes a module of the same name at the crate root, which is
//! where prost's cross-package paths (`super::mvccpb::KeyValue`) expect it.

#[allow(clippy::all)]
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

#[allow(clippy::all)]
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

#[allow(clippy::all)]
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

#[allow(clippy::all)]
pub mod shardpb {
    include!(concat!(env!("OUT_DIR"), "/shardpb.rs"));
}

pub mod encode;
pub mod range;
pub mod router;
pub mod scenario;
pub mod txn;
