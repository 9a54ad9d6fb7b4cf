//! Current-revision reads shared by every watch request waiting for one.
//!
//! Creating a watch (start "now"), a progress request and a progress tick
//! each need the current revision, read from the oracle *after* the
//! request arrived: anything a client saw before it must be covered. A
//! client creating thousands of watches at once (a controller starting
//! up) would otherwise send the oracle one read per watch, and hold a
//! pending shard request per watch while they run.
//!
//! [`RevisionReads`] shares them: a caller registers, and the next read
//! started answers every caller registered before it started. At most one
//! read is in flight; callers arriving during it wait for the one after.
//!
//! Invariant: every answer comes from a read issued after its caller
//! registered (a read takes the waiting list before it is sent, and only
//! that list gets its result).
//!
//! Each read also names the server's history (see `merge`, "A lost
//! history"); the feed registry hears of it (`on_history`) before any
//! caller gets the revision, so a watch created from a revision of a
//! restarted non-durable server expects that server's new history. And
//! it names the compacted revision, kept ([`RevisionReads::compacted`])
//! before any caller is answered: a watch created from below it is
//! canceled as compacted, as in etcd, even where a feed could serve it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::error::{GatewayError, Result};

type Waiter = oneshot::Sender<Result<(i64, u64)>>;

/// Shared current-revision reads (see the module docs).
pub struct RevisionReads {
    backend: Arc<Backend>,
    /// Told the history each read names, before its callers are answered.
    on_history: Box<dyn Fn(u64) + Send + Sync>,
    /// The compacted revision the newest read named.
    compacted: AtomicI64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A task is issuing reads.
    reading: bool,
    /// Callers the next read answers.
    waiting: Vec<Waiter>,
}

impl RevisionReads {
    pub fn new(
        backend: Arc<Backend>,
        on_history: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Arc<RevisionReads> {
        Arc::new(RevisionReads {
            backend,
            on_history,
            compacted: AtomicI64::new(0),
            state: Mutex::new(State::default()),
        })
    }

    /// The current revision and raft term, read after this call began.
    pub async fn current(self: &Arc<Self>) -> Result<(i64, u64)> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap();
            st.waiting.push(tx);
            !std::mem::replace(&mut st.reading, true)
        };
        if start {
            tokio::spawn(self.clone().read_while_waited_for());
        }
        rx.await
            .unwrap_or_else(|_| Err(GatewayError::Internal("revision read abandoned".into())))
    }

    /// The compacted revision named by the newest read. A caller answered
    /// by a read started after it arrived finds here at least the revision
    /// of every compaction completed before it arrived (compaction only
    /// moves up within a history).
    pub fn compacted(&self) -> i64 {
        self.compacted.load(Ordering::Relaxed)
    }

    /// Reads for the callers registered so far, again while more came
    /// meanwhile; stops when none is left.
    async fn read_while_waited_for(self: Arc<Self>) {
        loop {
            let batch = {
                let mut st = self.state.lock().unwrap();
                if st.waiting.is_empty() {
                    st.reading = false;
                    return;
                }
                std::mem::take(&mut st.waiting)
            };
            let r = self.backend.read_current_revision().await.map(|r| {
                (self.on_history)(r.history_id);
                self.compacted
                    .store(r.compacted_revision, Ordering::Relaxed);
                (r.revision, r.raft_term)
            });
            for tx in batch {
                let _ = tx.send(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backend, FakeShards};
    use metastore_proto::shardpb::{
        shard_request::Body as Req, shard_response::Body as Resp, CurrentRevisionResponse,
    };
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

    /// A backend whose oracle answers 1, 2, 3, ... (one per read), read
    /// number n in history 100 + n; and the last history observed.
    fn counting() -> (Arc<RevisionReads>, Arc<AtomicI64>, Arc<AtomicU64>) {
        let reads = Arc::new(AtomicI64::new(0));
        let r = reads.clone();
        let fake = FakeShards::new(2, move |_, req| match req {
            Req::CurrentRevision(_) => {
                let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                    revision: n,
                    raft_term: 1,
                    history_id: 100 + n as u64,
                    compacted_revision: n - 1,
                }))
            }
            other => panic!("unexpected {other:?}"),
        });
        let observed = Arc::new(AtomicU64::new(0));
        let o = observed.clone();
        let rr = RevisionReads::new(
            Arc::new(backend(fake)),
            Box::new(move |h| o.store(h, Ordering::SeqCst)),
        );
        (rr, reads, observed)
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_read() {
        let (rr, reads, _) = counting();
        let all = futures::future::join_all((0..100).map(|_| rr.current())).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(all.iter().all(|r| *r == Ok((1, 1))));
    }

    #[tokio::test]
    async fn a_later_caller_gets_a_later_read() {
        let (rr, reads, observed) = counting();
        assert_eq!(rr.current().await, Ok((1, 1)));
        assert_eq!(observed.load(Ordering::SeqCst), 101, "history told first");
        assert_eq!(rr.current().await, Ok((2, 1)));
        assert_eq!(observed.load(Ordering::SeqCst), 102);
        let both = futures::future::join(rr.current(), rr.current()).await;
        assert_eq!(both, (Ok((3, 1)), Ok((3, 1))));
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }
}
