//! The shard server's front, spoken to directly: framing, pipelining and
//! refusals on one connection.
//!
//! The gateway only ever sends well-formed, well-routed frames, so these
//! tests play a client of the shard protocol that does not: a misrouted
//! write, an undecodable frame, a frame with no body. Each gets its error
//! and the connection keeps serving. They also pipeline many writes in one
//! socket write, with frames that straddle the server's 64 KiB read buffer
//! and one larger than it, and check every one is answered, under its own
//! id, and applied; and that a write is answered only after the watch
//! events it caused were sent.

#[macro_use]
mod common;

use std::collections::HashMap;

use metastore_proto::etcdserverpb::{DeleteRangeRequest, PutRequest};
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    shard_error::Code, shard_request, shard_response, ShardRequest, ShardResponse,
    WatchSubscribeRequest,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn frame(req: &ShardRequest) -> Vec<u8> {
    let body = req.encode_to_vec();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

async fn read_response(s: &mut TcpStream) -> ShardResponse {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.expect("response length");
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).await.expect("response body");
    ShardResponse::decode(buf.as_slice()).expect("decodable response")
}

/// `n` keys that shard `shard` owns (of the test node's shards).
fn keys_of(shard: u32, n: usize) -> Vec<Vec<u8>> {
    let router = ShardRouter::new(common::SHARDS as u32);
    (0..)
        .map(|i| format!("/proto/{i}").into_bytes())
        .filter(|k| router.shard_of(k) == shard)
        .take(n)
        .collect()
}

fn put(id: u64, key: &[u8], value: Vec<u8>) -> ShardRequest {
    ShardRequest {
        id,
        body: Some(shard_request::Body::Put(PutRequest {
            key: key.to_vec().into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

fn error_of(resp: &ShardResponse) -> (i32, &str) {
    match &resp.body {
        Some(shard_response::Body::Error(e)) => (e.code, e.message.as_str()),
        other => panic!("expected an error, got {other:?}"),
    }
}

both_engines!(
    async fn refusals_are_answered_and_the_connection_keeps_serving(node: TestNode) {
        let addr = &node.server_addrs()[0];
        let mut s = TcpStream::connect(addr).await.expect("connect to shard 0");
        let foreign = &keys_of(1, 1)[0];
        let own = &keys_of(0, 1)[0];

        // A write to a key another shard owns.
        s.write_all(&frame(&put(1, foreign, b"v".to_vec())))
            .await
            .unwrap();
        let resp = read_response(&mut s).await;
        assert_eq!(resp.id, 1);
        assert_eq!(
            error_of(&resp),
            (Code::InvalidArgument as i32, "key belongs to another shard")
        );

        // A delete spanning shards.
        let delete = ShardRequest {
            id: 2,
            body: Some(shard_request::Body::DeleteRange(DeleteRangeRequest {
                key: own.clone(),
                range_end: vec![0],
                ..Default::default()
            })),
        };
        s.write_all(&frame(&delete)).await.unwrap();
        let resp = read_response(&mut s).await;
        assert_eq!(resp.id, 2);
        assert_eq!(
            error_of(&resp),
            (Code::InvalidArgument as i32, "delete spans other shards")
        );

        // A frame that is not a request (a truncated varint), then one
        // without a body: each is answered, in order.
        let mut garbage = 1u32.to_le_bytes().to_vec();
        garbage.push(0x80);
        s.write_all(&garbage).await.unwrap();
        let resp = read_response(&mut s).await;
        assert_eq!(resp.id, 0, "an undecodable request has no id");
        let (code, message) = error_of(&resp);
        assert_eq!(code, Code::InvalidArgument as i32);
        assert!(message.starts_with("undecodable request"), "{message}");
        s.write_all(&frame(&ShardRequest { id: 3, body: None }))
            .await
            .unwrap();
        let resp = read_response(&mut s).await;
        assert_eq!(resp.id, 3);
        assert_eq!(
            error_of(&resp),
            (Code::InvalidArgument as i32, "empty request")
        );

        // The same connection still writes.
        s.write_all(&frame(&put(4, own, b"v".to_vec())))
            .await
            .unwrap();
        let resp = read_response(&mut s).await;
        assert_eq!(resp.id, 4);
        assert!(
            matches!(resp.body, Some(shard_response::Body::Put(_))),
            "{resp:?}"
        );
        let mut client = node.client().await;
        let got = client.get(own.clone(), None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v");
    }
);

both_engines!(
    async fn pipelined_writes_straddling_the_read_buffer_are_all_answered(node: TestNode) {
        let addr = &node.server_addrs()[0];
        let mut s = TcpStream::connect(addr).await.expect("connect to shard 0");
        // 300 frames of about 1 KiB (about five read buffers' worth, so
        // several straddle a buffer's end), one of 200 KiB in the middle
        // (bigger than the buffer), in one socket write.
        let keys = keys_of(0, 301);
        let mut values = HashMap::new();
        let mut burst = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let len = if i == 150 { 200 << 10 } else { 1000 + i };
            let value = vec![b'a' + (i % 26) as u8; len];
            burst.extend_from_slice(&frame(&put(1000 + i as u64, key, value.clone())));
            values.insert(key.clone(), value);
        }
        s.write_all(&burst).await.unwrap();

        let mut revisions = HashMap::new();
        for _ in 0..keys.len() {
            let resp = read_response(&mut s).await;
            let Some(shard_response::Body::Put(p)) = &resp.body else {
                panic!("expected a put response, got {resp:?}");
            };
            let rev = p.header.as_ref().expect("header").revision;
            assert!(
                revisions.insert(resp.id, rev).is_none(),
                "id {} answered twice",
                resp.id
            );
        }
        let mut ids: Vec<_> = revisions.keys().copied().collect();
        ids.sort();
        assert_eq!(ids, (1000..1000 + keys.len() as u64).collect::<Vec<_>>());

        let mut client = node.client().await;
        for (i, key) in keys.iter().enumerate() {
            let got = client.get(key.clone(), None).await.unwrap();
            let kv = &got.kvs()[0];
            assert_eq!(kv.value(), values[key].as_slice(), "key {i}");
            assert_eq!(kv.mod_revision(), revisions[&(1000 + i as u64)], "key {i}");
        }
    }
);

both_engines!(
    async fn a_write_is_answered_after_its_watch_events(node: TestNode) {
        // On one connection (as the gateway uses it): a subscription to a
        // key, then puts to it, one at a time. The frame carrying each
        // put's event must come before the put's answer, so a watcher
        // behind the gateway sees the event no later than the writer
        // sees its acknowledgement.
        let addr = &node.server_addrs()[0];
        let mut s = TcpStream::connect(addr).await.expect("connect to shard 0");
        let key = keys_of(0, 1).remove(0);
        let subscribe = ShardRequest {
            id: 1,
            body: Some(shard_request::Body::WatchSubscribe(WatchSubscribeRequest {
                key: key.clone(),
                window: 1000,
                ..Default::default()
            })),
        };
        s.write_all(&frame(&subscribe)).await.unwrap();
        for i in 0..20u64 {
            let id = 100 + i;
            s.write_all(&frame(&put(id, &key, vec![b'v'; 10])))
                .await
                .unwrap();
            let mut event_revision = None;
            let answered_revision = loop {
                let resp = read_response(&mut s).await;
                match resp.body {
                    Some(shard_response::Body::WatchEvents(w)) => {
                        assert_eq!(resp.id, 1);
                        for e in &w.events {
                            let kv = e.kv.as_ref().expect("kv");
                            assert_eq!(kv.key.as_ref(), key.as_slice());
                            event_revision = Some(kv.mod_revision);
                        }
                    }
                    Some(shard_response::Body::Put(p)) => {
                        assert_eq!(resp.id, id);
                        break p.header.expect("header").revision;
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            };
            assert_eq!(
                event_revision,
                Some(answered_revision),
                "put {i}: its event came before its answer"
            );
        }
    }
);
