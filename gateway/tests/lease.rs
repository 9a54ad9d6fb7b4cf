//! Lease API end to end through the real gateway and shard server, with the
//! `etcd-client` crate, on both engines: grant (server- and client-chosen
//! IDs, TTL limits), attaching keys on every shard, TimeToLive with keys,
//! Leases, revoke deleting every attached key at one revision, expiry,
//! keep-alive streams, unknown leases, and restart (durable with RocksDB,
//! gone with Memory).

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{assert_grpc_error, assert_serving, assert_stream_refuses_like_etcd, rev_of};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use metastore_gateway::etcdserverpb::lease_client::LeaseClient;
use metastore_proto::etcdserverpb as pb;
use metastore_proto::router::{lease_key, ShardRouter};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const LEASE_EXISTS: &str = "etcdserver: lease already exists";
const TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";

/// How long after its TTL an expired lease's keys may still be visible.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `n` keys under `prefix`, asserting they are spread over every shard.
fn keys_on_every_shard(prefix: &str, n: usize) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i:03}")).collect();
    let router = ShardRouter::new(common::SHARDS as u32);
    let shards: BTreeSet<u32> = keys.iter().map(|k| router.shard_of(k.as_bytes())).collect();
    assert_eq!(
        shards.len(),
        common::SHARDS,
        "the test keys should land on every shard"
    );
    keys
}

async fn put_all(client: &mut Client, keys: &[String], lease: i64) -> i64 {
    let mut rev = 0;
    for k in keys {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let resp = client
            .put(k.as_str(), format!("v-{k}"), opts)
            .await
            .unwrap_or_else(|e| panic!("put {k} with lease {lease:x}: {e}"));
        rev = rev.max(rev_of(resp.header()));
    }
    rev
}

/// Keys under `prefix`, at `revision` (0 = now).
async fn keys_under(client: &mut Client, prefix: &str, revision: i64) -> Vec<String> {
    let resp = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        )
        .await
        .unwrap_or_else(|e| panic!("get prefix {prefix} at {revision}: {e}"));
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8(kv.key().to_vec()).unwrap())
        .collect()
}

fn strings(keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|k| String::from_utf8(k.clone()).unwrap())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Polls until no key is left under `prefix`, failing at `deadline`.
async fn wait_until_gone(client: &mut Client, prefix: &str, deadline: Instant, what: &str) {
    loop {
        let left = keys_under(client, prefix, 0).await;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} keys under {prefix} still there at the deadline",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A prefix watcher whose creation has been confirmed.
async fn watch_prefix(client: &mut Client, prefix: &str) -> etcd_client::WatchStream {
    let mut stream = client
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .expect("create watch");
    let created = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("watch created in time")
        .expect("watch stream")
        .expect("watch created response");
    assert!(created.created(), "first watch response is the creation");
    stream
}

/// Reads watch responses until `n` events arrived; returns, per response,
/// its events as (type, key, mod revision).
async fn watch_events(
    stream: &mut etcd_client::WatchStream,
    n: usize,
) -> Vec<Vec<(EventType, String, i64)>> {
    let mut responses = Vec::new();
    let mut seen = 0;
    while seen < n {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("watch: only {seen} of {n} events in time"))
            .expect("watch stream error")
            .expect("watch stream ended");
        let events: Vec<_> = resp
            .events()
            .iter()
            .map(|e| {
                let kv = e.kv().expect("event kv");
                (
                    e.event_type(),
                    String::from_utf8(kv.key().to_vec()).unwrap(),
                    kv.mod_revision(),
                )
            })
            .collect();
        seen += events.len();
        if !events.is_empty() {
            responses.push(events);
        }
    }
    responses
}

/// Asserts that a watcher saw `keys` deleted in exactly one response, at
/// one revision, and returns that revision.
fn assert_one_delete_batch(responses: &[Vec<(EventType, String, i64)>], keys: &[String]) -> i64 {
    assert_eq!(
        responses.len(),
        1,
        "every delete of the lease's keys arrives in one watch response: {responses:?}"
    );
    let events = &responses[0];
    assert!(events.iter().all(|(t, _, _)| *t == EventType::Delete));
    let revs: BTreeSet<i64> = events.iter().map(|(_, _, r)| *r).collect();
    assert_eq!(revs.len(), 1, "one revision for all deletes: {revs:?}");
    let got = sorted(events.iter().map(|(_, k, _)| k.clone()).collect());
    assert_eq!(got, sorted(keys.to_vec()));
    *revs.iter().next().unwrap()
}

// ---------------------------------------------------------------------------
// Grant, attach, TimeToLive, Leases, Revoke
// ---------------------------------------------------------------------------

both_engines!(
    async fn grant_attach_list_and_revoke_in_one_revision(node: TestNode) {
        let mut c = node.client().await;
        let before = rev_of(c.put("lease-before", "x", None).await.unwrap().header());

        // Server-chosen ID.
        let a = c.lease_grant(60, None).await.expect("grant");
        assert!(a.id() > 0, "server-chosen IDs are positive: {}", a.id());
        assert_eq!(a.ttl(), 60);
        let h = a.header().expect("grant header");
        assert!(h.revision() >= before);
        assert_ne!(h.cluster_id(), 0);
        assert_ne!(h.member_id(), 0);

        // Client-chosen ID; a second grant with it is refused like etcd.
        let b_id = 0x7e57_1ea5e;
        let b = c
            .lease_grant(60, Some(LeaseGrantOptions::new().with_id(b_id)))
            .await
            .expect("grant with id");
        assert_eq!((b.id(), b.ttl()), (b_id, 60));
        assert_grpc_error(
            c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(b_id)))
                .await,
            Code::FailedPrecondition,
            LEASE_EXISTS,
        );
        assert_grpc_error(
            c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(a.id())))
                .await,
            Code::FailedPrecondition,
            LEASE_EXISTS,
        );

        // Keys on every shard: 40 on A, 6 on B, 6 without a lease.
        let a_keys = keys_on_every_shard("lease/a/", 40);
        let b_keys = keys_on_every_shard("lease/b/", 6);
        let plain = keys_on_every_shard("lease/plain/", 6);
        put_all(&mut c, &a_keys, a.id()).await;
        put_all(&mut c, &b_keys, b_id).await;
        put_all(&mut c, &plain, 0).await;
        let got = c.get("lease/a/000", None).await.unwrap();
        assert_eq!(got.kvs()[0].lease(), a.id());

        // TimeToLive with keys lists every attached key, from every shard.
        let t = c
            .lease_time_to_live(a.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .expect("time to live");
        assert_eq!(t.id(), a.id());
        assert_eq!(t.granted_ttl(), 60);
        assert!(t.ttl() > 0 && t.ttl() <= 60, "ttl {}", t.ttl());
        assert_eq!(strings(t.keys()), sorted(a_keys.clone()));
        assert!(rev_of(t.header()) >= before);
        // Without `keys`, none.
        let t = c.lease_time_to_live(b_id, None).await.unwrap();
        assert!(t.keys().is_empty());
        assert_eq!(t.granted_ttl(), 60);

        // Leases lists both.
        let l = c.leases().await.expect("leases");
        let ids: BTreeSet<i64> = l.leases().iter().map(|s| s.id()).collect();
        assert_eq!(ids, BTreeSet::from([a.id(), b_id]));

        // Revoke A, watching its keys.
        let mut watcher = watch_prefix(&mut c, "lease/a/").await;
        let r = c.lease_revoke(a.id()).await.expect("revoke");
        let rev = rev_of(r.header());
        assert!(rev > before);

        // One revision: at rev - 1 every key is there, at rev none.
        assert_eq!(
            sorted(keys_under(&mut c, "lease/a/", rev - 1).await),
            sorted(a_keys.clone())
        );
        assert!(keys_under(&mut c, "lease/a/", rev).await.is_empty());
        assert!(keys_under(&mut c, "lease/a/", 0).await.is_empty());
        // The watcher saw every delete in one response at that revision.
        let events = watch_events(&mut watcher, a_keys.len()).await;
        assert_eq!(assert_one_delete_batch(&events, &a_keys), rev);

        // Other leases' keys and plain keys are untouched.
        assert_eq!(
            sorted(keys_under(&mut c, "lease/b/", 0).await),
            sorted(b_keys.clone())
        );
        assert_eq!(
            sorted(keys_under(&mut c, "lease/plain/", 0).await),
            sorted(plain.clone())
        );

        // A is gone.
        let t = c.lease_time_to_live(a.id(), None).await.unwrap();
        assert_eq!(t.ttl(), -1, "etcd 3.5 answers an unknown lease with TTL -1");
        let l = c.leases().await.unwrap();
        let ids: Vec<i64> = l.leases().iter().map(|s| s.id()).collect();
        assert_eq!(ids, vec![b_id]);
        assert_grpc_error(
            c.lease_revoke(a.id()).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        assert_grpc_error(
            c.put(
                "lease/a/again",
                "v",
                Some(PutOptions::new().with_lease(a.id())),
            )
            .await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );

        // Its ID is free again.
        let again = c
            .lease_grant(10, Some(LeaseGrantOptions::new().with_id(a.id())))
            .await
            .expect("grant a revoked ID again");
        assert_eq!(again.id(), a.id());
        let t = c
            .lease_time_to_live(a.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        assert!(t.keys().is_empty(), "a new lease has no keys");
        assert_serving(&mut c, "revoke").await;
    }
);

// ---------------------------------------------------------------------------
// Unknown leases, ignore_lease
// ---------------------------------------------------------------------------

both_engines!(
    async fn unknown_lease_is_not_found_and_ignore_lease_keeps_it(node: TestNode) {
        let mut c = node.client().await;
        assert_grpc_error(
            c.put("nl/k", "v", Some(PutOptions::new().with_lease(0x5eed)))
                .await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        assert!(c.get("nl/k", None).await.unwrap().kvs().is_empty());
        // In a transaction spanning shards, too; nothing is written.
        let keys = keys_on_every_shard("nl/txn/", 8);
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::put(k.as_str(), "v", Some(PutOptions::new().with_lease(0x5eed))))
            .collect();
        assert_grpc_error(
            c.txn(Txn::new().and_then(ops)).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        assert!(keys_under(&mut c, "nl/", 0).await.is_empty());
        assert_serving(&mut c, "unknown-lease").await;

        // Unknown leases elsewhere in the API.
        assert_grpc_error(
            c.lease_revoke(0x5eed).await,
            Code::NotFound,
            LEASE_NOT_FOUND,
        );
        let t = c.lease_time_to_live(0x5eed, None).await.unwrap();
        assert_eq!((t.id(), t.ttl()), (0x5eed, -1));
        match c.lease_keep_alive(0x5eed).await {
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => {} // TTL 0 answered
            other => panic!("keep-alive of an unknown lease: {other:?}"),
        }

        // ignore_lease keeps the key's lease while the value changes.
        let l = c.lease_grant(60, None).await.unwrap().id();
        c.put("nl/kept", "v1", Some(PutOptions::new().with_lease(l)))
            .await
            .unwrap();
        c.put("nl/kept", "v2", Some(PutOptions::new().with_ignore_lease()))
            .await
            .unwrap();
        let got = c.get("nl/kept", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v2");
        assert_eq!(got.kvs()[0].lease(), l);
        let t = c
            .lease_time_to_live(l, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        assert_eq!(strings(t.keys()), vec!["nl/kept".to_string()]);
        // A txn compare on the lease sees it.
        let resp = c
            .txn(
                Txn::new()
                    .when([Compare::lease("nl/kept", CompareOp::Equal, l)])
                    .and_then([TxnOp::put("nl/cmp", "ok", None)]),
            )
            .await
            .unwrap();
        assert!(resp.succeeded());
        // A plain put detaches the key.
        c.put("nl/kept", "v3", None).await.unwrap();
        let got = c.get("nl/kept", None).await.unwrap();
        assert_eq!(got.kvs()[0].lease(), 0);
        let t = c
            .lease_time_to_live(l, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        assert!(t.keys().is_empty(), "detached: {:?}", strings(t.keys()));
        c.lease_revoke(l).await.unwrap();
        assert_eq!(
            c.get("nl/kept", None).await.unwrap().kvs()[0].value(),
            b"v3",
            "a detached key survives its old lease"
        );
    }
);

// ---------------------------------------------------------------------------
// TTL limits
// ---------------------------------------------------------------------------

both_engines!(
    async fn ttl_limits_match_etcd(node: TestNode) {
        let mut c = node.client().await;
        assert_grpc_error(
            c.lease_grant(9_000_000_001, None).await,
            Code::OutOfRange,
            TTL_TOO_LARGE,
        );
        let g = c.lease_grant(1, None).await.unwrap();
        assert_eq!(g.ttl(), 2, "a TTL below the minimum is raised to 2 s");
        let t = c.lease_time_to_live(g.id(), None).await.unwrap();
        assert_eq!(t.granted_ttl(), 2);
        let max = c.lease_grant(9_000_000_000, None).await.unwrap();
        assert_eq!(max.ttl(), 9_000_000_000);
        c.lease_revoke(max.id()).await.unwrap();
        assert!(c
            .leases()
            .await
            .unwrap()
            .leases()
            .iter()
            .all(|l| l.id() != max.id()));
        assert_serving(&mut c, "ttl-limits").await;
    }
);

// ---------------------------------------------------------------------------
// Expiry and keep-alive
// ---------------------------------------------------------------------------

both_engines!(
    async fn expiry_deletes_keys_and_keep_alive_keeps_them(node: TestNode) {
        let mut c = node.client().await;
        let short_keys = keys_on_every_shard("exp/short/", 12);
        let kept_keys = keys_on_every_shard("exp/kept/", 12);

        let granted_at = Instant::now();
        let short = c.lease_grant(2, None).await.unwrap();
        let kept = c.lease_grant(2, None).await.unwrap();
        assert_eq!((short.ttl(), kept.ttl()), (2, 2));
        let (short, kept) = (short.id(), kept.id());

        // Keep `kept` alive every 500 ms for 6 s on one stream.
        let (mut keeper, mut responses) = c.lease_keep_alive(kept).await.unwrap();
        let keep_alive = tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(6);
            let mut n = 0;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(500)).await;
                keeper.keep_alive().await.expect("send keep-alive");
                let r = tokio::time::timeout(Duration::from_secs(5), responses.message())
                    .await
                    .expect("keep-alive answered in time")
                    .expect("keep-alive stream")
                    .expect("keep-alive response");
                assert_eq!(r.id(), kept);
                assert_eq!(r.ttl(), 2, "a live lease is renewed to its TTL");
                n += 1;
            }
            n
        });

        put_all(&mut c, &short_keys, short).await;
        put_all(&mut c, &kept_keys, kept).await;
        let mut watcher = watch_prefix(&mut c, "exp/short/").await;

        // The short lease expires: its keys are gone within TTL + 1 s...
        let deadline = granted_at + Duration::from_secs(2) + EXPIRY_SLACK;
        wait_until_gone(&mut c, "exp/short/", deadline, "expired lease").await;
        // ... all at one revision, delivered together.
        let events = watch_events(&mut watcher, short_keys.len()).await;
        let rev = assert_one_delete_batch(&events, &short_keys);
        assert_eq!(
            keys_under(&mut c, "exp/short/", rev - 1).await.len(),
            short_keys.len()
        );
        assert!(keys_under(&mut c, "exp/short/", rev).await.is_empty());
        assert_eq!(c.lease_time_to_live(short, None).await.unwrap().ttl(), -1);

        // Meanwhile the kept lease lives, with time left.
        while !keep_alive.is_finished() {
            let t = c.lease_time_to_live(kept, None).await.unwrap();
            assert!(t.ttl() > 0, "a kept-alive lease has time left: {}", t.ttl());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let renewals = keep_alive.await.expect("keep-alive task");
        assert!(renewals >= 10, "only {renewals} renewals");
        assert!(granted_at.elapsed() >= Duration::from_secs(6));
        assert_eq!(
            sorted(keys_under(&mut c, "exp/kept/", 0).await),
            sorted(kept_keys.clone())
        );
        let t = c
            .lease_time_to_live(kept, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        assert!(t.ttl() > 0);
        assert_eq!(strings(t.keys()), sorted(kept_keys.clone()));

        // Once the keep-alives stop, it expires too.
        let stopped = Instant::now();
        wait_until_gone(
            &mut c,
            "exp/kept/",
            stopped + Duration::from_secs(2) + EXPIRY_SLACK,
            "lease no longer kept alive",
        )
        .await;
        assert!(c.leases().await.unwrap().leases().is_empty());
    }
);

both_engines!(
    async fn keep_alive_stream_carries_many_leases(node: TestNode) {
        let mut c = node.client().await;
        let a = c.lease_grant(30, None).await.unwrap().id();
        let b = c.lease_grant(40, None).await.unwrap().id();
        let gone = c.lease_grant(30, None).await.unwrap().id();
        c.lease_revoke(gone).await.unwrap();

        let mut raw = LeaseClient::connect(node.client_url())
            .await
            .expect("raw lease client");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut stream = raw
            .lease_keep_alive(ReceiverStream::new(rx))
            .await
            .expect("open keep-alive stream")
            .into_inner();
        let ids = [a, b, gone, a, 0x5eed, b];
        for id in ids {
            tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in ids {
            let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("keep-alive answered in time")
                .expect("keep-alive stream")
                .expect("keep-alive response");
            assert!(r.header.as_ref().is_some_and(|h| h.revision > 0));
            got.push((r.id, r.ttl));
        }
        assert_eq!(
            got,
            vec![(a, 30), (b, 40), (gone, 0), (a, 30), (0x5eed, 0), (b, 40)],
            "answers in request order; TTL 0 for unknown leases"
        );
        // Closing our side ends the stream cleanly.
        drop(tx);
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("stream ends in time")
            .expect("clean end");
        assert!(end.is_none());
        assert_serving(&mut c, "keep-alive-stream").await;
    }
);

// ---------------------------------------------------------------------------
// Restart
// ---------------------------------------------------------------------------

both_engines!(
    async fn restart_keeps_leases_only_when_durable(mut node: TestNode) {
        let mut c = node.client().await;
        let keys = keys_on_every_shard("rs/", 10);
        let l = c.lease_grant(5, None).await.unwrap().id();
        put_all(&mut c, &keys, l).await;
        drop(c);

        node.restart().await;
        let restarted = Instant::now();
        let mut c = node.client().await;
        let t = c
            .lease_time_to_live(l, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        if node.engine().is_durable() {
            assert_eq!(t.granted_ttl(), 5);
            assert!(t.ttl() > 0 && t.ttl() <= 5, "ttl {}", t.ttl());
            assert_eq!(strings(t.keys()), sorted(keys.clone()));
            let ids: Vec<i64> = c
                .leases()
                .await
                .unwrap()
                .leases()
                .iter()
                .map(|s| s.id())
                .collect();
            assert_eq!(ids, vec![l]);
            assert_eq!(
                sorted(keys_under(&mut c, "rs/", 0).await),
                sorted(keys.clone())
            );
            // Its ID is still taken.
            assert_grpc_error(
                c.lease_grant(5, Some(LeaseGrantOptions::new().with_id(l)))
                    .await,
                Code::FailedPrecondition,
                LEASE_EXISTS,
            );
            // It still expires (a restart grants a full TTL, like etcd).
            wait_until_gone(
                &mut c,
                "rs/",
                restarted + Duration::from_secs(5) + EXPIRY_SLACK,
                "lease after restart",
            )
            .await;
            assert_eq!(c.lease_time_to_live(l, None).await.unwrap().ttl(), -1);
        } else {
            // Memory keeps state in RAM only: lease and keys are gone.
            assert_eq!(t.ttl(), -1);
            assert!(c.leases().await.unwrap().leases().is_empty());
            assert!(keys_under(&mut c, "rs/", 0).await.is_empty());
            assert_grpc_error(
                c.put("rs/x", "v", Some(PutOptions::new().with_lease(l)))
                    .await,
                Code::NotFound,
                LEASE_NOT_FOUND,
            );
        }
        assert!(c.leases().await.unwrap().leases().is_empty());
        assert_serving(&mut c, "restart").await;
    }
);

// ---------------------------------------------------------------------------
// Many leases expiring together
// ---------------------------------------------------------------------------

both_engines!(
    /// 2000 two-second leases, each with a key, expire together. Their home
    /// shards revoke them in bounded batches (at most `LEASE_REVOKE_BATCH`,
    /// 100, leases per revocation transaction): every key is deleted, by several
    /// revocations, and a writer's puts keep landing between them — the
    /// storm does not stall writes.
    async fn an_expiry_storm_is_revoked_in_batches_while_writes_go_on(node: TestNode) {
        const LEASES: usize = 2000;
        let c = node.client().await;
        // Watch the storm's deletes and the writer's puts on one stream.
        let mut w = c.clone();
        let start = rev_of(w.get("storm", None).await.unwrap().header()) + 1;
        let mut events = w
            .watch(
                "",
                Some(
                    WatchOptions::new()
                        .with_all_keys()
                        .with_start_revision(start),
                ),
            )
            .await
            .unwrap();
        // Grant and attach, 64 at a time.
        let mut tasks = tokio::task::JoinSet::new();
        for batch in 0..(LEASES / 64 + 1) {
            let mut c = c.clone();
            tasks.spawn(async move {
                for i in (batch * 64)..((batch + 1) * 64).min(LEASES) {
                    let lease = c.lease_grant(2, None).await.unwrap().id();
                    c.put(
                        format!("storm/{i:04}"),
                        "x",
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
                    .unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        // A writer that keeps going until the storm is over.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (mut c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.put(format!("writer/{}", n % 16), "w", None)
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut deleted = BTreeSet::new();
        let mut delete_revs: Vec<i64> = Vec::new();
        let mut writes_between = 0usize;
        while deleted.len() < LEASES {
            let resp = events.message().await.unwrap().expect("watch stream open");
            for e in resp.events() {
                let kv = e.kv().unwrap();
                let key = kv.key_str().unwrap();
                if e.event_type() == EventType::Delete && key.starts_with("storm/") {
                    assert!(deleted.insert(key.to_string()), "{key} deleted twice");
                    if delete_revs.last() != Some(&kv.mod_revision()) {
                        delete_revs.push(kv.mod_revision());
                    }
                } else if key.starts_with("writer/") && !delete_revs.is_empty() {
                    writes_between += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();
        assert!(
            delete_revs.len() >= 20,
            "2000 leases need several revocations of at most 100: {delete_revs:?}"
        );
        assert!(
            writes_between > 0,
            "no write landed while the storm was being revoked"
        );
        let left = c
            .clone()
            .get(
                "storm/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        assert_eq!(left.count(), 0);
    }
);

both_engines!(
    /// A keep-alive request that etcd's gRPC layer refuses ends the stream
    /// with etcd's status: above the size limit `ResourceExhausted`,
    /// undecodable `Internal`. The node keeps serving.
    async fn refused_keep_alive_ends_stream(node: TestNode) {
        // Undecodable: field 1 (ID) as a varint that never ends.
        let path = "/etcdserverpb.Lease/LeaseKeepAlive";
        assert_stream_refuses_like_etcd(&node.endpoint(), path, &[0x08, 0xff]).await;

        let mut c = node.client().await;
        let lease = c.lease_grant(60, None).await.unwrap();
        let (mut keeper, mut answers) = c.lease_keep_alive(lease.id()).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!((answer.id(), answer.ttl() > 0), (lease.id(), true));
        assert_serving(&mut c, "refused-keep-alive").await;
    }
);

both_engines!(
    /// etcd lists leases soonest to expire first, not by ID; leases have
    /// their homes on different shards, so the gateway's merge orders them.
    async fn leases_listed_soonest_to_expire_first(node: TestNode) {
        let mut c = node.client().await;
        // (ID, TTL): ID order and expiry order differ.
        let grants = [(101, 900), (102, 60), (103, 300), (104, 600), (105, 120)];
        for (id, ttl) in grants {
            let opts = LeaseGrantOptions::new().with_id(id);
            c.lease_grant(ttl, Some(opts)).await.unwrap();
        }
        let router = ShardRouter::new(common::SHARDS as u32);
        let homes: BTreeSet<u32> = (101..=105)
            .map(|id| router.shard_of(&lease_key(id)))
            .collect();
        assert!(homes.len() > 1, "the leases live on one shard: {homes:?}");

        let l = c.leases().await.unwrap();
        let ids: Vec<i64> = l.leases().iter().map(|s| s.id()).collect();
        assert_eq!(ids, vec![102, 105, 103, 104, 101]);
    }
);
