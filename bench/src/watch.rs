//! Watch workloads: fan-out (`watch`) and put→event latency
//! (`watch-latency`).
//!
//! `--streams` gRPC watch streams (spread over `--conns` connections), each
//! with `--watchers-per-stream` watchers on one key (or a prefix). Once
//! every watcher is created, `--put-clients` put `--put-total` times (at
//! `--put-rate`) to that key (or to keys under the prefix), so every put
//! must reach every watcher exactly once.
//!
//! Measured: events delivered per second (first put sent → last event
//! received), and per event the latency from the put's acknowledgement to
//! the event's arrival (clamped at 0: an event may arrive before the put's
//! response) and from the put's send (carried in the value). Checked per
//! watcher: every event is one of our puts, revisions strictly increase
//! (no duplicate, no reordering), and the count is exactly `--put-total`.
//! Also: the server's RSS growth per created watcher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::task::JoinSet;

use crate::stats::{
    new_histogram, proc_rss_bytes, record, CpuProbe, Latency, Pacer, Recorder, RunResult,
    PUT_SEND_TO_EVENT,
};
use crate::{connect_pool, parse_duration, threads, timed, Common};

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch gRPC streams [watch: 10, watch-latency: 10].
    #[arg(long)]
    pub streams: Option<usize>,
    /// Watchers on each stream [watch: 10, watch-latency: 10].
    #[arg(long)]
    pub watchers_per_stream: Option<usize>,
    /// The watched key (or prefix with --prefix).
    #[arg(long, default_value = "/bench/watch/key")]
    pub key: String,
    /// Watch the prefix --key; puts go to keys under it (from the key space).
    #[arg(long)]
    pub prefix: bool,
    /// Puts made while watching [watch: 1000, watch-latency: 1000].
    #[arg(long)]
    pub put_total: Option<u64>,
    /// Puts per second (0 = as fast as the put clients go) [watch: 0, watch-latency: 200].
    #[arg(long)]
    pub put_rate: Option<f64>,
    /// Concurrent put clients.
    #[arg(long, default_value_t = 1)]
    pub put_clients: usize,
    /// Ask for the previous key-value with each event.
    #[arg(long)]
    pub prev_kv: bool,
    /// Give up waiting for missing events after this long without progress.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub settle_timeout: Duration,
}

struct Settings {
    streams: usize,
    per_stream: usize,
    put_total: u64,
    put_rate: f64,
}

/// What one stream's receiver saw.
#[derive(Default)]
struct StreamOutcome {
    /// (watch id, events, last revision) per watcher.
    watchers: Vec<(i64, u64, i64)>,
    /// (revision, received at ns since the run's epoch) per event.
    events: Vec<(i64, u64)>,
    violations: Vec<String>,
    errors: Vec<String>,
}

pub async fn watch(
    common: &Common,
    a: &WatchArgs,
    latency_mode: bool,
) -> Result<RunResult, String> {
    let s = Settings {
        streams: a.streams.unwrap_or(10).max(1),
        per_stream: a.watchers_per_stream.unwrap_or(10).max(1),
        put_total: a.put_total.unwrap_or(1000),
        put_rate: a.put_rate.unwrap_or(if latency_mode { 200.0 } else { 0.0 }),
    };
    let workload = if latency_mode {
        "watch-latency"
    } else {
        "watch"
    };
    let watchers = (s.streams * s.per_stream) as u64;
    let settings = format!(
        "conns={} streams={} watchers/stream={} ({} watchers) {} {:?} puts={} put-rate={} put-clients={} val={}B{}",
        common.conns,
        s.streams,
        s.per_stream,
        watchers,
        if a.prefix { "prefix" } else { "key" },
        a.key,
        s.put_total,
        if s.put_rate > 0.0 { format!("{}/s", s.put_rate) } else { "max".into() },
        a.put_clients,
        common.val_size.max(16),
        if a.prev_kv { " prev_kv" } else { "" }
    );
    let pool = connect_pool(common, common.conns).await?;
    let put_pool = connect_pool(common, 1).await?;
    // Warm the put connection and make sure the key exists (prev_kv).
    let mut kv = put_pool[0].kv_client();
    timed(common, kv.get(a.key.clone(), None))
        .await
        .map_err(|e| format!("warm-up read: {e}"))?;

    let pids = common.pids();
    let rss = |pids: &[(String, u32)]| -> u64 {
        pids.iter().filter_map(|(_, p)| proc_rss_bytes(*p)).sum()
    };
    let rss_before = rss(&pids);

    // Open the streams and create every watcher.
    let create_start = Instant::now();
    let mut opts = WatchOptions::new();
    if a.prefix {
        opts = opts.with_prefix();
    }
    if a.prev_kv {
        opts = opts.with_prev_key();
    }
    let mut set = JoinSet::new();
    for i in 0..s.streams {
        let conn = i % pool.len();
        let mut wc = pool[conn].watch_client();
        let (key, opts, per, common) = (a.key.clone(), opts.clone(), s.per_stream, common.clone());
        threads::spawn(&mut set, conn, async move {
            let mut stream = timed(&common, wc.watch(key.clone(), Some(opts.clone()))).await?;
            for _ in 1..per {
                timed(&common, stream.watch(key.clone(), Some(opts.clone()))).await?;
            }
            let mut ids = Vec::with_capacity(per);
            while ids.len() < per {
                match timed(&common, stream.message()).await? {
                    Some(m) if m.created() && !m.canceled() => ids.push(m.watch_id()),
                    Some(m) if m.canceled() => {
                        return Err(format!(
                            "watch canceled at creation: {:?}",
                            m.cancel_reason()
                        ))
                    }
                    Some(m) => {
                        return Err(format!(
                            "unexpected message before creation: watch {} with {} events",
                            m.watch_id(),
                            m.events().len()
                        ))
                    }
                    None => return Err("watch stream closed during creation".into()),
                }
            }
            let mut uniq = ids.clone();
            uniq.sort();
            uniq.dedup();
            if uniq.len() != ids.len() {
                return Err(format!("duplicate watch ids on one stream: {ids:?}"));
            }
            Ok::<_, String>((conn, stream, ids))
        });
    }
    let mut streams: Vec<(usize, WatchStream, Vec<i64>)> = Vec::new();
    while let Some(r) = set.join_next().await {
        streams.push(
            r.map_err(|e| e.to_string())?
                .map_err(|e| format!("create watchers: {e}"))?,
        );
    }
    let create_secs = create_start.elapsed().as_secs_f64();
    // Let the server settle its allocations before sampling RSS.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = rss(&pids);

    // Receivers.
    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let send_lat = Recorder::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let expected = s.put_total;
    let mut receivers = JoinSet::new();
    for (conn, mut stream, ids) in streams {
        let (delivered, send_lat, mut stop_rx) =
            (delivered.clone(), send_lat.clone(), stop_rx.clone());
        let key = a.key.clone().into_bytes();
        let prefix = a.prefix;
        threads::spawn(&mut receivers, conn, async move {
            let mut out = StreamOutcome::default();
            let mut state: HashMap<i64, (u64, i64)> = ids.iter().map(|&id| (id, (0, 0))).collect();
            let mut complete = 0usize;
            let need = ids.len();
            out.events.reserve((expected as usize) * need);
            while complete < need {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = stop_rx.changed() => break,
                };
                let m = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        out.errors.push("watch stream closed by the server".into());
                        break;
                    }
                    Err(e) => {
                        out.errors.push(format!("watch stream: {e}"));
                        break;
                    }
                };
                let now = epoch.elapsed();
                if m.canceled() {
                    out.errors.push(format!(
                        "watch {} canceled: {:?} (compact revision {})",
                        m.watch_id(),
                        m.cancel_reason(),
                        m.compact_revision()
                    ));
                    break;
                }
                if m.events().is_empty() {
                    continue;
                }
                let Some(st) = state.get_mut(&m.watch_id()) else {
                    out.violations
                        .push(format!("events for unknown watch id {}", m.watch_id()));
                    continue;
                };
                for ev in m.events() {
                    let Some(kv) = ev.kv() else {
                        out.violations.push("event without kv".into());
                        continue;
                    };
                    let rev = kv.mod_revision();
                    let key_ok = if prefix {
                        kv.key().starts_with(&key)
                    } else {
                        kv.key() == key.as_slice()
                    };
                    if ev.event_type() != EventType::Put || !key_ok {
                        out.violations.push(format!(
                            "watch {}: unexpected {:?} event on {:?}",
                            m.watch_id(),
                            ev.event_type(),
                            String::from_utf8_lossy(kv.key())
                        ));
                        continue;
                    }
                    if rev <= st.1 {
                        out.violations.push(format!(
                            "watch {}: revision {rev} after {} (duplicate or out of order)",
                            m.watch_id(),
                            st.1
                        ));
                    }
                    st.1 = st.1.max(rev);
                    st.0 += 1;
                    if st.0 == expected {
                        complete += 1;
                    }
                    out.events.push((rev, now.as_nanos() as u64));
                    if let Some(sent) = sent_at(kv.value()) {
                        send_lat.ok(now.saturating_sub(sent));
                    }
                }
                delivered.fetch_add(m.events().len() as u64, Ordering::Relaxed);
            }
            out.watchers = ids
                .iter()
                .map(|id| (*id, state[id].0, state[id].1))
                .collect();
            out
        });
    }

    // Putters.
    let probe = CpuProbe::start_settled(&pids).await;
    let put_rec = Recorder::new();
    let acks: Arc<Mutex<Vec<(i64, u64)>>> =
        Arc::new(Mutex::new(Vec::with_capacity(s.put_total as usize)));
    let pacer = Pacer::new(Some(s.put_total), None, s.put_rate);
    let value_len = common.val_size.max(16);
    let mut putters = JoinSet::new();
    let first_put = epoch.elapsed();
    for _ in 0..a.put_clients.max(1) {
        let mut kv = put_pool[0].kv_client();
        let (pacer, put_rec, acks, common) =
            (pacer.clone(), put_rec.clone(), acks.clone(), common.clone());
        let gen = common.keys();
        let key = a.key.clone();
        let prefix = a.prefix;
        // `put_pool` is a pool of its own: its one connection is its 0th.
        threads::spawn(&mut putters, 0, async move {
            while let Some(i) = pacer.next().await {
                let k = if prefix {
                    let mut k = key.clone().into_bytes();
                    k.extend_from_slice(&gen.key(i));
                    k
                } else {
                    key.clone().into_bytes()
                };
                let t = Instant::now();
                let v = stamped_value(epoch.elapsed(), value_len);
                match timed(&common, kv.put(k, v, None)).await {
                    Ok(r) => {
                        let ack = epoch.elapsed().as_nanos() as u64;
                        put_rec.ok(t.elapsed());
                        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                        acks.lock().unwrap().push((rev, ack));
                    }
                    Err(e) => put_rec.err(format!("put: {e}")),
                }
            }
        });
    }

    // Live progress: puts and events per second, send→event p50/p99.
    let progress = {
        let (delivered, send_lat, put_rec, quiet) = (
            delivered.clone(),
            send_lat.clone(),
            put_rec.clone(),
            common.quiet,
        );
        let label = workload.to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let (mut last_ev, mut last_puts, mut last_t) = (0u64, 0u64, Instant::now());
            loop {
                tick.tick().await;
                let ev = delivered.load(Ordering::Relaxed);
                let puts = put_rec.ops();
                let dt = last_t.elapsed().as_secs_f64();
                last_t = Instant::now();
                let l = send_lat.latency();
                if !quiet {
                    eprintln!(
                        "[{label} {:>5.1}s] {:>9.0} events/s  {:>7.0} puts/s  put-send→event p50 {:.3} ms p99 {:.3} ms  events {ev}",
                        epoch.elapsed().as_secs_f64(),
                        (ev - last_ev) as f64 / dt,
                        (puts - last_puts) as f64 / dt,
                        l.p50,
                        l.p99
                    );
                }
                last_ev = ev;
                last_puts = puts;
            }
        })
    };

    while let Some(r) = putters.join_next().await {
        r.map_err(|e| e.to_string())?;
    }
    // Wait for the events to arrive (or stop making progress).
    let want = expected * watchers;
    let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
    let mut outcomes: Vec<StreamOutcome> = Vec::new();
    while !receivers.is_empty() {
        tokio::select! {
            r = receivers.join_next() => {
                // A receiver finished (complete, or its stream failed).
                let out = r.expect("non-empty").map_err(|e| e.to_string())?;
                outcomes.push(out);
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // No progress for the settle timeout ends the wait even when the
        // count is reached: a watcher that saw an event twice makes up for
        // one that missed one, and neither finishes.
        let now = delivered.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= a.settle_timeout {
            break;
        }
    }
    let _ = stop_tx.send(true);
    while let Some(r) = receivers.join_next().await {
        outcomes.push(r.map_err(|e| e.to_string())?);
    }
    progress.abort();
    let cpu = probe.finish_settled().await;

    // Analysis.
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let ack_of: HashMap<i64, u64> = acks.iter().copied().collect();
    let mut ack_hist = new_histogram();
    let (mut before_ack, mut last_event_ns, mut total_events) = (0u64, 0u64, 0u64);
    let mut r = RunResult::new(workload, "events/s", settings);
    let mut foreign = 0u64;
    for o in &outcomes {
        for &(rev, t) in &o.events {
            total_events += 1;
            last_event_ns = last_event_ns.max(t);
            match ack_of.get(&rev) {
                Some(&ack) => {
                    if t < ack {
                        before_ack += 1;
                    }
                    record(&mut ack_hist, Duration::from_nanos(t.saturating_sub(ack)));
                }
                None => foreign += 1,
            }
        }
        for (id, n, _) in &o.watchers {
            if *n != expected {
                r.violations
                    .push(format!("watcher {id} received {n} of {expected} events"));
            }
        }
        r.violations.extend(o.violations.iter().take(5).cloned());
        for e in &o.errors {
            r.errors += 1;
            if r.error_samples.len() < 5 {
                r.error_samples.push(e.clone());
            }
        }
    }
    if foreign > 0 && put_rec.errors() == 0 {
        r.violations.push(format!(
            "{foreign} events at revisions none of our puts got"
        ));
    }
    if r.violations.len() > 20 {
        let n = r.violations.len();
        r.violations.truncate(20);
        r.violations.push(format!("... {} more violations", n - 20));
    }
    r.errors += put_rec.errors();
    r.error_samples.extend(put_rec.error_samples());
    r.ops = total_events;
    let span = Duration::from_nanos(last_event_ns)
        .saturating_sub(first_put)
        .as_secs_f64();
    r.elapsed_secs = span;
    r.throughput = if span > 0.0 {
        total_events as f64 / span
    } else {
        0.0
    };
    r.latencies
        .push(("put-ack→event".into(), Latency::of(&ack_hist)));
    r.latencies
        .push((PUT_SEND_TO_EVENT.into(), send_lat.latency()));
    r.latencies.push(("put".into(), put_rec.latency()));
    r.cpu = Some(cpu);
    r.set_extra("watchers", watchers as f64);
    r.set_extra("events_expected", want as f64);
    r.set_extra("puts", put_rec.ops() as f64);
    r.set_extra("watcher_create_s", create_secs);
    if total_events > 0 {
        r.set_extra(
            "events_before_put_ack_fraction",
            before_ack as f64 / total_events as f64,
        );
    }
    if !pids.is_empty() && rss_after > 0 {
        r.set_extra(
            "server_rss_growth_per_watcher_bytes",
            (rss_after as f64 - rss_before as f64) / watchers as f64,
        );
    }
    Ok(r)
}

/// A value of `len` bytes starting with the send time (ns since the run's
/// epoch) as 16 hex digits.
fn stamped_value(sent: Duration, len: usize) -> Vec<u8> {
    let mut v = format!("{:016x}", sent.as_nanos() as u64).into_bytes();
    v.resize(len.max(16), b'v');
    v
}

/// The send time stamped into a value by [`stamped_value`].
fn sent_at(value: &[u8]) -> Option<Duration> {
    let hex = std::str::from_utf8(value.get(..16)?).ok()?;
    u64::from_str_radix(hex, 16).ok().map(Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let v = stamped_value(Duration::from_nanos(123_456_789), 256);
        assert_eq!(v.len(), 256);
        assert_eq!(sent_at(&v), Some(Duration::from_nanos(123_456_789)));
    }
}
