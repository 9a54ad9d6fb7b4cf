//! KV workloads: put, range, txn-put, delete — closed-loop clients over a
//! pool of connections, as etcd's `benchmark` runs them.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use etcd_client::{Client, GetOptions, KvClient, Txn, TxnOp};
use metastore_proto::router::ShardRouter;
use rand::Rng;
use tokio::task::JoinSet;

use crate::stats::{wait_quiet, CpuProbe, Recorder, RunResult};
use crate::{connect_pool, threads, timed, Common};

#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// The key read (or the prefix listed with --prefix).
    #[arg(long, default_value = "/bench/range/key")]
    pub key: String,
    /// Read every key under --key (a prefix) instead of one key.
    #[arg(long)]
    pub prefix: bool,
    /// Most keys returned per request (0 = no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// l = linearizable, s = serializable.
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Keys written under the prefix before reading (with --prefix).
    #[arg(long, default_value_t = 100)]
    pub prefill: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    L,
    S,
}

#[derive(Args, Debug, Clone)]
pub struct TxnPutArgs {
    /// Puts per transaction (distinct keys).
    #[arg(long, default_value_t = 1)]
    pub txn_ops: usize,
    /// Spread each txn's keys so that op j lands on MetaStore shard
    /// j mod N (its hash placement); 0 = random keys.
    #[arg(long, default_value_t = 0)]
    pub shards: u32,
}

/// Runs `op` from `clients` closed-loop tasks until the pacer ends the run;
/// records each op's latency; `op` returns how many ops it completed
/// (usually 1).
pub async fn drive<F, Fut>(
    common: &Common,
    workload: &str,
    settings: String,
    pool: &[Client],
    op: F,
) -> Result<RunResult, String>
where
    F: Fn(usize, u64, KvClient) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let quiet = wait_quiet(&common.pids()).await;
    drive_then(common, workload, settings, pool, op, || {}, quiet).await
}

/// [`drive`], calling `clients_done` once the clients have finished and
/// before the servers' CPU is read: a workload with other clients of its
/// own (watchers, listers) stops them there, so the reading waits only
/// for the servers to finish their work (`CpuProbe::finish_settled`).
/// `quiet`: whether the servers had gone quiet before the caller started
/// anything of the run ([`wait_quiet`]; [`drive`] waits right before its
/// clients start).
pub async fn drive_then<F, Fut>(
    common: &Common,
    workload: &str,
    settings: String,
    pool: &[Client],
    op: F,
    clients_done: impl FnOnce(),
    quiet: bool,
) -> Result<RunResult, String>
where
    F: Fn(usize, u64, KvClient) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let rec = Recorder::new();
    let pacer = common.pacer();
    let probe = CpuProbe::start_after_waiting(&common.pids(), quiet);
    let start = Instant::now();
    let guard = rec.progress(workload, common.quiet);
    let op = Arc::new(op);
    let mut tasks = JoinSet::new();
    for c in 0..common.clients.max(1) {
        let conn = c % pool.len();
        let kv = pool[conn].kv_client();
        let (rec, pacer, op, common) = (rec.clone(), pacer.clone(), op.clone(), common.clone());
        threads::spawn(&mut tasks, conn, async move {
            while let Some(i) = pacer.next().await {
                let t = Instant::now();
                match timed(&common, op(c, i, kv.clone())).await {
                    Ok(()) => rec.ok(t.elapsed()),
                    Err(e) => {
                        rec.err(e);
                        // A server that refuses everything: stop early.
                        let errs = rec.errors();
                        if errs >= 100 && errs > rec.ops() {
                            pacer.stop();
                        }
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| format!("client task: {e}"))?;
    }
    drop(guard);
    let elapsed = start.elapsed().as_secs_f64();
    clients_done();
    let mut r = RunResult::new(workload, "ops/s", settings);
    r.cpu = Some(probe.finish_settled().await);
    r.ops = rec.ops();
    r.errors = rec.errors();
    r.error_samples = rec.error_samples();
    r.elapsed_secs = elapsed;
    r.throughput = r.ops as f64 / elapsed.max(1e-9);
    r.latencies.push(("request".into(), rec.latency()));
    Ok(r)
}

/// Connects the pool and sends one read per connection so that connection
/// set-up is not timed.
pub async fn warm_pool(common: &Common) -> Result<Vec<Client>, String> {
    let pool = connect_pool(common, common.conns).await?;
    let mut set = JoinSet::new();
    for c in &pool {
        let mut kv = c.kv_client();
        let common = common.clone();
        set.spawn(async move { timed(&common, kv.get("/bench/warmup", None)).await });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())?
            .map_err(|e| format!("warm-up read: {e}"))?;
    }
    Ok(pool)
}

/// Writes every key of `keys` with `value`, `concurrency` at a time.
pub async fn prefill(
    common: &Common,
    pool: &[Client],
    keys: Vec<Vec<u8>>,
    value: Vec<u8>,
    concurrency: usize,
) -> Result<(), String> {
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for c in 0..concurrency.max(1) {
        let mut kv = pool[c % pool.len()].kv_client();
        let (keys, next, value, common) =
            (keys.clone(), next.clone(), value.clone(), common.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(k) = keys.get(i) else { break };
                timed(&common, kv.put(k.clone(), value.clone(), None))
                    .await
                    .map_err(|e| format!("prefill put: {e}"))?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

pub async fn put(common: &Common) -> Result<RunResult, String> {
    let pool = warm_pool(common).await?;
    let keys = common.keys();
    let value = common.value();
    drive(
        common,
        "put",
        common.describe(),
        &pool,
        move |_, i, mut kv| {
            let (k, v) = (keys.key(i), value.clone());
            async move {
                kv.put(k, v, None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await
}

pub async fn range(common: &Common, a: &RangeArgs) -> Result<RunResult, String> {
    let pool = warm_pool(common).await?;
    let value = common.value();
    let expect: u64 = if a.prefix {
        let keys: Vec<Vec<u8>> = (0..a.prefill)
            .map(|i| format!("{}{i:08}", a.key).into_bytes())
            .collect();
        prefill(common, &pool, keys, value, 64).await?;
        if a.limit > 0 {
            a.prefill.min(a.limit as u64)
        } else {
            a.prefill
        }
    } else {
        prefill(common, &pool, vec![a.key.clone().into_bytes()], value, 1).await?;
        1
    };
    let mut opts = GetOptions::new();
    if a.prefix {
        opts = opts.with_prefix();
    }
    if a.limit > 0 {
        opts = opts.with_limit(a.limit);
    }
    if a.consistency == Consistency::S {
        opts = opts.with_serializable();
    }
    let settings = format!(
        "{} consistency={:?} {}{}",
        common.describe(),
        a.consistency,
        if a.prefix { "prefix " } else { "key " },
        if a.limit > 0 {
            format!("limit={}", a.limit)
        } else {
            String::new()
        }
    );
    let key = a.key.clone();
    let name = if a.prefix { "range-prefix" } else { "range" };
    drive(common, name, settings, &pool, move |_, _, mut kv| {
        let (k, o) = (key.clone(), opts.clone());
        async move {
            let r = kv.get(k, Some(o)).await.map_err(|e| e.to_string())?;
            if r.kvs().len() as u64 != expect {
                return Err(format!(
                    "range returned {} keys, expected {expect}",
                    r.kvs().len()
                ));
            }
            Ok(())
        }
    })
    .await
}

/// Distinct keys for one txn; with `shards > 0`, key j on shard j mod shards.
fn txn_keys(common: &Common, ops: usize, shards: u32) -> Vec<Vec<u8>> {
    let gen = common.keys();
    let router = (shards > 0).then(|| ShardRouter::new(shards));
    let mut rng = rand::thread_rng();
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(ops);
    for j in 0..ops {
        for _ in 0..10_000 {
            let k = gen.key_at(rng.gen_range(0..gen.space));
            let on_shard = router
                .map(|r| r.shard_of(&k) == j as u32 % shards)
                .unwrap_or(true);
            if on_shard && !out.contains(&k) {
                out.push(k);
                break;
            }
        }
    }
    out
}

pub async fn txn_put(common: &Common, a: &TxnPutArgs) -> Result<RunResult, String> {
    if a.txn_ops == 0 || (a.txn_ops as u64) > common.key_space_size {
        return Err(format!(
            "--txn-ops {} needs a key space of at least as many keys (--key-space-size {})",
            a.txn_ops, common.key_space_size
        ));
    }
    let pool = warm_pool(common).await?;
    let value = common.value();
    let c2 = common.clone();
    let (n, shards) = (a.txn_ops, a.shards);
    let settings = format!("{} txn-ops={} shards={}", common.describe(), n, shards);
    drive(common, "txn-put", settings, &pool, move |_, _, mut kv| {
        let keys = txn_keys(&c2, n, shards);
        let ops: Vec<TxnOp> = keys
            .into_iter()
            .map(|k| TxnOp::put(k, value.clone(), None))
            .collect();
        async move {
            let r = kv
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| e.to_string())?;
            if !r.succeeded() {
                return Err("txn without compares did not succeed".into());
            }
            if r.op_responses().len() != n {
                return Err(format!(
                    "txn returned {} op responses",
                    r.op_responses().len()
                ));
            }
            Ok(())
        }
    })
    .await
}

pub async fn delete(common: &Common) -> Result<RunResult, String> {
    let pool = warm_pool(common).await?;
    let gen = common.keys();
    let keys: Vec<Vec<u8>> = (0..gen.space).map(|i| gen.key_at(i)).collect();
    prefill(
        common,
        &pool,
        keys,
        common.value(),
        common.clients.clamp(1, 256),
    )
    .await?;
    let deleted = Arc::new(AtomicU64::new(0));
    let d2 = deleted.clone();
    let mut r = drive(
        common,
        "delete",
        common.describe(),
        &pool,
        move |_, i, mut kv| {
            let k = gen.key(i);
            let d = d2.clone();
            async move {
                let r = kv.delete(k, None).await.map_err(|e| e.to_string())?;
                d.fetch_add(r.deleted() as u64, Ordering::Relaxed);
                Ok(())
            }
        },
    )
    .await?;
    let deleted = deleted.load(Ordering::Relaxed);
    r.set_extra("deleted_keys", deleted as f64);
    // Sequential deletes of a pre-written key space delete each key once.
    if common.sequential_keys && r.ops <= common.key_space_size && r.errors == 0 && deleted != r.ops
    {
        r.violations.push(format!(
            "{} sequential deletes of existing keys deleted {deleted} keys",
            r.ops
        ));
    }
    Ok(r)
}
