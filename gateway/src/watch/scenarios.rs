//! Scenario tests of feeds and sessions over an in-memory fake of the
//! shards' watch side (no sockets): etcd semantics on the stream, feed
//! sharing, resubscription after a dropped shard stream, slow watchers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    shard_request::Body as Req, shard_response::Body as Resp, CurrentRevisionResponse,
    WatchEventsResponse, WatchSubscribeRequest,
};
use tokio::sync::mpsc;

use super::merge::event_revision;
use super::wire::OutgoingWatchResponse;
use super::{WatchConfig, WatchHub};
use crate::client::SubscriptionSink;
use crate::error::{GatewayError, Result};
use crate::shards::{WatchSubscription, WatchTransport};
use crate::testing::{backend, FakeShards, HISTORY};

// ---------------------------------------------------------------------------
// The fake: one revision counter, per-shard event logs, live subscriptions
// that get a frame for every matching write (resolved = the revision just
// written) and a heartbeat when asked for progress. Shards that hold no
// matching key send nothing, so merges depend on progress requests.
// ---------------------------------------------------------------------------

struct FakeSubState {
    shard: u32,
    req: WatchSubscribeRequest,
    sink: SubscriptionSink,
    seq: u64,
    /// Sends nothing any more, though nothing reports it (see
    /// `Fake::silence`).
    silent: bool,
}

#[derive(Default)]
struct FakeState {
    rev: i64,
    compacted: i64,
    /// Per shard: every event, in revision order.
    logs: HashMap<u32, Vec<Event>>,
    /// Current value per key (for prev_kv and versions).
    kvs: HashMap<Vec<u8>, KeyValue>,
    subs: HashMap<u64, FakeSubState>,
    subscribes: usize,
    progress_asks: usize,
    /// The fake server's history id (the hub's `testing::HISTORY` until
    /// a restart without history).
    history: u64,
}

#[derive(Clone)]
struct Fake {
    router: ShardRouter,
    state: Arc<Mutex<FakeState>>,
    next_id: Arc<AtomicU64>,
    /// Fired whenever a subscription is made or dropped.
    changed: Arc<tokio::sync::Notify>,
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

impl FakeSubState {
    fn send(&mut self, events: Vec<Event>, resolved: i64) {
        if self.silent {
            return;
        }
        self.seq += 1;
        self.sink.send(Ok(WatchEventsResponse {
            seq: self.seq,
            events,
            resolved,
            compact_revision: 0,
            history: 0,
        }));
    }
}

impl Fake {
    fn new(shards: u32) -> Fake {
        Fake {
            router: ShardRouter::new(shards),
            state: Arc::new(Mutex::new(FakeState {
                history: HISTORY,
                ..FakeState::default()
            })),
            next_id: Arc::new(AtomicU64::new(1)),
            changed: Arc::default(),
        }
    }

    fn current(&self) -> i64 {
        self.state.lock().unwrap().rev
    }

    /// One write at one revision: puts (`Some(value)`) and deletes.
    fn write(&self, ops: &[(&str, Option<&str>)]) -> i64 {
        let mut st = self.state.lock().unwrap();
        st.rev += 1;
        let rev = st.rev;
        let mut per_shard: HashMap<u32, Vec<Event>> = HashMap::new();
        for (key, value) in ops {
            let key = key.as_bytes().to_vec();
            let prev = st.kvs.get(&key).cloned();
            let ev = match value {
                Some(v) => {
                    let kv = KeyValue {
                        key: key.clone().into(),
                        value: v.as_bytes().to_vec().into(),
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: 0,
                    };
                    st.kvs.insert(key.clone(), kv.clone());
                    Event {
                        r#type: EventType::Put as i32,
                        kv: Some(kv),
                        prev_kv: prev,
                    }
                }
                None => {
                    st.kvs.remove(&key);
                    Event {
                        r#type: EventType::Delete as i32,
                        kv: Some(KeyValue {
                            key: key.clone().into(),
                            mod_revision: rev,
                            ..Default::default()
                        }),
                        prev_kv: prev,
                    }
                }
            };
            let shard = self.router.shard_of(&key);
            per_shard.entry(shard).or_default().push(ev.clone());
            st.logs.entry(shard).or_default().push(ev);
        }
        for sub in st.subs.values_mut() {
            let Some(evs) = per_shard.get(&sub.shard) else {
                continue;
            };
            let matching: Vec<Event> = evs
                .iter()
                .filter(|e| {
                    in_range(
                        &e.kv.as_ref().unwrap().key,
                        &sub.req.key,
                        &sub.req.range_end,
                    ) && rev >= sub.req.start_revision
                })
                .map(|e| strip(e, sub.req.prev_kv))
                .collect();
            if !matching.is_empty() {
                sub.send(matching, rev);
            }
        }
        rev
    }

    fn put(&self, key: &str, value: &str) -> i64 {
        self.write(&[(key, Some(value))])
    }

    /// Puts `{prefix}0..n` = `value`, one revision each; returns the
    /// events a watcher of them expects: (revision, key, value).
    fn put_each(&self, prefix: &str, n: usize, value: &str) -> Vec<(i64, String, String)> {
        (0..n)
            .map(|i| {
                let k = format!("{prefix}{i}");
                (self.put(&k, value), k, value.to_string())
            })
            .collect()
    }

    fn compact(&self, rev: i64) {
        self.state.lock().unwrap().compacted = rev;
    }

    /// Ends every stream of `shard` as a dropped connection would.
    fn drop_streams(&self, shard: u32) {
        let mut st = self.state.lock().unwrap();
        let ids: Vec<u64> = st
            .subs
            .iter()
            .filter(|(_, s)| s.shard == shard)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let s = st.subs.remove(&id).unwrap();
            s.sink.send(Err(GatewayError::ConnectionLost { shard }));
        }
    }

    /// A restart of a non-durable server: everything is gone, revisions
    /// start over, the history has a new id, and every stream ends as its
    /// connection would, except silenced ones (see `silence`): their end
    /// is not heard, like a connection loss the gateway has not noticed.
    fn restart_without_history(&self) {
        let mut st = self.state.lock().unwrap();
        let subs = std::mem::take(&mut st.subs);
        let (unheard, ended): (HashMap<_, _>, HashMap<_, _>) =
            subs.into_iter().partition(|(_, s)| s.silent);
        for (_, s) in ended {
            let shard = s.shard;
            s.sink.send(Err(GatewayError::ConnectionLost { shard }));
        }
        let history = st.history + 1;
        *st = FakeState {
            history,
            subscribes: st.subscribes,
            subs: unheard,
            ..FakeState::default()
        };
    }

    /// Every live stream of `shard` stops sending (frames and answers to
    /// progress requests) while staying open: a subscription lost without
    /// a word. New subscriptions work.
    fn silence(&self, shard: u32) {
        let mut st = self.state.lock().unwrap();
        for s in st.subs.values_mut().filter(|s| s.shard == shard) {
            s.silent = true;
        }
    }

    /// Resolves once no subscription is live.
    async fn until_no_subscriptions(&self) {
        self.until(|st| st.subs.is_empty()).await
    }

    /// Until `n` subscriptions were made in all.
    async fn until_subscribes(&self, n: usize) {
        self.until(|st| st.subscribes >= n).await
    }

    async fn until(&self, done: impl Fn(&FakeState) -> bool) {
        loop {
            let changed = self.changed.notified();
            if done(&self.state.lock().unwrap()) {
                return;
            }
            changed.await;
        }
    }

    fn subscribes(&self) -> usize {
        self.state.lock().unwrap().subscribes
    }

    /// Transport for CurrentRevision (the only request sessions make).
    fn shards(&self) -> FakeShards {
        let me = self.clone();
        FakeShards::new(self.router.shard_count(), move |_, req| match req {
            Req::CurrentRevision(_) => {
                let revision = me.current();
                let st = me.state.lock().unwrap();
                Ok(Resp::CurrentRevision(CurrentRevisionResponse {
                    revision,
                    raft_term: 2,
                    history_id: st.history,
                    compacted_revision: st.compacted,
                }))
            }
            other => panic!("unexpected {other:?}"),
        })
    }
}

fn strip(e: &Event, prev_kv: bool) -> Event {
    let mut e = e.clone();
    if !prev_kv {
        e.prev_kv = None;
    }
    e
}

struct FakeSub {
    id: u64,
    fake: Fake,
}

impl WatchSubscription for FakeSub {
    fn ack(&self, _seq: u64) {}
    fn progress(&self, revision: i64) {
        let mut st = self.fake.state.lock().unwrap();
        st.progress_asks += 1;
        let rev = st.rev;
        if let Some(s) = st.subs.get_mut(&self.id) {
            if rev >= revision {
                s.send(vec![], rev);
            }
        }
    }
}

impl Drop for FakeSub {
    fn drop(&mut self) {
        self.fake.state.lock().unwrap().subs.remove(&self.id);
        self.fake.changed.notify_waiters();
    }
}

impl WatchTransport for Fake {
    fn subscribe(
        &self,
        shard: u32,
        req: WatchSubscribeRequest,
        sink: SubscriptionSink,
    ) -> BoxFuture<'static, Result<Box<dyn WatchSubscription>>> {
        let fake = self.clone();
        Box::pin(async move {
            let id = fake.next_id.fetch_add(1, Ordering::Relaxed);
            let mut st = fake.state.lock().unwrap();
            st.subscribes += 1;
            fake.changed.notify_waiters();
            let mut sub = FakeSubState {
                shard,
                req: req.clone(),
                sink,
                seq: 0,
                silent: false,
            };
            let history = st.history;
            let lost_history = req.expect_history != 0 && req.expect_history != history;
            if lost_history || req.start_revision < st.compacted {
                sub.seq += 1;
                sub.sink.send(Ok(WatchEventsResponse {
                    seq: 1,
                    events: vec![],
                    resolved: 0,
                    compact_revision: st.compacted.max(1),
                    history: if lost_history { history } else { 0 },
                }));
                return Ok(Box::new(FakeSub {
                    id,
                    fake: fake.clone(),
                }) as Box<dyn WatchSubscription>);
            }
            // Replay, one frame per revision, then a heartbeat.
            let log = st.logs.get(&shard).cloned().unwrap_or_default();
            let mut by_rev: Vec<(i64, Vec<Event>)> = Vec::new();
            for e in log.iter().filter(|e| {
                event_revision(e) >= req.start_revision
                    && in_range(&e.kv.as_ref().unwrap().key, &req.key, &req.range_end)
            }) {
                let r = event_revision(e);
                match by_rev.last_mut() {
                    Some((lr, v)) if *lr == r => v.push(strip(e, req.prev_kv)),
                    _ => by_rev.push((r, vec![strip(e, req.prev_kv)])),
                }
            }
            for (r, evs) in by_rev {
                sub.send(evs, r);
            }
            let rev = st.rev;
            sub.send(vec![], rev);
            st.subs.insert(id, sub);
            Ok(Box::new(FakeSub {
                id,
                fake: fake.clone(),
            }) as Box<dyn WatchSubscription>)
        })
    }
}

// ---------------------------------------------------------------------------
// Client side helpers.
// ---------------------------------------------------------------------------

struct Client {
    tx: mpsc::UnboundedSender<WatchRequest>,
    rx: futures::stream::BoxStream<'static, OutgoingWatchResponse>,
}

fn hub(fake: &Fake, cfg: WatchConfig) -> Arc<WatchHub> {
    WatchHub::new(
        Arc::new(backend(fake.shards())),
        Arc::new(fake.clone()),
        cfg,
    )
}

fn open(hub: &Arc<WatchHub>) -> Client {
    let (tx, rx) = mpsc::unbounded_channel::<WatchRequest>();
    let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok::<_, String>);
    Client {
        tx,
        rx: hub.open(Box::pin(requests)).boxed(),
    }
}

use futures::StreamExt;

fn create(key: &str, end: &str, start: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        range_end: end.as_bytes().to_vec(),
        start_revision: start,
        ..Default::default()
    }
}

impl Client {
    fn send(&self, r: RequestUnion) {
        self.tx
            .send(WatchRequest {
                request_union: Some(r),
            })
            .unwrap();
    }

    fn watch(&self, c: WatchCreateRequest) {
        self.send(RequestUnion::CreateRequest(c));
    }

    /// The next response, as the client decodes it.
    async fn next(&mut self) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.next())
            .await
            .expect("a response within 5 s")
            .expect("stream open")
            .into_message()
    }

    /// Expects a successful `created` and returns the watch id.
    async fn created(&mut self) -> i64 {
        let r = self.next().await;
        assert!(r.created && !r.canceled, "expected created, got {r:?}");
        r.watch_id
    }

    /// Collects events of watch `id` until `n` have arrived (other
    /// responses of that watch are returned too).
    async fn events(&mut self, id: i64, n: usize) -> Vec<(i64, String, String)> {
        let mut out = vec![];
        while out.len() < n {
            let r = self.next().await;
            assert_eq!(r.watch_id, id, "unexpected {r:?}");
            assert!(!r.canceled, "{r:?}");
            let hdr = r.header.as_ref().unwrap().revision;
            for e in &r.events {
                assert!(event_revision(e) <= hdr, "header below its events");
                let kv = e.kv.as_ref().unwrap();
                out.push((
                    kv.mod_revision,
                    String::from_utf8(kv.key.to_vec()).unwrap(),
                    String::from_utf8(kv.value.to_vec()).unwrap(),
                ));
            }
        }
        assert_eq!(out.len(), n, "more events than expected");
        out
    }

    /// Nothing else is pending for this stream's watches: a progress
    /// request's answer (which comes after every event up to the current
    /// revision) is the very next response.
    async fn quiet(&mut self) {
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
        let r = self.next().await;
        assert!(
            r.watch_id == -1 && r.events.is_empty() && !r.created && !r.canceled,
            "expected only the progress answer, got {r:?}"
        );
    }
}

fn cfg() -> WatchConfig {
    WatchConfig::default()
}

// ---------------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn prefix_watch_merges_shards_in_revision_order() {
    let fake = Fake::new(3);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("p/", "p0", 0));
    let id = c.created().await;
    assert_eq!(id, 0);
    let mut want = vec![];
    for i in 0..30 {
        let key = format!("p/{i}");
        let rev = fake.put(&key, "v");
        want.push((rev, key, "v".to_string()));
    }
    // One write spanning shards: one revision, in one response (possibly
    // with earlier revisions queued for the watch before it).
    let rev = fake.write(&[("p/a", Some("1")), ("p/b", Some("2")), ("p/c", Some("3"))]);
    let mut got = vec![];
    let last = loop {
        let r = c.next().await;
        assert_eq!(r.watch_id, id, "unexpected {r:?}");
        for e in &r.events {
            let kv = e.kv.as_ref().unwrap();
            got.push((kv.mod_revision, String::from_utf8(kv.key.to_vec()).unwrap()));
        }
        if got.len() >= 30 + 3 || got.last().is_some_and(|(r, _)| *r == rev) {
            break r;
        }
    };
    let want: Vec<(i64, String)> = want.into_iter().map(|(r, k, _)| (r, k)).collect();
    assert_eq!(got[..30], want[..]);
    assert_eq!(got.len(), 33);
    let in_last: Vec<i64> = last.events.iter().map(event_revision).collect();
    assert!(
        in_last.ends_with(&[rev, rev, rev]),
        "a revision is never split: {last:?}"
    );
    assert_eq!(last.header.unwrap().revision, rev);
    c.quiet().await;
}

#[tokio::test]
async fn created_header_and_start_revision_now() {
    let fake = Fake::new(2);
    fake.put("k", "old");
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("k", "", 0));
    let r = c.next().await;
    assert!(r.created);
    let h = r.header.unwrap();
    assert_eq!(
        (h.revision, h.raft_term, h.member_id),
        (1, 2, crate::testing::MEMBER)
    );
    // The old put is not replayed; the next one arrives.
    let rev = fake.put("k", "new");
    assert_eq!(c.events(0, 1).await, vec![(rev, "k".into(), "new".into())]);
}

#[tokio::test]
async fn historical_replay_and_future_start() {
    let fake = Fake::new(2);
    for i in 1..=5 {
        fake.put(&format!("h/{i}"), "v");
    }
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("h/", "h0", 3));
    let id = c.created().await;
    let got: Vec<i64> = c.events(id, 3).await.iter().map(|e| e.0).collect();
    assert_eq!(got, vec![3, 4, 5]);
    // A start in the future waits for it.
    c.watch(create("h/", "h0", 8));
    let fut = c.created().await;
    fake.put("h/6", "v");
    fake.put("h/7", "v");
    fake.put("h/8", "v");
    // The first watch sees 6, 7, 8; the future one only 8.
    let mut mine = vec![];
    let mut theirs = vec![];
    while mine.len() < 3 || theirs.is_empty() {
        let r = c.next().await;
        for e in &r.events {
            if r.watch_id == id {
                mine.push(event_revision(e));
            } else {
                assert_eq!(r.watch_id, fut);
                theirs.push(event_revision(e));
            }
        }
    }
    assert_eq!(mine, vec![6, 7, 8]);
    assert_eq!(theirs, vec![8]);
}

#[tokio::test]
async fn watch_ids_refusals_and_limits_follow_etcd() {
    let fake = Fake::new(2);
    let hub = hub(
        &fake,
        WatchConfig {
            max_watchers_per_stream: 4,
            ..cfg()
        },
    );
    let mut c = open(&hub);
    let mut chosen = create("a", "", 0);
    chosen.watch_id = 1;
    c.watch(chosen.clone());
    assert_eq!(c.created().await, 1);
    // Auto ids count from 0 and skip taken ones.
    c.watch(create("a", "", 0));
    assert_eq!(c.created().await, 0);
    c.watch(create("a", "", 0));
    assert_eq!(c.created().await, 2);
    // A taken id is refused; the stream goes on.
    c.watch(chosen);
    let r = c.next().await;
    assert!(r.created && r.canceled);
    assert_eq!(r.watch_id, -1);
    assert_eq!(r.cancel_reason, super::session::MSG_DUPLICATE_WATCH_ID);
    // An empty range.
    c.watch(create("b", "a", 0));
    let r = c.next().await;
    assert!(r.created && r.canceled);
    assert_eq!(r.cancel_reason, super::session::MSG_EMPTY_RANGE);
    // The limit.
    c.watch(create("a", "", 0));
    assert_eq!(c.created().await, 3);
    c.watch(create("a", "", 0));
    let r = c.next().await;
    assert!(r.created && r.canceled && r.watch_id == -1);
    assert!(r.cancel_reason.contains("too many watchers"), "{r:?}");
    // Four watches of one key share one subscription.
    assert_eq!(fake.subscribes(), 1);
}

#[tokio::test]
async fn cancel_stops_events_and_unknown_ids_are_ignored() {
    let fake = Fake::new(2);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("x", "", 0));
    let a = c.created().await;
    c.watch(create("x", "", 0));
    let b = c.created().await;
    fake.put("x", "1");
    let mut seen = 0;
    while seen < 2 {
        seen += c.next().await.events.len();
    }
    c.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: a,
    }));
    let r = c.next().await;
    assert!(r.canceled && !r.created && r.watch_id == a);
    c.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: 99,
    }));
    let rev = fake.put("x", "2");
    assert_eq!(c.events(b, 1).await, vec![(rev, "x".into(), "2".into())]);
    c.quiet().await;
    // Cancelling the last watcher ends the feed and its subscription.
    c.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: b,
    }));
    assert!(c.next().await.canceled);
    tokio::time::timeout(Duration::from_secs(5), fake.until_no_subscriptions())
        .await
        .expect("feed closes");
}

#[tokio::test]
async fn filters_and_prev_kv() {
    let fake = Fake::new(2);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    let mut noput = create("f/", "f0", 0);
    noput.filters = vec![FilterType::Noput as i32];
    noput.prev_kv = true;
    c.watch(noput);
    let np = c.created().await;
    let mut nodel = create("f/", "f0", 0);
    nodel.filters = vec![FilterType::Nodelete as i32];
    c.watch(nodel);
    let nd = c.created().await;
    fake.put("f/1", "a");
    fake.put("f/1", "b");
    let del = fake.write(&[("f/1", None)]);
    let mut puts = vec![];
    let mut dels = vec![];
    while puts.len() < 2 || dels.is_empty() {
        let r = c.next().await;
        for e in r.events {
            if r.watch_id == nd {
                assert_eq!(e.r#type, EventType::Put as i32);
                assert!(e.prev_kv.is_none(), "prev_kv not asked for");
                puts.push(e);
            } else {
                assert_eq!(r.watch_id, np);
                assert_eq!(e.r#type, EventType::Delete as i32);
                dels.push(e);
            }
        }
    }
    assert_eq!(dels[0].kv.as_ref().unwrap().mod_revision, del);
    assert_eq!(&dels[0].prev_kv.as_ref().unwrap().value[..], b"b");
    c.quiet().await;
}

#[tokio::test]
async fn compacted_start_is_created_then_canceled_with_compact_revision() {
    let fake = Fake::new(2);
    for i in 0..10 {
        fake.put(&format!("c/{i}"), "v");
    }
    fake.compact(6);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    let id = 1;
    c.watch(WatchCreateRequest {
        watch_id: id,
        ..create("c/", "c0", 2)
    });
    assert_eq!(c.created().await, id);
    let r = c.next().await;
    assert_eq!((r.watch_id, r.canceled, r.compact_revision), (id, true, 6));
    // etcd's compaction response carries header revision 0.
    assert_eq!(r.header.unwrap().revision, 0);
    // As in etcd, the id stays taken until the client cancels it: a
    // create with it is a duplicate, and automatic ids pass over it.
    c.watch(WatchCreateRequest {
        watch_id: id,
        ..create("c/", "c0", 0)
    });
    let r = c.next().await;
    assert_eq!((r.watch_id, r.created, r.canceled), (-1, true, true));
    assert_eq!(r.cancel_reason, super::session::MSG_DUPLICATE_WATCH_ID);
    // A watch from the compacted revision on works.
    c.watch(create("c/", "c0", 6));
    let auto = c.created().await;
    assert_eq!(auto, 0);
    let got: Vec<i64> = c.events(auto, 5).await.iter().map(|e| e.0).collect();
    assert_eq!(got, vec![6, 7, 8, 9, 10]);
    c.watch(create("x/", "x0", 0));
    assert_eq!(c.created().await, 2, "id 1 is still taken");
    // The client's cancel frees the id and is answered, at the current
    // revision.
    let now = fake.put("elsewhere", "v");
    c.send(RequestUnion::CancelRequest(WatchCancelRequest {
        watch_id: id,
    }));
    let r = c.next().await;
    assert_eq!((r.watch_id, r.canceled), (id, true));
    assert_eq!(r.header.unwrap().revision, now);
    c.watch(WatchCreateRequest {
        watch_id: id,
        ..create("c/", "c0", 0)
    });
    assert_eq!(c.created().await, id);
}

#[tokio::test]
async fn progress_request_answers_after_every_watch_caught_up() {
    let fake = Fake::new(3);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    // No watches: answered at once with the current revision.
    fake.put("z", "1");
    c.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
    let r = c.next().await;
    assert_eq!((r.watch_id, r.header.unwrap().revision), (-1, 1));
    c.watch(create("q/", "q0", 0));
    let id = c.created().await;
    let mut last = 0;
    for i in 0..5 {
        last = fake.put(&format!("q/{i}"), "v");
    }
    // Writes elsewhere move the revision; only progress requests tell the
    // idle shards' watermarks.
    let now = fake.put("elsewhere", "v");
    c.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
    let mut events = 0;
    loop {
        let r = c.next().await;
        if r.watch_id == -1 {
            assert!(r.events.is_empty());
            assert!(r.header.unwrap().revision >= now);
            break;
        }
        assert_eq!(r.watch_id, id);
        events += r.events.len();
    }
    assert_eq!(events, 5, "every event before the progress response");
    assert!(last < now);
}

/// A progress answer applies to every watch it names (all of them for
/// `watch_id = -1`): its revision must be at least every event revision
/// that watch was sent before it, and no event at or below it may follow
/// (Kubernetes' watch cache takes it as its resource version). Writes to
/// one watch's prefix go on while progress is requested.
#[tokio::test]
async fn progress_answers_never_fall_below_events_sent() {
    let fake = Fake::new(3);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("a/", "a0", 0));
    let a = c.created().await;
    c.watch(create("b/", "b0", 0));
    let b = c.created().await;
    let writer = {
        let fake = fake.clone();
        tokio::spawn(async move {
            for i in 0.. {
                fake.put(&format!("a/{}", i % 7), "v");
                tokio::task::yield_now().await;
            }
        })
    };
    // Per watch: the newest event revision sent, and the newest progress
    // revision that covers it.
    let mut sent: HashMap<i64, i64> = HashMap::from([(a, 0), (b, 0)]);
    let mut covered: HashMap<i64, i64> = HashMap::from([(a, 0), (b, 0)]);
    for _ in 0..30 {
        c.send(RequestUnion::ProgressRequest(WatchProgressRequest {}));
        let mut answered = HashSet::new();
        while answered.len() < 2 {
            let r = c.next().await;
            let rev = r.header.unwrap().revision;
            if let Some(last) = r.events.last() {
                let first = event_revision(&r.events[0]);
                assert!(
                    first > covered[&r.watch_id],
                    "event {first} after progress {}",
                    covered[&r.watch_id]
                );
                sent.insert(r.watch_id, event_revision(last));
                continue;
            }
            let applies: Vec<i64> = if r.watch_id == -1 {
                vec![a, b]
            } else {
                vec![r.watch_id]
            };
            for w in applies {
                assert!(
                    rev >= sent[&w],
                    "progress {rev} below event {} of watch {w}",
                    sent[&w]
                );
                covered.insert(w, rev);
                answered.insert(w);
            }
        }
    }
    writer.abort();
}

#[tokio::test]
async fn progress_notify_reports_delivered_revision_when_idle() {
    let fake = Fake::new(2);
    let hub = hub(
        &fake,
        WatchConfig {
            progress_notify_interval: Duration::from_millis(50),
            ..cfg()
        },
    );
    let mut c = open(&hub);
    // A watch without progress_notify, on another key: it must hear nothing.
    c.watch(create("m", "", 0));
    let silent = c.created().await;
    let mut w = create("n", "", 0);
    w.progress_notify = true;
    c.watch(w);
    let id = c.created().await;
    let rev = fake.put("n", "v");
    assert_eq!(c.events(id, 1).await.len(), 1);
    fake.put("other", "v");
    let now = fake.current();
    // Idle: notifications with the revision the watch has delivered
    // through; each tick asks for the current revision, so one soon
    // reaches `now`. Only the progress_notify watch hears anything.
    let mut reached = false;
    for _ in 0..5 {
        let r = c.next().await;
        assert_eq!(r.watch_id, id, "only the progress_notify watch: {r:?}");
        assert_ne!(r.watch_id, silent);
        assert!(r.events.is_empty() && !r.canceled && !r.created);
        let h = r.header.unwrap().revision;
        assert!(h >= rev);
        if h >= now {
            reached = true;
            break;
        }
    }
    assert!(reached, "a notification reached the current revision");
}

#[tokio::test]
async fn dropped_shard_stream_resubscribes_without_loss_or_duplicates() {
    let fake = Fake::new(2);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("r/", "r0", 0));
    let id = c.created().await;
    let mut want = vec![];
    want.extend(fake.put_each("r/", 10, "a"));
    let mut got = c.events(id, 10).await;
    fake.drop_streams(0);
    fake.drop_streams(1);
    want.extend(fake.put_each("r/", 10, "b"));
    got.extend(c.events(id, 10).await);
    assert_eq!(got, want);
    assert!(fake.subscribes() >= 4, "both lanes resubscribed");
    c.quiet().await;
}

#[tokio::test]
async fn a_silent_shard_stream_is_replaced_without_loss_or_duplicates() {
    let fake = Fake::new(2);
    let mut cfg = cfg();
    cfg.feed.silence_tick = Duration::from_millis(20);
    cfg.feed.merge.silence_ticks = 2;
    let hub = hub(&fake, cfg);
    let mut c = open(&hub);
    c.watch(create("s/", "s0", 0));
    let id = c.created().await;
    let mut want = vec![];
    want.extend(fake.put_each("s/", 10, "a"));
    let mut got = c.events(id, 10).await;
    assert_eq!(fake.subscribes(), 2);
    // Shard 0's stream goes quiet on a live connection: its events, and
    // everything of shard 1 after them, would wait forever.
    fake.silence(0);
    want.extend(fake.put_each("s/", 10, "b"));
    got.extend(c.events(id, 10).await);
    assert_eq!(got, want);
    assert_eq!(fake.subscribes(), 3, "only the silent lane resubscribed");
    c.quiet().await;
}

#[tokio::test]
async fn a_lost_history_cancels_watches_as_compacted_and_new_ones_work() {
    let fake = Fake::new(2);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("h/", "h0", 0));
    let old = c.created().await;
    let before = fake.put_each("h/", 4, "a");
    assert_eq!(c.events(old, 4).await, before);
    // A non-durable server restarts: its revisions start over. Resuming
    // from revision 6 would skip the new revisions 1..=5 without a trace.
    fake.restart_without_history();
    let r = c.next().await;
    assert_eq!(r.watch_id, old);
    assert!(r.canceled, "{r:?}");
    assert_eq!(r.compact_revision, 1, "the new history serves from 1");
    // A new watch uses the new history.
    c.watch(create("h/", "h0", 0));
    let new = c.created().await;
    let after = fake.put_each("h/", 3, "b");
    assert_eq!(after.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(c.events(new, 3).await, after);
    c.quiet().await;
}

#[tokio::test]
async fn a_watch_created_after_an_unnoticed_restart_uses_the_new_history() {
    let fake = Fake::new(2);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("o/", "o0", 0));
    let old = c.created().await;
    let before = fake.put_each("o/", 4, "a");
    assert_eq!(c.events(old, 4).await, before);
    // The server restarts and the gateway has not noticed: that feed's
    // streams stay open and silent, so no feed learns the new history.
    fake.silence(0);
    fake.silence(1);
    fake.restart_without_history();
    // A watch from "now" reads a revision of the new history, and with it
    // the history's id: it is not refused for expecting the old one.
    let mut d = open(&hub);
    d.watch(create("n/", "n0", 0));
    let new = d.created().await;
    let after = fake.put_each("n/", 2, "b");
    assert_eq!(after.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(d.events(new, 2).await, after);
    // Nor does a watch of the old feed's keys join that feed: its tail
    // holds the old history's revisions 1..=4.
    d.watch(create("o/", "o0", 0));
    let again = d.created().await;
    let more = fake.put_each("o/", 1, "c");
    assert_eq!(more[0].0, 3);
    assert_eq!(d.events(again, 1).await, more);
    d.quiet().await;
}

#[tokio::test]
async fn many_watchers_share_one_feed() {
    let fake = Fake::new(2);
    let hub = hub(&fake, cfg());
    let mut clients: Vec<Client> = (0..10).map(|_| open(&hub)).collect();
    for c in &clients {
        for _ in 0..10 {
            c.watch(create("hot", "", 0));
        }
    }
    for c in &mut clients {
        for i in 0..10 {
            assert_eq!(c.created().await, i);
        }
    }
    assert_eq!(fake.subscribes(), 1, "100 watchers, one subscription");
    let revs: Vec<i64> = (0..5).map(|i| fake.put("hot", &i.to_string())).collect();
    for c in &mut clients {
        let mut per_watch: HashMap<i64, Vec<i64>> = HashMap::new();
        while per_watch.values().map(Vec::len).sum::<usize>() < 50 {
            let r = c.next().await;
            per_watch
                .entry(r.watch_id)
                .or_default()
                .extend(r.events.iter().map(event_revision));
        }
        assert_eq!(per_watch.len(), 10);
        for v in per_watch.values() {
            assert_eq!(v, &revs);
        }
    }
}

#[tokio::test]
async fn a_slow_watcher_catches_up_on_its_own_feed_others_unaffected() {
    let fake = Fake::new(2);
    let hub = hub(
        &fake,
        WatchConfig {
            max_pending_bytes: 2048,
            ..cfg()
        },
    );
    let mut fast = open(&hub);
    let mut slow = open(&hub);
    fast.watch(create("s/", "s0", 0));
    let f = fast.created().await;
    slow.watch(create("s/", "s0", 0));
    let s = slow.created().await;
    assert_eq!(fake.subscribes(), 2, "one feed (two shards)");
    let value = "x".repeat(100);
    let mut want = vec![];
    for i in 0..400 {
        let k = format!("s/{i}");
        want.push((fake.put(&k, &value), k, value.clone()));
        if i % 50 == 49 {
            // The fast reader keeps up while the slow one reads nothing.
            let got = fast.events(f, 50).await;
            assert_eq!(got, want[i - 49..=i].to_vec());
        }
    }
    assert!(
        fake.subscribes() > 2,
        "the slow watcher left the shared feed for its own"
    );
    // Now the slow one reads: everything, once, in order.
    let got = slow.events(s, 400).await;
    assert_eq!(got, want);
    slow.quiet().await;
    fast.quiet().await;
}

#[tokio::test]
async fn fragments_for_fragment_watches_only() {
    let fake = Fake::new(2);
    let hub = hub(
        &fake,
        WatchConfig {
            max_response_bytes: 600,
            ..cfg()
        },
    );
    let mut c = open(&hub);
    let mut fw = create("g/", "g0", 0);
    fw.fragment = true;
    c.watch(fw);
    let frag = c.created().await;
    c.watch(create("g/", "g0", 0));
    let whole = c.created().await;
    let value = "y".repeat(100);
    let keys: Vec<String> = (0..12).map(|i| format!("g/{i:02}")).collect();
    let ops: Vec<(&str, Option<&str>)> = keys
        .iter()
        .map(|k| (k.as_str(), Some(value.as_str())))
        .collect();
    let rev = fake.write(&ops);
    let mut frag_parts = vec![];
    let mut whole_parts = vec![];
    while whole_parts.is_empty() || frag_parts.last().is_none_or(|r: &WatchResponse| r.fragment) {
        let r = c.next().await;
        if r.watch_id == frag {
            frag_parts.push(r);
        } else {
            assert_eq!(r.watch_id, whole);
            whole_parts.push(r);
        }
    }
    assert_eq!(whole_parts.len(), 1);
    assert_eq!(whole_parts[0].events.len(), 12);
    assert!(frag_parts.len() > 1);
    assert_eq!(frag_parts.iter().map(|r| r.events.len()).sum::<usize>(), 12);
    for r in &frag_parts[..frag_parts.len() - 1] {
        assert!(r.fragment);
    }
    assert!(frag_parts
        .iter()
        .flat_map(|r| &r.events)
        .all(|e| event_revision(e) == rev));
}

#[tokio::test]
async fn a_closed_stream_releases_its_feeds() {
    let fake = Fake::new(3);
    let hub = hub(&fake, cfg());
    let mut c = open(&hub);
    c.watch(create("gone/", "gone0", 0));
    c.created().await;
    c.watch(create("gone/k", "", 0));
    c.created().await;
    // A prefix on 3 shards and a key on 1.
    tokio::time::timeout(Duration::from_secs(5), fake.until_subscribes(4))
        .await
        .expect("every subscription made");
    // The client goes away (gRPC drops the response stream).
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), fake.until_no_subscriptions())
        .await
        .expect("every subscription cancelled");
}
