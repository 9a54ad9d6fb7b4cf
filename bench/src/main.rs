//! `metastore-bench`: etcd-style benchmark workloads against any etcd v3
//! endpoint (MetaStore's gateway or a real etcd), through the `etcd-client`
//! crate, so one run measures either with the same client.
//!
//! The command line follows etcd's `benchmark` tool: global options
//! (`--endpoints`, `--conns`, `--clients`, `--total`/`--duration`, key and
//! value sizes, `--rate`) and one workload subcommand. `compare` and
//! `engines` start the servers themselves and run a whole table of
//! workloads against them (see `compare.rs`).
//!
//! Every run reports throughput, latency percentiles (hdrhistogram) and,
//! when it knows the server processes (`--server-pids`, or the ones it
//! started), server CPU per operation from `/proc/<pid>/stat`: on a small
//! machine the client shares the cores with the server, so CPU per op is
//! as telling as throughput. Workloads also check what they observe
//! (counts, watch events exactly once and in order) and report violations;
//! the process exits non-zero when a run had errors or violations.

mod compare;
mod flame;
mod floor;
mod goclient;
mod json;
mod k8s;
mod kv;
mod lease;
mod nodes;
mod stats;
mod svg;
mod threads;
mod transport;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use etcd_client::Client;
use rand::Rng;

use crate::stats::RunResult;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "metastore-bench",
    version,
    about = "etcd v3 benchmark workloads against MetaStore or etcd"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Options shared by every workload (etcd `benchmark`'s global flags).
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Endpoints, comma-separated (HOST:PORT or http://HOST:PORT); the
    /// connections (--conns) are spread over them round robin.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// gRPC connections (clients are spread over them round-robin).
    #[arg(long, global = true, default_value_t = 1)]
    pub conns: usize,
    /// Concurrent clients (each runs one request at a time).
    #[arg(long, global = true, default_value_t = 1)]
    pub clients: usize,
    /// Total operations (default 10000 unless --duration is given).
    #[arg(long, global = true)]
    pub total: Option<u64>,
    /// Run for this long instead of a fixed total (e.g. 10s, 500ms, 2m).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Key size in bytes.
    #[arg(long, global = true, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, global = true, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys written/read.
    #[arg(long, global = true, default_value_t = 1)]
    pub key_space_size: u64,
    /// Use keys 0, 1, 2, ... (mod key-space-size) instead of random ones.
    #[arg(long, global = true)]
    pub sequential_keys: bool,
    /// Limit to this many operations per second overall (0 = unlimited).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub rate: f64,
    /// Prefix of every generated key.
    #[arg(long, global = true, default_value = "")]
    pub key_prefix: String,
    /// Print the result as one JSON object on stdout (progress stays on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// No live progress lines.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Server processes to measure CPU of: PID or LABEL=PID, comma-separated.
    #[arg(long, global = true, value_delimiter = ',')]
    pub server_pids: Vec<String>,
    /// Per-request timeout.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "30s")]
    pub op_timeout: Duration,
    /// Client threads (0 = one per core): each runs its share of the
    /// connections and the clients that use them (see `threads.rs`).
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    /// Connect through `etcd-client`'s own balanced channel instead of one
    /// direct HTTP/2 connection with coalesced writes (the client of
    /// reports made before the change; see `transport.rs`).
    #[arg(long, global = true)]
    pub balanced_channel: bool,
}

impl Common {
    /// Total ops: `--total`, else 10000 unless `--duration` bounds the run.
    pub fn total(&self) -> Option<u64> {
        match (self.total, self.duration) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => Some(10_000),
        }
    }

    /// The (label, pid) list of `--server-pids`.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.server_pids
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| match s.split_once('=') {
                Some((l, p)) => p.trim().parse().ok().map(|p| (l.to_string(), p)),
                None => s.trim().parse().ok().map(|p| (format!("pid{p}"), p)),
            })
            .collect()
    }

    /// The value written by every put.
    pub fn value(&self) -> Vec<u8> {
        random_printable(self.val_size)
    }

    pub fn keys(&self) -> KeyGen {
        KeyGen {
            prefix: self.key_prefix.clone().into_bytes(),
            size: self.key_size,
            space: self.key_space_size.max(1),
            sequential: self.sequential_keys,
        }
    }

    pub fn pacer(&self) -> std::sync::Arc<stats::Pacer> {
        stats::Pacer::new(self.total(), self.duration, self.rate)
    }

    /// A short description of the shared settings, for reports.
    pub fn describe(&self) -> String {
        let amount = match (self.total(), self.duration) {
            (Some(t), _) => format!("total={t}"),
            (None, Some(d)) => format!("duration={d:?}"),
            _ => String::new(),
        };
        format!(
            "conns={} clients={} {} key={}B val={}B keyspace={}{}{}",
            self.conns,
            self.clients,
            amount,
            self.key_size,
            self.val_size,
            self.key_space_size,
            if self.sequential_keys {
                " sequential"
            } else {
                ""
            },
            if self.rate > 0.0 {
                format!(" rate={}/s", self.rate)
            } else {
                String::new()
            }
        )
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum Cmd {
    /// Put keys.
    Put,
    /// Range (get) one key or a prefix.
    Range(kv::RangeArgs),
    /// Transactions of --txn-ops puts each (keys spread over shards).
    TxnPut(kv::TxnPutArgs),
    /// Delete keys (the key space is written first).
    Delete,
    /// Watch fan-out: streams × watchers on a key or prefix, fed by a put stream.
    Watch(watch::WatchArgs),
    /// Put→event latency at a fixed put rate (watch with latency-friendly defaults).
    WatchLatency(watch::WatchArgs),
    /// Lease keep-alive round trips (one lease and stream per client).
    LeaseKeepalive(lease::LeaseArgs),
    /// Lease expiry storm: many leases with keys expire at once while a put
    /// stream measures write latency.
    LeaseExpiry(lease::LeaseExpiryArgs),
    /// Kubernetes-like mix: OCC txn updates, paginated lists, prefix watches.
    MixedK8s(k8s::K8sArgs),
    /// Start a MetaStore node per engine (memory, rocksdb) and run put and
    /// watch against each, side by side.
    Engines(compare::CompareArgs),
    /// Run the ANCHORS workload table against etcd and MetaStore (both
    /// engines), alternately and repeatedly, and write a report.
    Compare(compare::CompareArgs),
    /// Render a CPU flamegraph (SVG + folded stacks) from `perf script`
    /// output (see `bench/flamegraph`).
    Flamegraph(flame::FlameArgs),
    /// Serve an etcd KV endpoint that does nothing behind gRPC (Put into a
    /// hash map, single-key Range from it): the floor `compare` measures
    /// the gRPC layer's own cost with (see `floor.rs`).
    GrpcFloor(floor::FloorArgs),
}

/// Generates keys: `prefix` + zero-padded hex index, `size` bytes in all
/// (longer if the key space needs more digits).
#[derive(Clone, Debug)]
pub struct KeyGen {
    pub prefix: Vec<u8>,
    pub size: usize,
    pub space: u64,
    pub sequential: bool,
}

impl KeyGen {
    /// The key of operation `i`.
    pub fn key(&self, i: u64) -> Vec<u8> {
        let idx = if self.sequential {
            i % self.space
        } else {
            rand::thread_rng().gen_range(0..self.space)
        };
        self.key_at(idx)
    }

    /// The key with index `idx` in the key space.
    pub fn key_at(&self, idx: u64) -> Vec<u8> {
        let width = self.size.saturating_sub(self.prefix.len()).max(1);
        let mut k = self.prefix.clone();
        k.extend_from_slice(format!("{idx:0width$x}").as_bytes());
        k
    }
}

/// `n` random printable bytes.
pub fn random_printable(n: usize) -> Vec<u8> {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())])
        .collect()
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 10s, 500ms, 2m)"))?;
    if v < 0.0 || !v.is_finite() {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Opens `n` separate gRPC connections, spread over the endpoints round
/// robin (see `transport.rs`).
pub async fn connect_pool(common: &Common, n: usize) -> Result<Vec<Client>, String> {
    if common.endpoints.is_empty() {
        return Err("no endpoints".into());
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        let endpoint = common.endpoints[i % common.endpoints.len()].clone();
        let balanced = common.balanced_channel;
        // Opened on its thread, so the connection's h2 task runs there.
        let client = threads::for_connection(i)
            .spawn(async move {
                if balanced {
                    transport::connect_balanced(&endpoint).await
                } else {
                    transport::connect(&endpoint).await
                }
            })
            .await
            .map_err(|e| format!("connect task: {e}"))??;
        out.push(client);
    }
    Ok(out)
}

/// Awaits `f` under the run's per-op timeout, flattening errors to strings.
pub async fn timed<T, E: std::fmt::Display>(
    common: &Common,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(common.op_timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {:?}", common.op_timeout)),
    }
}

/// Runs one workload subcommand in this process and returns its result.
pub async fn run_workload(common: &Common, cmd: &Cmd) -> Result<RunResult, String> {
    match cmd {
        Cmd::Put => kv::put(common).await,
        Cmd::Range(a) => kv::range(common, a).await,
        Cmd::TxnPut(a) => kv::txn_put(common, a).await,
        Cmd::Delete => kv::delete(common).await,
        Cmd::Watch(a) => watch::watch(common, a, false).await,
        Cmd::WatchLatency(a) => watch::watch(common, a, true).await,
        Cmd::LeaseKeepalive(a) => lease::keepalive(common, a).await,
        Cmd::LeaseExpiry(a) => lease::expiry(common, a).await,
        Cmd::MixedK8s(a) => k8s::mixed(common, a).await,
        Cmd::Engines(_) | Cmd::Compare(_) | Cmd::Flamegraph(_) | Cmd::GrpcFloor(_) => {
            Err("not a single workload".into())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Flamegraph(a) => return flame::main(a),
        Cmd::GrpcFloor(a) => return floor::main(a),
        _ => {}
    }
    // Orchestration and set-up; the clients run on `threads`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    threads::start(cli.common.threads);
    rt.block_on(async move {
        match &cli.cmd {
            Cmd::Engines(a) => compare::engines(&cli.common, a).await,
            Cmd::Compare(a) => compare::compare(&cli.common, a).await,
            cmd => match run_workload(&cli.common, cmd).await {
                Ok(r) => {
                    if cli.common.json {
                        println!("{}", r.to_json().to_string_compact());
                    } else {
                        print!("{}", r.to_table());
                    }
                    if r.is_clean() {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!(
                            "metastore-bench: run had {} errors and {} violations",
                            r.errors,
                            r.violations.len()
                        );
                        ExitCode::from(2)
                    }
                }
                Err(e) => {
                    eprintln!("metastore-bench: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn keys_have_the_requested_size() {
        let g = KeyGen {
            prefix: b"/k/".to_vec(),
            size: 8,
            space: 100,
            sequential: true,
        };
        assert_eq!(g.key(5), b"/k/00005".to_vec());
        assert_eq!(g.key(105), b"/k/00005".to_vec());
        let r = KeyGen {
            sequential: false,
            ..g
        };
        for i in 0..100 {
            assert_eq!(r.key(i).len(), 8);
        }
    }

    #[test]
    fn cli_parses_etcd_style() {
        let cli = Cli::try_parse_from([
            "metastore-bench",
            "--conns",
            "100",
            "--clients",
            "1000",
            "put",
            "--total",
            "5",
            "--val-size",
            "256",
        ])
        .unwrap();
        assert_eq!(cli.common.conns, 100);
        assert_eq!(cli.common.clients, 1000);
        assert_eq!(cli.common.total(), Some(5));
        assert_eq!(cli.common.val_size, 256);
        assert!(matches!(cli.cmd, Cmd::Put));
    }
}
