//! Watch end to end through the real gateway and shard server, with the
//! `etcd-client` crate, every test on both engines (the bug report's
//! lesson: the Memory engine's watchers once got nothing, and no watch test
//! ran on it).
//!
//! The bug report's scenarios (one watcher, one put, one event within 3 s;
//! 10 watchers and 10 puts; 100 watchers × 1000 events), cross-shard order
//! under concurrent load checked against the history read back with Range,
//! historical replay (beyond the shard's ring), compaction, prev_kv,
//! filters, cancel, progress notifications and requests, fragments, a slow
//! watcher, and the gateway's watch limits.
//!
//! "Exactly once" is checked without sleeping: after the expected events,
//! a progress request is answered only once every watch on the stream has
//! delivered everything up to the current revision, so any extra event
//! would arrive before that answer. Tests that need other gateway flags
//! start a second gateway in front of the node's server ([`ExtraGateway`]).

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_serving, assert_stream_refuses_like_etcd, rev_of, TestNode};
use etcd_client::{
    Client, CompactionOptions, DeleteOptions, EventType, GetOptions, Txn, TxnOp, WatchFilterType,
    WatchOptions, WatchResponse, WatchStream,
};
use metastore_proto::router::ShardRouter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long one expected response may take.
const STEP: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// One event as a comparable value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ev {
    put: bool,
    key: String,
    value: String,
    rev: i64,
    create: i64,
    version: i64,
    prev: Option<String>,
}

fn ev(e: &etcd_client::Event) -> Ev {
    let kv = e.kv().expect("event has a kv");
    Ev {
        put: e.event_type() == EventType::Put,
        key: String::from_utf8(kv.key().to_vec()).unwrap(),
        value: String::from_utf8(kv.value().to_vec()).unwrap(),
        rev: kv.mod_revision(),
        create: kv.create_revision(),
        version: kv.version(),
        prev: e
            .prev_kv()
            .map(|p| String::from_utf8(p.value().to_vec()).unwrap()),
    }
}

async fn next(ws: &mut WatchStream) -> WatchResponse {
    match tokio::time::timeout(STEP, ws.message()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => panic!("watch stream ended"),
        Ok(Err(e)) => panic!("watch stream failed: {e}"),
        Err(_) => panic!("no watch response within {STEP:?}"),
    }
}

/// Opens a stream with one watch; returns it and the watch id.
async fn watch(client: &mut Client, key: &str, opts: Option<WatchOptions>) -> (WatchStream, i64) {
    let mut ws = client.watch(key, opts).await.expect("open watch stream");
    let id = created(&mut ws).await;
    (ws, id)
}

/// Expects a successful `created` response; returns the watch id.
async fn created(ws: &mut WatchStream) -> i64 {
    let r = next(ws).await;
    assert!(r.created() && !r.canceled(), "expected created, got {r:?}");
    let h = r.header().expect("created has a header");
    assert!(h.revision() > 0 && h.cluster_id() != 0 && h.member_id() != 0);
    r.watch_id()
}

fn prefix() -> Option<WatchOptions> {
    Some(WatchOptions::new().with_prefix())
}

/// Reads responses of watch `id` until `n` events have arrived.
async fn events(ws: &mut WatchStream, id: i64, n: usize) -> Vec<Ev> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = next(ws).await;
        assert_eq!(r.watch_id(), id, "unexpected response {r:?}");
        assert!(!r.canceled() && !r.created(), "unexpected {r:?}");
        check_response(&r);
        out.extend(r.events().iter().map(ev));
    }
    assert_eq!(out.len(), n, "more events than expected: {out:?}");
    out
}

/// Every response: events in revision order, header at or above them.
fn check_response(r: &WatchResponse) {
    let revs: Vec<i64> = r
        .events()
        .iter()
        .map(|e| e.kv().unwrap().mod_revision())
        .collect();
    assert!(
        revs.windows(2).all(|w| w[0] <= w[1]),
        "out of order {revs:?}"
    );
    if let Some(last) = revs.last() {
        assert!(rev_of(r.header()) >= *last, "header below its events");
    }
}

/// Asserts that nothing more arrives for the watches of this stream: asks
/// for progress and expects its answer (watch_id -1, revision >= `at_least`)
/// with no event before it. Returns the answer's revision.
async fn no_more_events(ws: &mut WatchStream, at_least: i64) -> i64 {
    ws.request_progress().await.expect("request progress");
    loop {
        let r = next(ws).await;
        assert!(
            r.events().is_empty(),
            "unexpected events before the progress answer: {r:?}"
        );
        if r.watch_id() == -1 && !r.created() && !r.canceled() {
            let rev = rev_of(r.header());
            assert!(rev >= at_least, "progress {rev} below {at_least}");
            return rev;
        }
    }
}

async fn put(c: &mut Client, key: &str, value: &str) -> i64 {
    rev_of(c.put(key, value, None).await.expect("put").header())
}

/// The current revision (a linearizable read's header).
async fn current(c: &mut Client) -> i64 {
    rev_of(c.get("__current", None).await.unwrap().header())
}

/// Keys `{prefix}{i}` for i in 0.., keeping only those on `shard`.
fn keys_on_shard(prefix: &str, shard: u32, n: usize) -> Vec<String> {
    let router = ShardRouter::new(common::SHARDS as u32);
    (0..)
        .map(|i| format!("{prefix}{i:06}"))
        .filter(|k| router.shard_of(k.as_bytes()) == shard)
        .take(n)
        .collect()
}

/// A second gateway in front of a node's server, with extra flags.
struct ExtraGateway {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl ExtraGateway {
    async fn start(node: &TestNode, flags: &[&str]) -> ExtraGateway {
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("gateway.stderr.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_metastore-gateway"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--server")
            .arg(&node.server_addrs()[0])
            .args(flags)
            .env("RUST_LOG", "info,metastore_gateway::watch=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn extra gateway");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            for _ in lines {}
        });
        let line = tokio::time::timeout(common::READY_TIMEOUT, rx)
            .await
            .expect("extra gateway ready in time")
            .unwrap()
            .expect("extra gateway printed its ready line");
        let endpoint = line
            .strip_prefix("metastore-gateway ready on ")
            .unwrap_or_else(|| panic!("bad ready line {line:?}"))
            .trim()
            .to_string();
        ExtraGateway {
            child,
            endpoint,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        Client::connect([self.endpoint.clone()], None)
            .await
            .expect("connect to extra gateway")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("gateway.stderr.log")).unwrap_or_default()
    }
}

impl Drop for ExtraGateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== extra gateway stderr =====\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The bug report's scenarios.
// ---------------------------------------------------------------------------

both_engines!(
    /// TestWatch_Memory: watch a key, Put it, exactly one event within 3 s.
    async fn one_watcher_one_put_one_event(node: TestNode) {
        let mut c = node.client().await;
        let (mut ws, id) = watch(&mut c, "bug/key", None).await;
        let rev = put(&mut c, "bug/key", "v1").await;
        let r = tokio::time::timeout(Duration::from_secs(3), ws.message())
            .await
            .expect("the event within 3 s")
            .unwrap()
            .unwrap();
        assert_eq!(r.watch_id(), id);
        let got: Vec<Ev> = r.events().iter().map(ev).collect();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (
                got[0].put,
                got[0].key.as_str(),
                got[0].value.as_str(),
                got[0].rev
            ),
            (true, "bug/key", "v1", rev)
        );
        no_more_events(&mut ws, rev).await;
    }
);

both_engines!(
    /// A request that etcd's gRPC layer refuses ends the stream with the
    /// status etcd ends it with: above the size limit (1.5 MiB + 512 KiB)
    /// `ResourceExhausted`, undecodable `Internal`. The node keeps serving.
    async fn refused_watch_request_ends_stream(node: TestNode) {
        // Undecodable: field 1 (create_request) announcing 127 bytes that
        // never come.
        let path = "/etcdserverpb.Watch/Watch";
        assert_stream_refuses_like_etcd(&node.endpoint(), path, &[0x0a, 0x7f]).await;

        let mut c = node.client().await;
        let (mut ws, id) = watch(&mut c, "refused/key", None).await;
        let rev = put(&mut c, "refused/key", "v").await;
        assert_eq!(events(&mut ws, id, 1).await[0].rev, rev);
        assert_serving(&mut c, "refused-watch").await;
    }
);

both_engines!(
    /// TestPerformance_WatchScalability: 10 watches, 10 Puts, every watcher
    /// gets its event.
    async fn ten_watchers_ten_puts(node: TestNode) {
        let mut c = node.client().await;
        let mut streams = Vec::new();
        for i in 0..10 {
            streams.push(watch(&mut c, &format!("scal/{i}"), None).await);
        }
        let mut revs = Vec::new();
        for i in 0..10 {
            revs.push(put(&mut c, &format!("scal/{i}"), &format!("v{i}")).await);
        }
        for (i, (ws, id)) in streams.iter_mut().enumerate() {
            let got = events(ws, *id, 1).await;
            assert_eq!(got[0].key, format!("scal/{i}"));
            assert_eq!(got[0].rev, revs[i]);
            no_more_events(ws, revs[9]).await;
        }
    }
);

both_engines!(
    /// More watch streams on one connection than hyper allows by default
    /// (200): the gateway sets no limit, as etcd sets none, so each is
    /// created and gets its event instead of waiting for a free stream.
    async fn three_hundred_watch_streams_on_one_connection(node: TestNode) {
        const STREAMS: usize = 300;
        let mut c = node.client().await;
        let mut streams = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            streams.push(watch(&mut c, "many/key", None).await);
        }
        let rev = put(&mut c, "many/key", "v").await;
        for (ws, id) in &mut streams {
            let got = events(ws, *id, 1).await;
            assert_eq!((got[0].key.as_str(), got[0].rev), ("many/key", rev));
        }
    }
);

both_engines!(
    /// 100 watchers on a prefix (10 streams of 10), 1000 Puts over all
    /// shards: every watcher gets all 1000 events exactly once, in order.
    async fn hundred_prefix_watchers_thousand_puts(node: TestNode) {
        const STREAMS: usize = 10;
        const PER_STREAM: usize = 10;
        const PUTS: usize = 1000;
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            let mut c = node.client().await;
            let (mut ws, first) = watch(&mut c, "load/", prefix()).await;
            let mut ids = vec![first];
            for _ in 1..PER_STREAM {
                ws.watch("load/", prefix()).await.unwrap();
                ids.push(created(&mut ws).await);
            }
            let unique: HashSet<i64> = ids.iter().copied().collect();
            assert_eq!(unique.len(), PER_STREAM, "watch ids are distinct: {ids:?}");
            streams.push((c, ws, ids));
        }
        // 10 concurrent writers.
        let mut writers = Vec::new();
        for w in 0..10 {
            let mut c = node.client().await;
            writers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..PUTS / 10 {
                    let key = format!("load/{w}-{i:03}");
                    let rev = put(&mut c, &key, &format!("{w}.{i}")).await;
                    out.push((rev, key));
                }
                out
            }));
        }
        let mut expected: Vec<(i64, String)> = Vec::new();
        for w in writers {
            expected.extend(w.await.unwrap());
        }
        expected.sort();
        let shards: HashSet<u32> = expected
            .iter()
            .map(|(_, k)| ShardRouter::new(common::SHARDS as u32).shard_of(k.as_bytes()))
            .collect();
        assert_eq!(shards.len(), common::SHARDS, "puts landed on every shard");
        let last = expected.last().unwrap().0;
        let mut readers = Vec::new();
        for (c, mut ws, ids) in streams {
            let expected = expected.clone();
            readers.push(tokio::spawn(async move {
                let mut per: HashMap<i64, Vec<(i64, String)>> = HashMap::new();
                let total = PER_STREAM * PUTS;
                let mut n = 0;
                while n < total {
                    let r = next(&mut ws).await;
                    check_response(&r);
                    assert!(ids.contains(&r.watch_id()), "{r:?}");
                    for e in r.events() {
                        let e = ev(e);
                        per.entry(r.watch_id()).or_default().push((e.rev, e.key));
                        n += 1;
                    }
                }
                for id in &ids {
                    assert_eq!(per[id], expected, "watch {id}: all events once, in order");
                }
                no_more_events(&mut ws, last).await;
                drop(c);
            }));
        }
        for r in readers {
            r.await.unwrap();
        }
    }
);

// ---------------------------------------------------------------------------
// Cross-shard order under load.
// ---------------------------------------------------------------------------

/// What a key looked like: (value, create, mod, version).
type Row = (String, i64, i64, i64);

/// Reads `prefix` at `rev` as a map.
async fn snapshot(c: &mut Client, prefix: &str, rev: i64) -> BTreeMap<String, Row> {
    let resp = c
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_revision(rev)),
        )
        .await
        .expect("range at revision");
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key().to_vec()).unwrap(),
                (
                    String::from_utf8(kv.value().to_vec()).unwrap(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                ),
            )
        })
        .collect()
}

/// Collects responses until `n_revs` distinct revisions have been seen and
/// the progress answer confirms nothing else is pending up to `upto`.
/// Returns the events in order, and asserts that no revision was split
/// across responses and no (key, revision) was delivered twice.
async fn collect_until(ws: &mut WatchStream, id: i64, upto: i64) -> Vec<Ev> {
    let mut out: Vec<Ev> = Vec::new();
    let mut rev_response: HashMap<i64, usize> = HashMap::new();
    let mut seen: HashSet<(String, i64)> = HashSet::new();
    ws.request_progress().await.unwrap();
    let mut n = 0usize;
    loop {
        let r = next(ws).await;
        n += 1;
        if r.watch_id() == -1 && r.events().is_empty() && !r.created() && !r.canceled() {
            if rev_of(r.header()) >= upto {
                break;
            }
            ws.request_progress().await.unwrap();
            continue;
        }
        assert_eq!(r.watch_id(), id, "{r:?}");
        check_response(&r);
        for e in r.events() {
            let e = ev(e);
            if let Some(prev) = out.last() {
                assert!(prev.rev <= e.rev, "revision order across responses");
            }
            let first = *rev_response.entry(e.rev).or_insert(n);
            assert_eq!(first, n, "revision {} split across responses", e.rev);
            assert!(seen.insert((e.key.clone(), e.rev)), "duplicate {e:?}");
            out.push(e);
        }
    }
    out
}

/// Replays `events` over the state at `base` and compares with Range at
/// every revision in the stream.
async fn check_against_history(c: &mut Client, prefix: &str, base: i64, events: &[Ev]) {
    let mut state = snapshot(c, prefix, base).await;
    let mut i = 0;
    while i < events.len() {
        let rev = events[i].rev;
        while i < events.len() && events[i].rev == rev {
            let e = &events[i];
            if e.put {
                state.insert(e.key.clone(), (e.value.clone(), e.create, e.rev, e.version));
            } else {
                assert!(
                    state.remove(&e.key).is_some(),
                    "delete of a missing key {e:?}"
                );
            }
            i += 1;
        }
        let actual = snapshot(c, prefix, rev).await;
        assert_eq!(state, actual, "watch stream != history at revision {rev}");
    }
}

both_engines!(
    /// Concurrent writers on every shard — puts, cross-shard txns, prefix
    /// deletes — and a prefix watcher: its stream equals the history read
    /// back with Range at each revision, every txn in one response. A second
    /// watcher replays the same history afterwards.
    async fn cross_shard_order_under_load(node: TestNode) {
        const P: &str = "x/";
        let mut c = node.client().await;
        let base = current(&mut c).await;
        let (mut live, live_id) = watch(&mut c, P, prefix()).await;
        let mut tasks = Vec::new();
        for w in 0..6u64 {
            let mut c = node.client().await;
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(w);
                let mut writes = Vec::new(); // revisions that must produce events
                for i in 0..60 {
                    let k = |rng: &mut StdRng| format!("{P}{:02}", rng.gen_range(0..40));
                    match w {
                        0..=2 => {
                            let key = k(&mut rng);
                            writes.push(put(&mut c, &key, &format!("p{w}.{i}")).await);
                        }
                        3 | 4 => {
                            // Three distinct keys, usually on several shards.
                            let mut keys = Vec::new();
                            while keys.len() < 3 {
                                let key = k(&mut rng);
                                if !keys.contains(&key) {
                                    keys.push(key);
                                }
                            }
                            let ops: Vec<TxnOp> = keys
                                .iter()
                                .enumerate()
                                .map(|(j, key)| {
                                    TxnOp::put(key.as_str(), format!("t{w}.{i}.{j}"), None)
                                })
                                .collect();
                            let r = c.txn(Txn::new().and_then(ops)).await.expect("txn");
                            writes.push(rev_of(r.header()));
                        }
                        _ => {
                            let sub = format!("{P}{}", rng.gen_range(0..4));
                            let r = c
                                .delete(sub, Some(DeleteOptions::new().with_prefix()))
                                .await
                                .expect("prefix delete");
                            if r.deleted() > 0 {
                                writes.push(rev_of(r.header()));
                            }
                        }
                    }
                }
                writes
            }));
        }
        let mut writes = Vec::new();
        for t in tasks {
            writes.extend(t.await.unwrap());
        }
        let upto = current(&mut c).await;
        let events = collect_until(&mut live, live_id, upto).await;
        let revs: HashSet<i64> = events.iter().map(|e| e.rev).collect();
        for w in &writes {
            assert!(revs.contains(w), "write at revision {w} produced no event");
        }
        // Every txn's events are in the stream at one revision.
        check_against_history(&mut c, P, base, &events).await;
        // Historical replay of the same range gives the same stream.
        let (mut replay, replay_id) = watch(
            &mut c,
            P,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(base + 1),
            ),
        )
        .await;
        let replayed = collect_until(&mut replay, replay_id, upto).await;
        assert_eq!(replayed, events, "replay equals the live stream");
    }
);

// ---------------------------------------------------------------------------
// History, compaction.
// ---------------------------------------------------------------------------

both_engines!(
    /// Replay from a start revision, including history older than the
    /// shard's ring (64 MiB of events on one shard).
    async fn historical_replay_beyond_the_ring(node: TestNode) {
        let mut c = node.client().await;
        // Small history first.
        let mut small = Vec::new();
        for i in 0..20 {
            small.push(put(&mut c, &format!("hist/{i:02}"), &format!("v{i}")).await);
        }
        let (mut ws, id) = watch(
            &mut c,
            "hist/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(small[10]),
            ),
        )
        .await;
        let got = events(&mut ws, id, 10).await;
        assert_eq!(
            got.iter().map(|e| e.rev).collect::<Vec<_>>(),
            small[10..].to_vec()
        );
        no_more_events(&mut ws, small[19]).await;
        drop(ws);

        // 1100 puts of 64 KiB on one shard: more than its ring holds.
        let keys = keys_on_shard("ring/", 0, 8);
        let value = "r".repeat(64 << 10);
        let mut writers = Vec::new();
        for w in 0..4 {
            let mut c = node.client().await;
            let keys = keys.clone();
            let value = value.clone();
            writers.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..275 {
                    let key = &keys[(w * 2 + i % 2) as usize];
                    let v = format!("{w}-{i}-{}", &value[..(64 << 10) - 16]);
                    revs.push((
                        rev_of(c.put(key.as_str(), v, None).await.unwrap().header()),
                        key.clone(),
                    ));
                }
                revs
            }));
        }
        let mut expected = Vec::new();
        for w in writers {
            expected.extend(w.await.unwrap());
        }
        expected.sort();
        let (mut ws, id) = watch(
            &mut c,
            "ring/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(expected[0].0),
            ),
        )
        .await;
        let got = events(&mut ws, id, expected.len()).await;
        let got: Vec<(i64, String)> = got.into_iter().map(|e| (e.rev, e.key)).collect();
        assert_eq!(got, expected);
        no_more_events(&mut ws, expected.last().unwrap().0).await;
    }
);

both_engines!(
    /// A compaction at a delete's revision keeps that delete for a watch
    /// from that revision (the documented recovery of a watch canceled as
    /// compacted). etcd 3.4.23 lost it (etcd-io/etcd#18089): the client's
    /// cache kept a key that no longer existed.
    async fn deletes_at_the_compaction_revision_stay_watchable(node: TestNode) {
        let mut c = node.client().await;
        // Keys on both shards: a prefix watch merges them.
        let keys: Vec<String> = (0..6).map(|i| format!("cdel/{i}")).collect();
        for k in &keys {
            put(&mut c, k, "v").await;
        }
        let r = c
            .delete("cdel/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(r.deleted(), 6);
        let d = rev_of(r.header());
        c.compact(d, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap();
        let opts = prefix().map(|o| o.with_start_revision(d));
        let (mut ws, id) = watch(&mut c, "cdel/", opts).await;
        let got = events(&mut ws, id, 6).await;
        let mut deleted: Vec<String> = got.iter().map(|e| e.key.clone()).collect();
        deleted.sort();
        assert_eq!(deleted, keys);
        assert!(got.iter().all(|e| !e.put && e.rev == d), "{got:?}");
        no_more_events(&mut ws, d).await;
        // The next compaction above it takes the deletes: the keys are gone.
        let p = put(&mut c, "cdel-other", "v").await;
        c.compact(p, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap();
        let all = c
            .get(
                "cdel/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        assert_eq!(all.count(), 0);
    }
);

both_engines!(
    /// Compaction does not disturb a live watcher; a watch whose start was
    /// compacted gets created, then canceled with compact_revision.
    async fn compaction_while_watching_and_compacted_start(node: TestNode) {
        let mut c = node.client().await;
        let (mut ws, id) = watch(&mut c, "cmp/", prefix()).await;
        let mut revs = Vec::new();
        for i in 0..10 {
            revs.push(put(&mut c, &format!("cmp/{i}"), "a").await);
        }
        c.compact(revs[5], None).await.expect("compact");
        for i in 0..10 {
            revs.push(put(&mut c, &format!("cmp/{i}"), "b").await);
        }
        let got = events(&mut ws, id, 20).await;
        assert_eq!(got.iter().map(|e| e.rev).collect::<Vec<_>>(), revs);
        no_more_events(&mut ws, revs[19]).await;

        let mut ws = c
            .watch(
                "cmp/",
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revs[1]),
                ),
            )
            .await
            .unwrap();
        let id = created(&mut ws).await;
        let r = next(&mut ws).await;
        assert_eq!(r.watch_id(), id);
        assert!(r.canceled(), "{r:?}");
        assert_eq!(r.compact_revision(), revs[5], "{r:?}");
        assert!(r.events().is_empty());

        // From the compacted revision on, history is there.
        let (mut ws, id) = watch(
            &mut c,
            "cmp/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revs[5]),
            ),
        )
        .await;
        let got = events(&mut ws, id, 15).await;
        assert_eq!(
            got.iter().map(|e| e.rev).collect::<Vec<_>>(),
            revs[5..].to_vec()
        );
    }
);

both_engines!(
    /// A start revision in the future waits for it (etcd semantics).
    async fn future_start_revision(node: TestNode) {
        let mut c = node.client().await;
        let now = current(&mut c).await;
        let (mut ws, id) = watch(
            &mut c,
            "fut/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(now + 3),
            ),
        )
        .await;
        let mut revs = Vec::new();
        for i in 0..5 {
            revs.push(put(&mut c, &format!("fut/{i}"), "v").await);
        }
        let want: Vec<i64> = revs.iter().copied().filter(|r| *r >= now + 3).collect();
        assert!(!want.is_empty());
        let got = events(&mut ws, id, want.len()).await;
        assert_eq!(got.iter().map(|e| e.rev).collect::<Vec<_>>(), want);
        no_more_events(&mut ws, revs[4]).await;
    }
);

// ---------------------------------------------------------------------------
// Options: prev_kv, filters, cancel, ranges.
// ---------------------------------------------------------------------------

both_engines!(
    async fn prev_kv_filters_and_ranges(node: TestNode) {
        let mut c = node.client().await;
        let (mut with_prev, wp) =
            watch(&mut c, "opt/k", Some(WatchOptions::new().with_prev_key())).await;
        let (mut plain, pl) = watch(&mut c, "opt/k", None).await;
        let (mut noput, np) = watch(
            &mut c,
            "opt/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoPut]),
            ),
        )
        .await;
        let (mut nodel, nd) = watch(
            &mut c,
            "opt/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoDelete]),
            ),
        )
        .await;
        // [opt/b, opt/d) and from-key opt/x.
        let (mut range, rg) = watch(
            &mut c,
            "opt/b",
            Some(WatchOptions::new().with_range("opt/d")),
        )
        .await;
        let (mut from, fr) =
            watch(&mut c, "opt/x", Some(WatchOptions::new().with_from_key())).await;

        let r1 = put(&mut c, "opt/k", "v1").await;
        let r2 = put(&mut c, "opt/k", "v2").await;
        let r3 = rev_of(c.delete("opt/k", None).await.unwrap().header());
        let rb = put(&mut c, "opt/b", "in").await;
        let _ = put(&mut c, "opt/d", "out").await;
        let rc = put(&mut c, "opt/c9", "in").await;
        let rz = put(&mut c, "opt/zz", "from").await;

        let got = events(&mut with_prev, wp, 3).await;
        assert_eq!(
            got.iter()
                .map(|e| (e.put, e.rev, e.prev.clone()))
                .collect::<Vec<_>>(),
            vec![
                (true, r1, None),
                (true, r2, Some("v1".into())),
                (false, r3, Some("v2".into())),
            ]
        );
        assert_eq!((got[1].create, got[1].version), (r1, 2));
        let got = events(&mut plain, pl, 3).await;
        assert!(
            got.iter().all(|e| e.prev.is_none()),
            "no prev_kv unless asked"
        );
        let got = events(&mut noput, np, 1).await;
        assert_eq!((got[0].put, got[0].rev), (false, r3));
        let got = events(&mut nodel, nd, 6).await;
        assert!(got.iter().all(|e| e.put));
        let got = events(&mut range, rg, 2).await;
        assert_eq!(got.iter().map(|e| e.rev).collect::<Vec<_>>(), vec![rb, rc]);
        let got = events(&mut from, fr, 1).await;
        assert_eq!(got[0].rev, rz);
        for ws in [
            &mut with_prev,
            &mut plain,
            &mut noput,
            &mut nodel,
            &mut range,
            &mut from,
        ] {
            no_more_events(ws, rz).await;
        }
    }
);

both_engines!(
    /// Many watches on one stream; cancel answers canceled and stops only
    /// that watch.
    async fn cancel_one_of_many(node: TestNode) {
        let mut c = node.client().await;
        let (mut ws, a) = watch(&mut c, "can/", prefix()).await;
        ws.watch("can/", prefix()).await.unwrap();
        let b = created(&mut ws).await;
        assert_ne!(a, b);
        let r1 = put(&mut c, "can/1", "x").await;
        let mut seen = HashMap::new();
        while seen.len() < 2 {
            let r = next(&mut ws).await;
            for e in r.events() {
                assert_eq!(ev(e).rev, r1);
                *seen.entry(r.watch_id()).or_insert(0) += 1;
            }
        }
        ws.cancel(a).await.unwrap();
        let r = next(&mut ws).await;
        assert!(r.canceled() && r.watch_id() == a, "{r:?}");
        let r2 = put(&mut c, "can/2", "y").await;
        let got = events(&mut ws, b, 1).await;
        assert_eq!(got[0].rev, r2);
        no_more_events(&mut ws, r2).await;
    }
);

// ---------------------------------------------------------------------------
// Progress.
// ---------------------------------------------------------------------------

both_engines!(
    /// RequestProgress is answered (watch_id -1) with a revision at least
    /// the last put's, within 3 s, on busy and idle streams, key and prefix
    /// watches alike.
    async fn request_progress(node: TestNode) {
        let mut c = node.client().await;
        let (mut ws, key_id) = watch(&mut c, "prog/k", None).await;
        ws.watch("prog/", prefix()).await.unwrap();
        let _prefix_id = created(&mut ws).await;
        let mut last = 0;
        for i in 0..5 {
            last = put(&mut c, &format!("prog/{i}"), "v").await;
        }
        // Writes elsewhere move the revision too.
        last = last.max(put(&mut c, "elsewhere", "v").await);
        ws.request_progress().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(3), async {
            let mut events = 0;
            loop {
                let r = next(&mut ws).await;
                if r.watch_id() == -1 {
                    assert!(r.events().is_empty());
                    return (rev_of(r.header()), events);
                }
                events += r.events().len();
            }
        })
        .await
        .expect("progress answered within 3 s");
        assert!(answer.0 >= last, "{answer:?} < {last}");
        assert_eq!(answer.1, 5, "all events before the answer");
        // Idle: answered again, at once.
        let idle = tokio::time::timeout(Duration::from_secs(3), no_more_events(&mut ws, last))
            .await
            .expect("idle progress answered within 3 s");
        assert!(idle >= last);
        let _ = key_id;
        // A stream without watches answers too.
        let mut empty = c.watch("prog/none", None).await.unwrap();
        let id = created(&mut empty).await;
        empty.cancel(id).await.unwrap();
        assert!(next(&mut empty).await.canceled());
        tokio::time::timeout(Duration::from_secs(3), no_more_events(&mut empty, last))
            .await
            .expect("answered within 3 s");
    }
);

both_engines!(
    /// progress_notify (gateway flag --watch-progress-notify-interval):
    /// idle watches get empty responses with the revision they delivered
    /// through, at least the last put's.
    async fn progress_notify(node: TestNode) {
        let gw = ExtraGateway::start(&node, &["--watch-progress-notify-interval", "200ms"]).await;
        let mut c = gw.client().await;
        // On the same stream, a watch without progress_notify: it must hear
        // nothing while the other is notified.
        let (mut ws, silent) = watch(&mut c, "pn-silent/", prefix()).await;
        ws.watch(
            "pn/",
            Some(WatchOptions::new().with_prefix().with_progress_notify()),
        )
        .await
        .unwrap();
        let id = created(&mut ws).await;
        let rev = put(&mut c, "pn/1", "v").await;
        let other = put(&mut c, "elsewhere", "v").await;
        assert_eq!(events(&mut ws, id, 1).await[0].rev, rev);
        let mut notifications = 0;
        loop {
            let r = next(&mut ws).await;
            assert_eq!(r.watch_id(), id, "only the progress_notify watch: {r:?}");
            assert_ne!(r.watch_id(), silent);
            assert!(r.events().is_empty() && !r.canceled() && !r.created());
            assert!(rev_of(r.header()) >= rev);
            notifications += 1;
            if rev_of(r.header()) >= other && notifications >= 2 {
                break;
            }
        }
    }
);

// ---------------------------------------------------------------------------
// Flow control and limits.
// ---------------------------------------------------------------------------

both_engines!(
    /// A watcher whose client never reads does not stop Puts or other
    /// watchers; once it reads, it gets everything exactly once, in order
    /// (it overflowed its budget and caught up from history).
    async fn slow_watcher_does_not_block(node: TestNode) {
        let gw = ExtraGateway::start(&node, &["--watch-max-pending-bytes", "32768"]).await;
        let mut slow_client = gw.client().await;
        let (mut slow, slow_id) = watch(&mut slow_client, "slow/", prefix()).await;
        let mut fast_client = gw.client().await;
        let (mut fast, fast_id) = watch(&mut fast_client, "slow/", prefix()).await;
        let c = node.client().await;
        let value = "s".repeat(2048);
        let mut expected = Vec::new();
        for round in 0..20 {
            let mut writers = Vec::new();
            for w in 0..4 {
                let mut c = c.clone();
                let value = value.clone();
                writers.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in 0..50 {
                        let key = format!("slow/{round:02}-{w}-{i:02}");
                        out.push((put(&mut c, &key, &value).await, key));
                    }
                    out
                }));
            }
            let mut batch = Vec::new();
            for w in writers {
                batch.extend(w.await.unwrap());
            }
            batch.sort();
            // The fast watcher keeps up round by round.
            let got = events(&mut fast, fast_id, batch.len()).await;
            let got: Vec<(i64, String)> = got.into_iter().map(|e| (e.rev, e.key)).collect();
            assert_eq!(got, batch);
            expected.extend(batch);
        }
        let last = expected.last().unwrap().0;
        // ~8 MB went by; the slow one now reads all of it.
        let got = events(&mut slow, slow_id, expected.len()).await;
        let got: Vec<(i64, String)> = got.into_iter().map(|e| (e.rev, e.key)).collect();
        assert_eq!(got, expected);
        no_more_events(&mut slow, last).await;
        no_more_events(&mut fast, last).await;
        assert!(
            gw.log().contains("catching up on its own feed"),
            "the slow watcher overflowed its budget (the path under test)"
        );
    }
);

both_engines!(
    /// Revisions queued for a watch while its client does not read go out
    /// several to a response once it reads (as etcd sends a watcher that
    /// catches up): whole revisions, in order, exactly once, the header at
    /// the last of them. The budget is large, so this is the live feed's
    /// queue, not the over-budget catch-up.
    async fn queued_revisions_share_responses(node: TestNode) {
        let gw = ExtraGateway::start(&node, &["--watch-max-pending-bytes", "67108864"]).await;
        let mut reader = gw.client().await;
        let (mut ws, id) = watch(&mut reader, "queued/", prefix()).await;
        let mut c = gw.client().await;
        // ~8 MB: more than the stream's gRPC buffers and HTTP/2 window
        // hold, so most of it waits in the gateway for the reader.
        let value = "q".repeat(20 << 10);
        let mut expected = Vec::new();
        for i in 0..400 {
            let key = format!("queued/{i:03}");
            expected.push((put(&mut c, &key, &value).await, key));
        }
        let mut got = Vec::new();
        let mut most = 0;
        let mut responses = 0;
        while got.len() < expected.len() {
            let r = next(&mut ws).await;
            responses += 1;
            assert_eq!(r.watch_id(), id, "unexpected {r:?}");
            assert!(!r.canceled() && !r.created(), "{r:?}");
            check_response(&r);
            let revs: Vec<i64> = r.events().iter().map(|e| ev(e).rev).collect();
            assert_eq!(rev_of(r.header()), *revs.last().unwrap(), "header");
            most = most.max(revs.len());
            got.extend(r.events().iter().map(|e| {
                let e = ev(e);
                assert_eq!(e.value.len(), value.len());
                (e.rev, e.key)
            }));
        }
        assert_eq!(got, expected);
        // One response per revision would be 400.
        assert!(
            most > 1 && responses <= expected.len() * 3 / 4,
            "queued revisions share responses: {responses} responses, at most {most} revisions in one"
        );
        no_more_events(&mut ws, expected.last().unwrap().0).await;
        assert!(!gw.log().contains("catching up on its own feed"));
    }
);

both_engines!(
    /// --watch-max-watchers-per-stream: creates beyond it are refused
    /// (created + canceled, a reason); the stream keeps working.
    async fn max_watchers_per_stream(node: TestNode) {
        let gw = ExtraGateway::start(&node, &["--watch-max-watchers-per-stream", "3"]).await;
        let mut c = gw.client().await;
        let (mut ws, first) = watch(&mut c, "lim/a", None).await;
        for _ in 0..2 {
            ws.watch("lim/a", None).await.unwrap();
            created(&mut ws).await;
        }
        ws.watch("lim/a", None).await.unwrap();
        let r = next(&mut ws).await;
        assert!(r.created() && r.canceled(), "{r:?}");
        assert_eq!(r.watch_id(), -1);
        assert!(r.cancel_reason().contains("too many watchers"), "{r:?}");
        // Cancelling one makes room.
        ws.cancel(first).await.unwrap();
        assert!(next(&mut ws).await.canceled());
        ws.watch("lim/a", None).await.unwrap();
        created(&mut ws).await;
        let rev = put(&mut c, "lim/a", "v").await;
        let mut n = 0;
        while n < 3 {
            let r = next(&mut ws).await;
            for e in r.events() {
                assert_eq!(ev(e).rev, rev);
                n += 1;
            }
        }
        no_more_events(&mut ws, rev).await;
    }
);

both_engines!(
    /// A revision bigger than --max-request-bytes reaches a `fragment`
    /// watch as several responses (fragment set on all but the last) and a
    /// plain watch in one.
    async fn fragments(node: TestNode) {
        use metastore_gateway::etcdserverpb::watch_client::WatchClient;
        use metastore_proto::etcdserverpb::{
            watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
        };
        let gw = ExtraGateway::start(&node, &["--max-request-bytes", "8192"]).await;
        let mut c = gw.client().await;
        let value = "f".repeat(500);
        for i in 0..30 {
            put(&mut c, &format!("frag/{i:02}"), &value).await;
        }
        let mut raw = WatchClient::connect(format!("http://{}", gw.endpoint))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let create = |fragment| WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"frag/".to_vec(),
                range_end: b"frag0".to_vec(),
                prev_kv: true,
                fragment,
                ..Default::default()
            })),
        };
        tx.send(create(true)).unwrap();
        tx.send(create(false)).unwrap();
        let mut stream = raw
            .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut ids = Vec::new();
        while ids.len() < 2 {
            let r = stream.message().await.unwrap().unwrap().into_message();
            assert!(r.created);
            ids.push(r.watch_id);
        }
        // One revision deleting 30 keys; with prev_kv about 17 KB.
        let del = c
            .delete("frag/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(del.deleted(), 30);
        let rev = rev_of(del.header());
        let mut frag_parts = Vec::new();
        let mut whole = Vec::new();
        while whole.is_empty()
            || frag_parts
                .last()
                .is_none_or(|r: &metastore_proto::etcdserverpb::WatchResponse| r.fragment)
        {
            let r = tokio::time::timeout(STEP, stream.message())
                .await
                .expect("response in time")
                .unwrap()
                .unwrap()
                .into_message();
            assert!(r
                .events
                .iter()
                .all(|e| e.kv.as_ref().unwrap().mod_revision == rev));
            if r.watch_id == ids[0] {
                frag_parts.push(r);
            } else {
                assert_eq!(r.watch_id, ids[1]);
                whole.push(r);
            }
        }
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].events.len(), 30);
        assert!(!whole[0].fragment);
        assert!(frag_parts.len() > 1, "fragmented into several responses");
        assert_eq!(frag_parts.iter().map(|r| r.events.len()).sum::<usize>(), 30);
        for r in &frag_parts[..frag_parts.len() - 1] {
            assert!(r.fragment);
            assert!(prost::Message::encoded_len(r) < 8192);
        }
    }
);

both_engines!(
    /// The shard server alone crashes (SIGKILL) and comes back on the same
    /// ports while the gateway keeps serving and a prefix watch stays
    /// open. rocksdb keeps its history: the same watch goes on, every
    /// event exactly once, in order. memory starts over with a new history
    /// whose revisions repeat old numbers: the watch is canceled with a
    /// compact_revision — never left waiting, silently, for revisions the
    /// new history has already used — and a new watch sees the new writes.
    async fn a_watch_across_a_server_crash(mut node: TestNode) {
        node.pin_server_ports().await;
        let mut c = node.client().await;
        let (mut ws, id) = watch(&mut c, "sc/", prefix()).await;
        let mut before = vec![];
        for i in 0..6 {
            before.push(put(&mut c, &format!("sc/{i}"), "a").await);
        }
        let got: Vec<i64> = events(&mut ws, id, 6).await.iter().map(|e| e.rev).collect();
        assert_eq!(got, before);

        node.crash_restart_server().await;
        // The gateway's connections to the killed server look alive until
        // the kernel tears its sockets down, after the process is gone
        // (its io_uring is released asynchronously), and a put sent on one
        // fails as "request timed out": its outcome is unknown. A read is
        // retried instead, so one over every shard returns once each
        // connection reaches the new server.
        c.get("", Some(GetOptions::new().with_all_keys()))
            .await
            .expect("a read across the restart");
        let mut after = vec![];
        for i in 0..6 {
            after.push(put(&mut c, &format!("sc/{i}"), "b").await);
        }
        if node.engine().is_durable() {
            assert!(
                after[0] > before[5],
                "revisions go on: {before:?} {after:?}"
            );
            let got = events(&mut ws, id, 6).await;
            assert_eq!(got.iter().map(|e| e.rev).collect::<Vec<_>>(), after);
            assert!(got.iter().all(|e| e.value == "b" && e.version == 2));
            no_more_events(&mut ws, after[5]).await;
        } else {
            assert!(
                after[0] <= before[5],
                "a new memory history reuses revisions: {before:?} {after:?}"
            );
            let r = next(&mut ws).await;
            assert_eq!(r.watch_id(), id);
            assert!(r.canceled() && r.events().is_empty(), "{r:?}");
            assert_eq!(r.compact_revision(), 1, "the new history serves from 1");
            // Re-watching from there sees every write of the new history.
            let (mut ws2, id2) = watch(
                &mut c,
                "sc/",
                Some(WatchOptions::new().with_prefix().with_start_revision(1)),
            )
            .await;
            let got = events(&mut ws2, id2, 6).await;
            assert_eq!(got.iter().map(|e| e.rev).collect::<Vec<_>>(), after);
            assert!(got.iter().all(|e| e.value == "b" && e.version == 1));
        }
    }
);

// The fan-out and the cross-shard order under load again, where feeds,
// fan-out and streams run on different threads.
on_a_multi_threaded_gateway!(
    hundred_prefix_watchers_thousand_puts,
    cross_shard_order_under_load,
);
