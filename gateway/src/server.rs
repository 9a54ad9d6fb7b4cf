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

use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::backend::{Backend, Identity};
use crate::client::ClientConfig;
use crate::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::service::{
    ClusterService, KvService, MaintenanceService, UnimplementedAuth, UnimplementedLease,
    UnimplementedWatch,
};
use crate::shards::{Shards, Topology};

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
        let backend = Arc::new(Backend::new(Arc::new(shards), router, identity(&topology)));
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

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let limit = self.config.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let b = self.backend.clone();
        let client_url = self.client_url();
        let kv = KvServer::new(KvService::new(b.clone(), self.config.max_request_bytes))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
        let maintenance = MaintenanceServer::new(MaintenanceService::new(b.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
        let cluster = ClusterServer::new(ClusterService::new(b.clone(), client_url))
            .max_decoding_message_size(limit);
        let watch = WatchServer::new(UnimplementedWatch).max_decoding_message_size(limit);
        let lease = LeaseServer::new(UnimplementedLease).max_decoding_message_size(limit);
        let auth = AuthServer::new(UnimplementedAuth).max_decoding_message_size(limit);
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        Server::builder()
            .add_service(kv)
            .add_service(watch)
            .add_service(lease)
            .add_service(cluster)
            .add_service(maintenance)
            .add_service(auth)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

fn identity(t: &Topology) -> Identity {
    Identity {
        cluster_id: t.cluster_id,
        member_id: t.member_id,
        member_name: t.member_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_format() {
        let addr: SocketAddr = "127.0.0.1:4321".parse().unwrap();
        assert_eq!(
            ready_line(addr),
            "metastore-gateway ready on 127.0.0.1:4321"
        );
    }
}
