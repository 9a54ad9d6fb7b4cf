//! Wiring: discover the shards, bind the listener, serve every etcd
//! service until shut down.
//!
//! Start-up order matters to test harnesses and orchestration:
//! 1. [`Gateway::start`] asks the server (`--server`, any shard) for the
//!    topology, retrying while it starts (up to [`Config::connect_wait`]);
//! 2. then binds `--listen` (port 0 picks a free port);
//! 3. the binary prints exactly one line, `metastore-gateway ready on
//!    <addr>` ([`ready_line`]), only once both have succeeded, so a client
//!    that waits for it finds a working API;
//! 4. [`Gateway::serve`] runs until the shutdown future resolves, then
//!    stops accepting and lets in-flight calls finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, Identity};
use crate::client::ClientConfig;
use crate::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::grpc::{self, EtcdApi};
use crate::service::{
    ClusterService, KvService, MaintenanceService, UnimplementedAuth, WatchService,
};
use crate::shards::{Shards, Topology, WatchTransport};
use crate::unary::UnaryKv;
use crate::watch::{WatchConfig, WatchHub};

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1572864;
/// gRPC framing allowance on top of the request limit, as etcd adds.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Everything the gateway is started with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to serve the etcd API on.
    pub listen: String,
    /// Any shard's address of the metastore-server.
    pub server: String,
    /// Client URL advertised by MemberList; `None` = `http://<bound addr>`.
    pub advertise_client_url: Option<String>,
    pub max_request_bytes: usize,
    /// How long to keep trying to reach the server at start-up.
    pub connect_wait: Duration,
    pub client: ClientConfig,
    /// Watch settings; `watch.max_response_bytes` follows
    /// `max_request_bytes` at start-up.
    pub watch: WatchConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:2379".into(),
            server: "127.0.0.1:23790".into(),
            advertise_client_url: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            connect_wait: Duration::from_secs(30),
            client: ClientConfig::default(),
            watch: WatchConfig::default(),
        }
    }
}

/// The line the binary prints once it serves.
pub fn ready_line(addr: SocketAddr) -> String {
    format!("metastore-gateway ready on {addr}")
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reach the metastore server at {server}: {source}")]
    Server {
        server: String,
        source: crate::error::GatewayError,
    },
    #[error("cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
}

/// A gateway that knows its shards and holds its listener.
pub struct Gateway {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    backend: Arc<Backend>,
    watch: Arc<WatchHub>,
    config: Config,
}

impl Gateway {
    /// Discovers the shards, then binds the listener.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let shards = Shards::discover(&config.server, config.client.clone(), config.connect_wait)
            .await
            .map_err(|source| StartError::Server {
                server: config.server.clone(),
                source,
            })?;
        let topology = shards.topology().clone();
        tracing::info!(
            shards = topology.shard_count,
            cluster_id = topology.cluster_id,
            member_id = topology.member_id,
            engine = %topology.engine,
            "discovered the server"
        );
        let router = shards.router();
        let shards = Arc::new(shards);
        let backend = Arc::new(Backend::new(shards.clone(), router, identity(&topology)));
        let mut watch_cfg = config.watch.clone();
        watch_cfg.max_response_bytes = config.max_request_bytes;
        let watch = WatchHub::new(
            backend.clone(),
            shards as Arc<dyn WatchTransport>,
            watch_cfg,
        );
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| StartError::Listen {
                listen: config.listen.clone(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            listen: config.listen.clone(),
            source,
        })?;
        Ok(Gateway {
            listener,
            local_addr,
            backend,
            watch,
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The client URL MemberList advertises.
    pub fn client_url(&self) -> String {
        self.config
            .advertise_client_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.local_addr))
    }

    /// Serves until `shutdown` resolves. Requests above `max_request_bytes`
    /// are refused by the services (`etcdserver: request is too large`);
    /// those above it plus etcd's gRPC overhead never reach them (see
    /// `grpc::oversized_as_resource_exhausted`).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let limit = self.config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let b = self.backend.clone();
        let client_url = self.client_url();
        let kv = UnaryKv::new(
            KvService::new(b.clone(), self.config.max_request_bytes),
            limit,
        );
        let maintenance = MaintenanceServer::new(MaintenanceService::new(b.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
        let cluster = ClusterServer::new(ClusterService::new(b.clone(), client_url))
            .max_decoding_message_size(limit);
        let watch = WatchServer::new(WatchService::new(self.watch.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
        let lease = LeaseServer::new(crate::lease::LeaseService::new(b.clone()))
            .max_decoding_message_size(limit);
        let auth = AuthServer::new(UnimplementedAuth).max_decoding_message_size(limit);
        let api = EtcdApi {
            kv,
            watch,
            lease,
            cluster,
            maintenance,
            auth,
        };
        grpc::serve(self.listener, api, shutdown).await;
    }
}

/// The gateway's default runtime threads: half the cores (the shard
/// server runs one shard per core beside it), at least one.
pub fn default_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1)
}

/// The gateway's tokio runtime with `threads` threads: tokio's
/// single-threaded runtime for one (see `main.rs` for why), the
/// multi-threaded one otherwise.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()
}

fn identity(t: &Topology) -> Identity {
    Identity {
        cluster_id: t.cluster_id,
        member_id: t.member_id,
        member_name: t.member_name.clone(),
        history_id: t.history_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::read_frame;
    use crate::etcdserverpb::{
        cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
        watch_client::WatchClient,
    };
    use metastore_proto::etcdserverpb as pb;
    use metastore_proto::mvccpb::KeyValue;
    use metastore_proto::shardpb::{
        shard_request::Body as Req, shard_response::Body as Resp, ShardRequest, ShardResponse,
    };
    use prost::Message;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use tokio::io::AsyncWriteExt;

    /// A one-shard fake metastore-server: an in-memory map, one revision
    /// counter, enough of the protocol for Put/Range/Status.
    async fn fake_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new((0i64, BTreeMap::<Vec<u8>, KeyValue>::new())));
        let my_addr = addr.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                let state = state.clone();
                let my_addr = my_addr.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = sock.into_split();
                    while let Ok(Some(f)) = read_frame(&mut r).await {
                        let req = ShardRequest::decode(f).unwrap();
                        let body = {
                            let mut st = state.lock().unwrap();
                            let hdr = |rev| {
                                Some(pb::ResponseHeader {
                                    revision: rev,
                                    raft_term: 1,
                                    ..Default::default()
                                })
                            };
                            match req.body.unwrap() {
                                Req::Topology(_) => {
                                    Resp::Topology(metastore_proto::shardpb::TopologyResponse {
                                        shard_count: 1,
                                        shard_id: 0,
                                        shard_addrs: vec![my_addr.clone()],
                                        cluster_id: 7,
                                        member_id: 9,
                                        engine: "memory".into(),
                                        member_name: "fake".into(),
                                        history_id: 0,
                                    })
                                }
                                Req::CurrentRevision(_) => Resp::CurrentRevision(
                                    metastore_proto::shardpb::CurrentRevisionResponse {
                                        revision: st.0,
                                        raft_term: 1,
                                        ..Default::default()
                                    },
                                ),
                                Req::Put(p) => {
                                    st.0 += 1;
                                    let rev = st.0;
                                    let prev = st.1.get(p.key.as_ref()).cloned();
                                    let kv = KeyValue {
                                        key: p.key.clone(),
                                        value: p.value,
                                        create_revision: prev
                                            .as_ref()
                                            .map_or(rev, |k| k.create_revision),
                                        mod_revision: rev,
                                        version: prev.as_ref().map_or(1, |k| k.version + 1),
                                        lease: 0,
                                    };
                                    st.1.insert(p.key.to_vec(), kv);
                                    Resp::Put(pb::PutResponse {
                                        header: hdr(rev),
                                        prev_kv: None,
                                    })
                                }
                                Req::Range(q) => {
                                    let kvs: Vec<KeyValue> = if q.range_end.is_empty() {
                                        st.1.get(&q.key).cloned().into_iter().collect()
                                    } else {
                                        st.1.range(q.key.clone()..q.range_end.clone())
                                            .map(|(_, v)| v.clone())
                                            .collect()
                                    };
                                    Resp::Range(pb::RangeResponse {
                                        header: hdr(st.0),
                                        count: kvs.len() as i64,
                                        kvs,
                                        more: false,
                                    })
                                }
                                Req::Status(_) => {
                                    Resp::Status(metastore_proto::shardpb::StatusResponse {
                                        raft_index: 3,
                                        raft_term: 1,
                                        raft_applied_index: 3,
                                        db_size: 4096,
                                        leader: 9,
                                        revision: st.0,
                                        compact_revision: 0,
                                    })
                                }
                                // A watch replays the history it has (the newest
                                // version of each key) and reports everything
                                // resolved.
                                Req::WatchSubscribe(sub) => {
                                    let events =
                                        st.1.values()
                                            .filter(|kv| {
                                                kv.mod_revision >= sub.start_revision
                                                    && (kv.key == sub.key
                                                        || (!sub.range_end.is_empty()
                                                            && kv.key >= sub.key
                                                            && kv.key < sub.range_end))
                                            })
                                            .map(|kv| metastore_proto::mvccpb::Event {
                                                r#type: 0,
                                                kv: Some(kv.clone()),
                                                prev_kv: None,
                                            })
                                            .collect();
                                    Resp::WatchEvents(
                                        metastore_proto::shardpb::WatchEventsResponse {
                                            seq: 1,
                                            events,
                                            resolved: st.0,
                                            compact_revision: 0,
                                            history: 0,
                                        },
                                    )
                                }
                                Req::WatchAck(_) | Req::WatchProgress(_) | Req::WatchCancel(_) => {
                                    continue
                                }
                                other => panic!("fake server: unexpected {other:?}"),
                            }
                        };
                        let resp = ShardResponse {
                            id: req.id,
                            body: Some(body),
                        };
                        w.write_all(&crate::client::encode_frame(&resp))
                            .await
                            .unwrap();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn serves_the_etcd_api_end_to_end() {
        let server = fake_server().await;
        let gw = Gateway::start(Config {
            listen: "127.0.0.1:0".into(),
            server,
            connect_wait: Duration::from_secs(5),
            ..Config::default()
        })
        .await
        .unwrap();
        let addr = gw.local_addr();
        assert_ne!(addr.port(), 0);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(gw.serve(async {
            let _ = stop_rx.await;
        }));
        let url = format!("http://{addr}");
        let mut kv = KvClient::connect(url.clone()).await.unwrap();
        let put = kv
            .put(pb::PutRequest {
                key: b"foo".to_vec().into(),
                value: b"bar".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let h = put.header.unwrap();
        assert_eq!((h.cluster_id, h.member_id, h.revision), (7, 9, 1));
        let got = kv
            .range(pb::RangeRequest {
                key: b"foo".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.kvs[0].value[..], b"bar");
        // Gateway-side checks come back with etcd's status.
        let e = kv.put(pb::PutRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "etcdserver: key is not provided");
        // Between the request limit and the gRPC limit: "too large".
        let e = kv
            .put(pb::PutRequest {
                key: b"big".to_vec().into(),
                value: vec![0; DEFAULT_MAX_REQUEST_BYTES + 1024].into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.message(), "etcdserver: request is too large");

        let st = MaintenanceClient::connect(url.clone())
            .await
            .unwrap()
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(st.version.starts_with("3.5"));
        assert_eq!(st.leader, 9);
        assert!(st.header.unwrap().revision >= 1);

        let ml = ClusterClient::connect(url.clone())
            .await
            .unwrap()
            .member_list(pb::MemberListRequest {
                linearizable: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ml.members[0].client_ur_ls, vec![url.clone()]);

        // Watch: a replay from revision 1 through the whole path (session,
        // feed, shard stream, merge).
        let mut watch = WatchClient::connect(url.clone()).await.unwrap();
        let (req_tx, req_rx) = tokio::sync::mpsc::channel(4);
        req_tx
            .send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: b"foo".to_vec(),
                        start_revision: 1,
                        ..Default::default()
                    },
                )),
            })
            .await
            .unwrap();
        let mut responses = watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await
            .unwrap()
            .into_inner();
        // The gateway's own client decodes the plain message.
        let created = responses.message().await.unwrap().unwrap().into_message();
        assert!(created.created && !created.canceled);
        assert_eq!(created.watch_id, 0);
        let h = created.header.unwrap();
        assert_eq!((h.cluster_id, h.member_id, h.revision), (7, 9, 1));
        let events = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .expect("event in time")
            .unwrap()
            .unwrap()
            .into_message();
        assert_eq!(events.watch_id, 0);
        assert_eq!(events.events.len(), 1);
        assert_eq!(&events.events[0].kv.as_ref().unwrap().value[..], b"bar");
        drop(req_tx);
        drop(responses);

        stop_tx.send(()).unwrap();
        drop(kv);
        drop(watch);
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("graceful shutdown")
            .unwrap();
    }

    #[test]
    fn ready_line_format() {
        let addr: SocketAddr = "127.0.0.1:4321".parse().unwrap();
        assert_eq!(
            ready_line(addr),
            "metastore-gateway ready on 127.0.0.1:4321"
        );
    }
}
