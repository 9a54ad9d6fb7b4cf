//! The coordinator of a cross-shard transaction dies mid-protocol.
//!
//! These tests play a coordinator that stops talking: they send the shard
//! protocol's Prepare (and maybe the primary's Commit) straight to the
//! shards' ports, then go silent. The shards must settle the transaction
//! by themselves (see docs/ARCHITECTURE.md, "Cross-shard writes"): the
//! primary aborts what it never decided; a participant asks the primary
//! and follows its decision. Meanwhile clients going through the gateway
//! see either all of the transaction or none of it — never half.
//!
//! Each test waits through the shards' intent timeout (5 s), by awaiting
//! client operations that cannot finish earlier.

#[macro_use]
mod common;

use common::TestNode;
use etcd_client::GetOptions;
use metastore_proto::etcdserverpb::{request_op, PutRequest, RequestOp, TxnRequest};
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    shard_request, shard_response, CommitRequest, CommitResponse, PrepareRequest, ShardRequest,
    ShardResponse,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request over a fresh connection to a shard.
async fn call(addr: &str, body: shard_request::Body) -> shard_response::Body {
    let mut s = TcpStream::connect(addr).await.expect("connect to shard");
    let req = ShardRequest {
        id: 7,
        body: Some(body),
    };
    let bytes = req.encode_to_vec();
    s.write_all(&(bytes.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    let resp = ShardResponse::decode(buf.as_slice()).unwrap();
    assert_eq!(resp.id, 7);
    resp.body.expect("a response body")
}

/// A key under `prefix` owned by `shard` (of 2).
fn key_on(shard: u32, prefix: &str) -> String {
    let router = ShardRouter::new(2);
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| router.shard_of(k.as_bytes()) == shard)
        .unwrap()
}

fn put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

/// Prepares `{put a, put b}` (a on shard 0, the primary; b on shard 1).
async fn prepare_both(node: &TestNode, id: &[u8], a: &str, b: &str) {
    let txn = TxnRequest {
        compare: vec![],
        success: vec![put(a, "from-txn"), put(b, "from-txn")],
        failure: vec![],
    };
    for addr in node.server_addrs() {
        let body = call(
            addr,
            shard_request::Body::Prepare(PrepareRequest {
                txn_id: id.to_vec(),
                primary: 0,
                participants: vec![0, 1],
                txn: Some(txn.clone()),
                revoke_leases: vec![],
                floor: 0,
                revoke_grants: vec![],
            }),
        )
        .await;
        assert!(
            matches!(body, shard_response::Body::Prepare(_)),
            "prepare at {addr}: {body:?}"
        );
    }
}

/// Commits the txn `id` at its primary, shard 0 (which picks the revision).
async fn commit_primary(node: &TestNode, id: &[u8]) -> CommitResponse {
    let body = call(
        &node.server_addrs()[0],
        shard_request::Body::Commit(CommitRequest {
            txn_id: id.to_vec(),
            path: vec![true],
            revision: 0,
        }),
    )
    .await;
    let shard_response::Body::Commit(commit) = body else {
        panic!("primary commit: {body:?}")
    };
    commit
}

both_engines!(
    async fn coordinator_dies_after_prepare_so_the_txn_aborts(node: TestNode) {
        let (a, b) = (key_on(0, "rec/a"), key_on(1, "rec/b"));
        prepare_both(&node, b"dies-after-prepare", &a, &b).await;
        // The keys are locked; a client's put waits (the gateway retries)
        // until the shards have aborted the silent transaction.
        let mut c = node.client().await;
        c.put(b.as_str(), "from-client", None)
            .await
            .expect("put after the abort");
        let got = c
            .get("rec/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let values: Vec<(&str, &str)> = got
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap(), kv.value_str().unwrap()))
            .collect();
        assert_eq!(
            values,
            vec![(b.as_str(), "from-client")],
            "aborted: none of it"
        );
    }
);

both_engines!(
    async fn coordinator_dies_after_the_primary_commits_so_the_txn_completes(node: TestNode) {
        let (a, b) = (key_on(0, "rec/a"), key_on(1, "rec/b"));
        let id = b"dies-after-primary";
        prepare_both(&node, id, &a, &b).await;
        let commit = commit_primary(&node, id).await;
        // A read at or after the commit revision waits for shard 1, which
        // learns the decision from the primary by itself.
        let mut c = node.client().await;
        let got = c
            .get("rec/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("read after the participant resolved");
        assert!(got.header().unwrap().revision() >= commit.revision);
        let kvs: Vec<(&str, &str, i64)> = got
            .kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap(),
                    kv.value_str().unwrap(),
                    kv.mod_revision(),
                )
            })
            .collect();
        let mut want = vec![
            (a.as_str(), "from-txn", commit.revision),
            (b.as_str(), "from-txn", commit.revision),
        ];
        want.sort();
        assert_eq!(kvs, want, "committed: all of it, at one revision");
    }
);

both_engines!(
    /// The server dies after the primary committed and before the
    /// participant heard of it. After the restart the participant's intent
    /// still holds reads back (its floor, from the prepare's raft entry, is
    /// below the commit revision): a read at once sees all of the txn on
    /// rocksdb (none of it on memory, which keeps nothing), and a watch
    /// from the commit revision sees both events.
    async fn a_restart_after_the_primary_committed_shows_all_of_the_txn(mut node: TestNode) {
        let (a, b) = (key_on(0, "rec/a"), key_on(1, "rec/b"));
        let id = b"server-dies-after-primary";
        prepare_both(&node, id, &a, &b).await;
        let commit = commit_primary(&node, id).await;
        node.crash_restart().await;
        let mut c = node.client().await;
        let got = c
            .get("rec/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("read after the restart");
        let kvs: Vec<(&str, i64)> = got
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap(), kv.mod_revision()))
            .collect();
        if node.engine() == common::Engine::Memory {
            assert_eq!(kvs, vec![], "memory: nothing survives a restart");
            return;
        }
        let mut want = vec![(a.as_str(), commit.revision), (b.as_str(), commit.revision)];
        want.sort();
        assert_eq!(kvs, want, "committed: all of it, at one revision");
        let mut w = c
            .watch(
                "rec/",
                Some(
                    etcd_client::WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(commit.revision),
                ),
            )
            .await
            .expect("watch");
        let mut keys = Vec::new();
        while keys.len() < 2 {
            let r = w.message().await.expect("watch").expect("watch response");
            for e in r.events() {
                let kv = e.kv().unwrap();
                assert_eq!(kv.mod_revision(), commit.revision);
                keys.push(kv.key_str().unwrap().to_string());
            }
        }
        keys.sort();
        assert_eq!(keys, vec![a.clone(), b.clone()]);
    }
);
