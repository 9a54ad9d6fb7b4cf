//! [`Backend`]: what every service shares — the transport to the shards,
//! the router, the cluster identity, and the retry policy.
//!
//! # Retries
//!
//! Some shard errors mean "nothing happened, try again shortly":
//! `CONFLICT` (a key is locked by an in-flight cross-shard txn), an aborted
//! txn, a refused connection, a shard that is not (yet) leader or not
//! available ([`GatewayError::is_retryable`]). [`Backend::retry`] repeats a
//! request on those with jittered exponential backoff (1 ms growing to
//! 50 ms) until the retry budget (default 10 s) is spent, then fails with
//! [`GatewayError::RetriesExhausted`], which clients see as etcd's
//! "request timed out". Errors that leave the outcome unknown (a timeout, a
//! lost connection) are *not* retried for writes: a write may have been
//! applied, and etcd itself answers "request timed out" in that case.
//! Requests that may safely be repeated (reads, lease renewals, the
//! registrations of a lease on non-home shards) go through
//! [`Backend::retry_idempotent`], which retries those too (as etcd's
//! clientv3 retries `Unavailable` reads): a server that restarts leaves the
//! gateway connections that look alive until the dead process's sockets are
//! torn down, and a request sent on one then fails.
//!
//! # Headers
//!
//! Every response header carries the cluster id and member id learned from
//! the topology (whatever the shards put there is overwritten), and the
//! revision and raft term the operation observed.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::ResponseHeader;
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{CurrentRevisionRequest, CurrentRevisionResponse};
use rand::Rng;

use crate::error::{GatewayError, Result};
use crate::shards::{self, Transport};

/// Who we are, for response headers and the Cluster API.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
    pub member_name: String,
    /// The server's history (see `watch::merge`, "A lost history"; 0 =
    /// a server that does not name one).
    pub history_id: u64,
}

/// How long and how fast to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total time spent retrying one request before giving up.
    pub budget: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            budget: Duration::from_secs(10),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
        }
    }
}

impl RetryPolicy {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            deadline: Instant::now() + self.budget,
            ceiling: self.min_backoff,
            policy: self.clone(),
        }
    }
}

/// Jittered exponential backoff with a deadline.
#[derive(Debug)]
pub struct Backoff {
    deadline: Instant,
    ceiling: Duration,
    policy: RetryPolicy,
}

impl Backoff {
    /// The next delay, or `None` once the budget is spent. The delay is
    /// uniform in `[min, ceiling]`; the ceiling doubles up to `max`.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now >= self.deadline {
            return None;
        }
        let lo = self.policy.min_backoff;
        let hi = self.ceiling.max(lo);
        let d = if hi > lo {
            rand::thread_rng().gen_range(lo..=hi)
        } else {
            lo
        };
        self.ceiling = (self.ceiling * 2).min(self.policy.max_backoff);
        Some(d.min(self.deadline - now))
    }

    /// Sleeps for the next delay; `false` once the budget is spent.
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(d) => {
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }
}

/// Shared state of all services.
pub struct Backend {
    pub transport: Arc<dyn Transport>,
    pub router: ShardRouter,
    pub identity: Identity,
    pub retry: RetryPolicy,
    next_oracle_shard: AtomicUsize,
}

impl Backend {
    pub fn new(transport: Arc<dyn Transport>, router: ShardRouter, identity: Identity) -> Backend {
        Backend {
            transport,
            router,
            identity,
            retry: RetryPolicy::default(),
            next_oracle_shard: AtomicUsize::new(0),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Backend {
        self.retry = retry;
        self
    }

    pub fn t(&self) -> &dyn Transport {
        &*self.transport
    }

    pub fn all_shards(&self) -> Vec<u32> {
        (0..self.router.shard_count()).collect()
    }

    /// Runs `f` until it succeeds or fails with a non-retryable error,
    /// backing off between attempts (see the module docs).
    pub async fn retry<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.retry_while(f, GatewayError::is_retryable).await
    }

    /// [`Self::retry`] for a request that may safely be repeated (a read, a
    /// renewal): also retried when its outcome is unknown.
    pub async fn retry_idempotent<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.retry_while(f, |e| e.is_retryable() || e.is_ambiguous())
            .await
    }

    async fn retry_while<T, F, Fut>(
        &self,
        mut f: F,
        again: impl Fn(&GatewayError) -> bool,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff = self.retry.backoff();
        loop {
            match f().await {
                Err(e) if again(&e) => {
                    tracing::debug!(error = %e, "retrying");
                    if !backoff.wait().await {
                        return Err(GatewayError::RetriesExhausted(Box::new(e)));
                    }
                }
                other => return other,
            }
        }
    }

    /// The newest revision handed out by the revision oracle (every shard
    /// shares it; the shard asked rotates), and the raft term of the shard
    /// that answered.
    pub async fn current_revision(&self) -> Result<(i64, u64)> {
        let r = self.read_current_revision().await?;
        Ok((r.revision, r.raft_term))
    }

    /// [`Self::current_revision`] with the history the revision belongs to.
    pub async fn read_current_revision(&self) -> Result<CurrentRevisionResponse> {
        let n = self.router.shard_count() as usize;
        let shard = (self.next_oracle_shard.fetch_add(1, Ordering::Relaxed) % n) as u32;
        self.retry_idempotent(|| {
            shards::current_revision(self.t(), shard, CurrentRevisionRequest {})
        })
        .await
    }

    /// A header with our identity and the given revision and term.
    pub fn header(&self, revision: i64, raft_term: u64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term,
        }
    }

    /// A shard's header with our identity stamped in (revision and term kept).
    pub fn fix_header(&self, h: Option<ResponseHeader>) -> Option<ResponseHeader> {
        let h = h.unwrap_or_default();
        Some(self.header(h.revision, h.raft_term))
    }

    /// A header for answers that do not read the keyspace (Cluster,
    /// Maintenance): the current revision if the shards answer, else zeros.
    pub async fn best_effort_header(&self) -> ResponseHeader {
        match self.current_revision().await {
            Ok((rev, term)) => self.header(rev, term),
            Err(e) => {
                tracing::debug!(error = %e, "no current revision for a header");
                self.header(0, 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_bounded_and_ends() {
        let policy = RetryPolicy {
            budget: Duration::from_millis(200),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
        };
        let mut b = policy.backoff();
        for _ in 0..20 {
            let d = b.next_delay().unwrap();
            assert!(d <= Duration::from_millis(50));
        }
        let mut b = RetryPolicy {
            budget: Duration::ZERO,
            ..policy
        }
        .backoff();
        assert_eq!(b.next_delay(), None);
    }
}
