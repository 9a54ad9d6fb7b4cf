//! metastore-server: the shard server.
//!
//! One process runs N shards, one per core. Each shard is a glommio
//! executor pinned to its core that owns, sharing nothing with the others:
//! a raft group ([`raftlog`], [`shard`]), an engine ([`engine`]), the MVCC
//! store over it ([`mvcc`]), the replicated state machine that applies
//! committed entries ([`state`]), and a TCP port speaking the internal shard
//! protocol ([`net`]). The only thing shards share is the
//! [`oracle::RevisionOracle`], an atomic counter that hands out revisions.
pub mod chunks;
pub mod durable_file;
pub mod engine;
pub mod history;
pub mod mvcc;
pub mod net;
pub mod oracle;
pub mod raftlog;
pub mod shard;
pub mod signal;
pub mod state;
pub mod wal;
pub mod watch;
