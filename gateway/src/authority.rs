//! Lenient `:authority`: requests whose HTTP/2 `:authority` pseudo-header
//! Rust's h2 would refuse reach the gateway with it repaired.
//!
//! Some of etcd's own Go clients send an `:authority` that is not an
//! authority at all. etcdctl 3.4 dials one endpoint (`endpoint status`,
//! `endpoint hashkv`, `defrag`, `move-leader`, `snapshot save`) as
//! `passthrough:///http://127.0.0.1:2379`, and grpc-go then sends the whole
//! URL, scheme included; clientv3 3.5.0 sent `#initially=[http://…]`.
//! etcd's Go HTTP/2 server takes any value. h2, under hyper and tonic,
//! parses the value as a URI authority and resets the stream with
//! `PROTOCOL_ERROR` before tonic sees the request, so those commands failed
//! against the gateway with an `http://` endpoint, the form most users
//! write. The gateway never reads the authority; it only has to get past h2.
//!
//! [`AuthorityRewriter`] sits between the socket and h2 ([`RewriteStream`])
//! and follows the connection's inbound bytes at the HTTP/2 frame layer. It
//! does no I/O of its own: bytes in, bytes out, so it is tested with scripted
//! byte streams. It reads up to the end of the first header block and
//! finds that block's `:authority` values: a scan of the HPACK field
//! representations decodes those strings and skips the rest by length
//! (`authorities_all_parse`); a block the scan cannot judge alone (one
//! that refers to the dynamic table, say) is decoded with its own full
//! HPACK decoder. Then:
//!
//! - If every `:authority` in it parses as h2 will parse it (every
//!   well-behaved client), the block goes on unchanged and the connection
//!   becomes a plain pass-through: the rewriter is dropped, and each later
//!   read costs one branch. The block was decoded for inspection only; h2
//!   decodes the same bytes and its HPACK table matches the client's.
//! - Otherwise the connection is rewritten for its whole life. Every header
//!   block is decoded with the client's HPACK state and re-encoded as
//!   literals without indexing, with `:authority` replaced by the
//!   `host:port` inside it (`http://h:p/x` → `h:p`) or dropped when there is
//!   none (HTTP/2 allows a request without one). Literals without indexing
//!   never enter h2's table, so its decoder cannot disagree with the client's
//!   encoder, whose table the rewriter alone now follows.
//!
//! Invariants: frames other than HEADERS and CONTINUATION go on byte for
//! byte and in order; nothing is held back but an incomplete frame or an
//! incomplete header block (never a frame h2 needs in order to answer, such
//! as the client's SETTINGS); a rewritten HEADERS frame keeps its stream,
//! END_STREAM and priority, drops its padding, and is split into
//! CONTINUATION frames at h2's 16 KiB frame limit. Input that is not HTTP/2
//! with a prior-knowledge preface, or that breaks the frame rules before
//! the first block is done, is handed to h2 unchanged, for h2 to answer as
//! it always does. Memory and time are bounded: a frame above
//! [`MAX_FRAME_BYTES`], or a header block above [`MAX_BLOCK_BYTES`] or of
//! more fields than h2 would take ([`MAX_BLOCK_FIELDS`], counted before
//! anything is decoded), ends inspection the same way, and on a rewritten
//! connection (where h2 can no longer be given the original bytes) is an
//! error that closes it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::decoder::DecoderError;
use loona_hpack::encoder::encode_integer_into;
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_BYTES: usize = 9;
/// The largest frame h2 accepts as configured here (its default
/// SETTINGS_MAX_FRAME_SIZE, the protocol's minimum); every frame the
/// rewriter emits fits in it.
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
/// The largest header block the rewriter collects.
pub const MAX_BLOCK_BYTES: usize = 256 * 1024;
/// The most header fields a block the rewriter decodes may hold. h2 (as
/// hyper sets it up) refuses a header list above 16 KiB, each field
/// counting at least 32 bytes, so no block h2 would accept holds more.
/// Decoding is bounded by it: every field may cost a Huffman decoder's
/// set-up and a copy of a dynamic-table entry (up to 4 KiB).
pub const MAX_BLOCK_FIELDS: usize = 512;
/// HPACK table size: the protocol default, which h2 advertises unchanged.
const HPACK_TABLE_BYTES: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a rewritten connection had to be closed.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityRewriteError {
    #[error("HTTP/2 frame of {0} bytes is above the {MAX_FRAME_BYTES}-byte limit")]
    FrameTooLarge(usize),
    #[error("HTTP/2 header block above {MAX_BLOCK_BYTES} bytes or {MAX_BLOCK_FIELDS} fields")]
    BlockTooLarge,
    #[error("malformed HTTP/2 frame sequence: {0}")]
    Malformed(&'static str),
    #[error("undecodable HPACK header block: {0}")]
    Hpack(DecoderError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Matching the connection preface.
    Preface,
    /// Framing, up to the end of the first header block.
    Inspect,
    /// Every header block is re-encoded.
    Rewrite,
    /// Everything goes on unchanged.
    Passthrough,
}

/// A header block being collected: HEADERS then any CONTINUATIONs.
struct Block {
    /// The frames as received, to hand on unchanged after inspection
    /// (kept only while inspecting; a rewritten block is re-encoded).
    frames: Vec<u8>,
    fragment: Vec<u8>,
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

/// The byte-stream state machine; see the module essay.
pub struct AuthorityRewriter {
    mode: Mode,
    /// Received bytes not yet forming a whole frame (or the preface).
    input: Vec<u8>,
    block: Option<Block>,
    decoder: Decoder<'static>,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_BYTES);
        AuthorityRewriter {
            mode: Mode::Preface,
            input: Vec::new(),
            block: None,
            decoder,
        }
    }
}

impl AuthorityRewriter {
    /// Whether the rest of the connection goes on unchanged (nothing is
    /// held any more, so the rewriter can be dropped).
    pub fn is_passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Whether the connection is being rewritten.
    #[cfg(test)]
    fn is_rewriting(&self) -> bool {
        self.mode == Mode::Rewrite
    }

    /// Takes bytes received from the client and appends what h2 should read
    /// to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityRewriteError> {
        if self.mode == Mode::Passthrough {
            out.extend_from_slice(bytes);
            return Ok(());
        }
        self.input.extend_from_slice(bytes);
        let result = self.process(out);
        if self.mode == Mode::Passthrough {
            out.append(&mut self.input);
            self.input = Vec::new();
        }
        result
    }

    /// The client closed its side: hands on whatever is held, unchanged
    /// (on a rewritten connection, all but an unfinished header block, whose
    /// start h2 never saw).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.mode != Mode::Rewrite {
            self.give_up(out);
        }
        out.append(&mut self.input);
        self.input = Vec::new();
    }

    fn process(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityRewriteError> {
        if self.mode == Mode::Preface {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            out.extend_from_slice(PREFACE);
            self.mode = Mode::Inspect;
            self.input.drain(..PREFACE.len());
        }
        let mut at = 0;
        let result = loop {
            if self.mode == Mode::Passthrough {
                break Ok(());
            }
            let rest = &self.input[at..];
            if rest.len() < FRAME_HEADER_BYTES {
                break Ok(());
            }
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if len > MAX_FRAME_BYTES {
                break self.refuse(out, AuthorityRewriteError::FrameTooLarge(len));
            }
            if rest.len() < FRAME_HEADER_BYTES + len {
                break Ok(());
            }
            let frame_len = FRAME_HEADER_BYTES + len;
            let frame = &self.input[at..at + frame_len];
            let flags = frame[4];
            let step = match (self.block.is_some(), frame[3]) {
                (false, HEADERS) => Self::start_block(frame, self.mode == Mode::Inspect).map(|b| {
                    self.block = Some(b);
                }),
                (true, CONTINUATION) => {
                    let block = self.block.as_mut().expect("collecting a block");
                    if frame[5..9] != block.stream_id {
                        Err(AuthorityRewriteError::Malformed(
                            "CONTINUATION on another stream",
                        ))
                    } else {
                        block
                            .fragment
                            .extend_from_slice(&frame[FRAME_HEADER_BYTES..]);
                        block.frames.extend_from_slice(frame);
                        Ok(())
                    }
                }
                (true, _) => Err(AuthorityRewriteError::Malformed(
                    "frame inside a header block",
                )),
                (false, _) => {
                    out.extend_from_slice(frame);
                    at += frame_len;
                    continue;
                }
            };
            // A refused frame stays in `input`, to follow the held block.
            if let Err(e) = step {
                break self.refuse(out, e);
            }
            at += frame_len;
            let block = self.block.as_ref().expect("collecting a block");
            if block.fragment.len() > MAX_BLOCK_BYTES {
                break self.refuse(out, AuthorityRewriteError::BlockTooLarge);
            }
            if flags & END_HEADERS != 0 {
                if let Err(e) = self.end_block(out) {
                    break self.refuse(out, e);
                }
            }
        };
        self.input.drain(..at);
        result
    }

    fn start_block(frame: &[u8], keep_frames: bool) -> Result<Block, AuthorityRewriteError> {
        let flags = frame[4];
        let payload = &frame[FRAME_HEADER_BYTES..];
        let mut start = 0;
        let mut end = payload.len();
        if flags & PADDED != 0 {
            let pad = *payload.first().ok_or(AuthorityRewriteError::Malformed(
                "padded HEADERS without its pad length",
            ))? as usize;
            start = 1;
            end = end
                .checked_sub(pad)
                .ok_or(AuthorityRewriteError::Malformed(
                    "HEADERS padding above its length",
                ))?;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let p = payload
                .get(start..start + 5)
                .ok_or(AuthorityRewriteError::Malformed(
                    "HEADERS too short for its priority",
                ))?;
            priority = Some(p.try_into().expect("five bytes"));
            start += 5;
        }
        if start > end {
            return Err(AuthorityRewriteError::Malformed(
                "HEADERS padding above its length",
            ));
        }
        Ok(Block {
            frames: if keep_frames {
                frame.to_vec()
            } else {
                Vec::new()
            },
            fragment: payload[start..end].to_vec(),
            stream_id: frame[5..9].try_into().expect("four bytes"),
            end_stream: flags & END_STREAM != 0,
            priority,
        })
    }

    fn end_block(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityRewriteError> {
        let block = self.block.as_ref().expect("collecting a block");
        // Before anything is decoded: a block h2 would refuse anyway is not
        // worth a decoder's time (see MAX_BLOCK_FIELDS).
        if hpack_field_count(&block.fragment) > MAX_BLOCK_FIELDS {
            return Err(AuthorityRewriteError::BlockTooLarge);
        }
        if self.mode == Mode::Inspect && authorities_all_parse(&block.fragment) == Some(true) {
            let block = self.block.take().expect("collecting a block");
            out.extend_from_slice(&block.frames);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        let mut headers = Vec::new();
        let mut all_valid = true;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                if &*name == b":authority" && !parses_as_authority(&value) {
                    all_valid = false;
                }
                headers.push((name.into_owned(), value.into_owned()));
            })
            .map_err(AuthorityRewriteError::Hpack)?;
        let block = self.block.take().expect("collecting a block");
        if self.mode == Mode::Inspect && all_valid {
            out.extend_from_slice(&block.frames);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        self.mode = Mode::Rewrite;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for (name, value) in &headers {
            let value = if name == b":authority" {
                match repaired_authority(value) {
                    Some(v) => v,
                    None => continue,
                }
            } else {
                value.as_slice()
            };
            encode_literal(name, value, &mut encoded);
        }
        write_block(&block, &encoded, out);
        Ok(())
    }

    /// Before the first block is done, hands everything on unchanged for h2
    /// to judge; on a rewritten connection, fails.
    fn refuse(
        &mut self,
        out: &mut Vec<u8>,
        e: AuthorityRewriteError,
    ) -> Result<(), AuthorityRewriteError> {
        if self.mode == Mode::Rewrite {
            return Err(e);
        }
        self.give_up(out);
        Ok(())
    }

    fn give_up(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.frames);
        }
        self.mode = Mode::Passthrough;
    }
}

/// `:authority` as Go's and h2's HPACK encoders Huffman-code a literal
/// name (RFC 7541 Appendix B; a valid code is unique, padding included).
const AUTHORITY_HUFFMAN: [u8; 8] = [0xb8, 0x3b, 0x53, 0x39, 0xec, 0x32, 0x7d, 0x7f];

/// The first header block's verdict without decoding all of it: whether
/// every `:authority` in `block` parses as h2 will parse it.
///
/// loona-hpack builds a fresh Huffman table (a hash map of 257 codes) for
/// every Huffman-coded string it decodes, about a million instructions for
/// a typical first block. This scan decodes only `:authority` values and
/// skips every other string by its length. It answers `None` where it
/// cannot be sure without the full decoder: an indexed `:authority` with
/// its empty static value, a reference into the dynamic table (which the
/// scan does not keep), or input it cannot parse. The caller then decodes
/// the block in full, as before. `Some(true)` is the full decoder's
/// verdict on any block the full decoder accepts; on one it refuses, the
/// connection passes through to h2 either way.
fn authorities_all_parse(mut block: &[u8]) -> Option<bool> {
    let mut all_parse = true;
    while let Some(&first) = block.first() {
        // A literal field: its name's index has a 6-bit prefix (with
        // incremental indexing) or a 4-bit one (without, never indexed).
        let prefix_bits = match first {
            0x80.. => {
                // Indexed field: only the static table's names are known.
                let (index, used) = hpack_integer(block, 7)?;
                if index == 1 || index == 0 || index > STATIC_TABLE_ENTRIES {
                    return None;
                }
                block = &block[used..];
                continue;
            }
            0x40..=0x7f => 6,
            0x20..=0x3f => {
                // Dynamic table size update.
                let (_, used) = hpack_integer(block, 5)?;
                block = &block[used..];
                continue;
            }
            _ => 4,
        };
        let (index, used) = hpack_integer(block, prefix_bits)?;
        let mut rest = &block[used..];
        let is_authority = match index {
            0 => {
                let (huffman, name, used) = hpack_string(rest)?;
                rest = &rest[used..];
                if huffman {
                    name == AUTHORITY_HUFFMAN
                } else {
                    name == b":authority"
                }
            }
            1 => true,
            i if i <= STATIC_TABLE_ENTRIES => false,
            _ => return None,
        };
        let (huffman, value, used) = hpack_string(rest)?;
        if is_authority {
            let parses = if huffman {
                let decoded = loona_hpack::huffman::HuffmanDecoder::new()
                    .decode(value)
                    .ok()?;
                parses_as_authority(&decoded)
            } else {
                parses_as_authority(value)
            };
            all_parse &= parses;
        }
        block = &rest[used..];
    }
    Some(all_parse)
}

/// How many header fields `block` holds (indexed or literal; table size
/// updates are not fields), its strings skipped by length, up to where it
/// cannot be parsed (the full decoder then reports why).
fn hpack_field_count(mut block: &[u8]) -> usize {
    let mut fields = 0;
    let mut next = || -> Option<()> {
        let &first = block.first()?;
        let (prefix_bits, literal) = match first {
            0x80.. => (7, false),
            0x40..=0x7f => (6, true),
            0x20..=0x3f => {
                let (_, used) = hpack_integer(block, 5)?;
                block = &block[used..];
                return Some(());
            }
            _ => (4, true),
        };
        let (index, mut used) = hpack_integer(block, prefix_bits)?;
        if literal {
            if index == 0 {
                used += hpack_string(&block[used..])?.2;
            }
            used += hpack_string(&block[used..])?.2;
        }
        block = &block[used..];
        fields += 1;
        Some(())
    };
    while next().is_some() {}
    fields
}

/// Entries in HPACK's static table (RFC 7541 Appendix A).
const STATIC_TABLE_ENTRIES: usize = 61;

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1) and the bytes
/// it took; `None` if cut short or above 2^28.
fn hpack_integer(buf: &[u8], n: u32) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*buf.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
        shift += 7;
        if shift > 21 {
            return None;
        }
    }
    None
}

/// An HPACK string literal (RFC 7541 §5.2): whether it is Huffman-coded,
/// its octets, and the bytes it took; `None` if cut short.
fn hpack_string(buf: &[u8]) -> Option<(bool, &[u8], usize)> {
    let huffman = *buf.first()? & 0x80 != 0;
    let (len, used) = hpack_integer(buf, 7)?;
    let octets = buf.get(used..used.checked_add(len)?)?;
    Some((huffman, octets, used + len))
}

fn parses_as_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// `scheme://host:port/…` → `host:port`; `None` when nothing in the value
/// is an authority.
fn repaired_authority(value: &[u8]) -> Option<&[u8]> {
    if parses_as_authority(value) {
        return Some(value);
    }
    let after = value.windows(3).position(|w| w == b"://")? + 3;
    let rest = &value[after..];
    let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let host = &rest[..end];
    (!host.is_empty() && parses_as_authority(host)).then_some(host)
}

/// A literal header field without indexing, new name, neither string
/// Huffman-coded (RFC 7541 §6.2.2).
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for s in [name, value] {
        encode_integer_into(s.len(), 7, 0, out).expect("writing to a Vec");
        out.extend_from_slice(s);
    }
}

fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let mut first = true;
    let mut rest = encoded;
    loop {
        let mut flags = 0;
        let mut prefix: &[u8] = &[];
        if first {
            if block.end_stream {
                flags |= END_STREAM;
            }
            if let Some(p) = &block.priority {
                flags |= PRIORITY;
                prefix = p;
            }
        }
        let take = rest.len().min(MAX_FRAME_BYTES - prefix.len());
        let (chunk, tail) = rest.split_at(take);
        if tail.is_empty() {
            flags |= END_HEADERS;
        }
        let len = (prefix.len() + chunk.len()) as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(if first { HEADERS } else { CONTINUATION });
        out.push(flags);
        out.extend_from_slice(&block.stream_id);
        out.extend_from_slice(prefix);
        out.extend_from_slice(chunk);
        if tail.is_empty() {
            return;
        }
        rest = tail;
        first = false;
    }
}

/// A connection whose inbound bytes pass through an [`AuthorityRewriter`]
/// until it turns into a pass-through; writes go straight to the socket.
pub struct RewriteStream<S> {
    inner: S,
    rewriter: Option<Box<AuthorityRewriter>>,
    /// Rewritten bytes h2 has not read yet, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
}

impl<S> RewriteStream<S> {
    pub fn new(inner: S) -> Self {
        RewriteStream {
            inner,
            rewriter: Some(Box::default()),
            out: Vec::new(),
            out_at: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RewriteStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                return Poll::Ready(Ok(()));
            }
            if this.out_at > 0 {
                this.out.clear();
                this.out_at = 0;
            }
            let Some(rewriter) = this.rewriter.as_mut() else {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            if rewriter.is_passthrough() {
                this.rewriter = None;
                this.out = Vec::new();
                continue;
            }
            let mut scratch = [0u8; MAX_FRAME_BYTES];
            let mut raw = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                rewriter.finish(&mut this.out);
                this.rewriter = None;
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            rewriter
                .feed(raw.filled(), &mut this.out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RewriteStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;
    use std::collections::VecDeque;

    /// Encodes as Go's HPACK encoder does: every field indexed, `:authority`
    /// by its static name (index 1), known fields referred to by their
    /// dynamic-table index, the oldest entries evicted past 4 KiB.
    #[derive(Default)]
    struct GoLikeEncoder {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        /// Authority literals sent so far.
        authority_literals: usize,
    }

    impl GoLikeEncoder {
        fn encode(&mut self, fields: &[(&[u8], &[u8])]) -> Vec<u8> {
            let mut out = Vec::new();
            for &(name, value) in fields {
                let pos = self.table.iter().position(|(n, v)| n == name && v == value);
                if let Some(pos) = pos {
                    encode_integer_into(62 + pos, 7, 0x80, &mut out).unwrap();
                    continue;
                }
                if name == b":authority" {
                    out.push(0x41);
                    self.authority_literals += 1;
                } else {
                    out.push(0x40);
                    encode_integer_into(name.len(), 7, 0, &mut out).unwrap();
                    out.extend_from_slice(name);
                }
                encode_integer_into(value.len(), 7, 0, &mut out).unwrap();
                out.extend_from_slice(value);
                self.table.push_front((name.to_vec(), value.to_vec()));
                let size = |t: &VecDeque<(Vec<u8>, Vec<u8>)>| {
                    t.iter().map(|(n, v)| n.len() + v.len() + 32).sum::<usize>()
                };
                while size(&self.table) > HPACK_TABLE_BYTES {
                    self.table.pop_back();
                }
            }
            out
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    const SETTINGS: u8 = 0x4;

    fn h<'a>(name: &'a str, value: &'a str) -> (&'a [u8], &'a [u8]) {
        (name.as_bytes(), value.as_bytes())
    }
    const DATA: u8 = 0x0;

    /// What a Go client sends: preface, SETTINGS, then per request a
    /// header block (its HPACK state carried from request to request) and a
    /// DATA frame.
    fn client_stream(
        authority: &str,
        requests: u32,
        mut encode: impl FnMut(&[(&[u8], &[u8])]) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0x40, 0, 0]));
        for i in 0..requests {
            let stream = 1 + 2 * i;
            let timeout = format!("{}m", 100 + i);
            let block = encode(&[
                h(":method", "POST"),
                h(":scheme", "http"),
                h(":path", "/etcdserverpb.Maintenance/Status"),
                h(":authority", authority),
                h("content-type", "application/grpc"),
                h("grpc-timeout", &timeout),
            ]);
            bytes.extend(frame(HEADERS, END_HEADERS, stream, &block));
            bytes.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        bytes
    }

    /// Feeds `input` in pieces of `step` bytes and returns what h2 reads.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, AuthorityRewriter) {
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            rw.feed(piece, &mut out).expect("feed");
        }
        rw.finish(&mut out);
        (out, rw)
    }

    /// Parses h2's view: preface, then frames; decodes every header block
    /// with a fresh decoder, as h2 would.
    /// A frame as h2 reads it, header blocks decoded.
    struct Seen {
        kind: u8,
        flags: u8,
        stream: u32,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    }

    fn frames_seen(bytes: &[u8]) -> Vec<Seen> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut dec = Decoder::new();
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            assert!(len <= MAX_FRAME_BYTES);
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
            let payload = rest[9..9 + len].to_vec();
            let headers = if kind == HEADERS {
                assert!(flags & END_HEADERS != 0);
                dec.decode(&payload)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect()
            } else {
                Vec::new()
            };
            seen.push(Seen {
                kind,
                flags,
                stream,
                headers,
                payload,
            });
            rest = &rest[9 + len..];
        }
        seen
    }

    fn authority_of(headers: &[(String, String)]) -> Option<&str> {
        headers
            .iter()
            .find(|(n, _)| n == ":authority")
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_valid_authority_passes_byte_for_byte_in_any_split() {
        let mut go = GoLikeEncoder::default();
        let input = client_stream("127.0.0.1:2379", 3, |f| go.encode(f));
        for step in [1, 2, 7, 9, 10, 64, input.len()] {
            let (out, rw) = run(&input, step);
            assert_eq!(out, input, "split every {step} bytes");
            assert!(rw.is_passthrough());
        }
        // Decided after the first block: the rest is not even parsed.
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        let first_block_end = PREFACE.len() + 15 + 9 + {
            let l = &input[PREFACE.len() + 15..];
            u32::from_be_bytes([0, l[0], l[1], l[2]]) as usize
        };
        rw.feed(&input[..first_block_end], &mut out).unwrap();
        assert!(rw.is_passthrough());
        assert_eq!(out, &input[..first_block_end]);
    }

    #[test]
    fn a_url_authority_is_repaired_in_every_block() {
        // The Go client indexes the authority once and refers to the entry
        // afterwards, so every request must be decoded with its state; over
        // 200 requests the changing grpc-timeout values push the entry out of
        // the 4 KiB table, and the client sends the authority again.
        let mut go = GoLikeEncoder::default();
        let input = client_stream("http://127.0.0.1:2379", 200, |f| go.encode(f));
        assert!(
            go.authority_literals > 1,
            "the entry was evicted and sent again"
        );
        for step in [1, 3, 9, 100, input.len()] {
            let (out, rw) = run(&input, step);
            assert!(rw.is_rewriting(), "split every {step}");
            let seen = frames_seen(&out);
            let kinds: Vec<u8> = seen.iter().map(|f| f.kind).collect();
            let mut expected = vec![SETTINGS];
            for _ in 0..200 {
                expected.extend([HEADERS, DATA]);
            }
            assert_eq!(kinds, expected);
            for (i, req) in seen.iter().filter(|f| f.kind == HEADERS).enumerate() {
                assert_eq!(req.stream, 1 + 2 * i as u32);
                assert_eq!(req.flags, END_HEADERS);
                assert_eq!(authority_of(&req.headers), Some("127.0.0.1:2379"));
                assert_eq!(
                    req.headers[2],
                    (
                        ":path".to_string(),
                        "/etcdserverpb.Maintenance/Status".to_string()
                    )
                );
                assert_eq!(req.headers[5].1, format!("{}m", 100 + i));
            }
            // Non-header frames unchanged.
            let data: Vec<&Vec<u8>> = seen
                .iter()
                .filter(|f| f.kind == DATA)
                .map(|f| &f.payload)
                .collect();
            assert!(data.iter().all(|p| p.as_slice() == [0, 0, 0, 0, 0]));
        }
    }

    #[test]
    fn authorities_with_nothing_usable_are_dropped() {
        for bad in ["#initially=[http://127.0.0.1:2379]", "http://", "a b"] {
            let mut go = GoLikeEncoder::default();
            let input = client_stream(bad, 2, |f| go.encode(f));
            let (out, rw) = run(&input, 5);
            assert!(rw.is_rewriting(), "{bad}");
            for req in frames_seen(&out).iter().filter(|f| f.kind == HEADERS) {
                assert_eq!(authority_of(&req.headers), None, "{bad}");
                assert_eq!(req.headers.len(), 5, "the other headers stay: {bad}");
            }
        }
        assert_eq!(
            repaired_authority(b"https://etcd-0.example:2379/v3/kv"),
            Some(&b"etcd-0.example:2379"[..])
        );
        assert_eq!(repaired_authority(b"localhost"), Some(&b"localhost"[..]));
    }

    #[test]
    fn padding_priority_and_continuations_are_handled() {
        let mut enc = Encoder::new();
        let long = "x".repeat(40_000);
        let block = enc.encode([
            h(":method", "POST"),
            h(":authority", "http://h:1"),
            h("x-long", &long),
        ]);
        let mut input = PREFACE.to_vec();
        // HEADERS with padding and priority, the rest of the block in
        // CONTINUATIONs.
        let (a, rest) = block.split_at(10);
        let mut payload = vec![3u8];
        payload.extend([0x80, 0, 0, 1, 15]);
        payload.extend(a);
        payload.extend([0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        let chunks: Vec<&[u8]> = rest.chunks(16_000).collect();
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            input.extend(frame(
                CONTINUATION,
                if last { END_HEADERS } else { 0 },
                5,
                c,
            ));
        }
        let (out, rw) = run(&input, 4096);
        assert!(rw.is_rewriting());
        // Reassemble h2's view: HEADERS + CONTINUATIONs.
        let mut rest = &out[PREFACE.len()..];
        let mut fragment = Vec::new();
        let mut first = true;
        loop {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            assert!(len <= MAX_FRAME_BYTES);
            let (kind, flags) = (rest[3], rest[4]);
            assert_eq!(&rest[5..9], &5u32.to_be_bytes());
            let mut payload = &rest[9..9 + len];
            if first {
                assert_eq!(kind, HEADERS);
                assert_eq!(
                    flags & (END_STREAM | PRIORITY | PADDED),
                    END_STREAM | PRIORITY
                );
                assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 15]);
                payload = &payload[5..];
            } else {
                assert_eq!(kind, CONTINUATION);
            }
            fragment.extend_from_slice(payload);
            rest = &rest[9 + len..];
            first = false;
            if flags & END_HEADERS != 0 {
                break;
            }
        }
        assert!(rest.is_empty());
        let headers = Decoder::new().decode(&fragment).unwrap();
        assert_eq!(headers[1], (b":authority".to_vec(), b"h:1".to_vec()));
        assert_eq!(headers[2].1.len(), 40_000);
    }

    #[test]
    fn what_is_not_http2_or_breaks_the_rules_goes_to_h2_unchanged() {
        let http1 = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (out, rw) = run(&http1, 3);
        assert_eq!(out, http1);
        assert!(rw.is_passthrough());

        // A DATA frame in the middle of the first header block.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(DATA, 0, 1, b"zz"));
        let (out, rw) = run(&input, 1);
        assert_eq!(out, input);
        assert!(rw.is_passthrough());

        // An oversized frame, and an undecodable first block.
        let mut input = PREFACE.to_vec();
        input.extend(frame(DATA, 0, 1, &vec![0; MAX_FRAME_BYTES + 1]));
        assert_eq!(run(&input, 1000).0, input);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff]));
        input.extend(frame(DATA, 0, 1, b"after"));
        assert_eq!(run(&input, 1).0, input);

        // A connection cut in the middle of a frame: held bytes go on.
        let mut go = GoLikeEncoder::default();
        let input = client_stream("127.0.0.1:1", 1, |f| go.encode(f));
        let cut = &input[..input.len() - 2];
        assert_eq!(run(cut, 1).0, cut);
    }

    /// A first block of more fields than h2 would take is handed to h2
    /// undecoded (it refuses it); on a rewritten connection, such a block
    /// closes the connection. Either way no decoder runs through it.
    #[test]
    fn a_block_of_too_many_fields_is_not_decoded() {
        // 8,000 fields `:authority: ""` (Huffman-coded, empty): each would
        // cost the full decoder a Huffman decoder's set-up.
        let block: Vec<u8> = [0x01, 0x80].repeat(8_000);
        // The block as HEADERS and CONTINUATION frames on `stream`.
        let frames = |stream: u32| {
            let parts: Vec<&[u8]> = block.chunks(MAX_FRAME_BYTES).collect();
            let mut out = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let kind = if i == 0 { HEADERS } else { CONTINUATION };
                let flags = if i + 1 == parts.len() { END_HEADERS } else { 0 };
                out.extend(frame(kind, flags, stream, part));
            }
            out
        };
        let mut input = PREFACE.to_vec();
        input.extend(frame(SETTINGS, 0, 0, &[]));
        input.extend(frames(1));
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        rw.feed(&input, &mut out).unwrap();
        assert_eq!(out, input, "handed on unchanged, for h2 to refuse");
        assert!(!rw.is_rewriting());

        let mut go = GoLikeEncoder::default();
        let mut rw = AuthorityRewriter::default();
        rw.feed(&client_stream("http://h:1", 1, |f| go.encode(f)), &mut out)
            .unwrap();
        assert!(rw.is_rewriting());
        assert!(matches!(
            rw.feed(&frames(3), &mut out),
            Err(AuthorityRewriteError::BlockTooLarge)
        ));
        // A block within the bound still decodes.
        assert_eq!(hpack_field_count(&[0x01, 0x80].repeat(3)), 3);
        assert_eq!(hpack_field_count(&[0x82, 0x40, 0x01, b'a', 0x01, b'b']), 2);
        assert_eq!(hpack_field_count(&[0x82, 0x01, 0x85]), 1, "cut short");
    }

    #[test]
    fn a_rewritten_connection_fails_on_what_it_cannot_forward() {
        let mut go = GoLikeEncoder::default();
        let input = client_stream("http://h:1", 1, |f| go.encode(f));
        let mut rw = AuthorityRewriter::default();
        let mut out = Vec::new();
        rw.feed(&input, &mut out).unwrap();
        assert!(rw.is_rewriting());
        let big = frame(DATA, 0, 3, &vec![0; MAX_FRAME_BYTES + 1]);
        assert!(matches!(
            rw.feed(&big, &mut out),
            Err(AuthorityRewriteError::FrameTooLarge(_))
        ));
        let mut rw = AuthorityRewriter::default();
        rw.feed(&input, &mut out).unwrap();
        assert!(matches!(
            rw.feed(&frame(HEADERS, END_HEADERS, 3, &[0xff, 0xff]), &mut out),
            Err(AuthorityRewriteError::Hpack(_))
        ));
    }

    /// RFC 7541 Appendix B's codes for the characters the tests use.
    fn huffman(s: &str) -> Vec<u8> {
        let (mut out, mut bits, mut nbits) = (Vec::new(), 0u64, 0u32);
        for c in s.chars() {
            let (code, len): (u64, u32) = match c {
                '0' => (0x0, 5),
                '1' => (0x1, 5),
                '2' => (0x2, 5),
                'a' => (0x3, 5),
                'c' => (0x4, 5),
                'e' => (0x5, 5),
                'i' => (0x6, 5),
                'o' => (0x7, 5),
                's' => (0x8, 5),
                't' => (0x9, 5),
                '-' => (0x16, 6),
                '.' => (0x17, 6),
                '/' => (0x18, 6),
                '3' => (0x19, 6),
                '5' => (0x1b, 6),
                '7' => (0x1d, 6),
                '9' => (0x1f, 6),
                'g' => (0x26, 6),
                'h' => (0x27, 6),
                'l' => (0x28, 6),
                'n' => (0x2a, 6),
                'p' => (0x2b, 6),
                'r' => (0x2c, 6),
                'u' => (0x2d, 6),
                ':' => (0x5c, 7),
                'k' => (0x75, 7),
                'v' => (0x77, 7),
                'y' => (0x7a, 7),
                _ => panic!("no code for {c:?} in this test"),
            };
            bits = (bits << len) | code;
            nbits += len;
            while nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
            }
        }
        if nbits > 0 {
            // Padded with the most significant bits of EOS: ones.
            out.push(((bits << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) as u8);
        }
        out
    }

    fn string(s: &str, huffman_coded: bool, out: &mut Vec<u8>) {
        if huffman_coded {
            let h = huffman(s);
            encode_integer_into(h.len(), 7, 0x80, out).unwrap();
            out.extend_from_slice(&h);
        } else {
            encode_integer_into(s.len(), 7, 0, out).unwrap();
            out.extend_from_slice(s.as_bytes());
        }
    }

    /// HPACK field representations (RFC 7541 §6).
    #[derive(Clone, Copy)]
    enum Field<'a> {
        Indexed(usize),
        /// With incremental indexing (6-bit prefix), name by index.
        Incremental(usize, &'a str, bool),
        /// With incremental indexing, a new name: name, its coding, value,
        /// its coding.
        IncrementalNew(&'a str, bool, &'a str, bool),
        /// Never indexed (4-bit prefix), name by index.
        NeverIndexed(usize, &'a str, bool),
        /// Without indexing (4-bit prefix), a new name.
        WithoutIndexingNew(&'a str, bool, &'a str, bool),
        SizeUpdate(usize),
    }

    fn block(fields: &[Field]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in fields {
            match *f {
                Field::Indexed(i) => encode_integer_into(i, 7, 0x80, &mut out).unwrap(),
                Field::Incremental(i, v, hv) => {
                    encode_integer_into(i, 6, 0x40, &mut out).unwrap();
                    string(v, hv, &mut out);
                }
                Field::IncrementalNew(n, hn, v, hv) => {
                    out.push(0x40);
                    string(n, hn, &mut out);
                    string(v, hv, &mut out);
                }
                Field::NeverIndexed(i, v, hv) => {
                    encode_integer_into(i, 4, 0x10, &mut out).unwrap();
                    string(v, hv, &mut out);
                }
                Field::WithoutIndexingNew(n, hn, v, hv) => {
                    out.push(0x00);
                    string(n, hn, &mut out);
                    string(v, hv, &mut out);
                }
                Field::SizeUpdate(n) => encode_integer_into(n, 5, 0x20, &mut out).unwrap(),
            }
        }
        out
    }

    /// The verdict of the full decoder, as the rewriter reached it before
    /// the scan: `None` where it refuses the block.
    fn full_verdict(block: &[u8]) -> Option<bool> {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_BYTES);
        let mut all = true;
        decoder
            .decode_with_cb(block, |n, v| {
                if &*n == b":authority" && !parses_as_authority(&v) {
                    all = false;
                }
            })
            .ok()?;
        Some(all)
    }

    #[test]
    fn the_first_block_is_judged_without_decoding_every_string() {
        use loona_hpack::huffman::HuffmanDecoder;
        assert_eq!(
            HuffmanDecoder::new().decode(&AUTHORITY_HUFFMAN).unwrap(),
            b":authority"
        );
        for s in ["127.0.0.1:2379", "http://127.0.0.1:2379", "grpc-go/1.59.0"] {
            assert_eq!(
                HuffmanDecoder::new().decode(&huffman(s)).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(hpack_integer(&[10], 5), Some((10, 1)));
        assert_eq!(hpack_integer(&[31, 154, 10], 5), Some((1337, 3)));
        assert_eq!(hpack_integer(&[31, 154], 5), None);

        use Field::*;
        // A first request as grpc-go sends it: everything Huffman-coded
        // and added to the table.
        let go = |authority: &'static str| {
            vec![
                Indexed(3),
                Indexed(6),
                Incremental(4, "/v3/kv/put", true),
                Incremental(1, authority, true),
                Incremental(31, "application/grpc", true),
                Incremental(58, "grpc-go/1.59.0", true),
                IncrementalNew("te", true, "trailers", true),
            ]
        };
        let cases: Vec<(&str, Vec<Field>, Option<bool>)> = vec![
            ("grpc-go, a host:port", go("127.0.0.1:2379"), Some(true)),
            ("grpc-go, a URL", go("http://127.0.0.1:2379"), Some(false)),
            (
                "no :authority",
                vec![Indexed(3), Incremental(4, "/", false)],
                Some(true),
            ),
            (
                "a Huffman-coded new name",
                vec![
                    NeverIndexed(4, "/", false),
                    WithoutIndexingNew(":authority", true, "http://127.0.0.1:2379", false),
                ],
                Some(false),
            ),
            (
                "a raw new name",
                vec![WithoutIndexingNew(
                    ":authority",
                    false,
                    "127.0.0.1:2379",
                    false,
                )],
                Some(true),
            ),
            (
                "a size update first",
                vec![SizeUpdate(0), Incremental(1, "127.0.0.1:2379", false)],
                Some(true),
            ),
            (
                "a second :authority that is not one",
                vec![
                    NeverIndexed(1, "127.0.0.1:2379", true),
                    NeverIndexed(1, "http://127.0.0.1:2379", true),
                ],
                Some(false),
            ),
            ("the static empty :authority", vec![Indexed(1)], None),
            (
                "a reference into the dynamic table",
                vec![Incremental(1, "127.0.0.1:2379", false), Indexed(62)],
                None,
            ),
            ("a dynamic name", vec![Incremental(62, "x", false)], None),
            ("index 0", vec![Indexed(0)], None),
        ];
        for (what, fields, expected) in cases {
            let b = block(&fields);
            assert_eq!(authorities_all_parse(&b), expected, "{what}");
            if expected.is_some() {
                assert_eq!(full_verdict(&b), expected, "{what}: the full decoder");
            }
        }
        // Cut anywhere, a block is never judged from the part read.
        let whole = block(&go("http://127.0.0.1:2379"));
        for cut in 1..whole.len() {
            let verdict = authorities_all_parse(&whole[..cut]);
            assert!(
                verdict != Some(true) || full_verdict(&whole[..cut]) == Some(true),
                "cut at {cut}"
            );
        }
    }
}
