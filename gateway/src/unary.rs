//! KV's unary calls answered without tonic's per-call machinery.
//!
//! Every KV method (Range, Put, DeleteRange, Txn, Compact) is unary: one
//! request message, one answer. tonic's generated server runs each such
//! call through its general streaming path: a boxed decoder over a boxed
//! body, a request rebuilt from the HTTP parts, a 1.6 KB state machine
//! boxed per call (which glibc serves outside its per-thread cache), and
//! an encoder stream that yields the answer and then a status. Under put
//! at 1,000 clients that machinery costs more of the gateway's CPU than
//! the gateway's own routing does.
//!
//! [`UnaryKv`] reads the request body itself, decodes the one message with
//! prost, calls the same [`Kv`] implementation the generated server calls,
//! and answers with the encoded message followed by `grpc-status: 0`, or
//! with a trailers-only status when the call fails (as tonic does: the
//! same headers, status and message).
//!
//! Invariant: a client cannot tell which path answered. Only the common
//! case is taken here: an uncompressed (`identity`) request whose body is
//! exactly one well-formed message within the decoding limit. Anything
//! else (a `grpc-encoding`, a compressed or unknown flag, a message above
//! the limit, a truncated message, bytes after it, a body that fails, an
//! unknown method) goes to tonic's generated server with the body replayed
//! byte for byte ([`Replay`]), so tonic answers it exactly as before. A
//! message above the limit is handed over as soon as its length prefix is
//! read, and a body holding more than its first message as soon as the
//! bytes after it arrive (tonic then reads on, message by message), so a
//! large or endless body is never buffered here.
//!
//! As in tonic, the answer waits for the request body to end (the client's
//! END_STREAM), and a client's trailers are read and ignored. What this
//! path leaves out is what no KV implementation here uses: the service
//! gets no request metadata, and response metadata would not be sent.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use tonic::server::NamedService;
use tonic::Status;
use tower::Service;

use crate::etcdserverpb::kv_server::{Kv, KvServer};
use crate::grpc::{unimplemented_call, CallFuture, CallRequest, GrpcRoutes, GRPC_STATUS};

/// The header naming a request's compression.
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// gRPC's length prefix: a compression flag byte and a big-endian `u32`.
const PREFIX_BYTES: usize = 5;

/// The KV methods answered here, by their path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvMethod {
    Range,
    Put,
    DeleteRange,
    Txn,
    Compact,
}

impl KvMethod {
    fn of_path(path: &str) -> Option<KvMethod> {
        Some(match path {
            "/etcdserverpb.KV/Range" => KvMethod::Range,
            "/etcdserverpb.KV/Put" => KvMethod::Put,
            "/etcdserverpb.KV/DeleteRange" => KvMethod::DeleteRange,
            "/etcdserverpb.KV/Txn" => KvMethod::Txn,
            "/etcdserverpb.KV/Compact" => KvMethod::Compact,
            _ => return None,
        })
    }
}

/// etcd's KV service: unary calls answered directly (see the module docs),
/// everything else by tonic's generated [`KvServer`] over the same `T`.
pub struct UnaryKv<T> {
    inner: Arc<T>,
    generated: KvServer<T>,
    limit: usize,
}

impl<T> Clone for UnaryKv<T> {
    fn clone(&self) -> Self {
        UnaryKv {
            inner: self.inner.clone(),
            generated: self.generated.clone(),
            limit: self.limit,
        }
    }
}

impl<T: Kv> UnaryKv<T> {
    /// Serves `inner`, refusing request messages above `limit` bytes (the
    /// generated server's decoding limit; answers are not limited).
    pub fn new(inner: T, limit: usize) -> Self {
        let inner = Arc::new(inner);
        let generated = KvServer::from_arc(inner.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
        UnaryKv {
            inner,
            generated,
            limit,
        }
    }

    /// Answers a call to a KV method.
    pub fn call(&self, req: CallRequest) -> CallFuture {
        let method = match KvMethod::of_path(req.uri().path()) {
            Some(m) if identity_encoded(req.headers()) => m,
            _ => return self.generated.clone().call(req),
        };
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            match read_one_message(body, this.limit).await {
                Read::One(message) => Ok(this.answer(method, message).await),
                Read::ForTonic(replay) => {
                    let mut generated = this.generated;
                    generated.call(Request::from_parts(parts, replay)).await
                }
            }
        })
    }

    async fn answer(&self, method: KvMethod, message: Bytes) -> Response<Body> {
        let kv = &*self.inner;
        let answer = match method {
            KvMethod::Range => unary(message, |r| kv.range(r)).await,
            KvMethod::Put => unary(message, |r| kv.put(r)).await,
            KvMethod::DeleteRange => unary(message, |r| kv.delete_range(r)).await,
            KvMethod::Txn => unary(message, |r| kv.txn(r)).await,
            KvMethod::Compact => unary(message, |r| kv.compact(r)).await,
        };
        match answer {
            Ok(framed) => {
                let mut resp = Response::new(Body::new(UnaryAnswer::ok(framed)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                resp
            }
            Err(status) => status.into_http(),
        }
    }
}

/// The floor's server (`metastore-bench grpc-floor`) serves KV alone.
impl<T: Kv> GrpcRoutes for UnaryKv<T> {
    fn route(&self, req: CallRequest) -> CallFuture {
        match crate::grpc::service_name(req.uri().path()) {
            Some(name) if name == <KvServer<T> as NamedService>::NAME => self.call(req),
            _ => unimplemented_call(),
        }
    }
}

/// Decodes `message` as the request, calls `handler`, and frames its
/// answer; a message prost cannot decode is `Internal`, as tonic's prost
/// codec answers it.
async fn unary<Req, Resp, F, Fut>(message: Bytes, handler: F) -> Result<Bytes, Status>
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req = Req::decode(message).map_err(|e| Status::internal(e.to_string()))?;
    let resp = handler(tonic::Request::new(req)).await?;
    frame(resp.get_ref())
}

/// `message` with gRPC's length prefix, uncompressed.
fn frame<M: Message>(message: &M) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix_len = u32::try_from(len).map_err(|_| {
        // tonic's encoder refuses the same.
        Status::resource_exhausted(format!(
            "Cannot return body with more than 4GB of data but got {len} bytes"
        ))
    })?;
    let mut buf = BytesMut::with_capacity(PREFIX_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(prefix_len);
    // The room is reserved: no second pass over the message for its length.
    message.encode_raw(&mut buf);
    Ok(buf.freeze())
}

/// Whether the request's messages are uncompressed: no `grpc-encoding`,
/// or `identity`.
fn identity_encoded(headers: &HeaderMap) -> bool {
    headers
        .get(&GRPC_ENCODING)
        .is_none_or(|v| v.as_bytes() == b"identity")
}

/// What a message's length prefix allows: `None` while fewer than five
/// bytes are in, `Some(Ok(len))` for an uncompressed message within
/// `limit`, `Some(Err(()))` for anything tonic must see.
fn prefix(bytes: &[u8], limit: usize) -> Option<Result<usize, ()>> {
    if bytes.len() < PREFIX_BYTES {
        return None;
    }
    let len = (&bytes[1..PREFIX_BYTES]).get_u32() as usize;
    Some(if bytes[0] == 0 && len <= limit {
        Ok(len)
    } else {
        Err(())
    })
}

/// What a request body held.
enum Read {
    /// Exactly one message, without its prefix.
    One(Bytes),
    /// Anything else: everything read, replayed for tonic (module docs).
    ForTonic(Replay),
}

/// The body's bytes so far. Nearly always one DATA frame, kept as it came,
/// without a copy; later frames are appended to a copy.
enum Received {
    Nothing,
    One(Bytes),
    Joined(BytesMut),
}

impl Received {
    fn push(&mut self, data: Bytes) {
        *self = match std::mem::replace(self, Received::Nothing) {
            Received::Nothing => Received::One(data),
            Received::One(first) => {
                let mut m = BytesMut::with_capacity(first.len() + data.len());
                m.extend_from_slice(&first);
                m.extend_from_slice(&data);
                Received::Joined(m)
            }
            Received::Joined(mut m) => {
                m.extend_from_slice(&data);
                Received::Joined(m)
            }
        };
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Received::Nothing => &[],
            Received::One(b) => b,
            Received::Joined(m) => m,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Received::Nothing => Bytes::new(),
            Received::One(b) => b,
            Received::Joined(m) => m.freeze(),
        }
    }
}

/// Reads `body` to its end, or until its prefix shows it is tonic's.
async fn read_one_message(mut body: Incoming, limit: usize) -> Read {
    let mut received = Received::Nothing;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                return Read::ForTonic(Replay::new(received.into_bytes(), None, Some(e), None));
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                received.push(data);
                // Too large or compressed, or more than one message: tonic
                // answers, from here on reading the body itself (so a body
                // that goes on and on is never buffered here).
                let tonics = match prefix(received.as_slice(), limit) {
                    Some(Err(())) => true,
                    Some(Ok(len)) => received.as_slice().len() > PREFIX_BYTES + len,
                    None => false,
                };
                if tonics {
                    return Read::ForTonic(Replay::new(
                        received.into_bytes(),
                        None,
                        None,
                        Some(body),
                    ));
                }
                // A frame that ended the stream (grpc-go's clients end it
                // on their one DATA frame) leaves nothing to poll for: the
                // next poll would only say so.
                if body.is_end_stream() {
                    break;
                }
            }
            Err(frame) => {
                // Trailers end the body; tonic would read and ignore them.
                let trailers = frame.into_trailers().ok();
                return finish(received.into_bytes(), trailers, limit);
            }
        }
    }
    finish(received.into_bytes(), None, limit)
}

/// The whole body is in: exactly one message, or tonic's to answer.
fn finish(read: Bytes, trailers: Option<HeaderMap>, limit: usize) -> Read {
    match prefix(&read, limit) {
        Some(Ok(len)) if read.len() == PREFIX_BYTES + len => Read::One(read.slice(PREFIX_BYTES..)),
        _ => Read::ForTonic(Replay::new(read, trailers, None, None)),
    }
}

/// A request body handed to tonic as the client sent it: the bytes
/// already read, then the rest of the body (or the error or trailers that
/// ended it).
pub struct Replay {
    read: Option<Bytes>,
    rest: Option<Incoming>,
    error: Option<hyper::Error>,
    trailers: Option<HeaderMap>,
}

impl Replay {
    fn new(
        read: Bytes,
        trailers: Option<HeaderMap>,
        error: Option<hyper::Error>,
        rest: Option<Incoming>,
    ) -> Replay {
        Replay {
            read: (!read.is_empty()).then_some(read),
            rest,
            error,
            trailers,
        }
    }
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(read) = self.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        if let Some(e) = self.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_none()
            && self.error.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// A successful unary answer: the framed message, then `grpc-status: 0`.
struct UnaryAnswer {
    message: Option<Bytes>,
    ended: bool,
}

impl UnaryAnswer {
    fn ok(framed: Bytes) -> UnaryAnswer {
        UnaryAnswer {
            message: Some(framed),
            ended: false,
        }
    }
}

impl HttpBody for UnaryAnswer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        self.ended = true;
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    // No exact size: hyper would send it as `content-length`, which
    // tonic's answers do not carry.
}

#[cfg(test)]
mod tests {
    //! Differential: every request goes to a gateway-style server
    //! ([`UnaryKv`]) and to tonic's generated server over the same service,
    //! and the two answers must be the same, byte for byte (headers other
    //! than `date`, DATA, trailers).

    use super::*;
    use metastore_proto::etcdserverpb::*;
    use metastore_proto::mvccpb::KeyValue;
    use tonic::codegen::http::Method;

    /// A small decoding limit, so "too large" is cheap to send.
    const LIMIT: usize = 128;

    /// Answers from its request, with no state; a Range of `fail` fails.
    struct EchoKv;

    fn header(revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            ..Default::default()
        })
    }

    #[tonic::async_trait]
    impl Kv for EchoKv {
        async fn range(
            &self,
            r: tonic::Request<RangeRequest>,
        ) -> Result<tonic::Response<RangeResponse>, Status> {
            let r = r.into_inner();
            if r.key == b"fail" {
                return Err(Status::not_found("no such thing: fail"));
            }
            Ok(tonic::Response::new(RangeResponse {
                header: header(r.revision),
                count: 1,
                kvs: vec![KeyValue {
                    key: r.key.into(),
                    value: vec![7; 300].into(),
                    ..Default::default()
                }],
                more: false,
            }))
        }
        async fn put(
            &self,
            r: tonic::Request<PutRequest>,
        ) -> Result<tonic::Response<PutResponse>, Status> {
            Ok(tonic::Response::new(PutResponse {
                header: header(r.get_ref().lease + 1),
                prev_kv: None,
            }))
        }
        async fn delete_range(
            &self,
            _: tonic::Request<DeleteRangeRequest>,
        ) -> Result<tonic::Response<DeleteRangeResponse>, Status> {
            Ok(tonic::Response::new(DeleteRangeResponse {
                header: header(3),
                deleted: 2,
                prev_kvs: vec![],
            }))
        }
        async fn txn(
            &self,
            r: tonic::Request<TxnRequest>,
        ) -> Result<tonic::Response<TxnResponse>, Status> {
            Ok(tonic::Response::new(TxnResponse {
                header: header(4),
                succeeded: r.get_ref().compare.is_empty(),
                responses: vec![],
            }))
        }
        async fn compact(
            &self,
            _: tonic::Request<CompactionRequest>,
        ) -> Result<tonic::Response<CompactionResponse>, Status> {
            Err(Status::out_of_range(
                "etcdserver: mvcc: required revision has been compacted",
            ))
        }
    }

    /// tonic's generated server alone, as the gateway served KV before.
    #[derive(Clone)]
    struct Generated(KvServer<EchoKv>);

    impl GrpcRoutes for Generated {
        fn route(&self, req: CallRequest) -> CallFuture {
            self.0.clone().call(req)
        }
    }

    async fn serve<R: GrpcRoutes>(routes: R) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::grpc::serve(listener, routes, std::future::pending()));
        addr
    }

    /// What a client sees of an answer.
    #[derive(Debug, PartialEq)]
    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        data: Vec<u8>,
        trailers: Vec<(String, String)>,
    }

    /// A header block's fields, sorted. No answer carries `date`, as
    /// etcd's answers do not (see `crate::grpc`).
    fn pairs(h: &HeaderMap) -> Vec<(String, String)> {
        assert!(
            !h.contains_key(header::DATE),
            "an answer carries date: {h:?}"
        );
        let mut v: Vec<_> = h
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        v.sort();
        v
    }

    /// A call as a client might send it: extra headers, the body in the
    /// given DATA frames, optional trailers.
    struct Call {
        path: &'static str,
        headers: Vec<(&'static str, &'static str)>,
        frames: Vec<Vec<u8>>,
        trailers: bool,
        /// The client never ends its side of the stream.
        open: bool,
    }

    fn call(path: &'static str, frames: Vec<Vec<u8>>) -> Call {
        Call {
            path,
            headers: vec![],
            frames,
            trailers: false,
            open: false,
        }
    }

    async fn exchange(addr: std::net::SocketAddr, c: &Call) -> Answer {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}{}", c.path))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in &c.headers {
            req = req.header(*k, *v);
        }
        let no_body = c.frames.is_empty() && !c.trailers && !c.open;
        let (resp, mut send) = client.send_request(req.body(()).unwrap(), no_body).unwrap();
        for (i, f) in c.frames.iter().enumerate() {
            let last = i + 1 == c.frames.len() && !c.trailers && !c.open;
            // The server may answer (and reset the stream) before all of
            // a refused body is sent.
            let _ = send.send_data(Bytes::copy_from_slice(f), last);
        }
        if c.trailers {
            let mut t = HeaderMap::new();
            t.insert("x-client-trailer", HeaderValue::from_static("1"));
            let _ = send.send_trailers(t);
        }
        let resp = resp.await.unwrap();
        let (parts, mut body) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        Answer {
            status: parts.status.as_u16(),
            headers: pairs(&parts.headers),
            data,
            trailers: pairs(&trailers),
        }
    }

    fn framed<M: Message>(m: &M) -> Vec<u8> {
        frame(m).unwrap().to_vec()
    }

    fn raw(flag: u8, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// The grpc-status an answer carries, from its headers (trailers-only)
    /// or its trailers.
    fn grpc_status(a: &Answer) -> Option<String> {
        a.headers
            .iter()
            .chain(&a.trailers)
            .find(|(k, _)| k == "grpc-status")
            .map(|(_, v)| v.clone())
    }

    #[tokio::test]
    async fn every_answer_is_the_generated_servers_answer() {
        let fast = serve(UnaryKv::new(EchoKv, LIMIT)).await;
        let generated = serve(Generated(
            KvServer::new(EchoKv)
                .max_decoding_message_size(LIMIT)
                .max_encoding_message_size(usize::MAX),
        ))
        .await;

        const PUT: &str = "/etcdserverpb.KV/Put";
        const RANGE: &str = "/etcdserverpb.KV/Range";
        let put = framed(&PutRequest {
            key: b"k".to_vec().into(),
            value: b"v".to_vec().into(),
            lease: 41,
            ..Default::default()
        });
        let range = |key: &[u8]| {
            framed(&RangeRequest {
                key: key.to_vec(),
                revision: 9,
                ..Default::default()
            })
        };
        let (a, b) = put.split_at(3);
        let mut two = put.clone();
        two.extend_from_slice(&put);
        let mut trailing = range(b"k");
        trailing.push(0);

        // (what, the call, the grpc-status the answer must carry)
        let cases: Vec<(&str, Call, &str)> = vec![
            ("put in one frame", call(PUT, vec![put.clone()]), "0"),
            (
                "put split, then an empty end frame",
                call(PUT, vec![a.to_vec(), b.to_vec(), vec![]]),
                "0",
            ),
            (
                "range with the client's trailers",
                Call {
                    trailers: true,
                    ..call(RANGE, vec![range(b"k")])
                },
                "0",
            ),
            (
                "the service's error",
                call(RANGE, vec![range(b"fail")]),
                "5",
            ),
            (
                "delete",
                call(
                    "/etcdserverpb.KV/DeleteRange",
                    vec![framed(&DeleteRangeRequest::default())],
                ),
                "0",
            ),
            (
                "txn",
                call("/etcdserverpb.KV/Txn", vec![framed(&TxnRequest::default())]),
                "0",
            ),
            (
                "compact's error",
                call(
                    "/etcdserverpb.KV/Compact",
                    vec![framed(&CompactionRequest::default())],
                ),
                "11",
            ),
            ("an empty message", call(PUT, vec![raw(0, 0, &[])]), "0"),
            (
                "a message prost cannot decode",
                call(PUT, vec![raw(0, 3, &[0xff, 0xff, 0xff])]),
                "13",
            ),
            (
                "a truncated message",
                call(PUT, vec![raw(0, 50, &[0; 10])]),
                "13",
            ),
            ("a truncated prefix", call(PUT, vec![vec![0, 0]]), "13"),
            ("two messages", call(PUT, vec![two]), "0"),
            (
                "a stray byte after the message",
                call(RANGE, vec![trailing]),
                "13",
            ),
            ("no message", call(PUT, vec![]), "13"),
            (
                "the compressed flag",
                call(PUT, vec![raw(1, 3, &[1, 2, 3])]),
                "13",
            ),
            ("an unknown flag", call(PUT, vec![raw(7, 0, &[])]), "13"),
            (
                // tonic answers as soon as the second prefix shows a fault,
                // without the end of the body: so must the fast path, which
                // must not buffer a body that goes on and on either.
                "a message, then a bad one, and the body never ends",
                Call {
                    open: true,
                    ..call(PUT, vec![[put.clone(), raw(7, 0, &[])].concat()])
                },
                "13",
            ),
            (
                "a message above the limit",
                call(PUT, vec![raw(0, LIMIT as u32 + 1, &[0; LIMIT + 1])]),
                // tonic's OutOfRange, rewritten at the edge to grpc-go's.
                "8",
            ),
            (
                "a gzip-encoded request",
                Call {
                    headers: vec![("grpc-encoding", "gzip")],
                    ..call(PUT, vec![put.clone()])
                },
                "12",
            ),
            (
                "an identity-encoded request",
                Call {
                    headers: vec![("grpc-encoding", "identity")],
                    ..call(PUT, vec![put.clone()])
                },
                "0",
            ),
            (
                "an unknown method",
                call("/etcdserverpb.KV/Nope", vec![put]),
                "12",
            ),
        ];
        for (what, c, status) in &cases {
            let within =
                |addr| tokio::time::timeout(std::time::Duration::from_secs(5), exchange(addr, c));
            let ours = within(fast)
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer"));
            let theirs = within(generated)
                .await
                .expect("the generated server answers");
            assert_eq!(ours, theirs, "{what}");
            assert_eq!(
                grpc_status(&ours).as_deref(),
                Some(*status),
                "{what}: {ours:?}"
            );
        }
    }

    /// Tells which path called it: tonic's generated server hands the
    /// request's headers to the service as metadata, [`UnaryKv`] none.
    struct WhichPath;

    #[tonic::async_trait]
    impl Kv for WhichPath {
        async fn range(
            &self,
            _: tonic::Request<RangeRequest>,
        ) -> Result<tonic::Response<RangeResponse>, Status> {
            Err(Status::unimplemented("range"))
        }
        async fn put(
            &self,
            r: tonic::Request<PutRequest>,
        ) -> Result<tonic::Response<PutResponse>, Status> {
            let via_tonic = r.metadata().get("te").is_some();
            Ok(tonic::Response::new(PutResponse {
                header: header(i64::from(via_tonic)),
                prev_kv: None,
            }))
        }
        async fn delete_range(
            &self,
            _: tonic::Request<DeleteRangeRequest>,
        ) -> Result<tonic::Response<DeleteRangeResponse>, Status> {
            Err(Status::unimplemented("delete_range"))
        }
        async fn txn(
            &self,
            _: tonic::Request<TxnRequest>,
        ) -> Result<tonic::Response<TxnResponse>, Status> {
            Err(Status::unimplemented("txn"))
        }
        async fn compact(
            &self,
            _: tonic::Request<CompactionRequest>,
        ) -> Result<tonic::Response<CompactionResponse>, Status> {
            Err(Status::unimplemented("compact"))
        }
    }

    #[tokio::test]
    async fn the_common_case_skips_tonic_and_the_rest_does_not() {
        let addr = serve(UnaryKv::new(WhichPath, LIMIT)).await;
        let put = framed(&PutRequest::default());
        let (a, b) = put.split_at(2);
        let two = [put.clone(), put.clone()].concat();
        for (what, c, via_tonic) in [
            (
                "one frame",
                call("/etcdserverpb.KV/Put", vec![put.clone()]),
                false,
            ),
            (
                "split, with an empty end frame",
                call("/etcdserverpb.KV/Put", vec![a.to_vec(), b.to_vec(), vec![]]),
                false,
            ),
            (
                "two messages",
                call("/etcdserverpb.KV/Put", vec![two]),
                true,
            ),
            (
                "identity-encoded",
                Call {
                    headers: vec![("grpc-encoding", "identity")],
                    ..call("/etcdserverpb.KV/Put", vec![put.clone()])
                },
                false,
            ),
        ] {
            let answer = exchange(addr, &c).await;
            let resp = PutResponse::decode(&answer.data[PREFIX_BYTES..]).unwrap();
            assert_eq!(
                resp.header.unwrap().revision,
                i64::from(via_tonic),
                "{what}"
            );
        }
    }

    #[test]
    fn only_one_whole_uncompressed_message_within_the_limit_is_taken() {
        let m = frame(&PutRequest {
            key: b"key".to_vec().into(),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(finish(m.clone(), None, LIMIT), Read::One(one) if one == m.slice(5..)));
        assert_eq!(prefix(&m[..4], LIMIT), None);
        assert_eq!(prefix(&m, LIMIT), Some(Ok(m.len() - 5)));
        assert_eq!(prefix(&raw(0, LIMIT as u32, &[]), LIMIT), Some(Ok(LIMIT)));
        for refused in [
            raw(0, LIMIT as u32 + 1, &[]),
            raw(1, 0, &[]),
            raw(2, 0, &[]),
        ] {
            assert_eq!(prefix(&refused, LIMIT), Some(Err(())));
        }
        let mut longer = m.to_vec();
        longer.push(0);
        for other in [Bytes::new(), m.slice(..m.len() - 1), Bytes::from(longer)] {
            assert!(matches!(finish(other, None, LIMIT), Read::ForTonic(_)));
        }
    }
}
