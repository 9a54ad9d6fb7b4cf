//! `mixed-k8s`: the access pattern of a Kubernetes API server.
//!
//! - Objects live at `/registry/<resource>/<namespace>/<name>`; they are
//!   created first as Kubernetes does (`If CreateRevision(k)==0 Then Put`).
//! - `--clients` updaters do optimistic-concurrency updates, each a
//!   single-key Txn `If ModRevision(k)==r Then Put Else Get` with the
//!   revision they last saw (a conflict refreshes it from the Get) — the
//!   measured op.
//! - `--listers` list a resource at a time with `limit` + continue at the
//!   revision of the first page (a consistent paginated list) and check the
//!   object count.
//! - One prefix watch per resource (`prev_kv`, `progress_notify`) from the
//!   revision after setup; every `--progress-interval` it sends
//!   RequestProgress and measures how long until the stream shows a
//!   revision ≥ the newest acknowledged update (Kubernetes waits ≤ 3 s).
//!   Checked: every successful update arrives exactly once, in order, with
//!   its previous value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use rand::Rng;
use tokio::task::JoinSet;

use crate::kv::{drive_then, warm_pool};
use crate::stats::{new_histogram, record, wait_quiet, Latency, Recorder, RunResult};
use crate::{parse_duration, random_printable, threads, timed, Common};

const RESOURCES: &[&str] = &[
    "pods",
    "configmaps",
    "secrets",
    "services",
    "deployments",
    "events",
    "leases",
    "nodes",
];

#[derive(Args, Debug, Clone)]
pub struct K8sArgs {
    /// Resource types (each its own prefix and watch).
    #[arg(long, default_value_t = 4)]
    pub resources: usize,
    /// Namespaces per resource.
    #[arg(long, default_value_t = 10)]
    pub namespaces: usize,
    /// Objects in all.
    #[arg(long, default_value_t = 4000)]
    pub objects: u64,
    /// Concurrent paginated listers.
    #[arg(long, default_value_t = 1)]
    pub listers: usize,
    /// Page size of lists.
    #[arg(long, default_value_t = 500)]
    pub list_limit: i64,
    /// Interval between RequestProgress calls on each watch stream.
    #[arg(long, value_parser = parse_duration, default_value = "200ms")]
    pub progress_interval: Duration,
}

fn resource_name(r: usize) -> String {
    match RESOURCES.get(r) {
        Some(n) => n.to_string(),
        None => format!("resource{r}"),
    }
}

fn prefix_of(r: usize) -> Vec<u8> {
    format!("/registry/{}/", resource_name(r)).into_bytes()
}

/// etcd's prefix range end: the prefix with its last byte incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

struct Objects {
    resources: usize,
    namespaces: usize,
    count: u64,
}

impl Objects {
    fn resource_of(&self, o: u64) -> usize {
        (o % self.resources as u64) as usize
    }
    fn key(&self, o: u64) -> Vec<u8> {
        let r = self.resource_of(o);
        let ns = (o / self.resources as u64) % self.namespaces as u64;
        format!("/registry/{}/ns-{ns:03}/obj-{o:07}", resource_name(r)).into_bytes()
    }
    fn per_resource(&self, r: usize) -> u64 {
        (0..self.count)
            .filter(|o| self.resource_of(*o) == r)
            .count() as u64
    }
}

fn object_value(size: usize) -> Vec<u8> {
    let mut v = b"k8s\x00".to_vec();
    v.extend(random_printable(size.max(16)));
    v
}

/// State shared by updaters, listers and watchers.
struct Shared {
    objects: Objects,
    /// Last mod revision seen per object.
    revs: Vec<AtomicI64>,
    /// Successful updates per resource.
    updates: Vec<AtomicU64>,
    /// Highest acknowledged update revision.
    acked: AtomicI64,
    conflicts: AtomicU64,
    stop: AtomicBool,
}

pub async fn mixed(common: &Common, a: &K8sArgs) -> Result<RunResult, String> {
    let resources = a.resources.max(1);
    let objects = Objects {
        resources,
        namespaces: a.namespaces.max(1),
        count: a.objects.max(resources as u64),
    };
    let pool = warm_pool(common).await?;
    let n = objects.count as usize;
    let shared = Arc::new(Shared {
        revs: (0..n).map(|_| AtomicI64::new(0)).collect(),
        updates: (0..resources).map(|_| AtomicU64::new(0)).collect(),
        acked: AtomicI64::new(0),
        conflicts: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        objects,
    });

    // Create the objects (If CreateRevision == 0 Then Put Else Get).
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for c in 0..64.min(n) {
        let mut kv = pool[c % pool.len()].kv_client();
        let (shared, next, common) = (shared.clone(), next.clone(), common.clone());
        set.spawn(async move {
            loop {
                let o = next.fetch_add(1, Ordering::Relaxed);
                if o >= shared.objects.count {
                    break;
                }
                let k = shared.objects.key(o);
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        k.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(
                        k.clone(),
                        object_value(common.val_size),
                        None,
                    )])
                    .or_else(vec![TxnOp::get(k.clone(), None)]);
                let r = timed(&common, kv.txn(txn))
                    .await
                    .map_err(|e| format!("create {:?}: {e}", String::from_utf8_lossy(&k)))?;
                let rev = if r.succeeded() {
                    r.header().map(|h| h.revision()).unwrap_or(0)
                } else {
                    get_rev(&r.op_responses()).unwrap_or(0)
                };
                shared.revs[o as usize].fetch_max(rev, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    let mut kv0 = pool[0].kv_client();
    let setup_rev = timed(
        common,
        kv0.get("/registry/", Some(GetOptions::new().with_count_only())),
    )
    .await?
    .header()
    .map(|h| h.revision())
    .unwrap_or(0);
    shared.acked.store(setup_rev, Ordering::Relaxed);

    // The set-up's work done before the watchers start, whose progress
    // requests keep the servers busy from then on.
    let quiet = wait_quiet(&common.pids()).await;

    // Watchers: one stream per resource.
    let progress_rec = Recorder::new();
    let mut watchers = JoinSet::new();
    let mut created = Vec::new();
    for r in 0..resources {
        let conn = r % pool.len();
        let mut wc = pool[conn].watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_progress_notify()
            .with_start_revision(setup_rev + 1);
        let stream = timed(common, wc.watch(prefix_of(r), Some(opts)))
            .await
            .map_err(|e| format!("watch {}: {e}", resource_name(r)))?;
        let (mut tx, mut rx) = stream.split();
        match timed(common, rx.message()).await? {
            Some(m) if m.created() && !m.canceled() => {}
            other => {
                return Err(format!(
                    "watch {}: expected a created response, got {:?}",
                    resource_name(r),
                    other.map(|m| (m.created(), m.canceled(), m.cancel_reason().to_string()))
                ))
            }
        }
        created.push(r);
        let (shared, progress_rec, interval) =
            (shared.clone(), progress_rec.clone(), a.progress_interval);
        threads::spawn(&mut watchers, conn, async move {
            let prefix = prefix_of(r);
            let mut out = WatchOutcome::default();
            let mut last_rev = setup_rev;
            let mut seen_rev = setup_rev;
            let mut pending: Vec<(i64, Instant)> = Vec::new();
            let mut tick = tokio::time::interval(interval);
            let mut stopping_since: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let target = shared.acked.load(Ordering::Relaxed);
                        if shared.stop.load(Ordering::Relaxed) {
                            let since = *stopping_since.get_or_insert_with(Instant::now);
                            let want = shared.updates[r].load(Ordering::Relaxed);
                            // Done once the stream shows the last acked revision
                            // and every update arrived (or after 10 s).
                            if (seen_rev >= target && out.events >= want)
                                || since.elapsed() > Duration::from_secs(10)
                            {
                                break;
                            }
                        }
                        if let Err(e) = tx.request_progress().await {
                            out.errors.push(format!("request progress: {e}"));
                            break;
                        }
                        pending.push((target, Instant::now()));
                    }
                    m = rx.message() => {
                        let m = match m {
                            Ok(Some(m)) => m,
                            Ok(None) => { out.errors.push("watch stream closed by the server".into()); break; }
                            Err(e) => { out.errors.push(format!("watch stream: {e}")); break; }
                        };
                        if m.canceled() {
                            out.errors.push(format!("watch canceled: {:?}", m.cancel_reason()));
                            break;
                        }
                        let hdr = m.header().map(|h| h.revision()).unwrap_or(0);
                        if m.events().is_empty() {
                            // Progress notification (requested or periodic).
                            out.progress_notifications += 1;
                            seen_rev = seen_rev.max(hdr);
                        }
                        for ev in m.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let rev = kv.mod_revision();
                            if ev.event_type() != EventType::Put || !kv.key().starts_with(&prefix) {
                                out.violations.push(format!("unexpected {:?} event on {:?}", ev.event_type(), String::from_utf8_lossy(kv.key())));
                                continue;
                            }
                            if rev <= last_rev {
                                out.violations.push(format!("event revision {rev} after {last_rev} (duplicate or out of order)"));
                            }
                            last_rev = last_rev.max(rev);
                            seen_rev = seen_rev.max(rev);
                            match ev.prev_kv() {
                                Some(p) if p.mod_revision() < rev && p.key() == kv.key() => {}
                                Some(p) => out.violations.push(format!("prev_kv at revision {} for event at {rev}", p.mod_revision())),
                                None => out.violations.push(format!("update event at {rev} without prev_kv")),
                            }
                            out.events += 1;
                        }
                        let now = Instant::now();
                        pending.retain(|(target, at)| {
                            if *target <= seen_rev {
                                progress_rec.ok(now - *at);
                                false
                            } else {
                                true
                            }
                        });
                    }
                }
            }
            out.resource = r;
            out.unanswered_progress = pending.len() as u64;
            out
        });
    }

    // Listers.
    let lists = Recorder::new();
    let pages = Arc::new(std::sync::Mutex::new(new_histogram()));
    let mut listers = JoinSet::new();
    for l in 0..a.listers {
        let conn = l % pool.len();
        let kv = pool[conn].kv_client();
        let (shared, lists, pages, common, limit) = (
            shared.clone(),
            lists.clone(),
            pages.clone(),
            common.clone(),
            a.list_limit.max(1),
        );
        threads::spawn(&mut listers, conn, async move {
            let mut r = l % resources;
            let expect: Vec<u64> = (0..resources)
                .map(|r| shared.objects.per_resource(r))
                .collect();
            let mut violations = Vec::new();
            while !shared.stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match list(&common, kv.clone(), &prefix_of(r), limit, &pages).await {
                    Ok(n) => {
                        lists.ok(t.elapsed());
                        if n != expect[r] {
                            violations.push(format!(
                                "list of {} returned {n} objects, expected {}",
                                resource_name(r),
                                expect[r]
                            ));
                        }
                    }
                    Err(e) => lists.err(format!("list: {e}")),
                }
                r = (r + 1) % resources;
            }
            violations
        });
    }

    // Updaters: the measured ops.
    let sh = shared.clone();
    let val_size = common.val_size;
    let settings = format!(
        "{} resources={} namespaces={} objects={} listers={} list-limit={} progress-every={:?}",
        common.describe(),
        resources,
        a.namespaces,
        shared.objects.count,
        a.listers,
        a.list_limit,
        a.progress_interval
    );
    // Watchers and listers stop with the updaters, before the servers'
    // CPU is read.
    let stop = shared.clone();
    let mut res = drive_then(
        common,
        "mixed-k8s",
        settings,
        &pool,
        move |_, _, kv| {
            let sh = sh.clone();
            async move { update(sh, kv, val_size).await }
        },
        move || stop.stop.store(true, Ordering::Relaxed),
        quiet,
    )
    .await?;

    let mut violations = Vec::new();
    while let Some(r) = listers.join_next().await {
        violations.extend(r.map_err(|e| e.to_string())?);
    }
    let mut outcomes = Vec::new();
    while let Some(r) = watchers.join_next().await {
        outcomes.push(r.map_err(|e| e.to_string())?);
    }
    let mut events = 0;
    for o in &outcomes {
        events += o.events;
        let want = shared.updates[o.resource].load(Ordering::Relaxed);
        if o.events != want {
            violations.push(format!(
                "watch on {} got {} events for {} successful updates",
                resource_name(o.resource),
                o.events,
                want
            ));
        }
        violations.extend(o.violations.iter().take(5).cloned());
        for e in &o.errors {
            res.errors += 1;
            if res.error_samples.len() < 5 {
                res.error_samples.push(e.clone());
            }
        }
        if o.unanswered_progress > 0 && o.errors.is_empty() {
            res.set_extra(
                &format!("unanswered_progress_requests_{}", resource_name(o.resource)),
                o.unanswered_progress as f64,
            );
        }
    }
    res.errors += lists.errors();
    res.error_samples.extend(lists.error_samples());
    let progress = progress_rec.latency();
    if progress.max > 3000.0 {
        violations.push(format!(
            "a progress request took {:.0} ms to show the acknowledged revision (Kubernetes waits at most 3 s)",
            progress.max
        ));
    }
    violations.truncate(20);
    res.violations = violations;
    let secs = res.elapsed_secs.max(1e-9);
    res.latencies[0].0 = "update txn".into();
    res.latencies
        .push(("list (all pages)".into(), lists.latency()));
    res.latencies
        .push(("list page".into(), Latency::of(&pages.lock().unwrap())));
    res.latencies.push(("progress request".into(), progress));
    let updates: u64 = shared
        .updates
        .iter()
        .map(|u| u.load(Ordering::Relaxed))
        .sum();
    res.set_extra("successful_updates", updates as f64);
    res.set_extra("conflicts", shared.conflicts.load(Ordering::Relaxed) as f64);
    res.set_extra("lists", lists.ops() as f64);
    res.set_extra("lists_per_s", lists.ops() as f64 / secs);
    res.set_extra("watch_events", events as f64);
    res.set_extra("watch_events_per_s", events as f64 / secs);
    Ok(res)
}

#[derive(Default)]
struct WatchOutcome {
    resource: usize,
    events: u64,
    progress_notifications: u64,
    unanswered_progress: u64,
    violations: Vec<String>,
    errors: Vec<String>,
}

fn get_rev(ops: &[TxnOpResponse]) -> Option<i64> {
    ops.iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
        _ => None,
    })
}

/// One optimistic-concurrency update of a random object.
async fn update(sh: Arc<Shared>, mut kv: KvClient, val_size: usize) -> Result<(), String> {
    let o = rand::thread_rng().gen_range(0..sh.objects.count);
    let k = sh.objects.key(o);
    let seen = sh.revs[o as usize].load(Ordering::Relaxed);
    let txn = Txn::new()
        .when(vec![Compare::mod_revision(
            k.clone(),
            CompareOp::Equal,
            seen,
        )])
        .and_then(vec![TxnOp::put(k.clone(), object_value(val_size), None)])
        .or_else(vec![TxnOp::get(k.clone(), None)]);
    let r = kv.txn(txn).await.map_err(|e| e.to_string())?;
    if r.succeeded() {
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        sh.revs[o as usize].fetch_max(rev, Ordering::Relaxed);
        sh.updates[sh.objects.resource_of(o)].fetch_add(1, Ordering::Relaxed);
        sh.acked.fetch_max(rev, Ordering::Relaxed);
    } else {
        let rev = get_rev(&r.op_responses()).ok_or_else(|| {
            format!(
                "conflict on {:?} without the current object",
                String::from_utf8_lossy(&k)
            )
        })?;
        sh.revs[o as usize].fetch_max(rev, Ordering::Relaxed);
        sh.conflicts.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A paginated list of `prefix` at the revision of its first page; returns
/// the number of objects.
async fn list(
    common: &Common,
    mut kv: KvClient,
    prefix: &[u8],
    limit: i64,
    pages: &std::sync::Mutex<hdrhistogram::Histogram<u64>>,
) -> Result<u64, String> {
    let end = prefix_end(prefix);
    let mut key = prefix.to_vec();
    let mut rev = 0;
    let mut n = 0u64;
    let mut seen: HashMap<Vec<u8>, ()> = HashMap::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let t = Instant::now();
        let r = timed(common, kv.get(key.clone(), Some(opts))).await?;
        record(&mut pages.lock().unwrap(), t.elapsed());
        if rev == 0 {
            rev = r.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in r.kvs() {
            if seen.insert(kv.key().to_vec(), ()).is_some() {
                return Err(format!(
                    "list returned {:?} twice",
                    String::from_utf8_lossy(kv.key())
                ));
            }
        }
        n += r.kvs().len() as u64;
        if !r.more() {
            return Ok(n);
        }
        let Some(last) = r.kvs().last() else {
            return Err("list page with more=true but no keys".into());
        };
        key = last.key().to_vec();
        key.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/registry/pods/"), b"/registry/pods0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn objects_spread_over_resources() {
        let o = Objects {
            resources: 4,
            namespaces: 10,
            count: 2000,
        };
        assert_eq!((0..4).map(|r| o.per_resource(r)).sum::<u64>(), 2000);
        assert!(o.key(5).starts_with(b"/registry/configmaps/ns-001/"));
    }
}
