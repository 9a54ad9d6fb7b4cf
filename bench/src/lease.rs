//! Lease workloads.
//!
//! - `lease-keepalive`: every client grants one lease and opens one
//!   keep-alive stream, then sends keep-alives one at a time; an op is one
//!   request → response round trip (etcd's `benchmark lease-keepalive`).
//! - `lease-expiry`: an expiry storm — many leases with keys run out at
//!   once while a put stream measures whether writes stall (see
//!   [`expiry`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use etcd_client::{GetOptions, PutOptions, WatchFilterType, WatchOptions};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::kv::warm_pool;
use crate::stats::{proc_cpu_secs, CpuProbe, Pacer, Recorder, RunResult};
use crate::{random_printable, threads, timed, Common};

#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// TTL of the granted leases, in seconds.
    #[arg(long, default_value_t = 60)]
    pub ttl: i64,
}

pub async fn keepalive(common: &Common, a: &LeaseArgs) -> Result<RunResult, String> {
    let pool = warm_pool(common).await?;
    // Grant the leases and open the streams before timing.
    let mut set = JoinSet::new();
    for c in 0..common.clients.max(1) {
        let conn = c % pool.len();
        let mut lc = pool[conn].lease_client();
        let (common, ttl) = (common.clone(), a.ttl);
        threads::spawn(&mut set, conn, async move {
            let g = timed(&common, lc.grant(ttl, None))
                .await
                .map_err(|e| format!("lease grant: {e}"))?;
            if g.ttl() <= 0 {
                return Err(format!("lease grant returned ttl {}", g.ttl()));
            }
            let (keeper, stream) = timed(&common, lc.keep_alive(g.id()))
                .await
                .map_err(|e| format!("lease keep-alive stream: {e}"))?;
            Ok::<_, String>((conn, lc, g.id(), keeper, stream))
        });
    }
    let mut clients = Vec::new();
    while let Some(r) = set.join_next().await {
        clients.push(r.map_err(|e| e.to_string())??);
    }

    let rec = Recorder::new();
    let pacer = common.pacer();
    let probe = CpuProbe::start_settled(&common.pids()).await;
    let start = Instant::now();
    let guard = rec.progress("lease-keepalive", common.quiet);
    let mut tasks = JoinSet::new();
    let ttl = a.ttl;
    for (conn, lc, id, mut keeper, mut stream) in clients {
        let (rec, pacer, common) = (rec.clone(), pacer.clone(), common.clone());
        threads::spawn(&mut tasks, conn, async move {
            while let Some(_i) = pacer.next().await {
                let t = Instant::now();
                let res = timed(&common, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
                match res {
                    Ok(Some(r)) if r.id() == id && r.ttl() > 0 => rec.ok(t.elapsed()),
                    Ok(Some(r)) => rec.err(format!(
                        "keep-alive answered id {} ttl {} (lease {id}, ttl {ttl})",
                        r.id(),
                        r.ttl()
                    )),
                    Ok(None) => {
                        rec.err("keep-alive stream closed by the server");
                        break;
                    }
                    Err(e) => {
                        rec.err(format!("keep-alive: {e}"));
                        break;
                    }
                }
            }
            (lc, id)
        });
    }
    let mut leases = Vec::new();
    while let Some(r) = tasks.join_next().await {
        leases.push(r.map_err(|e| e.to_string())?);
    }
    drop(guard);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = probe.finish_settled().await;
    // Clean up (not timed); failures here do not count.
    let revokes: Vec<_> = leases
        .into_iter()
        .map(|(mut lc, id)| {
            let common = common.clone();
            tokio::spawn(async move { timed(&common, lc.revoke(id)).await })
        })
        .collect();
    for r in revokes {
        let _ = r.await;
    }
    let settings = format!("{} ttl={}s", common.describe(), a.ttl);
    let mut r = RunResult::new("lease-keepalive", "ops/s", settings);
    r.cpu = Some(cpu);
    r.ops = rec.ops();
    r.errors = rec.errors();
    r.error_samples = rec.error_samples();
    r.elapsed_secs = elapsed;
    r.throughput = r.ops as f64 / elapsed.max(1e-9);
    r.latencies.push(("keep-alive".into(), rec.latency()));
    Ok(r)
}

#[derive(Args, Debug, Clone)]
pub struct LeaseExpiryArgs {
    /// Leases granted before the storm, all with the same TTL.
    #[arg(long, default_value_t = 100_000)]
    pub leases: u64,
    /// Keys attached to each lease (deleted when it expires).
    #[arg(long, default_value_t = 1)]
    pub keys_per_lease: u64,
    /// Seconds from the start of setup until every lease runs out: each
    /// lease is granted with what is left of it (rounded up), so they all
    /// expire within about one second — a storm, as after a restart that
    /// extended every lease alike. Setup must take less.
    #[arg(long, default_value_t = 30)]
    pub ttl: i64,
    /// Rate of the probing put stream (puts/s overall), which runs from the
    /// end of setup until every lease is gone.
    #[arg(long, default_value_t = 500.0)]
    pub put_rate: f64,
    /// Concurrent probing puts at most (a stalled put does not hold back
    /// the schedule of the others).
    #[arg(long, default_value_t = 64)]
    pub put_clients: usize,
    /// How long past the last lease's TTL to wait for its keys to go.
    #[arg(long, default_value = "300s", value_parser = crate::parse_duration)]
    pub drain_timeout: Duration,
}

/// The shortest TTL a storm lease is granted with (etcd's minimum is
/// about 2 s with default settings).
const MIN_TTL: Duration = Duration::from_secs(3);

/// When the watch saw the leased keys' deletes.
#[derive(Default)]
struct Drain {
    deleted: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    /// The server processes' CPU seconds when the first delete was seen.
    cpu_at_first: Option<f64>,
}

/// `lease-expiry`: grants `--leases` leases with `--keys-per-lease` keys
/// each (setup, not timed), timed to run out together, and measures whether
/// the expiry storm stalls writes: a put stream at `--put-rate` runs
/// throughout, its latencies split into before the first expiry and
/// during the storm; a prefix watch times the deletes. One op is one
/// lease that expired with all its keys (checked at the end against
/// LeaseLeases and a count of the keys).
pub async fn expiry(common: &Common, a: &LeaseExpiryArgs) -> Result<RunResult, String> {
    let pool = warm_pool(common).await?;
    let tag: u32 = rand::random();
    let prefix = format!("/bench/lease-expiry/{tag:08x}/");
    let want_deletes = a.leases * a.keys_per_lease;

    // Watch the leased keys' deletes before any exists.
    let mut wc = pool[0].watch_client();
    let mut events = timed(
        common,
        wc.watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoPut]),
            ),
        ),
    )
    .await
    .map_err(|e| format!("watch {prefix}: {e}"))?;
    match timed(common, events.message()).await? {
        Some(m) if m.created() && !m.canceled() => {}
        other => return Err(format!("watch {prefix} not created: {other:?}")),
    }
    let drain = Arc::new(Mutex::new(Drain::default()));
    let all_gone = Arc::new(Notify::new());
    let watch_task = {
        let (drain, all_gone) = (drain.clone(), all_gone.clone());
        let pids = common.pids();
        tokio::spawn(async move {
            while let Ok(Some(r)) = events.message().await {
                let n = r.events().len() as u64;
                if n == 0 {
                    continue;
                }
                let now = Instant::now();
                let mut d = drain.lock().unwrap();
                if d.first.is_none() {
                    d.cpu_at_first = Some(proc_cpu_secs(&pids));
                }
                d.first.get_or_insert(now);
                d.last = Some(now);
                d.deleted += n;
                if d.deleted >= want_deletes {
                    all_gone.notify_one();
                }
            }
        })
    };

    // Setup: grant and attach, `clients` at a time.
    let setup_start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for c in 0..common.clients.max(1) {
        let client = pool[c % pool.len()].clone();
        let (common, next, prefix) = (common.clone(), next.clone(), prefix.clone());
        let (leases, keys, ttl, val) = (a.leases, a.keys_per_lease, a.ttl, common.val_size);
        let expire_at = setup_start + Duration::from_secs(ttl.max(0) as u64);
        set.spawn(async move {
            let (mut lc, mut kv) = (client.lease_client(), client.kv_client());
            let value = random_printable(val);
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= leases {
                    return Ok::<_, String>(ids);
                }
                let left = expire_at.saturating_duration_since(Instant::now());
                if left < MIN_TTL {
                    return Err(format!(
                        "setup ran into the expiry: granting {i} of {leases} leases took over \
                         --ttl {ttl} s minus {MIN_TTL:?}; raise --ttl"
                    ));
                }
                let g = timed(&common, lc.grant(left.as_secs_f64().ceil() as i64, None))
                    .await
                    .map_err(|e| format!("lease grant: {e}"))?;
                for k in 0..keys {
                    let key = format!("{prefix}{i:08x}/{k}");
                    let opts = PutOptions::new().with_lease(g.id());
                    timed(&common, kv.put(key, value.clone(), Some(opts)))
                        .await
                        .map_err(|e| format!("put with lease: {e}"))?;
                }
                ids.push(g.id());
            }
        });
    }
    let mut ids = HashSet::new();
    while let Some(r) = set.join_next().await {
        ids.extend(r.map_err(|e| e.to_string())??);
    }
    let setup_end = Instant::now();
    // Every lease runs out by then (TTLs were rounded up to whole seconds).
    let last_deadline = setup_start + Duration::from_secs(a.ttl.max(0) as u64 + 1);

    // The probing puts, until every leased key is gone (or the timeout).
    let before = Recorder::new();
    let during = Recorder::new();
    let pacer = Pacer::new(None, None, a.put_rate);
    let probe = CpuProbe::start(&common.pids());
    let cpu_at_start = proc_cpu_secs(&common.pids());
    let guard = during.progress("lease-expiry puts (during the storm)", common.quiet);
    let mut puts = JoinSet::new();
    for c in 0..a.put_clients.max(1) {
        let conn = c % pool.len();
        let mut kv = pool[conn].kv_client();
        let (common, pacer, drain) = (common.clone(), pacer.clone(), drain.clone());
        let (before, during) = (before.clone(), during.clone());
        let value = random_printable(common.val_size);
        threads::spawn(&mut puts, conn, async move {
            while let Some(i) = pacer.next().await {
                let storm = drain.lock().unwrap().first.is_some();
                let t = Instant::now();
                let rec = if storm { &during } else { &before };
                match timed(
                    &common,
                    kv.put(
                        format!("/bench/lease-expiry-probe/{}", i % 1000),
                        value.clone(),
                        None,
                    ),
                )
                .await
                {
                    Ok(_) => rec.ok(t.elapsed()),
                    Err(e) => rec.err(format!("put: {e}")),
                }
            }
        });
    }
    let drained = tokio::time::timeout_at(
        (last_deadline + a.drain_timeout).into(),
        all_gone.notified(),
    )
    .await
    .is_ok()
        || drain.lock().unwrap().deleted >= want_deletes;
    pacer.stop();
    let stream_end = Instant::now();
    while puts.join_next().await.is_some() {}
    drop(guard);
    let cpu = probe.finish_settled().await;
    watch_task.abort();

    // Check: none of the leases is left, nor any of their keys.
    let mut lc = pool[0].lease_client();
    let left: HashSet<i64> = timed(common, lc.leases())
        .await
        .map_err(|e| format!("lease list: {e}"))?
        .leases()
        .iter()
        .map(|l| l.id())
        .filter(|id| ids.contains(id))
        .collect();
    let mut kv = pool[0].kv_client();
    let keys_left = timed(
        common,
        kv.get(
            prefix.clone(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        ),
    )
    .await
    .map_err(|e| format!("count {prefix}: {e}"))?
    .count();

    let d = drain.lock().unwrap();
    let settings = format!(
        "conns={} clients={} val={}B leases={} keys/lease={} ttl={}s put-rate={}/s",
        common.conns,
        common.clients,
        common.val_size,
        a.leases,
        a.keys_per_lease,
        a.ttl,
        a.put_rate
    );
    let mut r = RunResult::new("lease-expiry", "leases/s", settings);
    r.cpu = Some(cpu);
    r.ops = (ids.len() - left.len()) as u64;
    r.errors = before.errors() + during.errors();
    r.error_samples = [before.error_samples(), during.error_samples()].concat();
    let window = match (d.first, d.last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    r.elapsed_secs = window;
    r.throughput = r.ops as f64 / window.max(1e-3);
    r.latencies
        .push(("put during expiry".into(), during.latency()));
    r.latencies
        .push(("put before expiry".into(), before.latency()));
    r.set_extra("leases", ids.len() as f64);
    r.set_extra("deleted_keys", d.deleted as f64);
    r.set_extra("puts", (before.ops() + during.ops()) as f64);
    r.set_extra(
        "setup_secs",
        setup_end.duration_since(setup_start).as_secs_f64(),
    );
    r.set_extra("expiry_window_secs", window);
    // The CPU the storm itself cost: the reading covers the put stream
    // too, from the end of setup until the keys were gone, which lasts as
    // long as the storm does. Its cost per second, and the servers' idle
    // cost, is taken from the stretch before the first expiry and
    // subtracted for the whole stream.
    if let (Some(first), Some(at_first), Some(cpu)) = (d.first, d.cpu_at_first, &r.cpu) {
        let before = first.saturating_duration_since(setup_end).as_secs_f64();
        let stream = stream_end
            .saturating_duration_since(setup_end)
            .as_secs_f64();
        if before >= 1.0 && r.ops > 0 {
            let per_sec = (at_first - cpu_at_start) / before;
            let storm = (cpu.server_secs - per_sec * stream).max(0.0);
            r.set_extra("server_cpu_s_per_s_before_expiry", per_sec);
            r.set_extra(
                "server_cpu_us_per_lease_beyond_puts",
                storm * 1e6 / r.ops as f64,
            );
        }
    }
    if let Some(l) = d.last {
        // How long after the last lease's TTL ran out its keys were gone.
        let late = l.saturating_duration_since(last_deadline).as_secs_f64();
        r.set_extra("last_expiry_after_ttl_secs", late);
    }
    if !drained {
        r.violations.push(format!(
            "{} of {want_deletes} leased keys deleted within {:?} after the last TTL",
            d.deleted, a.drain_timeout
        ));
    }
    if !left.is_empty() {
        r.violations.push(format!(
            "{} leases still listed after the storm",
            left.len()
        ));
    }
    if keys_left != 0 {
        r.violations.push(format!(
            "{keys_left} leased keys still present after the storm"
        ));
    }
    if d.deleted != want_deletes {
        r.violations.push(format!(
            "the watch saw {} deletes of {want_deletes} leased keys",
            d.deleted
        ));
    }
    Ok(r)
}
