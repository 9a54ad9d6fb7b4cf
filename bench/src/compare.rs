//! `compare` and `engines`: start the servers, run a table of workloads
//! against each of them alternately (close in time, in rotating order,
//! repeated: the disk's fsync latency drifts for minutes at a time), and
//! report every figure with the MetaStore/etcd ratios, server CPU per op,
//! the machine, and SVG charts.
//!
//! Targets: `etcd` (a real single-node etcd, data on the local disk),
//! `rocksdb` (MetaStore, durable: fsync before ack, like etcd) and
//! `memory` (MetaStore's memory engine — not durable, reported apart).
//!
//! `compare` also runs the workloads of the CPU and latency targets
//! ([`FLOOR_SPECS`]) against the gRPC floor (`floor.rs`), a server that
//! does nothing behind tonic, right after the targets' runs of the same
//! workload: the report then shows, from the same rounds, how close to each
//! target a server can come that pays only for gRPC.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser};

use crate::goclient::{self, GO_SPECS};
use crate::json::Json;
use crate::nodes::{fsync_probe, FsyncProbe, Node};
use crate::stats::{RunResult, SETTLE_MAX};
use crate::svg::{grouped_bars, Bar, Group, Scale, PALETTE, PALETTE_LIGHT};
use crate::{run_workload, Cli, Common};

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Directory holding metastore-server and metastore-gateway
    /// [default: the directory of this binary].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: String,
    /// etcd client port (peer port is this + 1); away from a dev node's 2379.
    #[arg(long, default_value_t = 32379)]
    pub etcd_port: u16,
    /// Where the servers' data directories go (must be on the local disk).
    #[arg(long, default_value = "/var/tmp/metastore-bench")]
    pub work_dir: PathBuf,
    /// Write REPORT.md, results.json and the SVG charts here
    /// [compare: bench/results; engines: nothing written].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Short runs (about a minute in all).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of the whole table [default: 1 with --quick, else 2].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Targets, comma-separated: etcd, rocksdb, memory
    /// [compare: all three; engines: memory,rocksdb].
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Only these workloads (names as in the report), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// MetaStore shards [default: one per core].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Seconds per duration-bound workload [default: 2 with --quick, else 4].
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Skip the gRPC floor's runs (`compare` only; `engines` never runs it).
    #[arg(long)]
    pub no_floor: bool,
    /// The Go client (`bench/goclient`, built by its `build.sh`): the put
    /// and range targets' workloads also run with it against every target
    /// (`compare` only; see `goclient.rs`).
    #[arg(long)]
    pub go_client: Option<PathBuf>,
}

/// The workloads also run against the gRPC floor: those of the targets
/// that bound MetaStore's CPU per operation or its latency.
const FLOOR_SPECS: [&str; 3] = ["put-1c", "put-1000c", "range-s-1000c"];

/// The figure of a run a target row compares.
#[derive(Clone, Copy)]
enum Figure {
    Throughput,
    /// Server CPU µs per operation.
    Cpu,
    /// Main latency, p50 or p99.
    P50,
    P99,
    /// p99 of the end-to-end latency (`RunResult::end_to_end_latency`).
    EndToEndP99,
}

impl Figure {
    fn of(self, r: &RunResult) -> Option<f64> {
        match self {
            Figure::Throughput => Some(r.throughput),
            Figure::Cpu => r.server_cpu_us_per_op(),
            Figure::P50 => r.main_latency().map(|l| l.p50),
            Figure::P99 => r.main_latency().map(|l| l.p99),
            Figure::EndToEndP99 => r.end_to_end_latency().map(|l| l.p99),
        }
    }

    /// The figure of the cell's representative run.
    fn representative(self, c: &Cell) -> Option<f64> {
        c.median().and_then(|m| self.of(m))
    }
}

/// One row of the workload table.
struct Spec {
    name: &'static str,
    title: String,
    /// The command line (global options + subcommand), as for the binary.
    args: String,
    /// etcd's figure in ANCHORS.md.
    anchor: &'static str,
}

fn specs(quick: bool, secs: f64, shards: usize) -> Vec<Spec> {
    let d = format!("{secs}s");
    let kv = "--key-size 8 --val-size 256 --sequential-keys --key-space-size 100000";
    let watch_puts = 1000;
    let lat_puts = if quick { 400 } else { 1000 };
    let deletes = if quick { 20_000 } else { 60_000 };
    vec![
        // First, so that round 1 measures it on fresh nodes: RSS growth
        // says nothing on a node whose earlier workloads freed memory the
        // watchers then reuse.
        Spec {
            name: "watch-memory",
            title: "idle watchers: 100 streams × 100 watchers, 10 puts (fresh node)".into(),
            args: "--conns 10 --val-size 256 watch --streams 100 --watchers-per-stream 100 --put-total 10 --put-clients 1".into(),
            anchor: "≈ 350 B per watcher + 18 KB per stream",
        },
        Spec {
            name: "put-1c",
            title: "put, 1 conn, 1 client".into(),
            args: format!("--conns 1 --clients 1 --duration {d} {kv} put"),
            anchor: "970–1,330 QPS; p50 0.47–0.56 ms; p99 4.5–5.1 ms",
        },
        Spec {
            name: "put-1000c",
            title: "put, 100 conns, 1000 clients".into(),
            args: format!("--conns 100 --clients 1000 --duration {d} {kv} put"),
            anchor: "12.2k–13.5k QPS; p99 148–187 ms",
        },
        Spec {
            name: "range-l-1c",
            title: "range one key, linearizable, 1 client".into(),
            args: format!(
                "--conns 1 --clients 1 --duration {d} --val-size 256 range --consistency l"
            ),
            anchor: "2.35k–2.49k QPS; p50 0.19–0.20 ms",
        },
        Spec {
            name: "range-s-1000c",
            title: "range one key, serializable, 1000 clients".into(),
            args: format!(
                "--conns 100 --clients 1000 --duration {d} --val-size 256 range --consistency s"
            ),
            anchor: "4.2k–5.0k QPS",
        },
        Spec {
            name: "txn-put-1000c",
            title: "txn-put (1 op), 1000 clients".into(),
            args: format!("--conns 100 --clients 1000 --duration {d} {kv} txn-put --txn-ops 1"),
            anchor: "3.5k–3.9k QPS",
        },
        // The other KV workloads, with no ANCHORS figure: a list
        // of one page (a prefix spans every shard: the gateway merges),
        // a transaction whose puts land on every shard, and deletes.
        Spec {
            name: "range-prefix-100c",
            title: "range prefix of 1,000 keys, limit 100, linearizable, 100 clients".into(),
            args: format!(
                "--conns 10 --clients 100 --duration {d} --val-size 256 range --prefix --key /bench/list/ --prefill 1000 --limit 100 --consistency l"
            ),
            anchor: "(no anchor)",
        },
        Spec {
            name: "txn-put-4op-1000c",
            title: format!("txn-put, 4 ops over {shards} shard(s), 1000 clients"),
            args: format!(
                "--conns 100 --clients 1000 --duration {d} {kv} txn-put --txn-ops 4 --shards {shards}"
            ),
            anchor: "(no anchor)",
        },
        Spec {
            name: "delete-1000c",
            title: format!("delete, 100 conns, 1000 clients ({deletes} pre-written keys, each once)"),
            args: format!(
                "--conns 100 --clients 1000 --total {deletes} --key-size 8 --val-size 256 --sequential-keys --key-space-size {deletes} delete"
            ),
            anchor: "(no anchor)",
        },
        Spec {
            name: "watch-fanout",
            title: "watch: 100 streams × 10 watchers, one key".into(),
            args: format!(
                "--conns 10 --val-size 256 watch --streams 100 --watchers-per-stream 10 --put-total {watch_puts} --put-clients 10"
            ),
            anchor: "101k–117k events/s (1000 puts, 1M events)",
        },
        Spec {
            name: "watch-prefix",
            title: "watch: 100 streams × 10 watchers on a prefix of 1,000 keys (every shard)".into(),
            args: format!(
                "--conns 10 --val-size 256 --key-space-size 1000 watch --streams 100 --watchers-per-stream 10 --prefix --key /bench/wp/ --put-total {watch_puts} --put-clients 10"
            ),
            anchor: "(no anchor)",
        },
        Spec {
            name: "watch-latency",
            title: "watch latency: 100 watchers, 200 puts/s".into(),
            args: format!(
                "--conns 10 --val-size 256 watch-latency --streams 10 --watchers-per-stream 10 --put-rate 200 --put-total {lat_puts}"
            ),
            anchor: "put→event p50 0.12–0.15 ms; p99 1.0–1.4 ms",
        },
        Spec {
            name: "lease-keepalive",
            title: "lease keep-alive, 100 clients".into(),
            args: format!("--conns 10 --clients 100 --duration {d} lease-keepalive"),
            anchor: "9.3k–9.6k QPS",
        },
        Spec {
            name: "mixed-k8s",
            title: "Kubernetes-like mix, 100 updaters".into(),
            args: format!(
                "--conns 10 --clients 100 --duration {d} --val-size 512 mixed-k8s --objects 4000 --listers 1"
            ),
            anchor: "(no anchor)",
        },
    ]
}

/// Results of one (workload, target) cell over the rounds.
struct Cell {
    runs: Vec<Result<RunResult, String>>,
}

impl Cell {
    fn ok(&self) -> Vec<&RunResult> {
        self.runs.iter().filter_map(|r| r.as_ref().ok()).collect()
    }

    /// The representative run: the upper median by throughput (with two
    /// rounds, the better one: interference on a shared machine only ever
    /// slows a run down). Runs at a fixed rate (equal throughput within 1%)
    /// are ranked by their end-to-end p99 latency instead (for watch: put
    /// sent → event, which no clamp flattens).
    fn median(&self) -> Option<&RunResult> {
        let mut ok = self.ok();
        let (lo, hi) = self.range()?;
        let fixed_rate = hi <= lo * 1.01;
        let p99 = |r: &RunResult| r.end_to_end_latency().map(|l| l.p99).unwrap_or(f64::MAX);
        if fixed_rate {
            // Ascending goodness: highest p99 first.
            ok.sort_by(|a, b| p99(b).total_cmp(&p99(a)));
        } else {
            ok.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
        }
        ok.get(ok.len() / 2).copied()
    }

    fn range(&self) -> Option<(f64, f64)> {
        let ok = self.ok();
        if ok.is_empty() {
            return None;
        }
        let min = ok.iter().map(|r| r.throughput).fold(f64::MAX, f64::min);
        let max = ok.iter().map(|r| r.throughput).fold(0.0, f64::max);
        Some((min, max))
    }

    /// Server CPU per op of the representative run.
    fn median_cpu(&self) -> Option<f64> {
        self.median().and_then(|r| r.server_cpu_us_per_op())
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, r) in self.runs.iter().enumerate() {
            match r {
                Err(e) => out.push(format!("round {}: failed: {}", i + 1, first_line(e))),
                Ok(r) if !r.is_clean() => {
                    let mut s = format!("round {}: {} errors", i + 1, r.errors);
                    if let Some(e) = r.error_samples.first() {
                        let _ = write!(s, " (e.g. {})", first_line(e));
                    }
                    if !r.violations.is_empty() {
                        let _ = write!(
                            s,
                            "; {} violations, e.g. {}",
                            r.violations.len(),
                            r.violations[0]
                        );
                    }
                    out.push(s);
                }
                _ => {}
            }
        }
        out
    }
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.len() > 240 {
        let mut end = 240;
        while !l.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &l[..end])
    } else {
        l.to_string()
    }
}

struct Target {
    name: String,
    label: &'static str,
    node: Option<Node>,
    restarts: usize,
}

fn target_label(name: &str) -> &'static str {
    match name {
        "etcd" => "etcd",
        "rocksdb" => "MetaStore rocksdb",
        "memory" => "MetaStore memory (not durable)",
        _ => "?",
    }
}

async fn start_target(
    name: &str,
    a: &CompareArgs,
    bin_dir: &Path,
    shards: usize,
) -> Result<Node, String> {
    match name {
        "etcd" => Node::etcd(&a.etcd_bin, a.etcd_port, &a.work_dir).await,
        "rocksdb" | "memory" => Node::metastore(bin_dir, name, shards, &a.work_dir).await,
        other => Err(format!("unknown target {other:?} (etcd, rocksdb, memory)")),
    }
}

pub async fn engines(common: &Common, a: &CompareArgs) -> std::process::ExitCode {
    let mut a = a.clone();
    if a.targets.is_empty() {
        a.targets = vec!["memory".into(), "rocksdb".into()];
    }
    if a.only.is_empty() {
        a.only = vec![
            "put-1000c".into(),
            "watch-fanout".into(),
            "watch-latency".into(),
        ];
    }
    a.no_floor = true;
    a.go_client = None;
    run(common, &a).await
}

pub async fn compare(common: &Common, a: &CompareArgs) -> std::process::ExitCode {
    let mut a = a.clone();
    if a.targets.is_empty() {
        a.targets = vec!["etcd".into(), "rocksdb".into(), "memory".into()];
    }
    if a.out.is_none() {
        a.out = Some(PathBuf::from("bench/results"));
    }
    run(common, &a).await
}

async fn run(common: &Common, a: &CompareArgs) -> std::process::ExitCode {
    let bin_dir = a.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let shards = a.shards.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rounds = a.rounds.unwrap_or(if a.quick { 1 } else { 2 }).max(1);
    let secs = a.seconds.unwrap_or(if a.quick { 2.0 } else { 4.0 });
    let mut specs = specs(a.quick, secs, shards);
    if !a.only.is_empty() {
        specs.retain(|s| a.only.iter().any(|o| o == s.name));
    }
    if common.balanced_channel {
        for s in &mut specs {
            s.args.push_str(" --balanced-channel");
        }
    }
    let started = Instant::now();
    let date = shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    // Other work on the machine skews a 2-core comparison: record the load.
    let load_at_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Start every target; they stay up for the whole comparison so that
    // each workload runs on all of them back to back.
    let mut targets = Vec::new();
    for name in &a.targets {
        eprintln!("starting {name} ...");
        match start_target(name, a, &bin_dir, shards).await {
            Ok(node) => targets.push(Target {
                name: name.clone(),
                label: target_label(name),
                node: Some(node),
                restarts: 0,
            }),
            Err(e) => {
                eprintln!("metastore-bench: cannot start {name}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }

    let mut floor = None;
    if !a.no_floor && specs.iter().any(|s| FLOOR_SPECS.contains(&s.name)) {
        eprintln!("starting the gRPC floor ...");
        match Node::grpc_floor(&a.work_dir).await {
            Ok(node) => floor = Some(node),
            Err(e) => {
                eprintln!("metastore-bench: cannot start the gRPC floor: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }

    let mut cells: Vec<Vec<Cell>> = specs
        .iter()
        .map(|_| targets.iter().map(|_| Cell { runs: Vec::new() }).collect())
        .collect();
    // The gRPC floor's runs, by spec (none for specs outside FLOOR_SPECS).
    let mut floor_cells: Vec<Cell> = specs.iter().map(|_| Cell { runs: Vec::new() }).collect();
    // The Go client's runs, by spec and target (none outside GO_SPECS).
    let mut go_cells: Vec<Vec<Cell>> = specs
        .iter()
        .map(|_| targets.iter().map(|_| Cell { runs: Vec::new() }).collect())
        .collect();
    let mut fsync = Vec::new();
    for round in 0..rounds {
        let probe = fsync_probe(&a.work_dir, 200);
        if let Some(p) = probe {
            eprintln!(
                "round {}: disk fdatasync p50/p99: append {:.3}/{:.3} ms, overwrite {:.3}/{:.3} ms",
                round + 1,
                p.append.0,
                p.append.1,
                p.overwrite.0,
                p.overwrite.1
            );
        }
        fsync.push(probe);
        for (si, spec) in specs.iter().enumerate() {
            for k in 0..targets.len() {
                let ti = (k + round) % targets.len();
                let t = &mut targets[ti];
                // Bring a target back if it died in an earlier run.
                let alive = t.node.as_mut().map(|n| n.alive()).unwrap_or(false);
                if !alive {
                    if let Some(n) = &t.node {
                        eprintln!("{} exited; its log:\n{}", t.name, n.log_tail());
                    }
                    t.node = None;
                    t.restarts += 1;
                    match start_target(&t.name, a, &bin_dir, shards).await {
                        Ok(n) => t.node = Some(n),
                        Err(e) => {
                            cells[si][ti]
                                .runs
                                .push(Err(format!("{} is down and did not restart: {e}", t.name)));
                            continue;
                        }
                    }
                }
                let node = t.node.as_ref().expect("node");
                let res = run_logged(spec, node, (round, rounds), t.label, &t.name, None).await;
                cells[si][ti].runs.push(res);
            }
            if floor.is_some() && FLOOR_SPECS.contains(&spec.name) {
                let res = run_floor(spec, &mut floor, &a.work_dir, round, rounds).await;
                floor_cells[si].runs.push(res);
            }
            if let Some(go) = a
                .go_client
                .as_deref()
                .filter(|_| GO_SPECS.contains(&spec.name))
            {
                for k in 0..targets.len() {
                    let ti = (k + round) % targets.len();
                    let t = &mut targets[ti];
                    let alive = t.node.as_mut().is_some_and(|n| n.alive());
                    let res = match t.node.as_ref().filter(|_| alive) {
                        Some(node) => {
                            let at = (round, rounds);
                            run_logged(spec, node, at, t.label, &t.name, Some(go)).await
                        }
                        // Restarted before the next workload's runs.
                        None => Err(format!("{} is down", t.name)),
                    };
                    go_cells[si][ti].runs.push(res);
                }
            }
        }
    }
    if let Some(mut n) = floor.take() {
        n.stop();
    }
    let mut versions = Vec::new();
    let load_at_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    versions.push(format!(
        "Load average (1/5/15 min) at start: {}; at end: {} (other processes on the machine share the 2 cores with client and server)",
        load_at_start.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load_at_end.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    ));
    if a.go_client.is_some() {
        let lib = shell(
            "dpkg-query",
            &["-W", "-f", "${Version}", "golang-etcd-server-dev"],
        );
        versions.push(format!(
            "Go client (`bench/goclient`): etcd's clientv3 from golang-etcd-server-dev {}, built with {}",
            if lib.is_empty() { "?" } else { &lib },
            shell("go", &["version"])
        ));
    }
    for t in &targets {
        if t.name == "etcd" {
            versions.push(format!(
                "etcd: {}",
                shell(&a.etcd_bin, &["--version"])
                    .lines()
                    .next()
                    .unwrap_or("?")
            ));
        }
    }
    for t in &mut targets {
        if let Some(mut n) = t.node.take() {
            n.stop();
        }
    }
    let wall = started.elapsed();

    let report = Report {
        specs: &specs,
        targets: &targets,
        cells: &cells,
        floor: &floor_cells,
        go: &go_cells,
        fsync: &fsync,
        rounds,
        secs,
        shards,
        quick: a.quick,
        date,
        versions,
        wall,
        balanced_channel: common.balanced_channel,
    };
    println!("{}", report.summary_table());
    if let Some(out) = &a.out {
        match report.write(out) {
            Ok(()) => eprintln!("wrote {}/REPORT.md (+ results.json, *.svg)", out.display()),
            Err(e) => {
                eprintln!("metastore-bench: writing the report: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}

/// Runs `spec` against the gRPC floor (restarted first if it died).
async fn run_floor(
    spec: &Spec,
    floor: &mut Option<Node>,
    work_dir: &Path,
    round: usize,
    rounds: usize,
) -> Result<RunResult, String> {
    if !floor.as_mut().is_some_and(|n| n.alive()) {
        // The old node (its directory included) goes before a new one
        // takes the same directory.
        if let Some(n) = floor.take() {
            eprintln!("the gRPC floor exited; its log:\n{}", n.log_tail());
        }
        *floor = Some(Node::grpc_floor(work_dir).await?);
    }
    let node = floor.as_ref().expect("started above");
    run_logged(
        spec,
        node,
        (round, rounds),
        "gRPC floor",
        "grpc-floor",
        None,
    )
    .await
}

/// Runs `spec` against `node` with a progress line before and after; the
/// result is tagged with `target`. With `go`, the Go client at that path
/// runs it instead of metastore-bench (see `goclient.rs`).
async fn run_logged(
    spec: &Spec,
    node: &Node,
    (round, rounds): (usize, usize),
    label: &str,
    target: &str,
    go: Option<&Path>,
) -> Result<RunResult, String> {
    eprintln!(
        "== round {}/{rounds}: {} @ {label}{} ==",
        round + 1,
        spec.name,
        if go.is_some() { ", Go clientv3" } else { "" }
    );
    let res = match go {
        Some(go) => goclient::run(go, spec.name, &spec.args, node).await,
        None => run_spec(spec, node).await,
    };
    log_result(res, target)
}

/// Prints a run's outcome on one line and tags it with `target`.
fn log_result(res: Result<RunResult, String>, target: &str) -> Result<RunResult, String> {
    match &res {
        Ok(r) => eprintln!(
            "   {:.0} {}  p50 {:.3} ms  p99 {:.3} ms  server CPU {} µs/op  errors {}{}",
            r.throughput,
            r.unit,
            r.main_latency().map(|l| l.p50).unwrap_or(0.0),
            r.main_latency().map(|l| l.p99).unwrap_or(0.0),
            r.server_cpu_us_per_op()
                .map(|v| format!("{v:.1}"))
                .unwrap_or("-".into()),
            r.errors,
            if r.violations.is_empty() {
                String::new()
            } else {
                format!("  VIOLATIONS {}", r.violations.len())
            }
        ),
        Err(e) => eprintln!("   failed: {}", first_line(e)),
    }
    res.map(|mut r| {
        r.target = target.to_string();
        r
    })
}

/// Runs one workload spec against a node (in this process), bounded in time.
async fn run_spec(spec: &Spec, node: &Node) -> Result<RunResult, String> {
    let mut argv: Vec<String> = vec!["metastore-bench".into()];
    argv.extend(spec.args.split_whitespace().map(str::to_string));
    argv.push("--endpoints".into());
    argv.push(node.endpoint.clone());
    let pids: Vec<String> = node.pids.iter().map(|(l, p)| format!("{l}={p}")).collect();
    argv.push("--server-pids".into());
    argv.push(pids.join(","));
    let cli = Cli::try_parse_from(&argv).map_err(|e| format!("bad spec {:?}: {e}", spec.args))?;
    match tokio::time::timeout(
        Duration::from_secs(240),
        run_workload(&cli.common, &cli.cmd),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err("run did not finish within 240 s".into()),
    }
}

fn shell(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

struct Report<'a> {
    specs: &'a [Spec],
    targets: &'a [Target],
    cells: &'a [Vec<Cell>],
    /// The gRPC floor's runs, by spec (see [`FLOOR_SPECS`]).
    floor: &'a [Cell],
    /// The Go client's runs, by spec and target (see [`GO_SPECS`]).
    go: &'a [Vec<Cell>],
    fsync: &'a [Option<FsyncProbe>],
    rounds: usize,
    secs: f64,
    shards: usize,
    quick: bool,
    date: String,
    versions: Vec<String>,
    wall: Duration,
    /// The client connected through `etcd-client`'s balanced channel.
    balanced_channel: bool,
}

fn fmt_num(v: f64) -> String {
    if v >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// `fig` of `a`'s run ÷ `fig` of `etcd`'s run, round by round (the runs of
/// one round ran back to back, so the machine's drift between rounds
/// cancels).
fn round_ratios(a: Option<&Cell>, etcd: Option<&Cell>, fig: Figure) -> Vec<Option<f64>> {
    match (a, etcd) {
        (Some(a), Some(e)) => a
            .runs
            .iter()
            .zip(&e.runs)
            .map(|(a, e)| match (a, e) {
                (Ok(a), Ok(e)) => ratio(fig.of(a), fig.of(e)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The median of the known values (the mean of the middle two for an
/// even count).
fn median_of(values: &[Option<f64>]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into())
}

impl Report<'_> {
    /// The gRPC floor's runs of `spec`, if it ran that workload.
    fn floor_cell(&self, spec: &str) -> Option<&Cell> {
        let si = self.specs.iter().position(|s| s.name == spec)?;
        self.floor.get(si).filter(|c| !c.runs.is_empty())
    }

    fn has_floor(&self) -> bool {
        self.floor.iter().any(|c| !c.runs.is_empty())
    }

    /// "The gRPC floor": what a server that does nothing behind gRPC
    /// reached in the same rounds (see `floor.rs`).
    fn floor_section(&self, s: &mut String) {
        if !self.has_floor() {
            return;
        }
        let _ = writeln!(
            s,
            "## The gRPC floor\n\n`metastore-bench grpc-floor` serves etcd's KV API through the same gRPC stack as the gateway (its HTTP/2 server on hyper, `metastore_gateway::grpc`, and its KV path, `metastore_gateway::unary`, with the same generated tonic service and codec behind it, `TCP_NODELAY`, one runtime thread) and does nothing behind it: Put stores the value in a hash map, Range of one key reads it back. Each of these workloads ran against it right after the other targets' runs of the same workload, in every round, with the same client. Whatever the floor costs, a server behind this gRPC layer pays as well: where the floor's own ratio to etcd (last column of the targets table) misses a target, so does any server built on it on this machine. Representative runs:\n"
        );
        let (mut head, mut rule) = (String::new(), String::new());
        let shown: Vec<&Target> = self.targets.iter().filter(|t| t.name != "memory").collect();
        for t in &shown {
            let _ = write!(head, " {} |", t.label);
            rule.push_str("---|");
        }
        let _ = writeln!(s, "| workload | figure | gRPC floor |{head}");
        let _ = writeln!(s, "|---|---|---|{rule}");
        for spec in self.specs {
            let Some(fc) = self.floor_cell(spec.name) else {
                continue;
            };
            let figures: [(&str, Figure); 3] = [
                ("ops/s", Figure::Throughput),
                ("server CPU µs/op", Figure::Cpu),
                ("p50 ms", Figure::P50),
            ];
            for (label, fig) in figures {
                let fmt = |v: Option<f64>| match (v, fig) {
                    (None, _) => "–".to_string(),
                    (Some(v), Figure::P50 | Figure::P99) => fmt_ms(v),
                    (Some(v), _) => fmt_num(v),
                };
                let mut row = format!(
                    "| {} | {label} | {} |",
                    spec.name,
                    fmt(fig.representative(fc))
                );
                for t in &shown {
                    let v = self
                        .cell(spec.name, &t.name)
                        .and_then(|c| fig.representative(c));
                    let _ = write!(row, " {} |", fmt(v));
                }
                let _ = writeln!(s, "{row}");
            }
            let problems = fc.problems();
            if !problems.is_empty() {
                let _ = writeln!(s, "\n{} @ gRPC floor: {}\n", spec.name, problems.join("; "));
            }
        }
        s.push('\n');
    }

    /// The Go client's runs of `spec` against `target`, if it ran them.
    fn go_cell(&self, spec: &str, target: &str) -> Option<&Cell> {
        let si = self.specs.iter().position(|s| s.name == spec)?;
        self.go[si]
            .get(self.idx(target)?)
            .filter(|c| !c.runs.is_empty())
    }

    /// "Cross-check with Go's clientv3": the put and range targets'
    /// workloads driven by a second client (see `goclient.rs`).
    fn go_section(&self, s: &mut String) {
        if !self.go.iter().flatten().any(|c| !c.runs.is_empty()) {
            return;
        }
        let _ = writeln!(
            s,
            "## Cross-check with Go's clientv3\n\nEvery ratio above comes from one client, `metastore-bench`. To check that it favours neither server, the workloads of the put and range targets also ran with `bench/goclient`, a Go program on etcd's own client library (clientv3 from Debian's `golang-etcd-server-dev`, version under *Machine*: the library of etcdctl and of etcd's benchmark tool, and in a later version of Kubernetes), with the same settings, against every target, right after `metastore-bench`'s runs of the same workload in every round. Server CPU is billed the same way. Representative runs (upper median by throughput):\n"
        );
        let _ = writeln!(
            s,
            "| workload | target | ops/s | server CPU µs/op | client CPU µs/op | p50 ms | p99 ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let mut problems = Vec::new();
        for spec in self.specs {
            for t in self.targets {
                let Some(c) = self.go_cell(spec.name, &t.name) else {
                    continue;
                };
                for p in c.problems() {
                    problems.push(format!("{} @ {}: {p}", spec.name, t.label));
                }
                let Some(m) = c.median() else {
                    let _ = writeln!(s, "| {} | {} | failed | | | | |", spec.name, t.label);
                    continue;
                };
                let opt = |v: Option<f64>, f: fn(f64) -> String| v.map(f).unwrap_or("–".into());
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    spec.name,
                    t.label,
                    self.thr_text(c),
                    opt(m.server_cpu_us_per_op(), fmt_num),
                    opt(m.client_cpu_us_per_op(), fmt_num),
                    opt(Figure::P50.of(m), fmt_ms),
                    opt(Figure::P99.of(m), fmt_ms),
                );
            }
        }
        // Ratios to etcd, median of the rounds, for each client.
        let others: Vec<&Target> = self.targets.iter().filter(|t| t.name != "etcd").collect();
        if self.idx("etcd").is_some() && !others.is_empty() {
            let mut head = String::new();
            let mut rule = String::new();
            for t in &others {
                let _ = write!(
                    head,
                    " {} ÷ etcd, Go client | same, metastore-bench |",
                    t.label
                );
                rule.push_str("---|---|");
            }
            let _ = writeln!(
                s,
                "\nRatios to etcd, each the median of the per-round ratios:\n"
            );
            let _ = writeln!(s, "| workload | figure |{head}");
            let _ = writeln!(s, "|---|---|{rule}");
            for spec in self.specs {
                let Some(etcd_go) = self.go_cell(spec.name, "etcd") else {
                    continue;
                };
                for (label, fig) in [
                    ("throughput", Figure::Throughput),
                    ("server CPU per op", Figure::Cpu),
                    ("p50 latency", Figure::P50),
                ] {
                    let mut row = format!("| {} | {label} |", spec.name);
                    for t in &others {
                        let go = median_of(&round_ratios(
                            self.go_cell(spec.name, &t.name),
                            Some(etcd_go),
                            fig,
                        ));
                        let bench = median_of(&round_ratios(
                            self.cell(spec.name, &t.name),
                            self.cell(spec.name, "etcd"),
                            fig,
                        ));
                        let _ = write!(row, " {} | {} |", fmt_ratio(go), fmt_ratio(bench));
                    }
                    let _ = writeln!(s, "{row}");
                }
            }
        }
        if !problems.is_empty() {
            let _ = writeln!(s, "\nProblems in the Go client's runs:\n");
            for p in problems {
                let _ = writeln!(s, "- {p}");
            }
        }
        s.push('\n');
    }

    /// Whether target `t`'s column is followed by a ratio (÷ etcd) column.
    fn has_ratio(&self, t: &Target) -> bool {
        t.name != "etcd" && self.idx("etcd").is_some()
    }

    /// The header cells of the per-target columns (each target's, then its
    /// ratio where it has one) and the matching separator cells.
    fn target_columns(&self) -> (String, String) {
        let (mut head, mut rule) = (String::new(), String::new());
        for t in self.targets {
            let _ = write!(head, " {} |", t.label);
            rule.push_str("---|");
            if self.has_ratio(t) {
                head.push_str(" ratio |");
                rule.push_str("---|");
            }
        }
        (head, rule)
    }

    fn idx(&self, target: &str) -> Option<usize> {
        self.targets.iter().position(|t| t.name == target)
    }

    fn cell(&self, spec: &str, target: &str) -> Option<&Cell> {
        let si = self.specs.iter().position(|s| s.name == spec)?;
        Some(&self.cells[si][self.idx(target)?])
    }

    fn thr_text(&self, c: &Cell) -> String {
        let Some(m) = c.median() else {
            return "failed".into();
        };
        let mut s = fmt_num(m.throughput);
        if let Some((lo, hi)) = c.range() {
            if c.ok().len() > 1 {
                let _ = write!(s, " ({}–{})", fmt_num(lo), fmt_num(hi));
            }
        }
        if !c.problems().is_empty() {
            s.push_str(" ⚠");
        }
        s
    }

    /// The plain-text table printed at the end of a run.
    fn summary_table(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "{:<16}", "workload");
        for t in self.targets {
            let _ = write!(s, " | {:>26}", t.name);
        }
        s.push('\n');
        for (si, spec) in self.specs.iter().enumerate() {
            let _ = write!(s, "{:<16}", spec.name);
            for (ti, _) in self.targets.iter().enumerate() {
                let c = &self.cells[si][ti];
                let txt = match c.median() {
                    Some(m) => format!(
                        "{} {} p99 {}ms {}µs",
                        fmt_num(m.throughput),
                        if m.unit == "events/s" { "ev/s" } else { "/s" },
                        fmt_ms(m.main_latency().map(|l| l.p99).unwrap_or(0.0)),
                        m.server_cpu_us_per_op()
                            .map(|v| format!("{v:.0}"))
                            .unwrap_or("-".into())
                    ),
                    None => "failed".into(),
                };
                let flag = if c.problems().is_empty() { "" } else { "!" };
                let _ = write!(s, " | {:>26}", format!("{txt}{flag}"));
            }
            s.push('\n');
        }
        s
    }

    fn write(&self, out: &Path) -> Result<(), String> {
        std::fs::create_dir_all(out).map_err(|e| format!("mkdir {}: {e}", out.display()))?;
        let w = |name: &str, body: String| {
            std::fs::write(out.join(name), body).map_err(|e| format!("write {name}: {e}"))
        };
        w("REPORT.md", self.markdown())?;
        w("results.json", self.json().to_string_pretty())?;
        w("throughput.svg", self.throughput_svg())?;
        w("latency.svg", self.latency_svg())?;
        w("cpu.svg", self.cpu_svg())?;
        Ok(())
    }

    fn json(&self) -> Json {
        // Every run of every cell: the targets' (by spec, target), the gRPC
        // floor's, then the Go client's (by spec, target).
        let mut runs = Vec::new();
        let mut add = |spec: &Spec, target: &str, client: &str, cell: &Cell| {
            for (round, r) in cell.runs.iter().enumerate() {
                let mut j = match r {
                    Ok(r) => r.to_json(),
                    Err(e) => {
                        let mut j = Json::obj();
                        j.set("failed", e.as_str());
                        j
                    }
                };
                j.set("name", spec.name)
                    .set("target", target)
                    .set("client", client)
                    .set("round", round + 1)
                    .set("command", spec.args.as_str());
                runs.push(j);
            }
        };
        const BENCH: &str = "metastore-bench";
        for (si, spec) in self.specs.iter().enumerate() {
            for (ti, t) in self.targets.iter().enumerate() {
                add(spec, &t.name, BENCH, &self.cells[si][ti]);
            }
        }
        for (spec, cell) in self.specs.iter().zip(self.floor) {
            add(spec, "grpc-floor", BENCH, cell);
        }
        for (si, spec) in self.specs.iter().enumerate() {
            for (ti, t) in self.targets.iter().enumerate() {
                add(spec, &t.name, "go-clientv3", &self.go[si][ti]);
            }
        }
        let mut o = Json::obj();
        o.set("date", self.date.as_str())
            .set("rounds", self.rounds)
            .set("quick", self.quick)
            .set("shards", self.shards)
            .set("runs", Json::Arr(runs));
        o
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let has = |t: &str| self.idx(t).is_some();
        let _ = writeln!(s, "# MetaStore vs etcd — benchmark report\n");
        let _ = writeln!(
            s,
            "Generated by `bench/compare{}` (`metastore-bench compare`) on {}; {} round(s), {:.0} s per duration-bound run, {:.0} s wall time in all.\n",
            if self.quick { " --quick" } else { "" },
            self.date,
            self.rounds,
            self.secs,
            self.wall.as_secs_f64()
        );
        let _ = writeln!(s, "## Machine\n");
        let _ = writeln!(s, "{}", machine_description(self.fsync));
        for v in &self.versions {
            let _ = writeln!(s, "- {v}");
        }
        let _ = writeln!(s, "- MetaStore: {}, {} shards (one per core), gateway in front; server CPU below = shard server + gateway processes", git_describe(), self.shards);
        let transport = if self.balanced_channel {
            "each connection `etcd-client`'s own balanced channel (`--balanced-channel`)"
        } else {
            "each connection one HTTP/2 connection driven through h2 from the calling task, each unary request one HEADERS and one DATA frame as grpc-go sends them, writes coalesced (`bench/src/transport.rs`)"
        };
        let _ = writeln!(s, "- Client: `metastore-bench` (Rust, `etcd-client` 0.21; {transport}; a single-threaded runtime per core, each running its share of the connections and the clients that use them, `bench/src/threads.rs`) on the same 2 cores; every target is driven by the same client with the same settings.\n");
        let _ = writeln!(s, "## Durability\n");
        let _ = writeln!(s, "- **etcd** fsyncs its WAL before acknowledging a write.");
        let _ = writeln!(s, "- **MetaStore rocksdb** fsyncs each raft batch to its raft WAL before anything in it is applied or acknowledged: equal durability, the fair comparison. Ratios below are MetaStore rocksdb ÷ etcd unless marked.");
        let _ = writeln!(s, "- **MetaStore memory** keeps everything in RAM only: **not durable**, shown for reference, never as the comparison.\n");
        let _ = writeln!(s, "The workloads run one after another on all targets (order rotated per round), so each comparison is close in time. Figures are the representative run's (the upper median by throughput — with two rounds the better one, since interference from other work on the machine only slows runs down; fixed-rate runs are ranked by their end-to-end p99 instead, for watch put sent → event); ranges over rounds in parentheses; ⚠ marks runs with errors or failed checks (listed under *Problems*).\n");

        // Throughput.
        let _ = writeln!(s, "## Throughput\n");
        let (head, rule) = self.target_columns();
        let _ = writeln!(s, "| workload | etcd (ANCHORS.md) |{head}\n|---|---|{rule}");
        for spec in self.specs {
            let unit = self
                .targets
                .iter()
                .find_map(|t| {
                    self.cell(spec.name, &t.name)
                        .and_then(|c| c.median())
                        .map(|m| m.unit.clone())
                })
                .unwrap_or_default();
            let _ = write!(s, "| {} ({}) | {} |", spec.title, unit, spec.anchor);
            let etcd = self
                .cell(spec.name, "etcd")
                .and_then(|c| c.median())
                .map(|m| m.throughput);
            for t in self.targets {
                let c = self.cell(spec.name, &t.name).expect("cell");
                let _ = write!(s, " {} |", self.thr_text(c));
                if self.has_ratio(t) {
                    let _ = write!(
                        s,
                        " {} |",
                        fmt_ratio(ratio(c.median().map(|m| m.throughput), etcd))
                    );
                }
            }
            s.push('\n');
        }
        s.push('\n');
        let _ = writeln!(s, "![throughput](throughput.svg)\n");

        // Latency.
        let _ = writeln!(s, "## Latency (ms)\n");
        let _ = writeln!(s, "Main latency of each workload (request latency; for watch: put acknowledged → event at the watcher, clamped at 0 — shown as 0.001 — when the event beats the put's response, as most of etcd's do; no ratio is given against such a floor value). Put sent → event is under *Further figures*.\n");
        let _ = writeln!(
            s,
            "| workload | target | p50 | p90 | p99 | p99.9 | max | p50 ÷ etcd | p99 ÷ etcd |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for spec in self.specs {
            let etcd = self
                .cell(spec.name, "etcd")
                .and_then(|c| c.median())
                .and_then(|m| m.main_latency().cloned());
            for t in self.targets {
                let c = self.cell(spec.name, &t.name).expect("cell");
                let Some(m) = c.median() else {
                    let _ = writeln!(s, "| {} | {} | failed | | | | | | |", spec.name, t.label);
                    continue;
                };
                let Some(l) = m.main_latency() else { continue };
                let (r50, r99) = if t.name != "etcd" {
                    (
                        fmt_ratio(ratio(
                            Some(l.p50),
                            etcd.as_ref().map(|e| e.p50).filter(|v| *v >= 0.005),
                        )),
                        fmt_ratio(ratio(
                            Some(l.p99),
                            etcd.as_ref().map(|e| e.p99).filter(|v| *v >= 0.005),
                        )),
                    )
                } else {
                    (String::new(), String::new())
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    spec.name,
                    t.label,
                    fmt_ms(l.p50),
                    fmt_ms(l.p90),
                    fmt_ms(l.p99),
                    fmt_ms(l.p999),
                    fmt_ms(l.max),
                    r50,
                    r99
                );
            }
        }
        s.push('\n');
        let _ = writeln!(s, "![latency](latency.svg)\n");

        // CPU.
        let _ = writeln!(s, "## Server CPU per operation (µs)\n");
        let _ = writeln!(s, "utime+stime of the server processes from `/proc/<pid>/stat` over the run and until they have gone quiet after it (at most 10 s), so background work a run leaves behind (RocksDB flushes and compactions, etcd's backend commits) is billed to it rather than to the next run, ÷ operations (for watch: ÷ delivered events). MetaStore = shard server + gateway (breakdown in parentheses). The client's own CPU per op is in the last columns.\n");
        let (head, rule) = self.target_columns();
        let _ = write!(s, "| workload |{head}");
        for t in self.targets {
            let _ = write!(s, " client µs/op @{} |", t.name);
        }
        let _ = write!(s, "\n|---|{rule}");
        for _ in self.targets {
            let _ = write!(s, "---|");
        }
        s.push('\n');
        for spec in self.specs {
            let _ = write!(s, "| {} |", spec.name);
            let etcd = self.cell(spec.name, "etcd").and_then(|c| c.median_cpu());
            for t in self.targets {
                let c = self.cell(spec.name, &t.name).expect("cell");
                let v = c.median_cpu();
                let breakdown = c
                    .median()
                    .and_then(|m| m.cpu.as_ref().map(|cpu| (m.ops, cpu)))
                    .filter(|(_, cpu)| cpu.per_process.len() > 1)
                    .map(|(ops, cpu)| {
                        let parts: Vec<String> = cpu
                            .per_process
                            .iter()
                            .map(|(l, secs)| format!("{l} {:.0}", secs * 1e6 / ops.max(1) as f64))
                            .collect();
                        format!(" ({})", parts.join(" + "))
                    })
                    .unwrap_or_default();
                let _ = write!(
                    s,
                    " {}{} |",
                    v.map(|v| format!("{v:.1}")).unwrap_or("–".into()),
                    breakdown
                );
                if self.has_ratio(t) {
                    let _ = write!(s, " {} |", fmt_ratio(ratio(v, etcd)));
                }
            }
            for t in self.targets {
                let c = self.cell(spec.name, &t.name).expect("cell");
                let v = c.median().and_then(|m| m.client_cpu_us_per_op());
                let _ = write!(
                    s,
                    " {} |",
                    v.map(|v| format!("{v:.1}")).unwrap_or("–".into())
                );
            }
            s.push('\n');
        }
        s.push('\n');
        let _ = writeln!(s, "![cpu](cpu.svg)\n");

        // Targets.
        if has("etcd") {
            let _ = writeln!(
                s,
                "## Targets (ANCHORS.md) — MetaStore rocksdb vs etcd, same machine, same client\n"
            );
            let _ = writeln!(
                s,
                "Each target is judged on the median of its per-round ratios: a round runs etcd and MetaStore back to back, so the ratio within a round cancels the machine's drift between rounds. The verdict also counts the rounds whose own ratio meets the target: a target met in only some of them is within the machine's noise of its limit. *Representative runs* divides the two targets' representative runs (each chosen on its own, possibly from different rounds), as the tables above do.\n"
            );
            let floor_col = self.has_floor();
            let _ = writeln!(
                s,
                "| target | required | rocksdb ÷ etcd (median of rounds) | verdict | per round | representative runs | memory (not durable) |{}",
                if floor_col { " gRPC floor ÷ etcd |" } else { "" }
            );
            let _ = writeln!(
                s,
                "|---|---|---|---|---|---|---|{}",
                if floor_col { "---|" } else { "" }
            );
            // Round 1's run of `watch-memory`, on a fresh node (later
            // rounds reuse memory earlier workloads freed).
            let rss = |t: &str| {
                self.cell("watch-memory", t).and_then(|c| {
                    c.runs
                        .first()
                        .and_then(|r| r.as_ref().ok())
                        .and_then(|m| m.extra("server_rss_growth_per_watcher_bytes"))
                })
            };
            // (name, requirement, bound, higher is better, workload, figure)
            let rows: [(&str, &str, f64, bool, &str, Figure); 9] = [
                (
                    "put @1000 clients: throughput",
                    "≥ 2.5×",
                    2.5,
                    true,
                    "put-1000c",
                    Figure::Throughput,
                ),
                (
                    "put @1000 clients: server CPU per put",
                    "≤ 0.2×",
                    0.2,
                    false,
                    "put-1000c",
                    Figure::Cpu,
                ),
                (
                    "put @1 client: p50 latency",
                    "≤ 0.7×",
                    0.7,
                    false,
                    "put-1c",
                    Figure::P50,
                ),
                (
                    "serializable range @1000 clients: throughput",
                    "≥ 3×",
                    3.0,
                    true,
                    "range-s-1000c",
                    Figure::Throughput,
                ),
                (
                    "serializable range @1000 clients: server CPU per range",
                    "≤ 0.2×",
                    0.2,
                    false,
                    "range-s-1000c",
                    Figure::Cpu,
                ),
                (
                    "watch fan-out: events/s",
                    "≥ 2.5×",
                    2.5,
                    true,
                    "watch-fanout",
                    Figure::Throughput,
                ),
                (
                    "watch fan-out: server CPU per delivered event",
                    "≤ 0.2×",
                    0.2,
                    false,
                    "watch-fanout",
                    Figure::Cpu,
                ),
                (
                    "watch put→event p99: put acknowledged → event (ANCHORS' measure)",
                    "≤ 0.5×",
                    0.5,
                    false,
                    "watch-latency",
                    Figure::P99,
                ),
                (
                    "watch put→event p99: put sent → event",
                    "≤ 0.5×",
                    0.5,
                    false,
                    "watch-latency",
                    Figure::EndToEndP99,
                ),
            ];
            for (name, req, bound, higher, spec, fig) in rows {
                let meets = |v: f64| (higher && v >= bound) || (!higher && v <= bound);
                // The ratio within each round: the targets ran back to back
                // there, so the machine's drift between rounds cancels.
                let per_round =
                    |t: &str| round_ratios(self.cell(spec, t), self.cell(spec, "etcd"), fig);
                let rounds = per_round("rocksdb");
                let rv = if has("rocksdb") {
                    median_of(&rounds)
                } else {
                    None
                };
                let mv = if has("memory") {
                    median_of(&per_round("memory"))
                } else {
                    None
                };
                let rep = |t: &str| self.cell(spec, t).and_then(|c| fig.representative(c));
                let rep_ratio = if has("rocksdb") {
                    ratio(rep("rocksdb"), rep("etcd"))
                } else {
                    None
                };
                let judged = rounds.iter().flatten().count();
                let met_in = rounds.iter().flatten().filter(|&&v| meets(v)).count();
                let verdict = match rv {
                    None => "no data".to_string(),
                    Some(v) if meets(v) => format!("met ({met_in} of {judged} rounds)"),
                    Some(_) => format!("**missed** (met in {met_in} of {judged} rounds)"),
                };
                let rounds = rounds
                    .iter()
                    .map(|r| r.map(|r| format!("{r:.2}")).unwrap_or("–".into()))
                    .collect::<Vec<_>>()
                    .join(" / ");
                let floor = if !floor_col {
                    String::new()
                } else if self.floor_cell(spec).is_some() {
                    let fv = median_of(&round_ratios(
                        self.floor_cell(spec),
                        self.cell(spec, "etcd"),
                        fig,
                    ));
                    format!(" {} |", fmt_ratio(fv))
                } else {
                    " |".to_string()
                };
                let _ = writeln!(
                    s,
                    "| {name} | {req} | {} | {verdict} | {rounds} | {} | {} |{floor}",
                    fmt_ratio(rv),
                    fmt_ratio(rep_ratio),
                    fmt_ratio(mv)
                );
            }
            // Memory per idle watcher: against ANCHORS' etcd figure (etcd's
            // own RSS growth here is dominated by its garbage collector),
            // with its per-stream cost spread as `watch-memory` spreads
            // ours: 350 B + 18 KB ÷ 100 watchers per stream.
            const ANCHOR_BYTES_PER_WATCHER: f64 = 350.0 + 18.0 * 1024.0 / 100.0;
            let bytes = |v: Option<f64>| match v {
                Some(v) if v > 0.0 => format!("{v:.0} B"),
                Some(_) => "n/a (RSS did not grow)".into(),
                None => "–".into(),
            };
            let rv = if has("rocksdb") { rss("rocksdb") } else { None };
            let mv = if has("memory") { rss("memory") } else { None };
            let _ = writeln!(
                s,
                "| server memory per watcher, streams included (RSS growth ÷ watchers) | ≤ etcd's ≈ 350 B + 18 KB per stream = {ANCHOR_BYTES_PER_WATCHER:.0} B at 100 per stream | {} | {} | round 1 only (fresh node) | | {} |{}",
                bytes(rv),
                match rv {
                    Some(v) if v <= 0.0 => "no data",
                    None => "no data",
                    Some(v) if v <= ANCHOR_BYTES_PER_WATCHER => "met (indicative)",
                    Some(_) => "**missed**",
                },
                bytes(mv),
                if floor_col { " |" } else { "" }
            );
            if let (Some(e), r) = (rss("etcd"), rss("rocksdb")) {
                let _ = writeln!(
                    s,
                    "\nMemory per watcher: RSS growth of the server processes after creating 10 000 watchers on 100 streams (`watch-memory`, round 1, the first workload on a freshly started node), streams included, ÷ 10 000 (page-granular, indicative). etcd here: {:.0} B (Go's heap and GC make this noisy); MetaStore rocksdb: {}. ANCHORS: etcd ≈ 350 B per watcher + 18 KB per stream.",
                    e,
                    r.map(|v| format!("{v:.0} B")).unwrap_or("–".into())
                );
            }
            s.push('\n');
        }
        self.floor_section(&mut s);
        self.go_section(&mut s);
        let _ = writeln!(
            s,
            "## Profiles and tuning\n\n`bench/results/TUNING.md` records each change made against a target's shortfall, with its before/after measurements, and what was tried and not kept. Its sections \"Put at 1,000 clients: the floor under the gateway\", \"Put at 1 client: what a hop costs on this machine\" and \"Serializable range on this machine: the gRPC floor\" measure what the gRPC layer alone, and on this machine each wake-up of an idle CPU, cost against those targets (they were measured with the client of their day; the floor's ratios with this report's client are in the targets table above). Flamegraphs of put at 1,000 clients, with their top frames: `bench/results/flamegraphs/`."
        );
        s.push('\n');

        // Extras per workload.
        let _ = writeln!(s, "## Further figures\n");
        let _ = writeln!(s, "| workload | target | figure | value |");
        let _ = writeln!(s, "|---|---|---|---|");
        for spec in self.specs {
            for t in self.targets {
                let Some(m) = self.cell(spec.name, &t.name).and_then(|c| c.median()) else {
                    continue;
                };
                for (name, l) in m.latencies.iter().skip(1) {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {name} latency p50 / p99 / max (ms) | {} / {} / {} |",
                        spec.name,
                        t.name,
                        fmt_ms(l.p50),
                        fmt_ms(l.p99),
                        fmt_ms(l.max)
                    );
                }
                for (k, v) in &m.extra {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {k} | {} |",
                        spec.name,
                        t.name,
                        if v.fract() == 0.0 {
                            format!("{v:.0}")
                        } else {
                            format!("{v:.3}")
                        }
                    );
                }
            }
        }
        s.push('\n');

        // Problems.
        let _ = writeln!(s, "## Problems (errors, failed checks)\n");
        let mut any = false;
        for (si, spec) in self.specs.iter().enumerate() {
            for (ti, t) in self.targets.iter().enumerate() {
                for p in self.cells[si][ti].problems() {
                    any = true;
                    let _ = writeln!(s, "- {} @ {}: {}", spec.name, t.name, p.replace('|', "\\|"));
                }
            }
        }
        // CPU readings taken while a server was still busy (SETTLE_MAX ran
        // out): the figure carries work of a neighbouring run.
        for (si, spec) in self.specs.iter().enumerate() {
            for (ti, t) in self.targets.iter().enumerate() {
                for (round, r) in self.cells[si][ti].runs.iter().enumerate() {
                    let Some(c) = r.as_ref().ok().and_then(|r| r.cpu.as_ref()) else {
                        continue;
                    };
                    let when = match (c.settled_before, c.settled_after) {
                        (true, true) => continue,
                        (false, true) => "started",
                        (true, false) => "ended",
                        (false, false) => "started and ended",
                    };
                    any = true;
                    let _ = writeln!(
                        s,
                        "- {} @ {}, round {}: the CPU reading {when} with the servers still busy after {} s of waiting for them to go quiet",
                        spec.name,
                        t.name,
                        round + 1,
                        SETTLE_MAX.as_secs()
                    );
                }
            }
        }
        for t in self.targets {
            if t.restarts > 0 {
                any = true;
                let _ = writeln!(
                    s,
                    "- {} exited during the comparison and was restarted {} time(s)",
                    t.name, t.restarts
                );
            }
        }
        if !any {
            let _ = writeln!(
                s,
                "None: every run finished without errors and passed its checks."
            );
        }
        s.push('\n');

        // Every run.
        let _ = writeln!(s, "## Every run\n");
        let _ = writeln!(
            s,
            "| workload | target | round | throughput | p50 ms | p99 ms | server µs/op | errors |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for (si, spec) in self.specs.iter().enumerate() {
            for (ti, t) in self.targets.iter().enumerate() {
                for (round, r) in self.cells[si][ti].runs.iter().enumerate() {
                    match r {
                        Ok(r) => {
                            let l = r.main_latency().cloned().unwrap_or_default();
                            let _ = writeln!(
                                s,
                                "| {} | {} | {} | {} {} | {} | {} | {} | {} |",
                                spec.name,
                                t.name,
                                round + 1,
                                fmt_num(r.throughput),
                                r.unit,
                                fmt_ms(l.p50),
                                fmt_ms(l.p99),
                                r.server_cpu_us_per_op()
                                    .map(|v| format!("{v:.1}"))
                                    .unwrap_or("–".into()),
                                r.errors
                            );
                        }
                        Err(_) => {
                            let _ = writeln!(
                                s,
                                "| {} | {} | {} | failed | | | | |",
                                spec.name,
                                t.name,
                                round + 1
                            );
                        }
                    }
                }
            }
        }
        s.push('\n');
        let _ = writeln!(s, "## Commands\n");
        let _ = writeln!(s, "Each workload is `metastore-bench --endpoints <target> --server-pids <pids> <args>` with:\n");
        for spec in self.specs {
            let _ = writeln!(s, "- `{}`: `{}`", spec.name, spec.args);
        }
        let _ = writeln!(s, "\nNotes: the watch fan-out run puts as fast as 10 put clients can (not at etcd `benchmark`'s default 100 puts/s, which would cap any server at 100 puts × 1000 watchers = 100k events/s; ANCHORS' etcd figure sits near that cap), so events/s is the put rate each server sustains with 1,000 watchers of the key, times 1,000: it ranks put latency under a watch load rather than the most events a server could deliver. Every run's own checks (exact counts, each watch event exactly once and in order, list counts, prev_kv) are listed under *Problems* when they fail. Results are in `results.json` too.");
        s
    }

    fn series(&self) -> Vec<(String, String)> {
        self.targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.label.to_string(), PALETTE[i % PALETTE.len()].to_string()))
            .collect()
    }

    /// One group of bars per workload, one bar per target that has a
    /// value: `value` gives the bar's length and its label.
    fn groups(&self, value: impl Fn(&Cell) -> Option<(f64, String)>) -> Vec<Group> {
        self.specs
            .iter()
            .map(|spec| Group {
                label: spec.name.to_string(),
                bars: self
                    .targets
                    .iter()
                    .enumerate()
                    .filter_map(|(i, t)| {
                        let (value, text) = value(self.cell(spec.name, &t.name)?)?;
                        Some(Bar {
                            series: i,
                            value,
                            text,
                        })
                    })
                    .collect(),
            })
            .collect()
    }

    fn throughput_svg(&self) -> String {
        let groups = self.groups(|c| {
            let m = c.median()?;
            Some((
                m.throughput,
                format!("{} {}", fmt_num(m.throughput), m.unit),
            ))
        });
        grouped_bars(
            "Throughput per workload",
            "representative run; bars scaled per workload (longest = best); memory engine is not durable",
            &self.series(),
            &groups,
            &Scale::PerGroup,
        )
    }

    fn latency_svg(&self) -> String {
        let mut series = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            series.push((
                format!("{} p50", t.name),
                PALETTE_LIGHT[i % PALETTE_LIGHT.len()].to_string(),
            ));
            series.push((
                format!("{} p99", t.name),
                PALETTE[i % PALETTE.len()].to_string(),
            ));
        }
        let groups = self
            .specs
            .iter()
            .map(|spec| Group {
                label: spec.name.to_string(),
                bars: self
                    .targets
                    .iter()
                    .enumerate()
                    .filter_map(|(i, t)| {
                        let l = self
                            .cell(spec.name, &t.name)?
                            .median()?
                            .main_latency()?
                            .clone();
                        Some([
                            Bar {
                                series: 2 * i,
                                value: l.p50,
                                text: format!("p50 {} ms", fmt_ms(l.p50)),
                            },
                            Bar {
                                series: 2 * i + 1,
                                value: l.p99,
                                text: format!("p99 {} ms", fmt_ms(l.p99)),
                            },
                        ])
                    })
                    .flatten()
                    .collect(),
            })
            .collect::<Vec<_>>();
        grouped_bars(
            "Latency percentiles per workload",
            "representative run; log scale; watch rows: put acknowledged → event",
            &series,
            &groups,
            &Scale::Log {
                min: 0.01,
                max: 10_000.0,
                unit: "ms",
            },
        )
    }

    fn cpu_svg(&self) -> String {
        let groups = self.groups(|c| {
            let v = c.median_cpu()?;
            Some((v, format!("{v:.1} µs/op")))
        });
        grouped_bars(
            "Server CPU per operation",
            "µs of server CPU (user+system) per op or delivered event; shorter is better",
            &self.series(),
            &groups,
            &Scale::Log {
                min: 0.1,
                max: 10_000.0,
                unit: "µs",
            },
        )
    }
}

fn git_describe() -> String {
    let rev = shell("git", &["rev-parse", "--short", "HEAD"]);
    if rev.is_empty() {
        return "unknown revision".into();
    }
    let dirty = !shell("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "commit {rev}{}",
        if dirty { " + uncommitted changes" } else { "" }
    )
}

fn machine_description(fsync: &[Option<FsyncProbe>]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                l.trim_start_matches("PRETTY_NAME=")
                    .trim_matches('"')
                    .to_string()
            })
        })
        .unwrap_or_default();
    let probes: Vec<String> = fsync
        .iter()
        .enumerate()
        .map(|(i, p)| match p {
            Some(p) => format!(
                "round {}: append p50 {:.3} / p99 {:.3} ms, overwrite p50 {:.3} / p99 {:.3} ms",
                i + 1,
                p.append.0,
                p.append.1,
                p.overwrite.0,
                p.overwrite.1
            ),
            None => format!("round {}: not measured", i + 1),
        })
        .collect();
    format!(
        "- {cores} cores ({model}), {mem} RAM, {os}, kernel {}\n- Disk: data directories on the local disk (the work dir's file system); fdatasync of 4 KiB writes measured before each round, appending to a growing file (size changes, so the journal commits too: how a RocksDB WAL writes) and overwriting a preallocated file (no size change: how etcd's WAL segments and MetaStore's raft WAL segments, both allocated up front, write) — {}",
        kernel.trim(),
        probes.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec that does not parse fails only when `compare` runs it, as a
    /// failed cell of the report: check every one here.
    #[test]
    fn every_spec_parses_as_run() {
        for quick in [false, true] {
            let specs = specs(quick, 4.0, 2);
            let mut names: Vec<&str> = specs.iter().map(|s| s.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), specs.len(), "spec names are unique");
            for spec in &specs {
                let mut argv = vec!["metastore-bench".to_string()];
                argv.extend(spec.args.split_whitespace().map(str::to_string));
                argv.extend(
                    ["--endpoints", "127.0.0.1:1", "--server-pids", "x=1"].map(String::from),
                );
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("{} does not parse: {e}", spec.name);
                }
            }
        }
    }

    #[test]
    fn median_of_skips_missing_rounds() {
        assert_eq!(median_of(&[]), None);
        assert_eq!(median_of(&[None, None]), None);
        assert_eq!(
            median_of(&[Some(0.21), Some(0.17), None, Some(0.19)]),
            Some(0.19)
        );
        assert_eq!(median_of(&[Some(3.0), Some(1.0)]), Some(2.0));
        assert_eq!(
            median_of(&[Some(0.19), Some(0.19), Some(0.19), Some(0.17), Some(0.21)]),
            Some(0.19)
        );
    }
}
