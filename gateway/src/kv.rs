//! The KV API (Range, Put, DeleteRange, Compact) over hash-placed shards.
//! Txn lives in [`crate::coordinator`].
//!
//! # Routing
//!
//! - A single key (empty `range_end`) lives on exactly one shard
//!   (`ShardRouter::shard_of`); the request is forwarded there unchanged and
//!   the shard's answer is returned with our identity in the header.
//! - A key range may hold keys of every shard.
//!   * Range: the gateway fixes one snapshot revision `R` (the client's, or
//!     the revision oracle's current revision when the client asked for 0),
//!     sends the request with `revision = R` to every shard, and merges the
//!     answers ([`crate::merge::merge_range`]). Because every shard reads at
//!     the same `R` and a shard waits until it has resolved `R`, the merged
//!     answer is exactly the writes with revision ≤ R. The header revision
//!     is `R` when the client asked for 0 (so "list, then watch from
//!     header.revision + 1" misses nothing), otherwise the newest revision
//!     the shards reported, like etcd's "current revision" header. A read
//!     of "now" that a compaction overtook (above `R`, between two shards'
//!     reads) is taken again at a newer `R`: etcd never answers one as
//!     compacted.
//!   * DeleteRange: one revision for the whole range means one write across
//!     shards: it runs as the cross-shard txn `{success: [delete_range]}`
//!     and the txn's single answer is unwrapped. With one shard it is
//!     forwarded.
//! - Compact goes to every shard (each compacts its own history at the
//!   same revision).
//!
//! # Checks before any shard is asked
//!
//! etcd's API-level checks run here so bad input gets etcd's errors and
//! never reaches a shard: empty keys, `ignore_value`/`ignore_lease` with a
//! value/lease, invalid sort options, txn limits and duplicate keys
//! (`metastore_proto::txn::validate`, with each op's own checks, in etcd's
//! order), and the request size limit (`--max-request-bytes`).

use futures::future::try_join_all;
use metastore_proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    request_op, response_op, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    TxnRequest,
};
use metastore_proto::shardpb::CompactRequest;

use crate::backend::Backend;
use crate::error::{GatewayError, Result};
use crate::merge;
use crate::shards;

/// Snapshot reads taken again after a compaction overtook them.
pub(crate) const SNAPSHOT_TRIES: u32 = 3;

/// Refuses a request whose encoding exceeds `max_bytes` (etcd's
/// `--max-request-bytes`).
pub fn check_size<M: prost::Message>(req: &M, max_bytes: usize) -> Result<()> {
    if req.encoded_len() > max_bytes {
        Err(GatewayError::RequestTooLarge)
    } else {
        Ok(())
    }
}

/// etcd's `checkRangeRequest`.
pub fn check_range(req: &RangeRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(GatewayError::KeyNotProvided);
    }
    if SortOrder::try_from(req.sort_order).is_err()
        || SortTarget::try_from(req.sort_target).is_err()
    {
        return Err(GatewayError::InvalidSortOption);
    }
    Ok(())
}

/// etcd's `checkPutRequest`.
pub fn check_put(req: &PutRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(GatewayError::KeyNotProvided);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(GatewayError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(GatewayError::LeaseProvided);
    }
    Ok(())
}

/// etcd's `checkDeleteRequest`.
pub fn check_delete(req: &DeleteRangeRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(GatewayError::KeyNotProvided);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` + `checkIntervals`, with every op's own checks,
/// in etcd's order (see `metastore_proto::txn::validate`).
pub fn check_txn(req: &TxnRequest, max_ops: usize) -> Result<()> {
    metastore_proto::txn::validate(req, max_ops, &check_op)
}

/// etcd's `checkRequestOp` for a range, put or delete (`validate` walks
/// nested txns itself).
fn check_op(op: &RequestOp) -> Result<()> {
    match &op.request {
        Some(request_op::Request::RequestRange(r)) => check_range(r),
        Some(request_op::Request::RequestPut(p)) => check_put(p),
        Some(request_op::Request::RequestDeleteRange(d)) => check_delete(d),
        Some(request_op::Request::RequestTxn(_)) | None => Ok(()),
    }
}

impl Backend {
    /// etcd's Range (see the module docs).
    pub async fn range(&self, mut req: RangeRequest) -> Result<RangeResponse> {
        check_range(&req)?;
        if req.revision < 0 {
            req.revision = 0;
        }
        let shards = self.router.shards_for_range(&req.key, &req.range_end);
        if shards.len() == 1 {
            let shard = shards[0];
            let mut resp = self
                .retry_idempotent(|| shards::range(self.t(), shard, req.clone()))
                .await?;
            resp.header = self.fix_header(resp.header);
            return Ok(resp);
        }
        let snapshot = req.revision == 0;
        // etcd never answers a read of "now" as compacted. Here the shards
        // read one snapshot at moments apart (and a page may take a second
        // request), so a compaction above the snapshot can land between
        // them; such a read is taken again at a newer snapshot.
        let mut tries = 0;
        let (rev, term, mut resp) = loop {
            let (rev, term) = if snapshot {
                self.current_revision().await?
            } else {
                (req.revision, 0)
            };
            match self.scatter_range(&req, &shards, rev).await {
                Err(GatewayError::Compacted) if snapshot && tries < SNAPSHOT_TRIES => tries += 1,
                r => break (rev, term, r?),
            }
        };
        let h = resp.header.unwrap_or_default();
        let revision = if snapshot { rev } else { h.revision };
        resp.header = Some(self.header(revision, h.raft_term.max(term)));
        Ok(resp)
    }

    /// Reads `req` at `rev` from every shard in `shards` and merges the
    /// answers (see the module docs and `merge`).
    async fn scatter_range(
        &self,
        req: &RangeRequest,
        shards: &[u32],
        rev: i64,
    ) -> Result<RangeResponse> {
        let mut shard_req = merge::shard_range_request(req).into_owned();
        shard_req.revision = rev;
        let budget = merge::page_budget(req, shards.len());
        if let Some(budget) = budget {
            shard_req.limit = budget;
        }
        let shard_req = &shard_req;
        let mut parts = try_join_all(shards.iter().map(|&s| {
            self.retry_idempotent(move || shards::range(self.t(), s, shard_req.clone()))
        }))
        .await?;
        if budget.is_some() {
            // Shards that stopped at their budget short of the page's end
            // read on at the same revision (rare; see `merge`).
            let next = merge::continuations(req, shard_req, &parts);
            let answers = try_join_all(next.iter().map(|(i, r)| {
                let s = shards[*i];
                self.retry_idempotent(move || shards::range(self.t(), s, r.clone()))
            }))
            .await?;
            for ((i, _), answer) in next.into_iter().zip(answers) {
                merge::continue_part(&mut parts[i], answer);
            }
        }
        Ok(merge::merge_range(req, parts))
    }

    /// etcd's Put: forwarded to the key's owner, retried while the key is
    /// locked by a cross-shard txn.
    pub async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        check_put(&req)?;
        let shard = self.router.shard_of(&req.key);
        let mut resp = self
            .retry(|| shards::put(self.t(), shard, req.clone()))
            .await?;
        resp.header = self.fix_header(resp.header);
        Ok(resp)
    }

    /// etcd's DeleteRange (see the module docs).
    pub async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        check_delete(&req)?;
        let shards = self.router.shards_for_range(&req.key, &req.range_end);
        if shards.len() == 1 {
            let shard = shards[0];
            let mut resp = self
                .retry(|| shards::delete_range(self.t(), shard, req.clone()))
                .await?;
            resp.header = self.fix_header(resp.header);
            return Ok(resp);
        }
        let txn = TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(req)),
            }],
            failure: vec![],
        };
        let resp = self.txn(txn).await?;
        let header = resp.header;
        match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(response_op::Response::ResponseDeleteRange(mut d)) => {
                d.header = header;
                Ok(d)
            }
            _ => Err(GatewayError::Protocol(
                "a delete txn answered without its delete".into(),
            )),
        }
    }

    /// etcd's Compact: every shard compacts at the same revision.
    ///
    /// Outcome rules: any error other than compacted/future wins (so a
    /// client retries); else any FUTURE_REVISION → future revision; else if
    /// *every* shard said COMPACTED → compacted; a mix of successes and
    /// COMPACTED (a retry after a partial failure) counts as success, since
    /// every shard is now compacted at the revision.
    pub async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse> {
        let results = futures::future::join_all(self.all_shards().into_iter().map(|s| {
            self.retry(move || {
                shards::compact(
                    self.t(),
                    s,
                    CompactRequest {
                        revision: req.revision,
                    },
                )
            })
        }))
        .await;
        compact_outcome(results.into_iter().map(|r| r.map(|_| ())).collect())?;
        let (rev, term) = self.current_revision().await?;
        Ok(CompactionResponse {
            header: Some(self.header(rev, term)),
        })
    }
}

/// Combines the shards' compaction results (rules on [`Backend::compact`]).
pub fn compact_outcome(results: Vec<Result<()>>) -> Result<()> {
    let mut compacted = 0;
    let mut future = false;
    let n = results.len();
    for r in results {
        match r {
            Ok(()) => {}
            Err(GatewayError::Compacted) => compacted += 1,
            Err(GatewayError::FutureRevision) => future = true,
            Err(e) => return Err(e),
        }
    }
    if future {
        Err(GatewayError::FutureRevision)
    } else if compacted == n && n > 0 {
        Err(GatewayError::Compacted)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backend, FakeShards};
    use metastore_proto::etcdserverpb::ResponseHeader;
    use metastore_proto::mvccpb::KeyValue;
    use metastore_proto::shardpb::{
        shard_request::Body as Req, shard_response::Body as Resp, CompactResponse,
        CurrentRevisionResponse,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn request_checks_match_etcd() {
        assert_eq!(
            check_put(&PutRequest::default()),
            Err(GatewayError::KeyNotProvided)
        );
        assert_eq!(
            check_put(&PutRequest {
                key: b"k".to_vec().into(),
                value: b"v".to_vec().into(),
                ignore_value: true,
                ..Default::default()
            }),
            Err(GatewayError::ValueProvided)
        );
        assert_eq!(
            check_put(&PutRequest {
                key: b"k".to_vec().into(),
                lease: 5,
                ignore_lease: true,
                ..Default::default()
            }),
            Err(GatewayError::LeaseProvided)
        );
        assert_eq!(
            check_range(&RangeRequest {
                key: b"k".to_vec(),
                sort_order: 9,
                ..Default::default()
            }),
            Err(GatewayError::InvalidSortOption)
        );
        assert_eq!(
            check_delete(&DeleteRangeRequest::default()),
            Err(GatewayError::KeyNotProvided)
        );
        // Op checks apply inside (nested) txns.
        let bad = TxnRequest {
            compare: vec![],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare: vec![],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: b"k".to_vec().into(),
                            value: b"v".to_vec().into(),
                            ignore_value: true,
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                })),
            }],
            failure: vec![],
        };
        assert_eq!(check_txn(&bad, 128), Err(GatewayError::ValueProvided));
        let big = PutRequest {
            key: b"k".to_vec().into(),
            value: vec![0; 2000].into(),
            ..Default::default()
        };
        assert_eq!(check_size(&big, 1000), Err(GatewayError::RequestTooLarge));
        assert_eq!(check_size(&big, 1 << 20), Ok(()));
    }

    #[test]
    fn compact_outcomes() {
        use GatewayError::*;
        assert_eq!(compact_outcome(vec![Ok(()), Ok(())]), Ok(()));
        assert_eq!(
            compact_outcome(vec![Err(Compacted), Err(Compacted)]),
            Err(Compacted)
        );
        assert_eq!(compact_outcome(vec![Ok(()), Err(Compacted)]), Ok(()));
        assert_eq!(
            compact_outcome(vec![Err(Compacted), Err(FutureRevision)]),
            Err(FutureRevision)
        );
        assert_eq!(
            compact_outcome(vec![Err(FutureRevision), Err(Timeout { shard: 1 })]),
            Err(Timeout { shard: 1 })
        );
    }

    fn kv(key: &str) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec().into(),
            value: b"v".to_vec().into(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        }
    }

    #[tokio::test]
    async fn range_scatters_at_one_snapshot_revision() {
        let fake = FakeShards::new(2, |shard, req| match req {
            Req::CurrentRevision(_) => Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                revision: 50,
                raft_term: 2,
                ..Default::default()
            })),
            Req::Range(r) => {
                assert_eq!(r.revision, 50, "every shard reads at the snapshot");
                Ok(Resp::Range(RangeResponse {
                    header: Some(ResponseHeader {
                        revision: 60 + shard as i64,
                        raft_term: 1,
                        ..Default::default()
                    }),
                    kvs: vec![kv(&format!("k{shard}"))],
                    more: false,
                    count: 1,
                }))
            }
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let resp = b
            .range(RangeRequest {
                key: b"a".to_vec(),
                range_end: b"z".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(resp.count, 2);
        let h = resp.header.unwrap();
        assert_eq!(h.revision, 50, "snapshot revision in the header");
        assert_eq!(h.raft_term, 2);
        assert_eq!(
            (h.cluster_id, h.member_id),
            (crate::testing::CLUSTER, crate::testing::MEMBER)
        );

        // An explicit revision is used as is; the header is the newest
        // revision the shards report.
        let resp = b
            .range(RangeRequest {
                key: b"a".to_vec(),
                range_end: b"z".to_vec(),
                revision: 50,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(resp.header.unwrap().revision, 61);
    }

    #[tokio::test]
    async fn a_snapshot_read_overtaken_by_a_compaction_is_taken_again() {
        // The first snapshot is 50; a compaction to 55 reaches shard 1
        // before its read, so the read is taken again at 60.
        let snapshots = std::sync::Arc::new(AtomicUsize::new(0));
        let s = snapshots.clone();
        let fake = FakeShards::new(2, move |shard, req| match req {
            Req::CurrentRevision(_) => {
                let rev = if s.fetch_add(1, Ordering::SeqCst) == 0 {
                    50
                } else {
                    60
                };
                Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                    revision: rev,
                    raft_term: 2,
                    ..Default::default()
                }))
            }
            Req::Range(r) if shard == 1 && r.revision < 55 => Err(GatewayError::Compacted),
            Req::Range(r) => Ok(Resp::Range(RangeResponse {
                header: Some(ResponseHeader {
                    revision: r.revision.max(60),
                    ..Default::default()
                }),
                kvs: vec![kv(&format!("k{shard}"))],
                more: false,
                count: 1,
            })),
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake);
        let list = |revision: i64| RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            revision,
            ..Default::default()
        };
        let resp = b.range(list(0)).await.unwrap();
        assert_eq!(resp.header.unwrap().revision, 60);
        assert_eq!(resp.count, 2);
        assert_eq!(snapshots.load(Ordering::SeqCst), 2);
        // A read at a revision the client chose stays compacted.
        assert!(matches!(
            b.range(list(50)).await,
            Err(GatewayError::Compacted)
        ));
    }

    #[tokio::test]
    async fn put_retries_conflicts_then_succeeds() {
        let fake = FakeShards::new(2, |_, req| match req {
            Req::Put(_) => Ok(Resp::Put(PutResponse {
                header: Some(ResponseHeader {
                    revision: 9,
                    ..Default::default()
                }),
                prev_kv: None,
            })),
            other => panic!("unexpected {other:?}"),
        });
        fake.fail_next(3, GatewayError::Conflict("locked".into()));
        let b = backend(fake.clone());
        let resp = b
            .put(PutRequest {
                key: b"k".to_vec().into(),
                value: b"v".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(resp.header.unwrap().revision, 9);
        assert_eq!(fake.calls().len(), 4);
    }

    /// A fake whose first answer is a lost connection; and its call count.
    fn first_connection_lost() -> (FakeShards, std::sync::Arc<AtomicUsize>) {
        let calls = std::sync::Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let fake = FakeShards::new(1, move |shard, req| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(GatewayError::ConnectionLost { shard });
            }
            match req {
                Req::Range(_) => Ok(Resp::Range(RangeResponse::default())),
                Req::Put(_) => Ok(Resp::Put(PutResponse::default())),
                other => panic!("unexpected {other:?}"),
            }
        });
        (fake, calls)
    }

    #[tokio::test]
    async fn a_read_is_retried_after_a_lost_connection() {
        let (fake, calls) = first_connection_lost();
        let b = backend(fake);
        let req = RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        b.range(req).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_write_is_not_retried_after_a_lost_connection() {
        // It may have been applied: etcd answers "request timed out".
        let (fake, calls) = first_connection_lost();
        let b = backend(fake);
        let req = PutRequest {
            key: b"k".to_vec().into(),
            ..Default::default()
        };
        let e = b.put(req).await.unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::Unavailable);
        assert_eq!(e.to_status().message(), crate::error::MSG_TIMEOUT);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn put_gives_up_after_the_budget() {
        let fake = FakeShards::new(1, |_, _| Err(GatewayError::Conflict("locked".into())));
        let mut b = backend(fake);
        b.retry.budget = std::time::Duration::from_millis(30);
        let e = b
            .put(PutRequest {
                key: b"k".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, GatewayError::RetriesExhausted(_)));
        assert_eq!(e.to_status().message(), crate::error::MSG_TIMEOUT);
    }

    #[tokio::test]
    async fn compact_goes_to_every_shard() {
        let fake = FakeShards::new(3, |_, req| match req {
            Req::Compact(c) => {
                assert_eq!(c.revision, 5);
                Ok(Resp::Compact(CompactResponse {}))
            }
            Req::CurrentRevision(_) => Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                revision: 8,
                raft_term: 1,
                ..Default::default()
            })),
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let resp = b
            .compact(CompactionRequest {
                revision: 5,
                physical: false,
            })
            .await
            .unwrap();
        assert_eq!(resp.header.unwrap().revision, 8);
        let compacts: Vec<u32> = fake
            .calls()
            .into_iter()
            .filter(|(_, r)| matches!(r, Req::Compact(_)))
            .map(|(s, _)| s)
            .collect();
        assert_eq!(compacts.len(), 3);
    }
}
