//! `metastore-gateway`: serves the etcd v3 API for a metastore-server.
//!
//! Logs go to stderr (`RUST_LOG`, default `info`); stdout carries exactly
//! one line, `metastore-gateway ready on <addr>`, once the API is served.
//!
//! `--threads` sets the tokio runtime's threads, by default half the cores
//! (the shard server runs one shard per core beside it). With one thread
//! the runtime is tokio's single-threaded one: a connection's requests,
//! responses and watch events never hop between threads, and responses
//! that complete together leave in one write. On 2 cores that costs about
//! a third less CPU per request than tokio's multi-threaded runtime, at
//! the price of about 0.2 ms more put→event latency for watchers, whose
//! events no longer go out in parallel with the put's answer
//! (`bench/results/TUNING.md`).

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use metastore_gateway::client::ClientConfig;
use metastore_gateway::server::DEFAULT_MAX_REQUEST_BYTES;
use metastore_gateway::watch::{parse_duration, WatchConfig};
use metastore_gateway::{default_threads, ready_line, runtime, Config, Gateway};

/// How long a graceful shutdown may take before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "metastore-gateway",
    version,
    about = "etcd v3 API gateway for MetaStore"
)]
struct Args {
    /// Address to serve the etcd gRPC API on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: String,
    /// Any shard address of the metastore-server (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:23790")]
    server: String,
    /// Client URL advertised by MemberList [default: http://<bound listen addr>].
    #[arg(long)]
    advertise_client_url: Option<String>,
    /// Largest request accepted, in bytes (etcd's --max-request-bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Seconds to keep trying to reach the server at start-up.
    #[arg(long, default_value_t = 30)]
    connect_wait_secs: u64,
    /// Per-request timeout towards a shard, in milliseconds (a request
    /// fails after 1 to 1.25 times this: timeouts are swept, not timed
    /// one by one).
    #[arg(long, default_value_t = 10_000)]
    shard_timeout_ms: u64,
    /// Interval of progress notifications to watches created with
    /// progress_notify (etcd's --experimental-watch-progress-notify-interval),
    /// e.g. 10m, 30s, 500ms.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    watch_progress_notify_interval: Duration,
    /// Watches one Watch stream may hold; more creates are refused.
    #[arg(long, default_value_t = 10_000)]
    watch_max_watchers_per_stream: usize,
    /// Bytes of events queued for one watcher whose client does not read
    /// before it leaves its shared feed and catches up on its own (at most
    /// 4 GiB).
    #[arg(long, default_value_t = 8 << 20)]
    watch_max_pending_bytes: u32,
    /// Runtime threads; 1 runs the gateway on a single-threaded runtime
    /// [default: half the cores, at least 1].
    #[arg(long)]
    threads: Option<usize>,
}

/// SIGINT and SIGTERM, listened for from the moment this is called (so a
/// signal that arrives right after the ready line still stops the gateway
/// gracefully, not by the default action); the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt());
        let term = signal(SignalKind::terminate());
        async move {
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(int) => {},
                _ = wait(term) => {},
            }
            tracing::info!("shutting down");
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let threads = args.threads.unwrap_or_else(default_threads).max(1);
    match runtime(threads) {
        Ok(rt) => rt.block_on(serve(args, threads)),
        Err(e) => {
            eprintln!("metastore-gateway: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args, threads: usize) -> std::process::ExitCode {
    let config = Config {
        listen: args.listen,
        server: args.server,
        advertise_client_url: args.advertise_client_url,
        max_request_bytes: args.max_request_bytes,
        connect_wait: Duration::from_secs(args.connect_wait_secs),
        client: ClientConfig {
            request_timeout: Duration::from_millis(args.shard_timeout_ms),
            ..ClientConfig::default()
        },
        watch: WatchConfig {
            progress_notify_interval: args.watch_progress_notify_interval,
            max_watchers_per_stream: args.watch_max_watchers_per_stream,
            max_pending_bytes: args.watch_max_pending_bytes,
            ..WatchConfig::default()
        },
    };
    let gateway = match Gateway::start(config).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("metastore-gateway: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let signalled = shutdown_signal();
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", ready_line(gateway.local_addr()));
        let _ = out.flush();
    }
    tracing::info!(addr = %gateway.local_addr(), url = %gateway.client_url(), threads, "serving the etcd API");
    // Graceful shutdown lets in-flight calls finish, but long-lived streams
    // could hold it forever: after the signal, give it a grace period.
    let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = {
        let stopping = stopping.clone();
        async move {
            signalled.await;
            stopping.notify_one();
        }
    };
    tokio::select! {
        () = gateway.serve(signal) => {}
        () = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting"),
    }
    std::process::ExitCode::SUCCESS
}
