//! The real `etcdctl` (3.4, v3 API) driving the Lease API through the
//! gateway, on both engines: `lease grant`, `put --lease`, `lease
//! timetolive --keys`, `lease list`, `lease keep-alive --once`, `lease
//! revoke`, and the errors it prints for unknown leases.
//!
//! etcdctl must be installed (`apt-get install etcd-client`); these tests
//! fail, never skip, when it is missing.

#[macro_use]
mod common;

use common::etcdctl_path;

use std::collections::BTreeSet;
use std::process::{Output, Stdio};

use metastore_proto::router::ShardRouter;

const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

/// Runs `etcdctl --endpoints=<endpoint> <args>` and returns its output.
async fn run(endpoint: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(etcdctl_path())
        .env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_ENDPOINTS")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=10s")
        .arg("--command-timeout=30s")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run etcdctl")
}

/// Runs etcdctl, asserts success, returns stdout.
async fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = run(endpoint, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs etcdctl, asserts failure, returns stdout + stderr.
async fn fails(endpoint: &str, args: &[&str]) -> String {
    let out = run(endpoint, args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "etcdctl {args:?} should fail: {text}"
    );
    text
}

/// Parses `lease <hex> granted with TTL(<n>s)`.
fn parse_grant(stdout: &str) -> (String, i64) {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert!(
        words.len() == 5 && words[0] == "lease" && words[2] == "granted",
        "unexpected grant output {stdout:?}"
    );
    let ttl = words[4]
        .strip_prefix("TTL(")
        .and_then(|t| t.strip_suffix("s)"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("unexpected grant output {stdout:?}"));
    (words[1].to_string(), ttl)
}

both_engines!(
    async fn etcdctl_lease_lifecycle(node: TestNode) {
        // Both endpoint spellings work for lease commands.
        let ep = node.endpoint();
        let url = node.client_url();

        let (hex, ttl) = parse_grant(&ok(&ep, &["lease", "grant", "60"]).await);
        assert_eq!(ttl, 60);
        let id = i64::from_str_radix(&hex, 16).expect("hex lease id");
        assert!(id > 0);
        assert_eq!(hex, format!("{id:016x}"));

        // Attach keys that land on both shards.
        let keys: Vec<String> = (0..8).map(|i| format!("ctl/lease/{i}")).collect();
        let router = ShardRouter::new(common::SHARDS as u32);
        let shards: BTreeSet<u32> = keys.iter().map(|k| router.shard_of(k.as_bytes())).collect();
        assert_eq!(shards.len(), common::SHARDS, "keys on every shard");
        let lease_flag = format!("--lease={hex}");
        for k in &keys {
            assert_eq!(ok(&ep, &["put", &lease_flag, k, "v"]).await.trim(), "OK");
        }
        ok(&ep, &["put", "ctl/plain", "v"]).await;

        // timetolive --keys lists them all.
        let out = ok(&url, &["lease", "timetolive", &hex, "--keys"]).await;
        let expected_prefix = format!("lease {hex} granted with TTL(60s), remaining(");
        assert!(out.starts_with(&expected_prefix), "{out:?}");
        let listed = out
            .split("attached keys([")
            .nth(1)
            .and_then(|s| s.trim().strip_suffix("])"))
            .unwrap_or_else(|| panic!("no attached keys in {out:?}"));
        let mut want = keys.clone();
        want.sort();
        assert_eq!(listed.split(' ').collect::<Vec<_>>(), want);
        let out = ok(&ep, &["lease", "timetolive", &hex]).await;
        assert!(!out.contains("attached keys"), "{out:?}");

        // lease list.
        let out = ok(&url, &["lease", "list"]).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, vec!["found 1 leases", hex.as_str()], "{out:?}");

        // keep-alive --once.
        let out = ok(&ep, &["lease", "keep-alive", "--once", &hex]).await;
        assert_eq!(out.trim(), format!("lease {hex} keepalived with TTL(60)"));

        // revoke deletes the attached keys, not the others.
        let out = ok(&ep, &["lease", "revoke", &hex]).await;
        assert_eq!(out.trim(), format!("lease {hex} revoked"));
        let out = ok(&ep, &["get", "ctl/", "--prefix", "--keys-only"]).await;
        let left: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(left, vec!["ctl/plain"]);
        let out = ok(&ep, &["lease", "timetolive", &hex]).await;
        assert_eq!(out.trim(), format!("lease {hex} already expired"));
        assert_eq!(ok(&ep, &["lease", "list"]).await.trim(), "found 0 leases");

        // Unknown leases: etcd's errors.
        let err = fails(&ep, &["lease", "revoke", &hex]).await;
        assert!(err.contains(LEASE_NOT_FOUND), "{err}");
        let err = fails(&ep, &["put", &lease_flag, "ctl/x", "v"]).await;
        assert!(err.contains(LEASE_NOT_FOUND), "{err}");
        let err = fails(&ep, &["lease", "keep-alive", "--once", &hex]).await;
        assert!(err.contains(LEASE_NOT_FOUND), "{err}");

        // A TTL below the minimum is raised.
        let (_, ttl) = parse_grant(&ok(&ep, &["lease", "grant", "1"]).await);
        assert_eq!(ttl, 2);
        // The server keeps serving.
        assert_eq!(ok(&ep, &["put", "ctl/after", "v"]).await.trim(), "OK");
        assert_eq!(
            ok(&ep, &["get", "ctl/after", "--print-value-only"])
                .await
                .trim(),
            "v"
        );
    }
);
