//! End-to-end test harness: runs the real `metastore-server` and
//! `metastore-gateway` binaries as child processes over a temporary data
//! directory and hands tests an etcd endpoint.
//!
//! Every behavioural test is written once with [`both_engines!`] and runs on
//! both storage engines (`<name>::memory` and `<name>::rocksdb`), each under
//! a hard timeout. Waiting is done on events (a child's ready line, a child's
//! exit), never with sleeps.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::oneshot;

/// How long a child may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Hard limit for one test body (the node is already up when it starts).
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Shards per test node: two, so that keys really are spread over shards.
pub const SHARDS: usize = 2;

/// Storage engine of the shard server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Memory,
    RocksDb,
}

impl Engine {
    pub fn flag(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::RocksDb => "rocksdb",
        }
    }

    /// Whether acknowledged data survives a restart of the processes.
    pub fn is_durable(self) -> bool {
        matches!(self, Engine::RocksDb)
    }
}

/// Generates one `#[tokio::test]` per engine for an async test body that
/// takes a freshly started [`TestNode`]:
///
/// ```text
/// both_engines!(async fn put_then_get(node: TestNode) { ... });
/// ```
///
/// expands to a module `put_then_get` with tests `memory` and `rocksdb`
/// (so `cargo test put_then_get::memory` runs one of them). Each test is
/// bounded by [`TEST_TIMEOUT`]; on failure or timeout the children's logs
/// are printed.
macro_rules! both_engines {
    ($(#[$meta:meta])* async fn $name:ident(mut $node:ident : TestNode) $body:block) => {
        both_engines!(@emit $name, [$(#[$meta])*], (mut $node), $body);
    };
    ($(#[$meta:meta])* async fn $name:ident($node:ident : TestNode) $body:block) => {
        both_engines!(@emit $name, [$(#[$meta])*], ($node), $body);
    };
    (@emit $name:ident, [$($meta:tt)*], ($($param:tt)*), $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $($meta)*
            pub(super) async fn body($($param)*: crate::common::TestNode) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                crate::common::run_test(crate::common::Engine::Memory, body).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rocksdb() {
                crate::common::run_test(crate::common::Engine::RocksDb, body).await;
            }
        }
    };
}

/// Runs the named `both_engines!` tests again, on both engines, against a
/// gateway on tokio's multi-threaded runtime (`--threads 2`); the suites
/// otherwise use the gateway's default, single-threaded on 2 cores.
#[allow(unused_macros)]
macro_rules! on_a_multi_threaded_gateway {
    ($($test:ident),+ $(,)?) => {
        mod on_a_multi_threaded_gateway {
            $(
                mod $test {
                    use crate::common::{run_test_with_gateway_threads, Engine};

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn memory() {
                        let body = super::super::$test::body;
                        run_test_with_gateway_threads(Engine::Memory, Some(2), body).await;
                    }

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn rocksdb() {
                        let body = super::super::$test::body;
                        run_test_with_gateway_threads(Engine::RocksDb, Some(2), body).await;
                    }
                }
            )+
        }
    };
}

/// Starts a node on `engine`, runs `body` on it under [`TEST_TIMEOUT`], and
/// prints the children's logs if the body times out (a panicking body
/// prints them from `TestNode::drop`).
pub async fn run_test<F, Fut>(engine: Engine, body: F)
where
    F: FnOnce(TestNode) -> Fut,
    Fut: Future<Output = ()>,
{
    run_test_with_gateway_threads(engine, None, body).await
}

/// [`run_test`] with the gateway started with `--threads` (`None`: its
/// default).
pub async fn run_test_with_gateway_threads<F, Fut>(
    engine: Engine,
    gateway_threads: Option<usize>,
    body: F,
) where
    F: FnOnce(TestNode) -> Fut,
    Fut: Future<Output = ()>,
{
    let node = TestNode::start_with_gateway_threads(engine, gateway_threads).await;
    let logs = node.logs();
    if tokio::time::timeout(TEST_TIMEOUT, body(node))
        .await
        .is_err()
    {
        logs.dump();
        panic!(
            "test timed out after {:?} on engine {}",
            TEST_TIMEOUT,
            engine.flag()
        );
    }
}

/// The log files of a node's children (they live in the node's temp dir,
/// which this handle keeps alive).
#[derive(Clone)]
pub struct Logs {
    dir: Arc<TempDir>,
}

impl Logs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The tail of one log file (last `max` bytes).
    pub fn tail(&self, name: &str, max: u64) -> String {
        read_tail(&self.path(name), max)
    }

    /// Prints the tail of every child's stderr and stdout to the test's
    /// stderr.
    pub fn dump(&self) {
        for name in [
            "server.stderr.log",
            "server.stdout.log",
            "gateway.stderr.log",
            "gateway.stdout.log",
        ] {
            eprintln!(
                "===== {name} (tail) =====\n{}\n===== end of {name} =====",
                self.tail(name, 16 * 1024)
            );
        }
    }
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("<no file {}>", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        let _ = f.seek(SeekFrom::Start(len - max));
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// One MetaStore node: a shard server (`--shards 2`, every shard on an
/// ephemeral port) and a gateway in front of it, over a private temporary
/// data directory.
pub struct TestNode {
    engine: Engine,
    dir: Arc<TempDir>,
    server: Option<Child>,
    gateway: Option<Child>,
    server_addrs: Vec<String>,
    endpoint: String,
    generation: u32,
    /// 0: every shard on an ephemeral port; else shard i on this + i (see
    /// [`TestNode::pin_server_ports`]).
    server_port: u16,
    /// The gateway's `--threads`, if not its default.
    gateway_threads: Option<usize>,
    /// Extra arguments for the server (see [`TestNode::set_server_args`]).
    server_args: Vec<String>,
}

impl TestNode {
    /// Starts server and gateway and waits for both ready lines.
    pub async fn start(engine: Engine) -> TestNode {
        Self::start_with_gateway_threads(engine, None).await
    }

    /// [`TestNode::start`] with the gateway's `--threads` set (`None`: its
    /// default, one thread on a 2-core machine).
    pub async fn start_with_gateway_threads(
        engine: Engine,
        gateway_threads: Option<usize>,
    ) -> TestNode {
        let dir = Arc::new(
            tempfile::Builder::new()
                .prefix("metastore-test-")
                .tempdir()
                .expect("create temp dir"),
        );
        std::fs::create_dir_all(dir.path().join("data")).expect("create data dir");
        let mut node = TestNode {
            engine,
            dir,
            server: None,
            gateway: None,
            server_addrs: Vec::new(),
            endpoint: String::new(),
            generation: 0,
            server_port: 0,
            gateway_threads,
            server_args: Vec::new(),
        };
        node.spawn_all().await;
        node
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The gateway's client address, `127.0.0.1:PORT` (changes on restart).
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// The gateway's client URL, `http://127.0.0.1:PORT`, as etcdctl and
    /// MemberList spell it.
    pub fn client_url(&self) -> String {
        format!("http://{}", self.endpoint)
    }

    /// Addresses of the shard server's shards, from its ready line.
    pub fn server_addrs(&self) -> &[String] {
        &self.server_addrs
    }

    /// The data directory passed to the server.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn logs(&self) -> Logs {
        Logs {
            dir: self.dir.clone(),
        }
    }

    /// A new etcd client connected to the gateway.
    pub async fn client(&self) -> etcd_client::Client {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(60));
        match etcd_client::Client::connect([self.endpoint()], Some(opts)).await {
            Ok(c) => c,
            Err(e) => {
                self.logs().dump();
                panic!("connect to gateway at {}: {e}", self.endpoint);
            }
        }
    }

    /// Stops both processes with SIGTERM (gateway first), asserts that each
    /// exits cleanly, and starts them again over the same data directory.
    /// Ports are ephemeral, so the endpoint changes: make new clients.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn_all().await;
    }

    /// Kills the server with SIGKILL (a crash: nothing gets flushed or
    /// closed), then the gateway, and starts both again over the same data
    /// directory. Ports change: make new clients.
    pub async fn crash_restart(&mut self) {
        for child in [self.server.take(), self.gateway.take()]
            .into_iter()
            .flatten()
        {
            kill(child);
        }
        self.spawn_all().await;
    }

    /// Restarts the node (SIGTERM, clean exit asserted) with `args` added
    /// to the server's command line from now on. Ports change: make new
    /// clients.
    pub async fn set_server_args(&mut self, args: &[&str]) {
        self.stop().await;
        self.server_args = args.iter().map(|a| a.to_string()).collect();
        self.spawn_all().await;
    }

    /// Restarts the node with its shards on fixed, consecutive ports, so
    /// that [`TestNode::crash_restart_server`] can bring the server back
    /// where the running gateway expects it.
    pub async fn pin_server_ports(&mut self) {
        self.stop().await;
        self.server_port = free_consecutive_ports(SHARDS);
        self.spawn_all().await;
    }

    /// Kills the server alone with SIGKILL and starts it again on the same
    /// ports and data directory; the gateway keeps running (and keeps its
    /// endpoint). Needs [`TestNode::pin_server_ports`] first.
    pub async fn crash_restart_server(&mut self) {
        assert_ne!(self.server_port, 0, "pin_server_ports first");
        kill(self.server.take().expect("server running"));
        self.generation += 1;
        let addrs = std::mem::take(&mut self.server_addrs);
        self.spawn_server(self.generation).await;
        assert_eq!(self.server_addrs, addrs, "the server came back elsewhere");
    }

    /// Stops both processes with SIGTERM and asserts a clean exit.
    pub async fn stop(&mut self) {
        if let Some(gw) = self.gateway.take() {
            let status = self.terminate(gw, "gateway").await;
            self.assert_clean_exit("gateway", status);
        }
        if let Some(srv) = self.server.take() {
            let status = self.terminate(srv, "server").await;
            self.assert_clean_exit("server", status);
        }
    }

    fn assert_clean_exit(&self, what: &str, status: ExitStatus) {
        if !status.success() {
            self.logs().dump();
            panic!("{what} did not exit cleanly on SIGTERM: {status}");
        }
    }

    async fn terminate(&self, child: Child, what: &str) -> ExitStatus {
        let pid = child.id();
        send_signal(pid, "TERM");
        let mut child = child;
        let waiter = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        });
        match tokio::time::timeout(STOP_TIMEOUT, waiter).await {
            Ok(joined) => {
                let (_child, status) = joined.expect("wait task");
                status.unwrap_or_else(|e| panic!("wait for {what}: {e}"))
            }
            Err(_) => {
                send_signal(pid, "KILL");
                self.logs().dump();
                panic!("{what} (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
        }
    }

    async fn spawn_all(&mut self) {
        self.generation += 1;
        let gen = self.generation;
        self.spawn_server(gen).await;

        // Gateway in front of it.
        let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_metastore-gateway"));
        let mut cmd = Command::new(&gateway_bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--server")
            .arg(&self.server_addrs[0]);
        if let Some(threads) = self.gateway_threads {
            cmd.arg("--threads").arg(threads.to_string());
        }
        let (gateway, line) = self
            .spawn_until_ready(cmd, "gateway", gen, "metastore-gateway ready on ")
            .await;
        self.gateway = Some(gateway);
        let endpoint = line
            .trim()
            .strip_prefix("metastore-gateway ready on ")
            .unwrap_or_else(|| panic!("bad gateway ready line {line:?}"))
            .trim()
            .to_string();
        assert!(
            endpoint.parse::<std::net::SocketAddr>().is_ok(),
            "gateway ready line should end with HOST:PORT: {line:?}"
        );
        self.endpoint = endpoint;
    }

    /// Starts the shard server and waits for its ready line.
    async fn spawn_server(&mut self, gen: u32) {
        let bin_dir = bin_dir();

        // Shard server.
        let server_bin = bin_dir.join("metastore-server");
        assert!(
            server_bin.exists(),
            "{} not found: build every binary first (cargo build --workspace --bins)",
            server_bin.display()
        );
        let mut cmd = Command::new(&server_bin);
        cmd.arg("--engine")
            .arg(self.engine.flag())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--shards")
            .arg(SHARDS.to_string())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.server_port.to_string())
            .args(&self.server_args);
        let (server, line) = self
            .spawn_until_ready(cmd, "server", gen, "metastore-server ready:")
            .await;
        self.server = Some(server);
        let addrs = parse_server_ready(&line);
        assert_eq!(
            addrs.len(),
            SHARDS,
            "server ready line should list {SHARDS} shard addresses: {line:?}"
        );
        self.server_addrs = addrs;
    }

    /// Spawns `cmd` with stderr appended to `<what>.stderr.log` and stdout
    /// copied to `<what>.stdout.log`, and waits for the first stdout line
    /// starting with `ready_prefix`.
    async fn spawn_until_ready(
        &mut self,
        mut cmd: Command,
        what: &'static str,
        gen: u32,
        ready_prefix: &'static str,
    ) -> (Child, String) {
        let logs = self.logs();
        let stderr_path = logs.path(&format!("{what}.stderr.log"));
        let stdout_path = logs.path(&format!("{what}.stdout.log"));
        let mut stderr_file = append(&stderr_path);
        writeln!(stderr_file, "----- start #{gen}: {cmd:?} -----").ok();
        let mut stdout_file = append(&stdout_path);
        writeln!(stdout_file, "----- start #{gen} -----").ok();

        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file))
            .env("RUST_BACKTRACE", "1");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");

        // Copy stdout to the log (so the child never blocks on a full pipe)
        // and report the ready line, or EOF, once.
        let (tx, rx) = oneshot::channel::<Option<String>>();
        std::thread::Builder::new()
            .name(format!("{what}-stdout"))
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    writeln!(stdout_file, "{line}").ok();
                    if line.starts_with(ready_prefix) {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Some(line));
                        }
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(None);
                }
            })
            .expect("spawn stdout reader");

        let failure = match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(Some(line))) => return (child, line),
            Ok(_) => format!("{what} closed stdout (exited?) before printing {ready_prefix:?}"),
            Err(_) => format!("{what} printed no {ready_prefix:?} line within {READY_TIMEOUT:?}"),
        };
        let _ = child.kill();
        let status = child.wait();
        panic!(
            "{failure}; exit: {status:?}\n--- {what} stderr ---\n{}\n--- {what} stdout ---\n{}",
            logs.tail(&format!("{what}.stderr.log"), 16 * 1024),
            logs.tail(&format!("{what}.stdout.log"), 4 * 1024),
        );
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.logs().dump();
        }
        for child in [self.gateway.take(), self.server.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Directory holding the workspace's binaries (the gateway's, and the
/// server's next to it).
pub fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metastore-gateway"))
        .parent()
        .expect("binary has a parent dir")
        .to_path_buf()
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
    if let Err(e) = status {
        panic!("kill -{sig} {pid}: {e}");
    }
}

/// Parses `metastore-server ready: shards=N addrs=A,B` into its addresses.
fn parse_server_ready(line: &str) -> Vec<String> {
    let mut shards = None;
    let mut addrs = Vec::new();
    for word in line.split_whitespace() {
        if let Some(n) = word.strip_prefix("shards=") {
            shards = n.parse::<usize>().ok();
        } else if let Some(list) = word.strip_prefix("addrs=") {
            addrs = list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
    }
    assert_eq!(shards, Some(addrs.len()), "bad server ready line {line:?}");
    for a in &addrs {
        assert!(
            a.parse::<std::net::SocketAddr>().is_ok(),
            "bad shard address {a:?} in {line:?}"
        );
    }
    addrs
}

// ---------------------------------------------------------------------------
// Helpers shared by the test files.
// ---------------------------------------------------------------------------

/// The gRPC status of a failed call (panics on a transport/other error).
pub fn grpc_status(err: etcd_client::Error) -> tonic::Status {
    match err {
        etcd_client::Error::GRpcStatus(s) => s,
        other => panic!("expected a gRPC status error, got {other:?}"),
    }
}

/// Asserts that `res` failed with exactly this gRPC code and message.
#[track_caller]
pub fn assert_grpc_error<T: std::fmt::Debug>(
    res: Result<T, etcd_client::Error>,
    code: tonic::Code,
    message: &str,
) {
    let status = match res {
        Ok(v) => panic!("expected error {code:?} {message:?}, got success {v:?}"),
        Err(e) => grpc_status(e),
    };
    assert_eq!(
        (status.code(), status.message()),
        (code, message),
        "unexpected error status {status:?}"
    );
}

/// Response header revision of a response that must carry a header.
pub fn rev_of(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.expect("response has a header").revision()
}

/// Asserts the node still serves after an error: a put and a linearizable
/// get of a fresh key round-trip.
pub async fn assert_serving(client: &mut etcd_client::Client, tag: &str) {
    let key = format!("__serving/{tag}");
    let put = client
        .put(key.as_str(), tag, None)
        .await
        .unwrap_or_else(|e| panic!("put after {tag}: {e}"));
    let rev = rev_of(put.header());
    let get = client
        .get(key.as_str(), None)
        .await
        .unwrap_or_else(|e| panic!("get after {tag}: {e}"));
    assert_eq!(get.kvs().len(), 1, "key written after {tag} not found");
    assert_eq!(get.kvs()[0].value(), tag.as_bytes());
    assert_eq!(get.kvs()[0].mod_revision(), rev);
    assert!(rev_of(get.header()) >= rev);
}

/// The real `etcdctl` on PATH. The etcdctl suites never skip: a missing
/// etcdctl fails them with how to install it.
pub fn etcdctl_path() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcdctl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcdctl not found on PATH. These tests drive the real etcdctl: install it \
                 with `apt-get install -y etcd-client` (Debian/Ubuntu), or run \
                 ./deploy/test.sh, which installs it. They never skip."
            )
        })
}

/// SIGKILL (a crash), then reaps the process.
fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("wait for the killed process");
}

/// A port `p` such that `p .. p + n` are all free now, below the kernel's
/// ephemeral range: no outgoing connection (of this test, of a test
/// running beside it, or the gateway's own reconnects while the server is
/// down) can take one of them as its local port before the server binds
/// it again. Random, so tests running side by side rarely pick the same.
fn free_consecutive_ports(n: usize) -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(n as u16));
    assert!(
        low < high,
        "no room below the ephemeral ports ({ephemeral_low})"
    );
    for _ in 0..1000 {
        let first = rand::Rng::gen_range(&mut rand::thread_rng(), low..high);
        let all_free =
            (0..n as u16).all(|i| std::net::TcpListener::bind(("127.0.0.1", first + i)).is_ok());
        if all_free {
            return first;
        }
    }
    panic!("no {n} consecutive free ports found below {ephemeral_low}");
}

/// Opens a streaming call at `path` (`/etcdserverpb.Watch/Watch`, ...) on
/// a bare HTTP/2 connection, sends `frame` as its body (left open, as a
/// streaming client does) and returns the status the call ends with:
/// `(grpc-status, grpc-message)` from its trailers. For messages no etcd
/// client library would send: above the size limit, or undecodable.
pub async fn stream_call_status(endpoint: &str, path: &str, frame: Vec<u8>) -> (i32, String) {
    let tcp = tokio::net::TcpStream::connect(endpoint).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{endpoint}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    send.send_data(frame.into(), false).unwrap();
    let (parts, mut body) = resp.await.unwrap().into_parts();
    assert_eq!(parts.status, http::StatusCode::OK);
    while let Some(chunk) = body.data().await {
        let n = chunk.unwrap().len();
        let _ = body.flow_control().release_capacity(n);
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    // A trailers-only answer carries the status in the headers instead.
    let status = trailers
        .get("grpc-status")
        .or(parts.headers.get("grpc-status"));
    let message = trailers
        .get("grpc-message")
        .or(parts.headers.get("grpc-message"));
    let status = status.expect("the call ends with a grpc-status");
    let message = message.map(|m| m.to_str().unwrap()).unwrap_or_default();
    (
        status.to_str().unwrap().parse().unwrap(),
        percent_decoded(message),
    )
}

/// `grpc-message` is percent-encoded on the wire.
fn percent_decoded(s: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex: String = bytes.by_ref().take(2).map(char::from).collect();
        out.push(u8::from_str_radix(&hex, 16).expect("a percent escape"));
    }
    String::from_utf8(out).unwrap()
}

/// A gRPC message frame's 5-byte prefix announcing `len` bytes, followed
/// by `payload` (which may be shorter: a refused message is not read).
pub fn grpc_frame(len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Asserts that the streaming call at `path` ends as etcd (grpc-go) ends
/// it for a message it cannot take: one announcing 3 MiB, above the
/// default limit (1.5 MiB + 512 KiB), with `ResourceExhausted` and
/// grpc-go's message; `undecodable` (a message prost cannot decode) with
/// `Internal`.
pub async fn assert_stream_refuses_like_etcd(endpoint: &str, path: &str, undecodable: &[u8]) {
    let big = 3 * 1024 * 1024;
    let got = stream_call_status(endpoint, path, grpc_frame(big, &[])).await;
    let text = format!("grpc: received message larger than max ({big} vs. 2097152)");
    assert_eq!(got, (tonic::Code::ResourceExhausted as i32, text), "{path}");
    let frame = grpc_frame(undecodable.len() as u32, undecodable);
    let (code, _) = stream_call_status(endpoint, path, frame).await;
    assert_eq!(code, tonic::Code::Internal as i32, "{path}");
}
