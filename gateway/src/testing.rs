//! Test doubles: an in-memory [`Transport`] whose shards answer through a
//! closure, recording every call. Lets the KV logic and the transaction
//! coordinator be tested without sockets.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{shard_request::Body as Req, shard_response::Body as Resp};

use crate::backend::{Backend, Identity, RetryPolicy};
use crate::error::{GatewayError, Result};
use crate::shards::Transport;

pub const CLUSTER: u64 = 0xc1;
pub const MEMBER: u64 = 0x3e;
/// The fake server's history id.
pub const HISTORY: u64 = 0x415;

type Handler = dyn Fn(u32, Req) -> Result<Resp> + Send + Sync;

/// Fake shards answering through one handler.
#[derive(Clone)]
pub struct FakeShards {
    pub count: u32,
    handler: Arc<Handler>,
    calls: Arc<Mutex<Vec<(u32, Req)>>>,
    failures: Arc<Mutex<VecDeque<GatewayError>>>,
}

impl FakeShards {
    pub fn new(
        count: u32,
        handler: impl Fn(u32, Req) -> Result<Resp> + Send + Sync + 'static,
    ) -> Self {
        FakeShards {
            count,
            handler: Arc::new(handler),
            calls: Arc::default(),
            failures: Arc::default(),
        }
    }

    /// The next `n` calls (to any shard) fail with `err`.
    pub fn fail_next(&self, n: usize, err: GatewayError) {
        let mut f = self.failures.lock().unwrap();
        for _ in 0..n {
            f.push_back(err.clone());
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<(u32, Req)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Transport for FakeShards {
    fn call(&self, shard: u32, body: Req) -> BoxFuture<'static, Result<Resp>> {
        self.calls.lock().unwrap().push((shard, body.clone()));
        let failure = self.failures.lock().unwrap().pop_front();
        let result = match failure {
            Some(e) => Err(e),
            None => (self.handler)(shard, body),
        };
        Box::pin(async move {
            tokio::task::yield_now().await;
            result
        })
    }
}

/// A backend over `fake` with a short retry budget.
pub fn backend(fake: FakeShards) -> Backend {
    let router = ShardRouter::new(fake.count);
    Backend::new(
        Arc::new(fake),
        router,
        Identity {
            cluster_id: CLUSTER,
            member_id: MEMBER,
            member_name: "test".into(),
            history_id: HISTORY,
        },
    )
    .with_retry(RetryPolicy {
        budget: std::time::Duration::from_secs(2),
        ..RetryPolicy::default()
    })
}
