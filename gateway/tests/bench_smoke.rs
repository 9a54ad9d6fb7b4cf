//! Smoke test of the benchmark harness (`metastore-bench`, crate `bench/`):
//! every workload runs briefly against a real MetaStore node (the shard
//! server and the gateway on ephemeral ports, temp data dir), on both engines, and must
//! finish with the exact op count, no errors and no failed checks (the
//! workloads verify what they see, e.g. every watch event exactly once).
//! Speed is not asserted. A last test runs `compare` against one node and
//! the gRPC floor to check that the report and charts get written.
//!
//! Needs every binary built first (`cargo build --workspace --all-targets`,
//! as `deploy/test.sh` does).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Wall-clock limit of one benchmark invocation.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metastore-gateway"))
        .parent()
        .expect("binary dir")
        .to_path_buf()
}

fn bench_bin() -> PathBuf {
    let p = bin_dir().join("metastore-bench");
    assert!(
        p.exists(),
        "{} not found: build every target first (cargo build --workspace --all-targets)",
        p.display()
    );
    p
}

/// A MetaStore node: shard server (2 shards) + gateway, killed on drop.
struct Node {
    _dir: tempfile::TempDir,
    server: Child,
    gateway: Child,
    endpoint: String,
}

impl Node {
    fn start(engine: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("metastore-bench-smoke-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let mut cmd = Command::new(bin_dir().join("metastore-server"));
        cmd.args([
            "--engine",
            engine,
            "--shards",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .arg("--data-dir")
        .arg(&data);
        let (server, line) = spawn_ready(cmd, dir.path(), "server", "metastore-server ready:");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addrs="))
            .and_then(|l| l.split(',').next())
            .unwrap_or_else(|| panic!("no addrs= in {line:?}"))
            .to_string();
        let mut cmd = Command::new(bin_dir().join("metastore-gateway"));
        cmd.args(["--listen", "127.0.0.1:0", "--server", &addr]);
        let (gateway, line) =
            spawn_ready(cmd, dir.path(), "gateway", "metastore-gateway ready on ");
        let endpoint = line
            .trim()
            .strip_prefix("metastore-gateway ready on ")
            .expect("gateway ready line")
            .trim()
            .to_string();
        Node {
            _dir: dir,
            server,
            gateway,
            endpoint,
        }
    }

    fn pids(&self) -> String {
        format!("server={},gateway={}", self.server.id(), self.gateway.id())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for c in [&mut self.gateway, &mut self.server] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `cmd` (stderr to a log file in `dir`) and waits for the stdout
/// line starting with `ready`.
fn spawn_ready(mut cmd: Command, dir: &Path, what: &str, ready: &str) -> (Child, String) {
    let log = dir.join(format!("{what}.stderr.log"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(&ready) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line);
                }
            }
        }
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) => (child, line),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not become ready; stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

/// Runs the bench binary with `args`; returns (success, stdout, stderr).
fn run_bench(args: &[String]) -> (bool, String, String) {
    run_program(&bench_bin(), args)
}

/// Runs `program` with `args` for at most [`RUN_TIMEOUT`]; returns
/// (success, stdout, stderr).
fn run_program(program: &Path, args: &[String]) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, mut stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {RUN_TIMEOUT:?})"));
    }
    (status.map(|s| s.success()).unwrap_or(false), stdout, stderr)
}

/// The number after `"key":` in a JSON text (first occurrence).
fn json_num(json: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let rest = &json[json.find(&pat)? + pat.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// (name, arguments, expected ops, expected extra figures).
type Case = (
    &'static str,
    &'static str,
    f64,
    &'static [(&'static str, f64)],
);

const CASES: &[Case] = &[
    ("put", "--conns 2 --clients 4 --total 200 --val-size 64 --key-space-size 1000 put", 200.0, &[]),
    (
        "put through etcd-client's balanced channel",
        "--conns 2 --clients 4 --total 100 --balanced-channel put",
        100.0,
        &[],
    ),
    ("range linearizable", "--clients 2 --total 100 range --consistency l", 100.0, &[]),
    (
        "range serializable prefix+limit",
        "--clients 4 --total 100 range --consistency s --prefix --key /smoke/list/ --prefill 30 --limit 10",
        100.0,
        &[],
    ),
    (
        "txn-put across shards",
        "--clients 4 --total 100 --key-space-size 1000 txn-put --txn-ops 4 --shards 2",
        100.0,
        &[],
    ),
    (
        "delete",
        "--clients 4 --total 100 --key-space-size 100 --sequential-keys --key-prefix /smoke/del/ --key-size 16 delete",
        100.0,
        &[("deleted_keys", 100.0)],
    ),
    (
        "watch one key",
        "--conns 2 watch --streams 4 --watchers-per-stream 5 --put-total 50",
        1000.0,
        &[("watchers", 20.0), ("puts", 50.0)],
    ),
    (
        "watch prefix with prev_kv",
        "--key-space-size 10 watch --prefix --key /smoke/wp/ --streams 2 --watchers-per-stream 3 --put-total 40 --put-clients 2 --prev-kv",
        240.0,
        &[("puts", 40.0)],
    ),
    (
        "watch-latency",
        "watch-latency --streams 2 --watchers-per-stream 5 --put-rate 200 --put-total 40",
        400.0,
        &[("puts", 40.0)],
    ),
    ("lease-keepalive", "--clients 4 --total 100 lease-keepalive --ttl 30", 100.0, &[]),
    (
        "lease-expiry",
        "--clients 8 lease-expiry --leases 200 --keys-per-lease 2 --ttl 7 --put-rate 100 --put-clients 4 --drain-timeout 30s",
        200.0,
        &[("leases", 200.0), ("deleted_keys", 400.0)],
    ),
    (
        "mixed-k8s",
        "--conns 2 --clients 8 --total 300 mixed-k8s --objects 1200 --resources 2 --namespaces 3 --list-limit 100 --progress-interval 100ms",
        300.0,
        &[],
    ),
];

fn all_workloads(engine: &str) {
    let node = Node::start(engine);
    let mut failures = Vec::new();
    for (name, args, ops, extras) in CASES {
        let mut argv: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        argv.extend([
            "--endpoints".to_string(),
            node.endpoint.clone(),
            "--server-pids".to_string(),
            node.pids(),
            "--json".to_string(),
            "--quiet".to_string(),
            "--op-timeout".to_string(),
            "20s".to_string(),
        ]);
        let started = Instant::now();
        let (ok, out, err) = run_bench(&argv);
        let mut problems = Vec::new();
        if !ok {
            problems.push("exited unsuccessfully".to_string());
        }
        match json_num(&out, "ops") {
            Some(n) if n == *ops => {}
            other => problems.push(format!("ops {other:?}, expected {ops}")),
        }
        if json_num(&out, "errors") != Some(0.0) {
            problems.push(format!("errors {:?}", json_num(&out, "errors")));
        }
        if ok && !out.contains("\"violations\":[]") {
            problems.push("failed checks (violations)".into());
        }
        for (k, v) in *extras {
            if json_num(&out, k) != Some(*v) {
                problems.push(format!("{k} = {:?}, expected {v}", json_num(&out, k)));
            }
        }
        eprintln!(
            "[{engine}] {name}: {} in {:.1} s",
            if problems.is_empty() { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        if !problems.is_empty() {
            failures.push(format!(
                "{name} ({args}): {}\n  stdout: {}\n  stderr: {}",
                problems.join("; "),
                out.trim(),
                err.trim()
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .join("\n          ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} workloads failed on the {engine} engine:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn bench_workloads_memory() {
    all_workloads("memory");
}

#[test]
fn bench_workloads_rocksdb() {
    all_workloads("rocksdb");
}

/// `bench/goclient` (the Go clientv3 client `compare` cross-checks its
/// ratios with), built by its `build.sh` once per test process.
fn go_client() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("repo root");
            let out = bin_dir().join("metastore-goclient");
            let status = Command::new(root.join("bench/goclient/build.sh"))
                .arg(&out)
                .status()
                .expect("run bench/goclient/build.sh");
            assert!(
                status.success(),
                "bench/goclient/build.sh failed (needs golang-go and golang-etcd-server-dev)"
            );
            out
        })
        .clone()
}

/// The Go client's put and range against a node: exact counts, no errors,
/// and the puts' keys really written (counted with etcdctl).
fn go_client_workloads(engine: &str) {
    let node = Node::start(engine);
    let run = |args: &str| {
        let mut argv: Vec<String> = args.split_whitespace().map(str::to_string).collect();
        argv.extend(["--endpoints".to_string(), node.endpoint.clone()]);
        let (ok, out, err) = run_program(&go_client(), &argv);
        assert!(ok, "metastore-goclient {args} failed:\n{out}\n{err}");
        out
    };
    let out = run("--workload put --conns 2 --clients 4 --total 200 --val-size 64 --key-size 16 --key-prefix /smoke/go/ --sequential-keys --key-space-size 1000");
    assert_eq!(json_num(&out, "ops"), Some(200.0), "{out}");
    assert_eq!(json_num(&out, "errors"), Some(0.0), "{out}");
    assert_eq!(
        json_num(&out, "count"),
        Some(200.0),
        "latency samples: {out}"
    );
    let listed = Command::new("etcdctl")
        .args([
            "--endpoints",
            &node.endpoint,
            "get",
            "/smoke/go/",
            "--prefix",
            "-w",
            "json",
        ])
        .output()
        .expect("run etcdctl");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        json_num(&listed, "count"),
        Some(200.0),
        "keys written: {listed}"
    );
    for consistency in ["l", "s"] {
        let out = run(&format!(
            "--workload range --consistency {consistency} --clients 4 --total 100"
        ));
        assert_eq!(json_num(&out, "ops"), Some(100.0), "{out}");
        assert_eq!(json_num(&out, "errors"), Some(0.0), "{out}");
    }
}

#[test]
fn go_client_workloads_memory() {
    go_client_workloads("memory");
}

#[test]
fn go_client_workloads_rocksdb() {
    go_client_workloads("rocksdb");
}

/// `compare` starts its own node and writes the report with its charts.
#[test]
fn bench_compare_writes_report() {
    let work = tempfile::Builder::new()
        .prefix("metastore-bench-compare-")
        .tempdir()
        .expect("temp dir");
    let out = work.path().join("results");
    let argv: Vec<String> = [
        "compare",
        "--targets",
        "memory",
        "--only",
        "put-1c,range-s-1000c,watch-latency",
        "--quick",
        "--seconds",
        "0.5",
        "--shards",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--bin-dir".to_string(),
        bin_dir().display().to_string(),
        "--work-dir".to_string(),
        work.path().join("nodes").display().to_string(),
        "--out".to_string(),
        out.display().to_string(),
        "--go-client".to_string(),
        go_client().display().to_string(),
    ])
    .collect();
    let (ok, stdout, stderr) = run_bench(&argv);
    assert!(ok, "compare failed:\n{stdout}\n{stderr}");
    let report = std::fs::read_to_string(out.join("REPORT.md")).expect("REPORT.md written");
    assert!(report.contains("put-1c"), "report lacks put-1c:\n{report}");
    assert!(
        report.contains("not durable"),
        "memory engine must be labelled not durable"
    );
    assert!(
        report.contains("bench/results/TUNING.md"),
        "the report must point to the tuning log"
    );
    for svg in ["throughput.svg", "latency.svg", "cpu.svg"] {
        let body = std::fs::read_to_string(out.join(svg)).unwrap_or_default();
        assert!(
            body.starts_with("<svg") && body.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }
    let json = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    assert!(json.contains("\"name\": \"put-1c\""), "{json}");
    // The gRPC floor (`bench/src/floor.rs`) ran put-1c and range-s-1000c
    // with the same client and checks, cleanly.
    assert!(
        report.contains("## The gRPC floor"),
        "report lacks the gRPC floor:\n{report}"
    );
    assert!(
        !report.contains("@ gRPC floor:"),
        "the gRPC floor's runs had problems:\n{report}"
    );
    assert!(json.contains("\"target\": \"grpc-floor\""), "{json}");
    // The Go client ran the put and range workloads, cleanly.
    assert!(
        report.contains("## Cross-check with Go's clientv3"),
        "report lacks the Go client's runs:\n{report}"
    );
    assert!(
        !report.contains("Problems in the Go client's runs"),
        "the Go client's runs had problems:\n{report}"
    );
    assert!(json.contains("\"client\": \"go-clientv3\""), "{json}");
}
