//! Measurement: latency histograms (with live per-second progress), the
//! result of one run, server CPU from `/proc`, and the op pacer.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::json::Json;

/// Highest latency a histogram tracks (values above are clamped), in µs.
const MAX_TRACKED_US: u64 = 600_000_000;

/// A new latency histogram in microseconds (3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("histogram bounds")
}

/// Records `d` into `h` (µs, clamped to the tracked range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_nanos() / 1000).clamp(1, MAX_TRACKED_US as u128) as u64;
    h.saturating_record(us);
}

/// Percentiles of one latency distribution, in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    pub fn to_json(&self) -> Json {
        let mut o = Json::obj();
        o.set("count", self.count)
            .set("mean_ms", self.mean)
            .set("p50_ms", self.p50)
            .set("p90_ms", self.p90)
            .set("p99_ms", self.p99)
            .set("p99_9_ms", self.p999)
            .set("max_ms", self.max);
        o
    }
}

/// Shared latency recorder of a run: a total histogram, an interval
/// histogram for the live progress line, and an error counter with the
/// first few messages.
pub struct Recorder {
    inner: Mutex<RecInner>,
    errors: AtomicU64,
    error_samples: Mutex<Vec<String>>,
    started: Instant,
}

struct RecInner {
    total: Histogram<u64>,
    interval: Histogram<u64>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            inner: Mutex::new(RecInner {
                total: new_histogram(),
                interval: new_histogram(),
            }),
            errors: AtomicU64::new(0),
            error_samples: Mutex::new(Vec::new()),
            started: Instant::now(),
        })
    }

    /// Records one successful operation.
    pub fn ok(&self, d: Duration) {
        let mut g = self.inner.lock().unwrap();
        record(&mut g.total, d);
        record(&mut g.interval, d);
    }

    /// Records one failed operation (its message is kept if among the first).
    pub fn err(&self, msg: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.error_samples.lock().unwrap();
        if s.len() < 5 {
            s.push(msg.to_string());
        }
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.error_samples.lock().unwrap().clone()
    }

    pub fn ops(&self) -> u64 {
        self.inner.lock().unwrap().total.len()
    }

    pub fn latency(&self) -> Latency {
        Latency::of(&self.inner.lock().unwrap().total)
    }

    /// Takes the interval histogram's (count, p50 ms, p99 ms) and resets it.
    fn take_interval(&self) -> (u64, f64, f64) {
        let mut g = self.inner.lock().unwrap();
        let l = Latency::of(&g.interval);
        g.interval.reset();
        (l.count, l.p50, l.p99)
    }

    /// Starts a task printing one progress line per second to stderr
    /// (unless `quiet`); stops when the returned guard is dropped.
    pub fn progress(self: &Arc<Self>, label: &str, quiet: bool) -> ProgressGuard {
        let stop = Arc::new(AtomicBool::new(false));
        if !quiet {
            let rec = self.clone();
            let stop2 = stop.clone();
            let label = label.to_string();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                let mut last = Instant::now();
                loop {
                    tick.tick().await;
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let (n, p50, p99) = rec.take_interval();
                    let dt = last.elapsed().as_secs_f64();
                    last = Instant::now();
                    eprintln!(
                        "[{label} {:>5.1}s] {:>9.0} ops/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}",
                        rec.started.elapsed().as_secs_f64(),
                        n as f64 / dt,
                        p50,
                        p99,
                        rec.errors()
                    );
                }
            });
        }
        ProgressGuard { stop }
    }
}

/// Stops the progress printer when dropped.
pub struct ProgressGuard {
    stop: Arc<AtomicBool>,
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Hands out operation indexes to the clients of a run: stops after
/// `total` ops or at the deadline, and paces them to `rate` ops/s if set
/// (op `i` is not started before `start + i/rate`).
pub struct Pacer {
    next: AtomicU64,
    total: Option<u64>,
    deadline: Option<Instant>,
    rate: f64,
    start: Instant,
    stopped: AtomicBool,
}

impl Pacer {
    pub fn new(total: Option<u64>, duration: Option<Duration>, rate: f64) -> Arc<Pacer> {
        let start = Instant::now();
        Arc::new(Pacer {
            next: AtomicU64::new(0),
            total,
            deadline: duration.map(|d| start + d),
            rate,
            start,
            stopped: AtomicBool::new(false),
        })
    }

    /// The next op index, or `None` when the run is over.
    pub async fn next(&self) -> Option<u64> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.total {
            if i >= t {
                return None;
            }
        }
        if self.rate > 0.0 {
            let at = self.start + Duration::from_secs_f64(i as f64 / self.rate);
            if let Some(d) = self.deadline {
                if at >= d {
                    return None;
                }
            }
            tokio::time::sleep_until(at.into()).await;
        }
        if let Some(d) = self.deadline {
            if Instant::now() >= d {
                return None;
            }
        }
        Some(i)
    }

    /// Ends the run early (no further indexes are handed out).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

/// CPU time (user + system) of a set of processes, from `/proc/<pid>/stat`.
#[derive(Clone, Debug)]
pub struct CpuProbe {
    pids: Vec<(String, u32)>,
    start: Vec<Option<u64>>,
    self_start: Option<u64>,
    at: Instant,
    /// Whether the servers were found quiet before it started (false when
    /// nobody waited: [`CpuProbe::start`]; see [`CpuProbe::start_settled`]).
    settled_before: bool,
}

/// Clock ticks per second of `/proc/<pid>/stat` (Linux `USER_HZ`, 100 on
/// every mainstream architecture).
const CLK_TCK: f64 = 100.0;

/// How long the server processes must stay quiet after a run before its
/// CPU is read (see [`CpuProbe::finish_settled`]).
pub const SETTLE_WINDOW: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest a run's CPU reading waits for the servers to go quiet.
pub const SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// utime + stime of `pid` in clock ticks (all threads, including exited ones).
pub fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: skip past its ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime = field 14, stime = field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of all of `pids`, in CPU seconds (see
/// [`proc_cpu_ticks`]).
pub fn proc_cpu_secs(pids: &[(String, u32)]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|(_, p)| proc_cpu_ticks(&p.to_string()))
        .sum();
    ticks as f64 / CLK_TCK
}

/// Resident set size of `pid` in bytes.
pub fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Waits until `pids` use at most one clock tick of CPU (10 ms) in
/// [`SETTLE_WINDOW`], at most [`SETTLE_MAX`]; whether they did.
pub async fn wait_quiet(pids: &[(String, u32)]) -> bool {
    let ticks = || {
        pids.iter()
            .filter_map(|(_, p)| proc_cpu_ticks(&p.to_string()))
            .sum::<u64>()
    };
    if pids.is_empty() {
        return true;
    }
    let deadline = Instant::now() + SETTLE_MAX;
    let mut last = ticks();
    while Instant::now() < deadline {
        tokio::time::sleep(SETTLE_WINDOW).await;
        let now = ticks();
        if now.saturating_sub(last) <= 1 {
            return true;
        }
        last = now;
    }
    false
}

/// CPU used during a run, per operation.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    /// (process label, CPU seconds) per probed server process.
    pub per_process: Vec<(String, f64)>,
    /// Sum over the server processes, in CPU seconds.
    pub server_secs: f64,
    /// The benchmark client's own CPU seconds.
    pub client_secs: f64,
    pub wall_secs: f64,
    /// The servers were quiet when the reading started, and again when it
    /// ended: no work of an earlier run was billed to this one, nor any of
    /// this run's left to bill to the next. `false` when [`SETTLE_MAX`]
    /// ran out first, or (before) when the run did not wait (recorded in
    /// the JSON).
    pub settled_before: bool,
    pub settled_after: bool,
}

impl CpuUse {
    pub fn server_us_per(&self, ops: u64) -> Option<f64> {
        (ops > 0 && !self.per_process.is_empty()).then(|| self.server_secs * 1e6 / ops as f64)
    }
    pub fn client_us_per(&self, ops: u64) -> Option<f64> {
        (ops > 0).then(|| self.client_secs * 1e6 / ops as f64)
    }
}

impl CpuProbe {
    /// Starts measuring the given (label, pid) processes and this process.
    pub fn start(pids: &[(String, u32)]) -> CpuProbe {
        CpuProbe {
            pids: pids.to_vec(),
            start: pids
                .iter()
                .map(|(_, p)| proc_cpu_ticks(&p.to_string()))
                .collect(),
            self_start: proc_cpu_ticks("self"),
            at: Instant::now(),
            // Not waited for (see `start_settled`).
            settled_before: false,
        }
    }

    /// [`CpuProbe::start`] once the server processes have gone quiet (as
    /// [`CpuProbe::finish_settled`] waits at the end): background work left
    /// by the set-up (a prefill's flushes and compactions, etcd's backend
    /// commits) is not billed to the run's operations.
    pub async fn start_settled(pids: &[(String, u32)]) -> CpuProbe {
        let settled = wait_quiet(pids).await;
        CpuProbe::start_after_waiting(pids, settled)
    }

    /// [`CpuProbe::start`] for a caller that waited for the servers to go
    /// quiet itself ([`wait_quiet`]) before starting the run's own
    /// background (watchers, say), with whether they did.
    pub fn start_after_waiting(pids: &[(String, u32)], settled: bool) -> CpuProbe {
        CpuProbe {
            settled_before: settled,
            ..CpuProbe::start(pids)
        }
    }

    /// [`CpuProbe::finish`] once the server processes have gone quiet (at
    /// most one clock tick of CPU, 10 ms, in [`SETTLE_WINDOW`]), waiting at
    /// most [`SETTLE_MAX`]. Background work a run leaves behind — RocksDB
    /// flushes and compactions, etcd's backend commits — is billed to that
    /// run, not to whichever runs next.
    pub async fn finish_settled(&self) -> CpuUse {
        let settled = wait_quiet(&self.pids).await;
        CpuUse {
            settled_after: settled,
            ..self.finish()
        }
    }

    pub fn finish(&self) -> CpuUse {
        let mut out = CpuUse {
            wall_secs: self.at.elapsed().as_secs_f64(),
            settled_before: self.settled_before,
            settled_after: true,
            ..Default::default()
        };
        for ((label, pid), start) in self.pids.iter().zip(&self.start) {
            if let (Some(a), Some(b)) = (start, proc_cpu_ticks(&pid.to_string())) {
                let secs = b.saturating_sub(*a) as f64 / CLK_TCK;
                out.per_process.push((label.clone(), secs));
                out.server_secs += secs;
            }
        }
        if let (Some(a), Some(b)) = (self.self_start, proc_cpu_ticks("self")) {
            out.client_secs = b.saturating_sub(a) as f64 / CLK_TCK;
        }
        out
    }
}

/// The outcome of one workload run.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub workload: String,
    /// What was measured, e.g. "etcd" or "metastore-rocksdb" (set by compare).
    pub target: String,
    /// Operations completed (puts, ranges, txns, delivered events, ...).
    pub ops: u64,
    /// Unit of `throughput`: "ops/s" or "events/s".
    pub unit: String,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_secs: f64,
    pub throughput: f64,
    /// Named latency distributions; the first is the workload's main one.
    pub latencies: Vec<(String, Latency)>,
    pub cpu: Option<CpuUse>,
    /// Workload-specific figures (name, value).
    pub extra: Vec<(String, f64)>,
    /// Correctness violations found by the workload's own checks (missing,
    /// duplicate or out-of-order events, wrong counts...).
    pub violations: Vec<String>,
    /// The settings the run used, for the record.
    pub settings: String,
}

/// Name of a watch run's latency from sending a put to each event of it.
pub const PUT_SEND_TO_EVENT: &str = "put-send→event";

impl RunResult {
    pub fn new(workload: &str, unit: &str, settings: String) -> RunResult {
        RunResult {
            workload: workload.to_string(),
            unit: unit.to_string(),
            settings,
            ..Default::default()
        }
    }

    pub fn extra(&self, name: &str) -> Option<f64> {
        self.extra.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    pub fn set_extra(&mut self, name: &str, v: f64) {
        self.extra.push((name.to_string(), v));
    }

    pub fn main_latency(&self) -> Option<&Latency> {
        self.latencies.first().map(|(_, l)| l)
    }

    /// The latency recorded under `name` (`put-send→event`, ...).
    pub fn latency(&self, name: &str) -> Option<&Latency> {
        self.latencies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l)
    }

    /// The latency a run's speed is best judged by when its rate is fixed:
    /// for a watch run the time from sending a put to its event (the main
    /// one, from the put's answer, is clamped at 0 for events that beat the
    /// answer, so it says little for a server that sends events first);
    /// otherwise the main latency.
    pub fn end_to_end_latency(&self) -> Option<&Latency> {
        self.latency(PUT_SEND_TO_EVENT)
            .or_else(|| self.main_latency())
    }

    pub fn server_cpu_us_per_op(&self) -> Option<f64> {
        self.cpu.as_ref().and_then(|c| c.server_us_per(self.ops))
    }

    pub fn client_cpu_us_per_op(&self) -> Option<f64> {
        self.cpu.as_ref().and_then(|c| c.client_us_per(self.ops))
    }

    /// No errors and no correctness violations.
    pub fn is_clean(&self) -> bool {
        self.errors == 0 && self.violations.is_empty()
    }

    pub fn to_json(&self) -> Json {
        let mut o = Json::obj();
        o.set("workload", self.workload.as_str())
            .set("target", self.target.as_str())
            .set("settings", self.settings.as_str())
            .set("ops", self.ops)
            .set("unit", self.unit.as_str())
            .set("errors", self.errors)
            .set("error_samples", self.error_samples.clone())
            .set("violations", self.violations.clone())
            .set("elapsed_s", self.elapsed_secs)
            .set("throughput", self.throughput);
        let mut lats = Json::obj();
        for (name, l) in &self.latencies {
            lats.set(name, l.to_json());
        }
        o.set("latency", lats);
        if let Some(c) = &self.cpu {
            let mut cj = Json::obj();
            cj.set("server_cpu_s", c.server_secs)
                .set("client_cpu_s", c.client_secs)
                .set("settled_before", c.settled_before)
                .set("settled_after", c.settled_after)
                .set("server_cpu_us_per_op", self.server_cpu_us_per_op())
                .set("client_cpu_us_per_op", self.client_cpu_us_per_op());
            let mut per = Json::obj();
            for (label, secs) in &c.per_process {
                per.set(label, *secs);
            }
            cj.set("per_process_cpu_s", per);
            o.set("cpu", cj);
        }
        let mut ex = Json::obj();
        for (k, v) in &self.extra {
            ex.set(k, *v);
        }
        o.set("extra", ex);
        o
    }

    /// A readable table of the run.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== {}{} ==",
            self.workload,
            if self.target.is_empty() {
                String::new()
            } else {
                format!(" @ {}", self.target)
            }
        );
        let _ = writeln!(s, "settings:   {}", self.settings);
        let _ = writeln!(
            s,
            "ops:        {}   errors: {}   elapsed: {:.2} s",
            self.ops, self.errors, self.elapsed_secs
        );
        let _ = writeln!(s, "throughput: {:.1} {}", self.throughput, self.unit);
        if !self.latencies.is_empty() {
            let _ = writeln!(
                s,
                "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency (ms)", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
            );
            for (name, l) in &self.latencies {
                let _ = writeln!(
                    s,
                    "{:<22} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name, l.count, l.mean, l.p50, l.p90, l.p99, l.p999, l.max
                );
            }
        }
        if let Some(c) = &self.cpu {
            if !c.per_process.is_empty() {
                let per: Vec<String> = c
                    .per_process
                    .iter()
                    .map(|(l, v)| format!("{l} {v:.2} s"))
                    .collect();
                let _ = writeln!(
                    s,
                    "server CPU: {:.2} s ({}) = {:.1} µs/op",
                    c.server_secs,
                    per.join(", "),
                    self.server_cpu_us_per_op().unwrap_or(0.0)
                );
            }
            let _ = writeln!(
                s,
                "client CPU: {:.2} s = {:.1} µs/op",
                c.client_secs,
                self.client_cpu_us_per_op().unwrap_or(0.0)
            );
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}: {v:.3}");
        }
        for e in &self.error_samples {
            let _ = writeln!(s, "error: {e}");
        }
        for v in &self.violations {
            let _ = writeln!(s, "VIOLATION: {v}");
        }
        s
    }
}
