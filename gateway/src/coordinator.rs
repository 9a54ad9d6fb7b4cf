//! The Txn coordinator: etcd transactions over hash-placed shards.
//!
//! A txn's *touched shards* are the owners of every key (or range) it may
//! compare, read or write in any branch (`metastore_proto::txn::touched_ranges`
//! routed through the `ShardRouter`). Three cases:
//!
//! 1. **One shard — fast path.** The `TxnRequest` goes to that shard, which
//!    evaluates, applies and assigns the revision itself. (A txn touching no
//!    key at all goes to shard 0.)
//! 2. **Several shards, read-only** (`!may_write`: no branch holds a Put or
//!    DeleteRange). A snapshot read: take `R` = the oracle's current
//!    revision; `TxnEvaluate(txn, R)` on every touched shard; combine the
//!    per-shard compare outcomes (`combine_outcomes`) and compute the path
//!    (`path`); `TxnRead(txn, R, path)` on every touched shard; merge
//!    ([`crate::merge::merge_txn`]). Header revision = `R`. No locks, no
//!    writes, so any failure may simply be retried; a compaction above `R`
//!    that overtakes the shards' reads is, at a newer `R` (etcd never
//!    answers a read of "now" as compacted).
//! 3. **Several shards, may write — two-phase commit.** One *attempt*:
//!    - `txn_id` = 16 random bytes; primary = the lowest touched shard;
//!    - **prepare** on every touched shard in parallel (each evaluates the
//!      compares on its keys, locks them, records a durable intent);
//!    - if any prepare failed: **abort** on every shard that prepared or
//!      whose answer was lost, then the attempt fails. CONFLICT (a lock held
//!      by another txn), an unreachable shard or a lost answer make the
//!      attempt retryable; a definitive refusal (e.g. invalid argument) is
//!      returned to the client;
//!    - combine outcomes → path;
//!    - **commit the primary** with `revision = 0`: the primary takes `R`
//!      from the oracle and durably records the decision. This is the
//!      commit point. If the primary answers TXN_ABORTED (it resolved the
//!      txn as aborted, e.g. we were too slow), nothing was written: abort
//!      the others and retry with a new attempt. Any other failure from
//!      here on leaves the outcome unknown: the commit is retried (the same
//!      `txn_id`, so a shard must answer a repeated Commit idempotently)
//!      and, when the budget is spent, the client gets "request timed out"
//!      — never a new attempt, which could apply the txn twice;
//!    - **commit every other participant** with `revision = R`, in
//!      parallel, each retried until it succeeds or the budget is spent
//!      (the decision is durable at the primary; a participant left
//!      behind resolves itself by asking the primary). If one could not be
//!      reached, its part of the answer is missing, so the client gets
//!      "request timed out" although the txn is committed — the same
//!      uncertainty etcd reports on a timeout;
//!    - merge the shards' answers; header revision = `R`.
//!
//!    Attempts are retried with jittered backoff within the retry budget
//!    ([`crate::backend::RetryPolicy`]); two txns that lock each other's
//!    keys both abort and retry at random offsets.
//!
//! The decision logic — which shards to abort, whether an attempt may be
//! retried, the path — lives in pure functions ([`phase_one`],
//! [`decide_path`], [`touched_shards`]) tested without I/O; the async
//! driver is tested against in-memory fake shards.

use std::collections::BTreeSet;

use futures::future::{join_all, try_join_all};
use metastore_proto::etcdserverpb::{request_op, TxnRequest, TxnResponse};
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    AbortRequest, CommitRequest, CommitResponse, CompareOutcome, PrepareRequest, PrepareResponse,
    TxnEvaluateRequest, TxnReadRequest,
};
use metastore_proto::txn::{self as mtxn, MAX_TXN_OPS};

use crate::backend::Backend;
use crate::error::{GatewayError, Result, MSG_KEY_NOT_FOUND};
use crate::kv::{check_txn, SNAPSHOT_TRIES};
use crate::merge::{fill_op_headers, merge_txn, shard_txn_request};
use crate::shards;

/// Why an attempt at a snapshot read failed: the shards' reads (a
/// compaction above the snapshot may have overtaken them), or a final
/// answer about the request itself.
enum SnapshotRead {
    Shards(GatewayError),
    Refused(GatewayError),
}

/// The shards a txn may touch, ascending.
pub fn touched_shards(txn: &TxnRequest, router: &ShardRouter) -> Vec<u32> {
    let mut set = BTreeSet::new();
    for (key, end) in mtxn::touched_ranges(txn) {
        set.extend(router.shards_for_range(key, end));
        if set.len() == router.shard_count() as usize {
            break;
        }
    }
    set.into_iter().collect()
}

/// Combines the shards' compare outcomes (each in canonical order) and
/// walks the txn to its path. Every shard must report one outcome per
/// canonical compare.
pub fn decide_path(txn: &TxnRequest, per_shard: &[Vec<CompareOutcome>]) -> Result<Vec<bool>> {
    let n = mtxn::compare_count(txn);
    if let Some(bad) = per_shard.iter().find(|o| o.len() != n) {
        return Err(GatewayError::Protocol(format!(
            "a shard reported {} compare outcomes, the txn has {n}",
            bad.len()
        )));
    }
    let results = if per_shard.is_empty() {
        vec![false; n]
    } else {
        mtxn::combine_outcomes(per_shard)
    };
    Ok(mtxn::path(txn, &results))
}

/// What the prepares reported that etcd may refuse a txn for, depending
/// on its path (`PrepareResponse`): keys named by `ignore_value` or
/// `ignore_lease` puts that do not exist, leases named by puts that do not
/// exist, and the compacted revision.
#[derive(Debug, Default, PartialEq)]
pub struct PathChecks {
    missing_keys: BTreeSet<Vec<u8>>,
    missing_leases: BTreeSet<i64>,
    compacted: i64,
}

impl PathChecks {
    fn add(&mut self, p: &PrepareResponse) {
        self.missing_keys.extend(p.missing_keys.iter().cloned());
        self.missing_leases.extend(p.missing_leases.iter().copied());
        self.compacted = self.compacted.max(p.compacted_revision);
    }

    /// Whether a range on `path` names a revision, so that
    /// [`PathChecks::refusal`] needs the current revision.
    pub fn reads_at_a_revision(txn: &TxnRequest, path: &[bool]) -> bool {
        let mut any = false;
        mtxn::ops_along_path(txn, path, &mut |op| {
            if let Some(request_op::Request::RequestRange(r)) = &op.request {
                any |= r.revision > 0;
            }
        });
        any
    }

    /// etcd's refusal of `txn` taking `path` (its `checkRequests`), before
    /// anything is applied: the first put on the path, in order, whose
    /// `ignore_value`/`ignore_lease` key or lease does not exist, else the
    /// first range on the path at a revision above `current` or below the
    /// compacted revision. Ops on branches the txn does not take are not
    /// checked, as in etcd.
    pub fn refusal(&self, txn: &TxnRequest, path: &[bool], current: i64) -> Option<GatewayError> {
        let mut refusal = None;
        mtxn::ops_along_path(txn, path, &mut |op| {
            if let (None, Some(request_op::Request::RequestPut(p))) = (&refusal, &op.request) {
                if (p.ignore_value || p.ignore_lease) && self.missing_keys.contains(&p.key[..]) {
                    refusal = Some(GatewayError::InvalidArgument(MSG_KEY_NOT_FOUND.into()));
                } else if p.lease != 0 && self.missing_leases.contains(&p.lease) {
                    refusal = Some(GatewayError::LeaseNotFound);
                }
            }
        });
        if refusal.is_some() {
            return refusal;
        }
        mtxn::ops_along_path(txn, path, &mut |op| {
            if let (None, Some(request_op::Request::RequestRange(r))) = (&refusal, &op.request) {
                if r.revision > current {
                    refusal = Some(GatewayError::FutureRevision);
                } else if r.revision > 0 && r.revision < self.compacted {
                    refusal = Some(GatewayError::Compacted);
                }
            }
        });
        refusal
    }
}

/// What phase one (prepare) came to.
#[derive(Debug, PartialEq)]
pub enum PhaseOne {
    /// Every shard prepared: their outcomes, in `shards` order, and what
    /// they reported for the path's checks.
    Prepared {
        outcomes: Vec<Vec<CompareOutcome>>,
        checks: PathChecks,
    },
    /// The attempt failed: abort `abort` (shards that prepared or whose
    /// answer was lost), then fail with `error` (retryable or not).
    Failed {
        abort: Vec<u32>,
        error: GatewayError,
    },
}

/// Decides phase one from the prepare results (`results[i]` is from
/// `shards[i]`).
///
/// The reported error is the first definitive refusal if there is one (the
/// client must see it), else the first retryable one. A lost answer is
/// reported as retryable: once its shard is sent an abort, a fresh attempt
/// is safe because the old `txn_id` can never be committed (only the
/// coordinator commits, and it will not).
pub fn phase_one(shards: &[u32], results: Vec<Result<PrepareResponse>>) -> PhaseOne {
    let mut outcomes = Vec::with_capacity(shards.len());
    let mut checks = PathChecks::default();
    let mut abort = Vec::new();
    let mut retryable: Option<GatewayError> = None;
    let mut definitive: Option<GatewayError> = None;
    for (&shard, r) in shards.iter().zip(results) {
        match r {
            Ok(p) => {
                abort.push(shard);
                checks.add(&p);
                outcomes.push(p.outcomes);
            }
            Err(e) if e.is_ambiguous() => {
                abort.push(shard);
                retryable.get_or_insert(GatewayError::ShardUnavailable(e.to_string()));
            }
            Err(e) if e.is_retryable() => {
                retryable.get_or_insert(e);
            }
            Err(e) => {
                definitive.get_or_insert(e);
            }
        }
    }
    match definitive.or(retryable) {
        None => PhaseOne::Prepared { outcomes, checks },
        Some(error) => PhaseOne::Failed { abort, error },
    }
}

impl Backend {
    /// etcd's Txn (see the module docs).
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        check_txn(&req, MAX_TXN_OPS)?;
        let shards = touched_shards(&req, &self.router);
        let mut resp = match shards.as_slice() {
            [] => self.single_shard_txn(req, 0).await,
            [one] => self.single_shard_txn(req, *one).await,
            _ if !mtxn::may_write(&req) => self.read_only_txn(&req, &shards).await,
            _ => self.write_txn(&req, &shards).await,
        }?;
        fill_op_headers(&mut resp);
        Ok(resp)
    }

    async fn single_shard_txn(&self, req: TxnRequest, shard: u32) -> Result<TxnResponse> {
        let mut resp = self
            .retry(|| shards::txn(self.t(), shard, req.clone()))
            .await?;
        resp.header = self.fix_header(resp.header);
        Ok(resp)
    }

    /// A read-only txn over several shards at one snapshot. etcd never
    /// answers a read of "now" as compacted; here the shards evaluate and
    /// read the snapshot at moments apart, so a compaction above it can
    /// land in between. The txn is then taken again at a newer snapshot,
    /// as a multi-shard Range is. A refusal of a read on the path at an
    /// explicit compacted revision is final.
    async fn read_only_txn(&self, req: &TxnRequest, shards: &[u32]) -> Result<TxnResponse> {
        let sreq = shard_txn_request(req).into_owned();
        let mut tries = 0;
        loop {
            let (rev, term) = self.current_revision().await?;
            match self.read_only_txn_at(req, &sreq, shards, rev).await {
                Err(SnapshotRead::Shards(GatewayError::Compacted)) if tries < SNAPSHOT_TRIES => {
                    tries += 1;
                }
                Err(SnapshotRead::Shards(e) | SnapshotRead::Refused(e)) => return Err(e),
                Ok(mut resp) => {
                    let merged_term = resp.header.map(|h| h.raft_term).unwrap_or(0);
                    resp.header = Some(self.header(rev, term.max(merged_term)));
                    return Ok(resp);
                }
            }
        }
    }

    /// One attempt of [`Backend::read_only_txn`] at snapshot `rev`.
    async fn read_only_txn_at(
        &self,
        req: &TxnRequest,
        sreq: &TxnRequest,
        shards: &[u32],
        rev: i64,
    ) -> std::result::Result<TxnResponse, SnapshotRead> {
        let evals = try_join_all(shards.iter().map(|&s| {
            let r = TxnEvaluateRequest {
                txn: Some(sreq.clone()),
                revision: rev,
            };
            self.retry_idempotent(move || shards::txn_evaluate(self.t(), s, r.clone()))
        }))
        .await
        .map_err(SnapshotRead::Shards)?;
        let checks = PathChecks {
            compacted: evals
                .iter()
                .map(|e| e.compacted_revision)
                .max()
                .unwrap_or(0),
            ..PathChecks::default()
        };
        let outcomes: Vec<_> = evals.into_iter().map(|e| e.outcomes).collect();
        let path = decide_path(req, &outcomes).map_err(SnapshotRead::Refused)?;
        // etcd refuses a read on the path above the snapshot's revision, or
        // below the compacted one, before reading anything.
        if let Some(refusal) = checks.refusal(req, &path, rev) {
            return Err(SnapshotRead::Refused(refusal));
        }
        let reads = try_join_all(shards.iter().map(|&s| {
            let r = TxnReadRequest {
                txn: Some(sreq.clone()),
                revision: rev,
                path: path.clone(),
            };
            self.retry_idempotent(move || shards::txn_read(self.t(), s, r.clone()))
        }))
        .await
        .map_err(SnapshotRead::Shards)?;
        let parts = shards
            .iter()
            .zip(reads)
            .map(|(&s, r)| (s, r.txn.unwrap_or_default()))
            .collect();
        merge_txn(req, &path, &self.router, parts).map_err(SnapshotRead::Refused)
    }

    async fn write_txn(&self, req: &TxnRequest, shards: &[u32]) -> Result<TxnResponse> {
        let sreq = shard_txn_request(req).into_owned();
        let mut backoff = self.retry.backoff();
        loop {
            match self.two_phase_commit(req, &sreq, shards).await {
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, "cross-shard txn attempt failed; retrying");
                    if !backoff.wait().await {
                        return Err(GatewayError::RetriesExhausted(Box::new(e)));
                    }
                }
                other => return other,
            }
        }
    }

    /// The txn's path, or etcd's refusal of the txn along it (see
    /// [`PathChecks::refusal`]). A refusal is definitive: nothing was
    /// applied, and a new attempt would meet it again.
    async fn checked_path(
        &self,
        req: &TxnRequest,
        outcomes: &[Vec<CompareOutcome>],
        checks: &PathChecks,
    ) -> Result<Vec<bool>> {
        let path = decide_path(req, outcomes)?;
        let current = if PathChecks::reads_at_a_revision(req, &path) {
            self.current_revision().await?.0
        } else {
            i64::MAX
        };
        match checks.refusal(req, &path, current) {
            Some(refusal) => Err(refusal),
            None => Ok(path),
        }
    }

    /// One 2PC attempt. Returns a retryable error only when nothing was
    /// (or ever will be) committed under this attempt's `txn_id`.
    async fn two_phase_commit(
        &self,
        req: &TxnRequest,
        sreq: &TxnRequest,
        shards: &[u32],
    ) -> Result<TxnResponse> {
        let txn_id: Vec<u8> = rand::random::<[u8; 16]>().to_vec();
        let primary = shards[0];

        // Phase one: prepare everywhere.
        let prepared = join_all(shards.iter().map(|&s| {
            shards::prepare(
                self.t(),
                s,
                PrepareRequest {
                    txn_id: txn_id.clone(),
                    primary,
                    participants: shards.to_vec(),
                    txn: Some(sreq.clone()),
                    revoke_leases: vec![],
                    // The shard sets it as it proposes.
                    floor: 0,
                    revoke_grants: vec![],
                },
            )
        }))
        .await;
        let (outcomes, checks) = match phase_one(shards, prepared) {
            PhaseOne::Prepared { outcomes, checks } => (outcomes, checks),
            PhaseOne::Failed { abort, error } => {
                self.abort_all(&txn_id, &abort).await;
                return Err(error);
            }
        };
        let path = match self.checked_path(req, &outcomes, &checks).await {
            Ok(p) => p,
            Err(e) => {
                self.abort_all(&txn_id, shards).await;
                return Err(e);
            }
        };

        // Phase two: the primary decides.
        let primary_commit = match self.commit_primary(&txn_id, &path, primary).await {
            Ok(c) => c,
            Err(GatewayError::TxnAborted(msg)) => {
                self.abort_all(&txn_id, &shards[1..]).await;
                return Err(GatewayError::TxnAborted(msg));
            }
            Err(e) => return Err(e),
        };
        let rev = if primary_commit.revision > 0 {
            primary_commit.revision
        } else {
            primary_commit
                .txn
                .as_ref()
                .and_then(|t| t.header)
                .map(|h| h.revision)
                .unwrap_or(0)
        };
        if rev <= 0 {
            return Err(GatewayError::RetriesExhausted(Box::new(
                GatewayError::Protocol("the primary committed without a revision".into()),
            )));
        }

        // Phase two: everyone else applies the decision.
        let others = &shards[1..];
        let commits = join_all(
            others
                .iter()
                .map(|&s| self.commit_participant(&txn_id, &path, rev, s)),
        )
        .await;
        // A shard that answers a repeated commit (its first answer was
        // lost, and the retry found it applied) no longer has its results:
        // the txn committed, but its answer cannot be given.
        let mut repeated = primary_commit.repeated.then_some(primary);
        let mut parts = vec![(primary, primary_commit.txn.unwrap_or_default())];
        let mut missing = None;
        for (&s, c) in others.iter().zip(commits) {
            match c {
                Ok(c) => {
                    if c.repeated {
                        repeated.get_or_insert(s);
                    }
                    parts.push((s, c.txn.unwrap_or_default()))
                }
                Err(e) => {
                    tracing::warn!(
                        shard = s,
                        revision = rev,
                        error = %e,
                        "committed txn could not be applied on a participant; it will resolve via the primary"
                    );
                    missing.get_or_insert(e);
                }
            }
        }
        if let Some(e) = missing {
            return Err(GatewayError::RetriesExhausted(Box::new(e)));
        }
        if let Some(shard) = repeated {
            tracing::warn!(
                shard,
                revision = rev,
                "txn committed, but a shard's answer with its results was lost"
            );
            return Err(GatewayError::RetriesExhausted(Box::new(
                GatewayError::ConnectionLost { shard },
            )));
        }
        let mut resp = merge_txn(req, &path, &self.router, parts)?;
        let term = resp.header.map(|h| h.raft_term).unwrap_or(0);
        resp.header = Some(self.header(rev, term));
        Ok(resp)
    }

    /// Commits at the primary (revision 0: the primary picks it). Retries
    /// errors that leave the decision open; `TxnAborted` comes back as is;
    /// anything else means the outcome is unknown.
    async fn commit_primary(
        &self,
        txn_id: &[u8],
        path: &[bool],
        primary: u32,
    ) -> Result<CommitResponse> {
        let mut backoff = self.retry.backoff();
        loop {
            let r = shards::commit(
                self.t(),
                primary,
                CommitRequest {
                    txn_id: txn_id.to_vec(),
                    path: path.to_vec(),
                    revision: 0,
                },
            )
            .await;
            match r {
                Ok(c) => return Ok(c),
                Err(e @ GatewayError::TxnAborted(_)) => return Err(e),
                Err(e) if e.is_retryable() || e.is_ambiguous() => {
                    if !backoff.wait().await {
                        return Err(GatewayError::RetriesExhausted(Box::new(e)));
                    }
                }
                Err(e) => return Err(GatewayError::RetriesExhausted(Box::new(e))),
            }
        }
    }

    /// Applies the primary's decision on one participant, retrying.
    async fn commit_participant(
        &self,
        txn_id: &[u8],
        path: &[bool],
        revision: i64,
        shard: u32,
    ) -> Result<CommitResponse> {
        let mut backoff = self.retry.backoff();
        loop {
            let r = shards::commit(
                self.t(),
                shard,
                CommitRequest {
                    txn_id: txn_id.to_vec(),
                    path: path.to_vec(),
                    revision,
                },
            )
            .await;
            match r {
                Ok(c) => return Ok(c),
                // A participant cannot abort what the primary committed;
                // retrying would not change its answer.
                Err(e @ GatewayError::TxnAborted(_)) => return Err(e),
                Err(e) if e.is_retryable() || e.is_ambiguous() => {
                    if !backoff.wait().await {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Best-effort abort of `txn_id` on `shards`, in parallel. A shard we
    /// cannot reach resolves the intent itself (its primary never commits).
    async fn abort_all(&self, txn_id: &[u8], shards: &[u32]) {
        let results = join_all(shards.iter().map(|&s| {
            shards::abort(
                self.t(),
                s,
                AbortRequest {
                    txn_id: txn_id.to_vec(),
                },
            )
        }))
        .await;
        for (s, r) in shards.iter().zip(results) {
            if let Err(e) = r {
                tracing::debug!(shard = s, error = %e, "abort failed; the shard will resolve the intent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backend, FakeShards};
    use metastore_proto::etcdserverpb::{
        compare, request_op, response_op, Compare, PutRequest, PutResponse, RangeRequest,
        RangeResponse, RequestOp, ResponseHeader, ResponseOp,
    };
    use metastore_proto::mvccpb::KeyValue;
    use metastore_proto::shardpb::{
        shard_request::Body as Req, shard_response::Body as Resp, AbortResponse,
        CurrentRevisionResponse, TxnEvaluateResponse, TxnReadResponse,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn key_on(router: &ShardRouter, shard: u32) -> String {
        (0..1000)
            .map(|i| format!("key{i}"))
            .find(|k| router.shard_of(k.as_bytes()) == shard)
            .unwrap()
    }

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.as_bytes().to_vec().into(),
                value: b"v".to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn get(k: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn cmp_version(k: &str, v: i64) -> Compare {
        Compare {
            key: k.into(),
            target: compare::CompareTarget::Version as i32,
            result: compare::CompareResult::Equal as i32,
            target_union: Some(compare::TargetUnion::Version(v)),
            ..Default::default()
        }
    }
    fn outcome(matched: bool, all_true: bool) -> CompareOutcome {
        CompareOutcome {
            matched,
            all_true,
            zero_result: false,
        }
    }
    fn put_resp() -> ResponseOp {
        ResponseOp {
            response: Some(response_op::Response::ResponsePut(PutResponse::default())),
        }
    }

    #[test]
    fn touched_shards_cover_every_key_and_range() {
        let r = ShardRouter::new(4);
        let (a, b) = (key_on(&r, 1), key_on(&r, 3));
        let t = TxnRequest {
            compare: vec![cmp_version(&a, 0)],
            success: vec![put(&b)],
            failure: vec![],
        };
        assert_eq!(touched_shards(&t, &r), vec![1, 3]);
        let t = TxnRequest {
            compare: vec![],
            success: vec![],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"a".to_vec(),
                    range_end: b"b".to_vec(),
                    ..Default::default()
                })),
            }],
        };
        assert_eq!(touched_shards(&t, &r), vec![0, 1, 2, 3]);
        assert!(touched_shards(&TxnRequest::default(), &r).is_empty());
    }

    #[test]
    fn phase_one_decisions() {
        let ok = || {
            Ok(PrepareResponse {
                outcomes: vec![outcome(true, true)],
                ..Default::default()
            })
        };
        assert_eq!(
            phase_one(&[0, 1], vec![ok(), ok()]),
            PhaseOne::Prepared {
                outcomes: vec![vec![outcome(true, true)], vec![outcome(true, true)]],
                checks: PathChecks::default(),
            }
        );
        // A conflict: abort the shard that prepared; retryable.
        match phase_one(&[0, 2], vec![ok(), Err(GatewayError::Conflict("k".into()))]) {
            PhaseOne::Failed { abort, error } => {
                assert_eq!(abort, vec![0]);
                assert!(error.is_retryable());
            }
            other => panic!("{other:?}"),
        }
        // A lost answer: abort it too; retryable.
        match phase_one(&[0, 2], vec![Err(GatewayError::Timeout { shard: 0 }), ok()]) {
            PhaseOne::Failed { abort, error } => {
                assert_eq!(abort, vec![0, 2]);
                assert!(error.is_retryable());
            }
            other => panic!("{other:?}"),
        }
        // A definitive refusal wins over retryable errors.
        let refused = GatewayError::InvalidArgument("etcdserver: requested lease not found".into());
        match phase_one(
            &[0, 1, 2],
            vec![
                Err(GatewayError::Conflict("x".into())),
                Err(refused.clone()),
                ok(),
            ],
        ) {
            PhaseOne::Failed { abort, error } => {
                assert_eq!(abort, vec![2]);
                assert_eq!(error, refused);
            }
            other => panic!("{other:?}"),
        }
    }

    /// etcd's `checkRequests` along the path: the puts in order (a missing
    /// key of an `ignore_value` put, then an unknown lease), then the
    /// ranges (future, then compacted); ops on the other branch never.
    #[test]
    fn path_checks_refuse_like_etcd_along_the_path_only() {
        let op_put = |key: &str, lease: i64, ignore_value: bool| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec().into(),
                lease,
                ignore_value,
                ..Default::default()
            })),
        };
        let op_range = |revision: i64| RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"r".to_vec(),
                revision,
                ..Default::default()
            })),
        };
        let checks = PathChecks {
            missing_keys: [b"gone".to_vec()].into(),
            missing_leases: [7].into(),
            compacted: 10,
        };
        let txn = |success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
            compare: vec![],
            success,
            failure,
        };
        let key_not_found = GatewayError::InvalidArgument(MSG_KEY_NOT_FOUND.into());
        // The taken branch decides; the other is never looked at.
        let t = txn(vec![op_put("a", 0, false)], vec![op_put("a", 7, false)]);
        assert_eq!(checks.refusal(&t, &[true], 20), None);
        assert_eq!(
            checks.refusal(&t, &[false], 20),
            Some(GatewayError::LeaseNotFound)
        );
        // Puts before ranges, and in op order among the puts.
        let t = txn(
            vec![op_range(30), op_put("gone", 7, true), op_put("b", 7, false)],
            vec![],
        );
        assert_eq!(checks.refusal(&t, &[true], 20), Some(key_not_found));
        let t = txn(vec![op_range(5), op_range(30)], vec![]);
        assert_eq!(
            checks.refusal(&t, &[true], 20),
            Some(GatewayError::Compacted)
        );
        let t = txn(vec![op_range(30), op_range(5)], vec![]);
        assert_eq!(
            checks.refusal(&t, &[true], 20),
            Some(GatewayError::FutureRevision)
        );
        // At the compacted revision, and at the current one, reads are fine.
        let t = txn(
            vec![op_range(10), op_range(20), op_put("gone", 0, false)],
            vec![],
        );
        assert_eq!(checks.refusal(&t, &[true], 20), None);
        assert!(PathChecks::reads_at_a_revision(&t, &[true]));
        assert!(!PathChecks::reads_at_a_revision(&t, &[false]));
    }

    #[test]
    fn decide_path_checks_outcome_counts() {
        let t = TxnRequest {
            compare: vec![cmp_version("a", 0), cmp_version("b", 0)],
            success: vec![],
            failure: vec![],
        };
        let both = vec![
            vec![outcome(true, true), outcome(false, false)],
            vec![outcome(false, false), outcome(true, true)],
        ];
        assert_eq!(decide_path(&t, &both).unwrap(), vec![true]);
        let one_false = vec![
            vec![outcome(true, false), outcome(false, false)],
            vec![outcome(false, false), outcome(true, true)],
        ];
        assert_eq!(decide_path(&t, &one_false).unwrap(), vec![false]);
        assert!(decide_path(&t, &[vec![outcome(true, true)]]).is_err());
    }

    #[tokio::test]
    async fn single_shard_txn_takes_the_fast_path() {
        let fake = FakeShards::new(2, |_, req| match req {
            Req::Txn(_) => Ok(Resp::Txn(TxnResponse {
                header: Some(ResponseHeader {
                    revision: 4,
                    ..Default::default()
                }),
                succeeded: true,
                responses: vec![put_resp()],
            })),
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let k = key_on(&b.router, 1);
        let resp = b
            .txn(TxnRequest {
                compare: vec![cmp_version(&k, 0)],
                success: vec![put(&k)],
                failure: vec![],
            })
            .await
            .unwrap();
        assert_eq!(resp.header.unwrap().revision, 4);
        let calls = fake.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, 1);
    }

    #[tokio::test]
    async fn read_only_txn_overtaken_by_a_compaction_reads_a_newer_snapshot() {
        // A compaction at 31 reaches shard 1 before the evaluation at 30.
        let current = Arc::new(AtomicUsize::new(30));
        let now = current.clone();
        let fake = FakeShards::new(2, move |shard, req| match req {
            Req::CurrentRevision(_) => Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                revision: now.fetch_add(1, Ordering::SeqCst) as i64,
                raft_term: 1,
                ..Default::default()
            })),
            Req::TxnEvaluate(e) if shard == 1 && e.revision < 31 => Err(GatewayError::Compacted),
            Req::TxnEvaluate(_) => {
                // Each shard decides the compare on its own key.
                let mine = outcome(true, true);
                let other = outcome(false, false);
                let outcomes = if shard == 0 {
                    vec![mine, other]
                } else {
                    vec![other, mine]
                };
                Ok(Resp::TxnEvaluate(TxnEvaluateResponse {
                    outcomes,
                    compacted_revision: 31,
                }))
            }
            Req::TxnRead(r) => {
                assert_eq!(r.revision, 31);
                Ok(Resp::TxnRead(TxnReadResponse {
                    txn: Some(TxnResponse {
                        header: None,
                        succeeded: true,
                        responses: vec![ResponseOp {
                            response: Some(response_op::Response::ResponseRange(
                                RangeResponse::default(),
                            )),
                        }],
                    }),
                }))
            }
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake);
        let (k0, k1) = (key_on(&b.router, 0), key_on(&b.router, 1));
        let txn = TxnRequest {
            compare: vec![cmp_version(&k0, 0), cmp_version(&k1, 0)],
            success: vec![get(&k0)],
            failure: vec![],
        };
        let resp = b.txn(txn.clone()).await.unwrap();
        assert_eq!(resp.header.unwrap().revision, 31);
        // A read on the path at an explicit compacted revision stays
        // refused.
        let mut txn = txn;
        if let Some(request_op::Request::RequestRange(r)) = &mut txn.success[0].request {
            r.revision = 20;
        }
        current.store(40, Ordering::SeqCst);
        let e = b.txn(txn).await.unwrap_err();
        assert!(matches!(e, GatewayError::Compacted), "{e:?}");
    }

    #[tokio::test]
    async fn read_only_txn_evaluates_and_reads_at_one_snapshot() {
        let fake = FakeShards::new(2, |shard, req| match req {
            Req::CurrentRevision(_) => Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                revision: 30,
                raft_term: 1,
                ..Default::default()
            })),
            Req::TxnEvaluate(e) => {
                assert_eq!(e.revision, 30);
                // Compare 0 is on shard 0's key, compare 1 on shard 1's;
                // shard 1's key fails.
                let o = if shard == 0 {
                    vec![outcome(true, true), outcome(false, false)]
                } else {
                    vec![outcome(false, false), outcome(true, false)]
                };
                Ok(Resp::TxnEvaluate(TxnEvaluateResponse {
                    outcomes: o,
                    ..Default::default()
                }))
            }
            Req::TxnRead(r) => {
                assert_eq!(r.revision, 30);
                assert_eq!(r.path, vec![false]);
                let kvs = vec![KeyValue {
                    key: format!("s{shard}").into_bytes().into(),
                    ..Default::default()
                }];
                Ok(Resp::TxnRead(TxnReadResponse {
                    txn: Some(TxnResponse {
                        header: None,
                        succeeded: false,
                        responses: vec![ResponseOp {
                            response: Some(response_op::Response::ResponseRange(RangeResponse {
                                header: None,
                                count: 1,
                                more: false,
                                kvs,
                            })),
                        }],
                    }),
                }))
            }
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let (k0, k1) = (key_on(&b.router, 0), key_on(&b.router, 1));
        let resp = b
            .txn(TxnRequest {
                compare: vec![cmp_version(&k0, 0), cmp_version(&k1, 0)],
                success: vec![get(&k0)],
                failure: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: b"s".to_vec(),
                        range_end: b"t".to_vec(),
                        ..Default::default()
                    })),
                }],
            })
            .await
            .unwrap();
        assert!(!resp.succeeded);
        assert_eq!(resp.header.unwrap().revision, 30);
        match &resp.responses[0].response {
            Some(response_op::Response::ResponseRange(r)) => {
                assert_eq!(r.count, 2);
                assert_eq!(&r.kvs[0].key[..], b"s0");
                assert_eq!(&r.kvs[1].key[..], b"s1");
            }
            other => panic!("{other:?}"),
        }
        assert!(!fake
            .calls()
            .iter()
            .any(|(_, r)| matches!(r, Req::Prepare(_) | Req::Commit(_))));
    }

    /// A scripted 2PC shard set over 2 shards. `conflicts` prepares on
    /// shard 1 answer CONFLICT first; `primary_aborts` primary commits
    /// answer TXN_ABORTED first.
    fn two_pc_fake(conflicts: usize, primary_aborts: usize) -> FakeShards {
        let conflicts = Arc::new(AtomicUsize::new(conflicts));
        let aborts = Arc::new(AtomicUsize::new(primary_aborts));
        FakeShards::new(2, move |shard, req| match req {
            Req::Prepare(p) => {
                assert_eq!(p.primary, 0);
                assert_eq!(p.participants, vec![0, 1]);
                assert_eq!(p.txn_id.len(), 16);
                if shard == 1
                    && conflicts
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    return Err(GatewayError::Conflict("locked".into()));
                }
                Ok(Resp::Prepare(PrepareResponse {
                    outcomes: vec![outcome(shard == 0, true)],
                    ..Default::default()
                }))
            }
            Req::Commit(c) => {
                assert_eq!(c.path, vec![true]);
                if shard == 0 {
                    assert_eq!(c.revision, 0, "the primary picks the revision");
                    if aborts
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return Err(GatewayError::TxnAborted("resolved".into()));
                    }
                } else {
                    assert_eq!(c.revision, 77);
                }
                Ok(Resp::Commit(CommitResponse {
                    txn: Some(TxnResponse {
                        header: Some(ResponseHeader {
                            revision: 77,
                            raft_term: 5,
                            ..Default::default()
                        }),
                        succeeded: true,
                        responses: vec![
                            ResponseOp {
                                response: Some(response_op::Response::ResponsePut(PutResponse {
                                    header: None,
                                    prev_kv: (shard == 0).then(|| KeyValue {
                                        value: b"old".to_vec().into(),
                                        ..Default::default()
                                    }),
                                })),
                            },
                            put_resp(),
                        ],
                    }),
                    revision: 77,
                    repeated: false,
                }))
            }
            Req::Abort(_) => Ok(Resp::Abort(AbortResponse {})),
            other => panic!("unexpected {other:?}"),
        })
    }

    fn two_shard_write(b: &Backend) -> TxnRequest {
        let (k0, k1) = (key_on(&b.router, 0), key_on(&b.router, 1));
        TxnRequest {
            compare: vec![cmp_version(&k0, 1)],
            success: vec![put(&k0), put(&k1)],
            failure: vec![],
        }
    }

    fn kinds(fake: &FakeShards) -> Vec<(u32, &'static str)> {
        fake.calls()
            .into_iter()
            .map(|(s, r)| {
                let k = match r {
                    Req::Prepare(_) => "prepare",
                    Req::Commit(_) => "commit",
                    Req::Abort(_) => "abort",
                    _ => "other",
                };
                (s, k)
            })
            .collect()
    }

    #[tokio::test]
    async fn two_phase_commit_primary_first_then_participants() {
        let fake = two_pc_fake(0, 0);
        let b = backend(fake.clone());
        let resp = b.txn(two_shard_write(&b)).await.unwrap();
        assert!(resp.succeeded);
        let h = resp.header.unwrap();
        assert_eq!((h.revision, h.raft_term), (77, 5));
        assert_eq!(h.member_id, crate::testing::MEMBER);
        match &resp.responses[0].response {
            Some(response_op::Response::ResponsePut(p)) => {
                assert_eq!(&p.prev_kv.as_ref().unwrap().value[..], b"old")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            kinds(&fake),
            vec![(0, "prepare"), (1, "prepare"), (0, "commit"), (1, "commit")]
        );
    }

    #[tokio::test]
    async fn conflict_aborts_the_prepared_and_retries_with_a_new_id() {
        let fake = two_pc_fake(2, 0);
        let b = backend(fake.clone());
        let resp = b.txn(two_shard_write(&b)).await.unwrap();
        assert_eq!(resp.header.unwrap().revision, 77);
        assert_eq!(
            kinds(&fake),
            vec![
                (0, "prepare"),
                (1, "prepare"),
                (0, "abort"),
                (0, "prepare"),
                (1, "prepare"),
                (0, "abort"),
                (0, "prepare"),
                (1, "prepare"),
                (0, "commit"),
                (1, "commit"),
            ]
        );
        let ids: BTreeSet<Vec<u8>> = fake
            .calls()
            .into_iter()
            .filter_map(|(_, r)| match r {
                Req::Prepare(p) => Some(p.txn_id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 3, "every attempt has its own txn id");
    }

    #[tokio::test]
    async fn primary_abort_restarts_the_transaction() {
        let fake = two_pc_fake(0, 1);
        let b = backend(fake.clone());
        b.txn(two_shard_write(&b)).await.unwrap();
        assert_eq!(
            kinds(&fake),
            vec![
                (0, "prepare"),
                (1, "prepare"),
                (0, "commit"),
                (1, "abort"),
                (0, "prepare"),
                (1, "prepare"),
                (0, "commit"),
                (1, "commit"),
            ]
        );
    }

    #[tokio::test]
    async fn endless_conflicts_time_out() {
        let fake = two_pc_fake(usize::MAX, 0);
        let mut b = backend(fake);
        b.retry.budget = std::time::Duration::from_millis(50);
        let e = b.txn(two_shard_write(&b)).await.unwrap_err();
        assert_eq!(e.to_status().code(), tonic::Code::Unavailable);
        assert_eq!(e.to_status().message(), "etcdserver: request timed out");
    }

    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_is_completed_and_answered_as_timed_out() {
        // The primary's first commit answer is lost; the retry finds it
        // applied (a repeat, without the txn's results).
        let lost = Arc::new(AtomicUsize::new(1));
        let fake = FakeShards::new(2, move |shard, r| match r {
            Req::Prepare(_) => Ok(Resp::Prepare(PrepareResponse {
                outcomes: vec![outcome(shard == 0, true)],
                ..Default::default()
            })),
            Req::Commit(c) if shard == 0 => {
                if lost
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(GatewayError::ConnectionLost { shard });
                }
                assert_eq!(c.revision, 0);
                Ok(Resp::Commit(CommitResponse {
                    txn: Some(TxnResponse::default()),
                    revision: 77,
                    repeated: true,
                }))
            }
            Req::Commit(c) => {
                assert_eq!(c.revision, 77);
                Ok(Resp::Commit(CommitResponse {
                    txn: Some(TxnResponse {
                        succeeded: true,
                        responses: vec![put_resp(), put_resp()],
                        ..Default::default()
                    }),
                    revision: 77,
                    repeated: false,
                }))
            }
            Req::Abort(_) => panic!("a committed txn is never aborted"),
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let e = b.txn(two_shard_write(&b)).await.unwrap_err();
        assert!(matches!(e, GatewayError::RetriesExhausted(_)), "{e:?}");
        assert_eq!(e.to_status().code(), tonic::Code::Unavailable);
        // The participant applied the decision all the same.
        let k = kinds(&fake);
        assert!(k.contains(&(1, "commit")), "{k:?}");
    }

    #[tokio::test]
    async fn lost_primary_commit_is_never_retried_as_a_new_attempt() {
        // Phase one passes; every commit times out (outcome unknown).
        let fake = FakeShards::new(2, |shard, r| match r {
            Req::Prepare(_) => Ok(Resp::Prepare(PrepareResponse {
                outcomes: vec![outcome(shard == 0, true)],
                ..Default::default()
            })),
            Req::Commit(_) => Err(GatewayError::Timeout { shard }),
            Req::Abort(_) => Ok(Resp::Abort(AbortResponse {})),
            other => panic!("unexpected {other:?}"),
        });
        let mut b = backend(fake.clone());
        b.retry.budget = std::time::Duration::from_millis(50);
        let e = b.txn(two_shard_write(&b)).await.unwrap_err();
        assert!(matches!(e, GatewayError::RetriesExhausted(_)), "{e:?}");
        assert_eq!(e.to_status().code(), tonic::Code::Unavailable);
        let k = kinds(&fake);
        assert_eq!(
            k.iter().filter(|(_, k)| *k == "prepare").count(),
            2,
            "only one attempt once the commit was sent"
        );
        assert!(
            !k.iter().any(|(_, k)| *k == "abort"),
            "a maybe-committed txn is never aborted"
        );
        assert!(k.iter().all(|(s, k)| *k != "commit" || *s == 0));
    }
}
