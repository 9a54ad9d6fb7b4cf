//! Pure helpers over etcd transactions, shared by the gateway and the shards.
//!
//! etcd evaluates *every* compare on the path a transaction will take before
//! it applies any operation (`compareToPath` in etcd): the top-level
//! compares pick a branch, and each nested txn inside that branch picks its
//! own branch, all against the state before the txn. The result is the
//! *path*: one bool per txn node visited, in depth-first order. Given the
//! path, applying the txn is deterministic.
//!
//! Across shards we split that in two: each shard evaluates the compares of
//! the whole txn tree against the keys it owns ([`canonical_compares`] fixes
//! one order for them), the gateway combines the per-shard outcomes
//! ([`combine_outcomes`]) and computes the path ([`path`]), and each shard
//! then applies the ops along that path to its own keys. A single shard that
//! owns every key does all three steps itself.
//!
//! [`validate`] applies etcd's request checks (op limits, duplicate keys,
//! empty keys, and the caller's checks of each op), in etcd's order, so the
//! gateway can refuse bad input with etcd's errors before anything reaches
//! a shard.

use crate::etcdserverpb::{request_op, Compare, RequestOp, TxnRequest};
use crate::shardpb::CompareOutcome;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// Every compare of the txn tree, in canonical order: a node's own compares,
/// then (recursively) the nested txns of its success branch, then those of
/// its failure branch.
pub fn canonical_compares(txn: &TxnRequest) -> Vec<&Compare> {
    let mut out = Vec::new();
    collect_compares(txn, &mut out);
    out
}

fn collect_compares<'a>(txn: &'a TxnRequest, out: &mut Vec<&'a Compare>) {
    out.extend(txn.compare.iter());
    for op in txn.success.iter().chain(txn.failure.iter()) {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            collect_compares(nested, out);
        }
    }
}

/// The number of compares in the whole tree.
pub fn compare_count(txn: &TxnRequest) -> usize {
    txn.compare.len()
        + txn
            .success
            .iter()
            .chain(txn.failure.iter())
            .map(|op| match &op.request {
                Some(request_op::Request::RequestTxn(nested)) => compare_count(nested),
                _ => 0,
            })
            .sum::<usize>()
}

/// Combines per-shard outcomes of one compare (see `CompareOutcome`).
pub fn combine_one(outcomes: &[&CompareOutcome]) -> bool {
    let matched: Vec<_> = outcomes.iter().filter(|o| o.matched).collect();
    if matched.is_empty() {
        // No shard holds a key: every shard computed the same zero result.
        outcomes.first().map(|o| o.zero_result).unwrap_or(false)
    } else {
        matched.iter().all(|o| o.all_true)
    }
}

/// Combines the outcome lists of several shards (each in canonical order)
/// into one result per compare.
pub fn combine_outcomes(per_shard: &[Vec<CompareOutcome>]) -> Vec<bool> {
    let n = per_shard.first().map(|v| v.len()).unwrap_or(0);
    (0..n)
        .map(|i| {
            let column: Vec<&CompareOutcome> = per_shard.iter().filter_map(|v| v.get(i)).collect();
            combine_one(&column)
        })
        .collect()
}

/// etcd's compare path for `txn`, given one result per canonical compare.
pub fn path(txn: &TxnRequest, results: &[bool]) -> Vec<bool> {
    let mut out = Vec::new();
    walk_path(txn, results, 0, &mut out);
    out
}

fn walk_path(txn: &TxnRequest, results: &[bool], base: usize, out: &mut Vec<bool>) {
    let n = txn.compare.len();
    let ok = results[base..base + n].iter().all(|r| *r);
    out.push(ok);
    // Canonical start of each nested txn: after this node's compares, the
    // success nested txns in order, then the failure ones.
    let mut next = base + n;
    let mut starts_success = Vec::new();
    for op in &txn.success {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            starts_success.push(next);
            next += compare_count(nested);
        }
    }
    let mut starts_failure = Vec::new();
    for op in &txn.failure {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            starts_failure.push(next);
            next += compare_count(nested);
        }
    }
    let (ops, starts) = if ok {
        (&txn.success, starts_success)
    } else {
        (&txn.failure, starts_failure)
    };
    let mut i = 0;
    for op in ops {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            walk_path(nested, results, starts[i], out);
            i += 1;
        }
    }
}

/// Walks the ops a txn applies along `path`, calling `f` for each non-txn op
/// in order. Returns how many path entries were consumed.
pub fn ops_along_path<'a>(
    txn: &'a TxnRequest,
    path: &[bool],
    f: &mut dyn FnMut(&'a RequestOp),
) -> usize {
    let ok = path[0];
    let mut used = 1;
    let ops = if ok { &txn.success } else { &txn.failure };
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestTxn(nested)) => {
                used += ops_along_path(nested, &path[used..], f);
            }
            _ => f(op),
        }
    }
    used
}

/// Calls `f` for every op of `ops` but the nested txns, and for every op
/// of theirs, in both of their branches, depth first in order.
pub fn for_each_op<'a>(ops: &'a [RequestOp], f: &mut dyn FnMut(&'a RequestOp)) {
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestTxn(nested)) => {
                for_each_op(&nested.success, f);
                for_each_op(&nested.failure, f);
            }
            _ => f(op),
        }
    }
}

/// Whether any branch of the tree may write (Put or DeleteRange).
pub fn may_write(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(txn.failure.iter())
        .any(|op| match &op.request {
            Some(request_op::Request::RequestPut(_))
            | Some(request_op::Request::RequestDeleteRange(_)) => true,
            Some(request_op::Request::RequestTxn(nested)) => may_write(nested),
            _ => false,
        })
}

/// Every `(key, range_end)` the tree may compare, read or write, in any
/// branch. An empty `range_end` means the single key.
pub fn touched_ranges(txn: &TxnRequest) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    collect_ranges(txn, &mut out);
    out
}

fn collect_ranges<'a>(txn: &'a TxnRequest, out: &mut Vec<(&'a [u8], &'a [u8])>) {
    for c in &txn.compare {
        out.push((&c.key, &c.range_end));
    }
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => out.push((&r.key, &r.range_end)),
            Some(request_op::Request::RequestPut(p)) => out.push((&p.key, &[])),
            Some(request_op::Request::RequestDeleteRange(d)) => out.push((&d.key, &d.range_end)),
            Some(request_op::Request::RequestTxn(nested)) => collect_ranges(nested, out),
            None => {}
        }
    }
}

/// Why a txn request is refused before it reaches a shard. Each maps to the
/// etcd error of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnCheckError {
    /// "etcdserver: too many operations in txn request"
    TooManyOps,
    /// "etcdserver: duplicate key given in txn request"
    DuplicateKey,
    /// "etcdserver: key is not provided"
    EmptyKey,
    /// An op that names no request: etcd answers "etcdserver: key not
    /// found" (`ErrGRPCKeyNotFound`).
    EmptyOp,
}

/// etcd's checks on a txn, in etcd's order, so a request with several
/// faults gets the error etcd gives for it: first its `checkTxnRequest` —
/// at most `max_ops` compares and ops per branch (a nested txn may hold
/// only what its parent's longest list leaves of `max_ops`), non-empty
/// compare keys, then each op of the success and then the failure branch
/// in order (ranges, puts and deletes by `check_op`, nested txns the same
/// way, an op with no request refused) — then its `checkIntervals` on the
/// success and then the failure branch: no key written twice, or both put
/// and deleted, by one branch, nested txns included.
pub fn validate<E: From<TxnCheckError>>(
    txn: &TxnRequest,
    max_ops: usize,
    check_op: &dyn Fn(&RequestOp) -> Result<(), E>,
) -> Result<(), E> {
    check_request(txn, max_ops, check_op)?;
    check_intervals(&txn.success)?;
    check_intervals(&txn.failure)?;
    if ignoring_put_after_open_delete(&txn.success) || ignoring_put_after_open_delete(&txn.failure)
    {
        return Err(TxnCheckError::DuplicateKey.into());
    }
    Ok(())
}

/// Beyond etcd's checks: whether a branch (with the txns nested in it)
/// holds a put with `ignore_value` or `ignore_lease` of a key that a
/// delete to the end `\0` in it may delete. etcd's duplicate check lets
/// that through (see [`Interval`]); etcd then finds the key gone while
/// applying the put and panics. A cross-shard commit must not fail, so it
/// is refused up front, as a duplicate key, whatever the ops' order.
fn ignoring_put_after_open_delete(ops: &[RequestOp]) -> bool {
    let (mut starts, mut keys): (Vec<&[u8]>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    for_each_op(ops, &mut |op| match &op.request {
        Some(request_op::Request::RequestDeleteRange(d)) if d.range_end == [0] => {
            starts.push(&d.key)
        }
        Some(request_op::Request::RequestPut(p)) if p.ignore_value || p.ignore_lease => {
            keys.push(&p.key)
        }
        _ => {}
    });
    keys.iter().any(|k| starts.iter().any(|s| k >= s))
}

fn check_request<E: From<TxnCheckError>>(
    txn: &TxnRequest,
    max_ops: usize,
    check_op: &dyn Fn(&RequestOp) -> Result<(), E>,
) -> Result<(), E> {
    let longest = txn
        .compare
        .len()
        .max(txn.success.len())
        .max(txn.failure.len());
    if longest > max_ops {
        return Err(TxnCheckError::TooManyOps.into());
    }
    if txn.compare.iter().any(|c| c.key.is_empty()) {
        return Err(TxnCheckError::EmptyKey.into());
    }
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestTxn(nested)) => {
                check_request(nested, max_ops - longest, check_op)?
            }
            Some(_) => check_op(op)?,
            None => return Err(TxnCheckError::EmptyOp.into()),
        }
    }
    Ok(())
}

/// A half-open key interval; an empty `end` is the single key `start`.
///
/// As in etcd's `checkIntervals`, the end is taken literally: a delete to
/// the end `\0` ("every key from `start`") is the empty interval here, so
/// it never conflicts with a put. etcd accepts such a txn and applies its
/// ops in order, and so must we.
#[derive(Clone, Debug)]
struct Interval {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl Interval {
    fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            return key == self.start.as_slice();
        }
        key >= self.start.as_slice() && key < self.end.as_slice()
    }
}

type Puts = std::collections::BTreeSet<Vec<u8>>;

/// etcd's `checkIntervals`: returns the puts and deletes of a branch.
fn check_intervals(ops: &[RequestOp]) -> Result<(Puts, Vec<Interval>), TxnCheckError> {
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => Some(Interval {
                start: d.key.clone(),
                end: d.range_end.clone(),
            }),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Interval], k: &[u8]| dels.iter().any(|d| d.contains(k));
    let mut puts = Puts::new();
    for op in ops {
        let Some(request_op::Request::RequestTxn(nested)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&nested.success)?;
        let (puts_else, dels_else) = check_intervals(&nested.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(TxnCheckError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // The same key in both branches of one nested txn is fine: only
            // one branch runs.
            if (puts.contains(k) && !puts_then.contains(k)) || deleted(&dels, k) {
                return Err(TxnCheckError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(request_op::Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(p.key.as_ref()) || deleted(&dels, &p.key) {
            return Err(TxnCheckError::DuplicateKey);
        }
        puts.insert(p.key.to_vec());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcdserverpb::{compare, DeleteRangeRequest, PutRequest, RangeRequest};

    /// etcd's own check of each op that needs nothing but the op: it
    /// names a key (the gateway's `check_op` adds the rest).
    fn key_given(op: &RequestOp) -> Result<(), TxnCheckError> {
        let key = match &op.request {
            Some(request_op::Request::RequestRange(r)) => &r.key[..],
            Some(request_op::Request::RequestPut(p)) => &p.key[..],
            Some(request_op::Request::RequestDeleteRange(d)) => &d.key[..],
            _ => return Ok(()),
        };
        if key.is_empty() {
            return Err(TxnCheckError::EmptyKey);
        }
        Ok(())
    }

    fn cmp(key: &str) -> Compare {
        Compare {
            key: key.into(),
            target_union: Some(compare::TargetUnion::Version(0)),
            ..Default::default()
        }
    }
    fn put(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn del(key: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
            )),
        }
    }
    fn get(key: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }
    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestTxn(t)),
        }
    }

    fn tree() -> TxnRequest {
        // compares: [a] ; success: [nested1: compares [b] ; success put x], failure: [nested2: compares [c, d]]
        TxnRequest {
            compare: vec![cmp("a")],
            success: vec![
                put("p"),
                nested(TxnRequest {
                    compare: vec![cmp("b")],
                    success: vec![put("x")],
                    failure: vec![get("x")],
                }),
            ],
            failure: vec![nested(TxnRequest {
                compare: vec![cmp("c"), cmp("d")],
                success: vec![del("y", "z")],
                failure: vec![],
            })],
        }
    }

    #[test]
    fn canonical_order_is_preorder_success_then_failure() {
        let t = tree();
        let keys: Vec<&[u8]> = canonical_compares(&t)
            .iter()
            .map(|c| c.key.as_slice())
            .collect();
        assert_eq!(keys, vec![b"a".as_slice(), b"b", b"c", b"d"]);
        assert_eq!(compare_count(&t), 4);
    }

    #[test]
    fn path_follows_taken_branches_only() {
        let t = tree();
        // a true -> success branch, nested1 with b false.
        assert_eq!(path(&t, &[true, false, true, true]), vec![true, false]);
        // a false -> failure branch, nested2 with c,d true.
        assert_eq!(path(&t, &[false, false, true, true]), vec![false, true]);
        assert_eq!(path(&t, &[false, true, true, false]), vec![false, false]);
    }

    #[test]
    fn ops_along_path_visits_leaf_ops_in_order() {
        let t = tree();
        let mut seen = Vec::new();
        let used = ops_along_path(&t, &[true, true], &mut |op| seen.push(op.clone()));
        assert_eq!(used, 2);
        assert_eq!(seen, vec![put("p"), put("x")]);
        let mut seen = Vec::new();
        ops_along_path(&t, &[false, true], &mut |op| seen.push(op.clone()));
        assert_eq!(seen, vec![del("y", "z")]);
    }

    #[test]
    fn outcomes_combine_across_shards() {
        let o = |matched, all_true, zero_result| CompareOutcome {
            matched,
            all_true,
            zero_result,
        };
        // Key on shard 1 only.
        assert!(combine_outcomes(&[vec![o(false, true, false)], vec![o(true, true, false)]])[0]);
        // A range: false on one shard wins.
        assert!(!combine_outcomes(&[vec![o(true, false, true)], vec![o(true, true, true)]])[0]);
        // No keys anywhere: the zero result decides.
        assert!(combine_outcomes(&[vec![o(false, true, true)], vec![o(false, true, true)]])[0]);
    }

    #[test]
    fn validate_limits_and_duplicates() {
        assert_eq!(validate(&tree(), MAX_TXN_OPS, &key_given), Ok(()));
        let too_many = TxnRequest {
            success: (0..129).map(|i| put(&format!("k{i}"))).collect(),
            ..Default::default()
        };
        assert_eq!(
            validate(&too_many, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::TooManyOps)
        );
        let dup = TxnRequest {
            success: vec![put("a"), put("a")],
            ..Default::default()
        };
        assert_eq!(
            validate(&dup, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::DuplicateKey)
        );
        let put_in_deleted = TxnRequest {
            success: vec![del("a", "c"), put("b")],
            ..Default::default()
        };
        assert_eq!(
            validate(&put_in_deleted, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::DuplicateKey)
        );
        // Same key in both branches of a nested txn is allowed.
        let both = TxnRequest {
            success: vec![nested(TxnRequest {
                success: vec![put("a")],
                failure: vec![put("a")],
                ..Default::default()
            })],
            ..Default::default()
        };
        assert_eq!(validate(&both, MAX_TXN_OPS, &key_given), Ok(()));
        // Nested put vs outer put conflicts.
        let nested_dup = TxnRequest {
            success: vec![
                put("a"),
                nested(TxnRequest {
                    success: vec![put("a")],
                    ..Default::default()
                }),
            ],
            ..Default::default()
        };
        assert_eq!(
            validate(&nested_dup, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::DuplicateKey)
        );
        let empty = TxnRequest {
            success: vec![put("")],
            ..Default::default()
        };
        assert_eq!(
            validate(&empty, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::EmptyKey)
        );
        // etcd takes a delete's end literally: to the end `\0` conflicts
        // with nothing, and a range that does not reach the key neither.
        let from_key = TxnRequest {
            success: vec![del("a", "\0"), put("zzz")],
            ..Default::default()
        };
        assert_eq!(validate(&from_key, MAX_TXN_OPS, &key_given), Ok(()));
        let ranged = TxnRequest {
            success: vec![del("a", "zz"), put("zzz")],
            ..Default::default()
        };
        assert_eq!(validate(&ranged, MAX_TXN_OPS, &key_given), Ok(()));
        // Except a put that needs its key to exist (etcd 3.4 panics when
        // the delete took it), also from a nested txn.
        let mut ignoring = put("zzz");
        if let Some(request_op::Request::RequestPut(p)) = &mut ignoring.request {
            p.ignore_value = true;
        }
        let nested_ignoring = TxnRequest {
            success: vec![
                del("a", "\0"),
                nested(TxnRequest {
                    failure: vec![ignoring.clone()],
                    ..Default::default()
                }),
            ],
            ..Default::default()
        };
        assert_eq!(
            validate(&nested_ignoring, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::DuplicateKey)
        );
        let other_branch = TxnRequest {
            success: vec![del("a", "\0")],
            failure: vec![ignoring],
            ..Default::default()
        };
        assert_eq!(validate(&other_branch, MAX_TXN_OPS, &key_given), Ok(()));
    }

    /// etcd checks a txn's sizes and every op before it looks for
    /// duplicate keys, and a nested txn gets what its parent leaves.
    #[test]
    fn validate_checks_in_etcds_order_with_etcds_nested_budget() {
        // A nested txn of 28 puts under a txn of 100 ops fits 128; of 29
        // does not (etcd: `checkRequestOp(u, maxTxnOps-opc)`).
        let puts = |n: usize, tag: &str| (0..n).map(|i| put(&format!("{tag}{i}"))).collect();
        let with_nested = |inner: usize| TxnRequest {
            success: std::iter::once(nested(TxnRequest {
                success: puts(inner, "in"),
                ..Default::default()
            }))
            .chain(puts(99, "out"))
            .collect(),
            ..Default::default()
        };
        assert_eq!(validate(&with_nested(28), MAX_TXN_OPS, &key_given), Ok(()));
        assert_eq!(
            validate(&with_nested(29), MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::TooManyOps)
        );
        // A duplicate and, later, a faulty op: the op's error wins.
        let both_faults = TxnRequest {
            success: vec![put("a"), put("a"), put("")],
            ..Default::default()
        };
        assert_eq!(
            validate(&both_faults, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::EmptyKey)
        );
        // The failure branch's op errors too come before any branch's
        // duplicates.
        let late_fault = TxnRequest {
            success: vec![put("a"), put("a")],
            failure: vec![RequestOp { request: None }],
            ..Default::default()
        };
        assert_eq!(
            validate(&late_fault, MAX_TXN_OPS, &key_given),
            Err(TxnCheckError::EmptyOp)
        );
    }
}
