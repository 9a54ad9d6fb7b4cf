//! Scenario tests for the MVCC store. Every test runs against both engines
//! (memory, and RocksDB in a temporary directory), with sparse revisions as
//! a shard sees them.

use super::*;
use crate::engine::{self, EngineKind};
use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use tempfile::TempDir;

/// One engine under test; `dir` keeps RocksDB's files alive and allows a
/// reopen from disk.
struct Env {
    kind: EngineKind,
    engine: Rc<dyn Engine>,
    dir: TempDir,
}

fn engines() -> Vec<Env> {
    engine::each_engine()
        .into_iter()
        .map(|(dir, kind, engine)| Env { kind, engine, dir })
        .collect()
}

/// A store plus the engine it persists to: applies writes the way a shard
/// does (finish, then write the batch).
struct Store {
    mvcc: Mvcc,
    engine: Rc<dyn Engine>,
}

impl Store {
    fn new(env: &Env) -> Store {
        Store {
            mvcc: Mvcc::open(env.engine.clone()).unwrap(),
            engine: env.engine.clone(),
        }
    }

    /// Runs `f` in a write at `rev`, then persists the batch.
    fn apply<R>(&mut self, rev: Rev, f: impl FnOnce(&mut MvccWrite<'_>) -> R) -> R {
        let mut w = self.mvcc.write(rev);
        let r = f(&mut w);
        let batch = w.finish();
        self.engine.write(batch, false).unwrap();
        r
    }

    fn put(&mut self, rev: Rev, key: &str, value: &str) -> PutResponse {
        self.apply(rev, |w| w.put(&put_req(key, value)).unwrap())
    }

    fn put_lease(&mut self, rev: Rev, key: &str, value: &str, lease: i64) {
        self.apply(rev, |w| {
            w.put(&PutRequest {
                lease,
                ..put_req(key, value)
            })
            .unwrap()
        });
    }

    fn delete(&mut self, rev: Rev, key: &str, end: &str) -> DeleteRangeResponse {
        self.apply(rev, |w| {
            w.delete_range(&del_req(key, end, true), ALL).unwrap()
        })
    }

    fn compact(&mut self, rev: Rev) -> Result<(), MvccError> {
        let batch = self.mvcc.compact(rev)?;
        self.engine.write(batch, true).unwrap();
        Ok(())
    }

    fn range(&self, key: &str, end: &str, rev: Rev) -> RangeResponse {
        self.mvcc.range(&range_req(key, end), rev, ALL).unwrap()
    }

    fn get(&self, key: &str, rev: Rev) -> Option<KeyValue> {
        let r = self.range(key, "", rev);
        assert!(r.kvs.len() <= 1);
        r.kvs.into_iter().next()
    }

    /// The number of version records in the engine.
    fn records(&self) -> usize {
        let (s, e) = keyspace::bounds(keyspace::MVCC_VERSION);
        let mut n = 0;
        self.engine
            .scan(&s, &e, &mut |_, _| {
                n += 1;
                true
            })
            .unwrap();
        n
    }

    /// Everything observable at each of `revs`, for reopen comparisons.
    fn snapshot(&self, revs: &[Rev]) -> Vec<Result<RangeResponse, String>> {
        revs.iter()
            .map(|&r| {
                self.mvcc
                    .range(&range_req("\0", "\0"), r, ALL)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}

fn all(_: &[u8]) -> bool {
    true
}
const ALL: Owns<'static> = &all;

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: b(key).into(),
        value: b(value).into(),
        ..Default::default()
    }
}

fn del_req(key: &str, end: &str, prev_kv: bool) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: b(key),
        range_end: b(end),
        prev_kv,
    }
}

fn range_req(key: &str, end: &str) -> RangeRequest {
    RangeRequest {
        key: b(key),
        range_end: b(end),
        ..Default::default()
    }
}

fn kv(key: &str, value: &str, create: Rev, modr: Rev, version: i64) -> KeyValue {
    KeyValue {
        key: b(key).into(),
        value: b(value).into(),
        create_revision: create,
        mod_revision: modr,
        version,
        lease: 0,
    }
}

fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

fn op_put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put_req(key, value))),
    }
}
fn op_get(key: &str, end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(range_req(key, end))),
    }
}
fn op_del(key: &str, end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(del_req(
            key, end, true,
        ))),
    }
}
fn op_txn(t: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestTxn(t)),
    }
}

fn cmp(
    key: &str,
    end: &str,
    target: CompareTarget,
    result: CompareResult,
    v: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: b(key),
        target_union: Some(v),
        range_end: b(end),
    }
}
fn cmp_version(key: &str, result: CompareResult, v: i64) -> Compare {
    cmp(
        key,
        "",
        CompareTarget::Version,
        result,
        TargetUnion::Version(v),
    )
}
fn cmp_value(key: &str, result: CompareResult, v: &str) -> Compare {
    cmp(
        key,
        "",
        CompareTarget::Value,
        result,
        TargetUnion::Value(b(v)),
    )
}

fn range_of(r: &ResponseOp) -> &RangeResponse {
    match &r.response {
        Some(response_op::Response::ResponseRange(r)) => r,
        other => panic!("expected a range response, got {other:?}"),
    }
}
fn put_of(r: &ResponseOp) -> &PutResponse {
    match &r.response {
        Some(response_op::Response::ResponsePut(r)) => r,
        other => panic!("expected a put response, got {other:?}"),
    }
}
fn del_of(r: &ResponseOp) -> &DeleteRangeResponse {
    match &r.response {
        Some(response_op::Response::ResponseDeleteRange(r)) => r,
        other => panic!("expected a delete response, got {other:?}"),
    }
}
fn txn_of(r: &ResponseOp) -> &TxnResponse {
    match &r.response {
        Some(response_op::Response::ResponseTxn(r)) => r,
        other => panic!("expected a txn response, got {other:?}"),
    }
}

#[test]
fn put_tracks_versions_and_revisions() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        assert_eq!(s.mvcc.current_revision(), 0, "{k}");
        assert_eq!(s.put(3, "a", "1").prev_kv, None, "{k}");
        s.put(7, "a", "2");
        s.put(8, "b", "x");
        let resp = s.apply(20, |w| {
            w.put(&PutRequest {
                prev_kv: true,
                ..put_req("a", "3")
            })
            .unwrap()
        });
        assert_eq!(resp.prev_kv, Some(kv("a", "2", 3, 7, 2)), "{k}");
        assert_eq!(resp.header, None, "{k}");
        assert_eq!(s.get("a", 0), Some(kv("a", "3", 3, 20, 3)), "{k}");
        assert_eq!(s.get("b", 0), Some(kv("b", "x", 8, 8, 1)), "{k}");
        assert_eq!(s.mvcc.current_revision(), 20, "{k}");
        assert_eq!(
            s.mvcc.get(b"a", 0).unwrap(),
            Some(kv("a", "3", 3, 20, 3)),
            "{k}"
        );
        assert_eq!(s.mvcc.get(b"zz", 0).unwrap(), None, "{k}");
        // Several changes in one revision share it.
        s.apply(21, |w| {
            w.put(&put_req("c", "c")).unwrap();
            w.put(&put_req("d", "d")).unwrap();
        });
        assert_eq!(s.get("c", 0).unwrap().mod_revision, 21, "{k}");
        assert_eq!(s.get("d", 0).unwrap().mod_revision, 21, "{k}");
        assert_eq!(s.mvcc.current_revision(), 21, "{k}");
    }
}

#[test]
fn historical_reads_see_exactly_revisions_up_to_r() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.put(7, "a", "2");
        s.put(8, "b", "x");
        s.put(20, "a", "3");
        assert_eq!(s.get("a", 2), None, "{k}");
        assert_eq!(s.get("a", 3), Some(kv("a", "1", 3, 3, 1)), "{k}");
        assert_eq!(s.get("a", 6), Some(kv("a", "1", 3, 3, 1)), "{k}");
        assert_eq!(s.get("a", 7), Some(kv("a", "2", 3, 7, 2)), "{k}");
        assert_eq!(s.get("a", 19), Some(kv("a", "2", 3, 7, 2)), "{k}");
        assert_eq!(s.get("a", 20), Some(kv("a", "3", 3, 20, 3)), "{k}");
        // Reads beyond the shard's current revision see the latest state
        // (the caller refuses revisions beyond the global one).
        assert_eq!(s.get("a", 1000), Some(kv("a", "3", 3, 20, 3)), "{k}");
        assert_eq!(keys(&s.range("a", "z", 7)), vec!["a"], "{k}");
        assert_eq!(keys(&s.range("a", "z", 8)), vec!["a", "b"], "{k}");
        assert_eq!(s.range("a", "z", 2).count, 0, "{k}");
    }
}

#[test]
fn tombstones_end_generations_and_recreation_starts_new_ones() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.put(5, "a", "2");
        let d = s.delete(7, "a", "");
        assert_eq!(d.deleted, 1, "{k}");
        assert_eq!(d.prev_kvs, vec![kv("a", "2", 3, 5, 2)], "{k}");
        assert_eq!(s.get("a", 7), None, "{k}");
        assert_eq!(s.get("a", 8), None, "{k}");
        assert_eq!(s.get("a", 6), Some(kv("a", "2", 3, 5, 2)), "{k}");
        s.put(9, "a", "new");
        assert_eq!(s.get("a", 9), Some(kv("a", "new", 9, 9, 1)), "{k}");
        s.put(12, "a", "newer");
        assert_eq!(s.get("a", 0), Some(kv("a", "newer", 9, 12, 2)), "{k}");
        assert_eq!(s.get("a", 4), Some(kv("a", "1", 3, 3, 1)), "{k}");
        // Deleting nothing consumes no revision.
        let mut w = s.mvcc.write(15);
        let d = w.delete_range(&del_req("zzz", "", true), ALL).unwrap();
        assert_eq!(d.deleted, 0, "{k}");
        assert!(d.prev_kvs.is_empty(), "{k}");
        assert!(w.is_empty(), "{k}");
        assert!(w.finish().is_empty(), "{k}");
        assert_eq!(s.mvcc.current_revision(), 12, "{k}");
        // Deleting an already deleted key is also nothing.
        s.delete(16, "a", "");
        let d = s.delete(17, "a", "");
        assert_eq!(d.deleted, 0, "{k}");
        assert_eq!(s.mvcc.current_revision(), 16, "{k}");
    }
}

#[test]
fn delete_range_with_prev_kv_and_ranges() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        for (i, key) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            s.put(10 + i as Rev, key, &format!("v{key}"));
        }
        let d = s.delete(20, "b", "d");
        assert_eq!(d.deleted, 2, "{k}");
        assert_eq!(
            d.prev_kvs,
            vec![kv("b", "vb", 11, 11, 1), kv("c", "vc", 12, 12, 1)],
            "{k}"
        );
        assert_eq!(keys(&s.range("\0", "\0", 0)), vec!["a", "d", "e"], "{k}");
        // Without prev_kv.
        let d = s.apply(21, |w| {
            w.delete_range(&del_req("d", "\0", false), ALL).unwrap()
        });
        assert_eq!(d.deleted, 2, "{k}");
        assert!(d.prev_kvs.is_empty(), "{k}");
        assert_eq!(keys(&s.range("\0", "\0", 0)), vec!["a"], "{k}");
        // All the deletes are in history.
        assert_eq!(
            keys(&s.range("\0", "\0", 19)),
            vec!["a", "b", "c", "d", "e"],
            "{k}"
        );
        assert_eq!(keys(&s.range("\0", "\0", 20)), vec!["a", "d", "e"], "{k}");
        // Everything.
        let d = s.delete(22, "\0", "\0");
        assert_eq!(d.deleted, 1, "{k}");
        assert_eq!(s.range("\0", "\0", 0).count, 0, "{k}");
    }
}

/// Keys with different create/mod revisions and versions for the range
/// option tests:
///   key  value  create  mod  version
///   a    "3"    1       1    1
///   b    "1"    2       10   3
///   c    "2"    3       3    1
///   d    "5"    4       11   2
///   e    "4"    5       5    1
fn range_fixture(env: &Env) -> Store {
    let mut s = Store::new(env);
    s.put(1, "a", "3");
    s.put(2, "b", "x");
    s.put(3, "c", "2");
    s.put(4, "d", "x");
    s.put(5, "e", "4");
    s.put(6, "b", "y");
    s.put(10, "b", "1");
    s.put(11, "d", "5");
    s
}

fn range_with(s: &Store, f: impl FnOnce(&mut RangeRequest)) -> RangeResponse {
    let mut req = range_req("a", "z");
    f(&mut req);
    s.mvcc.range(&req, 0, ALL).unwrap()
}

#[test]
fn range_key_forms() {
    for env in engines() {
        let k = env.kind;
        let s = range_fixture(&env);
        assert_eq!(keys(&s.range("b", "", 0)), vec!["b"], "{k}");
        assert_eq!(keys(&s.range("bb", "", 0)), Vec::<String>::new(), "{k}");
        assert_eq!(keys(&s.range("b", "d", 0)), vec!["b", "c"], "{k}");
        assert_eq!(keys(&s.range("c", "\0", 0)), vec!["c", "d", "e"], "{k}");
        assert_eq!(
            keys(&s.range("\0", "\0", 0)),
            vec!["a", "b", "c", "d", "e"],
            "{k}"
        );
        // range_end <= key is empty.
        assert_eq!(s.range("d", "b", 0).count, 0, "{k}");
        assert_eq!(s.range("d", "d", 0).count, 0, "{k}");
        // Prefix.
        assert_eq!(s.range("a", "b", 0).count, 1, "{k}");
        let r = s.range("a", "z", 0);
        assert_eq!(r.count, 5, "{k}");
        assert!(!r.more, "{k}");
        assert_eq!(r.header, None, "{k}");
    }
}

#[test]
fn range_limit_more_count_count_only_keys_only() {
    for env in engines() {
        let k = env.kind;
        let mut s = range_fixture(&env);
        let r = range_with(&s, |r| r.limit = 2);
        assert_eq!(keys(&r), vec!["a", "b"], "{k}");
        assert!(r.more, "{k}");
        assert_eq!(r.count, 5, "{k}");
        let r = range_with(&s, |r| r.limit = 5);
        assert_eq!(r.kvs.len(), 5, "{k}");
        assert!(!r.more, "{k}");
        let r = range_with(&s, |r| r.limit = 4);
        assert!(r.more, "{k}");
        let r = range_with(&s, |r| r.limit = 50);
        assert!(!r.more, "{k}");
        assert_eq!(r.count, 5, "{k}");
        // Ascending by key is key order: the page and the count as without
        // a sort.
        let r = range_with(&s, |r| {
            r.limit = 2;
            r.sort_order = SortOrder::Ascend as i32;
            r.sort_target = SortTarget::Key as i32;
        });
        assert_eq!(keys(&r), vec!["a", "b"], "{k}");
        assert!(r.more, "{k}");
        assert_eq!(r.count, 5, "{k}");

        let r = range_with(&s, |r| {
            r.count_only = true;
            r.limit = 1;
        });
        assert!(r.kvs.is_empty(), "{k}");
        assert_eq!(r.count, 5, "{k}");
        assert!(!r.more, "{k}");

        let r = range_with(&s, |r| r.keys_only = true);
        assert_eq!(keys(&r), vec!["a", "b", "c", "d", "e"], "{k}");
        assert!(r.kvs.iter().all(|kv| kv.value.is_empty()), "{k}");
        assert_eq!(r.kvs[1].version, 3, "{k}");
        assert_eq!(r.kvs[1].mod_revision, 10, "{k}");
        assert_eq!(r.kvs[1].create_revision, 2, "{k}");
        // Built from the key index without reading records: the same
        // versions as a full read, values aside.
        s.put_lease(12, "c", "2", 7);
        let r = range_with(&s, |r| r.keys_only = true);
        assert_eq!(r.kvs[2].lease, 7, "{k}");
        let mut full = range_with(&s, |_| {});
        for kv in &mut full.kvs {
            kv.value = Default::default();
        }
        assert_eq!(r.kvs, full.kvs, "{k}");
    }
}

#[test]
fn range_sorts_by_every_target_and_order() {
    for env in engines() {
        let k = env.kind;
        let s = range_fixture(&env);
        let sorted = |order: SortOrder, target: SortTarget| {
            keys(&range_with(&s, |r| {
                r.sort_order = order as i32;
                r.sort_target = target as i32;
            }))
        };
        use SortOrder::*;
        use SortTarget::*;
        assert_eq!(sorted(None, Key), vec!["a", "b", "c", "d", "e"], "{k}");
        assert_eq!(sorted(Ascend, Key), vec!["a", "b", "c", "d", "e"], "{k}");
        assert_eq!(sorted(Descend, Key), vec!["e", "d", "c", "b", "a"], "{k}");
        // Versions: a1 b3 c1 d2 e1 (ties keep key order).
        assert_eq!(
            sorted(Ascend, Version),
            vec!["a", "c", "e", "d", "b"],
            "{k}"
        );
        assert_eq!(sorted(None, Version), vec!["a", "c", "e", "d", "b"], "{k}");
        assert_eq!(
            sorted(Descend, Version),
            vec!["b", "d", "a", "c", "e"],
            "{k}"
        );
        // Create: a1 b2 c3 d4 e5.
        assert_eq!(sorted(Ascend, Create), vec!["a", "b", "c", "d", "e"], "{k}");
        assert_eq!(sorted(None, Create), vec!["a", "b", "c", "d", "e"], "{k}");
        assert_eq!(
            sorted(Descend, Create),
            vec!["e", "d", "c", "b", "a"],
            "{k}"
        );
        // Mod: a1 b10 c3 d11 e5.
        assert_eq!(sorted(Ascend, Mod), vec!["a", "c", "e", "b", "d"], "{k}");
        assert_eq!(sorted(None, Mod), vec!["a", "c", "e", "b", "d"], "{k}");
        assert_eq!(sorted(Descend, Mod), vec!["d", "b", "e", "c", "a"], "{k}");
        // Value: a"3" b"1" c"2" d"5" e"4".
        assert_eq!(sorted(Ascend, Value), vec!["b", "c", "a", "e", "d"], "{k}");
        assert_eq!(sorted(None, Value), vec!["b", "c", "a", "e", "d"], "{k}");
        assert_eq!(sorted(Descend, Value), vec!["d", "e", "a", "c", "b"], "{k}");

        // Sorting fetches everything before the limit applies.
        let r = range_with(&s, |r| {
            r.sort_order = Descend as i32;
            r.sort_target = Mod as i32;
            r.limit = 2;
        });
        assert_eq!(keys(&r), vec!["d", "b"], "{k}");
        assert!(r.more, "{k}");
        assert_eq!(r.count, 5, "{k}");
        let r = range_with(&s, |r| {
            r.sort_order = Ascend as i32;
            r.sort_target = Value as i32;
            r.limit = 1;
            r.keys_only = true;
        });
        assert_eq!(keys(&r), vec!["b"], "{k}");
        assert!(r.kvs[0].value.is_empty(), "{k}");
        assert!(r.more, "{k}");
        // etcd quirk: a non-KEY target with order NONE fetches limit+1 keys
        // in key order, then sorts those ascending.
        let r = range_with(&s, |r| {
            r.sort_target = Mod as i32;
            r.limit = 2;
        });
        assert_eq!(keys(&r), vec!["a", "c"], "{k}");
        assert!(r.more, "{k}");
    }
}

#[test]
fn range_filters_by_mod_and_create_revision() {
    for env in engines() {
        let k = env.kind;
        let s = range_fixture(&env);
        let filtered = |f: &dyn Fn(&mut RangeRequest)| {
            let r = range_with(&s, |r| f(r));
            assert_eq!(r.count, 5, "count ignores filters ({k})");
            keys(&r)
        };
        // Mod: a1 b10 c3 d11 e5; create: a1 b2 c3 d4 e5.
        assert_eq!(
            filtered(&|r| r.min_mod_revision = 5),
            vec!["b", "d", "e"],
            "{k}"
        );
        assert_eq!(
            filtered(&|r| r.max_mod_revision = 5),
            vec!["a", "c", "e"],
            "{k}"
        );
        assert_eq!(
            filtered(&|r| {
                r.min_mod_revision = 3;
                r.max_mod_revision = 10;
            }),
            vec!["b", "c", "e"],
            "{k}"
        );
        assert_eq!(
            filtered(&|r| r.min_create_revision = 4),
            vec!["d", "e"],
            "{k}"
        );
        assert_eq!(
            filtered(&|r| r.max_create_revision = 2),
            vec!["a", "b"],
            "{k}"
        );
        assert_eq!(
            filtered(&|r| {
                r.min_create_revision = 2;
                r.max_create_revision = 4;
            }),
            vec!["b", "c", "d"],
            "{k}"
        );
        // Filters with a limit: filter first, then truncate.
        let r = range_with(&s, |r| {
            r.min_mod_revision = 5;
            r.limit = 2;
        });
        assert_eq!(keys(&r), vec!["b", "d"], "{k}");
        assert!(r.more, "{k}");
        let r = range_with(&s, |r| {
            r.min_mod_revision = 5;
            r.limit = 3;
        });
        assert!(!r.more, "{k}");
        // Filters and sort together.
        let r = range_with(&s, |r| {
            r.min_create_revision = 2;
            r.sort_order = SortOrder::Descend as i32;
            r.sort_target = SortTarget::Version as i32;
        });
        assert_eq!(keys(&r), vec!["b", "d", "c", "e"], "{k}");
    }
}

#[test]
fn binary_keys() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        let keys_ = [
            vec![0u8],
            vec![0, 0],
            vec![0xff],
            vec![0xff, 0xff],
            vec![b'a', 0, b'b'],
        ];
        s.apply(4, |w| {
            for key in &keys_ {
                w.put(&PutRequest {
                    key: key.clone().into(),
                    value: key.clone().into(),
                    ..Default::default()
                })
                .unwrap();
            }
        });
        let all = s.range("\0", "\0", 0);
        let got: Vec<Vec<u8>> = all.kvs.iter().map(|kv| kv.key.to_vec()).collect();
        let mut want = keys_.to_vec();
        want.sort();
        assert_eq!(got, want, "{k}");
        assert!(all.kvs.iter().all(|kv| kv.key == kv.value), "{k}");
        let req = RangeRequest {
            key: vec![0xff],
            range_end: vec![0],
            ..Default::default()
        };
        assert_eq!(s.mvcc.range(&req, 0, ALL).unwrap().count, 2, "{k}");
        let req = RangeRequest {
            key: vec![0],
            range_end: vec![0, 1],
            ..Default::default()
        };
        assert_eq!(s.mvcc.range(&req, 0, ALL).unwrap().count, 2, "{k}");
        s.apply(9, |w| {
            w.delete_range(
                &DeleteRangeRequest {
                    key: vec![0xff],
                    range_end: vec![0],
                    prev_kv: false,
                },
                ALL,
            )
            .unwrap()
        });
        assert_eq!(s.range("\0", "\0", 0).count, 3, "{k}");
    }
}

#[test]
fn ignore_value_and_ignore_lease() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put_lease(3, "a", "v1", 77);
        // ignore_value keeps the value, takes the new lease.
        s.apply(5, |w| {
            w.put(&PutRequest {
                key: b("a").into(),
                ignore_value: true,
                lease: 88,
                ..Default::default()
            })
            .unwrap()
        });
        let a = s.get("a", 0).unwrap();
        assert_eq!(
            (&a.value[..], a.lease, a.version),
            (&b"v1"[..], 88, 2),
            "{k}"
        );
        // ignore_lease keeps the lease, takes the new value.
        s.apply(6, |w| {
            w.put(&PutRequest {
                key: b("a").into(),
                value: b("v2").into(),
                ignore_lease: true,
                ..Default::default()
            })
            .unwrap()
        });
        let a = s.get("a", 0).unwrap();
        assert_eq!((&a.value[..], a.lease), (&b"v2"[..], 88), "{k}");
        // Missing key: KeyNotFound, nothing written.
        for req in [
            PutRequest {
                key: b("nope").into(),
                ignore_value: true,
                ..Default::default()
            },
            PutRequest {
                key: b("nope").into(),
                ignore_lease: true,
                ..Default::default()
            },
        ] {
            let mut w = s.mvcc.write(9);
            assert!(matches!(w.put(&req), Err(MvccError::KeyNotFound)), "{k}");
            assert!(w.is_empty(), "{k}");
        }
        assert_eq!(s.mvcc.current_revision(), 6, "{k}");
        // A plain put clears the lease.
        s.put(10, "a", "v3");
        assert_eq!(s.get("a", 0).unwrap().lease, 0, "{k}");
        assert_eq!(s.get("a", 7).unwrap().lease, 88, "{k}");
    }
}

#[test]
fn out_of_order_revisions_are_checked_per_key() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(10, "a", "1");
        s.put(31, "other", "o");
        // A write at 30 (below the current 31), as a cross-shard commit
        // arriving after an unrelated write: reads the state at 30.
        let resp = s.apply(30, |w| {
            let r = w.range(&range_req("\0", "\0"), ALL).unwrap();
            assert_eq!(keys(&r), vec!["a"], "{k}");
            w.put(&put_req("b", "B")).unwrap();
            w.put(&PutRequest {
                prev_kv: true,
                ..put_req("a", "2")
            })
            .unwrap()
        });
        assert_eq!(resp.prev_kv, Some(kv("a", "1", 10, 10, 1)), "{k}");
        assert_eq!(s.mvcc.current_revision(), 31, "{k}");
        assert_eq!(s.get("b", 30), Some(kv("b", "B", 30, 30, 1)), "{k}");
        assert_eq!(s.get("b", 29), None, "{k}");
        assert_eq!(s.get("other", 30), None, "{k}");
        assert_eq!(s.get("other", 31), Some(kv("other", "o", 31, 31, 1)), "{k}");
        assert_eq!(s.get("a", 31), Some(kv("a", "2", 10, 30, 2)), "{k}");
        // A key with a version at or above the write's revision is refused.
        for (rev, key, latest) in [(31, "other", 31), (20, "a", 30), (30, "a", 30)] {
            let mut w = s.mvcc.write(rev);
            match w.put(&put_req(key, "x")) {
                Err(MvccError::StaleRevision { rev: r, latest: l }) => {
                    assert_eq!((r, l), (rev, latest), "{k}")
                }
                other => panic!("{k}: expected StaleRevision, got {other:?}"),
            }
            assert!(
                matches!(
                    w.delete_range(&del_req(key, "", false), ALL),
                    Err(MvccError::StaleRevision { .. })
                ),
                "{k}"
            );
            assert!(w.is_empty(), "{k}");
        }
        // Deleting a key that does not exist at the write's revision is a
        // no-op, even if it exists later.
        let d = s.apply(5, |w| {
            w.delete_range(&del_req("a", "", false), ALL).unwrap()
        });
        assert_eq!(d.deleted, 0, "{k}");
        // Revision <= 0 never writes.
        let mut w = s.mvcc.write(0);
        assert!(
            matches!(
                w.put(&put_req("z", "z")),
                Err(MvccError::StaleRevision { .. })
            ),
            "{k}"
        );
        drop(w);
        // Another part of revision 30: sub-revisions continue after the
        // stored ones, so no record is overwritten.
        s.put(30, "c", "C");
        assert_eq!(s.records(), 5, "{k}");
        assert_eq!(s.get("b", 30), Some(kv("b", "B", 30, 30, 1)), "{k}");
        let mut at30 = Vec::new();
        s.mvcc
            .history(30, true, &mut |e| {
                let kv = e.kv.unwrap();
                if kv.mod_revision == 30 {
                    at30.push(String::from_utf8(kv.key.to_vec()).unwrap());
                }
                true
            })
            .unwrap();
        assert_eq!(at30, vec!["b", "a", "c"], "{k}");
        // The index rebuilt from the engine is the same.
        let revs = [10, 29, 30, 31];
        let reopened = Store::new(&env);
        assert_eq!(reopened.snapshot(&revs), s.snapshot(&revs), "{k}");
        assert_eq!(reopened.mvcc.current_revision(), 31, "{k}");
    }
}

#[test]
fn write_reads_see_own_writes_and_history() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.put(5, "b", "1");
        let mut w = s.mvcc.write(8);
        w.put(&put_req("c", "new")).unwrap();
        w.put(&put_req("a", "2")).unwrap();
        w.delete_range(&del_req("b", "", false), ALL).unwrap();
        let r = w.range(&range_req("a", "z"), ALL).unwrap();
        assert_eq!(
            r.kvs,
            vec![kv("a", "2", 3, 8, 2), kv("c", "new", 8, 8, 1)],
            "{k}"
        );
        assert_eq!(r.count, 2, "{k}");
        // Historical read inside the write.
        let r = w
            .range(
                &RangeRequest {
                    revision: 4,
                    ..range_req("a", "z")
                },
                ALL,
            )
            .unwrap();
        assert_eq!(r.kvs, vec![kv("a", "1", 3, 3, 1)], "{k}");
        // The write's own revision is a future one, as in etcd (which
        // compares with the revision before the txn).
        for revision in [8, 9] {
            assert!(matches!(
                w.range(
                    &RangeRequest {
                        revision,
                        ..range_req("a", "z")
                    },
                    ALL
                ),
                Err(MvccError::FutureRevision)
            ));
        }
        // Not visible outside before finish.
        let (batch, events) = w.finish_with_events();
        assert_eq!(s.mvcc.current_revision(), 8, "{k}");
        s.engine.write(batch, false).unwrap();
        // Neither replaced version was read: the events name them.
        assert_eq!(
            events
                .iter()
                .map(|e| (
                    e.kind,
                    e.key().to_vec(),
                    match &e.replaced {
                        Replaced::Stored(p) => Some(p.rev.main),
                        Replaced::Nothing => None,
                        Replaced::Read(kv) => panic!("{k}: read {kv:?}"),
                    }
                ))
                .collect::<Vec<_>>(),
            vec![
                (EventType::Put, b("c"), None),
                (EventType::Put, b("a"), Some(3)),
                (EventType::Delete, b("b"), Some(5))
            ],
            "{k}"
        );
        assert_eq!(
            events[2].kv,
            KeyValue {
                key: b("b").into(),
                mod_revision: 8,
                ..Default::default()
            },
            "{k}"
        );
        let read = |e: &WriteEvent| match &e.replaced {
            Replaced::Stored(p) => s.mvcc.read_prev(e.key(), p),
            other => panic!("{k}: not stored: {other:?}"),
        };
        assert_eq!(read(&events[1]), Some(kv("a", "1", 3, 3, 1)), "{k}");
        assert_eq!(read(&events[2]), Some(kv("b", "1", 5, 5, 1)), "{k}");
        assert_eq!(keys(&s.range("a", "z", 0)), vec!["a", "c"], "{k}");
        // A dropped write leaves no trace.
        {
            let mut w = s.mvcc.write(9);
            w.put(&put_req("dropped", "x")).unwrap();
        }
        assert_eq!(s.get("dropped", 0), None, "{k}");
        assert_eq!(s.mvcc.current_revision(), 8, "{k}");
    }
}

/// Reads `version` (stored at its mod revision) as a watch event's
/// `prev_kv`, compacts at `at` (above it), and checks that it now reads as
/// absent: etcd sends such an event without its `prev_kv`.
fn prev_reads_as_absent_after_compaction(s: &mut Store, version: KeyValue, at: Rev, k: EngineKind) {
    let named = StoredPrev {
        rev: Revision {
            main: version.mod_revision,
            sub: 0,
        },
        lease: version.lease,
    };
    assert_eq!(
        s.mvcc.read_prev(&version.key, &named),
        Some(version.clone()),
        "{k}"
    );
    s.compact(at).unwrap();
    assert_eq!(s.mvcc.read_prev(&version.key, &named), None, "{k}");
}

#[test]
fn record_cache_answers_as_the_engine_and_forgets_compacted_versions() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.put(4, "b", "1");
        s.put(7, "a", "2");
        s.delete(9, "b", "");
        let revs = [3, 4, 7, 8, 9, 0];
        // Reads fill the cache; reading again answers from it.
        let first = s.snapshot(&revs);
        assert_eq!(first, s.snapshot(&revs), "{k}");
        assert!(s.mvcc.cache.borrow().len() >= 3, "{k}");
        // A store without a cache over the same engine agrees.
        let mut uncached = Mvcc::open(env.engine.clone()).unwrap();
        uncached.set_record_cache_bytes(0);
        let plain = Store {
            mvcc: uncached,
            engine: env.engine.clone(),
        };
        assert_eq!(first, plain.snapshot(&revs), "{k}");
        // Compaction deletes a@3 from the engine and from the cache (which
        // reading it as a prev_kv has just filled).
        prev_reads_as_absent_after_compaction(&mut s, kv("a", "1", 3, 3, 1), 7, k);
        assert_eq!(s.get("a", 0), Some(kv("a", "2", 3, 7, 2)), "{k}");
    }
}

#[test]
fn txn_applies_along_path_with_nested_txns() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(2, "a", "1");
        s.put(4, "b", "1");
        // if a.version == 1 then { put x; get x; txn { if b.value == "2" then put y else { del b; get b..c } } }
        // else { put z }
        let txn = TxnRequest {
            compare: vec![cmp_version("a", CompareResult::Equal, 1)],
            success: vec![
                op_put("x", "xv"),
                op_get("x", ""),
                op_txn(TxnRequest {
                    compare: vec![cmp_value("b", CompareResult::Equal, "2")],
                    success: vec![op_put("y", "yv")],
                    failure: vec![op_del("b", ""), op_get("b", "c")],
                }),
                op_get("a", "z"),
            ],
            failure: vec![op_put("z", "zv")],
        };
        let path = compute_path(&s.mvcc, &txn, 0, ALL).unwrap();
        assert_eq!(path, vec![true, false], "{k}");
        let resp = s.apply(7, |w| w.txn(&txn, &path, ALL).unwrap());
        assert!(resp.succeeded, "{k}");
        assert_eq!(resp.header, None, "{k}");
        assert_eq!(resp.responses.len(), 4, "{k}");
        assert_eq!(put_of(&resp.responses[0]), &PutResponse::default(), "{k}");
        // Reads see the txn's own earlier writes.
        assert_eq!(
            range_of(&resp.responses[1]).kvs,
            vec![kv("x", "xv", 7, 7, 1)],
            "{k}"
        );
        let nested = txn_of(&resp.responses[2]);
        assert!(!nested.succeeded, "{k}");
        assert_eq!(nested.responses.len(), 2, "{k}");
        assert_eq!(del_of(&nested.responses[0]).deleted, 1, "{k}");
        assert_eq!(
            del_of(&nested.responses[0]).prev_kvs,
            vec![kv("b", "1", 4, 4, 1)],
            "{k}"
        );
        assert_eq!(range_of(&nested.responses[1]).count, 0, "{k}");
        assert_eq!(keys(range_of(&resp.responses[3])), vec!["a", "x"], "{k}");
        assert_eq!(s.mvcc.current_revision(), 7, "{k}");
        assert_eq!(keys(&s.range("\0", "\0", 0)), vec!["a", "x"], "{k}");

        // Now a.version is still 1 but x exists: the failure branch.
        let txn2 = TxnRequest {
            compare: vec![cmp_version("x", CompareResult::Equal, 0)],
            success: vec![op_put("never", "1")],
            failure: vec![op_put("z", "zv"), op_get("z", "")],
        };
        let path = compute_path(&s.mvcc, &txn2, 0, ALL).unwrap();
        assert_eq!(path, vec![false], "{k}");
        let resp = s.apply(9, |w| w.txn(&txn2, &path, ALL).unwrap());
        assert!(!resp.succeeded, "{k}");
        assert_eq!(
            range_of(&resp.responses[1]).kvs,
            vec![kv("z", "zv", 9, 9, 1)],
            "{k}"
        );
        assert_eq!(s.get("never", 0), None, "{k}");

        // A read-only txn consumes no revision.
        let ro = TxnRequest {
            compare: vec![],
            success: vec![op_get("a", "")],
            failure: vec![],
        };
        let resp = s.apply(11, |w| w.txn(&ro, &[true], ALL).unwrap());
        assert_eq!(range_of(&resp.responses[0]).count, 1, "{k}");
        assert_eq!(s.mvcc.current_revision(), 9, "{k}");
        // A path that does not fit the txn is refused.
        let mut w = s.mvcc.write(12);
        assert!(
            matches!(w.txn(&txn, &[true], ALL), Err(MvccError::InvalidRequest(_))),
            "{k}"
        );
        assert!(w.is_empty(), "{k}");
    }
}

#[test]
fn failed_txn_is_rolled_back() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(2, "a", "1");
        let txn = TxnRequest {
            compare: vec![],
            success: vec![
                op_put("b", "1"),
                op_del("a", ""),
                RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b("missing").into(),
                        ignore_value: true,
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![],
        };
        let mut w = s.mvcc.write(5);
        w.put(&put_req("before", "1")).unwrap();
        assert!(
            matches!(w.txn(&txn, &[true], ALL), Err(MvccError::KeyNotFound)),
            "{k}"
        );
        // The write's earlier change stays; the txn's are gone.
        let r = w.range(&range_req("\0", "\0"), ALL).unwrap();
        assert_eq!(keys(&r), vec!["a", "before"], "{k}");
        let batch = w.finish();
        s.engine.write(batch, false).unwrap();
        assert_eq!(keys(&s.range("\0", "\0", 0)), vec!["a", "before"], "{k}");
        assert_eq!(s.get("a", 0), Some(kv("a", "1", 2, 2, 1)), "{k}");
    }
}

/// A write finds each key's newest change by scanning its changes while
/// they are few and through a map beyond `LATEST_BY_SCAN`: reads inside
/// the write, the versions it gives, its events and a rollback must be
/// the same on both sides of that line. Keys are rewritten and deleted
/// over and over, and every step is checked against a plain model.
#[test]
fn many_changes_in_one_write_read_the_same_as_few() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(2, "k1", "stored");
        s.put(3, "k4", "stored");
        // key -> the version the write should see.
        let mut model: BTreeMap<String, KeyValue> = BTreeMap::new();
        model.insert("k1".into(), kv("k1", "stored", 2, 2, 1));
        model.insert("k4".into(), kv("k4", "stored", 3, 3, 1));
        let mut w = s.mvcc.write(10);
        for step in 0..(3 * LATEST_BY_SCAN) {
            let key = format!("k{}", step % 5);
            if step % 7 == 6 {
                w.delete_range(&del_req(&key, "", false), ALL).unwrap();
                model.remove(&key);
            } else {
                let value = format!("v{step}");
                w.put(&put_req(&key, &value)).unwrap();
                let (create, version) = model
                    .get(&key)
                    .map_or((10, 1), |old| (old.create_revision, old.version + 1));
                model.insert(key.clone(), kv(&key, &value, create, 10, version));
            }
            let r = w.range(&range_req("\0", "\0"), ALL).unwrap();
            let want: Vec<KeyValue> = model.values().cloned().collect();
            assert_eq!(r.kvs, want, "{k}: step {step}");
            let one = w.range(&range_req(&key, ""), ALL).unwrap();
            assert_eq!(
                one.kvs,
                want.iter()
                    .filter(|kv| kv.key == b(&key))
                    .cloned()
                    .collect::<Vec<_>>(),
                "{k}: step {step}"
            );
        }
        // A txn failing after enough changes to index them rolls back to
        // fewer than the scan handles.
        let before = w.range(&range_req("\0", "\0"), ALL).unwrap();
        let txn = TxnRequest {
            compare: vec![],
            success: (0..2 * LATEST_BY_SCAN)
                .map(|i| op_put(&format!("t{}", i % 3), "x"))
                .chain([RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: b("missing").into(),
                        ignore_value: true,
                        ..Default::default()
                    })),
                }])
                .collect(),
            failure: vec![],
        };
        assert!(
            matches!(w.txn(&txn, &[true], ALL), Err(MvccError::KeyNotFound)),
            "{k}"
        );
        assert_eq!(w.range(&range_req("\0", "\0"), ALL).unwrap(), before, "{k}");
        let (batch, events) = w.finish_with_events();
        s.engine.write(batch, false).unwrap();
        assert_eq!(events.len(), 3 * LATEST_BY_SCAN, "{k}");
        let after = s.range("\0", "\0", 0);
        assert_eq!(after.kvs, before.kvs, "{k}");
    }
}

#[test]
fn ops_on_keys_not_owned_yield_empty_responses() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        let owns_a = |key: &[u8]| key.first() == Some(&b'a');
        s.put(2, "a1", "1");
        s.put(3, "b1", "1"); // another shard's key, as if misrouted before
        let txn = TxnRequest {
            compare: vec![],
            success: vec![
                op_put("b2", "x"),
                op_get("b1", ""),
                op_del("b1", ""),
                op_put("a2", "y"),
                op_get("\0", "\0"),
                op_del("\0", "\0"),
            ],
            failure: vec![],
        };
        let resp = s.apply(5, |w| w.txn(&txn, &[true], &owns_a).unwrap());
        assert_eq!(resp.responses.len(), 6, "{k}");
        assert_eq!(put_of(&resp.responses[0]), &PutResponse::default(), "{k}");
        assert_eq!(
            range_of(&resp.responses[1]),
            &RangeResponse::default(),
            "{k}"
        );
        assert_eq!(
            del_of(&resp.responses[2]),
            &DeleteRangeResponse::default(),
            "{k}"
        );
        assert_eq!(put_of(&resp.responses[3]), &PutResponse::default(), "{k}");
        assert_eq!(keys(range_of(&resp.responses[4])), vec!["a1", "a2"], "{k}");
        assert_eq!(range_of(&resp.responses[4]).count, 2, "{k}");
        assert_eq!(del_of(&resp.responses[5]).deleted, 2, "{k}");
        // b1 untouched, b2 never written.
        assert_eq!(keys(&s.range("\0", "\0", 0)), vec!["b1"], "{k}");
        // Range and compares respect ownership too.
        assert_eq!(
            s.mvcc
                .range(&range_req("\0", "\0"), 3, &owns_a)
                .unwrap()
                .count,
            1,
            "{k}"
        );
        let t = TxnRequest {
            compare: vec![cmp_version("b1", CompareResult::Greater, 0)],
            ..Default::default()
        };
        let o = s.mvcc.evaluate_compares(&t, 0, &owns_a).unwrap();
        assert_eq!(
            o,
            vec![CompareOutcome {
                matched: false,
                all_true: true,
                zero_result: false
            }],
            "{k}"
        );
    }
}

fn outcome(matched: bool, all_true: bool, zero_result: bool) -> CompareOutcome {
    CompareOutcome {
        matched,
        all_true,
        zero_result,
    }
}

#[test]
fn evaluate_compares_for_every_target_and_result() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        // k1: value "m", create 3, mod 7, version 2, lease 5.
        s.put(3, "k1", "a");
        s.apply(7, |w| {
            w.put(&PutRequest {
                lease: 5,
                ..put_req("k1", "m")
            })
            .unwrap()
        });
        use CompareResult::*;
        use CompareTarget as T;
        let cases: Vec<(Compare, bool)> = vec![
            (
                cmp("k1", "", T::Version, Equal, TargetUnion::Version(2)),
                true,
            ),
            (
                cmp("k1", "", T::Version, NotEqual, TargetUnion::Version(2)),
                false,
            ),
            (
                cmp("k1", "", T::Version, Greater, TargetUnion::Version(1)),
                true,
            ),
            (
                cmp("k1", "", T::Version, Less, TargetUnion::Version(2)),
                false,
            ),
            (
                cmp("k1", "", T::Create, Equal, TargetUnion::CreateRevision(3)),
                true,
            ),
            (
                cmp("k1", "", T::Create, Less, TargetUnion::CreateRevision(4)),
                true,
            ),
            (
                cmp("k1", "", T::Create, Greater, TargetUnion::CreateRevision(3)),
                false,
            ),
            (
                cmp("k1", "", T::Mod, Equal, TargetUnion::ModRevision(7)),
                true,
            ),
            (
                cmp("k1", "", T::Mod, Greater, TargetUnion::ModRevision(6)),
                true,
            ),
            (
                cmp("k1", "", T::Mod, NotEqual, TargetUnion::ModRevision(7)),
                false,
            ),
            (
                cmp("k1", "", T::Value, Equal, TargetUnion::Value(b("m"))),
                true,
            ),
            (
                cmp("k1", "", T::Value, Greater, TargetUnion::Value(b("a"))),
                true,
            ),
            (
                cmp("k1", "", T::Value, Less, TargetUnion::Value(b("z"))),
                true,
            ),
            (
                cmp("k1", "", T::Value, Less, TargetUnion::Value(b("m"))),
                false,
            ),
            (
                cmp("k1", "", T::Value, NotEqual, TargetUnion::Value(b("x"))),
                true,
            ),
            (cmp("k1", "", T::Lease, Equal, TargetUnion::Lease(5)), true),
            (
                cmp("k1", "", T::Lease, Greater, TargetUnion::Lease(5)),
                false,
            ),
            (cmp("k1", "", T::Lease, Less, TargetUnion::Lease(6)), true),
            // A union of the wrong kind compares against zero.
            (
                cmp("k1", "", T::Version, Greater, TargetUnion::Value(b("x"))),
                true,
            ),
        ];
        for (c, want) in &cases {
            let t = TxnRequest {
                compare: vec![c.clone()],
                ..Default::default()
            };
            let o = s.mvcc.evaluate_compares(&t, 0, ALL).unwrap();
            assert_eq!(o.len(), 1);
            assert!(o[0].matched, "{k} {c:?}");
            assert_eq!(o[0].all_true, *want, "{k} {c:?}");
            let path = compute_path(&s.mvcc, &t, 0, ALL).unwrap();
            assert_eq!(path, vec![*want], "{k} {c:?}");
        }
        // At an older revision the same compare sees the older version.
        let t = TxnRequest {
            compare: vec![cmp_value("k1", Equal, "a")],
            ..Default::default()
        };
        assert_eq!(
            s.mvcc.evaluate_compares(&t, 5, ALL).unwrap(),
            vec![outcome(true, true, false)],
            "{k}"
        );
        assert_eq!(
            s.mvcc.evaluate_compares(&t, 7, ALL).unwrap(),
            vec![outcome(true, false, false)],
            "{k}"
        );
    }
}

#[test]
fn evaluate_compares_on_missing_keys_and_ranges() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(2, "r1", "1");
        s.put(3, "r2", "2");
        s.put(4, "r3", "3");
        use CompareResult::*;
        use CompareTarget as T;
        let eval = |c: Compare| {
            let t = TxnRequest {
                compare: vec![c],
                ..Default::default()
            };
            let o = s.mvcc.evaluate_compares(&t, 0, ALL).unwrap();
            let path = compute_path(&s.mvcc, &t, 0, ALL).unwrap();
            assert_eq!(path[0], metastore_proto::txn::combine_one(&[&o[0]]));
            o[0]
        };
        // Missing key: zero KeyValue, except that value compares fail.
        assert_eq!(
            eval(cmp_version("nope", Equal, 0)),
            outcome(false, true, true),
            "{k}"
        );
        assert_eq!(
            eval(cmp_version("nope", Greater, 0)),
            outcome(false, true, false),
            "{k}"
        );
        assert_eq!(
            eval(cmp(
                "nope",
                "",
                T::Create,
                Equal,
                TargetUnion::CreateRevision(0)
            )),
            outcome(false, true, true),
            "{k}"
        );
        assert_eq!(
            eval(cmp("nope", "", T::Mod, Less, TargetUnion::ModRevision(1))),
            outcome(false, true, true),
            "{k}"
        );
        assert_eq!(
            eval(cmp("nope", "", T::Lease, Equal, TargetUnion::Lease(0))),
            outcome(false, true, true),
            "{k}"
        );
        assert_eq!(
            eval(cmp_value("nope", Equal, "")),
            outcome(false, true, false),
            "{k}"
        );
        assert_eq!(
            eval(cmp_value("nope", NotEqual, "x")),
            outcome(false, true, false),
            "{k}"
        );
        // Ranges: every key must satisfy.
        assert_eq!(
            eval(cmp("r", "s", T::Version, Equal, TargetUnion::Version(1))),
            outcome(true, true, false),
            "{k}"
        );
        assert_eq!(
            eval(cmp("r", "s", T::Value, Less, TargetUnion::Value(b("3")))),
            outcome(true, false, false),
            "{k}"
        );
        assert_eq!(
            eval(cmp("r", "s", T::Mod, Greater, TargetUnion::ModRevision(1))),
            outcome(true, true, false),
            "{k}"
        );
        assert_eq!(
            eval(cmp(
                "r2",
                "\0",
                T::Create,
                Greater,
                TargetUnion::CreateRevision(2)
            )),
            outcome(true, true, false),
            "{k}"
        );
        assert_eq!(
            eval(cmp("x", "z", T::Version, Equal, TargetUnion::Version(0))),
            outcome(false, true, true),
            "{k}"
        );
        // Canonical order across nested txns.
        let t = TxnRequest {
            compare: vec![cmp_version("r1", Equal, 1)],
            success: vec![op_txn(TxnRequest {
                compare: vec![cmp_version("r2", Equal, 5)],
                ..Default::default()
            })],
            failure: vec![op_txn(TxnRequest {
                compare: vec![cmp_value("nope", Equal, "")],
                ..Default::default()
            })],
        };
        assert_eq!(
            s.mvcc.evaluate_compares(&t, 0, ALL).unwrap(),
            vec![
                outcome(true, true, false),
                outcome(true, false, false),
                outcome(false, true, false)
            ],
            "{k}"
        );
        assert_eq!(
            compute_path(&s.mvcc, &t, 0, ALL).unwrap(),
            vec![true, false],
            "{k}"
        );
    }
}

#[test]
fn txn_read_at_a_revision() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(2, "a", "1");
        s.put(6, "a", "2");
        let t = TxnRequest {
            compare: vec![cmp_value("a", CompareResult::Equal, "1")],
            success: vec![
                op_get("a", ""),
                op_txn(TxnRequest {
                    success: vec![op_get("\0", "\0")],
                    ..Default::default()
                }),
            ],
            failure: vec![op_put("a", "x")],
        };
        let path = compute_path(&s.mvcc, &t, 3, ALL).unwrap();
        assert_eq!(path, vec![true, true], "{k}");
        let resp = s.mvcc.txn_read(&t, &path, 3, ALL).unwrap();
        assert!(resp.succeeded, "{k}");
        assert_eq!(
            range_of(&resp.responses[0]).kvs,
            vec![kv("a", "1", 2, 2, 1)],
            "{k}"
        );
        assert_eq!(
            range_of(&txn_of(&resp.responses[1]).responses[0]).count,
            1,
            "{k}"
        );
        // The failure branch writes: refused on the read path.
        let path = compute_path(&s.mvcc, &t, 0, ALL).unwrap();
        assert_eq!(path, vec![false], "{k}");
        assert!(
            matches!(
                s.mvcc.txn_read(&t, &path, 0, ALL),
                Err(MvccError::InvalidRequest(_))
            ),
            "{k}"
        );
    }
}

#[test]
fn compaction_drops_history_and_keeps_latest() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.put(7, "a", "2");
        s.put(8, "b", "1");
        s.delete(9, "b", "");
        s.put(10, "c", "1");
        s.delete(11, "c", "");
        s.put(12, "c", "2");
        s.put(20, "a", "3");
        assert_eq!(s.records(), 8, "{k}");
        assert!(
            matches!(s.compact(21), Err(MvccError::FutureRevision)),
            "{k}"
        );
        s.compact(10).unwrap();
        assert_eq!(s.mvcc.compacted_revision(), 10, "{k}");
        // a@3 dropped (a@7 is the newest <= 10), b's put and tombstone dropped,
        // c@10 kept (newest <= 10), c@11 and c@12 kept (> 10), a@20 kept.
        assert_eq!(s.records(), 5, "{k}");
        assert!(
            matches!(
                s.mvcc.range(&range_req("a", ""), 9, ALL),
                Err(MvccError::Compacted)
            ),
            "{k}"
        );
        assert!(
            matches!(
                s.mvcc.evaluate_compares(&TxnRequest::default(), 9, ALL),
                Err(MvccError::Compacted)
            ),
            "{k}"
        );
        assert_eq!(s.get("a", 10), Some(kv("a", "2", 3, 7, 2)), "{k}");
        assert_eq!(keys(&s.range("\0", "\0", 10)), vec!["a", "c"], "{k}");
        assert_eq!(keys(&s.range("\0", "\0", 11)), vec!["a"], "{k}");
        assert_eq!(s.get("c", 0), Some(kv("c", "2", 12, 12, 1)), "{k}");
        assert_eq!(s.get("a", 0), Some(kv("a", "3", 3, 20, 3)), "{k}");
        assert!(matches!(s.compact(10), Err(MvccError::Compacted)), "{k}");
        assert!(matches!(s.compact(5), Err(MvccError::Compacted)), "{k}");
        // Compacting at the current revision keeps c's delete at 25, which
        // a watch from 25 replays, with the version it ended; a compaction
        // above 25 takes both (below).
        s.delete(25, "c", "");
        s.compact(25).unwrap();
        assert_eq!(s.records(), 3, "{k}");
        assert_eq!(s.mvcc.key_count(), 2, "{k}");
        let mut at25 = Vec::new();
        s.mvcc
            .history(25, false, &mut |e| {
                let kv = e.kv.unwrap();
                at25.push((e.r#type, String::from_utf8(kv.key.to_vec()).unwrap()));
                true
            })
            .unwrap();
        assert_eq!(at25, vec![(EventType::Delete as i32, "c".into())], "{k}");
        assert_eq!(keys(&s.range("\0", "\0", 25)), vec!["a"], "{k}");
        assert_eq!(s.get("a", 25), Some(kv("a", "3", 3, 20, 3)), "{k}");
        // Writes continue; versions continue from the kept version.
        s.put(30, "a", "4");
        assert_eq!(s.get("a", 0), Some(kv("a", "4", 3, 30, 4)), "{k}");
        s.compact(26).unwrap();
        assert_eq!(s.records(), 2, "{k}");
        assert_eq!(s.mvcc.key_count(), 1, "{k}");
        // History replay below the compacted revision is refused.
        assert!(
            matches!(
                s.mvcc.history(24, true, &mut |_| true),
                Err(MvccError::Compacted)
            ),
            "{k}"
        );
    }
}

#[test]
fn compaction_at_a_global_revision_needs_the_floor_raised() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.delete(4, "a", "");
        assert!(
            matches!(s.compact(100), Err(MvccError::FutureRevision)),
            "{k}"
        );
        let batch = s.mvcc.set_current_revision(100);
        s.engine.write(batch, false).unwrap();
        assert!(s.mvcc.set_current_revision(50).is_empty(), "{k}");
        assert_eq!(s.mvcc.current_revision(), 100, "{k}");
        s.compact(100).unwrap();
        assert_eq!(s.records(), 0, "{k}");
        // A write below the floor is still accepted for untouched keys.
        s.put(50, "a", "x");
        assert_eq!(s.get("a", 0), Some(kv("a", "x", 50, 50, 1)), "{k}");
        assert_eq!(s.mvcc.current_revision(), 100, "{k}");
    }
}

/// A txn may put a key and then delete it (a delete to the end `\0`
/// conflicts with no put, as in etcd). etcd's watch reads each event's
/// previous version at the revision before the event's: both events carry
/// the version from before the write, live and replayed. The lease
/// bookkeeping still sees what each change replaced.
#[test]
fn a_key_changed_twice_in_one_write_has_its_previous_version_from_before_it() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        let mut w = s.mvcc.write(5);
        w.put(&PutRequest {
            lease: 9,
            ..put_req("a", "2")
        })
        .unwrap();
        w.delete_range(&del_req("a", "\0", false), ALL).unwrap();
        let (batch, events) = w.finish_with_events();
        s.engine.write(batch, false).unwrap();
        let watched: Vec<Option<KeyValue>> = events
            .iter()
            .map(|e| match e.watched_prev() {
                Replaced::Stored(p) => s.mvcc.read_prev(e.key(), p),
                Replaced::Read(kv) => Some(kv.clone()),
                Replaced::Nothing => None,
            })
            .collect();
        let before = Some(kv("a", "1", 3, 3, 1));
        assert_eq!(watched, vec![before.clone(), before.clone()], "{k}");
        assert_eq!(
            events[1].prev_lease(),
            9,
            "{k}: the delete replaced the leased put"
        );
        let mut replayed = Vec::new();
        s.mvcc
            .history(5, true, &mut |e| {
                replayed.push(e.prev_kv);
                true
            })
            .unwrap();
        assert_eq!(replayed, vec![before.clone(), before], "{k}");
    }
}

#[test]
fn history_replays_events_with_prev_kv() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put(3, "a", "1");
        s.put(5, "a", "2");
        s.apply(7, |w| {
            w.put(&put_req("b", "1")).unwrap();
            w.delete_range(&del_req("a", "", false), ALL).unwrap();
        });
        s.put(9, "a", "3");
        let mut events = Vec::new();
        s.mvcc
            .history(5, true, &mut |e| {
                events.push(e);
                true
            })
            .unwrap();
        // Without prev_kv, no previous version is read.
        let mut without = 0;
        s.mvcc
            .history(5, false, &mut |e| {
                assert!(e.prev_kv.is_none());
                without += 1;
                true
            })
            .unwrap();
        assert_eq!(without, events.len(), "{k}");
        let summary: Vec<(i32, String, Rev, Option<String>)> = events
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                (
                    e.r#type,
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    kv.mod_revision,
                    e.prev_kv
                        .as_ref()
                        .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                )
            })
            .collect();
        let put = EventType::Put as i32;
        let del = EventType::Delete as i32;
        assert_eq!(
            summary,
            vec![
                (put, "a".into(), 5, Some("1".into())),
                (put, "b".into(), 7, None),
                (del, "a".into(), 7, Some("2".into())),
                (put, "a".into(), 9, None),
            ],
            "{k}"
        );
        assert_eq!(events[0].kv, Some(kv("a", "2", 3, 5, 2)), "{k}");
        // Early stop.
        let mut n = 0;
        s.mvcc
            .history(0, true, &mut |_| {
                n += 1;
                n < 2
            })
            .unwrap();
        assert_eq!(n, 2, "{k}");
        // Many events (crosses the internal batch size).
        s.apply(10, |w| {
            for i in 0..600 {
                w.put(&put_req(&format!("many{i:04}"), "x")).unwrap();
            }
        });
        let mut n = 0;
        s.mvcc
            .history(10, true, &mut |e| {
                assert_eq!(e.kv.unwrap().mod_revision, 10);
                n += 1;
                true
            })
            .unwrap();
        assert_eq!(n, 600, "{k}");
    }
}

#[test]
fn for_each_live_visits_current_keys() {
    for env in engines() {
        let k = env.kind;
        let mut s = Store::new(&env);
        s.put_lease(2, "a", "1", 9);
        s.put(3, "b", "1");
        s.put_lease(4, "c", "1", 9);
        s.delete(5, "c", "");
        let mut leased = Vec::new();
        s.mvcc
            .for_each_live(b"\0", b"\0", &mut |kv| {
                if kv.lease == 9 {
                    leased.push(kv.key);
                }
                true
            })
            .unwrap();
        assert_eq!(leased, vec![b("a")], "{k}");
    }
}

#[test]
fn reopen_rebuilds_identical_state() {
    for env in engines() {
        let k = env.kind;
        let revs = [0, 2, 3, 5, 7, 8, 9, 11, 12, 15, 20];
        let (before, current, compacted) = {
            let mut s = Store::new(&env);
            s.put(2, "a", "1");
            s.put_lease(3, "b", "1", 4);
            s.put(5, "a", "2");
            s.apply(7, |w| {
                w.put(&put_req("c", "1")).unwrap();
                w.delete_range(&del_req("b", "", false), ALL).unwrap();
            });
            s.put(8, "b", "again");
            s.compact(5).unwrap();
            s.delete(9, "a", "");
            s.put(11, "\0zero", "z");
            s.put(12, "\u{ff}", "f");
            s.apply(15, |w| {
                w.delete_range(&del_req("\u{ff}", "", false), ALL).unwrap();
            });
            (
                s.snapshot(&revs),
                s.mvcc.current_revision(),
                s.mvcc.compacted_revision(),
            )
        };
        assert_eq!(current, 15, "{k}");
        assert_eq!(compacted, 5, "{k}");
        // Memory: a fresh store over the same engine; RocksDB: reopen the
        // files from disk.
        let engine = match env.kind {
            EngineKind::Memory => env.engine.clone(),
            EngineKind::RocksDb => {
                let Env { engine, dir, .. } = env;
                drop(engine);
                let reopened = engine::open(EngineKind::RocksDb, dir.path()).unwrap();
                let s = Store {
                    mvcc: Mvcc::open(reopened.clone()).unwrap(),
                    engine: reopened,
                };
                assert_eq!(s.snapshot(&revs), before, "{k}");
                assert_eq!(s.mvcc.current_revision(), current, "{k}");
                assert_eq!(s.mvcc.compacted_revision(), compacted, "{k}");
                continue_after_reopen(s, k);
                continue;
            }
        };
        let s = Store {
            mvcc: Mvcc::open(engine.clone()).unwrap(),
            engine,
        };
        assert_eq!(s.snapshot(&revs), before, "{k}");
        assert_eq!(s.mvcc.current_revision(), current, "{k}");
        assert_eq!(s.mvcc.compacted_revision(), compacted, "{k}");
        continue_after_reopen(s, k);
    }
}

/// After a reopen, writes continue the histories where they were.
fn continue_after_reopen(mut s: Store, k: EngineKind) {
    assert!(
        matches!(
            s.mvcc.range(&range_req("a", ""), 4, ALL),
            Err(MvccError::Compacted)
        ),
        "{k}"
    );
    s.put(16, "b", "third");
    assert_eq!(s.get("b", 0), Some(kv("b", "third", 8, 16, 2)), "{k}");
    s.put(17, "a", "back");
    assert_eq!(s.get("a", 0), Some(kv("a", "back", 17, 17, 1)), "{k}");
    assert_eq!(s.get("a", 8), Some(kv("a", "2", 2, 5, 2)), "{k}");
}

#[test]
fn reopen_after_compacting_everything_keeps_revisions() {
    for env in engines() {
        let k = env.kind;
        {
            let mut s = Store::new(&env);
            s.put(3, "a", "1");
            s.delete(6, "a", "");
            // At 6 the delete would stay, for a watch from 6: compact past
            // it, as at a revision another shard wrote.
            let batch = s.mvcc.set_current_revision(7);
            s.engine.write(batch, false).unwrap();
            s.compact(7).unwrap();
            assert_eq!(s.records(), 0, "{k}");
        }
        let s = Store::new(&env);
        assert_eq!(s.mvcc.current_revision(), 7, "{k}");
        assert_eq!(s.mvcc.compacted_revision(), 7, "{k}");
        assert_eq!(s.mvcc.key_count(), 0, "{k}");
    }
}

#[test]
fn corrupt_records_are_reported() {
    for env in engines() {
        let k = env.kind;
        let mut batch = WriteBatch::new();
        batch.put(vec![keyspace::MVCC_VERSION, 1, 2], b"junk".to_vec());
        env.engine.write(batch, false).unwrap();
        assert!(
            matches!(Mvcc::open(env.engine.clone()), Err(MvccError::Corrupt(_))),
            "{k}"
        );
    }
}

#[test]
fn other_namespaces_are_left_alone() {
    for env in engines() {
        let k = env.kind;
        let mut batch = WriteBatch::new();
        batch
            .put(vec![keyspace::RAFT_LOG, 1], b"entry".to_vec())
            .put(vec![keyspace::SHARD_STATE], b"state".to_vec());
        env.engine.write(batch, false).unwrap();
        let mut s = Store::new(&env);
        s.put(2, "a", "1");
        s.delete(3, "a", "");
        s.compact(3).unwrap();
        let mut other = Vec::new();
        env.engine
            .scan(b"", b"", &mut |key, _| {
                if key[0] != keyspace::MVCC_VERSION && key[0] != keyspace::MVCC_META {
                    other.push(key.to_vec());
                }
                true
            })
            .unwrap();
        assert_eq!(
            other,
            vec![vec![keyspace::RAFT_LOG, 1], vec![keyspace::SHARD_STATE]],
            "{k}"
        );
    }
}

/// Counts the version records read from the engine it wraps.
struct CountingEngine {
    inner: Rc<dyn Engine>,
    version_reads: std::cell::Cell<usize>,
}

impl Engine for CountingEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let (s, e) = keyspace::bounds(keyspace::MVCC_VERSION);
        if key >= &s[..] && key < &e[..] {
            self.version_reads.set(self.version_reads.get() + 1);
        }
        self.inner.get(key)
    }
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        self.inner.scan(start, end, f)
    }
    fn scan_rev(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        self.inner.scan_rev(start, end, f)
    }
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        self.inner.write(batch, sync)
    }
    fn sync_job(&self) -> Result<Option<crate::engine::EngineSyncJob>, EngineError> {
        self.inner.sync_job()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
}

#[test]
fn plain_puts_and_deletes_read_no_version_and_their_events_name_it() {
    for env in engines() {
        let k = env.kind;
        let counting = Rc::new(CountingEngine {
            inner: env.engine.clone(),
            version_reads: std::cell::Cell::new(0),
        });
        // Counting engine reads says which operations read a version: no
        // record cache in front to answer some of them.
        let mut mvcc = Mvcc::open(counting.clone()).unwrap();
        mvcc.set_record_cache_bytes(0);
        let mut s = Store {
            mvcc,
            engine: counting.clone(),
        };
        s.put_lease(3, "a", "1", 7);
        s.put(4, "b", "1");
        let reads = || counting.version_reads.get();
        assert_eq!(reads(), 0, "{k}");
        // A put over a leased version keeps create revision and version
        // right, and names the lease it replaced, all from the index.
        let mut w = s.mvcc.write(5);
        w.put(&put_req("a", "2")).unwrap();
        w.delete_range(&del_req("b", "", false), ALL).unwrap();
        let (batch, events) = w.finish_with_events();
        s.engine.write(batch, false).unwrap();
        assert_eq!(reads(), 0, "{k}");
        assert_eq!(s.get("a", 5), Some(kv("a", "2", 3, 5, 2)), "{k}");
        assert_eq!(
            events[0].replaced,
            Replaced::Stored(StoredPrev {
                rev: Revision { main: 3, sub: 0 },
                lease: 7
            }),
            "{k}"
        );
        assert_eq!(events[0].prev_lease(), 7, "{k}");
        assert_eq!(events[1].prev_lease(), 0, "{k}");
        // Asking for prev_kv (or ignore_value) reads it, and the event
        // carries it.
        let before = reads();
        let mut w = s.mvcc.write(6);
        let resp = w
            .put(&PutRequest {
                prev_kv: true,
                ..put_req("a", "3")
            })
            .unwrap();
        let (batch, events) = w.finish_with_events();
        s.engine.write(batch, false).unwrap();
        assert_eq!(reads(), before + 1, "{k}");
        assert_eq!(resp.prev_kv, Some(kv("a", "2", 3, 5, 2)), "{k}");
        assert_eq!(
            Some(events[0].replaced.clone()),
            resp.prev_kv.map(Replaced::Read),
            "{k}"
        );
        s.apply(7, |w| {
            w.put(&PutRequest {
                ignore_value: true,
                ..put_req("a", "")
            })
            .unwrap()
        });
        assert_eq!(reads(), before + 2, "{k}");
        assert_eq!(s.get("a", 7), Some(kv("a", "3", 3, 7, 4)), "{k}");
        prev_reads_as_absent_after_compaction(&mut s, kv("a", "2", 3, 5, 2), 7, k);
    }
}
