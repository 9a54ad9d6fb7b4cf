//! The shard's TCP front: frames in, `Shard::handle`, frames out.
//!
//! Framing (see proto/protos/shardpb/shard.proto): a 4-byte little-endian
//! length, then one prost-encoded `ShardRequest`/`ShardResponse`. Each
//! request runs as its own task on the shard's executor, so one connection
//! carries many requests at once and a slow one (a read waiting for the
//! watermark) never holds up the others; responses go back through one
//! writer task that coalesces whatever is ready into one socket write.
//! Frames are read through a buffer, so a burst of requests costs one
//! socket read, not two per frame.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use futures::channel::mpsc;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use futures::StreamExt;
use glommio::net::{TcpListener, TcpStream};
use metastore_proto::shardpb::{
    shard_error::Code, shard_request, shard_response::Body, ShardError, ShardRequest,
    ShardResponse, WatchEventsResponse,
};
use prost::Message;

use crate::shard::{Shard, SubscriptionHandle};

/// Frames larger than this are refused (the gateway limits requests to a
/// few MiB; this only guards against garbage).
pub const MAX_FRAME: usize = 64 << 20;

/// Size of a connection's read buffer.
const READ_BUFFER: usize = 64 << 10;

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

fn frame(msg: &impl Message) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(&mut buf).expect("vec has room");
    buf
}

async fn connection(shard: Rc<Shard>, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, mut writer) = stream.split();
    // Frames are small and arrive in bursts: read them from a buffer, one
    // socket read for many frames, not two reads per frame.
    let mut reader = futures::io::BufReader::with_capacity(READ_BUFFER, reader);
    let (tx, mut rx) = mpsc::unbounded::<Vec<u8>>();
    let writer_task = glommio::spawn_local(async move {
        while let Some(first) = rx.next().await {
            let mut buf = first;
            while let Ok(more) = rx.try_recv() {
                buf.extend_from_slice(&more);
            }
            if writer.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let subs: Rc<RefCell<HashMap<u64, Rc<SubscriptionHandle>>>> = Default::default();
    loop {
        let bytes = match read_frame(&mut reader).await {
            Ok(b) => b,
            Err(_) => break,
        };
        let decoded = ShardRequest::decode(bytes.as_slice());
        // Watch control messages are per connection and answered by the
        // subscription's stream, not by a response.
        if let Ok(req) = &decoded {
            let handle_of = |id: u64| subs.borrow().get(&id).cloned();
            match &req.body {
                Some(shard_request::Body::WatchAck(a)) => {
                    if let Some(h) = handle_of(a.subscription_id) {
                        h.acked.set(h.acked.get().max(a.seq));
                        h.wake();
                    }
                    continue;
                }
                Some(shard_request::Body::WatchProgress(p)) => {
                    if let Some(h) = handle_of(p.subscription_id) {
                        h.progress.set(Some(
                            h.progress.get().map_or(p.revision, |r| r.max(p.revision)),
                        ));
                        h.wake();
                    }
                    continue;
                }
                Some(shard_request::Body::WatchCancel(c)) => {
                    if let Some(h) = subs.borrow_mut().remove(&c.subscription_id) {
                        h.cancelled.set(true);
                        h.wake();
                    }
                    continue;
                }
                Some(shard_request::Body::WatchSubscribe(w)) => {
                    let handle = Rc::new(SubscriptionHandle::default());
                    subs.borrow_mut().insert(req.id, handle.clone());
                    let (id, w, tx, shard, subs) =
                        (req.id, w.clone(), tx.clone(), shard.clone(), subs.clone());
                    glommio::spawn_local(async move {
                        let send = |f: WatchEventsResponse| {
                            tx.unbounded_send(frame(&ShardResponse {
                                id,
                                body: Some(Body::WatchEvents(f)),
                            }))
                            .is_ok()
                        };
                        shard.run_subscription(w, handle, &send).await;
                        subs.borrow_mut().remove(&id);
                    })
                    .detach();
                    continue;
                }
                _ => {}
            }
        }
        let tx = tx.clone();
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let resp = match decoded {
                Ok(req) => {
                    let body = match req.body {
                        Some(body) => shard.handle(body).await,
                        None => Body::Error(ShardError {
                            code: Code::InvalidArgument as i32,
                            message: "empty request".into(),
                        }),
                    };
                    ShardResponse {
                        id: req.id,
                        body: Some(body),
                    }
                }
                Err(e) => ShardResponse {
                    id: 0,
                    body: Some(Body::Error(ShardError {
                        code: Code::InvalidArgument as i32,
                        message: format!("undecodable request: {e}"),
                    })),
                },
            };
            let _ = tx.unbounded_send(frame(&resp));
        })
        .detach();
    }
    for (_, h) in subs.borrow_mut().drain() {
        h.cancelled.set(true);
        h.wake();
    }
    drop(tx);
    writer_task.await;
    Ok(())
}

/// One request to another shard over a fresh connection (used rarely: a
/// participant asking a primary about a stale transaction).
pub async fn call(addr: &str, req: &ShardRequest) -> std::io::Result<ShardResponse> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&frame(req)).await?;
    let bytes = read_frame(&mut stream).await?;
    ShardResponse::decode(bytes.as_slice())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
