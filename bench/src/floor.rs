//! `grpc-floor`: an etcd KV endpoint that does nothing behind gRPC, to
//! measure what the gRPC layer alone costs on this machine.
//!
//! Several targets (put at 1,000 clients, serializable range) bound
//! MetaStore's server CPU per operation at a fraction of etcd's. The
//! gateway speaks gRPC through tonic, hyper and h2, as the design card
//! requires, and on a small machine that layer alone can cost more than
//! such a budget. `compare` runs the workloads of those targets against
//! this server too, in the same rounds as etcd and MetaStore, so the report
//! shows how close to each target a server can get that pays only for
//! gRPC.
//!
//! What it shares with the gateway, so that the difference between the two
//! is MetaStore's own work:
//! - the gateway's KV service path: unary calls answered by
//!   `metastore_gateway::unary::UnaryKv`, anything unusual by the
//!   generated KV service with the gateway's codec;
//! - the gateway's gRPC server (`metastore_gateway::grpc::serve`: hyper's
//!   HTTP/2 with `TCP_NODELAY`, each call routed by its path to the
//!   generated service), on the gateway's default runtime
//!   (`metastore_gateway::runtime(default_threads())`: half the cores, at
//!   least one; single-threaded on 2 cores).
//!
//! What it does behind gRPC: Put stores the value in a hash map and Range
//! of one key returns it, so workloads that check what they read still
//! pass; no revisions, no durability, no shards. Anything else (prefix
//! ranges, DeleteRange, Txn, Compact, the other services) is refused with
//! `Unimplemented`: only the floor's own workloads run against it.
//!
//! It is a separate process (`metastore-bench grpc-floor`), started by
//! `compare` like a server under test, so its CPU is measured the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Mutex;

use bytes::Bytes;
use clap::Args;
use metastore_gateway::etcdserverpb::kv_server::Kv;
use metastore_gateway::grpc;
use metastore_gateway::unary::UnaryKv;
use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::KeyValue;
use tonic::{Request, Response, Status};

/// The largest request message the floor decodes: tonic's default.
const FLOOR_DECODING_LIMIT: usize = 4 * 1024 * 1024;

/// The line printed once the floor serves (the address follows it).
pub const READY: &str = "metastore-bench grpc-floor ready on ";

#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// Address to serve on (port 0: any free port; the ready line names it).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// The values put so far, by key; a put's revision counts puts.
#[derive(Default)]
struct FloorKv {
    state: Mutex<(HashMap<Bytes, Bytes>, i64)>,
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 1,
    })
}

fn refused(what: &str) -> Status {
    Status::unimplemented(format!(
        "grpc-floor answers only Put and single-key Range, not {what}"
    ))
}

#[tonic::async_trait]
impl Kv for FloorKv {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let req = request.into_inner();
        if !req.range_end.is_empty() {
            return Err(refused("a range of keys"));
        }
        let (map, rev) = &*self.state.lock().unwrap();
        let kvs: Vec<KeyValue> = map
            .get(req.key.as_slice())
            .map(|v| KeyValue {
                key: Bytes::from(req.key),
                value: v.clone(),
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                lease: 0,
            })
            .into_iter()
            .collect();
        Ok(Response::new(RangeResponse {
            header: header(*rev),
            count: kvs.len() as i64,
            kvs,
            more: false,
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = request.into_inner();
        let mut state = self.state.lock().unwrap();
        // Copies: the decoded fields are slices of the call's buffer, which
        // a long-lived map must not keep alive.
        state.0.insert(
            Bytes::copy_from_slice(&req.key),
            Bytes::copy_from_slice(&req.value),
        );
        state.1 += 1;
        Ok(Response::new(PutResponse {
            header: header(state.1),
            prev_kv: None,
        }))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(refused("DeleteRange"))
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(refused("Txn"))
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(refused("Compact"))
    }
}

/// Serves until killed (`compare` stops it with SIGTERM, whose default
/// action ends the process).
pub fn main(a: &FloorArgs) -> ExitCode {
    let rt = match metastore_gateway::runtime(metastore_gateway::default_threads()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metastore-bench grpc-floor: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(a.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "metastore-bench grpc-floor: cannot listen on {}: {e}",
                    a.listen
                );
                return ExitCode::FAILURE;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        println!("{READY}{addr}");
        grpc::serve(
            listener,
            UnaryKv::new(FloorKv::default(), FLOOR_DECODING_LIMIT),
            std::future::pending(),
        )
        .await;
        ExitCode::SUCCESS
    })
}
