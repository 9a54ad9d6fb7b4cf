//! `lease-keepalive`: every client grants one lease and opens one
//! keep-alive stream, then sends keep-alives one at a time; an op is one
//! request → response round trip (etcd's `benchmark lease-keepalive`).

use std::time::Instant;

use clap::Args;
use tokio::task::JoinSet;

use crate::kv::warm_pool;
use crate::stats::{CpuProbe, Recorder, RunResult};
use crate::{timed, Common};

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
        let mut lc = pool[c % pool.len()].lease_client();
        let (common, ttl) = (common.clone(), a.ttl);
        set.spawn(async move {
            let g = timed(&common, lc.grant(ttl, None))
                .await
                .map_err(|e| format!("lease grant: {e}"))?;
            if g.ttl() <= 0 {
                return Err(format!("lease grant returned ttl {}", g.ttl()));
            }
            let (keeper, stream) = timed(&common, lc.keep_alive(g.id()))
                .await
                .map_err(|e| format!("lease keep-alive stream: {e}"))?;
            Ok::<_, String>((lc, g.id(), keeper, stream))
        });
    }
    let mut clients = Vec::new();
    while let Some(r) = set.join_next().await {
        clients.push(r.map_err(|e| e.to_string())??);
    }

    let rec = Recorder::new();
    let pacer = common.pacer();
    let probe = CpuProbe::start(&common.pids());
    let start = Instant::now();
    let guard = rec.progress("lease-keepalive", common.quiet);
    let mut tasks = JoinSet::new();
    let ttl = a.ttl;
    for (lc, id, mut keeper, mut stream) in clients {
        let (rec, pacer, common) = (rec.clone(), pacer.clone(), common.clone());
        tasks.spawn(async move {
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
    let cpu = probe.finish();
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
