//! The bench client's connections: one HTTP/2 connection under each
//! `etcd-client` [`Client`], spoken through h2 directly, its writes
//! coalesced.
//!
//! On this 2-core machine the bench client shares the cores with the
//! server it measures, so what the client spends per request is taken from
//! the server. Three things made `etcd-client`'s own connection costly:
//!
//! - **The balancer.** `Client::connect` puts every connection behind
//!   tonic's balancer: a `tower` `Buffer` (each request crosses an mpsc
//!   channel to a worker task) in front of a `Balance` over a discovery
//!   stream, even for a single endpoint. A bench connection talks to one
//!   endpoint and never moves, so it needs none of that: [`connect`] runs
//!   the HTTP/2 handshake itself and hands the connection to `etcd-client`
//!   as a [`Channel::Custom`]. The crate's clients, request builders and
//!   response types are used as before.
//! - **One write per request.** h2 copies a DATA payload into its write
//!   buffer only below 256 bytes when the socket takes vectored writes; a
//!   put with a 256-byte value is chained behind the buffer and written
//!   on its own. The socket is wrapped in the gateway's [`CoalescedWrites`]
//!   (see `gateway/src/coalesce.rs`), so a connection's ready requests
//!   leave in one `send`, as grpc-go's clients (etcdctl, Kubernetes) send
//!   them.
//! - **Two tasks per request.** hyper's HTTP/2 client hands each request
//!   to its connection task over a channel, spawns a task that waits for
//!   the answer, and, since a request body cannot be sent before h2 has
//!   granted the stream send capacity, which only the connection task
//!   does, a second task that pipes the body; it then ends the stream with
//!   an empty DATA frame of its own. [`Connection`] calls h2 from the
//!   caller's task instead: the request's HEADERS and its one DATA frame,
//!   which carries END_STREAM as grpc-go's DATA frame does, are queued at
//!   once (h2 buffers data sent ahead of capacity; a unary request is far
//!   below any window), and the caller awaits the answer itself. Only a
//!   body still streaming after its first frames (a watch's or a lease
//!   keep-alive's requests) gets a task, which sends each later frame once
//!   the stream has capacity for it.
//!
//! The last change took the client from about 29–46 to 23 µs of CPU per
//! put at 1,000 clients against a MetaStore node, and from 42–47 to 32–33
//! against etcd (bench/results/TUNING.md, "The bench client: h2 without
//! hyper's client"); the first two from about 73 to 52 and 76 to 54
//! ("The bench client: one direct connection, writes coalesced"). The same
//! client drives MetaStore and etcd, so both servers are still measured
//! alike; `--balanced-channel` goes back to `Client::connect` for a run
//! comparable with reports made before these changes.
//!
//! A pool of connections spreads over the endpoints round robin, as
//! etcd's `benchmark` tool spreads its clients.
//!
//! Invariant: every request leaves with an absolute URI (`http`, the
//! endpoint's authority, the method's path). tonic's generated clients
//! give only the path, and an HTTP/2 request without `:scheme` and
//! `:authority` is malformed.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Channel, Client, ConnectOptions};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http_body::{Body as _, Frame};
use metastore_gateway::coalesce::CoalescedWrites;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service};

type Body = tonic::body::Body;

/// How long opening a connection (TCP and the HTTP/2 handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The receive windows a connection offers: hyper's client defaults, which
/// this client used before it spoke h2 directly.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// Opens one HTTP/2 connection to `endpoint` (`host:port`, optionally
/// with an `http://` prefix) and wraps it in an `etcd-client` [`Client`].
/// The connection's task is spawned on the calling runtime.
pub async fn connect(endpoint: &str) -> Result<Client, String> {
    let authority = authority_of(endpoint)?;
    let open = async {
        let tcp = tokio::net::TcpStream::connect(authority.as_str()).await?;
        tcp.set_nodelay(true)?;
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(CoalescedWrites::new(tcp))
            .await
            .map_err(std::io::Error::other)
    };
    let (send, conn) = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| format!("connect to {endpoint}: timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connect to {endpoint}: {e}"))?;
    tokio::spawn(async move {
        // The connection ends when every handle to it is dropped or the
        // server goes away; a call in flight then fails with h2's error.
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
    send: SendRequest<Bytes>,
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

    fn call(&mut self, req: http::Request<Body>) -> ResponseFuture {
        let (mut head, body) = req.into_parts();
        let path = head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        match Uri::from_parts(parts) {
            Ok(uri) => head.uri = uri,
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        }
        // The headers go now; the body follows in the returned future,
        // before the connection's task next runs, so they leave together.
        let sent = self
            .send
            .send_request(http::Request::from_parts(head, ()), false);
        Box::pin(async move {
            let (response, tx) = sent?;
            send_body(body, tx).await?;
            let response = response.await?;
            Ok(response.map(|recv| {
                Body::new(ResponseBody {
                    recv,
                    data_done: false,
                })
            }))
        })
    }
}

/// Sends what of `body` is ready at once, ending the stream on its last
/// DATA frame when the body ends with it (a unary call: HEADERS and one
/// DATA frame, as grpc-go sends them); a body still streaming (a watch's
/// or a keep-alive's requests) is sent on by a task of its own.
async fn send_body(mut body: Body, mut tx: SendStream<Bytes>) -> Result<(), BoxError> {
    let mut held: Option<Bytes> = None;
    loop {
        match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(Some(frame)) => match frame?.into_data() {
                Ok(data) => {
                    if let Some(prev) = held.replace(data) {
                        tx.send_data(prev, false)?;
                    }
                }
                Err(frame) => {
                    // gRPC clients send no trailers; pass them on if one does.
                    if let Some(prev) = held.take() {
                        tx.send_data(prev, false)?;
                    }
                    if let Ok(trailers) = frame.into_trailers() {
                        tx.send_trailers(trailers)?;
                        return Ok(());
                    }
                }
            },
            Poll::Ready(None) => {
                tx.send_data(held.take().unwrap_or_default(), true)?;
                return Ok(());
            }
            Poll::Pending => break,
        }
    }
    if let Some(prev) = held {
        tx.send_data(prev, false)?;
    }
    tokio::spawn(async move {
        // Ends when the body does (its sender dropped), or when the
        // server resets the stream.
        let _ = stream_body(body, tx).await;
    });
    Ok(())
}

/// Sends a streaming request's frames as its body yields them, each once
/// the stream has send capacity for it.
async fn stream_body(mut body: Body, mut tx: SendStream<Bytes>) -> Result<(), BoxError> {
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reset) = tx.poll_reset(cx) {
                return Poll::Ready(Err(BoxError::from(
                    reset.map_or_else(|e| e.to_string(), |r| format!("stream reset: {r:?}")),
                )));
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await?;
        let Some(frame) = frame else {
            tx.send_data(Bytes::new(), true)?;
            return Ok(());
        };
        match frame?.into_data() {
            Ok(data) => {
                tx.reserve_capacity(data.len());
                while tx.capacity() == 0 && !data.is_empty() {
                    match poll_fn(|cx| tx.poll_capacity(cx)).await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err("stream closed".into()),
                    }
                }
                tx.send_data(data, false)?;
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.send_trailers(trailers)?;
                    return Ok(());
                }
            }
        }
    }
}

/// A response's body as tonic reads it: h2's DATA frames, then its
/// trailers (where gRPC puts the call's status). Each frame's bytes are
/// handed back to the connection's receive window as they are taken.
struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        if !me.data_done {
            match me.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => me.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        me.recv
            .poll_trailers(cx)
            .map(|t| t.transpose().map(|t| t.map(Frame::trailers)))
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Response};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::{authority_of, connect};

    /// A unary call leaves as HEADERS and one DATA frame that ends the
    /// stream, with an absolute URI, and the answer's message and its
    /// trailers (the gRPC status) reach the caller.
    #[tokio::test]
    async fn a_unary_call_is_one_data_frame_that_ends_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let read = Arc::new(Mutex::new(Vec::new()));
            let io = Recorded {
                io: tcp,
                read: read.clone(),
            };
            let mut conn = h2::server::handshake(io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let serving = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            assert_eq!(req.uri().path(), "/etcdserverpb.KV/Put");
            assert_eq!(req.uri().authority().unwrap().as_str(), addr.to_string());
            let message = req.into_body().data().await.unwrap().unwrap();
            // A gRPC message: no compression, its length, then PutRequest
            // { key: "k" (field 1), value: "v" (field 2) }.
            assert_eq!(&message[..], b"\0\0\0\0\x06\x0a\x01k\x12\x01v");
            let mut tx = respond.send_response(grpc_head(), false).unwrap();
            // PutResponse { header: { revision: 7 } }.
            tx.send_data(Bytes::from_static(b"\0\0\0\0\x04\x0a\x02\x18\x07"), false)
                .unwrap();
            tx.send_trailers(ok_status()).unwrap();
            // Everything the client sent, once it has closed the connection.
            serving.await.unwrap();
            let read = read.lock().unwrap().clone();
            read
        });
        let mut client = connect(&addr.to_string()).await.unwrap();
        let put = client.put("k", "v", None).await.unwrap();
        assert_eq!(put.header().unwrap().revision(), 7);
        drop(client);
        let read = server.await.unwrap();
        // The client's frames after its 24-byte preface: (type, flags) of
        // each on stream 1; DATA is type 0, END_STREAM flag 1.
        let mut frames = Vec::new();
        let mut at = 24;
        while at + 9 <= read.len() {
            let len = u32::from_be_bytes([0, read[at], read[at + 1], read[at + 2]]) as usize;
            let stream = u32::from_be_bytes(read[at + 5..at + 9].try_into().unwrap()) & !(1 << 31);
            if stream == 1 {
                frames.push((read[at + 3], read[at + 4]));
            }
            at += 9 + len;
        }
        let data: Vec<_> = frames.iter().filter(|(kind, _)| *kind == 0).collect();
        assert_eq!(data.len(), 1, "DATA frames of the call: {frames:?}");
        assert_eq!(data[0].1 & 1, 1, "its DATA frame does not end the stream");
    }

    /// An answer with no message, only a status (trailers-only, as
    /// servers send errors), reaches the caller as that status.
    #[tokio::test]
    async fn a_status_only_answer_is_the_calls_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
            let head = Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "11")
                .header(
                    "grpc-message",
                    "etcdserver: mvcc: required revision is a future revision",
                )
                .body(())
                .unwrap();
            respond.send_response(head, true).unwrap();
            while conn.accept().await.is_some() {}
        });
        let mut client = connect(&addr.to_string()).await.unwrap();
        let err = client.get("k", None).await.unwrap_err();
        let etcd_client::Error::GRpcStatus(status) = err else {
            panic!("not a gRPC status: {err}");
        };
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert_eq!(
            status.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
    }

    /// A streaming call's later requests (here lease keep-alives sent
    /// after the call began) reach the server one by one, each answered
    /// on the open stream, and the stream ends when the caller drops its
    /// sender.
    #[tokio::test]
    async fn a_streaming_calls_requests_follow_as_they_are_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            assert_eq!(req.uri().path(), "/etcdserverpb.Lease/LeaseKeepAlive");
            let mut tx = respond.send_response(grpc_head(), false).unwrap();
            let mut body = req.into_body();
            let mut buf = Vec::new();
            let mut requests = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                buf.extend_from_slice(&chunk);
                // Each LeaseKeepAliveRequest { ID: 5 } (7 bytes framed)
                // is answered LeaseKeepAliveResponse { ID: 5, TTL: 10 }.
                while buf.len() >= 7 {
                    assert_eq!(&buf[..7], b"\0\0\0\0\x02\x08\x05");
                    buf.drain(..7);
                    requests += 1;
                    tx.send_data(Bytes::from_static(b"\0\0\0\0\x04\x10\x05\x18\x0a"), false)
                        .unwrap();
                }
            }
            tx.send_trailers(ok_status()).unwrap();
            requests
        });
        let mut client = connect(&addr.to_string()).await.unwrap();
        let (mut keeper, mut answers) = client.lease_keep_alive(5).await.unwrap();
        for _ in 0..3 {
            keeper.keep_alive().await.unwrap();
            let answer = answers.message().await.unwrap().unwrap();
            assert_eq!((answer.id(), answer.ttl()), (5, 10));
        }
        drop(keeper);
        assert!(answers.message().await.unwrap().is_none());
        // The request `lease_keep_alive` sends as it opens the stream (it
        // takes that answer itself), then the three.
        assert_eq!(server.await.unwrap(), 4);
    }

    /// An answer's HEADERS as a gRPC server sends them.
    fn grpc_head() -> Response<()> {
        Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    }

    /// The trailers of a call that succeeded.
    fn ok_status() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers
    }

    /// A socket whose reads are also copied aside.
    struct Recorded {
        io: tokio::net::TcpStream,
        read: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Recorded {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let me = &mut *self;
            let r = Pin::new(&mut me.io).poll_read(cx, buf);
            me.read
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
            r
        }
    }

    impl AsyncWrite for Recorded {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

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
