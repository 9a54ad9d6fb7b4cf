//! The real `etcdctl watch` against the gateway, on both engines: a key,
//! `--prefix` across shards, `--rev` replay, `--prev-kv`. etcdctl runs as a
//! child process whose stdout is read line by line; it is killed at the
//! end.
//!
//! etcdctl prints nothing when its watch is established, so the tests that
//! watch "from now" put a probe value until the watcher prints it (a poll
//! with a deadline: the outside process gives no other signal), then check
//! the real events. `--rev` tests need no probe: history is replayed.
//!
//! etcdctl must be installed (`apt-get install etcd-client`); these tests
//! fail, never skip, when it is missing.

#[macro_use]
mod common;

use common::etcdctl_path;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{rev_of, TestNode};
use etcd_client::{Client, DeleteOptions, Txn, TxnOp};
use metastore_proto::router::ShardRouter;
use tokio::sync::mpsc;

/// How long one expected output line may take.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `etcdctl watch`, its stdout as a channel of lines.
struct EtcdctlWatch {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl EtcdctlWatch {
    fn spawn(node: &TestNode, args: &[&str]) -> EtcdctlWatch {
        let mut child = Command::new(etcdctl_path())
            .env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_ENDPOINTS")
            .arg(format!("--endpoints={}", node.client_url()))
            .arg("--dial-timeout=10s")
            .arg("watch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl watch");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        EtcdctlWatch {
            child,
            lines,
            stderr,
        }
    }

    async fn line_within(&mut self, d: Duration) -> Option<String> {
        match tokio::time::timeout(d, self.lines.recv()).await {
            Ok(Some(l)) => Some(l),
            Ok(None) => panic!(
                "etcdctl watch exited; stderr: {}",
                self.stderr.lock().unwrap()
            ),
            Err(_) => None,
        }
    }

    async fn line(&mut self) -> String {
        match self.line_within(LINE_TIMEOUT).await {
            Some(l) => l,
            None => panic!(
                "etcdctl watch printed nothing for {LINE_TIMEOUT:?}; stderr: {}",
                self.stderr.lock().unwrap()
            ),
        }
    }

    /// The next `n` lines.
    async fn lines(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.line().await);
        }
        out
    }

    /// Puts `key = probe-N` until the watcher prints such an event, then
    /// skips every probe event (they all precede later writes).
    async fn wait_established(&mut self, c: &mut Client, key: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut probes = 0;
        loop {
            assert!(Instant::now() < deadline, "etcdctl watch never saw a probe");
            c.put(key, format!("probe-{probes}"), None).await.unwrap();
            probes += 1;
            if let Some(first) = self.line_within(Duration::from_millis(200)).await {
                assert_eq!(first, "PUT");
                let rest = self.lines(2).await;
                assert_eq!(rest[0], key);
                assert!(rest[1].starts_with("probe-"), "{rest:?}");
                return probes;
            }
        }
    }
}

impl Drop for EtcdctlWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(kind: &str, key: &str, value: &str) -> Vec<String> {
    vec![kind.into(), key.into(), value.into()]
}

both_engines!(
    /// `etcdctl watch KEY`: every put and the delete, once, in order.
    async fn etcdctl_watch_key(node: TestNode) {
        let mut c = node.client().await;
        let mut w = EtcdctlWatch::spawn(&node, &["ew/key"]);
        w.wait_established(&mut c, "ew/key").await;
        c.put("ew/key", "v1", None).await.unwrap();
        c.put("ew/other", "not watched", None).await.unwrap();
        c.put("ew/key", "v2", None).await.unwrap();
        c.delete("ew/key", None).await.unwrap();
        // Probes still in flight come first.
        let first = w.skip_probes_until_real("ew/key").await;
        let mut got = first;
        got.extend(w.lines(6).await);
        let mut want = event("PUT", "ew/key", "v1");
        want.extend(event("PUT", "ew/key", "v2"));
        want.extend(event("DELETE", "ew/key", ""));
        assert_eq!(got, want);
        // Nothing else: a final put is the very next event.
        c.put("ew/key", "last", None).await.unwrap();
        assert_eq!(w.lines(3).await, event("PUT", "ew/key", "last"));
    }
);

both_engines!(
    /// `etcdctl watch --prefix P`: keys on every shard, a cross-shard txn
    /// (its events together, in order) and a prefix delete.
    async fn etcdctl_watch_prefix(node: TestNode) {
        let mut c = node.client().await;
        let mut w = EtcdctlWatch::spawn(&node, &["--prefix", "ewp/"]);
        w.wait_established(&mut c, "ewp/probe").await;
        let router = ShardRouter::new(common::SHARDS as u32);
        let keys: Vec<String> = (0..6).map(|i| format!("ewp/{i}")).collect();
        let shards: std::collections::HashSet<u32> =
            keys.iter().map(|k| router.shard_of(k.as_bytes())).collect();
        assert_eq!(shards.len(), common::SHARDS, "keys on every shard");
        let mut want = Vec::new();
        for k in &keys[..3] {
            c.put(k.as_str(), "a", None).await.unwrap();
            want.extend(event("PUT", k, "a"));
        }
        let ops: Vec<TxnOp> = keys[3..]
            .iter()
            .map(|k| TxnOp::put(k.as_str(), "t", None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await.unwrap();
        for k in &keys[3..] {
            want.extend(event("PUT", k, "t"));
        }
        c.delete("ewp/probe", None).await.unwrap();
        want.extend(event("DELETE", "ewp/probe", ""));
        let mut got = w.skip_probes_until_real("ewp/probe").await;
        got.extend(w.lines(want.len() - 3).await);
        // Within the txn's revision etcdctl prints events in the order the
        // server sent them; compare that revision as a set.
        let (head, tail) = got.split_at(9);
        assert_eq!(head, &want[..9]);
        let txn_got: std::collections::BTreeSet<Vec<String>> =
            tail[..9].chunks(3).map(|c| c.to_vec()).collect();
        let txn_want: std::collections::BTreeSet<Vec<String>> =
            want[9..18].chunks(3).map(|c| c.to_vec()).collect();
        assert_eq!(txn_got, txn_want);
        assert_eq!(&tail[9..], &want[18..]);
    }
);

both_engines!(
    /// `etcdctl watch --prefix P --rev R --prev-kv`: history from R with
    /// previous values, then live events.
    async fn etcdctl_watch_rev_prev_kv(node: TestNode) {
        let mut c = node.client().await;
        c.put("ewr/a", "0", None).await.unwrap();
        let r = rev_of(c.put("ewr/a", "1", None).await.unwrap().header());
        c.put("ewr/b", "2", None).await.unwrap();
        c.put("ewr/a", "3", None).await.unwrap();
        c.delete("ewr/b", None).await.unwrap();
        let rev = r.to_string();
        let mut w = EtcdctlWatch::spawn(&node, &["--prefix", "ewr/", "--rev", &rev, "--prev-kv"]);
        let got = w.lines(3 * 4 + 2 * 3).await;
        let want: Vec<String> = [
            // PUT with prev: type, prev key, prev value, key, value.
            vec!["PUT", "ewr/a", "0", "ewr/a", "1"],
            vec!["PUT", "ewr/b", "2"],
            vec!["PUT", "ewr/a", "1", "ewr/a", "3"],
            vec!["DELETE", "ewr/b", "2", "ewr/b", ""],
        ]
        .concat()
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(got, want);
        // Then live.
        c.put("ewr/c", "4", None).await.unwrap();
        assert_eq!(w.lines(3).await, event("PUT", "ewr/c", "4"));
        // And without --prev-kv, from the same revision: no previous values.
        let mut plain = EtcdctlWatch::spawn(&node, &["--prefix", "ewr/", "--rev", &rev]);
        let mut want = event("PUT", "ewr/a", "1");
        want.extend(event("PUT", "ewr/b", "2"));
        want.extend(event("PUT", "ewr/a", "3"));
        want.extend(event("DELETE", "ewr/b", ""));
        want.extend(event("PUT", "ewr/c", "4"));
        assert_eq!(plain.lines(want.len()).await, want);
        c.delete("ewr/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
    }
);

impl EtcdctlWatch {
    /// Skips probe events of `probe_key`; returns the first real event's
    /// three lines.
    async fn skip_probes_until_real(&mut self, probe_key: &str) -> Vec<String> {
        loop {
            let kind = self.line().await;
            let kv = self.lines(2).await;
            if kind == "PUT" && kv[0] == probe_key && kv[1].starts_with("probe-") {
                continue;
            }
            return vec![kind, kv[0].clone(), kv[1].clone()];
        }
    }
}
