//! Concurrent clients against one node, on both engines: revisions are
//! unique and follow real time, reads are linearizable and are exact
//! snapshots at their header revision, cross-shard txns are atomic and
//! isolated, and compare-and-swap loses no update.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use common::rev_of;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLIENTS: usize = 16;
const OPS_PER_CLIENT: usize = 100;
const KEYS: usize = 64;
const PREFIX: &str = "cc/";

fn key(i: usize) -> String {
    format!("{PREFIX}k{i:02}")
}

/// An acknowledged write: its real-time interval, revision and the
/// key/values it put.
#[derive(Clone, Debug)]
struct Write {
    start: Instant,
    end: Instant,
    rev: i64,
    puts: Vec<(String, String)>,
    what: String,
}

/// What a read returned for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    value: String,
    create: i64,
    modr: i64,
    version: i64,
}

#[derive(Clone, Debug)]
struct Read {
    start: Instant,
    end: Instant,
    header: i64,
    /// The keys the read covered (one key, or the whole keyspace).
    covers: Vec<String>,
    seen: BTreeMap<String, Seen>,
    what: String,
}

fn seen_of(kvs: &[etcd_client::KeyValue]) -> BTreeMap<String, Seen> {
    kvs.iter()
        .map(|k| {
            (
                String::from_utf8(k.key().to_vec()).unwrap(),
                Seen {
                    value: String::from_utf8(k.value().to_vec()).unwrap(),
                    create: k.create_revision(),
                    modr: k.mod_revision(),
                    version: k.version(),
                },
            )
        })
        .collect()
}

async fn run_client(mut c: Client, id: usize) -> (Vec<Write>, Vec<Read>) {
    let mut rng = StdRng::seed_from_u64(0x5eed_0000 + id as u64);
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for i in 0..OPS_PER_CLIENT {
        let value = format!("c{id}-{i}");
        let roll = rng.gen_range(0..100);
        if roll < 35 {
            // Plain put to a random key (keys hash over every shard).
            let k = key(rng.gen_range(0..KEYS));
            let start = Instant::now();
            let resp = c
                .put(k.as_str(), value.as_str(), None)
                .await
                .unwrap_or_else(|e| panic!("client {id} put {k}: {e}"));
            let end = Instant::now();
            writes.push(Write {
                start,
                end,
                rev: rev_of(resp.header()),
                puts: vec![(k.clone(), value)],
                what: format!("c{id} op{i} put {k}"),
            });
        } else if roll < 50 {
            // Single-key compare-and-swap on the mod revision just read.
            let k = key(rng.gen_range(0..KEYS));
            let start = Instant::now();
            let got = c.get(k.as_str(), None).await.unwrap();
            let end = Instant::now();
            let modr = got.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0);
            reads.push(Read {
                start,
                end,
                header: rev_of(got.header()),
                covers: vec![k.clone()],
                seen: seen_of(got.kvs()),
                what: format!("c{id} op{i} cas-read {k}"),
            });
            let start = Instant::now();
            let t = c
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(k.as_str(), CompareOp::Equal, modr)])
                        .and_then([TxnOp::put(k.as_str(), value.as_str(), None)])
                        .or_else([TxnOp::get(k.as_str(), None)]),
                )
                .await
                .unwrap_or_else(|e| panic!("client {id} cas {k}: {e}"));
            let end = Instant::now();
            let header = rev_of(t.header());
            if t.succeeded() {
                writes.push(Write {
                    start,
                    end,
                    rev: header,
                    puts: vec![(k.clone(), value)],
                    what: format!("c{id} op{i} cas {k}"),
                });
            } else {
                let resps = t.op_responses();
                let TxnOpResponse::Get(g) = &resps[0] else {
                    panic!("failure branch answers a range");
                };
                let seen = seen_of(g.kvs());
                assert_ne!(
                    seen.get(&k).map(|s| s.modr).unwrap_or(0),
                    modr,
                    "CAS on {k} failed although mod revision is still {modr}"
                );
                reads.push(Read {
                    start,
                    end,
                    header,
                    covers: vec![k.clone()],
                    seen,
                    what: format!("c{id} op{i} cas-failed {k}"),
                });
            }
        } else if roll < 65 {
            // Multi-key txn over keys of different shards.
            let mut ks: Vec<String> = Vec::new();
            while ks.len() < 4 {
                let k = key(rng.gen_range(0..KEYS));
                if !ks.contains(&k) {
                    ks.push(k);
                }
            }
            let ops: Vec<TxnOp> = ks
                .iter()
                .map(|k| TxnOp::put(k.as_str(), value.as_str(), None))
                .collect();
            let start = Instant::now();
            let t = c
                .txn(Txn::new().and_then(ops))
                .await
                .unwrap_or_else(|e| panic!("client {id} multi-key txn: {e}"));
            let end = Instant::now();
            assert!(t.succeeded());
            writes.push(Write {
                start,
                end,
                rev: rev_of(t.header()),
                puts: ks.iter().map(|k| (k.clone(), value.clone())).collect(),
                what: format!("c{id} op{i} txn {ks:?}"),
            });
        } else if roll < 85 {
            let k = key(rng.gen_range(0..KEYS));
            let start = Instant::now();
            let got = c.get(k.as_str(), None).await.unwrap();
            let end = Instant::now();
            reads.push(Read {
                start,
                end,
                header: rev_of(got.header()),
                covers: vec![k.clone()],
                seen: seen_of(got.kvs()),
                what: format!("c{id} op{i} get {k}"),
            });
        } else {
            let start = Instant::now();
            let got = c
                .get(PREFIX, Some(GetOptions::new().with_prefix()))
                .await
                .unwrap();
            let end = Instant::now();
            reads.push(Read {
                start,
                end,
                header: rev_of(got.header()),
                covers: (0..KEYS).map(key).collect(),
                seen: seen_of(got.kvs()),
                what: format!("c{id} op{i} get prefix"),
            });
        }
    }
    (writes, reads)
}

both_engines!(
    async fn concurrent_clients_are_linearizable(node: TestNode) {
        let mut tasks = Vec::new();
        for id in 0..CLIENTS {
            let c = node.client().await;
            tasks.push(tokio::spawn(run_client(c, id)));
        }
        let mut writes: Vec<Write> = Vec::new();
        let mut reads: Vec<Read> = Vec::new();
        for t in tasks {
            let (w, r) = t.await.expect("client task");
            writes.extend(w);
            reads.extend(r);
        }
        assert!(writes.len() > CLIENTS * OPS_PER_CLIENT / 3);
        assert!(!reads.is_empty());

        // 1. Every write has its own revision.
        let mut by_rev: HashMap<i64, &Write> = HashMap::new();
        for w in &writes {
            if let Some(other) = by_rev.insert(w.rev, w) {
                panic!(
                    "revision {} given to both {:?} and {:?}",
                    w.rev, other.what, w.what
                );
            }
        }

        // 2. Real-time order: A ends before B starts => rev(A) < rev(B).
        //    Writes sorted by end; prefix maximum of revisions.
        let mut by_end: Vec<&Write> = writes.iter().collect();
        by_end.sort_by_key(|w| w.end);
        let mut prefix_max: Vec<(i64, usize)> = Vec::with_capacity(by_end.len());
        for (i, w) in by_end.iter().enumerate() {
            let best = match prefix_max.last() {
                Some(&(r, j)) if r >= w.rev => (r, j),
                _ => (w.rev, i),
            };
            prefix_max.push(best);
        }
        // Max revision (and its write) among writes that ended before `t`.
        let max_before = |t: Instant| -> Option<(i64, &Write)> {
            let n = by_end.partition_point(|w| w.end < t);
            if n == 0 {
                None
            } else {
                let (r, j) = prefix_max[n - 1];
                Some((r, by_end[j]))
            }
        };
        for b in &writes {
            if let Some((r, a)) = max_before(b.start) {
                assert!(
                    r < b.rev,
                    "{:?} (rev {r}) completed before {:?} started, yet got rev {}",
                    a.what,
                    b.what,
                    b.rev
                );
            }
        }

        // Per key: the writes to it in revision order.
        let mut per_key: HashMap<&str, Vec<(i64, &Write, &str)>> = HashMap::new();
        for w in &writes {
            for (k, v) in &w.puts {
                per_key
                    .entry(k.as_str())
                    .or_default()
                    .push((w.rev, w, v.as_str()));
            }
        }
        for list in per_key.values_mut() {
            list.sort_by_key(|(r, _, _)| *r);
        }

        for r in &reads {
            // 3. The header covers every write that completed before the
            //    read started.
            if let Some((rev, w)) = max_before(r.start) {
                assert!(
                    r.header >= rev,
                    "{} (header {}) started after {:?} (rev {rev}) completed",
                    r.what,
                    r.header,
                    w.what
                );
            }
            for (k, s) in &r.seen {
                assert!(
                    s.modr <= r.header,
                    "{} returned {k} at mod revision {} above its header revision {}",
                    r.what,
                    s.modr,
                    r.header
                );
            }
            for k in &r.covers {
                let hist: &[(i64, &Write, &str)] =
                    per_key.get(k.as_str()).map(|v| &v[..]).unwrap_or(&[]);
                // 4. The result is exactly the state at the header revision.
                let upto: Vec<&(i64, &Write, &str)> =
                    hist.iter().filter(|(rv, _, _)| *rv <= r.header).collect();
                let expect = upto.last().map(|(rv, _, v)| Seen {
                    value: v.to_string(),
                    create: hist[0].0,
                    modr: *rv,
                    version: upto.len() as i64,
                });
                assert_eq!(
                    r.seen.get(k),
                    expect.as_ref(),
                    "{} at header {}: key {k} is not the state at that revision",
                    r.what,
                    r.header
                );
                // 5. ...and it includes every write to the key that completed
                //    before the read started (implied by 3 and 4; checked
                //    directly for a clearer message).
                if let Some((rv, w, _)) = hist.iter().rfind(|(_, w, _)| w.end < r.start) {
                    let got = r.seen.get(k).map(|s| s.modr).unwrap_or(0);
                    assert!(
                        got >= *rv,
                        "{} saw {k} at mod {got}, older than completed {:?} (rev {rv})",
                        r.what,
                        w.what
                    );
                }
            }
            assert!(
                r.seen.keys().all(|k| r.covers.contains(k)),
                "{} returned keys outside its range",
                r.what
            );
        }

        // 6. A write that starts after a read completed gets a revision above
        //    the read's header: the header revision is a closed snapshot
        //    (what list-then-watch-from-revision+1 relies on).
        let mut reads_by_end: Vec<&Read> = reads.iter().collect();
        reads_by_end.sort_by_key(|r| r.end);
        let mut header_max: Vec<(i64, usize)> = Vec::with_capacity(reads_by_end.len());
        for (i, r) in reads_by_end.iter().enumerate() {
            let best = match header_max.last() {
                Some(&(h, j)) if h >= r.header => (h, j),
                _ => (r.header, i),
            };
            header_max.push(best);
        }
        for w in &writes {
            let n = reads_by_end.partition_point(|r| r.end < w.start);
            if n > 0 {
                let (h, j) = header_max[n - 1];
                assert!(
                    w.rev > h,
                    "{:?} got rev {} although {} (header {h}) completed before it started",
                    w.what,
                    w.rev,
                    reads_by_end[j].what
                );
            }
        }

        // 7. The final state agrees with the write log.
        let mut c = node.client().await;
        let last = writes.iter().map(|w| w.rev).max().unwrap();
        let got = c
            .get(PREFIX, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert!(rev_of(got.header()) >= last);
        let seen = seen_of(got.kvs());
        for (k, hist) in &per_key {
            let (rv, _, v) = hist.last().unwrap();
            assert_eq!(
                seen.get(*k),
                Some(&Seen {
                    value: v.to_string(),
                    create: hist[0].0,
                    modr: *rv,
                    version: hist.len() as i64
                }),
                "final state of {k}"
            );
        }
        assert_eq!(seen.len(), per_key.len());
    }
);

both_engines!(
    async fn cross_shard_txns_are_isolated_from_readers(node: TestNode) {
        const KEYS16: usize = 16;
        const ROUNDS: usize = 40;
        let keys: Vec<String> = (0..KEYS16).map(|i| format!("iso/{i:02}")).collect();
        let mut w = node.client().await;

        let writer = {
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut revs = Vec::new();
                for g in 0..ROUNDS {
                    let ops: Vec<TxnOp> = keys
                        .iter()
                        .map(|k| TxnOp::put(k.as_str(), format!("gen{g:03}"), None))
                        .collect();
                    let t = w.txn(Txn::new().and_then(ops)).await.expect("writer txn");
                    revs.push(rev_of(t.header()));
                }
                revs
            })
        };

        let mut readers = Vec::new();
        for r in 0..2 {
            let mut c = node.client().await;
            readers.push(tokio::spawn(async move {
                let mut last_gen: Option<String> = None;
                let mut last_header = 0;
                let mut reads = 0usize;
                // Read until the final generation is visible.
                loop {
                    let got = c
                        .get("iso/", Some(GetOptions::new().with_prefix()))
                        .await
                        .expect("reader get");
                    reads += 1;
                    assert!(reads < 100_000, "reader {r}: never saw the last generation");
                    let header = rev_of(got.header());
                    assert!(header >= last_header, "reader {r}: header went back");
                    last_header = header;
                    let kvs = got.kvs();
                    if kvs.is_empty() {
                        assert!(last_gen.is_none(), "reader {r}: keys vanished");
                        continue;
                    }
                    assert_eq!(kvs.len(), KEYS16, "reader {r}: partial txn visible");
                    let v0 = kvs[0].value().to_vec();
                    let m0 = kvs[0].mod_revision();
                    for kv in kvs {
                        assert_eq!(
                            (kv.value(), kv.mod_revision()),
                            (&v0[..], m0),
                            "reader {r}: keys of one txn disagree (torn read)"
                        );
                    }
                    let g = String::from_utf8(v0).unwrap();
                    if let Some(prev) = &last_gen {
                        assert!(g >= *prev, "reader {r}: saw {g} after {prev}");
                    }
                    let done = g == format!("gen{:03}", ROUNDS - 1);
                    last_gen = Some(g);
                    if done {
                        return reads;
                    }
                }
            }));
        }
        let revs = writer.await.expect("writer");
        for r in readers {
            r.await.expect("reader");
        }
        for w in revs.windows(2) {
            assert!(
                w[0] < w[1],
                "sequential txns got revisions {} then {}",
                w[0],
                w[1]
            );
        }

        // Each txn revision is a snapshot with exactly that generation.
        let mut c = node.client().await;
        for (g, rev) in revs.iter().enumerate() {
            let got = c
                .get(
                    "iso/",
                    Some(GetOptions::new().with_prefix().with_revision(*rev)),
                )
                .await
                .unwrap();
            assert_eq!(got.kvs().len(), KEYS16);
            for kv in got.kvs() {
                assert_eq!(kv.value(), format!("gen{g:03}").as_bytes());
                assert_eq!(kv.mod_revision(), *rev);
                assert_eq!(kv.version(), g as i64 + 1);
            }
        }
    }
);

both_engines!(
    async fn compare_and_swap_loses_no_update(node: TestNode) {
        // Two counters on (very likely) different shards, always updated
        // together by a txn that compares both mod revisions.
        const WORKERS: usize = 8;
        const INCREMENTS: usize = 25;
        let mut c = node.client().await;
        let init = c
            .txn(Txn::new().and_then([
                TxnOp::put("ctr/a", "0", None),
                TxnOp::put("ctr/zz-b", "0", None),
            ]))
            .await
            .unwrap();
        assert!(init.succeeded());

        let mut tasks = Vec::new();
        for id in 0..WORKERS {
            let mut c = node.client().await;
            tasks.push(tokio::spawn(async move {
                let mut attempts = 0usize;
                let mut done = 0usize;
                while done < INCREMENTS {
                    attempts += 1;
                    assert!(attempts < 20_000, "worker {id}: CAS never succeeds");
                    let got = c
                        .txn(
                            Txn::new().and_then([
                                TxnOp::get("ctr/a", None),
                                TxnOp::get("ctr/zz-b", None),
                            ]),
                        )
                        .await
                        .unwrap();
                    let resps = got.op_responses();
                    let read = |i: usize| match &resps[i] {
                        TxnOpResponse::Get(g) => {
                            let kv = &g.kvs()[0];
                            let n: u64 = kv.value_str().unwrap().parse().unwrap();
                            (n, kv.mod_revision())
                        }
                        other => panic!("expected range, got {other:?}"),
                    };
                    let ((a, ma), (b, mb)) = (read(0), read(1));
                    assert_eq!(a, b, "worker {id}: counters diverged in one snapshot");
                    let t = c
                        .txn(
                            Txn::new()
                                .when([
                                    Compare::mod_revision("ctr/a", CompareOp::Equal, ma),
                                    Compare::mod_revision("ctr/zz-b", CompareOp::Equal, mb),
                                ])
                                .and_then([
                                    TxnOp::put("ctr/a", (a + 1).to_string(), None),
                                    TxnOp::put("ctr/zz-b", (b + 1).to_string(), None),
                                ]),
                        )
                        .await
                        .unwrap();
                    if t.succeeded() {
                        done += 1;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("worker");
        }
        let total = (WORKERS * INCREMENTS) as i64;
        for k in ["ctr/a", "ctr/zz-b"] {
            let got = c.get(k, None).await.unwrap();
            let kv = &got.kvs()[0];
            assert_eq!(
                kv.value_str().unwrap(),
                total.to_string(),
                "{k}: lost updates"
            );
            assert_eq!(kv.version(), total + 1, "{k}: one version per increment");
        }
    }
);

// Two of the checks above again, where a connection's requests and
// responses cross threads.
on_a_multi_threaded_gateway!(
    concurrent_clients_are_linearizable,
    compare_and_swap_loses_no_update,
);
