//! Watch, shard side: the `WatchRing` every applied event goes into, and
//! the `Subscription` cursor that turns ring + MVCC history into one
//! subscriber's ordered stream.
//!
//! ## The ring
//! `ShardState::apply` — the one apply path every engine shares — returns
//! the events of each entry; the shard appends them, one [`RevisionBatch`]
//! per revision, to its `WatchRing`. No engine has, or can forget, a
//! notification path of its own. The ring is bounded (batches and bytes);
//! appending evicts the oldest batches and never waits for a reader. While
//! no subscription reads it, it keeps only a few hundred batches
//! ([`WatchRing::with_idle_batches`]): evicting from a full ring is a
//! cache miss per write that nobody would have read.
//!
//! The ring belongs to one shard's thread (thread per core): the writer (the
//! apply path) and the readers (this shard's subscriptions) run on the same
//! executor, so it needs neither locks nor atomics — readers are plain
//! sequence numbers into it, and a batch (`Rc`, events stored once) is
//! shared by every reader that sends it. An event's previous version is
//! kept as the write knew it: read, or only named (a plain put does not
//! read it; see `mvcc`, "A write's events"). The first subscriber that
//! wants it reads it ([`Mvcc::read_prev`]) and the ring keeps it for the
//! others; none wanting it, it is never read. A version compacted away
//! before anyone wanted it is sent as absent, as etcd does. A reader never
//! blocks the writer or other readers: whoever falls behind the oldest
//! batch is simply moved to MVCC history.
//!
//! ## A subscription
//! A subscription streams the events of one key range from a start
//! revision. Its state machine ([`Subscription::poll`]) does no I/O: given
//! the ring, the MVCC store and the shard's resolved watermark, it yields
//! the next frame to send, if any. Invariants:
//! - `next_from`: every matching event with revision < `next_from` has been
//!   sent; none with revision >= it has. `next_from - 1` is the `resolved`
//!   reported to the gateway, and it never passes the shard's watermark, so
//!   no event below it can still appear.
//! - History mode reads MVCC history from `next_from` up to the watermark
//!   (whole revisions per frame). When history has caught up and the ring
//!   still holds every batch at or above `next_from`
//!   (`ring.covers_from(next_from)`), it switches to ring mode.
//! - Ring mode reads batches in append order. Append order is not always
//!   revision order (a cross-shard commit may apply at a revision below
//!   ones applied before it), so batches above the watermark wait in
//!   `pending` and are released in revision order once resolved.
//! - Falling behind the ring (its batches evicted before being read) drops
//!   `pending` and returns to history mode at `next_from`: nothing is lost
//!   or sent twice.
//! - At most `window` frames are unacknowledged.

use std::cell::OnceCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use metastore_proto::mvccpb::{Event, KeyValue};
use metastore_proto::shardpb::WatchEventsResponse;

use crate::mvcc::{Mvcc, MvccError, Replaced, WriteEvent};

/// Batches the ring keeps at most.
pub const RING_BATCHES: usize = 16_384;
/// Bytes of events the ring keeps at most.
pub const RING_BYTES: usize = 64 << 20;
/// Batches the shard's ring keeps while no subscription reads it (see
/// [`WatchRing::with_idle_batches`]).
pub const IDLE_RING_BATCHES: usize = 256;
/// Events read from history per frame (whole revisions, so may exceed it).
pub const HISTORY_CHUNK: usize = 1_000;
/// A subscription whose watermark moved sends a heartbeat this often.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// Default number of unacknowledged frames.
pub const DEFAULT_WINDOW: u64 = 64;

/// The events of one revision on one shard. Most revisions have one event
/// here: it is kept inline, in the batch's own allocation, and only the
/// events after it take a vector. Evicting a batch frees its memory long
/// after it was written, out of cache; each block fewer is a cache miss
/// fewer.
#[derive(Debug)]
pub struct RevisionBatch {
    pub revision: i64,
    first: RingEvent,
    rest: Vec<RingEvent>,
    bytes: usize,
}

impl RevisionBatch {
    /// The batch's events, in sub-revision order.
    fn events(&self) -> impl Iterator<Item = &RingEvent> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

/// An event in the ring, with its previous version once a subscriber read
/// it (see the module essay).
#[derive(Debug)]
struct RingEvent {
    write: WriteEvent,
    prev_read: OnceCell<Option<KeyValue>>,
}

impl RingEvent {
    /// The event as a subscriber sends it: with its previous version if
    /// `prev_kv` (read now if nobody has yet), else without.
    fn to_send(&self, prev_kv: bool, mvcc: &Mvcc) -> Event {
        let w = &self.write;
        let prev = match w.watched_prev() {
            _ if !prev_kv => None,
            Replaced::Read(kv) => Some(kv.clone()),
            Replaced::Stored(stored) => self
                .prev_read
                .get_or_init(|| mvcc.read_prev(w.key(), stored))
                .clone(),
            Replaced::Nothing => None,
        };
        Event {
            r#type: w.kind as i32,
            kv: Some(w.kv.clone()),
            prev_kv: prev,
        }
    }
}

/// The shard's bounded ring of applied events (see the module essay).
pub struct WatchRing {
    batches: VecDeque<Rc<RevisionBatch>>,
    first_seq: u64,
    bytes: usize,
    max_batches: usize,
    max_bytes: usize,
    /// The highest revision no longer in the ring (evicted, or applied
    /// before the ring existed).
    max_evicted: i64,
    /// Subscriptions reading the ring now.
    readers: usize,
    /// Batches kept while `readers` is 0 (`max_batches` if not set).
    idle_batches: usize,
}

fn event_revision(e: &Event) -> i64 {
    e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0)
}

/// Bytes an event holds in the ring: a previous version not read yet is
/// counted as the size of the new one (it is read into the ring later).
fn event_size(w: &WriteEvent) -> usize {
    let kv = |kv: &KeyValue| kv.key.len() + kv.value.len() + 48;
    let prev = match w.watched_prev() {
        Replaced::Read(p) => kv(p),
        Replaced::Stored(_) => kv(&w.kv),
        Replaced::Nothing => 0,
    };
    kv(&w.kv) + prev + 16
}

impl WatchRing {
    /// An empty ring; everything up to `applied_revision` is history only.
    pub fn new(applied_revision: i64, max_batches: usize, max_bytes: usize) -> Self {
        WatchRing {
            batches: VecDeque::new(),
            first_seq: 0,
            bytes: 0,
            max_batches: max_batches.max(1),
            max_bytes,
            max_evicted: applied_revision,
            readers: 0,
            idle_batches: max_batches.max(1),
        }
    }

    /// While no subscription reads it, the ring keeps only the newest
    /// `batches` batches. Nothing needs the older ones then: a subscription
    /// that starts in the past reads history until the ring covers it, as
    /// one that fell behind does. What it saves is the eviction of a full
    /// ring: a batch freed thousands of writes after it was made is out of
    /// the CPU's caches (its block, its event's buffers' reference counts),
    /// and that cost every write when nobody watches. A ring larger than
    /// this when its last reader leaves shrinks by one batch per append,
    /// not all at once, so no write pays for freeing a whole ring.
    pub fn with_idle_batches(mut self, batches: usize) -> Self {
        self.idle_batches = batches.clamp(1, self.max_batches);
        self
    }

    /// A subscription started reading the ring.
    pub fn reader_joined(&mut self) {
        self.readers += 1;
    }
    /// A subscription stopped reading the ring.
    pub fn reader_left(&mut self) {
        self.readers -= 1;
    }

    /// Appends the events of one applied revision (taken from a vector the
    /// caller keeps, or any other source); false if there were none.
    pub fn push(&mut self, events: impl IntoIterator<Item = WriteEvent>) -> bool {
        let mut bytes = 0;
        let mut events = events.into_iter().map(|write| {
            bytes += event_size(&write);
            RingEvent {
                write,
                prev_read: OnceCell::new(),
            }
        });
        let Some(first) = events.next() else {
            return false;
        };
        let revision = first.write.revision();
        let rest = events.collect();
        self.batches.push_back(Rc::new(RevisionBatch {
            revision,
            first,
            rest,
            bytes,
        }));
        self.bytes += bytes;
        while self.batches.len() > self.max_batches
            || (self.bytes > self.max_bytes && self.batches.len() > 1)
        {
            self.evict_oldest();
        }
        if self.readers == 0 {
            for _ in 0..2 {
                if self.batches.len() <= self.idle_batches {
                    break;
                }
                self.evict_oldest();
            }
        }
        true
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.batches.pop_front() {
            self.bytes -= old.bytes;
            self.max_evicted = self.max_evicted.max(old.revision);
            self.first_seq += 1;
        }
    }

    /// Sequence number of the oldest batch held.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }
    /// Sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.batches.len() as u64
    }
    /// The batch with sequence number `seq`, if still held.
    pub fn get(&self, seq: u64) -> Option<&Rc<RevisionBatch>> {
        seq.checked_sub(self.first_seq)
            .and_then(|i| self.batches.get(i as usize))
    }
    /// Whether every applied batch with revision >= `rev` is in the ring.
    pub fn covers_from(&self, rev: i64) -> bool {
        self.max_evicted < rev
    }
    pub fn len(&self) -> usize {
        self.batches.len()
    }
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// Where a subscription reads next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    History,
    Ring { seq: u64 },
}

/// What one `poll` produced.
#[derive(Debug, PartialEq)]
pub enum Poll {
    /// Send this frame.
    Frame(WatchEventsResponse),
    /// Nothing to send until something changes.
    Idle,
    /// Nothing to send yet, but history is left to read: poll again once
    /// other tasks had their turn (a chunk at a time, so a long replay does
    /// not hold the shard).
    More,
    /// The start revision was compacted: send this frame and end.
    Compacted(WatchEventsResponse),
}

/// One subscriber's cursor (see the module essay).
pub struct Subscription {
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    mode: Mode,
    next_from: i64,
    pending: BTreeMap<i64, Vec<Event>>,
    seq: u64,
    acked: u64,
    window: u64,
    sent_resolved: i64,
    last_frame: Option<Instant>,
    progress_want: Option<i64>,
}

impl Subscription {
    /// A subscription from `start_revision` (0: after `current`).
    pub fn new(
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
        prev_kv: bool,
        window: u64,
        current: i64,
        ring: &WatchRing,
    ) -> Self {
        let (mode, next_from) = if start_revision <= 0 {
            (
                Mode::Ring {
                    seq: ring.next_seq(),
                },
                current + 1,
            )
        } else {
            (Mode::History, start_revision)
        };
        Subscription {
            key,
            range_end,
            prev_kv,
            mode,
            next_from,
            pending: BTreeMap::new(),
            seq: 0,
            acked: 0,
            window: if window == 0 { DEFAULT_WINDOW } else { window },
            sent_resolved: next_from - 1,
            last_frame: None,
            progress_want: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Every matching event below this revision has been sent.
    pub fn next_from(&self) -> i64 {
        self.next_from
    }

    /// The gateway consumed frames up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq.min(self.seq));
    }

    /// The gateway wants a frame as soon as resolved >= `revision`.
    pub fn want_progress(&mut self, revision: i64) {
        self.progress_want = Some(self.progress_want.map_or(revision, |w| w.max(revision)));
    }

    fn matches(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            return key == self.key.as_slice();
        }
        if key < self.key.as_slice() {
            return false;
        }
        self.range_end == [0] || key < self.range_end.as_slice()
    }

    fn matches_event(&self, e: &Event) -> bool {
        e.kv.as_ref().is_some_and(|kv| self.matches(&kv.key))
    }

    /// The next frame to send, given the ring, history and the shard's
    /// resolved watermark.
    pub fn poll(&mut self, ring: &WatchRing, mvcc: &Mvcc, resolved: i64, now: Instant) -> Poll {
        if self.seq - self.acked >= self.window {
            return Poll::Idle;
        }
        let mut events = Vec::new();
        let mut history_left = false;
        if let Mode::Ring { seq } = self.mode {
            if seq < ring.first_seq() {
                // Fell behind: what is pending is above the watermark and
                // will be read again from history.
                self.pending.clear();
                self.mode = Mode::History;
            }
        }
        match self.mode {
            Mode::History => {
                if self.next_from <= resolved {
                    match self.read_history(mvcc, resolved, &mut events) {
                        Ok(complete) => history_left = !complete,
                        Err(MvccError::Compacted) => {
                            self.seq += 1;
                            return Poll::Compacted(WatchEventsResponse {
                                seq: self.seq,
                                events: vec![],
                                resolved: self.next_from - 1,
                                compact_revision: mvcc.compacted_revision(),
                                history: 0,
                            });
                        }
                        Err(e) => panic!("watch history read failed: {e}"),
                    }
                }
                if self.next_from > resolved && ring.covers_from(self.next_from) {
                    self.mode = Mode::Ring {
                        seq: ring.first_seq(),
                    };
                }
            }
            Mode::Ring { .. } => {}
        }
        if let Mode::Ring { seq } = self.mode {
            for s in seq..ring.next_seq() {
                let batch = ring.get(s).expect("seq within the ring");
                if batch.revision < self.next_from {
                    continue;
                }
                let matching: Vec<Event> = batch
                    .events()
                    .filter(|e| self.matches(e.write.key()))
                    .map(|e| e.to_send(self.prev_kv, mvcc))
                    .collect();
                if !matching.is_empty() {
                    self.pending
                        .entry(batch.revision)
                        .or_default()
                        .extend(matching);
                }
            }
            self.mode = Mode::Ring {
                seq: ring.next_seq(),
            };
            while let Some(entry) = self.pending.first_entry() {
                if *entry.key() > resolved {
                    break;
                }
                events.extend(entry.remove());
            }
            if resolved >= self.next_from {
                self.next_from = resolved + 1;
            }
        }
        let released = self.next_from - 1;
        let heartbeat_due = released > self.sent_resolved
            && self
                .last_frame
                .is_none_or(|t| now.duration_since(t) >= HEARTBEAT);
        let progress_due = self.progress_want.is_some_and(|w| w <= released);
        if events.is_empty() && !heartbeat_due && !progress_due {
            return if history_left { Poll::More } else { Poll::Idle };
        }
        if progress_due {
            self.progress_want = None;
        }
        self.seq += 1;
        self.sent_resolved = released;
        self.last_frame = Some(now);
        Poll::Frame(WatchEventsResponse {
            seq: self.seq,
            events,
            resolved: released,
            compact_revision: 0,
            history: 0,
        })
    }

    /// Appends matching history events from `next_from` on, whole
    /// revisions, up to `resolved` and about `HISTORY_CHUNK` events read
    /// (matching or not). Whether it read everything up to `resolved`.
    fn read_history(
        &mut self,
        mvcc: &Mvcc,
        resolved: i64,
        out: &mut Vec<Event>,
    ) -> Result<bool, MvccError> {
        let mut last_rev = self.next_from - 1;
        let mut seen = 0usize;
        let mut complete = true;
        let from = self.next_from;
        let prev_kv = self.prev_kv;
        mvcc.history(from, prev_kv, &mut |e: Event| {
            let rev = event_revision(&e);
            if rev > resolved {
                return false;
            }
            if seen >= HISTORY_CHUNK && rev != last_rev {
                complete = false;
                return false;
            }
            seen += 1;
            last_rev = rev;
            if self.matches_event(&e) {
                out.push(e);
            }
            true
        })?;
        self.next_from = if complete { resolved + 1 } else { last_rev + 1 };
        Ok(complete)
    }
}

#[cfg(test)]
mod tests {
    //! Scripted scenarios: writes through a real MVCC store (both engines),
    //! events into a ring, a subscription polled step by step.
    use super::*;
    use crate::engine::{open, EngineKind};
    use metastore_proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    struct Scene {
        mvcc: Mvcc,
        ring: WatchRing,
        _dir: tempfile::TempDir,
    }

    impl Scene {
        fn new(kind: EngineKind, ring_batches: usize) -> Scene {
            let dir = tempfile::tempdir().unwrap();
            let engine = open(kind, dir.path()).unwrap();
            Scene {
                mvcc: Mvcc::open(engine).unwrap(),
                ring: WatchRing::new(0, ring_batches, RING_BYTES),
                _dir: dir,
            }
        }
        fn put(&mut self, rev: i64, key: &str, value: &str) {
            let mut w = self.mvcc.write(rev);
            w.put(&PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: value.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .unwrap();
            let (b, ev) = w.finish_with_events();
            self.mvcc.engine().write(b, false).unwrap();
            self.ring.push(ev);
        }
        fn delete(&mut self, rev: i64, key: &str, end: &str) {
            let mut w = self.mvcc.write(rev);
            w.delete_range(
                &DeleteRangeRequest {
                    key: key.into(),
                    range_end: end.into(),
                    ..Default::default()
                },
                &|_: &[u8]| true,
            )
            .unwrap();
            let (b, ev) = w.finish_with_events();
            self.mvcc.engine().write(b, false).unwrap();
            self.ring.push(ev);
        }
        fn sub(&self, key: &str, end: &str, start: i64, current: i64) -> Subscription {
            Subscription::new(key.into(), end.into(), start, true, 0, current, &self.ring)
        }
        /// Polls until idle; returns (revision, key) of every event and the
        /// last resolved sent.
        fn drain(&self, sub: &mut Subscription, resolved: i64) -> (Vec<(i64, String)>, i64) {
            let mut out = Vec::new();
            let mut last = -1;
            let now = Instant::now();
            for _ in 0..1000 {
                match sub.poll(&self.ring, &self.mvcc, resolved, now) {
                    Poll::Frame(f) => {
                        sub.ack(f.seq);
                        last = f.resolved;
                        for e in f.events {
                            let kv = e.kv.unwrap();
                            out.push((
                                kv.mod_revision,
                                String::from_utf8(kv.key.to_vec()).unwrap(),
                            ));
                        }
                    }
                    Poll::Idle => return (out, last),
                    Poll::More => {}
                    Poll::Compacted(_) => panic!("unexpected compaction"),
                }
            }
            panic!("subscription never went idle");
        }
    }

    /// A watch of a key that history holds rarely reads through the
    /// history in chunks without waiting between them: the subscription
    /// asks to be polled again at once, and its first frame comes when
    /// there is something to send.
    #[test]
    fn a_sparse_history_is_read_through_without_waiting() {
        each_engine(|kind| {
            let mut sc = Scene::new(kind, 100);
            for rev in 2..=2 + 3 * HISTORY_CHUNK as i64 {
                sc.put(rev, "z", "v");
            }
            let last = 3 + 3 * HISTORY_CHUNK as i64;
            sc.put(last, "k", "v");
            let mut sub = sc.sub("k", "", 1, last);
            // A fixed `now`: no heartbeat falls due after the first frame.
            let now = Instant::now();
            let mut more = 0;
            let frame = loop {
                match sub.poll(&sc.ring, &sc.mvcc, last, now) {
                    Poll::More => more += 1,
                    Poll::Frame(f) if f.events.is_empty() => sub.ack(f.seq),
                    Poll::Frame(f) => break f,
                    Poll::Idle => panic!("{kind}: idle with history left ({more} chunks)"),
                    other => panic!("{kind}: {other:?}"),
                }
            };
            assert_eq!(frame.events.len(), 1, "{kind}");
            assert_eq!(frame.events[0].kv.as_ref().unwrap().mod_revision, last);
            assert!(more >= 2, "{kind}: read in chunks ({more} asked for more)");
        });
    }

    fn each_engine(f: impl Fn(EngineKind)) {
        f(EngineKind::Memory);
        f(EngineKind::RocksDb);
    }

    fn evs(v: &[(i64, &str)]) -> Vec<(i64, String)> {
        v.iter().map(|(r, k)| (*r, k.to_string())).collect()
    }

    #[test]
    fn live_subscription_sees_new_events_once_in_order() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            s.put(1, "a", "1");
            let mut sub = s.sub("a", "b", 0, 1);
            s.put(3, "a", "2");
            s.put(5, "z", "x"); // outside the range
            s.put(7, "a", "3");
            let (got, resolved) = s.drain(&mut sub, 7);
            assert_eq!(got, evs(&[(3, "a"), (7, "a")]));
            assert_eq!(resolved, 7);
            // Nothing new: idle, no duplicates.
            assert_eq!(s.drain(&mut sub, 7).0, vec![]);
            assert_eq!(sub.mode(), Mode::Ring { seq: 4 });
        });
    }

    #[test]
    fn events_above_the_watermark_wait_and_come_out_in_revision_order() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            let mut sub = s.sub("", "\0", 0, 0);
            // Applied in this order: 5 (a commit below the watermark
            // arrives later), then 4.
            s.put(5, "b", "1");
            let (got, resolved) = s.drain(&mut sub, 3);
            assert_eq!(got, vec![]);
            assert_eq!(resolved, 3);
            s.put(4, "a", "1");
            let (got, _) = s.drain(&mut sub, 5);
            assert_eq!(got, evs(&[(4, "a"), (5, "b")]));
        });
    }

    #[test]
    fn replay_from_history_then_hand_off_to_the_ring() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            for r in 1..=5 {
                s.put(r, &format!("k{r}"), "v");
            }
            let mut sub = s.sub("k", "l", 2, 5);
            assert_eq!(sub.mode(), Mode::History);
            let (got, _) = s.drain(&mut sub, 5);
            assert_eq!(got, evs(&[(2, "k2"), (3, "k3"), (4, "k4"), (5, "k5")]));
            assert!(matches!(sub.mode(), Mode::Ring { .. }));
            s.put(6, "k6", "v");
            assert_eq!(s.drain(&mut sub, 6).0, evs(&[(6, "k6")]));
        });
    }

    #[test]
    fn a_reader_behind_the_ring_catches_up_from_history() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 4);
            let mut sub = s.sub("k", "l", 0, 0);
            s.put(1, "k1", "v");
            assert_eq!(s.drain(&mut sub, 1).0, evs(&[(1, "k1")]));
            // Ten more revisions while the reader sleeps: the ring (4
            // batches) wraps past it.
            for r in 2..=11 {
                s.put(r, &format!("k{r}"), "v");
            }
            let (got, _) = s.drain(&mut sub, 11);
            let want: Vec<(i64, String)> = (2..=11).map(|r| (r, format!("k{r}"))).collect();
            assert_eq!(got, want);
            assert!(matches!(sub.mode(), Mode::Ring { .. }));
        });
    }

    #[test]
    fn an_unread_ring_keeps_its_idle_size_and_a_late_reader_uses_history() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            s.ring = WatchRing::new(0, 100, RING_BYTES).with_idle_batches(3);
            for r in 1..=10 {
                s.put(r, &format!("k{r:02}"), "v");
            }
            assert_eq!(s.ring.len(), 3);
            assert!(!s.ring.covers_from(7) && s.ring.covers_from(8));
            // A reader from revision 2 replays history, then reads the ring,
            // which grows to its full size while it is read.
            s.ring.reader_joined();
            let mut sub = s.sub("k", "l", 2, 10);
            let want: Vec<(i64, String)> = (2..=10).map(|r| (r, format!("k{r:02}"))).collect();
            assert_eq!(s.drain(&mut sub, 10).0, want);
            for r in 11..=30 {
                s.put(r, &format!("k{r:02}"), "v");
            }
            assert_eq!(s.ring.len(), 23);
            let want: Vec<(i64, String)> = (11..=30).map(|r| (r, format!("k{r:02}"))).collect();
            assert_eq!(s.drain(&mut sub, 30).0, want);
            // The last reader gone, each append evicts one batch more than
            // it adds until the idle size is back.
            s.ring.reader_left();
            s.put(31, "k31", "v");
            assert_eq!(s.ring.len(), 22);
            for r in 32..=60 {
                s.put(r, &format!("k{r:02}"), "v");
            }
            assert_eq!(s.ring.len(), 3);
            assert!(s.ring.covers_from(58));
        });
    }

    #[test]
    fn window_limits_unacknowledged_frames() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            let mut sub = Subscription::new(b"k".to_vec(), b"l".to_vec(), 0, false, 1, 0, &s.ring);
            s.put(1, "k1", "v");
            let now = Instant::now();
            let Poll::Frame(f) = sub.poll(&s.ring, &s.mvcc, 1, now) else {
                panic!("expected a frame")
            };
            s.put(2, "k2", "v");
            assert_eq!(sub.poll(&s.ring, &s.mvcc, 2, now), Poll::Idle);
            sub.ack(f.seq);
            let Poll::Frame(f2) = sub.poll(&s.ring, &s.mvcc, 2, now) else {
                panic!("expected a frame after the ack")
            };
            assert_eq!(f2.events.len(), 1);
            assert!(f2.events[0].prev_kv.is_none());
        });
    }

    #[test]
    fn deletes_carry_prev_kv_and_all_events_of_a_revision_travel_together() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            s.put(1, "p/a", "1");
            s.put(2, "p/b", "2");
            let mut sub = s.sub("p/", "p0", 0, 2);
            s.delete(3, "p/", "p0");
            let now = Instant::now();
            let Poll::Frame(f) = sub.poll(&s.ring, &s.mvcc, 3, now) else {
                panic!("expected a frame")
            };
            assert_eq!(f.events.len(), 2);
            assert!(f
                .events
                .iter()
                .all(|e| e.prev_kv.is_some() && e.r#type == 1));
        });
    }

    #[test]
    fn a_previous_version_is_read_once_when_wanted_and_absent_once_compacted() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            s.put(1, "k", "1");
            let mut with = s.sub("k", "", 0, 1);
            let mut other = s.sub("k", "", 0, 1);
            let mut without = Subscription::new("k".into(), "".into(), 0, false, 0, 1, &s.ring);
            s.put(2, "k", "2");
            s.put(3, "k", "3");
            let now = Instant::now();
            let prevs = |sub: &mut Subscription, s: &Scene| -> Vec<Option<String>> {
                let Poll::Frame(f) = sub.poll(&s.ring, &s.mvcc, 3, now) else {
                    panic!("expected a frame")
                };
                f.events
                    .iter()
                    .map(|e| {
                        e.prev_kv
                            .as_ref()
                            .map(|p| String::from_utf8_lossy(&p.value).into_owned())
                    })
                    .collect()
            };
            let want = vec![Some("1".to_string()), Some("2".to_string())];
            assert_eq!(prevs(&mut with, &s), want);
            assert_eq!(prevs(&mut without, &s), vec![None, None]);
            // Version 2 is compacted away: the ring kept what `with` read,
            // so `other` still gets it.
            let batch = s.mvcc.compact(3).unwrap();
            s.mvcc.engine().write(batch, false).unwrap();
            assert_eq!(prevs(&mut other, &s), want);
            // An event whose previous version nobody read before the
            // compaction removed it goes out without one, as etcd sends it;
            // the version live at the compacted revision stays readable.
            s.put(4, "k", "4");
            s.put(5, "k", "5");
            let batch = s.mvcc.compact(4).unwrap();
            s.mvcc.engine().write(batch, false).unwrap();
            let Poll::Frame(f) = with.poll(&s.ring, &s.mvcc, 5, now) else {
                panic!("expected a frame")
            };
            let got: Vec<(i64, bool)> = f
                .events
                .iter()
                .map(|e| (e.kv.as_ref().unwrap().mod_revision, e.prev_kv.is_some()))
                .collect();
            assert_eq!(got, vec![(4, false), (5, true)]);
        });
    }

    #[test]
    fn compacted_start_revision_ends_the_subscription() {
        each_engine(|kind| {
            let mut s = Scene::new(kind, 100);
            for r in 1..=4 {
                s.put(r, "k", "v");
            }
            let b = s.mvcc.compact(3).unwrap();
            s.mvcc.engine().write(b, false).unwrap();
            let mut sub = s.sub("k", "", 2, 4);
            match sub.poll(&s.ring, &s.mvcc, 4, Instant::now()) {
                Poll::Compacted(f) => assert_eq!(f.compact_revision, 3),
                other => panic!("expected compaction, got {other:?}"),
            }
        });
    }

    #[test]
    fn heartbeats_and_progress_requests() {
        each_engine(|kind| {
            let s = Scene::new(kind, 100);
            let mut sub = s.sub("k", "", 0, 5);
            let t0 = Instant::now();
            // The watermark moved (another shard wrote): first heartbeat at once.
            let Poll::Frame(f) = sub.poll(&s.ring, &s.mvcc, 8, t0) else {
                panic!("expected a heartbeat")
            };
            assert_eq!(f.resolved, 8);
            sub.ack(f.seq);
            // Moved again right after: no heartbeat before the interval...
            assert_eq!(sub.poll(&s.ring, &s.mvcc, 9, t0), Poll::Idle);
            // ...unless asked for.
            sub.want_progress(9);
            let Poll::Frame(f) = sub.poll(&s.ring, &s.mvcc, 9, t0) else {
                panic!("expected a progress frame")
            };
            assert_eq!(f.resolved, 9);
            sub.ack(f.seq);
            assert!(matches!(
                sub.poll(&s.ring, &s.mvcc, 10, t0 + HEARTBEAT),
                Poll::Frame(_)
            ));
        });
    }
}
