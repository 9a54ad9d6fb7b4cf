//! The bench client's connections: one HTTP/2 connection under each
//! `etcd-client` [`Client`], with nothing between the two, and its writes
//! coalesced.
//!
//! On this 2-core machine the bench client shares the cores with the
//! server it measures, so what the client spends per request is taken from
//! the server. Two things made `etcd-client`'s own connection costly:
//!
//! - **The balancer.** `Client::connect` puts every connection behind
//!   tonic's balancer: a `tower` `Buffer` (each request crosses an mpsc
//!   channel to a worker task) in front of a `Balance` over a discovery
//!   stream, even for a single endpoint. A bench connection talks to one
//!   endpoint and never moves, so it needs none of that: [`connect`] runs
//!   hyper's HTTP/2 handshake itself and hands the connection to
//!   `etcd-client` as a [`Channel::Custom`]. The crate's clients, request
//!   builders and response types are used as before; each call goes
//!   straight to hyper's `SendRequest`.
//! - **One write per request.** h2 copies a DATA payload into its write
//!   buffer only below 256 bytes when the socket takes vectored writes; a
//!   put with a 256-byte value is chained behind the buffer and written
//!   on its own. The socket is wrapped in the gateway's [`CoalescedWrites`]
//!   (see `gateway/src/coalesce.rs`), so a connection's ready requests
//!   leave in one `send`, as grpc-go's clients (etcdctl, Kubernetes) send
//!   them.
//!
//! Under put at 1,000 clients this took the client from about 73 to 52 µs
//! of CPU per put against a MetaStore node, and from 76 to 54 against etcd
//! (bench/results/TUNING.md, "The bench client: one direct connection,
//! writes coalesced"). The same client drives MetaStore and etcd, so both
//! servers are still measured alike; `--balanced-channel` goes back to
//! `Client::connect` for a run comparable with reports made before this
//! change.
//!
//! A pool of connections spreads over the endpoints round robin, as
//! etcd's `benchmark` tool spreads its clients.
//!
//! Invariant: every request leaves with an absolute URI (`http`, the
//! endpoint's authority, the method's path). tonic's generated clients
//! give only the path, and an HTTP/2 request without `:scheme` and
//! `:authority` is malformed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{Channel, Client, ConnectOptions};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metastore_gateway::coalesce::CoalescedWrites;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service};

type Body = tonic::body::Body;

/// How long opening a connection (TCP and the HTTP/2 handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one HTTP/2 connection to `endpoint` (`host:port`, optionally
/// with an `http://` prefix) and wraps it in an `etcd-client` [`Client`].
pub async fn connect(endpoint: &str) -> Result<Client, String> {
    let authority = authority_of(endpoint)?;
    let open = async {
        let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
        tcp.set_nodelay(true)?;
        let io = TokioIo::new(CoalescedWrites::new(tcp));
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(std::io::Error::other)
    };
    let (send, conn) = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| format!("connect to {endpoint}: timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connect to {endpoint}: {e}"))?;
    tokio::spawn(async move {
        // The connection ends when every handle to it is dropped or the
        // server goes away; a call in flight then fails with hyper's error.
        let _ = conn.await;
    });
    let channel = Channel::Custom(BoxCloneSyncService::new(Connection { send, authority }));
    Client::from_channel(channel, None)
        .await
        .map_err(|e| format!("connect to {endpoint}: {e}"))
}

/// Opens a connection the way `etcd-client` does by itself
/// (`Client::connect`: tonic's balanced channel over the endpoint).
pub async fn connect_balanced(endpoint: &str) -> Result<Client, String> {
    let url = format!("http://{}", authority_of(endpoint)?);
    let opts = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(30), Duration::from_secs(30));
    Client::connect([url.as_str()], Some(opts))
        .await
        .map_err(|e| format!("connect to {url}: {e}"))
}

/// `host:port` of an endpoint given as `host:port` or `http://host:port/`.
fn authority_of(endpoint: &str) -> Result<Authority, String> {
    endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/')
        .parse()
        .map_err(|e| format!("endpoint {endpoint:?}: {e}"))
}

/// One HTTP/2 connection as the `tower` service `etcd-client` calls.
#[derive(Clone)]
struct Connection {
    send: SendRequest<Body>,
    authority: Authority,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send + 'static>>;

impl Service<http::Request<Body>> for Connection {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> ResponseFuture {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        match Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        }
        let sent = self.send.send_request(req);
        Box::pin(async move {
            let resp = sent.await?;
            Ok(resp.map(Body::new))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::authority_of;

    #[test]
    fn endpoints_with_or_without_scheme_name_the_same_authority() {
        for e in [
            "127.0.0.1:2379",
            "http://127.0.0.1:2379",
            "http://127.0.0.1:2379/",
        ] {
            assert_eq!(authority_of(e).unwrap().as_str(), "127.0.0.1:2379");
        }
        assert!(authority_of("http://bad host:1").is_err());
    }
}
