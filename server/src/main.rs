//! `metastore-server`: starts one shard per core and serves the internal
//! shard protocol on one port per shard.
//!
//! Startup is two-phase so no revision is ever handed out twice: every
//! shard first opens its engine and replays its raft log, reporting the
//! largest revision it holds; only when the oracle sits above all of them do
//! the shards bind their ports and start serving. The line
//! `metastore-server ready: shards=N addrs=A,B,...` on stdout says all
//! shards are serving.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Barrier};

use clap::Parser;
use glommio::{LocalExecutorBuilder, Placement};
use metastore_proto::router::{fnv1a64, ShardRouter};
use metastore_server::engine::{self, EngineKind, EngineOptions};
use metastore_server::oracle::RevisionOracle;
use metastore_server::raftlog::WalOptions;
use metastore_server::shard::{Shard, Topology};

#[derive(Parser, Debug)]
#[command(
    name = "metastore-server",
    about = "MetaStore shard server (one shard per core)"
)]
struct Args {
    /// Storage engine: memory (RAM only, nothing survives a restart) or
    /// rocksdb (durable: fsync before acknowledging).
    #[arg(long, default_value = "rocksdb")]
    engine: String,
    /// Directory for shard data (rocksdb) and the revision oracle's ceiling.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Number of shards (default: one per core). Fixed once data exists.
    #[arg(long)]
    shards: Option<u32>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Shard i listens on port + i; 0 picks a free port for every shard.
    #[arg(long, default_value_t = 23790)]
    port: u16,
    /// Name of this member (reported by MemberList).
    #[arg(long, default_value = "default")]
    name: String,
    /// Where a shard's raft fsync runs: `core` (inline on the shard's core:
    /// the least CPU per write and the best write throughput measured here)
    /// or `blocking-pool` (glommio's blocking thread: the shard's core keeps
    /// serving reads and watches during the fsync, at ~10% more CPU per
    /// write). See bench/results/REPORT.md.
    #[arg(long, default_value = "core")]
    fsync: String,
    /// Size each raft WAL segment file is allocated to (rocksdb), in bytes.
    /// A record larger than a segment gets one to itself.
    #[arg(long, default_value_t = metastore_server::wal::SEGMENT_BYTES)]
    wal_segment_bytes: u64,
    /// Memory for each shard's cache of recently read version records, in
    /// MiB (0 turns it off). Repeated lists read their records from it
    /// instead of the engine.
    #[arg(long, default_value_t = (metastore_server::mvcc::DEFAULT_RECORD_CACHE_BYTES >> 20) as u64)]
    record_cache_mib: u64,
    /// Memory for each shard's RocksDB block cache, in MiB (rocksdb). It
    /// fills only as blocks are read; lists whose versions the record
    /// cache does not hold read them through it.
    #[arg(long, default_value_t = (metastore_server::engine::rocksdb::DEFAULT_BLOCK_CACHE_BYTES >> 20) as u64)]
    block_cache_mib: u64,
}

fn main() {
    // Fail-stop: a panic on a shard's thread would end that thread alone,
    // leaving a process that serves with a shard gone (and the oracle's
    // lock poisoned for the others), which no supervisor restarts. After
    // the message, the whole process stops; a restart replays the raft log.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("metastore-server: a thread panicked; stopping the process");
        std::process::abort();
    }));
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("metastore-server: {e}");
        std::process::exit(1);
    }
}

/// `mib` MiB in bytes, or an error naming `flag` if that does not fit.
fn mib_to_bytes(mib: u64, flag: &str) -> Result<usize, String> {
    usize::try_from(mib)
        .ok()
        .and_then(|m| m.checked_mul(1 << 20))
        .ok_or(format!("{flag} is too large"))
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let kind: EngineKind = args.engine.parse()?;
    let fsync_on_core = match args.fsync.as_str() {
        "blocking-pool" => false,
        "core" => true,
        other => return Err(format!("--fsync must be blocking-pool or core, not {other}").into()),
    };
    let record_cache_bytes = mib_to_bytes(args.record_cache_mib, "--record-cache-mib")?;
    let engine_options = EngineOptions {
        block_cache_bytes: mib_to_bytes(args.block_cache_mib, "--block-cache-mib")?,
    };
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let core_count = cores.len().max(1);
    std::fs::create_dir_all(&args.data_dir)?;
    let shards = resolve_shard_count(&args, kind, core_count as u32)?;
    let router = ShardRouter::new(shards);
    let oracle = Arc::new(match kind {
        EngineKind::Memory => RevisionOracle::in_memory(),
        EngineKind::RocksDb => RevisionOracle::open(&args.data_dir.join("oracle"))?,
    });
    let member_id = fnv1a64(format!("member/{}", args.name).as_bytes()) | 1;
    let topology = Arc::new(Topology {
        shard_count: shards,
        addrs: Default::default(),
        cluster_id: fnv1a64(format!("cluster/{member_id}").as_bytes()) | 1,
        member_id,
        member_name: args.name.clone(),
        engine: kind.to_string(),
        history_id: metastore_server::history::history_id(kind, &args.data_dir)?,
    });

    let opened = Arc::new(Barrier::new(shards as usize + 1));
    let serving = Arc::new(Barrier::new(shards as usize + 1));
    let (report_tx, report_rx) = mpsc::channel::<Result<(u32, i64), String>>();
    let (addr_tx, addr_rx) = mpsc::channel::<Result<(u32, String), String>>();
    let mut handles = Vec::new();
    for id in 0..shards {
        let core = cores
            .get(id as usize % core_count)
            .map(|c| c.id)
            .unwrap_or(0);
        let dir = args.data_dir.join(format!("shard-{id}"));
        let wal = WalOptions {
            dir: args.data_dir.join(format!("shard-{id}.wal")),
            segment_bytes: args.wal_segment_bytes.max(4096),
        };
        let (oracle, topology) = (oracle.clone(), topology.clone());
        let (opened, serving) = (opened.clone(), serving.clone());
        let (report_tx, addr_tx) = (report_tx.clone(), addr_tx.clone());
        let bind = format!(
            "{}:{}",
            args.host,
            if args.port == 0 {
                0
            } else {
                args.port + id as u16
            }
        );
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(&format!("shard-{id}"))
            .io_memory(1 << 20)
            .spawn(move || async move {
                let opened_shard = engine::open_with(kind, &dir, engine_options)
                    .map_err(|e| e.to_string())
                    .and_then(|engine| {
                        Shard::open(id, router, engine, &wal, oracle, topology)
                            .map_err(|e| e.to_string())
                    });
                let shard = match opened_shard {
                    Ok((shard, max_rev)) => {
                        shard.set_fsync_on_core(fsync_on_core);
                        shard.set_record_cache_bytes(record_cache_bytes);
                        let _ = report_tx.send(Ok((id, max_rev)));
                        shard
                    }
                    Err(e) => {
                        let _ = report_tx.send(Err(format!("shard {id}: {e}")));
                        return;
                    }
                };
                opened.wait();
                if let Err(e) = shard.start().await {
                    let _ = addr_tx.send(Err(format!("shard {id}: start: {e}")));
                    return;
                }
                let listener = match glommio::net::TcpListener::bind(&bind) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(format!("shard {id}: bind {bind}: {e}")));
                        return;
                    }
                };
                let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or(bind);
                let _ = addr_tx.send(Ok((id, addr)));
                serving.wait();
                glommio::spawn_local(shard.clone().run_raft()).detach();
                metastore_server::net::serve(shard, listener).await;
            })?;
        handles.push(handle);
    }
    drop(report_tx);
    drop(addr_tx);
    for _ in 0..shards {
        let (_, max_rev) = report_rx.recv()??;
        oracle.observe(max_rev);
    }
    opened.wait();
    let mut addrs = vec![String::new(); shards as usize];
    for _ in 0..shards {
        let (id, addr) = addr_rx.recv()??;
        addrs[id as usize] = addr;
    }
    let _ = topology.addrs.set(addrs.clone());
    serving.wait();
    // Handlers first: a SIGTERM sent as soon as the ready line is read
    // must stop the server cleanly, not by the default action.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    println!(
        "metastore-server ready: shards={shards} engine={kind} addrs={}",
        addrs.join(",")
    );
    std::io::stdout().flush()?;

    if let Some(sig) = signals.forever().next() {
        eprintln!("metastore-server: signal {sig}, stopping");
    }
    // Everything acknowledged is already in a synced raft log; nothing to
    // flush. Exit without unwinding the executors.
    std::process::exit(0);
}

/// The shard count: given, or stored with existing data, or one per core.
/// A data directory keeps its shard count forever (keys are placed by it).
fn resolve_shard_count(
    args: &Args,
    kind: EngineKind,
    cores: u32,
) -> Result<u32, Box<dyn std::error::Error>> {
    let meta = args.data_dir.join("shards");
    let stored: Option<u32> = match kind {
        EngineKind::RocksDb => stored_shard_count(&args.data_dir)?,
        EngineKind::Memory => None,
    };
    let shards = match (stored, args.shards) {
        (Some(s), Some(want)) if s != want => {
            return Err(format!(
                "{} holds data for {s} shards; --shards {want} would misplace keys",
                args.data_dir.display()
            )
            .into())
        }
        (Some(s), _) => s,
        (None, Some(want)) => want,
        (None, None) => cores,
    };
    if shards == 0 {
        return Err("--shards must be at least 1".into());
    }
    if kind == EngineKind::RocksDb && stored.is_none() {
        metastore_server::durable_file::replace(&meta, format!("{shards}\n").as_bytes())?;
    }
    Ok(shards)
}

/// The shard count a data directory was made with: its `shards` file, or
/// (if that is missing or empty, as an older version's crash while
/// rewriting it could leave it) the number of shard directories, if any.
/// A file that is not a count is refused rather than guessed past.
fn stored_shard_count(
    data_dir: &std::path::Path,
) -> Result<Option<u32>, Box<dyn std::error::Error>> {
    let meta = data_dir.join("shards");
    let text = match std::fs::read_to_string(&meta) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e.into()),
    };
    if !text.trim().is_empty() {
        return match text.trim().parse() {
            Ok(n) => Ok(Some(n)),
            Err(e) => Err(format!("{}: not a shard count ({e})", meta.display()).into()),
        };
    }
    let dirs = (0..)
        .take_while(|id| data_dir.join(format!("shard-{id}")).is_dir())
        .count() as u32;
    Ok((dirs > 0).then_some(dirs))
}
