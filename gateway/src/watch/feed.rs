//! Feeds: one watermark merge ([`Merge`]) plus its fan-out ([`FanOut`]),
//! driven by one task, shared by every watcher of the same key range that
//! can use it; and the [`Registry`] that finds them.
//!
//! # Sharing
//!
//! The registry maps `(key, range_end)` to the live feeds of that range.
//! A new watcher joins the first live feed whose tail covers its start
//! (`start > tail_floor`: always true for a watcher starting "now", whose
//! start is the oracle's current revision + 1, taken when the watch was
//! created — a feed's released revision is a shard watermark, never above
//! the oracle at that time). Otherwise it gets a feed of its own, from its
//! start, registered too, so later watchers can share it once it has caught
//! up. Feeds always subscribe with `prev_kv` (the stream strips it for
//! watchers that did not ask), so one feed serves both kinds. 1000 watchers
//! on one key cost one shard subscription.
//!
//! # Locking
//!
//! A feed's state sits behind one `std::sync::Mutex`, held only for short
//! non-blocking steps (merge a frame, push to inboxes — pushes never
//! block). Joining, leaving and progress targets are synchronous calls
//! from the streams, so a join is atomic with respect to releases: a
//! joiner sees either all of a release or none. Lock order: registry,
//! then feed, then a shard connection's pending map; nothing takes the
//! feed's lock while holding a pending map (frames are handed over after
//! it is released), and the driver drops subscriptions (which touch the
//! pending map, and may close a connection, which ends its streams
//! through the feed) only with the feed's lock released.
//!
//! # Frames, in the shard connection's reader
//!
//! The shard connections' reader tasks hand frames to the feed directly
//! ([`FeedFrames`], a `FrameConsumer`): each frame is merged under the
//! lock, and once the reader has no further frame at hand it flushes:
//! releases are delivered to the watchers' inboxes and the driver is
//! woken for the merge's actions. Events so reach the watch streams in
//! the same scheduler pass as the frame's arrival; a hop through the
//! driver task put them behind the answer to the write that caused them
//! (read by another connection's reader in the same pass) on a
//! single-threaded gateway. A burst still costs one fan-out per buffer
//! the reader holds.
//!
//! # The driver task
//!
//! It owns the shard subscriptions (tagged by lane and generation), and
//! executes the merge's actions: subscribe (with
//! backoff after failures, forever: a shard that comes back is
//! resubscribed without loss), ack, progress. While a shard owes the
//! merge an answer it ticks the merge every `silence_tick`, so a
//! subscription that fell silent on a live connection is replaced (see
//! `merge`, "A silent subscription"). It ends when the last
//! subscriber leaves (closing is decided under the feed lock, so no join
//! can slip in) or the merge ends (compaction, refusal), and removes its
//! feed from the registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Notify;

use super::fanout::{FanOut, Inbox, Subscriber};
use super::merge::{Action, Merge, MergeConfig, MergeEnd};
use crate::client::{FrameConsumer, SubscriptionEvent, SubscriptionSink};
use crate::error::GatewayError;
use crate::shards::{WatchSubscription, WatchTransport};

/// Tunables shared by all feeds.
#[derive(Clone, Debug)]
pub struct FeedConfig {
    pub merge: MergeConfig,
    /// Bytes of recent batches a feed keeps for late joiners.
    pub tail_bytes: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How often the merge is ticked while a shard owes it an answer (a
    /// lane silent for `merge.silence_ticks` ticks resubscribes).
    pub silence_tick: Duration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            merge: MergeConfig::default(),
            tail_bytes: 256 << 10,
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            silence_tick: Duration::from_secs(1),
        }
    }
}

struct FeedState {
    merge: Merge,
    fanout: FanOut,
    closing: bool,
}

/// One shared feed (see the module docs).
pub struct Feed {
    id: u64,
    /// The server history its merge expects (0: unknown).
    history: u64,
    key: Vec<u8>,
    range_end: Vec<u8>,
    state: Mutex<FeedState>,
    wake: Notify,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("id", &self.id)
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("range_end", &String::from_utf8_lossy(&self.range_end))
            .finish()
    }
}

impl Feed {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Joins this feed if it is live, reads `history`, and its tail covers
    /// `sub.start`.
    fn try_join(&self, sub: Subscriber, history: u64) -> Result<(), Subscriber> {
        if self.history != history {
            return Err(sub);
        }
        let mut st = self.state.lock().unwrap();
        if st.closing || st.merge.end().is_some() {
            return Err(sub);
        }
        let target = sub.progress_target;
        st.fanout.join(sub)?;
        if target > st.fanout.released() {
            st.merge.want_progress(target);
            drop(st);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Removes a watcher; the feed closes when it was the last.
    pub fn detach(&self, inbox: &Arc<Inbox>, slot: u64) {
        let mut st = self.state.lock().unwrap();
        st.fanout.remove(inbox, slot);
        if st.fanout.is_empty() && !st.closing {
            st.closing = true;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Asks for a progress marker for `slot` once the feed has released
    /// `target` (at once if it has). `false` if the slot is not attached.
    pub fn want_progress(&self, inbox: &Arc<Inbox>, slot: u64, target: i64) -> bool {
        let mut st = self.state.lock().unwrap();
        if !st.fanout.set_progress_target(inbox, slot, target) {
            return false;
        }
        if target > st.fanout.released() {
            st.merge.want_progress(target);
            drop(st);
            self.wake.notify_one();
        }
        true
    }

    /// Every event up to this has been delivered to the feed's watchers.
    pub fn released(&self) -> i64 {
        self.state.lock().unwrap().fanout.released()
    }

    /// Number of attached watchers.
    pub fn watchers(&self) -> usize {
        self.state.lock().unwrap().fanout.len()
    }
}

type RangeKey = (Vec<u8>, Vec<u8>);

/// Live feeds by key range (see the module docs).
pub struct Registry {
    transport: Arc<dyn WatchTransport>,
    shard_count: u32,
    cfg: FeedConfig,
    feeds: Mutex<HashMap<RangeKey, Vec<Arc<Feed>>>>,
    next_id: AtomicU64,
    /// The server's history new feeds expect (see `merge`, "A lost
    /// history"): from its topology, then from shards that refused a feed
    /// for a changed history.
    history: AtomicU64,
}

impl Registry {
    pub fn new(
        transport: Arc<dyn WatchTransport>,
        shard_count: u32,
        history: u64,
        cfg: FeedConfig,
    ) -> Arc<Registry> {
        Arc::new(Registry {
            transport,
            shard_count,
            cfg,
            feeds: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            history: AtomicU64::new(history),
        })
    }

    /// The server names its history `history` (0: not said): feeds
    /// created from now on expect it. A current-revision read calls this
    /// before its revision is used, so a watch starting "now" on a
    /// restarted non-durable server is not refused for the old history.
    pub fn observe_history(&self, history: u64) {
        if history != 0 {
            self.history.store(history, Ordering::Relaxed);
        }
    }

    /// Attaches a watcher of `[key, range_end)` to a live feed of the
    /// current history that can serve it, or to a new feed from its start.
    /// Must be called inside a tokio runtime (a new feed spawns its driver).
    pub fn attach(self: &Arc<Self>, key: &[u8], range_end: &[u8], sub: Subscriber) -> Arc<Feed> {
        let history = self.history.load(Ordering::Relaxed);
        let mut feeds = self.feeds.lock().unwrap();
        let list = feeds.entry((key.to_vec(), range_end.to_vec())).or_default();
        let mut sub = sub;
        for f in list.iter() {
            match f.try_join(sub, history) {
                Ok(()) => return f.clone(),
                Err(s) => sub = s,
            }
        }
        let shards = metastore_proto::router::ShardRouter::new(self.shard_count)
            .shards_for_range(key, range_end);
        let start = sub.start;
        let target = sub.progress_target;
        let mut merge = Merge::new(
            key.to_vec(),
            range_end.to_vec(),
            start,
            &shards,
            history,
            self.cfg.merge.clone(),
        );
        if target > 0 {
            merge.want_progress(target);
        }
        let mut fanout = FanOut::new(start, self.cfg.tail_bytes);
        fanout
            .join(sub)
            .expect("a new feed takes a watcher at its start");
        let feed = Arc::new(Feed {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            history,
            key: key.to_vec(),
            range_end: range_end.to_vec(),
            state: Mutex::new(FeedState {
                merge,
                fanout,
                closing: false,
            }),
            wake: Notify::new(),
        });
        list.push(feed.clone());
        drop(feeds);
        tracing::debug!(feed = feed.id, start, shards = ?shards, "new watch feed");
        tokio::spawn(drive(
            feed.clone(),
            self.transport.clone(),
            Arc::downgrade(self),
            self.cfg.clone(),
        ));
        feed
    }

    fn remove(&self, feed: &Arc<Feed>) {
        let mut feeds = self.feeds.lock().unwrap();
        let key = (feed.key.clone(), feed.range_end.clone());
        if let Some(list) = feeds.get_mut(&key) {
            list.retain(|f| !Arc::ptr_eq(f, feed));
            if list.is_empty() {
                feeds.remove(&key);
            }
        }
    }

    /// Live feeds (tests, diagnostics).
    pub fn feed_count(&self) -> usize {
        self.feeds.lock().unwrap().values().map(Vec::len).sum()
    }
}

fn tag(lane: usize, gen: u64) -> u64 {
    ((lane as u64) << 40) | (gen & ((1 << 40) - 1))
}

fn untag(tag: u64) -> (usize, u64) {
    ((tag >> 40) as usize, tag & ((1 << 40) - 1))
}

/// The frames of one feed's subscriptions, merged in the reader tasks of
/// the shard connections (see "Frames, in the shard connection's reader").
struct FeedFrames {
    feed: Arc<Feed>,
    registry: Weak<Registry>,
}

impl FrameConsumer for FeedFrames {
    fn frame(&self, tag: u64, ev: SubscriptionEvent) {
        let feed = &self.feed;
        let (lane, gen) = untag(tag);
        let mut st = feed.state.lock().unwrap();
        match ev {
            Ok(frame) => st.merge.frame(lane, gen, frame),
            Err(e) if e.is_retryable() || e.is_ambiguous() => {
                tracing::debug!(feed = feed.id, lane, error = %e, "watch stream lost; resubscribing");
                st.merge.lost(lane, gen);
            }
            Err(e) => {
                tracing::warn!(feed = feed.id, lane, error = %e, "watch subscription refused");
                st.merge.fail(e.to_string());
            }
        }
    }

    fn flush(&self) {
        let feed = &self.feed;
        let mut st = feed.state.lock().unwrap();
        if st.closing {
            return;
        }
        if let Some(&MergeEnd::HistoryLost { history: h, .. }) = st.merge.end() {
            // Before the watchers hear of it: the watches they create next
            // must expect the new history.
            tracing::warn!(feed = feed.id, history = h, "the server's history changed (a non-durable engine restarted): its watches end as compacted");
            if let Some(r) = self.registry.upgrade() {
                r.observe_history(h);
            }
        }
        step(&mut st);
        drop(st);
        // Acks, progress requests, resubscriptions, or the close.
        feed.wake.notify_one();
    }
}

type Connecting =
    BoxFuture<'static, (usize, u64, Result<Box<dyn WatchSubscription>, GatewayError>)>;

/// The feed's task (see the module docs).
async fn drive(
    feed: Arc<Feed>,
    transport: Arc<dyn WatchTransport>,
    registry: Weak<Registry>,
    cfg: FeedConfig,
) {
    let frames: Arc<dyn FrameConsumer> = Arc::new(FeedFrames {
        feed: feed.clone(),
        registry: registry.clone(),
    });
    let lanes = feed.state.lock().unwrap().merge.lanes();
    let mut subs: Vec<Option<Box<dyn WatchSubscription>>> = (0..lanes).map(|_| None).collect();
    let mut failures: Vec<u32> = vec![0; lanes];
    let mut connecting: FuturesUnordered<Connecting> = FuturesUnordered::new();
    // Ticks the merge while a shard owes it an answer (one timer, re-armed).
    let silence = tokio::time::sleep(cfg.silence_tick);
    tokio::pin!(silence);
    let mut ticking = false;
    loop {
        let (actions, awaiting) = {
            let mut st = feed.state.lock().unwrap();
            if st.closing {
                break;
            }
            let actions = st.merge.actions();
            (actions, st.merge.awaiting_answer())
        };
        if awaiting && !ticking {
            silence
                .as_mut()
                .reset(tokio::time::Instant::now() + cfg.silence_tick);
        }
        ticking = awaiting;
        for a in actions {
            match a {
                Action::Subscribe {
                    lane,
                    shard,
                    gen,
                    request,
                } => {
                    subs[lane] = None;
                    let delay = backoff(&cfg, failures[lane]);
                    let sink = SubscriptionSink {
                        tag: tag(lane, gen),
                        consumer: frames.clone(),
                    };
                    let transport = transport.clone();
                    connecting.push(Box::pin(async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        (lane, gen, transport.subscribe(shard, request, sink).await)
                    }));
                }
                Action::Ack { lane, seq, .. } => {
                    if let Some(s) = &subs[lane] {
                        s.ack(seq);
                    }
                }
                Action::Progress { lane, revision, .. } => {
                    if let Some(s) = &subs[lane] {
                        s.progress(revision);
                    }
                }
            }
        }
        tokio::select! {
            Some((lane, gen, res)) = connecting.next() => {
                // Subscriptions are dropped after the lock is released
                // (see "Locking").
                let mut unused = None;
                let mut st = feed.state.lock().unwrap();
                match res {
                    Ok(sub) => {
                        if st.merge.subscribed(lane, gen) {
                            unused = subs[lane].replace(sub);
                            failures[lane] = 0;
                        } else {
                            unused = Some(sub);
                        }
                    }
                    Err(e) if e.is_retryable() || e.is_ambiguous() => {
                        failures[lane] = failures[lane].saturating_add(1);
                        tracing::debug!(feed = feed.id, lane, error = %e, "watch subscribe failed; retrying");
                        st.merge.lost(lane, gen);
                    }
                    Err(e) => {
                        st.merge.fail(e.to_string());
                        step(&mut st);
                    }
                }
                drop(st);
                drop(unused);
            }
            () = &mut silence, if ticking => {
                feed.state.lock().unwrap().merge.tick();
                ticking = false;
            }
            _ = feed.wake.notified() => {}
        }
    }
    drop(subs);
    if let Some(r) = registry.upgrade() {
        r.remove(&feed);
    }
    tracing::debug!(feed = feed.id, "watch feed closed");
}

/// After merging: deliver releases; on a final end, tell the watchers and
/// close.
fn step(st: &mut FeedState) {
    while let Some(r) = st.merge.release() {
        st.fanout.deliver(r.into());
    }
    if let Some(end) = st.merge.end().cloned() {
        if let MergeEnd::Failed(reason) = &end {
            tracing::warn!(reason, "watch feed failed");
        }
        st.fanout.end(&end);
        st.closing = true;
    } else if st.fanout.is_empty() {
        // Every watcher left (or overflowed away).
        st.closing = true;
    }
}

fn backoff(cfg: &FeedConfig, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = cfg
        .min_backoff
        .saturating_mul(1u32 << failures.min(16).saturating_sub(1));
    let ceiling = exp.min(cfg.max_backoff);
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    ceiling.mul_f64(jitter)
}
