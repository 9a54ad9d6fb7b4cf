//! One etcd `Watch` bidi stream: many watches, etcd v3.5's semantics.
//!
//! # Requests, in order
//!
//! Client requests are processed strictly in arrival order (etcd's
//! recvLoop does the same). Their slow part — asking the oracle for the
//! current revision — is one read for every request queued when it
//! started (`requests`), and concurrent reads of all streams are shared
//! too (`revision`), so creating 10 000 watches takes a few round trips.
//! Requests are read off the stream while the queued requests plus the
//! responses not yet handed to gRPC stay below [`MAX_BUFFERED_REQUESTS`],
//! so a burst of creates holds a bounded amount of memory.
//!
//! - **create**: key `""` becomes `"\0"` (etcd); a non-empty range end not
//!   above the key is refused like etcd ("mvcc: watcher range is empty").
//!   Ids: a non-zero `watch_id` is used if free, else refused ("mvcc:
//!   duplicate watch ID provided on the WatchStream"); `0` takes the next
//!   free id counting up from 0. Refusals are etcd's shape: `created` and
//!   `canceled` with `watch_id = -1` and a `cancel_reason`; the stream goes
//!   on. At most `max_watchers_per_stream` watches (refused the same way).
//!   `start_revision` 0 means current + 1, where current is the oracle's
//!   revision asked after the request arrived (so every revision a client
//!   saw before is covered). The `created` response (header = current) is
//!   queued before the watch is attached to a feed, so it precedes its
//!   events; a compacted start yields `created` then `canceled` with
//!   `compact_revision`, as etcd.
//! - **cancel**: removes the watch and everything still queued for it,
//!   answers `canceled` (header = current, read after the request arrived,
//!   as etcd answers with its store's revision); an unknown id gets no
//!   answer (etcd).
//! - **ended by the server** (its start or its place in history compacted
//!   away, or a failure): answered `canceled` (with `compact_revision`, and
//!   header revision 0 as etcd's compaction response has), and its id
//!   stays taken until the client cancels it, as in etcd, where the watch
//!   stays registered on its stream: a create with that id is a
//!   duplicate, automatic ids pass over it, and the client's cancel is
//!   answered `canceled` (clientv3 sends one). Such ids count against
//!   `max_watchers_per_stream`.
//! - **progress request**: takes R = current revision; answered once every
//!   watch on the stream has delivered everything up to R: each watch's
//!   feed is asked for a marker at R, which comes behind the watch's
//!   events. Watches created later start above R. On an idle server: a few
//!   round trips. The answer is one response for the whole stream
//!   (`watch_id = -1`, as etcd) when every watch has delivered through the
//!   same revision, with that revision; else one per watch, with what it
//!   has delivered through (`answer_progress`): the answer is never below
//!   an event already sent, nor above what a watch has been sent.
//!
//! # Delivery
//!
//! Everything to send passes through the stream's [`Inbox`] (FIFO, see
//! `fanout`). A popped events item — one or more releases queued for the
//! watch, ascending (see "Coalescing" in `fanout`) — becomes this watch's
//! responses: events below the watch's `next_rev` are skipped (exactly
//! once across feed switches; `next_rev` moves past each release in turn),
//! filters (NOPUT, NODELETE) applied, `prev_kv` stripped unless asked. All
//! of it goes in one response when it fits the response limit (so a watch
//! that fell behind gets several revisions per response, as from etcd);
//! otherwise it is split at revision boundaries, and a watch created with
//! `fragment` gets etcd's fragments instead (`fragment: true` on all but
//! the last). A response thus always holds whole revisions, in order.
//! Header revision of an event response: the last release it came from
//! (every event up to it has been delivered). A watch without filters
//! takes its events as suffixes of each release's shared encoding (see
//! `wire`); filters, and responses that must be split, go event by event.
//! Both select the same events.
//!
//! The stream takes items from the inbox in bursts (up to [`BURST_BYTES`]
//! of events or [`BURST_RESPONSES`] responses, at least one item), and
//! only when the previous burst's responses are all handed to gRPC, so a
//! client that does not read holds at most its watchers' budgets in the
//! inbox plus one burst. Bursts hand gRPC several watchers' responses back
//! to back, which it writes together. A watcher that overflowed is
//! switched to another feed from its first undelivered revision.
//!
//! The session runs only when gRPC polls it ([`SessionStream`]): it has no
//! task and no channel to gRPC, and a push into the inbox wakes the gRPC
//! stream itself. Requests are taken in between bursts; while a client
//! does not read, gRPC does not poll, and its further requests wait in
//! the transport until it reads again.
//!
//! # Progress notifications
//!
//! Every `progress_notify_interval`, each watch with `progress_notify` that
//! sent no events since the last tick gets an empty response whose header
//! revision is what it has delivered through — at least the current
//! revision at the tick (its feed is asked for a marker there, so the
//! claim is exact), as etcd sends the store's revision.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{Stream, StreamExt};
use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, ResponseHeader,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use metastore_proto::mvccpb::{event::EventType, Event};
use prost::Message;

use super::fanout::{Batches, Inbox, Item, SlotMap, Subscriber};
use super::feed::Feed;
use super::merge::{event_bytes, event_revision, MergeEnd};
use super::requests::{Ready, Request, RequestQueue, Revision};
use super::wire::OutgoingWatchResponse;
use super::WatchHub;
use crate::error::GatewayError;

/// Client requests queued plus responses not yet handed to gRPC beyond
/// which no more client requests are read.
pub const MAX_BUFFERED_REQUESTS: usize = 32;
/// A burst of items taken from the inbox at once stops after this many
/// bytes of events (see [`Session::take_burst`]).
const BURST_BYTES: usize = 64 << 10;
/// ... or once this many responses wait.
const BURST_RESPONSES: usize = 32;
/// Capacity an emptied response queue keeps (more is freed).
const OUTQ_KEEP: usize = 2 * BURST_RESPONSES;

/// etcd's refusal of a taken watch id.
pub const MSG_DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's refusal of an empty range.
pub const MSG_EMPTY_RANGE: &str = "mvcc: watcher range is empty";

/// What a client request asks of the stream (an empty one asks nothing).
fn request(r: WatchRequest) -> Option<Request> {
    Some(match r.request_union? {
        RequestUnion::CreateRequest(c) => Request::Create(c),
        RequestUnion::CancelRequest(c) => Request::Cancel(c.watch_id),
        RequestUnion::ProgressRequest(_) => Request::Progress,
    })
}

struct Watch {
    slot: u64,
    // Boxed slices, not `Vec`s: 16 bytes less per watch, kept for its life.
    key: Box<[u8]>,
    range_end: Box<[u8]>,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// Events below this are never delivered (again).
    next_rev: i64,
    /// Every event up to this has been handed to gRPC.
    delivered: i64,
    feed: Option<Arc<Feed>>,
    notify_due: bool,
    sent_since_tick: bool,
}

/// A Watch stream's responses: its [`Session`], driven by whoever polls
/// for the next response (gRPC's send side). Within a burst a poll just
/// hands out the next response. Between bursts it first takes in what
/// the inputs have ready — the client's requests (while fewer than
/// [`MAX_BUFFERED_REQUESTS`] are buffered), the shared revision read, the
/// progress ticker — then takes the next burst from the inbox, or waits
/// for a push into the inbox or an input. No task or channel of its own:
/// a push wakes the gRPC stream directly. Dropping it (the client went
/// away) detaches every watch.
pub struct SessionStream<S, E> {
    session: Session,
    requests: S,
    queue: RequestQueue,
    read: Option<BoxFuture<'static, Revision>>,
    ticker: tokio::time::Interval,
    client_open: bool,
    ended: bool,
    /// Why the client's request stream broke, until taken.
    broken: Option<E>,
}

impl<S, E> SessionStream<S, E>
where
    S: Stream<Item = Result<WatchRequest, E>> + Unpin,
    E: std::fmt::Display,
{
    /// Serves `requests`; needs a tokio runtime (the ticker).
    pub fn new(hub: Arc<WatchHub>, requests: S) -> Self {
        let interval = hub.cfg.progress_notify_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        SessionStream {
            session: Session::new(hub),
            requests,
            queue: RequestQueue::default(),
            read: None,
            ticker,
            client_open: true,
            ended: false,
            broken: None,
        }
    }

    /// Why the client's request stream broke, once the responses have
    /// ended because of it (a message above the size limit, one that does
    /// not decode, a reset): etcd ends the call with that error.
    pub fn take_broken(&mut self) -> Option<E> {
        self.broken.take()
    }

    /// Takes in what the inputs have ready (registering `cx` with those
    /// that have nothing); whether anything came, or `Err` when the client
    /// broke the stream.
    fn poll_inputs(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let mut moved = false;
        if let Some(read) = self.read.as_mut() {
            if let Poll::Ready(rev) = read.as_mut().poll(cx) {
                self.read = None;
                self.queue.read_done(rev);
                moved = true;
            }
        }
        // Requests are read while what they may turn into is bounded:
        // queued requests plus responses not yet handed to gRPC.
        while self.client_open && self.queue.len() + self.session.outq.len() < MAX_BUFFERED_REQUESTS
        {
            match self.requests.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(r))) => {
                    if let Some(r) = request(r) {
                        self.queue.push(r);
                    }
                    moved = true;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "watch stream broken by the client");
                    self.broken = Some(e);
                    return Err(());
                }
                // Half-closed: keep sending (etcd does; grpc-gateway relies on it).
                Poll::Ready(None) => {
                    self.client_open = false;
                    moved = true;
                }
                Poll::Pending => break,
            }
        }
        if self.ticker.poll_tick(cx).is_ready() {
            if self.session.watches.values().any(|w| w.progress_notify) {
                self.queue.push(Request::Tick);
            }
            moved = true;
        }
        Ok(moved)
    }
}

impl<S, E> Stream for SessionStream<S, E>
where
    S: Stream<Item = Result<WatchRequest, E>> + Unpin,
    E: std::fmt::Display + Unpin,
{
    type Item = OutgoingWatchResponse;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            // Within a burst: just the next response.
            if let Some(resp) = this.session.next_response() {
                return Poll::Ready(Some(resp));
            }
            // Between bursts: take in the inputs, then the next burst.
            let Ok(mut moved) = this.poll_inputs(cx) else {
                this.ended = true;
                this.session.shutdown();
                return Poll::Ready(None);
            };
            while let Some(r) = this.queue.pop_ready() {
                this.session.apply(r);
            }
            if this.read.is_none() && this.queue.wants_read() {
                this.queue.start_read();
                let revisions = this.session.hub.revisions.clone();
                this.read = Some(Box::pin(async move { revisions.current().await }));
                moved = true;
            }
            if !this.session.outq.is_empty() {
                continue;
            }
            this.session.take_burst();
            if !this.session.outq.is_empty() || this.session.inbox.poll_pushed(cx).is_ready() {
                continue;
            }
            if !moved {
                return Poll::Pending;
            }
        }
    }
}

impl<S, E> Drop for SessionStream<S, E> {
    fn drop(&mut self) {
        self.session.shutdown();
    }
}

/// One Watch stream's state (see the module docs).
pub struct Session {
    hub: Arc<WatchHub>,
    inbox: Arc<Inbox>,
    watches: HashMap<i64, Watch>,
    /// Ids of watches the server ended, kept until the client cancels
    /// them (see "ended by the server").
    ended: HashSet<i64>,
    by_slot: SlotMap<i64>,
    next_auto_id: i64,
    next_slot: u64,
    /// Pending progress requests (revisions), oldest first.
    progress_waits: VecDeque<i64>,
    /// Watches with `delivered` below the oldest pending progress request.
    progress_lagging: usize,
    raft_term: u64,
    last_rev: i64,
    outq: VecDeque<OutgoingWatchResponse>,
}

impl Session {
    pub fn new(hub: Arc<WatchHub>) -> Session {
        Session {
            hub,
            inbox: Inbox::new(),
            watches: HashMap::new(),
            ended: HashSet::new(),
            by_slot: SlotMap::default(),
            next_auto_id: 0,
            next_slot: 1,
            progress_waits: VecDeque::new(),
            progress_lagging: 0,
            raft_term: 0,
            last_rev: 0,
            outq: VecDeque::new(),
        }
    }

    /// The next response of the current burst, if any.
    fn next_response(&mut self) -> Option<OutgoingWatchResponse> {
        let resp = self.outq.pop_front()?;
        // A burst (say, a client creating thousands of watches) grew the
        // queue: give that memory back rather than hold it for the
        // stream's life.
        if self.outq.is_empty() && self.outq.capacity() > OUTQ_KEEP {
            self.outq = VecDeque::new();
        }
        Some(resp)
    }

    /// Turns queued items into responses: at least until one produced a
    /// response (or the inbox is empty), then on while the items taken
    /// held less than [`BURST_BYTES`] of events and fewer than
    /// [`BURST_RESPONSES`] responses wait. Called only when every earlier
    /// response was handed to gRPC; a burst reaches gRPC back to back, so
    /// several watchers' responses share its writes.
    fn take_burst(&mut self) {
        let mut taken = 0;
        while self.outq.is_empty() || (taken < BURST_BYTES && self.outq.len() < BURST_RESPONSES) {
            let Some(item) = self.inbox.pop() else {
                return;
            };
            if let Item::Events { batches, .. } = &item {
                taken += batches.bytes();
            }
            self.handle_item(item);
        }
    }

    fn shutdown(&mut self) {
        self.inbox.close();
        for (_, w) in self.watches.drain() {
            if let Some(f) = w.feed {
                f.detach(&self.inbox, w.slot);
            }
        }
    }

    fn apply(&mut self, r: Ready) {
        match r {
            Ready::Create(c, now) => self.create(c, now),
            Ready::Cancel(id, now) => self.cancel(id, now),
            Ready::Progress(now) => self.progress_request(now),
            Ready::Tick(now) => self.progress_tick(now),
        }
    }

    fn header(&self, revision: i64) -> ResponseHeader {
        self.hub.backend.header(revision, self.raft_term)
    }

    fn observe(&mut self, rev: i64, term: u64) {
        self.last_rev = self.last_rev.max(rev);
        self.raft_term = self.raft_term.max(term);
    }

    fn refuse_create(&mut self, reason: String) {
        self.outq.push_back(
            WatchResponse {
                header: Some(self.header(self.last_rev)),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            }
            .into(),
        );
    }

    fn create(&mut self, mut c: WatchCreateRequest, now: Result<(i64, u64), GatewayError>) {
        let cur = match now {
            Ok((rev, term)) => {
                self.observe(rev, term);
                rev
            }
            Err(e) => {
                tracing::debug!(error = %e, "no current revision for a watch");
                return self.refuse_create(e.to_string());
            }
        };
        if c.key.is_empty() {
            c.key = vec![0];
        }
        if !c.range_end.is_empty() && c.range_end != [0] && c.key >= c.range_end {
            return self.refuse_create(MSG_EMPTY_RANGE.into());
        }
        let max = self.hub.cfg.max_watchers_per_stream;
        if self.watches.len() + self.ended.len() >= max {
            return self.refuse_create(format!(
                "etcdserver: too many watchers on one stream (limit {max})"
            ));
        }
        let id = if c.watch_id != 0 {
            if self.id_taken(c.watch_id) {
                return self.refuse_create(MSG_DUPLICATE_WATCH_ID.into());
            }
            c.watch_id
        } else {
            while self.id_taken(self.next_auto_id) {
                self.next_auto_id += 1;
            }
            self.next_auto_id += 1;
            self.next_auto_id - 1
        };
        let start = if c.start_revision > 0 {
            c.start_revision
        } else {
            cur + 1
        };
        self.outq.push_back(
            WatchResponse {
                header: Some(self.header(cur)),
                watch_id: id,
                created: true,
                ..Default::default()
            }
            .into(),
        );
        let compacted = self.hub.revisions.compacted();
        if c.start_revision > 0 && c.start_revision < compacted {
            // etcd cancels it as compacted; a feed that still holds the
            // revisions (one that lags) must not serve it instead.
            return self.end_as_compacted(id, compacted);
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        self.inbox.open_slot(slot);
        let mut w = Watch {
            slot,
            key: c.key.into_boxed_slice(),
            range_end: c.range_end.into_boxed_slice(),
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
            fragment: c.fragment,
            progress_notify: c.progress_notify,
            next_rev: start,
            delivered: start - 1,
            feed: None,
            notify_due: false,
            sent_since_tick: false,
        };
        if let Some(&front) = self.progress_waits.front() {
            if w.delivered < front {
                self.progress_lagging += 1;
            }
        }
        self.attach(&mut w, start, c.start_revision <= 0);
        self.by_slot.insert(slot, id);
        self.watches.insert(id, w);
    }

    /// Attaches `w` to a feed from `start`, carrying any progress target.
    /// `use_tail`: see `fanout::Subscriber`.
    fn attach(&self, w: &mut Watch, start: i64, use_tail: bool) {
        let target = self
            .progress_waits
            .back()
            .copied()
            .filter(|r| *r > w.delivered)
            .unwrap_or(0);
        let sub = Subscriber {
            slot: w.slot,
            inbox: self.inbox.clone(),
            start,
            progress_target: target,
            budget: self.hub.cfg.max_pending_bytes,
            use_tail,
        };
        w.feed = Some(self.hub.registry.attach(&w.key, &w.range_end, sub));
    }

    /// Answers watch `id` canceled as compacted at `compact_revision`, its
    /// id kept until the client cancels it (see "ended by the server").
    /// etcd's compaction response carries header revision 0.
    fn end_as_compacted(&mut self, id: i64, compact_revision: i64) {
        self.ended.insert(id);
        let resp = WatchResponse {
            header: Some(self.header(0)),
            watch_id: id,
            canceled: true,
            compact_revision,
            ..Default::default()
        };
        self.outq.push_back(resp.into());
    }

    /// An id in use on this stream: a live watch's, or one the server
    /// ended and the client has not canceled.
    fn id_taken(&self, id: i64) -> bool {
        self.watches.contains_key(&id) || self.ended.contains(&id)
    }

    /// Cancels `id`, answered at the revision `now` read after the request
    /// came (etcd's header is the store's revision at the cancel).
    fn cancel(&mut self, id: i64, now: Revision) {
        if let Ok((rev, term)) = now {
            self.observe(rev, term);
        }
        if self.remove_watch(id).is_none() && !self.ended.remove(&id) {
            return;
        }
        self.outq.push_back(
            WatchResponse {
                header: Some(self.header(self.last_rev)),
                watch_id: id,
                canceled: true,
                ..Default::default()
            }
            .into(),
        );
    }

    fn remove_watch(&mut self, id: i64) -> Option<Watch> {
        let w = self.watches.remove(&id)?;
        self.by_slot.remove(&w.slot);
        self.inbox.close_slot(w.slot);
        if let Some(f) = &w.feed {
            f.detach(&self.inbox, w.slot);
        }
        if let Some(&front) = self.progress_waits.front() {
            if w.delivered < front {
                self.progress_lagging -= 1;
            }
        }
        self.check_progress();
        Some(w)
    }

    fn progress_request(&mut self, now: Result<(i64, u64), GatewayError>) {
        let r = match now {
            Ok((rev, term)) => {
                self.observe(rev, term);
                rev
            }
            Err(e) => {
                tracing::warn!(error = %e, "progress request: no current revision; not answered");
                return;
            }
        };
        if self.progress_waits.is_empty() {
            self.progress_lagging = self.watches.values().filter(|w| w.delivered < r).count();
        }
        self.progress_waits.push_back(r);
        for w in self.watches.values() {
            if w.delivered < r {
                if let Some(f) = &w.feed {
                    f.want_progress(&self.inbox, w.slot, r);
                }
            }
        }
        self.check_progress();
    }

    /// Answers the pending progress requests every watch has caught up with.
    fn check_progress(&mut self) {
        while let Some(&r) = self.progress_waits.front() {
            if self.progress_lagging > 0 {
                return;
            }
            self.progress_waits.pop_front();
            self.answer_progress(r);
            if let Some(&next) = self.progress_waits.front() {
                self.progress_lagging =
                    self.watches.values().filter(|w| w.delivered < next).count();
            }
        }
    }

    /// Answers a progress request at `r`, every watch having delivered
    /// everything up to it. A client applies a stream's progress answer to
    /// every watch on the stream (clientv3 hands `watch_id = -1` to each),
    /// and Kubernetes' watch cache takes it as its resource version, which
    /// must never fall below an event it already has. So the answer must
    /// be at least every event revision sent on the stream, and at most
    /// what each watch has been sent everything up to. When every watch has
    /// delivered through the same revision P (>= r; always so with one
    /// watch), that is one response for the stream, `watch_id = -1` and
    /// header P, as etcd answers. When they differ, no single revision is
    /// both (a busy watch may have been sent events above a quiet one's
    /// coverage), and each watch gets its own, as a progress notification:
    /// its id, header what it has delivered through.
    fn answer_progress(&mut self, r: i64) {
        let mut delivered: Vec<(i64, i64)> = self
            .watches
            .iter()
            .map(|(&id, w)| (id, w.delivered))
            .collect();
        let lo = delivered.iter().map(|&(_, d)| d).min();
        let hi = delivered.iter().map(|&(_, d)| d).max();
        if lo == hi {
            let header = Some(self.header(lo.map_or(r, |d| d.max(r))));
            self.outq.push_back(
                WatchResponse {
                    header,
                    watch_id: -1,
                    ..Default::default()
                }
                .into(),
            );
            return;
        }
        delivered.sort_unstable();
        for (id, through) in delivered {
            let header = Some(self.header(through));
            self.outq.push_back(
                WatchResponse {
                    header,
                    watch_id: id,
                    ..Default::default()
                }
                .into(),
            );
        }
    }

    /// Records that watch `id` delivered everything up to `through`.
    fn advance(&mut self, id: i64, through: i64) {
        let front = self.progress_waits.front().copied();
        let Some(w) = self.watches.get_mut(&id) else {
            return;
        };
        let before = w.delivered;
        if through <= before {
            return;
        }
        w.delivered = through;
        w.next_rev = w.next_rev.max(through + 1);
        self.last_rev = self.last_rev.max(through);
        if let Some(f) = front {
            if before < f && through >= f {
                self.progress_lagging -= 1;
                self.check_progress();
            }
        }
    }

    /// A progress-notify tick: every `progress_notify` watch that sent no
    /// events since the last tick asks its feed for a marker at the
    /// current revision; the notification goes out when it pops.
    fn progress_tick(&mut self, now: Result<(i64, u64), GatewayError>) {
        let r = match now {
            Ok((rev, term)) => {
                self.observe(rev, term);
                rev
            }
            Err(e) => {
                tracing::debug!(error = %e, "progress notify: no current revision; skipped");
                return;
            }
        };
        for w in self.watches.values_mut() {
            if !w.progress_notify {
                continue;
            }
            if !w.sent_since_tick && !w.notify_due {
                if let Some(f) = &w.feed {
                    w.notify_due = f.want_progress(&self.inbox, w.slot, r);
                }
            }
            w.sent_since_tick = false;
        }
    }

    fn handle_item(&mut self, item: Item) {
        match item {
            Item::Response(r) => self.outq.push_back(r.into()),
            Item::Events { slot, batches } => {
                let Some(&id) = self.by_slot.get(&slot) else {
                    return;
                };
                let through = batches.last().through;
                let header = self.header(through);
                let max = self.hub.cfg.max_response_bytes;
                let w = self.watches.get_mut(&id).unwrap();
                let whole = |runs: EncodedRuns| OutgoingWatchResponse::Events {
                    header,
                    watch_id: id,
                    runs: runs.runs,
                };
                let sent = match select_encoded(w, &batches).map(|r| (r.events, whole(r))) {
                    Some((0, _)) => false,
                    Some((n, resp)) if n < 2 || resp.encoded_len() < max => {
                        self.outq.push_back(resp);
                        true
                    }
                    // Filtered, or to be split: event by event.
                    _ => {
                        let base = WatchResponse {
                            header: Some(header),
                            watch_id: id,
                            ..Default::default()
                        };
                        let events = select_events(w, &batches);
                        let any = !events.is_empty();
                        if any {
                            let bound = batches.bytes();
                            push_event_responses(
                                &mut self.outq,
                                events,
                                bound,
                                base,
                                w.fragment,
                                max,
                            );
                        }
                        any
                    }
                };
                if sent {
                    w.sent_since_tick = true;
                }
                self.advance(id, through);
            }
            Item::Progress { slot, through } => {
                let Some(&id) = self.by_slot.get(&slot) else {
                    return;
                };
                self.advance(id, through);
                let w = self.watches.get_mut(&id).unwrap();
                if w.notify_due {
                    w.notify_due = false;
                    let delivered = w.delivered;
                    let resp = WatchResponse {
                        header: Some(self.header(delivered)),
                        watch_id: id,
                        ..Default::default()
                    };
                    self.outq.push_back(resp.into());
                }
            }
            Item::Overflow { slot, resume_from } => {
                let Some(&id) = self.by_slot.get(&slot) else {
                    return;
                };
                // Everything below resume_from was queued before this
                // marker, hence delivered.
                self.advance(id, resume_from - 1);
                let mut w = self.watches.remove(&id).unwrap();
                tracing::debug!(
                    watch = id,
                    resume_from,
                    "watcher over budget: catching up on its own feed"
                );
                w.feed = None;
                w.notify_due = false;
                let start = resume_from.max(w.next_rev);
                self.attach(&mut w, start, true);
                self.watches.insert(id, w);
            }
            Item::Ended { slot, end } => {
                let Some(&id) = self.by_slot.get(&slot) else {
                    return;
                };
                self.remove_watch(id);
                match end {
                    MergeEnd::Compacted(c) | MergeEnd::HistoryLost { from: c, .. } => {
                        self.end_as_compacted(id, c)
                    }
                    MergeEnd::Failed(reason) => {
                        self.ended.insert(id);
                        let resp = WatchResponse {
                            header: Some(self.header(self.last_rev)),
                            watch_id: id,
                            canceled: true,
                            cancel_reason: reason,
                            ..Default::default()
                        };
                        self.outq.push_back(resp.into());
                    }
                }
            }
        }
    }
}

/// A watch's events of some releases as runs of the releases' shared
/// encodings (see `wire`).
struct EncodedRuns {
    runs: Vec<Bytes>,
    events: usize,
}

/// The events of `batches` this watch delivers, as [`select_events`]
/// picks them, but as suffixes of each release's shared encoding: `None`
/// when the watch filters event types (then each event is looked at).
fn select_encoded(w: &Watch, batches: &Batches) -> Option<EncodedRuns> {
    if w.no_put || w.no_delete {
        return None;
    }
    let mut out = EncodedRuns {
        runs: Vec::with_capacity(batches.len()),
        events: 0,
    };
    let mut next_rev = w.next_rev;
    for b in batches.iter() {
        let first = b.events.partition_point(|e| event_revision(e) < next_rev);
        if first < b.events.len() {
            let run = b.encoded.get(&b.events, w.prev_kv).from_index(first);
            out.events += b.events.len() - first;
            out.runs.push(run);
        }
        next_rev = next_rev.max(b.through + 1);
    }
    Some(out)
}

/// The events of `batches` (ascending releases) this watch delivers: not
/// below `next_rev` (which moves past each batch, exactly as if the
/// batches were handled one by one), through its filters, `prev_kv` only
/// if asked.
fn select_events(w: &Watch, batches: &Batches) -> Vec<Event> {
    let mut out = Vec::with_capacity(batches.iter().map(|b| b.events.len()).sum());
    let mut next_rev = w.next_rev;
    for b in batches.iter() {
        for e in &b.events {
            if event_revision(e) < next_rev {
                continue;
            }
            let put = e.r#type == EventType::Put as i32;
            if put && w.no_put || !put && w.no_delete {
                continue;
            }
            out.push(if w.prev_kv {
                e.clone()
            } else {
                Event {
                    r#type: e.r#type,
                    kv: e.kv.clone(),
                    prev_kv: None,
                }
            });
        }
        next_rev = next_rev.max(b.through + 1);
    }
    out
}

/// [`event_responses`] appended to `outq`. `bound` is at least the
/// encoded size of `events` (the batches' `bytes`: selecting events and
/// stripping `prev_kv` only shrink them), so the common case — everything
/// fits in one response — is decided without sizing each event again.
fn push_event_responses(
    outq: &mut VecDeque<OutgoingWatchResponse>,
    events: Vec<Event>,
    bound: usize,
    base: WatchResponse,
    fragment: bool,
    max_bytes: usize,
) {
    if events.len() < 2 || base.encoded_len() + bound < max_bytes {
        outq.push_back(WatchResponse { events, ..base }.into());
    } else {
        let header = base.header.unwrap_or_default();
        outq.extend(
            event_responses(base.watch_id, events, header, fragment, max_bytes)
                .into_iter()
                .map(OutgoingWatchResponse::from),
        );
    }
}

/// Splits `events` (revision order) into responses for one watch.
///
/// Without `fragment`: responses hold whole revisions, and a new response
/// starts when the next revision would take one over `max_bytes` (a single
/// revision bigger than that still goes out whole, as etcd would send it).
/// With `fragment`: etcd's `sendFragments` — one logical response, cut into
/// pieces below `max_bytes` (at least one event each), all but the last
/// marked `fragment`.
pub fn event_responses(
    watch_id: i64,
    events: Vec<Event>,
    header: ResponseHeader,
    fragment: bool,
    max_bytes: usize,
) -> Vec<WatchResponse> {
    let base = WatchResponse {
        header: Some(header),
        watch_id,
        ..Default::default()
    };
    let base_len = prost::Message::encoded_len(&base);
    let total: usize = base_len + events.iter().map(event_bytes).sum::<usize>();
    if total < max_bytes || events.len() < 2 {
        return vec![WatchResponse { events, ..base }];
    }
    let mut out = Vec::new();
    if fragment {
        let mut cur = WatchResponse {
            fragment: true,
            ..base.clone()
        };
        let mut size = base_len;
        for e in events {
            let n = event_bytes(&e);
            if !cur.events.is_empty() && size + n >= max_bytes {
                let full = std::mem::replace(
                    &mut cur,
                    WatchResponse {
                        fragment: true,
                        ..base.clone()
                    },
                );
                out.push(full);
                size = base_len;
            }
            size += n;
            cur.events.push(e);
        }
        cur.fragment = false;
        out.push(cur);
        return out;
    }
    let mut cur = base.clone();
    let mut size = base_len;
    let mut i = 0;
    while i < events.len() {
        let rev = event_revision(&events[i]);
        let j = events[i..]
            .iter()
            .position(|e| event_revision(e) != rev)
            .map_or(events.len(), |k| i + k);
        let n: usize = events[i..j].iter().map(event_bytes).sum();
        if !cur.events.is_empty() && size + n > max_bytes {
            out.push(std::mem::replace(&mut cur, base.clone()));
            size = base_len;
        }
        size += n;
        cur.events.extend_from_slice(&events[i..j]);
        i = j;
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::mvccpb::KeyValue;

    fn ev(rev: i64, key: &str, size: usize) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec().into(),
                value: vec![b'x'; size].into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn shape(rs: &[WatchResponse]) -> Vec<(Vec<i64>, bool)> {
        rs.iter()
            .map(|r| (r.events.iter().map(event_revision).collect(), r.fragment))
            .collect()
    }

    #[test]
    fn small_batches_are_one_response() {
        let rs = event_responses(
            3,
            vec![ev(1, "a", 10), ev(2, "b", 10)],
            ResponseHeader::default(),
            false,
            1000,
        );
        assert_eq!(shape(&rs), vec![(vec![1, 2], false)]);
        assert_eq!(rs[0].watch_id, 3);
    }

    #[test]
    fn big_batches_split_at_revision_boundaries_only() {
        // Three revisions of ~110 bytes; revision 2 has two events.
        let events = vec![
            ev(1, "a", 100),
            ev(2, "b", 100),
            ev(2, "c", 100),
            ev(3, "d", 100),
        ];
        let rs = event_responses(1, events.clone(), ResponseHeader::default(), false, 250);
        assert_eq!(
            shape(&rs),
            vec![(vec![1], false), (vec![2, 2], false), (vec![3], false)]
        );
        let rs = event_responses(1, events, ResponseHeader::default(), false, 400);
        assert_eq!(shape(&rs), vec![(vec![1, 2, 2], false), (vec![3], false)]);
    }

    #[test]
    fn fragments_follow_etcd() {
        // One revision of 5 events ~110 bytes each, limit 250: two per
        // fragment, the last one unmarked.
        let events: Vec<Event> = (0..5).map(|i| ev(7, &format!("k{i}"), 100)).collect();
        let rs = event_responses(1, events.clone(), ResponseHeader::default(), true, 250);
        assert_eq!(
            shape(&rs),
            vec![(vec![7, 7], true), (vec![7, 7], true), (vec![7], false)]
        );
        for r in &rs {
            assert!(prost::Message::encoded_len(r) < 250);
        }
        // Without fragment the revision goes out whole.
        let rs = event_responses(1, events, ResponseHeader::default(), false, 250);
        assert_eq!(shape(&rs), vec![(vec![7; 5], false)]);
        // A single oversized event is never fragmented.
        let rs = event_responses(
            1,
            vec![ev(1, "a", 1000)],
            ResponseHeader::default(),
            true,
            250,
        );
        assert_eq!(shape(&rs), vec![(vec![1], false)]);
    }

    #[test]
    fn coalesced_batches_select_like_one_by_one() {
        use crate::watch::fanout::Batch;
        let batch = |from, through, events: Vec<Event>| {
            let bytes = events.iter().map(event_bytes).sum();
            Arc::new(Batch {
                from,
                through,
                events,
                bytes,
                ..Default::default()
            })
        };
        // Coalesced the only way items grow: pushes to one slot. The second
        // batch repeats revision 3, which must still pass only once.
        let inbox = Inbox::new();
        inbox.open_slot(1);
        for b in [
            batch(1, 3, vec![ev(2, "a", 1), ev(3, "b", 1)]),
            batch(3, 5, {
                let mut d = ev(5, "d", 1);
                d.r#type = EventType::Delete as i32;
                vec![ev(3, "b", 1), ev(4, "c", 1), d]
            }),
            batch(6, 6, {
                let mut p = ev(6, "p", 1);
                p.prev_kv = p.kv.clone();
                vec![p]
            }),
        ] {
            inbox.push_events(1, &b, usize::MAX, b.from);
        }
        let Some(Item::Events { batches, .. }) = inbox.pop() else {
            panic!("one coalesced item");
        };
        assert_eq!(batches.len(), 3);
        let mut w = Watch {
            slot: 1,
            key: Box::default(),
            range_end: Box::default(),
            no_put: false,
            no_delete: false,
            prev_kv: false,
            fragment: false,
            progress_notify: false,
            next_rev: 3,
            delivered: 2,
            feed: None,
            notify_due: false,
            sent_since_tick: false,
        };
        let revs = |es: &[Event]| es.iter().map(event_revision).collect::<Vec<_>>();
        let got = select_events(&w, &batches);
        assert_eq!(revs(&got), vec![3, 4, 5, 6], "revision 3 once");
        assert!(got.iter().all(|e| e.prev_kv.is_none()), "prev_kv stripped");
        // The shared encodings select exactly the same events, with and
        // without prev_kv, from any start.
        for prev_kv in [false, true] {
            for next_rev in 1..=7 {
                w.prev_kv = prev_kv;
                w.next_rev = next_rev;
                let plain = select_events(&w, &batches);
                let runs = select_encoded(&w, &batches).expect("no filters");
                assert_eq!(runs.events, plain.len());
                let bytes: usize = runs.runs.iter().map(Bytes::len).sum();
                let sent = OutgoingWatchResponse::Events {
                    header: ResponseHeader::default(),
                    watch_id: 0,
                    runs: runs.runs,
                };
                let empty_header = ResponseHeader::default();
                let head = prost::encoding::message::encoded_len(1, &empty_header);
                assert_eq!(sent.encoded_len(), head + bytes);
                assert_eq!(sent.into_message().events, plain, "from {next_rev}");
            }
        }
        w.next_rev = 3;
        w.prev_kv = false;
        w.no_delete = true;
        assert!(
            select_encoded(&w, &batches).is_none(),
            "filters look at each event"
        );
        w.prev_kv = true;
        let got = select_events(&w, &batches);
        assert_eq!(revs(&got), vec![3, 4, 6]);
        assert!(got[2].prev_kv.is_some());
    }
}
