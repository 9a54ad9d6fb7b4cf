//! A second client for `compare`: `bench/goclient`, a Go program on etcd's
//! own client library (clientv3 3.4 from Debian: the library of etcdctl and
//! etcd's benchmark tool; Kubernetes uses a later version of it).
//!
//! Every ratio in the report comes from one client, `metastore-bench`,
//! which shares the 2 cores with the server it measures. A client that
//! happened to suit one server, or cost one of them more, would bias every
//! ratio the same way. So for the workloads of the put and range targets
//! ([`GO_SPECS`]) `compare` also runs the Go client against each target,
//! right after metastore-bench's runs of the same workload, and the report
//! sets the two clients' ratios side by side.
//!
//! The Go client takes metastore-bench's flags (same names and key layout)
//! with the workload as `--workload put|range`, and prints one JSON object;
//! [`go_args`] translates a spec's arguments and [`parse_output`] reads the
//! object. Server CPU is read here, around the child process, the way
//! metastore-bench reads it around a run ([`CpuProbe::finish_settled`]);
//! the child reports its own CPU (`getrusage`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::nodes::Node;
use crate::stats::{CpuProbe, CpuUse, Latency, RunResult};

/// The workloads `compare` also drives with the Go client.
pub const GO_SPECS: [&str; 3] = ["put-1c", "put-1000c", "range-s-1000c"];

/// The Go client's arguments for metastore-bench arguments `args` (global
/// flags, then `put` or `range` and its flags).
pub fn go_args(args: &str) -> Result<Vec<String>, String> {
    let words: Vec<&str> = args.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "put" || *w == "range")
        .ok_or_else(|| format!("no put or range workload in {args:?}"))?;
    let mut out = vec!["--workload".to_string(), words[at].to_string()];
    out.extend(
        words
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != at)
            .map(|(_, w)| w.to_string()),
    );
    Ok(out)
}

/// The number after `"key":` in the Go client's JSON (keys are unique).
fn number(json: &str, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let rest = &json[json.find(&pat)? + pat.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `"key":` (JSON escapes of quotes and backslashes
/// undone; others kept as written).
fn string(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let rest = &json[json.find(&pat)? + pat.len()..];
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
    None
}

/// A [`RunResult`] from the Go client's output line (`name`: the
/// workload's name in the report).
pub fn parse_output(name: &str, line: &str) -> Result<RunResult, String> {
    let need = |key: &str| number(line, key).ok_or_else(|| format!("no {key} in {line:?}"));
    let mut r = RunResult::new(name, "ops/s", "metastore-goclient (Go clientv3)".into());
    r.ops = need("ops")? as u64;
    r.errors = need("errors")? as u64;
    r.elapsed_secs = need("elapsed_secs")?;
    r.throughput = need("throughput")?;
    if let Some(e) = string(line, "error_sample").filter(|e| !e.is_empty()) {
        r.error_samples.push(e);
    }
    let latency = Latency {
        count: need("count")? as u64,
        mean: need("mean")?,
        p50: need("p50")?,
        p90: need("p90")?,
        p99: need("p99")?,
        p999: need("p999")?,
        max: need("max")?,
    };
    r.latencies.push(("request".into(), latency));
    // The client's own CPU; [`run`] adds the servers'.
    r.cpu = Some(CpuUse {
        client_secs: need("client_cpu_secs")?,
        ..CpuUse::default()
    });
    Ok(r)
}

/// Runs the Go client `bin` with metastore-bench arguments `args` against
/// `node`; server CPU is billed as for metastore-bench's own runs.
pub async fn run(bin: &Path, name: &str, args: &str, node: &Node) -> Result<RunResult, String> {
    let mut argv = go_args(args)?;
    argv.push("--endpoints".into());
    argv.push(node.endpoint.clone());
    let probe = CpuProbe::start_settled(&node.pids).await;
    let child = tokio::process::Command::new(bin)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .map_err(|_| "the Go client did not finish within 240 s".to_string())?
        .map_err(|e| format!("the Go client: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the Go client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let mut r = parse_output(name, line)?;
    let mut cpu = probe.finish_settled().await;
    // The probe counted this process; the client is the child.
    cpu.client_secs = r.cpu.map(|c| c.client_secs).unwrap_or(0.0);
    r.cpu = Some(cpu);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_becomes_a_flag_and_the_rest_passes_through() {
        let a = go_args("--conns 100 --clients 1000 --duration 4s --sequential-keys put").unwrap();
        assert_eq!(
            a,
            [
                "--workload",
                "put",
                "--conns",
                "100",
                "--clients",
                "1000",
                "--duration",
                "4s",
                "--sequential-keys"
            ]
        );
        let a = go_args("--clients 1000 --val-size 256 range --consistency s").unwrap();
        assert_eq!(
            a,
            [
                "--workload",
                "range",
                "--clients",
                "1000",
                "--val-size",
                "256",
                "--consistency",
                "s"
            ]
        );
        assert!(go_args("--clients 4 watch --streams 2").is_err());
    }

    #[test]
    fn the_output_line_becomes_a_run_result() {
        let line = r#"{"workload":"put","ops":200,"errors":2,"error_sample":"context deadline \"exceeded\"","elapsed_secs":0.5,"throughput":400,"latency_ms":{"count":200,"mean":1.5,"p50":0.99,"p90":1.4,"p99":3.3,"p999":3.4,"max":3.5e+00},"client_cpu_secs":0.032}"#;
        let r = parse_output("put-1c", line).unwrap();
        assert_eq!((r.workload.as_str(), r.ops, r.errors), ("put-1c", 200, 2));
        assert_eq!(r.throughput, 400.0);
        assert_eq!(r.error_samples, ["context deadline \"exceeded\""]);
        let l = r.main_latency().unwrap();
        assert_eq!((l.count, l.p50, l.p99, l.max), (200, 0.99, 3.3, 3.5));
        assert_eq!(r.cpu.map(|c| c.client_secs), Some(0.032));
        assert!(parse_output("put-1c", r#"{"ops":1}"#).is_err());
    }
}
