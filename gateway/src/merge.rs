//! Pure functions that merge per-shard answers into one etcd answer.
//!
//! Keys are hash-placed, so any key range may hold keys of every shard. A
//! range read is scattered to all shards *at one revision* and gathered
//! here. Nothing in this module does I/O; everything is deterministic and
//! unit-tested.
//!
//! # Range merge ([`merge_range`])
//!
//! Each shard answers the same `RangeRequest` over the keys it owns, with
//! etcd's own rules already applied to its part: revision filters,
//! `keys_only`, `count_only`, its own sort, and truncation to `limit` (plus
//! its own `more`). The merge:
//!
//! 1. concatenates the shards' kvs and orders them like etcd: the effective
//!    order is the request's, except that a non-KEY sort target with order
//!    NONE sorts ASCEND (etcd does the same), and NONE/KEY is key order. The
//!    kvs are first put in key order, then *stably* sorted by the target, so
//!    ties come out in key order. In key order (either direction) every
//!    shard's kvs arrive in that order already, so they are merged head by
//!    head up to `limit` instead of sorted;
//! 2. `count` = the sum of the shards' counts (shards own disjoint keys);
//! 3. truncates to `limit` (when > 0); `more` = truncated here, or any
//!    shard reported `more`. This is exact: a shard that had more than
//!    `limit` keys implies the union has more than `limit`, and since every
//!    shard returned its own first `limit` keys in the same order, the first
//!    `limit` of the union are among them;
//! 4. `keys_only` strips values *after* sorting (a VALUE sort needs them:
//!    the gateway asks shards for values in that case, see
//!    [`shard_range_request`]).
//!
//! The header is the first shard's, with `revision` and `raft_term` the
//! maximum over shards; callers overwrite what they know better (the
//! snapshot revision, the cluster/member ids).
//!
//! # Pages in budgets ([`page_budget`], [`continuations`])
//!
//! With a `limit` of L over N shards, the merge keeps about L / N kvs of
//! each shard, yet any one shard may hold the whole page: asking each for
//! its first L kvs makes the shards read, encode and send, and the gateway
//! decode, N times what the answer holds (a paginated list over 2 shards
//! twice its page, over 16 shards sixteen times). Keys are hash-placed, so
//! how many of a shard's kvs the merge keeps is binomial (L, 1/N). In key
//! order the gateway therefore asks each shard for its first
//! `L/N + 3σ + 2` kvs only (its budget), with the shard's own `count` and
//! `more` as usual. A shard that stopped at its budget (`more`) may still
//! own keys of the page: that is so exactly when fewer than L kvs of all
//! the answers come up to its last one. For each such shard, one more
//! request at the same revision reads on from its last key, as many kvs
//! as the page can still take from it; after that every shard has sent
//! all it can contribute. That second request is the rare case (about 1 in
//! 1,000 pages at the 3σ margin, more often for a skewed key set); the
//! answer is the same either way: `count` is each shard's whole count, and
//! a shard's `more` still means it holds matching keys beyond those sent.
//!
//! # Txn merge ([`merge_txn`])
//!
//! In a cross-shard txn every shard answers *every* op on the taken path,
//! positionally aligned with the request: ops on keys it does not own get an
//! empty response of the right kind. The merge walks the request along the
//! path (`metastore_proto::txn::path` order: a node's own bit, then its
//! nested txns in op order) and merges position by position:
//!
//! - `succeeded` is the node's path bit;
//! - Range: as above, with that op's `RangeRequest`;
//! - Put: the owning shard's response (`router.shard_of(key)`), which is
//!   the only one that can carry a `prev_kv`;
//! - DeleteRange: `deleted` summed, `prev_kvs` merged in key order;
//! - nested Txn: recurse with the nested request and the next path bits.
//!
//! A shard answer that does not line up (wrong length, wrong kind) is a
//! protocol error, never silently dropped.
//!
//! # Headers of a txn's op responses ([`fill_op_headers`])
//!
//! etcd gives each op response of a txn a header of its own carrying only
//! a revision, and clients read it: etcd's STM (`clientv3/concurrency`)
//! pins its later reads to the revision of its first read's range
//! response, and dereferences that header to do so. The revision is the
//! one the op saw, in etcd's numbering of a write: the txn's revision for
//! a put, and for a range or a delete once anything in the txn has changed
//! (etcd's `storeTxnWrite`); before that, the revision the txn started
//! from, which is one below its own (what a read at that revision sees is
//! exactly what came before the txn). A txn that changed nothing reports
//! its read revision everywhere. A nested txn's response carries an empty
//! header, as etcd's does. Shards leave these headers out; the gateway
//! fills them once the whole answer is known.

use metastore_proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    request_op, response_op, DeleteRangeResponse, PutResponse, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::KeyValue;
use metastore_proto::range;
use metastore_proto::router::ShardRouter;
use std::borrow::Cow;
use std::cmp::Ordering;

use crate::error::{GatewayError, Result};

/// The (target, order) etcd actually sorts by for `req`; order NONE means
/// key order (the natural order of a range).
pub fn effective_sort(req: &RangeRequest) -> (SortTarget, SortOrder) {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        (target, SortOrder::Ascend)
    } else {
        (target, order)
    }
}

fn cmp_target(a: &KeyValue, b: &KeyValue, target: SortTarget) -> Ordering {
    match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.cmp(&b.version),
        SortTarget::Create => a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => a.value.cmp(&b.value),
    }
}

/// Orders `kvs` by a target other than the key, as etcd answers such a
/// sort: stably, so ties stay in key order. (Key order needs no sort: see
/// [`merge_key_runs`].)
fn sort_by_target(kvs: &mut [KeyValue], target: SortTarget, order: SortOrder) {
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    if order == SortOrder::Descend {
        kvs.sort_by(|a, b| cmp_target(b, a, target));
    } else {
        kvs.sort_by(|a, b| cmp_target(a, b, target));
    }
}

/// The first `take` kvs of `runs` merged by key, ascending (`descending`:
/// descending); each run is in that order already and no key is in two
/// runs (a key lives on one shard). Compares about `take` heads instead of
/// sorting every kv the shards sent.
fn merge_key_runs(mut runs: Vec<Vec<KeyValue>>, take: usize, descending: bool) -> Vec<KeyValue> {
    let total: usize = runs.iter().map(Vec::len).sum();
    if runs.len() == 1 {
        let mut run = runs.pop().unwrap_or_default();
        run.truncate(take);
        return run;
    }
    let mut next = vec![0usize; runs.len()];
    let mut out = Vec::with_capacity(total.min(take));
    while out.len() < take {
        let mut best: Option<usize> = None;
        for (i, run) in runs.iter().enumerate() {
            let Some(kv) = run.get(next[i]) else { continue };
            let better = match best {
                None => true,
                Some(b) => {
                    let o = kv.key.cmp(&runs[b][next[b]].key);
                    if descending {
                        o == Ordering::Greater
                    } else {
                        o == Ordering::Less
                    }
                }
            };
            if better {
                best = Some(i);
            }
        }
        let Some(b) = best else { break };
        out.push(std::mem::take(&mut runs[b][next[b]]));
        next[b] += 1;
    }
    debug_assert!(out.windows(2).all(|w| if descending {
        w[0].key > w[1].key
    } else {
        w[0].key < w[1].key
    }));
    out
}

/// Whether the shards must be asked for values the client did not ask for:
/// `keys_only` with a VALUE sort (the merge sorts by value, then strips).
pub fn needs_values_for_sort(req: &RangeRequest) -> bool {
    let (target, order) = effective_sort(req);
    req.keys_only && target == SortTarget::Value && order != SortOrder::None
}

/// Whether etcd answers `req` from its first `limit + 1` keys only, sorted
/// afterwards: a sort target other than the key with *no* order, a limit,
/// and no revision filter. etcd decides to read every key from the
/// requested order, but sorts by the effective one (ascending), so such a
/// range returns the smallest of the first `limit + 1` keys' targets, not
/// of all keys. The shards' own answers follow the same rule; across
/// shards the merge rebuilds it (see [`shard_range_request`]).
fn sorts_first_page_only(req: &RangeRequest) -> bool {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    target != SortTarget::Key && !req.count_only && range::reads_first_page_only(req)
}

/// The range request to send to each shard for a scatter of `req`. For a
/// range etcd sorts after taking its first `limit + 1` keys
/// ([`sorts_first_page_only`]), each shard sends its first `limit + 1`
/// keys in key order, unsorted: the merge takes the first `limit + 1` of
/// all of them and sorts those.
pub fn shard_range_request(req: &RangeRequest) -> Cow<'_, RangeRequest> {
    if sorts_first_page_only(req) {
        Cow::Owned(RangeRequest {
            sort_target: SortTarget::Key as i32,
            limit: req.limit.saturating_add(1),
            keys_only: req.keys_only && !needs_values_for_sort(req),
            ..req.clone()
        })
    } else if needs_values_for_sort(req) {
        Cow::Owned(RangeRequest {
            keys_only: false,
            ..req.clone()
        })
    } else {
        Cow::Borrowed(req)
    }
}

/// The txn request to send to shards for a cross-shard txn: like
/// [`shard_range_request`] for every range op in the tree. Compares and
/// writes are untouched.
pub fn shard_txn_request(txn: &TxnRequest) -> Cow<'_, TxnRequest> {
    fn needs(txn: &TxnRequest) -> bool {
        txn.success
            .iter()
            .chain(txn.failure.iter())
            .any(|op| match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    matches!(shard_range_request(r), Cow::Owned(_))
                }
                Some(request_op::Request::RequestTxn(t)) => needs(t),
                _ => false,
            })
    }
    fn rewrite_ops(ops: &[RequestOp]) -> Vec<RequestOp> {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestRange(r)) => RequestOp {
                    request: Some(request_op::Request::RequestRange(
                        shard_range_request(r).into_owned(),
                    )),
                },
                Some(request_op::Request::RequestTxn(t)) => RequestOp {
                    request: Some(request_op::Request::RequestTxn(rewrite(t))),
                },
                _ => op.clone(),
            })
            .collect()
    }
    fn rewrite(txn: &TxnRequest) -> TxnRequest {
        TxnRequest {
            compare: txn.compare.clone(),
            success: rewrite_ops(&txn.success),
            failure: rewrite_ops(&txn.failure),
        }
    }
    if needs(txn) {
        Cow::Owned(rewrite(txn))
    } else {
        Cow::Borrowed(txn)
    }
}

/// The first header, with the maximum revision and raft term of all.
pub fn merge_headers<'a>(
    headers: impl IntoIterator<Item = Option<&'a ResponseHeader>>,
) -> Option<ResponseHeader> {
    let mut out: Option<ResponseHeader> = None;
    for h in headers.into_iter().flatten() {
        match &mut out {
            None => out = Some(*h),
            Some(o) => {
                o.revision = o.revision.max(h.revision);
                o.raft_term = o.raft_term.max(h.raft_term);
            }
        }
    }
    out
}

/// Merges the shards' answers to one `RangeRequest` (see the module docs).
pub fn merge_range(req: &RangeRequest, parts: Vec<RangeResponse>) -> RangeResponse {
    let header = merge_headers(parts.iter().map(|p| p.header.as_ref()));
    let mut count = 0;
    let mut more = false;
    let total: usize = parts.iter().map(|p| p.kvs.len()).sum();
    let limit = usize::try_from(req.limit).ok().filter(|&l| l > 0);
    let mut runs = Vec::with_capacity(parts.len());
    for p in parts {
        count += p.count;
        more |= p.more;
        runs.push(p.kvs);
    }
    let mut kvs = match effective_sort(req) {
        // The shards sent their first `limit + 1` keys in key order.
        (target, order) if sorts_first_page_only(req) => {
            let take = limit.map_or(usize::MAX, |l| l.saturating_add(1));
            let mut kvs = merge_key_runs(runs, take, false);
            sort_by_target(&mut kvs, target, order);
            // `more` as etcd: the first page had a key past the limit.
            more = limit.is_some_and(|l| kvs.len() > l);
            kvs
        }
        // Every shard answers in this order already: merge the runs,
        // stopping at the limit.
        (SortTarget::Key, order) => merge_key_runs(
            runs,
            limit.unwrap_or(usize::MAX),
            order == SortOrder::Descend,
        ),
        (target, order) => {
            let mut kvs = Vec::with_capacity(total);
            for run in runs {
                kvs.extend(run);
            }
            sort_by_target(&mut kvs, target, order);
            kvs
        }
    };
    if let Some(limit) = limit {
        if total > limit {
            kvs.truncate(limit);
            more = true;
        }
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    if req.count_only {
        kvs.clear();
    }
    RangeResponse {
        header,
        kvs,
        more,
        count,
    }
}

/// How many kvs each of `shards` shards should send for a scatter of
/// `req` (its `limit`; see "Pages in budgets"), or `None` when each must
/// send its first `limit`: no limit, a single shard, a sort by anything
/// but the key, or a count only.
pub fn page_budget(req: &RangeRequest, shards: usize) -> Option<i64> {
    if shards < 2 || req.limit <= 0 || req.count_only {
        return None;
    }
    if effective_sort(req).0 != SortTarget::Key {
        return None;
    }
    let limit = req.limit as f64;
    let p = 1.0 / shards as f64;
    let budget = (limit * p + 3.0 * (limit * p * (1.0 - p)).sqrt()).ceil() as i64 + 2;
    (budget < req.limit).then_some(budget)
}

/// For the answers `parts` to a budgeted scatter of `req` (each shard was
/// sent `shard_req` with its budget as the limit): the requests that read
/// on from each shard that stopped at its budget short of the page's end,
/// with the index of its part. Empty when the page is complete.
pub fn continuations(
    req: &RangeRequest,
    shard_req: &RangeRequest,
    parts: &[RangeResponse],
) -> Vec<(usize, RangeRequest)> {
    let descending = effective_sort(req).1 == SortOrder::Descend;
    // In the answers' order: `a` comes no later than `b`.
    let up_to = |a: &[u8], b: &[u8]| if descending { a >= b } else { a <= b };
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let Some(last) = part.kvs.last().filter(|_| part.more) else {
            continue;
        };
        // How many kvs of all the answers come up to this one's last.
        let before: usize = parts
            .iter()
            .map(|p| p.kvs.partition_point(|kv| up_to(&kv.key, &last.key)))
            .sum();
        let room = (req.limit as usize).saturating_sub(before);
        if room == 0 {
            continue;
        }
        let mut next = RangeRequest {
            limit: room as i64,
            ..shard_req.clone()
        };
        if descending {
            next.range_end = last.key.to_vec();
        } else {
            next.key = last.key.to_vec();
            next.key.push(0);
        }
        out.push((i, next));
    }
    out
}

/// Appends `next`, the answer to a continuation of `part`, to it.
pub fn continue_part(part: &mut RangeResponse, next: RangeResponse) {
    part.kvs.extend(next.kvs);
    part.more = next.more;
}

/// Merges the shards' answers to one DeleteRange: counts summed, previous
/// kvs in key order.
pub fn merge_delete(parts: Vec<DeleteRangeResponse>) -> DeleteRangeResponse {
    let header = merge_headers(parts.iter().map(|p| p.header.as_ref()));
    let mut deleted = 0;
    let mut prev_kvs = Vec::new();
    for p in parts {
        deleted += p.deleted;
        prev_kvs.extend(p.prev_kvs);
    }
    prev_kvs.sort_by(|a, b| a.key.cmp(&b.key));
    DeleteRangeResponse {
        header,
        deleted,
        prev_kvs,
    }
}

/// Picks the owner's answer to a Put (falling back to whichever carries a
/// `prev_kv`, then the first).
pub fn merge_put(key: &[u8], router: &ShardRouter, parts: Vec<(u32, PutResponse)>) -> PutResponse {
    let owner = router.shard_of(key);
    let idx = parts
        .iter()
        .position(|(s, _)| *s == owner)
        .or_else(|| parts.iter().position(|(_, p)| p.prev_kv.is_some()))
        .unwrap_or(0);
    parts
        .into_iter()
        .nth(idx)
        .map(|(_, p)| p)
        .unwrap_or_default()
}

/// Merges the shards' answers to one cross-shard txn taken along `path`
/// (see the module docs). `parts` pairs each answer with its shard id.
pub fn merge_txn(
    req: &TxnRequest,
    path: &[bool],
    router: &ShardRouter,
    parts: Vec<(u32, TxnResponse)>,
) -> Result<TxnResponse> {
    if parts.is_empty() {
        return Err(GatewayError::Protocol("no shard answered the txn".into()));
    }
    let mut pos = 0;
    let out = merge_txn_node(req, path, &mut pos, router, parts)?;
    if pos != path.len() {
        return Err(GatewayError::Protocol(format!(
            "txn path has {} entries, the request used {pos}",
            path.len()
        )));
    }
    Ok(out)
}

fn merge_txn_node(
    req: &TxnRequest,
    path: &[bool],
    pos: &mut usize,
    router: &ShardRouter,
    parts: Vec<(u32, TxnResponse)>,
) -> Result<TxnResponse> {
    let succeeded = *path
        .get(*pos)
        .ok_or_else(|| GatewayError::Protocol("txn path too short".into()))?;
    *pos += 1;
    let branch = if succeeded {
        &req.success
    } else {
        &req.failure
    };
    for (shard, p) in &parts {
        if p.responses.len() != branch.len() {
            return Err(GatewayError::Protocol(format!(
                "shard {shard} answered {} txn ops, expected {}",
                p.responses.len(),
                branch.len()
            )));
        }
    }
    let header = merge_headers(parts.iter().map(|(_, p)| p.header.as_ref()));
    // Column-major: for op i, every shard's i-th response.
    let mut columns: Vec<Vec<(u32, Option<response_op::Response>)>> = (0..branch.len())
        .map(|_| Vec::with_capacity(parts.len()))
        .collect();
    for (shard, p) in parts {
        for (i, r) in p.responses.into_iter().enumerate() {
            columns[i].push((shard, r.response));
        }
    }
    let mut responses = Vec::with_capacity(branch.len());
    for (op, column) in branch.iter().zip(columns) {
        let merged = merge_op(op, path, pos, router, column)?;
        responses.push(ResponseOp { response: merged });
    }
    Ok(TxnResponse {
        header,
        succeeded,
        responses,
    })
}

fn mismatch(shard: u32, wanted: &str) -> GatewayError {
    GatewayError::Protocol(format!(
        "shard {shard} answered a txn op with the wrong kind (wanted {wanted})"
    ))
}

fn merge_op(
    op: &RequestOp,
    path: &[bool],
    pos: &mut usize,
    router: &ShardRouter,
    column: Vec<(u32, Option<response_op::Response>)>,
) -> Result<Option<response_op::Response>> {
    use response_op::Response as R;
    Ok(match &op.request {
        Some(request_op::Request::RequestRange(r)) => {
            let mut v = Vec::with_capacity(column.len());
            for (s, resp) in column {
                match resp {
                    Some(R::ResponseRange(x)) => v.push(x),
                    _ => return Err(mismatch(s, "range")),
                }
            }
            Some(R::ResponseRange(merge_range(r, v)))
        }
        Some(request_op::Request::RequestPut(p)) => {
            let mut v = Vec::with_capacity(column.len());
            for (s, resp) in column {
                match resp {
                    Some(R::ResponsePut(x)) => v.push((s, x)),
                    _ => return Err(mismatch(s, "put")),
                }
            }
            Some(R::ResponsePut(merge_put(&p.key, router, v)))
        }
        Some(request_op::Request::RequestDeleteRange(_)) => {
            let mut v = Vec::with_capacity(column.len());
            for (s, resp) in column {
                match resp {
                    Some(R::ResponseDeleteRange(x)) => v.push(x),
                    _ => return Err(mismatch(s, "delete_range")),
                }
            }
            Some(R::ResponseDeleteRange(merge_delete(v)))
        }
        Some(request_op::Request::RequestTxn(nested)) => {
            let mut v = Vec::with_capacity(column.len());
            for (s, resp) in column {
                match resp {
                    Some(R::ResponseTxn(x)) => v.push((s, x)),
                    _ => return Err(mismatch(s, "txn")),
                }
            }
            Some(R::ResponseTxn(merge_txn_node(
                nested, path, pos, router, v,
            )?))
        }
        // An empty op gets an empty answer, as in etcd.
        None => None,
    })
}

/// Fills the header of every op response in `resp` (see the module docs),
/// from `resp`'s own header revision: the txn's revision if it changed
/// anything, else the revision it read at.
pub fn fill_op_headers(resp: &mut TxnResponse) {
    fn changes(resp: &TxnResponse) -> bool {
        resp.responses.iter().any(|r| match &r.response {
            Some(response_op::Response::ResponsePut(_)) => true,
            Some(response_op::Response::ResponseDeleteRange(d)) => d.deleted > 0,
            Some(response_op::Response::ResponseTxn(t)) => changes(t),
            _ => false,
        })
    }
    fn fill(resp: &mut TxnResponse, rev: i64, changed: &mut bool) {
        let header = |rev: i64| {
            Some(ResponseHeader {
                revision: rev,
                ..Default::default()
            })
        };
        for r in &mut resp.responses {
            match &mut r.response {
                Some(response_op::Response::ResponseRange(x)) => {
                    x.header = header(if *changed { rev } else { rev - 1 });
                }
                Some(response_op::Response::ResponsePut(x)) => {
                    *changed = true;
                    x.header = header(rev);
                }
                Some(response_op::Response::ResponseDeleteRange(x)) => {
                    *changed |= x.deleted > 0;
                    x.header = header(if *changed { rev } else { rev - 1 });
                }
                Some(response_op::Response::ResponseTxn(x)) => {
                    x.header = Some(ResponseHeader::default());
                    fill(x, rev, changed);
                }
                None => {}
            }
        }
    }
    let rev = resp.header.as_ref().map_or(0, |h| h.revision);
    // A txn that changes nothing read at `rev` throughout: walk it as if
    // changed from the start, so every op reports `rev` itself.
    let mut changed = !changes(resp);
    fill(resp, rev, &mut changed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    /// A txn response with `ops` (`r` range, `p` put, `d` delete of
    /// nothing, `D` delete of a key, `(` … `)` a nested txn) at `rev`.
    fn txn_response(ops: &str, rev: i64) -> TxnResponse {
        fn node(ops: &mut std::str::Chars<'_>) -> TxnResponse {
            use response_op::Response as R;
            let mut responses = Vec::new();
            while let Some(c) = ops.next() {
                let r = match c {
                    'r' => R::ResponseRange(RangeResponse::default()),
                    'p' => R::ResponsePut(PutResponse::default()),
                    'd' | 'D' => R::ResponseDeleteRange(DeleteRangeResponse {
                        deleted: (c == 'D') as i64,
                        ..Default::default()
                    }),
                    '(' => R::ResponseTxn(node(ops)),
                    ')' => break,
                    other => panic!("op {other}"),
                };
                responses.push(ResponseOp { response: Some(r) });
            }
            TxnResponse {
                responses,
                ..Default::default()
            }
        }
        let mut resp = node(&mut ops.chars());
        resp.header = Some(ResponseHeader {
            revision: rev,
            member_id: 7,
            ..Default::default()
        });
        resp
    }

    /// Each op response's header revision, in order, nested txns in
    /// brackets with their own header's revision first.
    fn op_revisions(resp: &TxnResponse) -> String {
        use response_op::Response as R;
        let rev = |h: &Option<ResponseHeader>| {
            let h = h.as_ref().expect("every op response has a header");
            assert_eq!((h.member_id, h.cluster_id, h.raft_term), (0, 0, 0));
            h.revision.to_string()
        };
        resp.responses
            .iter()
            .map(|r| match r.response.as_ref().unwrap() {
                R::ResponseRange(x) => rev(&x.header),
                R::ResponsePut(x) => rev(&x.header),
                R::ResponseDeleteRange(x) => rev(&x.header),
                R::ResponseTxn(x) => format!("[{} {}]", rev(&x.header), op_revisions(x)),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn txn_op_headers_carry_the_revision_each_op_saw() {
        // (ops, the txn's header revision, each op's revision as etcd's)
        let cases = [
            // Before the first change: the revision the txn started from.
            ("rprdr", 10, "9 10 10 10 10"),
            ("dDr", 10, "9 10 10"),
            ("r(rp)r", 10, "9 [0 9 10] 10"),
            ("(D)r", 10, "[0 10] 10"),
            // Nothing changed: the read revision throughout.
            ("rdr", 7, "7 7 7"),
            ("r(r)", 7, "7 [0 7]"),
            ("", 7, ""),
        ];
        for (ops, rev, want) in cases {
            let mut resp = txn_response(ops, rev);
            fill_op_headers(&mut resp);
            assert_eq!(op_revisions(&resp), want, "{ops} at {rev}");
            assert_eq!(
                resp.header.unwrap().member_id,
                7,
                "the txn's own header kept"
            );
        }
    }

    fn kv(key: &str, value: &str, create: i64, modr: i64, version: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            create_revision: create,
            mod_revision: modr,
            version,
            lease: 0,
        }
    }

    fn part(kvs: Vec<KeyValue>, count: i64, more: bool, rev: i64) -> RangeResponse {
        RangeResponse {
            header: Some(ResponseHeader {
                revision: rev,
                raft_term: rev as u64,
                ..Default::default()
            }),
            kvs,
            more,
            count,
        }
    }

    fn keys(r: &RangeResponse) -> Vec<String> {
        r.kvs
            .iter()
            .map(|k| String::from_utf8(k.key.to_vec()).unwrap())
            .collect()
    }

    /// Two shards' worth of keys:
    /// key  value create mod version
    /// a    z     1      9   3
    /// b    y     2      8   1
    /// c    x     3      7   2
    /// d    w     4      6   4
    fn shard_parts() -> Vec<RangeResponse> {
        vec![
            part(
                vec![kv("a", "z", 1, 9, 3), kv("d", "w", 4, 6, 4)],
                2,
                false,
                10,
            ),
            part(
                vec![kv("b", "y", 2, 8, 1), kv("c", "x", 3, 7, 2)],
                2,
                false,
                12,
            ),
        ]
    }

    fn req(target: SortTarget, order: SortOrder) -> RangeRequest {
        RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            sort_target: target as i32,
            sort_order: order as i32,
            ..Default::default()
        }
    }

    #[test]
    fn range_merge_every_sort_target_and_order() {
        use SortOrder::*;
        use SortTarget::*;
        let cases = [
            (Key, None, "abcd"),
            (Key, Ascend, "abcd"),
            (Key, Descend, "dcba"),
            // Non-key target with NONE sorts ascending, like etcd.
            (Version, None, "bcad"),
            (Version, Ascend, "bcad"),
            (Version, Descend, "dacb"),
            (Create, None, "abcd"),
            (Create, Ascend, "abcd"),
            (Create, Descend, "dcba"),
            (Mod, None, "dcba"),
            (Mod, Ascend, "dcba"),
            (Mod, Descend, "abcd"),
            (Value, None, "dcba"),
            (Value, Ascend, "dcba"),
            (Value, Descend, "abcd"),
        ];
        for (target, order, want) in cases {
            let mut parts = shard_parts();
            if (target, order) == (Key, Descend) {
                // A shard answers a descending key sort in that order.
                for p in &mut parts {
                    p.kvs.reverse();
                }
            }
            let r = merge_range(&req(target, order), parts);
            assert_eq!(keys(&r).concat(), want, "{target:?} {order:?}");
            assert_eq!(r.count, 4);
            assert!(!r.more);
            let h = r.header.unwrap();
            assert_eq!((h.revision, h.raft_term), (12, 12));
        }
    }

    #[test]
    fn key_runs_merge_like_a_sort_up_to_take() {
        // Pseudo-random keys dealt to 1-3 runs, each run in key order (as
        // shards answer), merged against sorting everything.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            seed >> 33
        };
        for round in 0..200 {
            let runs_n = 1 + round % 3;
            let n = (next() % 40) as usize;
            let mut runs: Vec<Vec<KeyValue>> = vec![Vec::new(); runs_n];
            let mut all = Vec::new();
            for i in 0..n {
                let k = kv(&format!("k{:05}-{i}", next() % 100_000), "v", 1, 1, 1);
                runs[(next() % runs_n as u64) as usize].push(k.clone());
                all.push(k);
            }
            all.sort_by(|a, b| a.key.cmp(&b.key));
            let take = (next() % 45) as usize;
            for descending in [false, true] {
                let mut runs = runs.clone();
                let mut want = all.clone();
                for r in &mut runs {
                    r.sort_by(|a, b| a.key.cmp(&b.key));
                    if descending {
                        r.reverse();
                    }
                }
                if descending {
                    want.reverse();
                }
                want.truncate(take);
                assert_eq!(
                    merge_key_runs(runs, take, descending),
                    want,
                    "round {round}"
                );
            }
        }
    }

    #[test]
    fn range_merge_ties_keep_key_order() {
        let parts = vec![
            part(vec![kv("c", "v", 1, 5, 1)], 1, false, 1),
            part(
                vec![kv("a", "v", 1, 5, 1), kv("b", "v", 1, 4, 1)],
                2,
                false,
                1,
            ),
        ];
        let r = merge_range(&req(SortTarget::Mod, SortOrder::Descend), parts);
        assert_eq!(keys(&r).concat(), "acb");
    }

    #[test]
    fn range_merge_limit_more_and_count() {
        // Each shard already truncated to limit=1 and said more.
        let mut rq = req(SortTarget::Key, SortOrder::None);
        rq.limit = 1;
        let parts = vec![
            part(vec![kv("b", "", 1, 1, 1)], 5, true, 3),
            part(vec![kv("a", "", 1, 1, 1)], 1, false, 3),
        ];
        let r = merge_range(&rq, parts);
        assert_eq!(keys(&r), vec!["a"]);
        assert!(r.more);
        assert_eq!(r.count, 6);

        // Truncation in the merge alone sets more.
        rq.limit = 3;
        let r = merge_range(&rq, shard_parts());
        assert_eq!(keys(&r).concat(), "abc");
        assert!(r.more);
        assert_eq!(r.count, 4);

        // Exactly limit keys: no more.
        rq.limit = 4;
        let r = merge_range(&rq, shard_parts());
        assert_eq!(keys(&r).concat(), "abcd");
        assert!(!r.more);

        // limit with a sort: the top-k across shards.
        let mut rq = req(SortTarget::Mod, SortOrder::Descend);
        rq.limit = 2;
        let r = merge_range(&rq, shard_parts());
        assert_eq!(keys(&r).concat(), "ab");
        assert!(r.more);
    }

    /// etcd sorts by a target other than the key with no order given only
    /// over its first `limit + 1` keys; the shards send theirs in key
    /// order and the merge sorts the first `limit + 1` of all of them.
    #[test]
    fn range_merge_sorts_only_the_first_page_when_no_order_is_given() {
        let mut rq = req(SortTarget::Value, SortOrder::None);
        rq.limit = 1;
        let to_shards = shard_range_request(&rq);
        assert_eq!(to_shards.limit, 2);
        assert_eq!(to_shards.sort_target, SortTarget::Key as i32);
        // The first two keys overall are a (value z) and b (value y).
        let r = merge_range(&rq, shard_parts());
        assert_eq!(keys(&r), vec!["b"]);
        assert!(r.more);
        assert_eq!(r.count, 4);
        // With an order, etcd sorts every key: d has the smallest value.
        rq.sort_order = SortOrder::Ascend as i32;
        assert_eq!(
            shard_range_request(&rq).sort_target,
            SortTarget::Value as i32
        );
        assert_eq!(keys(&merge_range(&rq, shard_parts())), vec!["d"]);
        // So does a revision filter.
        rq.sort_order = SortOrder::None as i32;
        rq.min_mod_revision = 1;
        assert_eq!(keys(&merge_range(&rq, shard_parts())), vec!["d"]);
    }

    #[test]
    fn range_merge_count_only_and_keys_only() {
        let mut rq = req(SortTarget::Key, SortOrder::None);
        rq.count_only = true;
        let parts = vec![part(vec![], 3, false, 1), part(vec![], 4, false, 2)];
        let r = merge_range(&rq, parts);
        assert!(r.kvs.is_empty());
        assert_eq!(r.count, 7);
        assert!(!r.more);

        // keys_only with a value sort: shards are asked for values, the
        // merge sorts by them and strips them.
        let mut rq = req(SortTarget::Value, SortOrder::Ascend);
        rq.keys_only = true;
        assert!(needs_values_for_sort(&rq));
        assert!(!shard_range_request(&rq).keys_only);
        let r = merge_range(&rq, shard_parts());
        assert_eq!(keys(&r).concat(), "dcba");
        assert!(r.kvs.iter().all(|k| k.value.is_empty()));
        // Without a value sort the request goes out unchanged.
        let mut rq = req(SortTarget::Key, SortOrder::None);
        rq.keys_only = true;
        assert!(matches!(shard_range_request(&rq), Cow::Borrowed(_)));
    }

    #[test]
    fn page_budget_only_for_key_ordered_limited_lists() {
        let list = |limit: i64| RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            limit,
            ..Default::default()
        };
        // 100 over 2: 50 + 3 * 5 + 2.
        assert_eq!(page_budget(&list(100), 2), Some(67));
        assert_eq!(page_budget(&list(500), 16), Some(31 + 17 + 2));
        // Too small a limit to save anything, or nothing to save.
        assert_eq!(page_budget(&list(10), 2), None);
        assert_eq!(page_budget(&list(100), 1), None);
        assert_eq!(page_budget(&list(0), 2), None);
        let mut r = list(100);
        r.count_only = true;
        assert_eq!(page_budget(&r, 2), None);
        // Keys only is still a page of kvs.
        let mut r = list(100);
        r.keys_only = true;
        assert_eq!(page_budget(&r, 2), Some(67));
        // Key order either way; any other sort may need every kv.
        let mut r = list(100);
        r.sort_order = SortOrder::Descend as i32;
        assert_eq!(page_budget(&r, 2), Some(67));
        r.sort_target = SortTarget::Mod as i32;
        assert_eq!(page_budget(&r, 2), None);
        r.sort_order = SortOrder::None as i32;
        assert_eq!(
            page_budget(&r, 2),
            None,
            "a MOD target with NONE sorts ascending"
        );
    }

    /// A shard's answer to `r` over its own `keys` (ascending), as the
    /// shard server gives it: its first `limit` in the request's key
    /// order, its whole count, and `more` if it holds more.
    fn shard_answer(keys: &[String], r: &RangeRequest) -> RangeResponse {
        let mut kvs: Vec<KeyValue> = keys
            .iter()
            .filter(|k| {
                k.as_bytes() >= &r.key[..]
                    && (r.range_end.is_empty() || k.as_bytes() < &r.range_end[..])
            })
            .map(|k| kv(k, "v", 1, 2, 1))
            .collect();
        if effective_sort(r).1 == SortOrder::Descend {
            kvs.reverse();
        }
        let count = kvs.len() as i64;
        let more = r.limit > 0 && kvs.len() > r.limit as usize;
        if r.limit > 0 {
            kvs.truncate(r.limit as usize);
        }
        part(kvs, count, more, 9)
    }

    #[test]
    fn continuations_read_on_where_a_budget_fell_short() {
        // Of k000..k199, shard 0 owns the keys below k100 that are not
        // multiples of 5 (80 of them), shard 1 every other (120): the
        // first page of 100 holds 80 of shard 0's, past its budget of 67.
        type Owned = Vec<(i32, String)>;
        let (s0, s1): (Owned, Owned) = (0..200)
            .map(|i| (i, format!("k{i:03}")))
            .partition(|(i, _)| *i < 100 && i % 5 != 0);
        let s0: Vec<String> = s0.into_iter().map(|(_, k)| k).collect();
        let s1: Vec<String> = s1.into_iter().map(|(_, k)| k).collect();
        let req = RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            limit: 100,
            ..Default::default()
        };
        let budget = page_budget(&req, 2).unwrap();
        let shard_req = RangeRequest {
            limit: budget,
            revision: 7,
            ..req.clone()
        };
        let parts = vec![shard_answer(&s0, &shard_req), shard_answer(&s1, &shard_req)];
        assert!(parts[0].more && parts[1].more);
        let cont = continuations(&req, &shard_req, &parts);
        // Shard 0 sent k001..k083, shard 1 k000..k146: 67 and 17 (k000,
        // k005, ..., k080) of them come up to k083, so the page may take
        // 16 more from shard 0. 134 come up to k146: shard 1 has sent all
        // it can contribute.
        assert_eq!(cont.len(), 1);
        let (i, next) = &cont[0];
        assert_eq!(*i, 0);
        assert_eq!(next.key, b"k083\0".to_vec());
        assert_eq!(next.range_end, b"l".to_vec());
        assert_eq!((next.limit, next.revision), (100 - 67 - 17, 7));
    }

    #[test]
    fn budgeted_pages_merge_like_full_ones() {
        // A small xorshift: deterministic cases without a dependency.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut budgeted, mut continued) = (0, 0);
        for case in 0..400 {
            let shards = 2 + rnd(3) as usize;
            let mut owned: Vec<Vec<String>> = vec![Vec::new(); shards];
            // Skewed sometimes: shard 0 takes most keys.
            let skew = rnd(3) == 0;
            for k in 0..rnd(400) {
                if rnd(4) == 0 {
                    continue;
                }
                let s = if skew && rnd(4) != 0 {
                    0
                } else {
                    rnd(shards as u64) as usize
                };
                owned[s].push(format!("k{k:04}"));
            }
            let mut req = RangeRequest {
                key: format!("k{:04}", rnd(50)).into_bytes(),
                range_end: b"l".to_vec(),
                limit: 1 + rnd(200) as i64,
                keys_only: rnd(4) == 0,
                ..Default::default()
            };
            if rnd(2) == 0 {
                req.sort_order = SortOrder::Descend as i32;
            }
            let full: Vec<RangeResponse> = owned.iter().map(|k| shard_answer(k, &req)).collect();
            let want = merge_range(&req, full);
            let Some(budget) = page_budget(&req, shards) else {
                continue;
            };
            let shard_req = RangeRequest {
                limit: budget,
                ..req.clone()
            };
            let mut parts: Vec<RangeResponse> =
                owned.iter().map(|k| shard_answer(k, &shard_req)).collect();
            let next = continuations(&req, &shard_req, &parts);
            budgeted += 1;
            continued += usize::from(!next.is_empty());
            for (i, next) in next {
                let answer = shard_answer(&owned[i], &next);
                continue_part(&mut parts[i], answer);
            }
            // One round is enough: nothing is left to read on.
            assert!(
                continuations(&req, &shard_req, &parts).is_empty(),
                "case {case}"
            );
            let got = merge_range(&req, parts);
            assert_eq!(keys(&got), keys(&want), "case {case}");
            assert_eq!(
                (got.count, got.more),
                (want.count, want.more),
                "case {case}"
            );
        }
        // Both paths were taken, many times.
        assert!(continued >= 20 && budgeted - continued >= 20);
    }

    #[test]
    fn range_merge_of_empty_shards() {
        let rq = req(SortTarget::Key, SortOrder::None);
        let r = merge_range(
            &rq,
            vec![part(vec![], 0, false, 4), part(vec![], 0, false, 5)],
        );
        assert!(r.kvs.is_empty());
        assert_eq!(r.count, 0);
        assert_eq!(r.header.unwrap().revision, 5);
    }

    #[test]
    fn delete_merge_sums_and_orders() {
        let d = merge_delete(vec![
            DeleteRangeResponse {
                header: None,
                deleted: 2,
                prev_kvs: vec![kv("b", "", 1, 1, 1), kv("d", "", 1, 1, 1)],
            },
            DeleteRangeResponse {
                header: None,
                deleted: 1,
                prev_kvs: vec![kv("a", "", 1, 1, 1)],
            },
        ]);
        assert_eq!(d.deleted, 3);
        let ks: Vec<_> = d.prev_kvs.iter().map(|k| k.key.clone()).collect();
        assert_eq!(ks, vec![b"a".to_vec(), b"b".to_vec(), b"d".to_vec()]);
    }

    // ---- txn merge ----

    fn op_range(key: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn op_put(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec().into(),
                prev_kv: true,
                ..Default::default()
            })),
        }
    }
    fn op_del(key: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.into(),
                    range_end: end.into(),
                    prev_kv: true,
                },
            )),
        }
    }
    fn op_txn(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(t)),
        }
    }
    fn r_range(kvs: Vec<KeyValue>) -> ResponseOp {
        let n = kvs.len() as i64;
        ResponseOp {
            response: Some(response_op::Response::ResponseRange(RangeResponse {
                header: None,
                kvs,
                more: false,
                count: n,
            })),
        }
    }
    fn r_put(prev: Option<KeyValue>) -> ResponseOp {
        ResponseOp {
            response: Some(response_op::Response::ResponsePut(PutResponse {
                header: None,
                prev_kv: prev,
            })),
        }
    }
    fn r_del(prev: Vec<KeyValue>) -> ResponseOp {
        ResponseOp {
            response: Some(response_op::Response::ResponseDeleteRange(
                DeleteRangeResponse {
                    header: None,
                    deleted: prev.len() as i64,
                    prev_kvs: prev,
                },
            )),
        }
    }
    fn r_txn(succeeded: bool, responses: Vec<ResponseOp>) -> ResponseOp {
        ResponseOp {
            response: Some(response_op::Response::ResponseTxn(TxnResponse {
                header: None,
                succeeded,
                responses,
            })),
        }
    }
    fn txn_resp(succeeded: bool, rev: i64, responses: Vec<ResponseOp>) -> TxnResponse {
        TxnResponse {
            header: Some(ResponseHeader {
                revision: rev,
                ..Default::default()
            }),
            succeeded,
            responses,
        }
    }

    /// Two keys, one per shard of a 2-shard router.
    fn keys_on_two_shards(router: &ShardRouter) -> (String, String) {
        let mut k0 = None;
        let mut k1 = None;
        for i in 0..100 {
            let k = format!("k{i}");
            match router.shard_of(k.as_bytes()) {
                0 if k0.is_none() => k0 = Some(k),
                1 if k1.is_none() => k1 = Some(k),
                _ => {}
            }
        }
        (k0.unwrap(), k1.unwrap())
    }

    #[test]
    fn txn_merge_flat_and_nested() {
        let router = ShardRouter::new(2);
        let (k0, k1) = keys_on_two_shards(&router);
        // success: [range a..z, put k0, put k1, delete a..z,
        //           nested{ success: [range a..z], failure: [put k1] }]
        let nested = TxnRequest {
            compare: vec![],
            success: vec![op_range("a", "z")],
            failure: vec![op_put(&k1)],
        };
        let req = TxnRequest {
            compare: vec![],
            success: vec![
                op_range("a", "z"),
                op_put(&k0),
                op_put(&k1),
                op_del("a", "z"),
                op_txn(nested),
            ],
            failure: vec![],
        };
        // Path: outer true, nested false.
        let path = vec![true, false];
        let s0 = txn_resp(
            true,
            20,
            vec![
                r_range(vec![kv(&k0, "v0", 1, 1, 1)]),
                r_put(Some(kv(&k0, "old0", 1, 1, 1))),
                r_put(None),
                r_del(vec![kv("x0", "", 1, 1, 1)]),
                r_txn(false, vec![r_put(None)]),
            ],
        );
        let s1 = txn_resp(
            true,
            20,
            vec![
                r_range(vec![kv(&k1, "v1", 1, 1, 1)]),
                r_put(None),
                r_put(Some(kv(&k1, "old1", 1, 1, 1))),
                r_del(vec![kv("b1", "", 1, 1, 1)]),
                r_txn(false, vec![r_put(Some(kv(&k1, "prev-nested", 1, 1, 1)))]),
            ],
        );
        let m = merge_txn(&req, &path, &router, vec![(0, s0), (1, s1)]).unwrap();
        assert!(m.succeeded);
        assert_eq!(m.header.unwrap().revision, 20);
        assert_eq!(m.responses.len(), 5);
        use response_op::Response as R;
        match &m.responses[0].response {
            Some(R::ResponseRange(r)) => {
                assert_eq!(r.count, 2);
                let mut want = vec![k0.clone(), k1.clone()];
                want.sort();
                assert_eq!(keys(r), want);
            }
            other => panic!("{other:?}"),
        }
        match &m.responses[1].response {
            Some(R::ResponsePut(p)) => assert_eq!(&p.prev_kv.as_ref().unwrap().value[..], b"old0"),
            other => panic!("{other:?}"),
        }
        match &m.responses[2].response {
            Some(R::ResponsePut(p)) => assert_eq!(&p.prev_kv.as_ref().unwrap().value[..], b"old1"),
            other => panic!("{other:?}"),
        }
        match &m.responses[3].response {
            Some(R::ResponseDeleteRange(d)) => {
                assert_eq!(d.deleted, 2);
                assert_eq!(&d.prev_kvs[0].key[..], b"b1");
                assert_eq!(&d.prev_kvs[1].key[..], b"x0");
            }
            other => panic!("{other:?}"),
        }
        match &m.responses[4].response {
            Some(R::ResponseTxn(t)) => {
                assert!(!t.succeeded);
                match &t.responses[0].response {
                    Some(R::ResponsePut(p)) => {
                        assert_eq!(&p.prev_kv.as_ref().unwrap().value[..], b"prev-nested")
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn txn_merge_failure_branch() {
        let router = ShardRouter::new(2);
        let req = TxnRequest {
            compare: vec![],
            success: vec![op_put("x")],
            failure: vec![op_range("a", "z")],
        };
        let parts = vec![
            (
                0,
                txn_resp(false, 5, vec![r_range(vec![kv("b", "", 1, 1, 1)])]),
            ),
            (
                1,
                txn_resp(false, 5, vec![r_range(vec![kv("a", "", 1, 1, 1)])]),
            ),
        ];
        let m = merge_txn(&req, &[false], &router, parts).unwrap();
        assert!(!m.succeeded);
        match &m.responses[0].response {
            Some(response_op::Response::ResponseRange(r)) => assert_eq!(keys(r).concat(), "ab"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn txn_merge_rejects_misaligned_answers() {
        let router = ShardRouter::new(2);
        let req = TxnRequest {
            compare: vec![],
            success: vec![op_range("a", "z")],
            failure: vec![],
        };
        // Wrong length.
        let parts = vec![
            (0, txn_resp(true, 1, vec![])),
            (1, txn_resp(true, 1, vec![r_range(vec![])])),
        ];
        assert!(matches!(
            merge_txn(&req, &[true], &router, parts),
            Err(GatewayError::Protocol(_))
        ));
        // Wrong kind.
        let parts = vec![
            (0, txn_resp(true, 1, vec![r_put(None)])),
            (1, txn_resp(true, 1, vec![r_range(vec![])])),
        ];
        assert!(matches!(
            merge_txn(&req, &[true], &router, parts),
            Err(GatewayError::Protocol(_))
        ));
        // Path too long for the request.
        let parts = vec![(0, txn_resp(true, 1, vec![r_range(vec![])]))];
        assert!(merge_txn(&req, &[true, true], &router, parts).is_err());
    }

    #[test]
    fn shard_txn_request_rewrites_value_sorted_keys_only_ranges() {
        let mut r = RangeRequest {
            key: b"a".to_vec(),
            range_end: b"z".to_vec(),
            keys_only: true,
            sort_target: SortTarget::Value as i32,
            ..Default::default()
        };
        let plain = TxnRequest {
            compare: vec![],
            success: vec![op_range("a", "z")],
            failure: vec![],
        };
        assert!(matches!(shard_txn_request(&plain), Cow::Borrowed(_)));
        let t = TxnRequest {
            compare: vec![],
            success: vec![op_txn(TxnRequest {
                compare: vec![],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestRange(r.clone())),
                }],
                failure: vec![],
            })],
            failure: vec![],
        };
        let out = shard_txn_request(&t).into_owned();
        let Some(request_op::Request::RequestTxn(n)) = &out.success[0].request else {
            panic!()
        };
        let Some(request_op::Request::RequestRange(got)) = &n.success[0].request else {
            panic!()
        };
        r.keys_only = false;
        assert_eq!(got, &r);
    }
}
