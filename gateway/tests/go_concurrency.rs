//! etcd's own Go recipes against MetaStore: `go.etcd.io/etcd/clientv3/concurrency`
//! (Session, Mutex, Election, STM) from etcd 3.4, unchanged, in the Go
//! program `tests/goconcurrency` (built offline by its `build.sh` against
//! Debian's golang-etcd-server-dev), run against a node on both engines.
//!
//! Why: these recipes are what applications actually build on, and they
//! lean on corners of the etcd API that a test written against our own
//! reading of the API would not think to check. The STM pins its snapshot
//! to `Responses[0].GetResponseRange().Header.Revision` of a Txn (and uses
//! the op headers of a failed commit's Else branch on retry); when
//! MetaStore's txn op responses carried no header, etcd's STM panicked on
//! its first read (fixed in 1957bbf, "txn: every op response carries a
//! header"). Mutex and Election rely on a Txn comparing a key's create
//! revision, a prefix Get sorted by create revision with a limit and a
//! max-create-revision filter (merged over every shard), watches started at
//! a past revision, and lease revocation deleting keys. The program checks:
//!
//! - `txn-op-headers`: every op response of a Txn (one shard; two shards
//!   read-only; two shards writing, both branches) has a header whose
//!   revision is etcd's, and a read at that revision works;
//! - `mutex`: 6 sessions × 15 lock/unlock rounds, a counter incremented by
//!   plain Get + Put under the lock ends at 90, never two holders;
//!   `mutex-handover`: closing the holder's session lets a waiter in;
//! - `election`: 3 candidates lead in turn; `Leader`, `Observe` and
//!   `Proclaim` agree with the winner; `Resign` hands over;
//! - `stm-isolation`: what SerializableSnapshot, Serializable and
//!   RepeatableReads each promise, forced deterministically with writes
//!   from outside mid-transaction; `stm-transfers`: 8 goroutines × 25
//!   transfers over 10 accounts per level, the total kept, none negative.
//!
//! The program prints `spread <group> <keys>` for the keys that must live
//! on different shards for a scenario to mean what it says; this test
//! checks them with the real router.
//!
//! Needs golang-go and golang-etcd-server-dev installed: fails, never
//! skips, when they are missing.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::bin_dir;
use metastore_proto::router::ShardRouter;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Wall-clock limit of one run of the program (a run takes seconds; the
/// program also bounds each scenario itself, and fails with a message).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// The program's scenarios, each of which must report an `ok` line.
const SCENARIOS: [&str; 6] = [
    "txn-op-headers",
    "mutex",
    "mutex-handover",
    "election",
    "stm-isolation",
    "stm-transfers",
];

/// The key groups the program must announce as spread over the shards.
const SPREAD_GROUPS: [&str; 4] = [
    "txn-op-headers",
    "stm-isolation-reads",
    "stm-isolation-writes",
    "stm-accounts",
];

/// `tests/goconcurrency`, built by its `build.sh` once per test process.
fn go_program() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goconcurrency/build.sh");
            let out = bin_dir().join("metastore-goconcurrency");
            let built = Command::new(&script)
                .arg(&out)
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
            assert!(
                built.status.success(),
                "{} failed ({}; needs golang-go and golang-etcd-server-dev):\n{}{}",
                script.display(),
                built.status,
                String::from_utf8_lossy(&built.stdout),
                String::from_utf8_lossy(&built.stderr)
            );
            out
        })
        .clone()
}

/// Reads a child's pipe to the end in a task.
fn collect(pipe: impl AsyncRead + Unpin + Send + 'static) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut pipe = pipe;
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    })
}

both_engines!(
    async fn etcd_go_concurrency_recipes(node: TestNode) {
        let engine = node.engine().flag();
        let program = tokio::task::spawn_blocking(go_program)
            .await
            .expect("build task");

        let started = Instant::now();
        let mut child = tokio::process::Command::new(&program)
            .arg(node.client_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        let status = match tokio::time::timeout(RUN_TIMEOUT, child.wait()).await {
            Ok(status) => Some(status.expect("wait for the Go program")),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        };
        let elapsed = started.elapsed();
        let out = stdout.await.expect("stdout reader");
        let err = stderr.await.expect("stderr reader");
        let Some(status) = status else {
            panic!(
                "[{engine}] the Go concurrency program did not finish within {RUN_TIMEOUT:?}\n\
             --- stdout ---\n{out}\n--- stderr ---\n{err}"
            );
        };
        assert!(
            status.success(),
            "[{engine}] the Go concurrency program failed ({status}) after {:.1} s\n\
         --- stdout ---\n{out}\n--- stderr ---\n{err}",
            elapsed.as_secs_f64()
        );
        eprintln!(
            "[{engine}] etcd's Go concurrency recipes passed in {:.1} s:\n{}",
            elapsed.as_secs_f64(),
            out.trim_end()
        );

        for scenario in SCENARIOS {
            let prefix = format!("ok {scenario}: ");
            assert!(
                out.lines().any(|l| l.starts_with(&prefix)),
                "[{engine}] no {prefix:?} line in the program's output:\n{out}"
            );
        }

        let router = ShardRouter::new(common::SHARDS as u32);
        let mut groups = BTreeSet::new();
        for line in out.lines() {
            let Some(rest) = line.strip_prefix("spread ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let group = words.next().expect("spread line names a group");
            let shards: BTreeSet<u32> = words.map(|k| router.shard_of(k.as_bytes())).collect();
            assert_eq!(
                shards.len(),
                common::SHARDS,
                "[{engine}] keys of {group} should span every shard: {line}"
            );
            groups.insert(group.to_string());
        }
        for group in SPREAD_GROUPS {
            assert!(
                groups.contains(group),
                "[{engine}] no spread line for {group}:\n{out}"
            );
        }
    }
);
