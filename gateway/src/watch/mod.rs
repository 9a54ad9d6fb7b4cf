//! etcd's Watch, served across shards.
//!
//! A key lives on one shard, a range or prefix on all of them (hash
//! placement), and each shard streams the events of its own keys with a
//! *resolved watermark* (every event at or below it has been sent). The
//! gateway turns those per-shard streams into etcd's watch: every matching
//! event exactly once, in revision order, all events of one revision in
//! one response (several revisions share one when a watch fell behind),
//! across shard boundaries.
//!
//! ```text
//!  shard 0 ─frames─┐                        ┌─▶ inbox(stream A) ─▶ session A ◀─ gRPC polls
//!  shard 1 ─frames─┼─▶ feed: merge ─▶ fanout ┼─▶ inbox(stream B) ─▶ session B ◀─ gRPC polls
//!  shard n ─frames─┘  (watermarks)  (budgets)└─▶ ...
//! ```
//!
//! - [`merge`]: the watermark merge, an I/O-free state machine: releases
//!   whole revisions up to the minimum watermark, asks lagging shards for
//!   progress, resubscribes lost streams from what it fully received.
//! - [`fanout`]: per-stream FIFO inboxes with per-watcher byte budgets
//!   (a watcher's queued releases coalesce into one item), a feed's
//!   subscribers and its tail of recent batches for late joiners.
//! - [`feed`]: a merge + fan-out driven by one task, shared by all watchers
//!   of a key range that can use it (the registry).
//! - [`session`]: one gRPC Watch stream with etcd v3.5's semantics.
//! - [`wire`]: the response as sent, its events encoded once per release.
//! - [`requests`]: a stream's requests in order, waiting for the current
//!   revision (I/O-free; one read serves all queued requests);
//! - [`revision`]: current-revision reads shared by the watch requests
//!   waiting for one.
//!
//! Shard streams travel on a dedicated connection per shard (see
//! `shards::WatchTransport`).
//!
//! # Limits (gateway flags)
//!
//! - `--watch-max-watchers-per-stream` (10 000): more creates are refused
//!   with etcd's create-failure shape.
//! - `--watch-max-pending-bytes` (8 MiB): per watcher, encoded events queued
//!   for a client that does not read; over it the watcher leaves the shared
//!   feed and catches up on its own (see [`fanout`]).
//! - `--watch-progress-notify-interval` (10 min, etcd's default).
//! - `--max-request-bytes` (1.5 MiB): the response size at which event
//!   responses are split (fragmented for `fragment` watches).

pub mod fanout;
pub mod feed;
pub mod merge;
pub mod requests;
pub mod revision;
pub mod session;
pub mod wire;

#[cfg(test)]
mod scenarios;

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use metastore_proto::etcdserverpb::WatchRequest;

use crate::backend::Backend;
use crate::shards::WatchTransport;
pub use feed::{FeedConfig, Registry};

/// Watch settings (flags).
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub progress_notify_interval: Duration,
    pub max_watchers_per_stream: usize,
    /// Per watcher: bytes of events queued and not yet sent.
    pub max_pending_bytes: u32,
    /// Event responses are split (or fragmented) above this size.
    pub max_response_bytes: usize,
    pub feed: FeedConfig,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            progress_notify_interval: Duration::from_secs(600),
            max_watchers_per_stream: 10_000,
            max_pending_bytes: 8 << 20,
            max_response_bytes: crate::server::DEFAULT_MAX_REQUEST_BYTES,
            feed: FeedConfig::default(),
        }
    }
}

/// What every Watch stream shares: the backend (headers), current-revision
/// reads, the feed registry and the settings.
pub struct WatchHub {
    pub backend: Arc<Backend>,
    pub revisions: Arc<revision::RevisionReads>,
    pub registry: Arc<Registry>,
    pub cfg: WatchConfig,
}

impl WatchHub {
    pub fn new(
        backend: Arc<Backend>,
        transport: Arc<dyn WatchTransport>,
        cfg: WatchConfig,
    ) -> Arc<WatchHub> {
        let registry = Registry::new(
            transport,
            backend.router.shard_count(),
            backend.identity.history_id,
            cfg.feed.clone(),
        );
        let observer = registry.clone();
        Arc::new(WatchHub {
            revisions: revision::RevisionReads::new(
                backend.clone(),
                Box::new(move |h| observer.observe_history(h)),
            ),
            backend,
            registry,
            cfg,
        })
    }

    /// Serves one Watch stream: the responses to send, produced as they
    /// are polled for (see [`session::SessionStream`]).
    pub fn open<S, E>(self: &Arc<Self>, requests: S) -> session::SessionStream<S, E>
    where
        S: Stream<Item = Result<WatchRequest, E>> + Unpin,
        E: std::fmt::Display,
    {
        session::SessionStream::new(self.clone(), requests)
    }
}

/// Parses a duration flag: a number with a unit `ms`, `s`, `m` or `h`
/// (`10m`, `500ms`, `1.5s`), as etcd's duration flags are written.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a number followed by a unit"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_etcd_flags() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
