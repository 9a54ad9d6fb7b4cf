//! The gateway's gRPC server: HTTP/2 connections served by hyper, each call
//! handed by its path to the tonic service generated for it.
//!
//! tonic's own `transport::Server` wraps every call in layers the gateway
//! does not use: a connection-info extension (a map allocated per call), a
//! boxed request body, optional concurrency and load-shed limits, a
//! `grpc-timeout` timer, error recovery for services that can fail (the
//! generated ones cannot), and axum's router with its boxed services and
//! futures. Under many small calls those cost more than the routing the
//! gateway needs, which is one comparison of the path's service name. This
//! module keeps everything of tonic that speaks gRPC (the generated
//! services, their codecs, limits and status handling) and replaces only
//! the server around them ([`EtcdApi`], [`serve`]); KV's unary calls, the
//! bulk of the traffic, skip tonic's per-call machinery too (see
//! `crate::unary`).
//!
//! What it keeps of tonic's server, so clients see no difference:
//! - HTTP/2 only, with the same settings: no limit on concurrent streams
//!   (etcd has none; Kubernetes puts many watches on one connection),
//!   hyper's defaults otherwise, `TCP_NODELAY` on every connection;
//! - a path naming no service here is answered `Unimplemented`, as tonic's
//!   router answers it;
//! - a client's deadline (`grpc-timeout`) bounds the wait for the answer
//!   (its headers, for a stream): past it the call is dropped and answered
//!   `Cancelled` ("Timeout expired"), as tonic answers it;
//! - graceful shutdown: on the signal the listener closes, every connection
//!   is sent GOAWAY and finishes its calls in flight, and [`serve`] returns
//!   once all have closed (the binary bounds the wait; see `main.rs`).
//!
//! Two settings differ on purpose:
//! - tonic lifts hyper's limit on streams a connection makes the server
//!   reset for errors (1,024, then GOAWAY); this server keeps it, and h2's
//!   limit on streams a client resets before they are accepted, as hyper
//!   advises against floods of resets (RUSTSEC-2024-0003). A well-behaved
//!   client never comes near either.
//! - Answers carry no `date` header. hyper adds one to every answer by
//!   default (tonic's server therefore sends it), as HTTP's semantics ask
//!   of an origin server with a clock; but gRPC's wire format has no place
//!   for it, etcd's server (grpc-go) does not send it, and no etcd client
//!   reads it. Leaving it out saves the gateway the header's insertion and
//!   HPACK encoding on every call (about 1,700 of 53,900 instructions per
//!   put) and the client its decoding.
//!
//! Every connection passes through [`RewriteStream`] (see
//! `crate::authority`) before h2 reads it and through [`CoalescedWrites`]
//! (see `crate::coalesce`) as h2 writes it, and every answer through
//! [`oversized_as_resource_exhausted`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::body::Body;
use tonic::codegen::http::{HeaderName, Request, Response};
use tonic::codegen::BoxFuture;
use tonic::server::NamedService;
use tower::Service;

use crate::authority::RewriteStream;
use crate::coalesce::CoalescedWrites;
use crate::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::lease::LeaseService;
use crate::service::{
    ClusterService, KvService, MaintenanceService, UnimplementedAuth, WatchService,
};
use crate::unary::UnaryKv;

/// How long the accept loop waits after the listener fails (out of file
/// descriptors, say) before it accepts again, so a persistent failure does
/// not spin the gateway's thread.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A call as hyper hands it over.
pub type CallRequest = Request<Incoming>;

/// A call's answer as the generated services produce it.
pub type CallFuture = BoxFuture<Response<Body>, Infallible>;

/// Something that answers gRPC calls: the etcd API ([`EtcdApi`]), or KV
/// alone ([`UnaryKv`]; the bench's gRPC floor).
pub trait GrpcRoutes: Clone + Send + Sync + 'static {
    /// Answers `req`, a call to the method its path names.
    fn route(&self, req: CallRequest) -> CallFuture;
}

/// The etcd API's six services, routed by the service name in a call's
/// path (`/etcdserverpb.KV/Range` → KV).
#[derive(Clone)]
pub struct EtcdApi {
    pub kv: UnaryKv<KvService>,
    pub watch: WatchServer<WatchService>,
    pub lease: LeaseServer<LeaseService>,
    pub cluster: ClusterServer<ClusterService>,
    pub maintenance: MaintenanceServer<MaintenanceService>,
    pub auth: AuthServer<UnimplementedAuth>,
}

/// The service a gRPC path names: `/pkg.Service/Method` → `pkg.Service`.
pub(crate) fn service_name(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some(service)
}

/// Hands a call to one generated service.
fn call<S>(service: &S, req: Request<Incoming>) -> CallFuture
where
    S: Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future = CallFuture,
        > + Clone,
{
    // The generated services are always ready and clone an `Arc` each.
    service.clone().call(req)
}

impl GrpcRoutes for EtcdApi {
    fn route(&self, req: CallRequest) -> CallFuture {
        match service_name(req.uri().path()) {
            Some(KvServer::<KvService>::NAME) => self.kv.call(req),
            Some(WatchServer::<WatchService>::NAME) => call(&self.watch, req),
            Some(LeaseServer::<LeaseService>::NAME) => call(&self.lease, req),
            Some(ClusterServer::<ClusterService>::NAME) => call(&self.cluster, req),
            Some(MaintenanceServer::<MaintenanceService>::NAME) => call(&self.maintenance, req),
            Some(AuthServer::<UnimplementedAuth>::NAME) => call(&self.auth, req),
            _ => unimplemented_call(),
        }
    }
}

/// The answer to a path naming no service served here: tonic's router
/// answers `Unimplemented` with an empty message, as grpc-go does for an
/// unknown service.
pub(crate) fn unimplemented_call() -> CallFuture {
    Box::pin(std::future::ready(Ok(
        tonic::Status::unimplemented("").into_http()
    )))
}

/// A connection's view of the routes: hyper's service trait, each answer
/// passed through [`oversized_as_resource_exhausted`].
#[derive(Clone)]
struct Connection<R>(R);

impl<R: GrpcRoutes> hyper::service::Service<Request<Incoming>> for Connection<R> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = EdgeFuture;

    fn call(&self, req: Request<Incoming>) -> EdgeFuture {
        let deadline = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| grpc_timeout(v.as_bytes()))
            .map(|d| Box::pin(tokio::time::sleep(d)));
        EdgeFuture {
            call: self.0.route(req),
            deadline,
        }
    }
}

/// The header a client's deadline comes in.
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// The headers of a call's status (as names, so a lookup parses nothing).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The time a `grpc-timeout` value allows: at most 8 digits and a unit
/// (`H`ours, `M`inutes, `S`econds, `m`illi-, `u` micro-, `n`anoseconds),
/// as gRPC's HTTP/2 protocol spells it. Anything else is ignored, as if no
/// deadline had been sent.
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call's answer on its way out: bounded by the client's deadline, then
/// passed through [`oversized_as_resource_exhausted`].
pub struct EdgeFuture {
    call: CallFuture,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for EdgeFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(r) = self.call.as_mut().poll(cx) {
            return Poll::Ready(r.map(oversized_as_resource_exhausted));
        }
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                Poll::Ready(Ok(tonic::Status::cancelled("Timeout expired").into_http()))
            }
            _ => Poll::Pending,
        }
    }
}

/// Serves `routes` on every connection `listener` accepts until `shutdown`
/// resolves, then shuts down gracefully (see the module docs).
pub async fn serve<R: GrpcRoutes>(
    listener: tokio::net::TcpListener,
    routes: R,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    // The limits on reset streams stay hyper's and h2's, and answers carry
    // no `date` (see the module docs); only the stream limit is lifted.
    builder
        .timer(TokioTimer::new())
        .auto_date_header(false)
        .max_concurrent_streams(None);
    // Every connection holds a receiver; the sender's `closed` resolves
    // once all are gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let sock = match accepted {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Err(e) = sock.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let io = TokioIo::new(CoalescedWrites::new(RewriteStream::new(sock)));
        let conn = builder.serve_connection(io, Connection(routes.clone()));
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection ended: {e}");
                    }
                    return;
                }
                _ = stop.wait_for(|stopping| *stopping) => {}
            }
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(stop);
        });
    }
    // Closing the listener first: new clients are refused at once instead
    // of connecting to a server that no longer answers.
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// tonic refuses a message above its decoding limit with `OutOfRange`;
/// grpc-go, and so etcd, with `ResourceExhausted` ("grpc: received message
/// larger than max"). etcd clients read `OutOfRange` as "revision
/// compacted", so the status is rewritten at the edge to what they expect.
/// tonic sends a unary call's refusal as a trailers-only response: the
/// status is in the headers. A stream's refusal comes to the service as
/// the request stream's error instead ([`inbound_status`]).
pub fn oversized_as_resource_exhausted(mut resp: Response<Body>) -> Response<Body> {
    let headers = resp.headers_mut();
    // Every answer passes here: the common case costs one lookup.
    let out_of_range = headers
        .get(&GRPC_STATUS)
        .is_some_and(|v| v.as_bytes() == b"11");
    const _: () = assert!(tonic::Code::OutOfRange as i32 == 11);
    if !out_of_range {
        return resp;
    }
    let status = headers
        .get(&GRPC_MESSAGE)
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .and_then(|message| too_large_as_etcd(&message));
    if let Some(status) = status {
        let mut fresh = tonic::codegen::http::HeaderMap::new();
        if status.add_header(&mut fresh).is_ok() {
            headers.remove(&GRPC_STATUS);
            headers.remove(&GRPC_MESSAGE);
            headers.extend(fresh);
        }
    }
    resp
}

/// The status a streaming call (Watch, LeaseKeepAlive) ends with when a
/// client's message cannot be taken: etcd returns the request stream's
/// error as the call's, so a message above the limit ends it with
/// `ResourceExhausted` (rewritten from tonic's `OutOfRange`, see
/// [`oversized_as_resource_exhausted`]) and one that does not decode with
/// `Internal`, as tonic reports it already.
pub fn inbound_status(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::OutOfRange {
        if let Some(etcd) = too_large_as_etcd(status.message()) {
            return etcd;
        }
    }
    status
}

/// grpc-go's status for tonic's "decoded message length too large: found
/// N bytes, the limit is: M bytes"; `None` for any other message.
fn too_large_as_etcd(message: &str) -> Option<tonic::Status> {
    const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";
    let rest = message.strip_prefix(TONIC_TOO_LARGE)?;
    let numbers: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    let text = match numbers.as_slice() {
        [found, limit] => format!("grpc: received message larger than max ({found} vs. {limit})"),
        _ => "grpc: received message larger than max".to_string(),
    };
    Some(tonic::Status::resource_exhausted(text))
}

/// Decodes gRPC's percent-encoded `grpc-message`.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_its_service() {
        assert_eq!(
            service_name("/etcdserverpb.KV/Range"),
            Some("etcdserverpb.KV")
        );
        assert_eq!(
            service_name("/etcdserverpb.Watch/Watch"),
            Some("etcdserverpb.Watch")
        );
        assert_eq!(KvServer::<KvService>::NAME, "etcdserverpb.KV");
        for bad in [
            "",
            "/",
            "//Range",
            "/etcdserverpb.KV",
            "/etcdserverpb.KV/",
            "/a/b/c",
            "x/y",
        ] {
            assert_eq!(service_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_deadline_is_read_as_grpc_spells_it() {
        let ms = Duration::from_millis;
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout(b"4999m"), Some(ms(4999)));
        assert_eq!(
            grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(b"7n"), Some(Duration::from_nanos(7)));
        for bad in [
            &b""[..],
            b"S",
            b"100",
            b"100x",
            b"-1S",
            b"1.5S",
            b"123456789m",
            b" 1S",
        ] {
            assert_eq!(
                grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_cancelled() {
        let never: CallFuture = Box::pin(std::future::pending());
        let resp = EdgeFuture {
            call: never,
            deadline: Some(Box::pin(tokio::time::sleep(Duration::from_millis(50)))),
        }
        .await
        .unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).expect("a status");
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Cancelled, "Timeout expired")
        );
        // An answer in time is the answer.
        let resp = EdgeFuture {
            call: unimplemented_call(),
            deadline: Some(Box::pin(tokio::time::sleep(Duration::from_millis(50)))),
        }
        .await
        .unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    #[tokio::test]
    async fn an_unknown_service_is_unimplemented() {
        let resp = unimplemented_call().await.unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
}
