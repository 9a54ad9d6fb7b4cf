//! Servers the benchmark starts itself: a MetaStore node (shard server +
//! gateway, on ephemeral ports), a single-node etcd, or the gRPC floor
//! (`floor.rs`). Each runs in its own directory under the work dir (logs
//! included), and is stopped (SIGTERM, then SIGKILL) and its directory
//! removed when dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server under test.
pub struct Node {
    pub label: String,
    /// Client endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
    /// (label, pid) of every server process (for CPU and RSS).
    pub pids: Vec<(String, u32)>,
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Node {
    /// A node with no process yet, in a fresh directory of its own.
    fn new(work_dir: &Path, label: String) -> Result<Node, String> {
        let dir = fresh_dir(work_dir, &label)?;
        Ok(Node {
            label,
            endpoint: String::new(),
            pids: Vec::new(),
            children: Vec::new(),
            dir,
        })
    }

    /// Starts `metastore-server` (engine, `shards`, `--port 0`) and a
    /// `metastore-gateway` on `127.0.0.1:0` in front of it.
    pub async fn metastore(
        bin_dir: &Path,
        engine: &str,
        shards: usize,
        work_dir: &Path,
    ) -> Result<Node, String> {
        let mut node = Node::new(work_dir, format!("metastore-{engine}"))?;
        let data = node.dir.join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("mkdir {}: {e}", data.display()))?;
        let server_bin = bin_dir.join("metastore-server");
        let mut cmd = Command::new(&server_bin);
        cmd.arg("--engine")
            .arg(engine)
            .arg("--data-dir")
            .arg(&data)
            .arg("--shards")
            .arg(shards.to_string())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg("0");
        let line = node.spawn(cmd, "server", Some("metastore-server ready:"))?;
        let addrs: Vec<String> = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addrs="))
            .map(|l| l.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let first = addrs
            .first()
            .ok_or_else(|| format!("no addrs= in server ready line {line:?}"))?
            .clone();
        let mut cmd = Command::new(bin_dir.join("metastore-gateway"));
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--server")
            .arg(&first);
        let line = node.spawn(cmd, "gateway", Some("metastore-gateway ready on "))?;
        node.endpoint = line
            .trim()
            .strip_prefix("metastore-gateway ready on ")
            .unwrap_or("")
            .trim()
            .to_string();
        wait_serving(&node.endpoint).await?;
        Ok(node)
    }

    /// Starts a single-node etcd with its data dir on the local disk,
    /// clients on `127.0.0.1:port`, peers on `port + 1`.
    pub async fn etcd(etcd_bin: &str, port: u16, work_dir: &Path) -> Result<Node, String> {
        let mut node = Node::new(work_dir, "etcd".into())?;
        node.endpoint = format!("127.0.0.1:{port}");
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{}", port + 1);
        let mut cmd = Command::new(etcd_bin);
        cmd.arg("--name")
            .arg("bench")
            .arg("--data-dir")
            .arg(node.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("bench={peer}"))
            .arg("--quota-backend-bytes")
            .arg((8u64 << 30).to_string());
        node.spawn(cmd, "etcd", None)?;
        wait_serving(&node.endpoint).await?;
        Ok(node)
    }

    /// Starts this binary's `grpc-floor` server (see `floor.rs`) on
    /// `127.0.0.1:0`.
    pub async fn grpc_floor(work_dir: &Path) -> Result<Node, String> {
        let mut node = Node::new(work_dir, "grpc-floor".into())?;
        let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("grpc-floor").arg("--listen").arg("127.0.0.1:0");
        let line = node.spawn(cmd, "floor", Some(crate::floor::READY))?;
        node.endpoint = line
            .trim()
            .strip_prefix(crate::floor::READY)
            .unwrap_or("")
            .trim()
            .to_string();
        wait_serving(&node.endpoint).await?;
        Ok(node)
    }

    /// Spawns `cmd` (stderr and stdout to log files in the node's dir);
    /// with `ready`, waits for the stdout line starting with it.
    fn spawn(
        &mut self,
        mut cmd: Command,
        what: &str,
        ready: Option<&str>,
    ) -> Result<String, String> {
        let err_log = File::create(self.dir.join(format!("{what}.stderr.log")))
            .map_err(|e| format!("create log: {e}"))?;
        let mut out_log = File::create(self.dir.join(format!("{what}.stdout.log")))
            .map_err(|e| format!("create log: {e}"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_log));
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {what} ({cmd:?}): {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        self.pids.push((what.to_string(), child.id()));
        self.children.push((what.to_string(), child));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let prefix = ready.map(str::to_string);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out_log, "{line}");
                if let Some(p) = &prefix {
                    if line.starts_with(p.as_str()) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(line);
                        }
                    }
                }
            }
        });
        let Some(_) = ready else {
            return Ok(String::new());
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => Ok(line),
            Err(_) => Err(format!(
                "{what} printed no ready line within {READY_TIMEOUT:?}; stderr tail:\n{}",
                tail(&self.dir.join(format!("{what}.stderr.log")), 4000)
            )),
        }
    }

    /// Stops every process (last started first): SIGTERM, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        while let Some((_, mut child)) = self.children.pop() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Whether every process of the node is still running.
    pub fn alive(&mut self) -> bool {
        self.children
            .iter_mut()
            .all(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// The tail of the node's logs (for failure reports).
    pub fn log_tail(&self) -> String {
        let mut s = format!("=== {} ===\n", self.label);
        for (what, _) in &self.pids {
            s.push_str(&format!(
                "--- {what} stderr ---\n{}\n",
                tail(&self.dir.join(format!("{what}.stderr.log")), 2000)
            ));
        }
        s
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fresh_dir(work_dir: &Path, label: &str) -> Result<PathBuf, String> {
    let dir = work_dir.join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    Ok(dir)
}

fn tail(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Waits until a linearizable read through `endpoint` succeeds.
async fn wait_serving(endpoint: &str) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        match Client::connect([format!("http://{endpoint}")], Some(opts)).await {
            Ok(mut c) => {
                match tokio::time::timeout(Duration::from_secs(5), c.get("/bench/ready", None))
                    .await
                {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "read timed out".into(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{endpoint} did not serve within {READY_TIMEOUT:?}: {last}"
    ))
}

/// fdatasync latency in `dir` over `n` 4 KiB writes, two ways (ms: p50,
/// p99 each): appending to a growing file (the size changes, so the file
/// system journal commits too — how a RocksDB WAL writes) and overwriting a
/// preallocated, already-synced file (no size change — how etcd's WAL and
/// MetaStore's raft WAL, whose segments are allocated up front, write).
pub fn fsync_probe(dir: &Path, n: usize) -> Option<FsyncProbe> {
    std::fs::create_dir_all(dir).ok()?;
    let buf = vec![0x5au8; 4096];
    let n = n.max(2);
    let measure = |f: &mut File| -> Option<(f64, f64)> {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            f.write_all(&buf).ok()?;
            let t = Instant::now();
            f.sync_data().ok()?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        Some((lat[n / 2], lat[(n * 99 / 100).min(n - 1)]))
    };
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut f = File::create(&path).ok()?;
    let append = measure(&mut f);
    drop(f);
    // Preallocate by writing zeros and syncing, then overwrite from the start.
    let mut f = File::create(&path).ok()?;
    f.write_all(&vec![0u8; 4096 * n]).ok()?;
    f.sync_all().ok()?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).ok()?;
    let overwrite = measure(&mut f);
    drop(f);
    let _ = std::fs::remove_file(&path);
    Some(FsyncProbe {
        append: append?,
        overwrite: overwrite?,
    })
}

/// Result of [`fsync_probe`]: (p50, p99) in ms.
#[derive(Clone, Copy, Debug)]
pub struct FsyncProbe {
    pub append: (f64, f64),
    pub overwrite: (f64, f64),
}
