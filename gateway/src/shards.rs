//! The shards of one metastore-server, as the gateway sees them.
//!
//! [`Transport`] is the seam between the gateway's logic and the network:
//! "send this request body to shard *n*, give me the response body (or a
//! typed error)". [`Shards`] implements it with one [`ShardClient`] per
//! shard; unit tests implement it with in-memory fakes, so the KV logic and
//! the transaction coordinator are tested without sockets.
//!
//! [`Shards::discover`] asks any shard (`--server`) for the topology: the
//! shard count, every shard's address (index = shard id), and the cluster
//! and member identity the gateway puts in every response header. The
//! shard count fixes the [`ShardRouter`], which must agree with the
//! server's: both use `metastore_proto::router`.
//!
//! The typed helpers ([`range`], [`put`], ...) wrap one request kind each
//! and turn an unexpected response kind into [`GatewayError::Protocol`].
//!
//! [`WatchTransport`] is the second seam: shard watch subscriptions
//! (streams, see `client`). [`Shards`] serves them over a *second*
//! connection per shard, dedicated to watch traffic: a history replay or a
//! burst of events to many feeds then never queues in front of a KV
//! response on the same socket (nor a large Range in front of an event),
//! so KV latency and watch latency stay independent. All feeds of the
//! gateway share that one connection per shard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    self as spb, shard_request::Body as Req, shard_response::Body as Resp,
};

use crate::client::{ClientConfig, ShardClient, Subscription, SubscriptionSink};
use crate::error::{GatewayError, Result};

/// Sends one request to one shard.
pub trait Transport: Send + Sync + 'static {
    fn call(&self, shard: u32, body: Req) -> BoxFuture<'static, Result<Resp>>;
}

/// Opens watch subscriptions on shards (see the module docs).
pub trait WatchTransport: Send + Sync + 'static {
    /// Subscribes on `shard`; frames go to `sink` until the stream ends or
    /// the returned handle is dropped (which cancels it).
    fn subscribe(
        &self,
        shard: u32,
        req: spb::WatchSubscribeRequest,
        sink: SubscriptionSink,
    ) -> BoxFuture<'static, Result<Box<dyn WatchSubscription>>>;
}

/// A live subscription: one-way messages to the shard; drop = cancel.
pub trait WatchSubscription: Send + Sync {
    fn ack(&self, seq: u64);
    fn progress(&self, revision: i64);
}

impl WatchSubscription for Subscription {
    fn ack(&self, seq: u64) {
        Subscription::ack(self, seq)
    }
    fn progress(&self, revision: i64) {
        Subscription::progress(self, revision)
    }
}

/// What the server told us about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    pub shard_count: u32,
    pub shard_addrs: Vec<String>,
    pub cluster_id: u64,
    pub member_id: u64,
    pub member_name: String,
    pub engine: String,
    pub history_id: u64,
}

impl Topology {
    /// From a shard's answer. Shard addresses that name an unspecified host
    /// (`0.0.0.0:p`, `[::]:p`) are replaced by the host of `server`, the
    /// address we reached the server at.
    pub fn from_response(resp: spb::TopologyResponse, server: &str) -> Result<Topology> {
        if resp.shard_count == 0 || resp.shard_addrs.len() != resp.shard_count as usize {
            return Err(GatewayError::Protocol(format!(
                "topology lists {} addresses for {} shards",
                resp.shard_addrs.len(),
                resp.shard_count
            )));
        }
        let server_host = server.rsplit_once(':').map(|(h, _)| h).unwrap_or(server);
        let shard_addrs = resp
            .shard_addrs
            .iter()
            .map(|a| match a.rsplit_once(':') {
                Some((h, port)) if h == "0.0.0.0" || h == "[::]" || h.is_empty() => {
                    format!("{server_host}:{port}")
                }
                _ => a.clone(),
            })
            .collect();
        Ok(Topology {
            shard_count: resp.shard_count,
            shard_addrs,
            cluster_id: resp.cluster_id,
            member_id: resp.member_id,
            member_name: resp.member_name,
            engine: resp.engine,
            history_id: resp.history_id,
        })
    }
}

/// Every shard client, indexed by shard id: one connection for requests
/// and one for watch subscriptions per shard.
pub struct Shards {
    clients: Vec<ShardClient>,
    watch_clients: Vec<ShardClient>,
    topology: Topology,
}

impl Shards {
    pub fn new(topology: Topology, config: ClientConfig) -> Shards {
        let make = || {
            topology
                .shard_addrs
                .iter()
                .enumerate()
                .map(|(i, a)| ShardClient::new(i as u32, a.clone(), config.clone()))
                .collect()
        };
        Shards {
            clients: make(),
            watch_clients: make(),
            topology,
        }
    }

    /// Asks the shard at `server` for the topology, retrying (the server may
    /// be starting) until `wait` has passed.
    pub async fn discover(server: &str, config: ClientConfig, wait: Duration) -> Result<Shards> {
        let deadline = Instant::now() + wait;
        let seed = ShardClient::new(u32::MAX, server, config.clone());
        let mut delay = Duration::from_millis(50);
        loop {
            match seed.call(Req::Topology(spb::TopologyRequest {})).await {
                Ok(Resp::Topology(t)) => {
                    let topology = Topology::from_response(t, server)?;
                    return Ok(Shards::new(topology, config));
                }
                Ok(other) => return Err(unexpected("topology", &other)),
                Err(e) if Instant::now() + delay < deadline => {
                    tracing::info!(server, error = %e, "server not ready; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn router(&self) -> ShardRouter {
        ShardRouter::new(self.topology.shard_count)
    }
}

impl Transport for Shards {
    fn call(&self, shard: u32, body: Req) -> BoxFuture<'static, Result<Resp>> {
        let client = self.clients.get(shard as usize).cloned();
        Box::pin(async move {
            match client {
                Some(c) => c.call(body).await,
                None => Err(GatewayError::Protocol(format!("no shard {shard}"))),
            }
        })
    }
}

impl WatchTransport for Shards {
    fn subscribe(
        &self,
        shard: u32,
        req: spb::WatchSubscribeRequest,
        sink: SubscriptionSink,
    ) -> BoxFuture<'static, Result<Box<dyn WatchSubscription>>> {
        let client = self.watch_clients.get(shard as usize).cloned();
        Box::pin(async move {
            match client {
                Some(c) => {
                    Ok(Box::new(c.subscribe(req, sink).await?) as Box<dyn WatchSubscription>)
                }
                None => Err(GatewayError::Protocol(format!("no shard {shard}"))),
            }
        })
    }
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn call(&self, shard: u32, body: Req) -> BoxFuture<'static, Result<Resp>> {
        (**self).call(shard, body)
    }
}

fn kind(r: &Resp) -> &'static str {
    match r {
        Resp::Error(_) => "error",
        Resp::Topology(_) => "topology",
        Resp::CurrentRevision(_) => "current_revision",
        Resp::Range(_) => "range",
        Resp::Put(_) => "put",
        Resp::DeleteRange(_) => "delete_range",
        Resp::Txn(_) => "txn",
        Resp::TxnEvaluate(_) => "txn_evaluate",
        Resp::TxnRead(_) => "txn_read",
        Resp::Prepare(_) => "prepare",
        Resp::Commit(_) => "commit",
        Resp::Abort(_) => "abort",
        Resp::Resolve(_) => "resolve",
        Resp::Compact(_) => "compact",
        Resp::Status(_) => "status",
        _ => "other",
    }
}

fn unexpected(wanted: &str, got: &Resp) -> GatewayError {
    GatewayError::Protocol(format!("expected a {wanted} response, got {}", kind(got)))
}

macro_rules! typed_call {
    ($(#[$doc:meta])* $name:ident, $req:ty, $variant:ident, $resp:ty) => {
        $(#[$doc])*
        pub async fn $name(t: &dyn Transport, shard: u32, req: $req) -> Result<$resp> {
            match t.call(shard, Req::$variant(req)).await? {
                Resp::$variant(r) => Ok(r),
                other => Err(unexpected(stringify!($name), &other)),
            }
        }
    };
}

typed_call!(
    current_revision,
    spb::CurrentRevisionRequest,
    CurrentRevision,
    spb::CurrentRevisionResponse
);
typed_call!(range, pb::RangeRequest, Range, pb::RangeResponse);

typed_call!(put, pb::PutRequest, Put, pb::PutResponse);
typed_call!(
    delete_range,
    pb::DeleteRangeRequest,
    DeleteRange,
    pb::DeleteRangeResponse
);
typed_call!(txn, pb::TxnRequest, Txn, pb::TxnResponse);
typed_call!(
    txn_evaluate,
    spb::TxnEvaluateRequest,
    TxnEvaluate,
    spb::TxnEvaluateResponse
);
typed_call!(txn_read, spb::TxnReadRequest, TxnRead, spb::TxnReadResponse);
typed_call!(prepare, spb::PrepareRequest, Prepare, spb::PrepareResponse);
typed_call!(commit, spb::CommitRequest, Commit, spb::CommitResponse);
typed_call!(abort, spb::AbortRequest, Abort, spb::AbortResponse);
typed_call!(compact, spb::CompactRequest, Compact, spb::CompactResponse);
typed_call!(status, spb::StatusRequest, Status, spb::StatusResponse);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_rewrites_unspecified_hosts() {
        let t = Topology::from_response(
            spb::TopologyResponse {
                shard_count: 2,
                shard_id: 0,
                shard_addrs: vec!["0.0.0.0:23790".into(), "10.0.0.5:23791".into()],
                cluster_id: 1,
                member_id: 2,
                engine: "memory".into(),
                member_name: "m".into(),
                history_id: 0,
            },
            "myhost:23790",
        )
        .unwrap();
        assert_eq!(t.shard_addrs, vec!["myhost:23790", "10.0.0.5:23791"]);
        assert!(Topology::from_response(
            spb::TopologyResponse {
                shard_count: 2,
                shard_addrs: vec!["a:1".into()],
                ..Default::default()
            },
            "x:1"
        )
        .is_err());
    }
}
