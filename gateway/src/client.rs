//! `ShardClient`: one multiplexed TCP connection to one shard.
//!
//! The shard protocol (`proto/protos/shardpb/shard.proto`) frames every
//! message as a 4-byte little-endian length followed by a prost-encoded
//! `ShardRequest` (to the shard) or `ShardResponse` (from it). Requests carry
//! an id unique on their connection and responses echo it; responses may come
//! back in any order. So one connection carries any number of requests at
//! once, and a shard core never has to juggle many sockets per gateway.
//!
//! Structure of a live connection ([`Conn`]):
//!
//! ```text
//!   callers ──frames──▶ mpsc ──▶ writer task ──▶ socket ──▶ shard
//!   callers ◀─oneshot── pending map (id → sender) ◀── reader task ◀── socket
//! ```
//!
//! - A caller takes a fresh id, registers a oneshot in the pending map, and
//!   queues its encoded frame. The writer task coalesces whatever is queued
//!   into one `write_all` (batching under load without delaying a lone
//!   request).
//! - The reader task decodes each response and completes the waiter with the
//!   same id; a response with an unknown id (its caller timed out) is
//!   dropped.
//! - When either task fails (EOF, I/O error, garbage frame) the connection is
//!   *closed*: the pending map is drained (every waiter sees
//!   [`GatewayError::ConnectionLost`]: the request may or may not have been
//!   applied) and no new request is admitted. The next call connects anew.
//!
//! Invariants:
//! - a request is either registered before its frame is queued, or never
//!   sent; so a response can never arrive for an id nobody registered, except
//!   for callers that gave up after [`ClientConfig::request_timeout`];
//! - [`GatewayError::ConnectFailed`] means the request was certainly not
//!   sent (safe to retry anything); `ConnectionLost` and `Timeout` mean the
//!   outcome is unknown;
//! - a shard's error answer (`ShardError`) is returned as the matching
//!   [`GatewayError`] variant, never as a successful body.
//!
//! # Streams (watch subscriptions)
//!
//! A `WatchSubscribeRequest` is answered by many `WatchEventsResponse`
//! frames under its id, until it is cancelled, compacted away, or the
//! connection goes. [`ShardClient::subscribe`] registers a
//! [`SubscriptionSink`] (a [`FrameConsumer`] and a tag chosen by the
//! caller, so one consumer can multiplex many subscriptions) in the same
//! pending map as the one-shot waiters, then sends the request. The reader
//! task hands every frame for that id to the consumer itself, in arrival
//! order, outside the pending map's lock: no channel and no other task
//! stands between a frame and its watchers, so a write's events are
//! fanned out before the reader of the request connection, woken by the
//! same poll, completes the write. Once the reader holds no further
//! complete frame it flushes every consumer it fed, so a burst of frames
//! costs each consumer one step.
//! A stream ends with exactly one `Err` ([`GatewayError::ConnectionLost`]
//! when the connection closes, the shard's error if it answers one) or,
//! for a compacted start, after the frame that carries `compact_revision`.
//! The caller then knows everything it received is intact and resumes from
//! there (see `watch::merge`).
//!
//! Ack, progress and cancel are one-way frames ([`Subscription`]); they go
//! on the connection that carries the subscription, never on a later one
//! (a subscription id means nothing on another connection). Dropping a
//! [`Subscription`] cancels it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use metastore_proto::shardpb::{
    shard_request, shard_response, ShardRequest, ShardResponse, WatchAckRequest,
    WatchCancelRequest, WatchEventsResponse, WatchProgressRequest, WatchSubscribeRequest,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{GatewayError, Result};

/// Largest frame accepted from a shard. Anything bigger is treated as a
/// corrupt stream (the connection is dropped).
pub const MAX_FRAME_BYTES: usize = 1 << 30;

/// Writer batches stop growing at this size.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Sweeps per request timeout (see `Pending::sweep`).
const SWEEPS_PER_TIMEOUT: u64 = 4;

/// TCP keep-alive on shard connections: probes after this much silence,
/// every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`] times, so a peer that
/// vanished without closing (host gone, path cut) fails the connection's
/// reads within about 5 s. Without it a watch connection that no request
/// is waiting on stays `Live` and silent for good, its watches delivering
/// nothing (a shard sends heartbeats only as its watermark moves).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(2);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 3;
/// Keep-alive probes stop while anything sent is unacknowledged (a
/// request, an ack, a subscription to a vanished host): data left
/// unacknowledged this long fails the connection instead of the kernel's
/// retransmissions (about 15 minutes). Generous, so that a shard that
/// stops reading under load (a full window, acknowledged by probes) is
/// not cut off.
const UNACKED_TIMEOUT: Duration = Duration::from_secs(20);

/// The socket options of a shard connection: no Nagle delay, keep-alive.
fn configure(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(UNACKED_TIMEOUT))
}

/// Timeouts of a shard client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long to wait for a response once the request is queued (at
    /// least; at most a quarter more: see `Pending::sweep`).
    pub request_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A cheap-to-clone handle on the connection to one shard.
#[derive(Clone)]
pub struct ShardClient {
    inner: Arc<Inner>,
}

struct Inner {
    shard: u32,
    addr: String,
    config: ClientConfig,
    next_id: AtomicU64,
    /// The live connection, if any (checked on every call; held briefly).
    current: Mutex<Option<Arc<Conn>>>,
    /// Serialises reconnects so a burst of callers opens one socket.
    connecting: tokio::sync::Mutex<()>,
}

/// What a subscription's stream carries: a frame, or the one error that
/// ends it.
pub type SubscriptionEvent = std::result::Result<WatchEventsResponse, GatewayError>;

/// What takes the frames of subscriptions, called from a connection's
/// reader task (so it must not block, nor take a lock that is held while
/// a [`Subscription`] is dropped).
pub trait FrameConsumer: Send + Sync {
    /// One frame (or the error that ends the stream) of the subscription
    /// tagged `tag`.
    fn frame(&self, tag: u64, ev: SubscriptionEvent);
    /// No further frame is at hand for now: act on what came.
    fn flush(&self);
}

/// Where the frames of one subscription go: `(tag, event)` to `consumer`.
#[derive(Clone)]
pub struct SubscriptionSink {
    pub tag: u64,
    pub consumer: Arc<dyn FrameConsumer>,
}

impl SubscriptionSink {
    /// Hands over one event and flushes (a lone frame).
    pub fn send(&self, ev: SubscriptionEvent) {
        self.consumer.frame(self.tag, ev);
        self.consumer.flush();
    }
}

impl std::fmt::Debug for SubscriptionSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionSink")
            .field("tag", &self.tag)
            .finish()
    }
}

/// A caller waiting for the response to its request: the response, or
/// the timeout the sweep gives it (see [`Pending::sweep`]).
struct Waiter {
    tx: oneshot::Sender<Result<ShardResponse>>,
    /// The sweep generation the request was sent in.
    since: u64,
}

/// Waiters and streams of one connection.
#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, Waiter>,
    streams: HashMap<u64, SubscriptionSink>,
    closed: bool,
    /// Shard id, for the error streams end with.
    shard: u32,
    /// Sweeps so far (see [`Pending::sweep`]).
    generation: u64,
}

impl Pending {
    /// Closes the connection's bookkeeping: drops every waiter (they see a
    /// lost connection) and refuses new ones. Returns the streams, which
    /// the caller ends with `ConnectionLost` once the lock is released
    /// ([`close`]).
    fn close(&mut self) -> Vec<SubscriptionSink> {
        self.closed = true;
        self.waiters.clear();
        self.streams.drain().map(|(_, sink)| sink).collect()
    }

    /// Requests time out by sweeps, not by a timer each: a timer per
    /// request costs the runtime a timer-wheel entry, and at low load
    /// (each new timer the earliest) an eventfd write and an extra epoll
    /// round to wake its driver. A sweep every [`SWEEPS_PER_TIMEOUT`]th of
    /// the request timeout fails the waiters sent that many sweeps ago or
    /// earlier, so a request times out between one and 1 + 1 /
    /// `SWEEPS_PER_TIMEOUT` request timeouts after it was sent.
    fn sweep(&mut self) {
        self.generation += 1;
        let (now, shard) = (self.generation, self.shard);
        let expired = self
            .waiters
            .extract_if(|_, w| w.since + SWEEPS_PER_TIMEOUT < now);
        for (_, w) in expired {
            let _ = w.tx.send(Err(GatewayError::Timeout { shard }));
        }
    }

    /// Routes one response: completes its waiter, or returns the stream
    /// and the event it gets (handed over once the lock is released).
    fn dispatch(&mut self, resp: ShardResponse) -> Option<(SubscriptionSink, SubscriptionEvent)> {
        if let Some(w) = self.waiters.remove(&resp.id) {
            let _ = w.tx.send(Ok(resp));
            return None;
        }
        let Some(sink) = self.streams.get(&resp.id) else {
            tracing::debug!(
                shard = self.shard,
                id = resp.id,
                "response for an abandoned request"
            );
            return None;
        };
        let (ev, last) = match resp.body {
            Some(shard_response::Body::WatchEvents(f)) => {
                let last = f.compact_revision != 0;
                (Ok(f), last)
            }
            Some(shard_response::Body::Error(e)) => (Err(GatewayError::from_shard(e)), true),
            other => (
                Err(GatewayError::Protocol(format!(
                    "shard {} answered a subscription with {other:?}",
                    self.shard
                ))),
                true,
            ),
        };
        let sink = if last {
            self.streams.remove(&resp.id)?
        } else {
            sink.clone()
        };
        Some((sink, ev))
    }
}

/// Closes `pending` and ends its streams with `ConnectionLost`.
fn close(pending: &Mutex<Pending>) {
    let (shard, streams) = {
        let mut p = pending.lock().unwrap();
        (p.shard, p.close())
    };
    for sink in streams {
        sink.send(Err(GatewayError::ConnectionLost { shard }));
    }
}

/// Whether `buf` begins with a whole frame.
fn holds_frame(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf.len() - 4 >= u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// One live TCP connection and its two tasks.
struct Conn {
    frames: mpsc::UnboundedSender<Bytes>,
    pending: Arc<Mutex<Pending>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.pending.lock().unwrap().closed || self.frames.is_closed()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.sweeper.abort();
        close(&self.pending);
    }
}

impl ShardClient {
    /// A client for shard `shard` at `addr`. Connects lazily, on first use.
    pub fn new(shard: u32, addr: impl Into<String>, config: ClientConfig) -> ShardClient {
        ShardClient {
            inner: Arc::new(Inner {
                shard,
                addr: addr.into(),
                config,
                next_id: AtomicU64::new(1),
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn shard(&self) -> u32 {
        self.inner.shard
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Sends one request and waits for its response body. A `ShardError`
    /// answer comes back as `Err` (see [`GatewayError::from_shard`]).
    pub async fn call(&self, body: shard_request::Body) -> Result<shard_response::Body> {
        let shard = self.inner.shard;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = encode_frame(&ShardRequest {
            id,
            body: Some(body),
        })
        .freeze();
        // A connection that turns out closed before our frame was queued
        // costs nothing: try a fresh one, once. A failed send hands the
        // frame back, so it is not cloned for the retry (the first clone
        // of a `Bytes` made from a `Vec` allocates its reference count).
        let mut attempts = 0;
        let (_conn, rx) = loop {
            attempts += 1;
            let conn = self.connection().await?;
            let (tx, rx) = oneshot::channel();
            {
                let mut p = conn.pending.lock().unwrap();
                if !p.closed {
                    let since = p.generation;
                    p.waiters.insert(id, Waiter { tx, since });
                }
            }
            if !conn.is_closed() {
                match conn.frames.send(frame) {
                    Ok(()) => break (conn, rx),
                    Err(mpsc::error::SendError(back)) => frame = back,
                }
            }
            conn.pending.lock().unwrap().waiters.remove(&id);
            if attempts >= 2 {
                return Err(GatewayError::ConnectFailed {
                    shard,
                    addr: self.inner.addr.clone(),
                    reason: "connection closed".into(),
                });
            }
        };
        let resp = match rx.await {
            Ok(answer) => answer?,
            // Dropped unanswered: the connection closed.
            Err(_) => return Err(GatewayError::ConnectionLost { shard }),
        };
        match resp.body {
            Some(shard_response::Body::Error(e)) => Err(GatewayError::from_shard(e)),
            Some(body) => Ok(body),
            None => Err(GatewayError::Protocol(format!(
                "shard {shard} sent an empty response"
            ))),
        }
    }

    /// Subscribes to a stream of watch frames (see the module docs): every
    /// frame for this subscription goes to `sink`, tagged with `sink.tag`,
    /// until the stream ends with an error, a compacted frame, or the
    /// returned [`Subscription`] is dropped.
    pub async fn subscribe(
        &self,
        req: WatchSubscribeRequest,
        sink: SubscriptionSink,
    ) -> Result<Subscription> {
        let shard = self.inner.shard;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&ShardRequest {
            id,
            body: Some(shard_request::Body::WatchSubscribe(req)),
        })
        .freeze();
        for _ in 0..2 {
            let conn = self.connection().await?;
            {
                let mut p = conn.pending.lock().unwrap();
                if p.closed {
                    continue;
                }
                p.streams.insert(id, sink.clone());
            }
            if !conn.is_closed() && conn.frames.send(frame.clone()).is_ok() {
                return Ok(Subscription {
                    id,
                    client: self.clone(),
                    conn,
                });
            }
            conn.pending.lock().unwrap().streams.remove(&id);
        }
        Err(GatewayError::ConnectFailed {
            shard,
            addr: self.inner.addr.clone(),
            reason: "connection closed".into(),
        })
    }

    /// Sends a one-way request on `conn` (dropped silently if it closed:
    /// the subscription it names ended with it).
    fn send_oneway(&self, conn: &Conn, body: shard_request::Body) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&ShardRequest {
            id,
            body: Some(body),
        })
        .freeze();
        let _ = conn.frames.send(frame);
    }

    /// The live connection, connecting if there is none.
    async fn connection(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _guard = self.inner.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let conn = Arc::new(self.connect().await?);
        *self.inner.current.lock().unwrap() = Some(conn.clone());
        Ok(conn)
    }

    fn live(&self) -> Option<Arc<Conn>> {
        let cur = self.inner.current.lock().unwrap();
        cur.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    async fn connect(&self) -> Result<Conn> {
        let inner = &self.inner;
        let failed = |reason: String| GatewayError::ConnectFailed {
            shard: inner.shard,
            addr: inner.addr.clone(),
            reason,
        };
        let stream = tokio::time::timeout(
            inner.config.connect_timeout,
            TcpStream::connect(inner.addr.as_str()),
        )
        .await
        .map_err(|_| failed("connect timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
        if let Err(e) = configure(&stream) {
            tracing::warn!(shard = inner.shard, error = %e, "shard connection options");
        }
        tracing::debug!(shard = inner.shard, addr = %inner.addr, "connected to shard");
        let (read_half, write_half) = stream.into_split();
        let pending = Arc::new(Mutex::new(Pending {
            shard: inner.shard,
            ..Pending::default()
        }));
        let (frames, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(inner.shard, write_half, rx, pending.clone()));
        let reader = tokio::spawn(read_loop(inner.shard, read_half, pending.clone()));
        let sweep_every = inner.config.request_timeout / SWEEPS_PER_TIMEOUT as u32;
        let sweeper = tokio::spawn(sweep_loop(sweep_every, pending.clone()));
        Ok(Conn {
            frames,
            pending,
            reader,
            writer,
            sweeper,
        })
    }
}

/// Encodes `msg` as one frame: 4-byte little-endian length, then the bytes.
pub fn encode_frame<M: Message>(msg: &M) -> BytesMut {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.put_u32_le(len as u32);
    msg.encode(&mut buf).expect("BytesMut grows as needed");
    buf
}

/// Reads one frame's payload; `Ok(None)` on a clean EOF between frames.
/// The payload is read into uninitialised capacity of its own allocation:
/// nothing is zeroed first (a 100-key list answer is tens of KiB), and the
/// `Bytes` it becomes is the one keys and values are sliced from.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit"),
        ));
    }
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let room = len - buf.len();
        if r.read_buf(&mut (&mut buf).limit(room)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(buf.freeze()))
}

async fn write_loop(
    shard: u32,
    mut sock: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    pending: Arc<Mutex<Pending>>,
) {
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        // Under load (other requests in flight on this connection), let
        // the other ready tasks run first: they queue more frames, and one
        // socket write carries them all. A lone request goes out at once
        // (a yield costs the scheduler a pass through its I/O driver).
        if pending.lock().unwrap().waiters.len() > 1 {
            tokio::task::yield_now().await;
        }
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = sock.write_all(&batch).await {
            tracing::warn!(shard, error = %e, "writing to shard failed; closing connection");
            break;
        }
    }
    close(&pending);
}

/// Times out the connection's requests (see [`Pending::sweep`]).
async fn sweep_loop(every: Duration, pending: Arc<Mutex<Pending>>) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        let mut p = pending.lock().unwrap();
        if p.closed {
            return;
        }
        p.sweep();
    }
}

async fn read_loop(shard: u32, sock: tokio::net::tcp::OwnedReadHalf, pending: Arc<Mutex<Pending>>) {
    let mut sock = BufReader::with_capacity(64 * 1024, sock);
    // Consumers fed since the last flush (see "Streams").
    let mut fed: Vec<Arc<dyn FrameConsumer>> = Vec::new();
    loop {
        let frame = match read_frame(&mut sock).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                tracing::debug!(shard, "shard closed the connection");
                break;
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "reading from shard failed; closing connection");
                break;
            }
        };
        // Decoded from `Bytes`, keys and values are slices of the frame
        // (`mvccpb.KeyValue` uses `bytes::Bytes`): no copy here, and a
        // watch event fanned out to many watchers is shared, not copied.
        let resp = match ShardResponse::decode(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(shard, error = %e, "undecodable frame from shard; closing connection");
                break;
            }
        };
        let routed = pending.lock().unwrap().dispatch(resp);
        if let Some((sink, ev)) = routed {
            sink.consumer.frame(sink.tag, ev);
            if !fed.iter().any(|c| Arc::ptr_eq(c, &sink.consumer)) {
                fed.push(sink.consumer);
            }
        }
        if !holds_frame(sock.buffer()) {
            for c in fed.drain(..) {
                c.flush();
            }
        }
    }
    for c in fed.drain(..) {
        c.flush();
    }
    close(&pending);
}

/// One live watch subscription on one connection. Dropping it cancels it.
pub struct Subscription {
    id: u64,
    client: ShardClient,
    conn: Arc<Conn>,
}

impl Subscription {
    /// The subscribe request's id (names the subscription to the shard).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Everything up to frame `seq` has been consumed.
    pub fn ack(&self, seq: u64) {
        self.client.send_oneway(
            &self.conn,
            shard_request::Body::WatchAck(WatchAckRequest {
                subscription_id: self.id,
                seq,
            }),
        );
    }

    /// Asks for a heartbeat once the shard has resolved `revision`.
    pub fn progress(&self, revision: i64) {
        self.client.send_oneway(
            &self.conn,
            shard_request::Body::WatchProgress(WatchProgressRequest {
                subscription_id: self.id,
                revision,
            }),
        );
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let registered = self.conn.pending.lock().unwrap().streams.remove(&self.id);
        if registered.is_some() && !self.conn.is_closed() {
            self.client.send_oneway(
                &self.conn,
                shard_request::Body::WatchCancel(WatchCancelRequest {
                    subscription_id: self.id,
                }),
            );
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("shard", &self.client.shard())
            .field("id", &self.id)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::{
        PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    };
    use metastore_proto::shardpb::{
        shard_error, CurrentRevisionRequest, CurrentRevisionResponse, ShardError,
    };
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn shard_connections_keep_alive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        configure(&stream).unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert!(sock.tcp_nodelay().unwrap());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(UNACKED_TIMEOUT));
    }

    /// A fake shard: answers every request on every accepted connection.
    /// Ranges are answered in reverse arrival order per batch of two to
    /// prove out-of-order delivery works; a put of key "drop" closes the
    /// connection without answering; "slow" is never answered.
    async fn fake_shard() -> (String, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = BufReader::new(r);
                    let mut held: Option<ShardResponse> = None;
                    while let Ok(Some(frame)) = read_frame(&mut r).await {
                        let req = ShardRequest::decode(frame).unwrap();
                        let body = match req.body.unwrap() {
                            shard_request::Body::CurrentRevision(_) => {
                                shard_response::Body::CurrentRevision(CurrentRevisionResponse {
                                    revision: 42,
                                    raft_term: 3,
                                    ..Default::default()
                                })
                            }
                            shard_request::Body::Put(p) if p.key[..] == *b"drop" => return,
                            shard_request::Body::Put(p) if p.key[..] == *b"slow" => continue,
                            shard_request::Body::Put(p) if p.key[..] == *b"bad" => {
                                shard_response::Body::Error(ShardError {
                                    code: shard_error::Code::Compacted as i32,
                                    message: "compacted".into(),
                                })
                            }
                            shard_request::Body::Put(_) => shard_response::Body::Put(PutResponse {
                                header: Some(ResponseHeader {
                                    revision: 7,
                                    ..Default::default()
                                }),
                                prev_kv: None,
                            }),
                            shard_request::Body::Range(rr) => {
                                let resp = ShardResponse {
                                    id: req.id,
                                    body: Some(shard_response::Body::Range(RangeResponse {
                                        count: rr.limit,
                                        ..Default::default()
                                    })),
                                };
                                match held.take() {
                                    None => {
                                        held = Some(resp);
                                        continue;
                                    }
                                    Some(first) => {
                                        w.write_all(&encode_frame(&resp)).await.unwrap();
                                        w.write_all(&encode_frame(&first)).await.unwrap();
                                        continue;
                                    }
                                }
                            }
                            other => panic!("unexpected {other:?}"),
                        };
                        let resp = ShardResponse {
                            id: req.id,
                            body: Some(body),
                        };
                        w.write_all(&encode_frame(&resp)).await.unwrap();
                    }
                });
            }
        });
        (addr, task)
    }

    fn cfg() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_millis(300),
        }
    }

    fn put(key: &str) -> shard_request::Body {
        shard_request::Body::Put(PutRequest {
            key: key.as_bytes().to_vec().into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn frames_round_trip_and_multiplex_out_of_order() {
        let (addr, server) = fake_shard().await;
        let c = ShardClient::new(0, addr, cfg());
        match c
            .call(shard_request::Body::CurrentRevision(
                CurrentRevisionRequest {},
            ))
            .await
            .unwrap()
        {
            shard_response::Body::CurrentRevision(r) => {
                assert_eq!((r.revision, r.raft_term), (42, 3))
            }
            other => panic!("{other:?}"),
        }
        // Two ranges in flight at once; the fake answers them swapped.
        let range = |limit| {
            shard_request::Body::Range(RangeRequest {
                key: b"a".to_vec(),
                limit,
                ..Default::default()
            })
        };
        let (a, b) = tokio::join!(c.call(range(1)), c.call(range(2)));
        let count = |r: Result<shard_response::Body>| match r.unwrap() {
            shard_response::Body::Range(r) => r.count,
            other => panic!("{other:?}"),
        };
        assert_eq!((count(a), count(b)), (1, 2));
        // Many concurrent requests on one connection.
        let calls: Vec<_> = (0..200).map(|i| c.call(put(&format!("k{i}")))).collect();
        for r in futures::future::join_all(calls).await {
            assert!(matches!(r.unwrap(), shard_response::Body::Put(_)));
        }
        server.abort();
    }

    #[tokio::test]
    async fn shard_errors_timeouts_and_reconnects() {
        let (addr, server) = fake_shard().await;
        let c = ShardClient::new(3, addr, cfg());
        assert_eq!(
            c.call(put("bad")).await.unwrap_err(),
            GatewayError::Compacted
        );
        assert_eq!(
            c.call(put("slow")).await.unwrap_err(),
            GatewayError::Timeout { shard: 3 }
        );
        // The connection still works after a timeout.
        assert!(c.call(put("x")).await.is_ok());
        // The shard hangs up mid-request: outcome unknown.
        assert_eq!(
            c.call(put("drop")).await.unwrap_err(),
            GatewayError::ConnectionLost { shard: 3 }
        );
        // The next call reconnects transparently.
        assert!(c.call(put("y")).await.is_ok());
        server.abort();
    }

    #[test]
    fn a_sweep_times_out_exactly_the_requests_sent_long_enough_ago() {
        let mut p = Pending::default();
        let mut answers = Vec::new();
        // Request i is sent after i sweeps.
        for i in 0..3u64 {
            let (tx, rx) = oneshot::channel();
            p.waiters.insert(
                i,
                Waiter {
                    tx,
                    since: p.generation,
                },
            );
            answers.push(rx);
            p.sweep();
        }
        // Request 0 has seen 3 sweeps; it times out at the 5th (more than
        // SWEEPS_PER_TIMEOUT whole sweep intervals after it was sent).
        p.sweep();
        assert_eq!(p.waiters.len(), 3, "nothing is due after 4 sweeps");
        p.sweep();
        assert_eq!(
            answers[0].try_recv().unwrap().unwrap_err(),
            GatewayError::Timeout { shard: 0 }
        );
        assert_eq!(p.waiters.len(), 2);
        p.sweep();
        assert!(answers[1].try_recv().unwrap().is_err());
        assert!(p.waiters.contains_key(&2));
        // An answered request is no longer swept.
        assert!(p.dispatch(ShardResponse { id: 2, body: None }).is_none());
        assert!(answers[2].try_recv().unwrap().is_ok());
        p.sweep();
        p.sweep();
        assert!(p.waiters.is_empty());
    }

    #[tokio::test]
    async fn unreachable_shard_is_connect_failed() {
        // Bind then drop to get a port nobody listens on.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let c = ShardClient::new(1, addr, cfg());
        let e = c.call(put("x")).await.unwrap_err();
        assert!(
            matches!(e, GatewayError::ConnectFailed { shard: 1, .. }),
            "{e:?}"
        );
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn frame_encoding_is_length_prefixed_little_endian() {
        let msg = ShardRequest {
            id: 5,
            body: Some(shard_request::Body::CurrentRevision(
                CurrentRevisionRequest {},
            )),
        };
        let f = encode_frame(&msg);
        let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(len, f.len() - 4);
        assert_eq!(ShardRequest::decode(&f[4..]).unwrap(), msg);
        let mut r = &f[..];
        assert_eq!(read_frame(&mut r).await.unwrap().unwrap(), f[4..].to_vec());
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }

    /// A frame arriving a few bytes at a time is read whole; one cut off
    /// mid-payload is an error, not a short frame.
    #[tokio::test]
    async fn frames_are_read_across_partial_reads() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = (payload.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&payload);
        let whole = wire.clone();
        // A pipe that holds 7 bytes at a time: every read is partial.
        let (mut tx, mut rx) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            tx.write_all(&whole).await.unwrap();
            tx.write_all(&whole[..100]).await.unwrap(); // a cut-off frame
        });
        assert_eq!(read_frame(&mut rx).await.unwrap().unwrap(), payload);
        // The writer ends (closing its side) once the cut-off frame is read.
        let e = read_frame(&mut rx).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        writer.await.unwrap();
    }

    /// Records what a consumer is handed, in order.
    struct Recorder(mpsc::UnboundedSender<String>);

    impl FrameConsumer for Recorder {
        fn frame(&self, tag: u64, ev: SubscriptionEvent) {
            let what = match ev {
                Ok(f) => format!("{tag}:frame {}", f.seq),
                Err(e) => format!("{tag}:end {e:?}"),
            };
            let _ = self.0.send(what);
        }
        fn flush(&self) {
            let _ = self.0.send("flush".into());
        }
    }

    #[tokio::test]
    async fn stream_frames_reach_the_consumer_in_order_and_each_read_is_flushed_once() {
        // A fake shard that answers a subscription with three frames in one
        // write, then one more once the first is acked, then hangs up.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            let mut r = BufReader::new(r);
            let mut sub_id = 0;
            let frame = |id: u64, seq: u64| {
                encode_frame(&ShardResponse {
                    id,
                    body: Some(shard_response::Body::WatchEvents(WatchEventsResponse {
                        seq,
                        ..Default::default()
                    })),
                })
            };
            while let Ok(Some(f)) = read_frame(&mut r).await {
                match ShardRequest::decode(f.clone()).unwrap().body.unwrap() {
                    shard_request::Body::WatchSubscribe(_) => {
                        sub_id = ShardRequest::decode(f).unwrap().id;
                        let mut burst = frame(sub_id, 1);
                        burst.extend_from_slice(&frame(sub_id, 2));
                        burst.extend_from_slice(&frame(sub_id, 3));
                        w.write_all(&burst).await.unwrap();
                    }
                    shard_request::Body::WatchAck(a) => {
                        assert_eq!((a.subscription_id, a.seq), (sub_id, 3));
                        w.write_all(&frame(sub_id, 4)).await.unwrap();
                        return;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sink = SubscriptionSink {
            tag: 7,
            consumer: Arc::new(Recorder(tx)),
        };
        let c = ShardClient::new(2, addr, cfg());
        let sub = c
            .subscribe(WatchSubscribeRequest::default(), sink)
            .await
            .unwrap();
        for want in ["7:frame 1", "7:frame 2", "7:frame 3", "flush"] {
            assert_eq!(rx.recv().await.unwrap(), want);
        }
        sub.ack(3);
        // The hang-up ends the stream (outside any lock).
        for want in [
            "7:frame 4",
            "flush",
            "7:end ConnectionLost { shard: 2 }",
            "flush",
        ] {
            assert_eq!(rx.recv().await.unwrap(), want);
        }
        server.await.unwrap();
        drop(sub);
    }
}
