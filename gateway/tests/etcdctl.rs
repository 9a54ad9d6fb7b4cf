//! The real `etcdctl` (v3 API; Debian's etcd-client package) against the
//! gateway, on both engines: put/get with their flags, del, txn in etcdctl's
//! stdin format, compaction, endpoint status/health and member list.
//!
//! etcdctl must be installed (`apt-get install etcd-client`; `.ci/run` and
//! `deploy/test.sh` do it). These tests fail, never skip, when it is missing.

#[macro_use]
mod common;

use common::etcdctl_path;

use std::process::{Output, Stdio};

use common::TestNode;
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------
// Running etcdctl
// ---------------------------------------------------------------------------

#[test]
fn etcdctl_is_installed() {
    let out = std::process::Command::new(etcdctl_path())
        .arg("version")
        .env("ETCDCTL_API", "3")
        .output()
        .expect("run etcdctl version");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "etcdctl version failed: {out:?}");
    assert!(
        text.contains("API version: 3"),
        "etcdctl speaks API v3: {text}"
    );
}

async fn etcdctl_raw(node: &TestNode, args: &[&str], stdin: Option<&str>) -> Output {
    etcdctl_at(&node.client_url(), args, stdin).await
}

/// Runs etcdctl against `endpoint` (a URL or a bare host:port).
async fn etcdctl_at(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(etcdctl_path());
    cmd.env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_ENDPOINTS")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=10s")
        .arg("--command-timeout=30s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn etcdctl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(input.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    child.wait_with_output().await.expect("etcdctl output")
}

/// Runs etcdctl, asserts success, returns stdout.
async fn ok(node: &TestNode, args: &[&str]) -> String {
    ok_stdin(node, args, None).await
}

async fn ok_stdin(node: &TestNode, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl_raw(node, args, stdin).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    stdout
}

/// Runs etcdctl, asserts failure, returns stderr.
async fn fails(node: &TestNode, args: &[&str]) -> String {
    let out = etcdctl_raw(node, args, None).await;
    assert!(
        !out.status.success(),
        "etcdctl {args:?} should fail but printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn json(node: &TestNode, args: &[&str]) -> Json {
    let mut all = vec!["-w", "json"];
    all.extend_from_slice(args);
    let text = ok(node, &all).await;
    Json::parse(&text).unwrap_or_else(|e| panic!("etcdctl {args:?}: bad JSON ({e}): {text}"))
}

/// Revision of a write done with `etcdctl -w json put`.
async fn put_rev(node: &TestNode, key: &str, value: &str) -> i64 {
    json(node, &["put", key, value]).await["header"]["revision"].i64()
}

/// etcdctl's txn stdin: compares, blank line, success ops, blank line,
/// failure ops, blank line.
fn txn_input(compares: &[&str], success: &[&str], failure: &[&str]) -> String {
    let mut s = String::new();
    for section in [compares, success, failure] {
        for line in section {
            s.push_str(line);
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------
// A small JSON reader for etcdctl -w json (numbers kept as text: IDs are
// full-range uint64) and base64 for its keys and values.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static NULL: Json = Json::Null;

impl std::ops::Index<&str> for Json {
    type Output = Json;
    fn index(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or(&NULL),
            _ => &NULL,
        }
    }
}

impl std::ops::Index<usize> for Json {
    type Output = Json;
    fn index(&self, i: usize) -> &Json {
        match self {
            Json::Arr(items) => items.get(i).unwrap_or(&NULL),
            _ => &NULL,
        }
    }
}

impl Json {
    fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: text.trim().as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }

    /// Integer value; absent (omitempty) counts as 0, as in etcd's JSON.
    fn i64(&self) -> i64 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("not an i64: {n}")),
            Json::Null => 0,
            other => panic!("not a number: {other:?}"),
        }
    }

    fn u64(&self) -> u64 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|_| panic!("not a u64: {n}")),
            Json::Null => 0,
            other => panic!("not a number: {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            Json::Null => "",
            other => panic!("not a string: {other:?}"),
        }
    }

    fn bool(&self) -> bool {
        match self {
            Json::Bool(b) => *b,
            Json::Null => false,
            other => panic!("not a bool: {other:?}"),
        }
    }

    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            Json::Null => &[],
            other => panic!("not an array: {other:?}"),
        }
    }

    /// A base64 field (etcd's JSON encodes bytes as standard base64).
    fn b64(&self) -> String {
        String::from_utf8(base64_decode(self.str())).expect("utf8")
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at {}", c as char, self.i))
        }
    }

    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at {}", self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            None => Err("unexpected end".into()),
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    let v = self.value()?;
                    fields.push((k, v));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return Err(format!("bad object at {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("bad array at {}", self.i)),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'n') => self.lit("null", Json::Null),
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(format!("unexpected byte at {}", self.i));
                }
                Ok(Json::Num(
                    String::from_utf8(self.s[start..self.i].to_vec()).unwrap(),
                ))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return Err(format!("expected string at {}", self.i));
        }
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return Err("unterminated string".into());
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or("bad escape")?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4])
                                .map_err(|e| e.to_string())?;
                            let cp = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                            self.i += 4;
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    fn val(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => panic!("bad base64 byte {c}"),
        }
    }
    let clean: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

#[test]
fn json_and_base64_readers_work() {
    let j = Json::parse(
        r#"{"header":{"cluster_id":14841639068965178418,"revision":5},"kvs":[{"key":"Zm9v","value":"YmFyCg==","version":2}],"ok":true,"s":"a\"b\u0041"}"#,
    )
    .unwrap();
    assert_eq!(j["header"]["cluster_id"].u64(), 14841639068965178418);
    assert_eq!(j["header"]["revision"].i64(), 5);
    assert_eq!(j["kvs"][0]["key"].b64(), "foo");
    assert_eq!(j["kvs"][0]["value"].b64(), "bar\n");
    assert_eq!(j["kvs"][0]["lease"].i64(), 0);
    assert!(j["ok"].bool());
    assert_eq!(j["s"].str(), "a\"bA");
    assert_eq!(j["count"].i64(), 0);
    assert_eq!(base64_decode("YQ=="), b"a");
    assert_eq!(base64_decode("YWI="), b"ab");
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

both_engines!(
    async fn etcdctl_put_get(node: TestNode) {
        etcdctl_path();
        assert_eq!(ok(&node, &["put", "foo", "bar"]).await.trim(), "OK");
        assert_eq!(ok(&node, &["get", "foo"]).await, "foo\nbar\n");
        assert_eq!(
            ok(&node, &["get", "foo", "--print-value-only"]).await,
            "bar\n"
        );
        assert_eq!(ok(&node, &["get", "missing"]).await, "");
        assert_eq!(
            ok(&node, &["get", "foo", "--consistency=s"]).await,
            "foo\nbar\n",
            "serializable read"
        );

        ok(&node, &["put", "spaced key", "hello world"]).await;
        assert_eq!(
            ok(&node, &["get", "spaced key", "--print-value-only"]).await,
            "hello world\n"
        );

        // JSON output: revisions and versions.
        let r1 = json(&node, &["get", "foo"]).await["kvs"][0]["mod_revision"].i64();
        let r2 = put_rev(&node, "foo", "baz").await;
        assert!(r2 > r1);
        let j = json(&node, &["get", "foo"]).await;
        assert!(j["header"]["revision"].i64() >= r2);
        assert_eq!(j["count"].i64(), 1);
        let kv = &j["kvs"][0];
        assert_eq!(kv["key"].b64(), "foo");
        assert_eq!(kv["value"].b64(), "baz");
        assert_eq!(kv["version"].i64(), 2);
        assert_eq!(kv["create_revision"].i64(), r1);
        assert_eq!(kv["mod_revision"].i64(), r2);

        // Historical read.
        assert_eq!(
            ok(
                &node,
                &["get", "foo", &format!("--rev={r1}"), "--print-value-only"]
            )
            .await,
            "bar\n"
        );
    }
);

both_engines!(
    async fn etcdctl_get_prefix_limit_keys_only_range_sort(node: TestNode) {
        etcdctl_path();
        for (k, v) in [
            ("p/a", "3"),
            ("p/b", "1"),
            ("p/c", "5"),
            ("p/d", "2"),
            ("p/e", "4"),
            ("p0", "x"),
            ("q", "y"),
        ] {
            ok(&node, &["put", k, v]).await;
        }
        let snap = put_rev(&node, "z", "last").await;

        assert_eq!(
            ok(&node, &["get", "--prefix", "p/"]).await,
            "p/a\n3\np/b\n1\np/c\n5\np/d\n2\np/e\n4\n"
        );
        assert_eq!(
            ok(&node, &["get", "--prefix", "p/", "--limit", "2"]).await,
            "p/a\n3\np/b\n1\n"
        );
        let keys_only = ok(&node, &["get", "--prefix", "p/", "--keys-only"]).await;
        let ks: Vec<&str> = keys_only.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(ks, ["p/a", "p/b", "p/c", "p/d", "p/e"]);
        assert_eq!(
            ok(&node, &["get", "--prefix", "p/", "--print-value-only"]).await,
            "3\n1\n5\n2\n4\n"
        );

        // [p/b, p/d) and from-key.
        assert_eq!(ok(&node, &["get", "p/b", "p/d"]).await, "p/b\n1\np/c\n5\n");
        let from = ok(&node, &["get", "--from-key", "p/d", "--keys-only"]).await;
        let ks: Vec<&str> = from.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(ks, ["p/d", "p/e", "p0", "q", "z"]);

        // Count and more with a limit, in JSON (etcdctl 3.4 has no --count-only).
        let j = json(&node, &["get", "--prefix", "p/", "--limit", "2"]).await;
        assert_eq!(j["count"].i64(), 5);
        assert!(j["more"].bool());
        assert_eq!(j["kvs"].arr().len(), 2);

        // Sorting.
        assert_eq!(
            ok(
                &node,
                &[
                    "get",
                    "--prefix",
                    "p/",
                    "--sort-by=VALUE",
                    "--order=DESCEND",
                    "--print-value-only"
                ]
            )
            .await,
            "5\n4\n3\n2\n1\n"
        );
        assert_eq!(
            ok(
                &node,
                &["get", "--prefix", "p/", "--order=DESCEND", "--keys-only"]
            )
            .await
            .lines()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
            ["p/e", "p/d", "p/c", "p/b", "p/a"]
        );

        // Historical prefix read across shards.
        ok(&node, &["put", "p/a", "changed"]).await;
        ok(&node, &["del", "p/c"]).await;
        assert_eq!(
            ok(
                &node,
                &[
                    "get",
                    "--prefix",
                    "p/",
                    &format!("--rev={snap}"),
                    "--print-value-only"
                ]
            )
            .await,
            "3\n1\n5\n2\n4\n"
        );
        assert_eq!(
            ok(&node, &["get", "--prefix", "p/", "--print-value-only"]).await,
            "changed\n1\n2\n4\n"
        );
    }
);

both_engines!(
    async fn etcdctl_del(node: TestNode) {
        etcdctl_path();
        for i in 1..=5 {
            ok(&node, &["put", &format!("d/{i}"), "v"]).await;
        }
        ok(&node, &["put", "d0", "outside"]).await;
        assert_eq!(ok(&node, &["del", "--prefix", "d/"]).await.trim(), "5");
        assert_eq!(ok(&node, &["get", "--prefix", "d/"]).await, "");
        assert_eq!(
            ok(&node, &["get", "d0", "--print-value-only"]).await,
            "outside\n"
        );

        ok(&node, &["put", "x", "1"]).await;
        assert_eq!(ok(&node, &["del", "x", "--prev-kv"]).await, "1\nx\n1\n");
        assert_eq!(ok(&node, &["del", "missing"]).await.trim(), "0");

        for i in 1..=4 {
            ok(&node, &["put", &format!("r/{i}"), "v"]).await;
        }
        assert_eq!(ok(&node, &["del", "r/2", "r/4"]).await.trim(), "2");
        let left = ok(&node, &["get", "--prefix", "r/", "--keys-only"]).await;
        let ks: Vec<&str> = left.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(ks, ["r/1", "r/4"]);
    }
);

both_engines!(
    async fn etcdctl_txn(node: TestNode) {
        etcdctl_path();
        ok(&node, &["put", "t/k", "v1"]).await;

        // Success branch.
        let out = ok_stdin(
            &node,
            &["txn"],
            Some(&txn_input(
                &[r#"value("t/k") = "v1""#],
                &["put t/k v2", "get t/k"],
                &["put t/k failed"],
            )),
        )
        .await;
        assert_eq!(lines(&out), ["SUCCESS", "", "OK", "", "t/k", "v2"]);
        assert_eq!(
            ok(&node, &["get", "t/k", "--print-value-only"]).await,
            "v2\n"
        );

        // Failure branch.
        let out = ok_stdin(
            &node,
            &["txn"],
            Some(&txn_input(
                &[r#"mod("t/k") < "1""#],
                &["put t/k never"],
                &["put t/other created", "get t/k"],
            )),
        )
        .await;
        assert_eq!(lines(&out), ["FAILURE", "", "OK", "", "t/k", "v2"]);
        assert_eq!(
            ok(&node, &["get", "t/other", "--print-value-only"]).await,
            "created\n"
        );

        // Several compares (version, create on a missing key), two puts that
        // share one revision.
        let out = ok_stdin(
            &node,
            &["txn"],
            Some(&txn_input(
                &[r#"version("t/k") = "2""#, r#"create("t/missing") = "0""#],
                &["put t/a 1", "put t/b 2"],
                &[],
            )),
        )
        .await;
        assert_eq!(lines(&out), ["SUCCESS", "", "OK", "", "OK"]);
        let a = json(&node, &["get", "t/a"]).await;
        let b = json(&node, &["get", "t/b"]).await;
        assert_eq!(
            a["kvs"][0]["mod_revision"].i64(),
            b["kvs"][0]["mod_revision"].i64(),
            "one txn, one revision"
        );

        // != and >, a delete in the success branch.
        let out = ok_stdin(
            &node,
            &["txn"],
            Some(&txn_input(
                &[r#"value("t/k") != "zzz""#, r#"version("t/k") > "1""#],
                &["del t/a"],
                &[],
            )),
        )
        .await;
        assert_eq!(lines(&out), ["SUCCESS", "", "1"]);
        assert_eq!(ok(&node, &["get", "t/a"]).await, "");

        // A false compare with an empty failure branch.
        let out = ok_stdin(
            &node,
            &["txn"],
            Some(&txn_input(
                &[r#"value("t/k") = "nope""#],
                &["put t/k bad"],
                &[],
            )),
        )
        .await;
        assert_eq!(lines(&out), ["FAILURE"]);
        assert_eq!(
            ok(&node, &["get", "t/k", "--print-value-only"]).await,
            "v2\n"
        );
    }
);

both_engines!(
    async fn etcdctl_compaction(node: TestNode) {
        etcdctl_path();
        let r1 = put_rev(&node, "c", "v1").await;
        let r2 = put_rev(&node, "c", "v2").await;
        let r3 = put_rev(&node, "c", "v3").await;
        assert!(r1 < r2 && r2 < r3);

        assert_eq!(
            ok(&node, &["compaction", &r2.to_string()]).await.trim(),
            format!("compacted revision {r2}")
        );
        let err = fails(&node, &["get", "c", &format!("--rev={r1}")]).await;
        assert!(
            err.contains("etcdserver: mvcc: required revision has been compacted"),
            "stderr: {err}"
        );
        assert_eq!(
            ok(
                &node,
                &["get", "c", &format!("--rev={r2}"), "--print-value-only"]
            )
            .await,
            "v2\n"
        );
        let future = (r3 + 1_000_000_000).to_string();
        let err = fails(&node, &["get", "c", &format!("--rev={future}")]).await;
        assert!(
            err.contains("etcdserver: mvcc: required revision is a future revision"),
            "stderr: {err}"
        );
        // Still serving.
        ok(&node, &["put", "c", "v4"]).await;
        assert_eq!(ok(&node, &["get", "c", "--print-value-only"]).await, "v4\n");
    }
);

both_engines!(
    async fn etcdctl_endpoint_status_and_health(node: TestNode) {
        etcdctl_path();
        let rev = put_rev(&node, "ep", "1").await;
        let url = node.client_url();

        let out = etcdctl_raw(&node, &["endpoint", "health"], None).await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "endpoint health failed: {text}");
        assert!(text.contains(&format!("{url} is healthy")), "{text}");

        let j = json(&node, &["endpoint", "health"]).await;
        assert!(j[0]["health"].bool(), "{j:?}");

        // etcdctl 3.4 dials `endpoint status` to an http:// endpoint with
        // the whole URL as the HTTP/2 :authority, which h2 alone would
        // refuse (gateway/src/authority.rs); both forms must work.
        for ep in [node.endpoint(), url.clone()] {
            let status = |args: &'static [&'static str]| {
                let ep = ep.clone();
                async move {
                    let out = etcdctl_at(&ep, args, None).await;
                    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                    assert!(
                        out.status.success(),
                        "etcdctl --endpoints={ep} {args:?}: {stdout} {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    stdout
                }
            };
            // Simple format: endpoint, ID, version, db size, is leader, ...
            let out = status(&["endpoint", "status"]).await;
            let row: Vec<&str> = out.trim().split(", ").collect();
            assert_eq!(row[0], ep, "endpoint status: {out}");
            assert!(row[2].starts_with("3.5"), "server version column: {out}");
            assert_eq!(row[4], "true", "the single member is leader: {out}");

            let text = status(&["-w", "json", "endpoint", "status"]).await;
            let j = Json::parse(&text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"));
            let st = &j[0];
            assert_eq!(st["Endpoint"].str(), ep);
            assert!(st["Status"]["version"].str().starts_with("3.5"), "{j:?}");
            assert!(st["Status"]["header"]["revision"].i64() >= rev);
            assert_eq!(
                st["Status"]["leader"].u64(),
                st["Status"]["header"]["member_id"].u64(),
                "leader is the member itself"
            );
        }

        // The other single-endpoint commands reach the service too (and
        // get its answer, not a protocol error).
        let out = etcdctl_at(&url, &["endpoint", "hashkv"], None).await;
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("PROTOCOL_ERROR"), "{text}");
        assert!(
            out.status.success() || text.contains("code = Unimplemented"),
            "{text}"
        );
        // And the gateway keeps serving.
        assert_eq!(ok(&node, &["get", "ep", "--print-value-only"]).await, "1\n");
    }
);

both_engines!(
    async fn etcdctl_member_list(node: TestNode) {
        etcdctl_path();
        let url = node.client_url();
        let out = ok(&node, &["member", "list"]).await;
        let rows: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(rows.len(), 1, "one member: {out}");
        // ID, status, name, peer URLs, client URLs, is learner
        let cols: Vec<&str> = rows[0].split(", ").collect();
        assert_eq!(cols.len(), 6, "{out}");
        assert_eq!(cols[1], "started");
        assert!(cols[4].split(',').any(|u| u == url), "client URLs in {out}");
        assert_eq!(cols[5], "false");

        let j = json(&node, &["member", "list"]).await;
        let members = j["members"].arr();
        assert_eq!(members.len(), 1);
        assert!(
            members[0]["clientURLs"]
                .arr()
                .iter()
                .any(|u| u.str() == url),
            "{j:?}"
        );
        assert_ne!(members[0]["ID"].u64(), 0);
        assert_eq!(
            format!("{:x}", members[0]["ID"].u64()),
            cols[0],
            "the same member ID in both formats"
        );
    }
);
