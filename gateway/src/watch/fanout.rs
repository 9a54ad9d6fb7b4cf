//! Fan-out: from one feed's releases to many watchers, without letting any
//! watcher slow the feed or the others.
//!
//! # Inbox (one per gRPC Watch stream)
//!
//! Everything a stream will send passes through its [`Inbox`], one FIFO:
//! control responses the stream itself queues (created, canceled), event
//! batches and progress markers pushed by feeds, and end notices. FIFO
//! order is what makes the stream's promises cheap: a `created` response is
//! queued before the watcher is attached to a feed, so it precedes every
//! event; a progress marker a feed pushes after a batch is popped after
//! that batch was sent.
//!
//! Pushing never blocks. Each watcher (a *slot*) has a byte budget: the
//! encoded size of its batches queued and not yet popped. A batch that
//! would take a non-empty slot over its budget is refused: the feed drops
//! that watcher and queues an [`Item::Overflow`] naming the first revision
//! it did not take. The stream sends what was queued before it, then
//! switches the watcher to another feed from that revision (a catch-up
//! from history), so a slow watcher is never silently dropped and never
//! holds anything but its own budget. (A batch bigger than the budget is
//! still accepted into an empty slot, or a huge transaction could never be
//! delivered.)
//!
//! # Coalescing
//!
//! A batch pushed for a slot whose last queued item is still an
//! [`Item::Events`] with nothing queued for that slot behind it joins that
//! item instead of queueing a new one (up to [`MAX_COALESCED_BYTES`] per
//! item). So a stream that fell behind pops one item per watcher holding
//! every revision released meanwhile, and sends them in one response, as
//! etcd does for a watcher that catches up. What a slot sees is unchanged:
//! its batches in order, and every marker (progress, overflow, end) after
//! exactly the batches pushed before it — a marker closes the slot's item,
//! and so does a [`Inbox::push_response`] for every slot (nothing crosses
//! a stream response). Only the interleaving of *different* slots' items
//! changes, which no watcher can observe. Budgets count the same bytes;
//! they are released when the item is popped.
//!
//! Feeds push a release to all their watchers quietly and wake each
//! stream once at the end ([`Inbox::push_events_quiet`], [`Inbox::wake`]),
//! so a stream handles the whole release in one go instead of racing the
//! pushes item by item. An item that took a batch was queued before, so
//! its stream is already due to pop it: no wake-up is needed for it.
//!
//! # FanOut (one per feed)
//!
//! The feed's subscribers, each with its start revision (it takes only
//! events at or above it) and an optional progress target (push a marker
//! once the feed has released that far). A watcher can join a live feed if
//! its start is above what the feed has released. [`FanOut`] also keeps a
//! short *tail* of recent batches: it covers every released event with
//! revision above `tail_floor`, so a watcher starting "now" (whose start,
//! taken from the oracle before it attaches, may already be behind a busy
//! feed) or resuming after an overflow can join late and be seeded from
//! the tail instead of opening its own subscriptions. Watchers with an
//! explicit start revision do not use the tail: whether that revision is
//! compacted is for a shard to say (etcd's `compact_revision`).
//!
//! Invariant (per subscriber): when the feed has released through `R`,
//! every event in `[start, R]` has been pushed to its inbox, in order, or
//! an overflow marker names the first one that was not.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use metastore_proto::etcdserverpb::WatchResponse;
use metastore_proto::mvccpb::Event;

use super::merge::{event_revision, MergeEnd, Release};
use super::wire::EncodingCache;

/// A map keyed by slot. Slots are numbers a stream hands out in sequence,
/// never chosen by a client, so they need no flooding-resistant hash: one
/// multiply spreads them (its high bits pick the control byte, its low
/// bits — distinct for consecutive slots — the bucket). The maps are
/// looked up for every event delivered to every watcher.
pub type SlotMap<V> = HashMap<u64, V, BuildHasherDefault<SlotHasher>>;

/// See [`SlotMap`].
#[derive(Clone, Copy, Default)]
pub struct SlotHasher(u64);

impl Hasher for SlotHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Released events of revisions `from..=through` (possibly none), shared by
/// every watcher that receives them.
#[derive(Debug, Default, PartialEq)]
pub struct Batch {
    pub from: i64,
    pub through: i64,
    pub events: Vec<Event>,
    pub bytes: usize,
    /// `events` encoded for responses, once for all watchers.
    pub encoded: EncodingCache,
}

impl From<Release> for Batch {
    fn from(r: Release) -> Batch {
        Batch {
            from: r.from,
            through: r.through,
            events: r.events,
            bytes: r.bytes,
            encoded: EncodingCache::default(),
        }
    }
}

impl Batch {
    /// Whether any event has revision >= `rev`.
    pub fn has_events_from(&self, rev: i64) -> bool {
        self.events.last().is_some_and(|e| event_revision(e) >= rev)
    }
}

/// One thing a stream will send (or act on), in order.
#[derive(Debug)]
pub enum Item {
    /// A response ready to go (created, canceled, errors).
    Response(WatchResponse),
    /// Released batches for `slot`, ascending (see "Coalescing" in the
    /// module docs).
    Events { slot: u64, batches: Batches },
    /// The slot's feed has released everything up to `through`.
    Progress { slot: u64, through: i64 },
    /// The slot was dropped from its feed; resume at `resume_from`.
    Overflow { slot: u64, resume_from: i64 },
    /// The slot's feed ended for good.
    Ended { slot: u64, end: MergeEnd },
}

/// Outcome of pushing a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued as a new item: the stream needs a wake-up.
    Queued,
    /// Appended to the slot's queued events item (its wake-up is pending).
    Coalesced,
    /// Refused: over budget (an overflow marker was queued).
    Overflow,
    /// The slot no longer exists (cancelled, or the stream ended).
    Gone,
}

impl Push {
    /// The batch was taken (queued or coalesced).
    pub fn accepted(self) -> bool {
        matches!(self, Push::Queued | Push::Coalesced)
    }
}

/// The batches of one [`Item::Events`], ascending: never empty, the first
/// held inline (most items hold one).
#[derive(Debug)]
pub struct Batches {
    first: Arc<Batch>,
    more: Vec<Arc<Batch>>,
    bytes: usize,
}

impl Batches {
    pub fn new(first: Arc<Batch>) -> Batches {
        Batches {
            bytes: first.bytes,
            first,
            more: Vec::new(),
        }
    }

    fn push(&mut self, b: Arc<Batch>) {
        self.bytes += b.bytes;
        self.more.push(b);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Batch>> {
        std::iter::once(&self.first).chain(self.more.iter())
    }

    pub fn last(&self) -> &Arc<Batch> {
        self.more.last().unwrap_or(&self.first)
    }

    /// Number of batches.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        1 + self.more.len()
    }

    /// Encoded size of all their events (`Batch::bytes` summed).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A queued events item may take further batches while it holds less
/// than this (bounds what one pop hands the stream at once).
pub const MAX_COALESCED_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
struct Slot {
    bytes: usize,
    /// Sequence number of the slot's events item still queued with
    /// nothing queued for the slot behind it.
    open: Option<u64>,
}

#[derive(Debug, Default)]
struct InboxState {
    items: VecDeque<Item>,
    /// Sequence number of `items[0]` (one per item ever queued).
    head: u64,
    slots: SlotMap<Slot>,
    closed: bool,
}

impl InboxState {
    fn push(&mut self, item: Item) -> u64 {
        let seq = self.head + self.items.len() as u64;
        self.items.push_back(item);
        seq
    }

    /// Nothing queued may take further batches (its successors changed).
    fn close_tickets(&mut self) {
        for s in self.slots.values_mut() {
            s.open = None;
        }
    }
}

/// A stream's FIFO of things to send (see the module docs).
#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<InboxState>,
    /// The stream's poller, woken by pushes (one stream reads an inbox).
    waker: AtomicWaker,
    /// Something was pushed since the stream last saw [`Inbox::poll_pushed`]
    /// ready.
    pushed: AtomicBool,
}

impl Inbox {
    pub fn new() -> Arc<Inbox> {
        Arc::new(Inbox::default())
    }

    /// Registers a watcher slot (pushes for unknown slots are refused).
    pub fn open_slot(&self, slot: u64) {
        self.state
            .lock()
            .unwrap()
            .slots
            .insert(slot, Slot::default());
    }

    /// Removes a slot and every item still queued for it.
    pub fn close_slot(&self, slot: u64) {
        let mut st = self.state.lock().unwrap();
        st.slots.remove(&slot);
        let before = st.items.len();
        st.items.retain(|it| item_slot(it) != Some(slot));
        if st.items.len() != before {
            // Sequence numbers of the items behind moved.
            st.close_tickets();
        }
    }

    /// The stream is gone: refuse everything from now on.
    pub fn close(&self) {
        let mut st = self.state.lock().unwrap();
        st.closed = true;
        st.slots.clear();
        st.items.clear();
    }

    /// Queues a response the stream itself produced.
    pub fn push_response(&self, resp: WatchResponse) {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return;
        }
        st.push(Item::Response(resp));
        // Nothing queued before the response may grow past it.
        st.close_tickets();
        drop(st);
        self.wake();
    }

    /// Queues a batch for `slot` within `budget` bytes; on overflow queues
    /// `Overflow{resume_from}` instead. Wakes the stream if needed.
    pub fn push_events(
        &self,
        slot: u64,
        batch: &Arc<Batch>,
        budget: usize,
        resume_from: i64,
    ) -> Push {
        let outcome = self.push_events_quiet(slot, batch, budget, resume_from);
        if matches!(outcome, Push::Queued | Push::Overflow) {
            self.wake();
        }
        outcome
    }

    /// [`Inbox::push_events`] without the wake-up: the caller calls
    /// [`Inbox::wake`] afterwards if the outcome is `Queued` or `Overflow`
    /// (one wake-up for several pushes).
    pub fn push_events_quiet(
        &self,
        slot: u64,
        batch: &Arc<Batch>,
        budget: usize,
        resume_from: i64,
    ) -> Push {
        let mut st = self.state.lock().unwrap();
        let InboxState {
            items, head, slots, ..
        } = &mut *st;
        let Some(s) = slots.get_mut(&slot) else {
            return Push::Gone;
        };
        let next_seq = *head + items.len() as u64;
        if s.bytes > 0 && s.bytes + batch.bytes > budget {
            s.open = None;
            items.push_back(Item::Overflow { slot, resume_from });
            return Push::Overflow;
        }
        s.bytes += batch.bytes;
        if let Some(seq) = s.open.filter(|seq| *seq >= *head) {
            if let Some(Item::Events { slot: at, batches }) = items.get_mut((seq - *head) as usize)
            {
                if *at == slot && batches.bytes() + batch.bytes <= MAX_COALESCED_BYTES {
                    batches.push(batch.clone());
                    return Push::Coalesced;
                }
            }
        }
        items.push_back(Item::Events {
            slot,
            batches: Batches::new(batch.clone()),
        });
        s.open = Some(next_seq);
        Push::Queued
    }

    /// Wakes the stream (after quiet pushes).
    pub fn wake(&self) {
        self.pushed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Queues a marker for a slot (progress, end); `false` if it is gone.
    pub fn push_marker(&self, item: Item) -> bool {
        if !self.push_marker_quiet(item) {
            return false;
        }
        self.wake();
        true
    }

    /// [`Inbox::push_marker`] without the wake-up (see
    /// [`Inbox::push_events_quiet`]).
    pub fn push_marker_quiet(&self, item: Item) -> bool {
        let slot = item_slot(&item).expect("markers name a slot");
        let mut st = self.state.lock().unwrap();
        let Some(s) = st.slots.get_mut(&slot) else {
            return false;
        };
        // Later events go behind the marker.
        s.open = None;
        st.push(item);
        true
    }

    /// The next item, releasing its bytes from its slot's budget.
    pub fn pop(&self) -> Option<Item> {
        let mut st = self.state.lock().unwrap();
        let item = st.items.pop_front()?;
        let seq = st.head;
        st.head += 1;
        if let Item::Events { slot, batches } = &item {
            if let Some(s) = st.slots.get_mut(slot) {
                s.bytes = s.bytes.saturating_sub(batches.bytes());
                if s.open == Some(seq) {
                    s.open = None;
                }
            }
        }
        Some(item)
    }

    pub fn is_empty(&self) -> bool {
        self.state.lock().unwrap().items.is_empty()
    }

    /// Bytes queued for `slot` (tests, diagnostics).
    pub fn pending_bytes(&self, slot: u64) -> usize {
        self.state
            .lock()
            .unwrap()
            .slots
            .get(&slot)
            .map_or(0, |s| s.bytes)
    }

    /// Ready once something was pushed since it was last ready; otherwise
    /// the next push wakes `cx`.
    pub fn poll_pushed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pushed.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A push between the check and the registration woke the old waker.
        if self.pushed.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

fn item_slot(it: &Item) -> Option<u64> {
    match it {
        Item::Response(_) => None,
        Item::Events { slot, .. }
        | Item::Progress { slot, .. }
        | Item::Overflow { slot, .. }
        | Item::Ended { slot, .. } => Some(*slot),
    }
}

/// A watcher attached to a feed.
#[derive(Debug)]
pub struct Subscriber {
    pub slot: u64,
    pub inbox: Arc<Inbox>,
    /// Takes events with revision >= start.
    pub start: i64,
    /// Push a progress marker once released >= this (0 = none).
    pub progress_target: i64,
    /// Budget of queued bytes (`u32` packs with `use_tail`: a feed holds
    /// one of these per watcher).
    pub budget: u32,
    /// May be seeded from a feed's tail (a watcher starting "now", or one
    /// resuming after an overflow). A watcher with an explicit start
    /// revision may not: if that revision is compacted, etcd answers
    /// `compact_revision`, and only a shard knows.
    pub use_tail: bool,
}

impl Subscriber {
    fn key(&self) -> (usize, u64) {
        (Arc::as_ptr(&self.inbox) as usize, self.slot)
    }
}

/// The subscribers and tail of one feed (see the module docs).
#[derive(Debug)]
pub struct FanOut {
    subs: Vec<Subscriber>,
    released: i64,
    tail: VecDeque<Arc<Batch>>,
    tail_bytes: usize,
    tail_budget: usize,
    tail_floor: i64,
}

impl FanOut {
    /// A fan-out for a feed starting at `start`.
    pub fn new(start: i64, tail_budget: usize) -> FanOut {
        FanOut {
            subs: Vec::new(),
            released: start - 1,
            tail: VecDeque::new(),
            tail_bytes: 0,
            tail_budget,
            tail_floor: start - 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn released(&self) -> i64 {
        self.released
    }

    /// A watcher starting above this can join (seeded from the tail).
    pub fn tail_floor(&self) -> i64 {
        self.tail_floor
    }

    /// The smallest pending progress target, if any.
    pub fn min_progress_target(&self) -> Option<i64> {
        self.subs
            .iter()
            .map(|s| s.progress_target)
            .filter(|t| *t > 0)
            .min()
    }

    /// Adds a subscriber whose start is above the released revision, or
    /// (if it may use the tail) above the tail floor, seeding it with the
    /// tail's events at or above its start. Refused (handed back)
    /// otherwise.
    pub fn join(&mut self, mut sub: Subscriber) -> Result<(), Subscriber> {
        let floor = if sub.use_tail {
            self.tail_floor
        } else {
            self.released
        };
        if sub.start <= floor {
            return Err(sub);
        }
        for b in &self.tail {
            if !b.has_events_from(sub.start) {
                continue;
            }
            let resume = sub.start.max(b.from);
            match sub
                .inbox
                .push_events(sub.slot, b, sub.budget as usize, resume)
            {
                Push::Queued | Push::Coalesced => {}
                // Handled by the stream (overflow marker queued) or gone.
                Push::Overflow | Push::Gone => return Ok(()),
            }
        }
        if sub.progress_target > 0 && self.released >= sub.progress_target {
            sub.progress_target = 0;
            let through = self.released;
            if !sub.inbox.push_marker(Item::Progress {
                slot: sub.slot,
                through,
            }) {
                return Ok(());
            }
        }
        self.subs.push(sub);
        Ok(())
    }

    /// Removes a subscriber; `true` if it was there.
    pub fn remove(&mut self, inbox: &Arc<Inbox>, slot: u64) -> bool {
        let key = (Arc::as_ptr(inbox) as usize, slot);
        let before = self.subs.len();
        self.subs.retain(|s| s.key() != key);
        before != self.subs.len()
    }

    /// Sets a progress target; pushes the marker at once if reached.
    /// `false` if the subscriber is not here.
    pub fn set_progress_target(&mut self, inbox: &Arc<Inbox>, slot: u64, target: i64) -> bool {
        let key = (Arc::as_ptr(inbox) as usize, slot);
        let released = self.released;
        let Some(i) = self.subs.iter().position(|s| s.key() == key) else {
            return false;
        };
        if released >= target {
            if !self.subs[i].inbox.push_marker(Item::Progress {
                slot,
                through: released,
            }) {
                self.subs.swap_remove(i);
                return false;
            }
        } else {
            let s = &mut self.subs[i];
            s.progress_target = s.progress_target.max(target);
        }
        true
    }

    /// Delivers one release to every subscriber (see the invariant).
    ///
    /// Pushes are quiet; each stream is woken once, after the whole
    /// release is queued, so it handles the release in one go instead of
    /// racing the pushes item by item.
    pub fn deliver(&mut self, batch: Batch) {
        let batch = Arc::new(batch);
        self.released = batch.through;
        let released = self.released;
        let mut wake: Vec<Arc<Inbox>> = Vec::new();
        let mut note = |inbox: &Arc<Inbox>| {
            if !wake.last().is_some_and(|w| Arc::ptr_eq(w, inbox)) {
                wake.push(inbox.clone());
            }
        };
        self.subs.retain_mut(|s| {
            if batch.has_events_from(s.start) {
                let resume = s.start.max(batch.from);
                match s
                    .inbox
                    .push_events_quiet(s.slot, &batch, s.budget as usize, resume)
                {
                    Push::Queued => note(&s.inbox),
                    Push::Coalesced => {}
                    Push::Overflow => {
                        note(&s.inbox);
                        return false;
                    }
                    Push::Gone => return false,
                }
            }
            if s.progress_target > 0 && released >= s.progress_target {
                s.progress_target = 0;
                if !s.inbox.push_marker_quiet(Item::Progress {
                    slot: s.slot,
                    through: released,
                }) {
                    return false;
                }
                note(&s.inbox);
            }
            true
        });
        for inbox in wake {
            inbox.wake();
        }
        if !batch.events.is_empty() {
            self.tail_bytes += batch.bytes;
            self.tail.push_back(batch);
            while self.tail_bytes > self.tail_budget {
                let Some(old) = self.tail.pop_front() else {
                    break;
                };
                self.tail_bytes -= old.bytes;
                self.tail_floor = old.through;
            }
        }
    }

    /// The feed ended: tells every subscriber and empties the fan-out.
    /// After a compaction at `c`, subscribers that need nothing below `c`
    /// are told to resume elsewhere instead (another feed can serve them).
    pub fn end(&mut self, end: &MergeEnd) {
        let released = self.released;
        for s in self.subs.drain(..) {
            let resume_from = s.start.max(released + 1);
            let item = match end {
                MergeEnd::Compacted(c) if resume_from >= *c => Item::Overflow {
                    slot: s.slot,
                    resume_from,
                },
                _ => Item::Ended {
                    slot: s.slot,
                    end: end.clone(),
                },
            };
            s.inbox.push_marker(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_slots_spread_over_buckets() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<SlotHasher>::default();
        let hashes: Vec<u64> = (0..1024u64).map(|s| build.hash_one(s)).collect();
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        let top: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert_eq!(low.len(), 1024, "distinct buckets in a table of 1024");
        assert!(top.len() > 64, "control bytes vary");
    }
    use crate::watch::merge::event_bytes;
    use metastore_proto::mvccpb::{event::EventType, KeyValue};

    fn ev(rev: i64, size: usize) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: b"k".to_vec().into(),
                value: vec![b'x'; size].into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn batch(from: i64, through: i64, revs: &[i64], size: usize) -> Batch {
        let events: Vec<Event> = revs.iter().map(|r| ev(*r, size)).collect();
        let bytes = events.iter().map(event_bytes).sum();
        Batch {
            from,
            through,
            events,
            bytes,
            ..Default::default()
        }
    }

    fn sub(inbox: &Arc<Inbox>, slot: u64, start: i64, budget: u32) -> Subscriber {
        inbox.open_slot(slot);
        Subscriber {
            slot,
            inbox: inbox.clone(),
            start,
            progress_target: 0,
            budget,
            use_tail: true,
        }
    }

    /// Pops everything: (slot, kind, revisions / revision).
    fn drain(inbox: &Inbox) -> Vec<(u64, &'static str, Vec<i64>)> {
        let mut out = vec![];
        while let Some(it) = inbox.pop() {
            out.push(match it {
                Item::Response(_) => (u64::MAX, "response", vec![]),
                Item::Events { slot, batches } => (
                    slot,
                    "events",
                    batches
                        .iter()
                        .flat_map(|b| b.events.iter().map(event_revision))
                        .collect(),
                ),
                Item::Progress { slot, through } => (slot, "progress", vec![through]),
                Item::Overflow { slot, resume_from } => (slot, "overflow", vec![resume_from]),
                Item::Ended { slot, .. } => (slot, "ended", vec![]),
            });
        }
        out
    }

    #[test]
    fn subscribers_take_events_from_their_start() {
        let inbox = Inbox::new();
        let mut f = FanOut::new(10, 1 << 20);
        f.join(sub(&inbox, 1, 10, 1 << 20)).unwrap();
        f.join(sub(&inbox, 2, 12, 1 << 20)).unwrap();
        f.deliver(batch(10, 11, &[10, 11], 10));
        f.deliver(batch(12, 15, &[12, 15], 10));
        f.deliver(batch(16, 20, &[], 0));
        assert_eq!(
            drain(&inbox),
            vec![
                // Queued behind each other for one slot: one item.
                (1, "events", vec![10, 11, 12, 15]),
                (2, "events", vec![12, 15]),
            ]
        );
        assert_eq!(f.released(), 20);
    }

    #[test]
    fn late_joiners_are_seeded_from_the_tail_or_refused() {
        let inbox = Inbox::new();
        // Tail holds about two batches of ~60 bytes.
        let mut f = FanOut::new(1, 150);
        f.join(sub(&inbox, 1, 1, 1 << 20)).unwrap();
        f.deliver(batch(1, 3, &[2, 3], 20));
        f.deliver(batch(4, 5, &[5], 20));
        f.deliver(batch(6, 8, &[7, 8], 20));
        assert_eq!(f.tail_floor(), 3, "oldest batch evicted");
        drain(&inbox);
        // Start 4 is covered by the tail: seeded with 5, 7, 8.
        f.join(sub(&inbox, 2, 4, 1 << 20)).unwrap();
        // Start 3 is not.
        assert!(f.join(sub(&inbox, 3, 3, 1 << 20)).is_err());
        // An explicit start may join only above what was released.
        let mut explicit = sub(&inbox, 5, 5, 1 << 20);
        explicit.use_tail = false;
        let explicit = f.join(explicit).unwrap_err();
        inbox.close_slot(explicit.slot);
        let mut explicit = sub(&inbox, 6, 9, 1 << 20);
        explicit.use_tail = false;
        f.join(explicit).unwrap();
        // Start above everything released: nothing to seed.
        f.join(sub(&inbox, 4, 9, 1 << 20)).unwrap();
        f.deliver(batch(9, 9, &[9], 20));
        assert_eq!(
            drain(&inbox),
            vec![
                (2, "events", vec![5, 7, 8, 9]),
                (1, "events", vec![9]),
                (6, "events", vec![9]),
                (4, "events", vec![9]),
            ]
        );
    }

    #[test]
    fn a_watcher_over_budget_overflows_to_catch_up_others_continue() {
        let fast = Inbox::new();
        let slow = Inbox::new();
        let mut f = FanOut::new(1, 0);
        f.join(sub(&fast, 1, 1, 200)).unwrap();
        f.join(sub(&slow, 1, 1, 200)).unwrap();
        // ~110 bytes per batch: the slow one (never popped) takes one.
        f.deliver(batch(1, 1, &[1], 100));
        assert_eq!(drain(&fast), vec![(1, "events", vec![1])]);
        f.deliver(batch(2, 3, &[3], 100));
        assert_eq!(f.len(), 1, "slow watcher dropped from the feed");
        assert_eq!(drain(&fast), vec![(1, "events", vec![3])]);
        f.deliver(batch(4, 4, &[4], 100));
        assert_eq!(drain(&fast), vec![(1, "events", vec![4])]);
        // The slow watcher sends what it holds, then learns where to
        // resume: right after the last batch it took.
        assert_eq!(
            drain(&slow),
            vec![(1, "events", vec![1]), (1, "overflow", vec![2])]
        );
        // A single batch bigger than the budget still reaches an empty
        // watcher.
        let inbox = Inbox::new();
        let mut f = FanOut::new(1, 0);
        f.join(sub(&inbox, 7, 1, 10)).unwrap();
        f.deliver(batch(1, 1, &[1], 500));
        assert_eq!(drain(&inbox), vec![(7, "events", vec![1])]);
        assert_eq!(inbox.pending_bytes(7), 0);
    }

    #[test]
    fn progress_markers_follow_the_events_before_them() {
        let inbox = Inbox::new();
        let mut f = FanOut::new(1, 0);
        f.join(sub(&inbox, 1, 1, 1 << 20)).unwrap();
        assert!(f.set_progress_target(&inbox, 1, 5));
        f.deliver(batch(1, 3, &[2], 10));
        assert_eq!(f.min_progress_target(), Some(5));
        f.deliver(batch(4, 6, &[6], 10));
        assert_eq!(f.min_progress_target(), None);
        // Reached already: the marker goes at once.
        assert!(f.set_progress_target(&inbox, 1, 6));
        assert!(!f.set_progress_target(&inbox, 9, 6), "unknown slot");
        assert_eq!(
            drain(&inbox),
            vec![
                (1, "events", vec![2, 6]),
                (1, "progress", vec![6]),
                (1, "progress", vec![6]),
            ]
        );
    }

    #[test]
    fn cancelled_slots_lose_their_items_and_leave_the_feed() {
        let inbox = Inbox::new();
        let mut f = FanOut::new(1, 0);
        f.join(sub(&inbox, 1, 1, 1 << 20)).unwrap();
        f.join(sub(&inbox, 2, 1, 1 << 20)).unwrap();
        f.deliver(batch(1, 1, &[1], 10));
        inbox.close_slot(1);
        f.deliver(batch(2, 2, &[2], 10));
        assert_eq!(f.len(), 1, "gone slot removed on the next push");
        assert_eq!(
            drain(&inbox),
            vec![(2, "events", vec![1]), (2, "events", vec![2])]
        );
        assert!(f.remove(&inbox, 2));
        assert!(f.is_empty());
    }

    #[test]
    fn compaction_ends_watchers_that_need_compacted_history_only() {
        let inbox = Inbox::new();
        let mut f = FanOut::new(5, 0);
        f.join(sub(&inbox, 1, 5, 1 << 20)).unwrap();
        f.join(sub(&inbox, 2, 30, 1 << 20)).unwrap();
        f.end(&MergeEnd::Compacted(20));
        assert!(f.is_empty());
        assert_eq!(
            drain(&inbox),
            vec![(1, "ended", vec![]), (2, "overflow", vec![30])]
        );
    }

    #[test]
    fn queued_batches_of_a_slot_coalesce_up_to_its_next_marker() {
        let inbox = Inbox::new();
        inbox.open_slot(1);
        inbox.open_slot(2);
        let b = |from, through, revs: &[i64], size| Arc::new(batch(from, through, revs, size));
        let big = 1 << 30;
        assert_eq!(
            inbox.push_events(1, &b(1, 1, &[1], 10), big, 1),
            Push::Queued
        );
        assert_eq!(
            inbox.push_events(2, &b(1, 1, &[1], 10), big, 1),
            Push::Queued
        );
        assert_eq!(
            inbox.push_events(1, &b(2, 2, &[2], 10), big, 2),
            Push::Coalesced
        );
        // A marker closes slot 1's item; later events queue behind it.
        assert!(inbox.push_marker(Item::Progress {
            slot: 1,
            through: 2
        }));
        assert_eq!(
            inbox.push_events(1, &b(3, 3, &[3], 10), big, 3),
            Push::Queued
        );
        assert_eq!(
            inbox.push_events(2, &b(2, 3, &[2, 3], 10), big, 2),
            Push::Coalesced
        );
        // So does a stream response, for every slot.
        inbox.push_response(WatchResponse::default());
        assert_eq!(
            inbox.push_events(1, &b(4, 4, &[4], 10), big, 4),
            Push::Queued
        );
        assert_eq!(
            inbox.push_events(2, &b(4, 4, &[4], 10), big, 4),
            Push::Queued
        );
        // Popped items release all their bytes; an item being popped
        // takes nothing more.
        let first = inbox.pop().unwrap();
        assert!(matches!(&first, Item::Events { slot: 1, batches } if batches.len() == 2));
        assert_eq!(
            inbox.push_events(1, &b(5, 5, &[5], 10), big, 5),
            Push::Coalesced
        );
        assert_eq!(
            drain(&inbox),
            vec![
                (2, "events", vec![1, 2, 3]),
                (1, "progress", vec![2]),
                (1, "events", vec![3]),
                (u64::MAX, "response", vec![]),
                (1, "events", vec![4, 5]),
                (2, "events", vec![4]),
            ]
        );
        assert_eq!((inbox.pending_bytes(1), inbox.pending_bytes(2)), (0, 0));

        // Closing a slot renumbers the queue: nothing coalesces across it.
        inbox.open_slot(3);
        assert_eq!(
            inbox.push_events(3, &b(6, 6, &[6], 10), big, 6),
            Push::Queued
        );
        assert_eq!(
            inbox.push_events(1, &b(6, 6, &[6], 10), big, 6),
            Push::Queued
        );
        inbox.close_slot(3);
        assert_eq!(
            inbox.push_events(1, &b(7, 7, &[7], 10), big, 7),
            Push::Queued
        );
        assert_eq!(
            drain(&inbox),
            vec![(1, "events", vec![6]), (1, "events", vec![7])]
        );

        // An item stops growing at MAX_COALESCED_BYTES.
        let half = b(8, 8, &[8], MAX_COALESCED_BYTES / 2);
        assert_eq!(inbox.push_events(1, &half, big, 8), Push::Queued);
        let half = b(9, 9, &[9], MAX_COALESCED_BYTES / 2);
        assert_eq!(inbox.push_events(1, &half, big, 9), Push::Queued);
        assert_eq!(
            drain(&inbox),
            vec![(1, "events", vec![8]), (1, "events", vec![9])]
        );
    }

    #[test]
    fn a_release_wakes_each_stream_once_after_queueing_it() {
        // The stream sees the whole release when it wakes.
        let inbox = Inbox::new();
        let mut f = FanOut::new(1, 0);
        for slot in 1..=3 {
            f.join(sub(&inbox, slot, 1, 1 << 20)).unwrap();
        }
        struct Count(std::sync::atomic::AtomicUsize);
        impl futures::task::ArcWake for Count {
            fn wake_by_ref(c: &Arc<Self>) {
                c.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let wakes = Arc::new(Count(Default::default()));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(inbox.poll_pushed(&mut cx).is_pending());
        f.deliver(batch(1, 1, &[1], 10));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "one wake-up per release");
        assert!(inbox.poll_pushed(&mut cx).is_ready());
        assert!(inbox.poll_pushed(&mut cx).is_pending(), "seen once");
        assert_eq!(drain(&inbox).len(), 3);
    }
}
