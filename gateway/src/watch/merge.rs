//! The watermark merge: one key range, one start revision, the streams of
//! every shard that can hold matching keys, merged into one stream of whole
//! revisions in revision order. An I/O-free state machine: the feed driver
//! (`feed`) feeds it frames and connection losses, executes the
//! [`Action`]s it asks for, and hands what it [`Merge::release`]s to the
//! watchers. Scripted scenarios test it without sockets.
//!
//! # Per shard ("lane")
//!
//! A lane subscribes to one shard. It keeps:
//! - `resolved`: the shard's latest watermark for this subscription (every
//!   matching event with revision <= it has been received), never below
//!   `start - 1` (nothing below the start is ever wanted);
//! - `received`: every event with revision <= it has been received —
//!   `max(resolved, last event revision)`, since a shard sends a revision's
//!   events together and in revision order;
//! - `groups`: received events not yet released, one group per revision,
//!   ascending.
//!
//! # Release rule
//!
//! `M = min over lanes of resolved`. Every event with revision <= M has been
//! received from every shard, and no shard can still send one, so all
//! groups with revision <= M are released at once, merged by revision
//! (ties keep shard order), and `released = M`. A revision is never split
//! across releases: its events on one shard arrive in one frame, and it is
//! released only once every shard has resolved it. Releases with no events
//! still move `released` (progress for watchers).
//!
//! # Losing a stream
//!
//! A lost subscription (connection dropped, shard error that allows a
//! retry, a protocol violation) resubscribes from `received + 1`: the lane
//! keeps its unreleased groups and its resolved, so nothing is lost (every
//! event <= received is held or released) and nothing is duplicated (the
//! new subscription starts above everything held). Stale frames of the old
//! subscription are recognised by the lane's generation and ignored.
//!
//! # Progress requests
//!
//! A shard sends a heartbeat only every 100 ms unless asked, and events
//! wait for the slowest watermark. So whenever events are pending, every
//! lane whose `resolved` is below the oldest pending revision `P` is sent
//! `WatchProgress{P}` once (the shard answers as soon as it has resolved
//! P, at once if it already has): an event is released about one round
//! trip after the last shard saw it. The same happens for an explicit
//! target ([`Merge::want_progress`]: a watcher's progress request).
//!
//! # A silent subscription
//!
//! A subscription can fall silent while its connection stays up (the
//! shard lost it, or a frame went missing where no error reports it).
//! Nothing would then tell the lane to resubscribe, and every event of
//! the range would wait behind its watermark forever. So a lane that was
//! asked for progress and has sent no frame for [`MergeConfig::silence_ticks`]
//! consecutive [`Merge::tick`]s is treated as lost and resubscribes from
//! `received + 1` (as above: no loss, no duplicates). A lane the shard
//! cannot answer on — its window used up by frames this merge has not
//! acknowledged (see flow control) — is never counted as silent. Only a
//! lane that something waits on is watched: an idle shard owes no frames.
//! A shard merely slower than the timeout costs a resubscription, which
//! replays from its history.
//!
//! # A lost history
//!
//! Every subscription names the history its revisions come from
//! (`expect_history`, the server's `history_id` when the merge began). A
//! server on a non-durable engine that restarted has a new history: the
//! revisions this merge holds are gone and new writes reuse their
//! numbers, so resuming from `received + 1` would skip them without a
//! trace. Such a shard ends the subscription as for a compacted start
//! instead, naming its new history, and the merge ends with
//! [`MergeEnd::HistoryLost`] at the oldest revision the new history has:
//! every watcher is canceled with etcd's `compact_revision` (none resumes
//! on a feed of its own, as after a compaction below its start), and
//! clients re-list, as after a compaction.
//! The end names the new history, which the registry keeps for merges
//! that start later.
//!
//! # Flow control
//!
//! Frames are acknowledged as they are merged, in runs of half the window
//! (the shard may send `window` frames beyond the last ack, so it never
//! waits for an ack in flight). While more than `buffer_budget` bytes wait
//! in `groups`, lanes that are *ahead* (resolved above the minimum) are not
//! acknowledged: they stop after a window, and their events wait in the
//! shard's ring/history instead of the gateway's memory. A lane at the
//! minimum is always acknowledged, so the minimum always advances and the
//! merge never deadlocks.

use std::collections::VecDeque;

use metastore_proto::mvccpb::Event;
use metastore_proto::shardpb::{WatchEventsResponse, WatchSubscribeRequest};

/// Why a merge ended for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergeEnd {
    /// A shard no longer has the history asked for (etcd's
    /// `compact_revision`): events from this revision on are available.
    Compacted(i64),
    /// A shard refused the subscription for a reason retrying cannot fix.
    Failed(String),
    /// The server's history changed (see "A lost history"): nothing this
    /// merge's watchers were promised is left; the new history, named
    /// `history`, serves events from revision `from` on.
    HistoryLost { from: i64, history: u64 },
}

/// Tunables of a merge.
#[derive(Clone, Debug)]
pub struct MergeConfig {
    /// Frames a shard may send beyond the last ack.
    pub window: u32,
    /// Bytes of unreleased events above which leading lanes are throttled.
    pub buffer_budget: usize,
    /// Consecutive [`Merge::tick`]s without a frame after which a lane
    /// asked for progress is treated as lost.
    pub silence_ticks: u32,
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            window: 64,
            buffer_budget: 16 << 20,
            silence_ticks: 5,
        }
    }
}

/// What the driver must do for the merge.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open a subscription for `lane` (generation `gen`) and report the
    /// outcome with [`Merge::subscribed`] or [`Merge::lost`].
    Subscribe {
        lane: usize,
        shard: u32,
        gen: u64,
        request: WatchSubscribeRequest,
    },
    Ack {
        lane: usize,
        gen: u64,
        seq: u64,
    },
    Progress {
        lane: usize,
        gen: u64,
        revision: i64,
    },
}

/// Events of revisions `from..=through`, in revision order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Release {
    pub from: i64,
    pub through: i64,
    pub events: Vec<Event>,
    /// Encoded size of the events.
    pub bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Needs a subscription.
    Idle,
    /// A subscription was asked for.
    Subscribing,
    Live,
}

#[derive(Debug)]
struct Group {
    revision: i64,
    events: Vec<Event>,
    bytes: usize,
}

#[derive(Debug)]
struct Lane {
    shard: u32,
    gen: u64,
    phase: Phase,
    resolved: i64,
    received: i64,
    groups: VecDeque<Group>,
    last_seq: u64,
    acked: u64,
    /// Highest revision a progress request was sent for (this generation).
    asked: i64,
    /// Ticks since the last frame while asked for progress.
    silent_ticks: u32,
}

impl Lane {
    /// Live and asked for a revision it has not resolved yet.
    fn owes_answer(&self) -> bool {
        self.phase == Phase::Live && self.asked > self.resolved
    }
}

/// The revision of an event (its kv's mod_revision).
pub fn event_revision(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// The merge state machine (see the module docs).
#[derive(Debug)]
pub struct Merge {
    key: Vec<u8>,
    range_end: Vec<u8>,
    start: i64,
    released: i64,
    lanes: Vec<Lane>,
    cfg: MergeConfig,
    buffered: usize,
    progress_target: i64,
    end: Option<MergeEnd>,
    /// The history the revisions come from (0: unknown, not checked).
    history: u64,
}

impl Merge {
    /// A merge of `[key, range_end)` from `start` over `shards`, whose
    /// revisions come from `history` (see "A lost history"; 0 = unknown).
    pub fn new(
        key: Vec<u8>,
        range_end: Vec<u8>,
        start: i64,
        shards: &[u32],
        history: u64,
        cfg: MergeConfig,
    ) -> Merge {
        assert!(start >= 1, "a merge starts at a real revision");
        assert!(!shards.is_empty(), "a merge needs at least one shard");
        Merge {
            key,
            range_end,
            start,
            released: start - 1,
            lanes: shards
                .iter()
                .map(|&shard| Lane {
                    shard,
                    gen: 0,
                    phase: Phase::Idle,
                    resolved: start - 1,
                    received: start - 1,
                    groups: VecDeque::new(),
                    last_seq: 0,
                    acked: 0,
                    asked: 0,
                    silent_ticks: 0,
                })
                .collect(),
            cfg,
            buffered: 0,
            progress_target: 0,
            end: None,
            history,
        }
    }

    pub fn start(&self) -> i64 {
        self.start
    }

    /// Every event with revision <= this has been released.
    pub fn released(&self) -> i64 {
        self.released
    }

    pub fn end(&self) -> Option<&MergeEnd> {
        self.end.as_ref()
    }

    /// Bytes of received, unreleased events.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Someone wants `released >= revision` soon: ask lagging shards.
    pub fn want_progress(&mut self, revision: i64) {
        self.progress_target = self.progress_target.max(revision);
    }

    /// The subscription asked for by `Action::Subscribe{lane, gen}` is
    /// open. `false` if that generation is stale (the driver drops it).
    pub fn subscribed(&mut self, lane: usize, gen: u64) -> bool {
        let l = &mut self.lanes[lane];
        if l.gen != gen || l.phase == Phase::Idle || self.end.is_some() {
            return false;
        }
        l.phase = Phase::Live;
        true
    }

    /// The subscription of `lane` (generation `gen`) failed or ended: it
    /// will resubscribe from `received + 1`.
    pub fn lost(&mut self, lane: usize, gen: u64) {
        let l = &mut self.lanes[lane];
        if l.gen != gen {
            return;
        }
        l.gen += 1;
        l.phase = Phase::Idle;
        l.last_seq = 0;
        l.acked = 0;
        l.asked = 0;
        l.silent_ticks = 0;
    }

    /// Whether a live lane owes an answer to a progress request: the
    /// driver should [`Merge::tick`] while this holds.
    pub fn awaiting_answer(&self) -> bool {
        self.end.is_none() && self.lanes.iter().any(Lane::owes_answer)
    }

    /// Time passed (one tick): lanes that owe an answer and sent nothing
    /// for [`MergeConfig::silence_ticks`] ticks are treated as lost (see
    /// "A silent subscription").
    pub fn tick(&mut self) {
        if self.end.is_some() {
            return;
        }
        let window = u64::from(self.cfg.window);
        for i in 0..self.lanes.len() {
            let l = &mut self.lanes[i];
            if !l.owes_answer() || l.last_seq - l.acked >= window {
                l.silent_ticks = 0;
                continue;
            }
            l.silent_ticks += 1;
            if l.silent_ticks >= self.cfg.silence_ticks {
                tracing::warn!(
                    shard = l.shard,
                    asked = l.asked,
                    resolved = l.resolved,
                    "watch subscription silent; resubscribing"
                );
                let gen = l.gen;
                self.lost(i, gen);
            }
        }
    }

    /// A non-retryable failure: the merge is over.
    pub fn fail(&mut self, reason: String) {
        if self.end.is_none() {
            self.end = Some(MergeEnd::Failed(reason));
        }
    }

    /// Merges one frame of `lane` (generation `gen`). Frames of a stale
    /// generation are ignored. A frame out of sequence means the stream
    /// cannot be trusted: the lane resubscribes (nothing of it is merged).
    pub fn frame(&mut self, lane: usize, gen: u64, f: WatchEventsResponse) {
        if self.end.is_some() {
            return;
        }
        let l = &mut self.lanes[lane];
        if l.gen != gen || l.phase == Phase::Idle {
            return;
        }
        // A frame can arrive before the driver reports the subscription
        // open (the reader is another task).
        l.phase = Phase::Live;
        l.silent_ticks = 0;
        if f.seq != l.last_seq + 1 {
            tracing::warn!(
                shard = l.shard,
                expected = l.last_seq + 1,
                got = f.seq,
                "watch frame out of sequence; resubscribing"
            );
            self.lost(lane, gen);
            return;
        }
        l.last_seq = f.seq;
        if f.compact_revision != 0 {
            self.end = Some(if f.history != 0 {
                MergeEnd::HistoryLost {
                    from: f.compact_revision,
                    history: f.history,
                }
            } else {
                MergeEnd::Compacted(f.compact_revision)
            });
            return;
        }
        for e in f.events {
            let rev = event_revision(&e);
            if rev <= l.received {
                // Already held or released (or below the start): a
                // duplicate the contract rules out; never deliver twice.
                tracing::debug!(shard = l.shard, rev, "dropping duplicate watch event");
                continue;
            }
            let bytes = event_bytes(&e);
            self.buffered += bytes;
            match l.groups.back_mut() {
                Some(g) if g.revision == rev => {
                    g.events.push(e);
                    g.bytes += bytes;
                }
                Some(g) if g.revision > rev => {
                    // Out of revision order: the contract rules it out.
                    // Keep the groups sorted anyway.
                    let pos = l.groups.partition_point(|g| g.revision < rev);
                    if l.groups[pos].revision == rev {
                        l.groups[pos].events.push(e);
                        l.groups[pos].bytes += bytes;
                    } else {
                        l.groups.insert(
                            pos,
                            Group {
                                revision: rev,
                                events: vec![e],
                                bytes,
                            },
                        );
                    }
                }
                _ => l.groups.push_back(Group {
                    revision: rev,
                    events: vec![e],
                    bytes,
                }),
            }
        }
        if let Some(g) = l.groups.back() {
            l.received = l.received.max(g.revision);
        }
        l.resolved = l.resolved.max(f.resolved);
        l.received = l.received.max(l.resolved);
    }

    fn min_resolved(&self) -> i64 {
        self.lanes.iter().map(|l| l.resolved).min().unwrap()
    }

    /// Releases every event up to the lanes' minimum watermark, if it moved.
    pub fn release(&mut self) -> Option<Release> {
        if self.end.is_some() {
            return None;
        }
        let m = self.min_resolved();
        if m <= self.released {
            return None;
        }
        let from = self.released + 1;
        let mut groups: Vec<(i64, usize, Group)> = Vec::new();
        for (i, l) in self.lanes.iter_mut().enumerate() {
            while l.groups.front().is_some_and(|g| g.revision <= m) {
                let g = l.groups.pop_front().unwrap();
                groups.push((g.revision, i, g));
            }
        }
        groups.sort_by_key(|(rev, lane, _)| (*rev, *lane));
        let mut events = Vec::with_capacity(groups.iter().map(|(_, _, g)| g.events.len()).sum());
        let mut bytes = 0;
        for (_, _, g) in groups {
            bytes += g.bytes;
            events.extend(g.events);
        }
        self.buffered -= bytes;
        self.released = m;
        Some(Release {
            from,
            through: m,
            events,
            bytes,
        })
    }

    /// What the driver should do now: subscriptions to open, acks and
    /// progress requests to send. Each is asked for once.
    pub fn actions(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        if self.end.is_some() {
            return out;
        }
        let min = self.min_resolved();
        // The oldest revision waiting for a lagging shard, else a target.
        let oldest_pending = self
            .lanes
            .iter()
            .filter_map(|l| l.groups.front().map(|g| g.revision))
            .min();
        let want = match oldest_pending {
            Some(p) if self.progress_target > self.released => p.min(self.progress_target),
            Some(p) => p,
            None if self.progress_target > self.released => self.progress_target,
            None => 0,
        };
        let over_budget = self.buffered > self.cfg.buffer_budget;
        let half = u64::from(self.cfg.window / 2).max(1);
        for (i, l) in self.lanes.iter_mut().enumerate() {
            match l.phase {
                Phase::Idle => {
                    l.phase = Phase::Subscribing;
                    out.push(Action::Subscribe {
                        lane: i,
                        shard: l.shard,
                        gen: l.gen,
                        request: WatchSubscribeRequest {
                            key: self.key.clone(),
                            range_end: self.range_end.clone(),
                            start_revision: l.received + 1,
                            prev_kv: true,
                            window: self.cfg.window,
                            expect_history: self.history,
                        },
                    });
                }
                Phase::Subscribing => {}
                Phase::Live => {
                    let unacked = l.last_seq - l.acked;
                    if unacked >= half && (!over_budget || l.resolved <= min) {
                        l.acked = l.last_seq;
                        out.push(Action::Ack {
                            lane: i,
                            gen: l.gen,
                            seq: l.last_seq,
                        });
                    }
                    if want > 0 && l.resolved < want && l.asked < want {
                        l.asked = want;
                        out.push(Action::Progress {
                            lane: i,
                            gen: l.gen,
                            revision: want,
                        });
                    }
                }
            }
        }
        out
    }
}

/// Encoded size of an event as a field of a `WatchResponse` (for budgets
/// and response sizes).
pub fn event_bytes(e: &Event) -> usize {
    prost::encoding::message::encoded_len(11, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::mvccpb::{event::EventType, KeyValue};

    pub(crate) fn put(key: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec().into(),
                value: format!("v{rev}").into_bytes().into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn frame(seq: u64, resolved: i64, events: Vec<Event>) -> WatchEventsResponse {
        WatchEventsResponse {
            seq,
            events,
            resolved,
            compact_revision: 0,
            history: 0,
        }
    }

    fn revs(r: &Release) -> Vec<(i64, String)> {
        r.events
            .iter()
            .map(|e| {
                (
                    event_revision(e),
                    String::from_utf8(e.kv.as_ref().unwrap().key.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    /// A merge over `n` shards from `start`, every lane subscribed (gen 0).
    fn live(n: u32, start: i64, cfg: MergeConfig) -> Merge {
        let shards: Vec<u32> = (0..n).collect();
        let mut m = Merge::new(b"a".to_vec(), b"b".to_vec(), start, &shards, 7, cfg);
        let acts = m.actions();
        assert_eq!(acts.len(), n as usize);
        for (i, a) in acts.iter().enumerate() {
            match a {
                Action::Subscribe {
                    lane,
                    shard,
                    gen,
                    request,
                } => {
                    assert_eq!((*lane, *shard, *gen), (i, i as u32, 0));
                    assert_eq!(request.start_revision, start);
                    assert!(request.prev_kv);
                    assert_eq!(request.key, b"a");
                    assert_eq!(request.range_end, b"b");
                }
                other => panic!("{other:?}"),
            }
        }
        for i in 0..n as usize {
            assert!(m.subscribed(i, 0));
        }
        m
    }

    fn progress_asks(acts: &[Action]) -> Vec<(usize, i64)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Progress { lane, revision, .. } => Some((*lane, *revision)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn interleaved_shards_release_whole_revisions_in_order() {
        let mut m = live(3, 10, MergeConfig::default());
        assert_eq!(m.released(), 9);
        assert_eq!(m.release(), None);
        // Shard 0 has rev 10 and 13, shard 1 has 11 (two keys, one txn
        // revision spread with shard 2), shard 2 has 11 and 12.
        m.frame(0, 0, frame(1, 13, vec![put("a0", 10), put("a1", 13)]));
        assert_eq!(m.release(), None, "shards 1 and 2 have resolved nothing");
        m.frame(1, 0, frame(1, 11, vec![put("b0", 11)]));
        assert_eq!(m.release(), None);
        m.frame(2, 0, frame(1, 12, vec![put("c0", 11), put("c1", 12)]));
        let r = m.release().unwrap();
        // min resolved = 11: revisions 10 and 11 (both of 11's events).
        assert_eq!((r.from, r.through), (10, 11));
        assert_eq!(
            revs(&r),
            vec![(10, "a0".into()), (11, "b0".into()), (11, "c0".into())]
        );
        assert_eq!(m.released(), 11);
        // Shard 1 resolves far ahead: 12 and 13 go out.
        m.frame(1, 0, frame(2, 20, vec![]));
        let r = m.release().unwrap();
        assert_eq!((r.from, r.through), (12, 12));
        assert_eq!(revs(&r), vec![(12, "c1".into())]);
        m.frame(2, 0, frame(2, 30, vec![]));
        let r = m.release().unwrap();
        assert_eq!((r.from, r.through), (13, 13));
        assert_eq!(revs(&r), vec![(13, "a1".into())]);
        assert_eq!(m.buffered(), 0);
        // Watermarks move without events: empty releases.
        m.frame(0, 0, frame(2, 25, vec![]));
        let r = m.release().unwrap();
        assert_eq!((r.from, r.through, r.events.len()), (14, 20, 0));
    }

    #[test]
    fn a_lagging_shard_holds_others_back_and_is_asked_for_progress() {
        let mut m = live(2, 1, MergeConfig::default());
        assert!(progress_asks(&m.actions()).is_empty(), "nothing pending");
        m.frame(0, 0, frame(1, 5, vec![put("a", 5)]));
        assert_eq!(m.release(), None);
        // Only the lagging shard 1 is asked, for the pending revision.
        assert_eq!(progress_asks(&m.actions()), vec![(1, 5)]);
        // Asked once.
        assert!(progress_asks(&m.actions()).is_empty());
        m.frame(0, 0, frame(2, 8, vec![put("a", 7)]));
        assert!(progress_asks(&m.actions()).is_empty(), "5 still oldest");
        // The heartbeat answers for 5 only.
        m.frame(1, 0, frame(1, 6, vec![]));
        let r = m.release().unwrap();
        assert_eq!(revs(&r), vec![(5, "a".into())]);
        // Now 7 waits for shard 1.
        assert_eq!(progress_asks(&m.actions()), vec![(1, 7)]);
        m.frame(1, 0, frame(2, 9, vec![]));
        assert_eq!(revs(&m.release().unwrap()), vec![(7, "a".into())]);
        assert!(progress_asks(&m.actions()).is_empty());
    }

    #[test]
    fn explicit_progress_targets_ask_every_lagging_shard() {
        let mut m = live(3, 1, MergeConfig::default());
        m.frame(0, 0, frame(1, 50, vec![]));
        m.want_progress(40);
        let asks = progress_asks(&m.actions());
        assert_eq!(asks, vec![(1, 40), (2, 40)]);
        m.frame(1, 0, frame(1, 45, vec![]));
        m.frame(2, 0, frame(1, 41, vec![]));
        let r = m.release().unwrap();
        assert_eq!(r.through, 41);
        assert!(progress_asks(&m.actions()).is_empty(), "target reached");
    }

    #[test]
    fn resubscribe_after_a_dropped_stream_resumes_without_loss_or_duplicates() {
        let mut m = live(2, 1, MergeConfig::default());
        m.frame(0, 0, frame(1, 4, vec![put("a", 3), put("b", 4)]));
        m.frame(1, 0, frame(1, 2, vec![put("c", 2)]));
        let r = m.release().unwrap();
        assert_eq!(revs(&r), vec![(2, "c".into())]);
        // Shard 0's connection drops; frames of the old stream still in
        // flight are ignored.
        m.lost(0, 0);
        m.frame(0, 0, frame(2, 9, vec![put("zzz", 9)]));
        let acts = m.actions();
        let sub = acts
            .iter()
            .find_map(|a| match a {
                Action::Subscribe {
                    lane, gen, request, ..
                } => Some((*lane, *gen, request.clone())),
                _ => None,
            })
            .unwrap();
        // Resume right after what was fully received (4), not after what
        // was released (2).
        assert_eq!((sub.0, sub.1, sub.2.start_revision), (0, 1, 5));
        assert!(m.subscribed(0, 1));
        // The new stream starts at seq 1 again; a (buggy) duplicate of 4 is
        // dropped.
        m.frame(0, 1, frame(1, 7, vec![put("b", 4), put("d", 6)]));
        m.frame(1, 0, frame(2, 10, vec![]));
        let r = m.release().unwrap();
        assert_eq!(
            revs(&r),
            vec![(3, "a".into()), (4, "b".into()), (6, "d".into())]
        );
        assert_eq!(r.through, 7);
        // A failed subscribe attempt is retried from the same point.
        m.lost(0, 1);
        let acts = m.actions();
        assert!(acts.iter().any(|a| matches!(a,
            Action::Subscribe { lane: 0, gen: 2, request, .. } if request.start_revision == 8)));
        m.lost(0, 2);
        let acts = m.actions();
        assert!(acts.iter().any(|a| matches!(a,
            Action::Subscribe { lane: 0, gen: 3, request, .. } if request.start_revision == 8)));
    }

    #[test]
    fn out_of_sequence_frames_resubscribe() {
        let mut m = live(1, 1, MergeConfig::default());
        m.frame(0, 0, frame(1, 2, vec![put("a", 2)]));
        m.frame(0, 0, frame(3, 5, vec![put("a", 4)]));
        let acts = m.actions();
        assert!(acts.iter().any(|a| matches!(a,
            Action::Subscribe { lane: 0, gen: 1, request, .. } if request.start_revision == 3)));
        assert_eq!(revs(&m.release().unwrap()), vec![(2, "a".into())]);
    }

    #[test]
    fn compaction_ends_the_merge() {
        let mut m = live(2, 3, MergeConfig::default());
        m.frame(
            1,
            0,
            WatchEventsResponse {
                seq: 1,
                events: vec![],
                resolved: 0,
                compact_revision: 7,
                history: 0,
            },
        );
        assert_eq!(m.end(), Some(&MergeEnd::Compacted(7)));
        assert_eq!(m.release(), None);
        assert!(m.actions().is_empty());
    }

    #[test]
    fn acks_in_half_windows_and_throttles_leading_lanes_over_budget() {
        let cfg = MergeConfig {
            window: 4,
            buffer_budget: 100,
            ..MergeConfig::default()
        };
        let mut m = live(2, 1, cfg);
        let acks = |acts: &[Action]| -> Vec<(usize, u64)> {
            acts.iter()
                .filter_map(|a| match a {
                    Action::Ack { lane, seq, .. } => Some((*lane, *seq)),
                    _ => None,
                })
                .collect()
        };
        m.frame(0, 0, frame(1, 1, vec![]));
        assert!(acks(&m.actions()).is_empty(), "1 < half window");
        m.frame(0, 0, frame(2, 1, vec![]));
        assert_eq!(acks(&m.actions()), vec![(0, 2)]);
        // Shard 0 runs ahead with big events while shard 1 lags: over the
        // budget, shard 0 is no longer acknowledged...
        let big = |rev| {
            let mut e = put("k", rev);
            e.kv.as_mut().unwrap().value = vec![0; 200].into();
            e
        };
        m.frame(0, 0, frame(3, 10, vec![big(10)]));
        m.frame(0, 0, frame(4, 11, vec![big(11)]));
        assert!(m.buffered() > 100);
        let acts = m.actions();
        assert!(acks(&acts).is_empty(), "leading lane throttled");
        assert_eq!(progress_asks(&acts), vec![(1, 10)]);
        // ...while the lagging lane (at the minimum) still is.
        m.frame(1, 0, frame(1, 5, vec![]));
        m.frame(1, 0, frame(2, 6, vec![]));
        assert_eq!(acks(&m.actions()), vec![(1, 2)]);
        // Once the laggard passes, the events go and acks resume.
        m.frame(1, 0, frame(3, 12, vec![]));
        let r = m.release().unwrap();
        assert_eq!(r.events.len(), 2);
        assert_eq!(m.buffered(), 0);
        assert_eq!(acks(&m.actions()), vec![(0, 4)]);
    }

    #[test]
    fn frames_before_the_subscribe_outcome_count() {
        let mut m = Merge::new(b"k".to_vec(), vec![], 5, &[3], 7, MergeConfig::default());
        let _ = m.actions();
        // The reader delivered a frame before the driver saw the
        // subscription open.
        m.frame(0, 0, frame(1, 5, vec![put("k", 5)]));
        assert!(m.subscribed(0, 0), "still this generation");
        assert!(!m.subscribed(0, 1), "a generation never asked for");
        assert_eq!(revs(&m.release().unwrap()), vec![(5, "k".into())]);
    }

    #[test]
    fn a_silent_lane_that_owes_progress_resubscribes_from_what_it_received() {
        let cfg = MergeConfig {
            silence_ticks: 3,
            ..MergeConfig::default()
        };
        let mut m = live(2, 1, cfg);
        m.frame(1, 0, frame(1, 4, vec![put("b", 4)]));
        assert!(!m.awaiting_answer(), "nobody asked yet");
        m.frame(0, 0, frame(1, 6, vec![put("a", 6)]));
        assert_eq!(m.release().unwrap().through, 4);
        // Lane 1 holds revision 6 back and is asked for it.
        assert_eq!(progress_asks(&m.actions()), vec![(1, 6)]);
        assert!(m.awaiting_answer());
        // Lane 0 (ahead, nothing owed) is never counted; lane 1 sends
        // nothing for two ticks, then a frame below the ask: the silence
        // count starts over.
        m.tick();
        m.tick();
        m.frame(1, 0, frame(2, 5, vec![]));
        assert_eq!(m.release().unwrap().through, 5);
        assert!(m.awaiting_answer(), "still owes 6");
        m.tick();
        m.tick();
        assert!(m.actions().is_empty(), "two silent ticks of three");
        m.tick();
        // Treated as lost: resubscribed from received + 1, new generation.
        let acts = m.actions();
        assert_eq!(acts.len(), 1, "{acts:?}");
        match &acts[0] {
            Action::Subscribe {
                lane, gen, request, ..
            } => {
                assert_eq!((*lane, *gen, request.start_revision), (1, 1, 6));
            }
            other => panic!("{other:?}"),
        }
        assert!(!m.awaiting_answer(), "a subscribing lane owes nothing");
        // The old generation's late frames are ignored; the new one
        // answers and the held event goes out, once.
        m.frame(1, 0, frame(3, 9, vec![]));
        assert_eq!(m.release(), None);
        assert!(m.subscribed(1, 1));
        m.frame(1, 1, frame(1, 7, vec![]));
        let r = m.release().unwrap();
        assert_eq!((r.through, revs(&r)), (6, vec![(6, "a".into())]));
        assert!(!m.awaiting_answer());
    }

    #[test]
    fn a_lane_whose_window_is_used_up_is_not_silent() {
        let cfg = MergeConfig {
            window: 4,
            buffer_budget: 0,
            silence_ticks: 1,
        };
        let mut m = live(3, 1, cfg);
        // Lane 2 holds revision 10; lanes 0 and 1 lag behind it. Lane 1
        // is ahead of the minimum (lane 0) while events are buffered over
        // budget, so its frames go unacknowledged until its window (4) is
        // used up: the shard cannot answer it.
        m.frame(2, 0, frame(1, 10, vec![put("c", 10)]));
        m.frame(0, 0, frame(1, 2, vec![]));
        for seq in 1..=4 {
            m.frame(1, 0, frame(seq, 2 + seq as i64, vec![]));
        }
        let _ = m.release();
        let acts = m.actions();
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, Action::Ack { lane: 1, .. })),
            "{acts:?}"
        );
        assert_eq!(progress_asks(&acts), vec![(0, 10), (1, 10)]);
        m.tick();
        let subscribes: Vec<usize> = m
            .actions()
            .iter()
            .filter_map(|a| match a {
                Action::Subscribe { lane, .. } => Some(*lane),
                _ => None,
            })
            .collect();
        assert_eq!(subscribes, vec![0], "the silent lane, not the blocked one");
    }
}
