//! The shard's TCP front: frames in, `Shard::handle`, frames out.
//!
//! Framing (see proto/protos/shardpb/shard.proto): a 4-byte little-endian
//! length, then one prost-encoded `ShardRequest`/`ShardResponse`. One
//! connection carries many requests at once, and a slow one (a read
//! waiting for the watermark) never holds up the others: a single-shard
//! write (Put, DeleteRange, Txn) is queued for raft by the reader itself
//! and answered by the shard once applied (`Shard::submit_write`); every
//! other request runs as its own task. Answers are encoded straight into
//! the connection's [`Outbox`], whose writer sends whatever is there in
//! one socket write.
//! Frames are read through a buffer, so a burst of requests costs one
//! socket read. A small frame is copied out once, into the connection's
//! current [`FrameArena`] chunk, and decoded from its copy, which a put's
//! key and value then share; a large one is decoded from the buffer, its
//! fields copied out.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;

use futures::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use metastore_proto::shardpb::{
    shard_error::Code, shard_request, shard_response::Body, ShardRequest, ShardResponse,
    WatchEventsResponse,
};
use prost::Message;

use crate::chunks::Chunks;
use crate::shard::{error, Reply, Shard, SubscriptionHandle};
use crate::signal::Signal;

/// Frames larger than this are refused (the gateway limits requests to a
/// few MiB; this only guards against garbage).
pub const MAX_FRAME: usize = 64 << 20;

/// Size of a connection's read buffer.
const READ_BUFFER: usize = 64 << 10;

/// Largest write buffer a connection keeps between batches.
const KEEP_OUT_BUFFER: usize = 1 << 20;

/// Accepts connections for `shard` until the process ends.
pub async fn serve(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let _ = connection(shard, stream).await;
                })
                .detach();
            }
            Err(e) => {
                eprintln!("shard {}: accept failed: {e}", shard.id());
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn read_frame<R: futures::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Frames up to this size are decoded from a shared copy (see
/// [`FrameArena`]); larger ones have their fields copied out.
const SHARED_FRAME: usize = 4 << 10;

/// Where a connection copies its small frames before decoding them:
/// [`Chunks`] of [`SHARED_FRAME`] bytes, from which consecutive frames are
/// cut. A put's key and value become slices of the
/// chunk, so decoding a frame allocates nothing for them (a frame of its
/// own was two allocations: the copy, then the count its first slice
/// needs), and cloning them later (into the raft entry's encoding, the
/// MVCC event) only counts references.
///
/// A chunk lives as long as any slice of it: the watch ring holds a put's
/// event, and so its chunk, for a while. That is why only small frames go
/// here, and why a chunk is no larger than one: each event pins at most
/// one chunk of [`SHARED_FRAME`] bytes, the same bound as a small frame
/// copied on its own. A larger frame could pin far more than its key and
/// value (say, a txn's compare values), and its fields are copied out
/// instead.
struct FrameArena {
    chunks: Chunks,
}

impl Default for FrameArena {
    fn default() -> FrameArena {
        FrameArena {
            chunks: Chunks::new(SHARED_FRAME),
        }
    }
}

impl FrameArena {
    /// Decodes one request frame.
    fn decode_request(&mut self, frame: &[u8]) -> Result<ShardRequest, prost::DecodeError> {
        if frame.len() > SHARED_FRAME {
            return ShardRequest::decode(frame);
        }
        ShardRequest::decode(self.chunks.copy(frame))
    }
}

fn frame(msg: &impl Message) -> Vec<u8> {
    let mut buf = Vec::new();
    push_frame(&mut buf, msg);
    buf
}

fn push_frame(buf: &mut Vec<u8>, msg: &impl Message) {
    let len = msg.encoded_len();
    buf.reserve(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    // `encode` would measure the message a second time to check for room;
    // the reservation above already made it.
    msg.encode_raw(buf);
}

/// A connection's responses waiting for its writer: frames are encoded
/// straight into one buffer, which the writer sends whole. Whoever may
/// still answer on the connection (the reader, a request's task, a
/// proposal, a subscription) holds an [`OutboxSender`]; the writer ends
/// once the buffer is empty and no sender is left, or the socket fails.
#[derive(Default)]
pub struct Outbox {
    buf: RefCell<Vec<u8>>,
    ready: Signal,
    /// The socket failed: nothing more will be sent.
    closed: Cell<bool>,
}

/// A handle to answer on a connection (see [`Outbox`]).
pub struct OutboxSender(Rc<Outbox>);

impl OutboxSender {
    /// Queues `resp` for the connection's writer; false once the
    /// connection is gone.
    pub fn send(&self, resp: &ShardResponse) -> bool {
        if self.0.closed.get() {
            return false;
        }
        push_frame(&mut self.0.buf.borrow_mut(), resp);
        self.0.ready.notify();
        true
    }
}

impl Clone for OutboxSender {
    fn clone(&self) -> Self {
        OutboxSender(self.0.clone())
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        // The writer may be waiting for the last sender to go.
        self.0.ready.notify();
    }
}

impl Outbox {
    /// Sends queued frames until no sender is left (or the socket fails).
    async fn write_all_to(self: Rc<Self>, mut writer: impl futures::io::AsyncWrite + Unpin) {
        let mut out = Vec::new();
        loop {
            std::mem::swap(&mut out, &mut self.buf.borrow_mut());
            if out.is_empty() {
                // Only this writer's own reference is left: all answered.
                if Rc::strong_count(&self) == 1 {
                    return;
                }
                self.ready.wait().await;
                continue;
            }
            if writer.write_all(&out).await.is_err() {
                self.closed.set(true);
                return;
            }
            // Keep a buffer for the next batch, unless a large answer (a
            // big range) grew it: that memory goes back.
            if out.capacity() > KEEP_OUT_BUFFER {
                out = Vec::new();
            } else {
                out.clear();
            }
        }
    }
}

async fn connection(shard: Rc<Shard>, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.split();
    // Frames are small and arrive in bursts: read them from a buffer, one
    // socket read for many frames, not two reads per frame.
    let mut reader = futures::io::BufReader::with_capacity(READ_BUFFER, reader);
    let mut arena = FrameArena::default();
    let outbox = Rc::new(Outbox::default());
    let tx = OutboxSender(outbox.clone());
    let writer_task = glommio::spawn_local(outbox.write_all_to(writer));
    let subs: Rc<RefCell<HashMap<u64, Rc<SubscriptionHandle>>>> = Default::default();
    loop {
        // A frame wholly in the read buffer is decoded from there; one
        // that straddles the buffer's end is read out (and copied) first.
        let decoded = match whole_frame(reader.buffer()) {
            Ok(Some(len)) => {
                let decoded = arena.decode_request(&reader.buffer()[4..4 + len]);
                Pin::new(&mut reader).consume(4 + len);
                decoded
            }
            Ok(None) if reader.buffer().is_empty() => match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(_) => continue,
            },
            Ok(None) => match read_frame(&mut reader).await {
                Ok(bytes) => arena.decode_request(&bytes),
                Err(_) => break,
            },
            Err(_) => break,
        };
        let req = match decoded {
            Ok(req) => req,
            Err(e) => {
                let message = format!("undecodable request: {e}");
                tx.send(&ShardResponse {
                    id: 0,
                    body: Some(error(Code::InvalidArgument, message)),
                });
                continue;
            }
        };
        let handle_of = |id: u64| subs.borrow().get(&id).cloned();
        let body = match req.body {
            None => {
                tx.send(&ShardResponse {
                    id: req.id,
                    body: Some(error(Code::InvalidArgument, "empty request")),
                });
                continue;
            }
            Some(body) => body,
        };
        match body {
            // Watch control messages are per connection and answered by the
            // subscription's stream, not by a response.
            shard_request::Body::WatchAck(a) => {
                if let Some(h) = handle_of(a.subscription_id) {
                    h.acked.set(h.acked.get().max(a.seq));
                    h.wake();
                }
            }
            shard_request::Body::WatchProgress(p) => {
                if let Some(h) = handle_of(p.subscription_id) {
                    h.progress.set(Some(
                        h.progress.get().map_or(p.revision, |r| r.max(p.revision)),
                    ));
                    h.wake();
                }
            }
            shard_request::Body::WatchCancel(c) => {
                if let Some(h) = subs.borrow_mut().remove(&c.subscription_id) {
                    h.cancelled.set(true);
                    h.wake();
                }
            }
            shard_request::Body::WatchSubscribe(w) => {
                let handle = Rc::new(SubscriptionHandle::default());
                subs.borrow_mut().insert(req.id, handle.clone());
                let (id, tx, shard, subs) = (req.id, tx.clone(), shard.clone(), subs.clone());
                glommio::spawn_local(async move {
                    let send = |f: WatchEventsResponse| {
                        tx.send(&ShardResponse {
                            id,
                            body: Some(Body::WatchEvents(f)),
                        })
                    };
                    shard.run_subscription(w, handle, &send).await;
                    subs.borrow_mut().remove(&id);
                })
                .detach();
            }
            // Single-shard writes need no task: the proposal answers on
            // this connection once applied.
            body @ (shard_request::Body::Put(_)
            | shard_request::Body::DeleteRange(_)
            | shard_request::Body::Txn(_)) => {
                shard.submit_write(body, Reply::Frame(req.id, tx.clone()));
            }
            body => {
                let (id, tx, shard) = (req.id, tx.clone(), shard.clone());
                glommio::spawn_local(async move {
                    let body = shard.handle(body).await;
                    tx.send(&ShardResponse {
                        id,
                        body: Some(body),
                    });
                })
                .detach();
            }
        }
    }
    for (_, h) in subs.borrow_mut().drain() {
        h.cancelled.set(true);
        h.wake();
    }
    drop(tx);
    writer_task.await;
    Ok(())
}

/// The length of the frame at the start of `buf` if all of it is there.
fn whole_frame(buf: &[u8]) -> std::io::Result<Option<usize>> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    Ok((buf.len() >= 4 + len).then_some(len))
}

/// How long a call to another shard may take. Past it the call fails
/// with its outcome unknown, as when the connection is lost: a lease
/// revoke then aborts and tries again, a stale intent asks again later.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One request to another shard over a fresh connection (used rarely: a
/// participant asking a primary about a stale transaction, a home shard
/// revoking leases), failing after [`CALL_TIMEOUT`].
pub async fn call(addr: &str, req: &ShardRequest) -> std::io::Result<ShardResponse> {
    call_within(addr, req, CALL_TIMEOUT).await
}

async fn call_within(
    addr: &str,
    req: &ShardRequest,
    limit: std::time::Duration,
) -> std::io::Result<ShardResponse> {
    let call = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&frame(req)).await?;
        let bytes = read_frame(&mut stream).await?;
        ShardResponse::decode(bytes.as_slice())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    let sleep = glommio::timer::sleep(limit);
    match futures::future::select(std::pin::pin!(call), std::pin::pin!(sleep)).await {
        futures::future::Either::Left((answer, _)) => answer,
        futures::future::Either::Right(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from {addr} in {limit:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::PutRequest;

    /// A peer that takes the call and never answers fails it in time.
    #[test]
    fn a_call_nobody_answers_times_out() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap().to_string();
                // Takes the connection and holds it open, silent.
                let held = glommio::spawn_local(async move {
                    let conn = listener.accept().await;
                    glommio::timer::sleep(std::time::Duration::from_secs(60)).await;
                    drop(conn);
                });
                let req = ShardRequest {
                    id: 1,
                    body: Some(shard_request::Body::Put(PutRequest::default())),
                };
                let limit = std::time::Duration::from_millis(50);
                let err = call_within(&addr, &req, limit).await.unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
                drop(held);
            });
    }

    fn put_frame(key: &[u8], value_len: usize) -> (Vec<u8>, PutRequest) {
        let put = PutRequest {
            key: key.to_vec().into(),
            value: vec![7u8; value_len].into(),
            ..Default::default()
        };
        let req = ShardRequest {
            id: 9,
            body: Some(shard_request::Body::Put(put.clone())),
        };
        (req.encode_to_vec(), put)
    }

    fn decoded_put(arena: &mut FrameArena, frame: &[u8]) -> PutRequest {
        match arena.decode_request(frame).unwrap().body {
            Some(shard_request::Body::Put(p)) => p,
            other => panic!("not a put: {other:?}"),
        }
    }

    /// How far a put's value starts from its key: in memory, and in the
    /// frame it was decoded from.
    fn value_after_key(frame: &[u8], put: &PutRequest) -> (isize, isize) {
        let at = |b: &[u8]| frame.windows(b.len()).position(|w| w == b).unwrap() as isize;
        (
            put.value.as_ptr() as isize - put.key.as_ptr() as isize,
            at(&put.value) - at(&put.key),
        )
    }

    #[test]
    fn small_frames_are_shared_by_their_fields_and_large_ones_are_not() {
        let mut arena = FrameArena::default();
        // Small: key and value are slices of one copy of the frame, as far
        // apart as in the frame itself.
        let (frame, put) = put_frame(b"key", 100);
        let got = decoded_put(&mut arena, &frame);
        assert_eq!(got, put);
        let (in_memory, in_frame) = value_after_key(&frame, &got);
        assert_eq!(in_memory, in_frame);
        // Large: the same request, its fields copied out one by one: two
        // allocations, which cannot lie the frame's few bytes apart.
        let (frame, put) = put_frame(b"key", SHARED_FRAME);
        assert!(frame.len() > SHARED_FRAME);
        let got = decoded_put(&mut arena, &frame);
        assert_eq!(got, put);
        let (in_memory, in_frame) = value_after_key(&frame, &got);
        assert_ne!(in_memory, in_frame);
        // Undecodable input is an error either way.
        assert!(arena.decode_request(&[0xff; 8]).is_err());
        assert!(arena.decode_request(&vec![0xff; SHARED_FRAME + 8]).is_err());
    }

    /// Consecutive small frames are cut from one chunk, back to back, until
    /// the next no longer fits; then a new chunk starts. No chunk is larger
    /// than a shared frame, so a slice pins at most that much.
    #[test]
    fn small_frames_share_chunks_of_a_shared_frame_at_most() {
        let mut arena = FrameArena::default();
        let (frame, put) = put_frame(b"k", 1000);
        let puts: Vec<PutRequest> = (0..8).map(|_| decoded_put(&mut arena, &frame)).collect();
        assert!(puts.iter().all(|p| *p == put));
        let per_chunk = SHARED_FRAME / frame.len();
        assert!((2..8).contains(&per_chunk));
        let gap =
            |a: &PutRequest, b: &PutRequest| b.key.as_ptr() as isize - a.key.as_ptr() as isize;
        for (i, pair) in puts.windows(2).enumerate() {
            let same_chunk = (i + 1) % per_chunk != 0;
            assert_eq!(
                gap(&pair[0], &pair[1]) == frame.len() as isize,
                same_chunk,
                "frames {i} and {}",
                i + 1
            );
        }
    }
}
