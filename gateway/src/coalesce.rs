//! The client connection's socket as h2 writes to it: answers of up to
//! 1 KiB leave together, and a larger DATA frame still leaves with its
//! header in one system call.
//!
//! h2 buffers the frames it sends and writes the buffer when its connection
//! task flushes. A DATA frame's payload is copied into that buffer only
//! below a threshold; above it the buffer is written first and the payload
//! after it, before any further frame can be buffered. The threshold is
//! 256 bytes when the socket takes vectored writes (buffer and payload in
//! one `writev`) and 1,024 bytes when it does not. A gRPC answer carrying a
//! 256-byte value is just above 256, so over a plain TCP socket each such
//! answer cost a `writev` of its own even when ten answers for one
//! connection were ready in the same pass (seen with `strace` under
//! serializable range at 1,000 clients: one `writev` per answer).
//!
//! [`CoalescedWrites`] therefore tells h2 it takes no vectored writes, so
//! answers below 1 KiB are copied into h2's buffer and leave in one write,
//! and makes up for what that costs larger payloads: h2 then writes its
//! buffer and the payload in two `write` calls, so a small buffer is held
//! back (copied, at most [`HOLD_BYTES`]) and sent in one `writev` with
//! whatever h2 writes next, or at the flush that always ends h2's writes.
//!
//! Invariants: bytes leave in the order h2 wrote them; a write h2 was told
//! succeeded is either sent or held, and held bytes are sent before any
//! later byte and before a flush or shutdown completes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held back for the next write: h2's initial buffer size,
/// which holds any run of small frames it buffers before a payload.
pub const HOLD_BYTES: usize = 16 * 1024;

/// A socket whose small writes wait for the next write or flush (see the
/// module docs).
pub struct CoalescedWrites<S> {
    inner: S,
    /// Bytes accepted from h2 and not yet sent; `held[sent..]` is left.
    held: Vec<u8>,
    sent: usize,
}

impl<S> CoalescedWrites<S> {
    pub fn new(inner: S) -> Self {
        CoalescedWrites {
            inner,
            held: Vec::new(),
            sent: 0,
        }
    }

    fn clear_held(&mut self) {
        self.held.clear();
        self.sent = 0;
    }
}

impl<S: AsyncWrite + Unpin> CoalescedWrites<S> {
    /// Sends what is held, ahead of `next` if there is any; `Ready(n)` is
    /// the number of `next`'s bytes sent with it (0 if none went).
    fn poll_send_held(&mut self, cx: &mut Context<'_>, next: &[u8]) -> Poll<io::Result<usize>> {
        while self.sent < self.held.len() {
            let left = &self.held[self.sent..];
            let n = if next.is_empty() {
                ready!(Pin::new(&mut self.inner).poll_write(cx, left))?
            } else {
                let bufs = [io::IoSlice::new(left), io::IoSlice::new(next)];
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let left = left.len();
            if n >= left {
                self.clear_held();
                return Poll::Ready(Ok(n - left));
            }
            self.sent += n;
        }
        self.clear_held();
        Poll::Ready(Ok(0))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescedWrites<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.held.is_empty() {
            if buf.len() <= HOLD_BYTES {
                this.held.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let n = ready!(this.poll_send_held(cx, buf))?;
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        // The held bytes went alone: `buf` is written by itself.
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    /// False on purpose: h2 copies DATA payloads below 1 KiB into its
    /// buffer only over a socket that says so (see the module docs).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx, &[]))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx, &[]))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    /// A socket that records each system call's bytes, takes at most
    /// `cap` bytes per call, and answers `Pending` to every other call when
    /// `stall` is set (waking the caller at once, as a socket that became
    /// writable again would).
    #[derive(Default)]
    struct Recorder {
        calls: Vec<Vec<u8>>,
        cap: Option<usize>,
        stall: bool,
        stalled: bool,
        flushes: usize,
    }

    impl Recorder {
        fn take(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]]) -> Poll<io::Result<usize>> {
            if self.stall {
                self.stalled = !self.stalled;
                if self.stalled {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let mut call = Vec::new();
            for b in bufs {
                call.extend_from_slice(b);
            }
            call.truncate(self.cap.unwrap_or(usize::MAX));
            let n = call.len();
            self.calls.push(call);
            Poll::Ready(Ok(n))
        }

        fn sent(&self) -> Vec<u8> {
            self.calls.concat()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().take(cx, &[buf])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let bufs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
            self.get_mut().take(cx, &bufs)
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes `buf` whole, as h2 does (looping on partial writes).
    async fn write_all(w: &mut CoalescedWrites<Recorder>, mut buf: &[u8]) {
        while !buf.is_empty() {
            let n = poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf))
                .await
                .unwrap();
            assert!(n > 0);
            buf = &buf[n..];
        }
    }

    async fn flush(w: &mut CoalescedWrites<Recorder>) {
        poll_fn(|cx| Pin::new(&mut *w).poll_flush(cx))
            .await
            .unwrap();
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[tokio::test]
    async fn a_small_buffer_leaves_with_the_payload_after_it_in_one_call() {
        let mut w = CoalescedWrites::new(Recorder::default());
        assert!(!w.is_write_vectored());
        let (head, payload) = (bytes(300, 1), bytes(5000, 2));
        write_all(&mut w, &head).await;
        assert!(w.inner.calls.is_empty(), "the buffer is held");
        write_all(&mut w, &payload).await;
        flush(&mut w).await;
        assert_eq!(w.inner.calls.len(), 1);
        assert_eq!(w.inner.sent(), [head, payload].concat());
        assert_eq!(w.inner.flushes, 1);
    }

    #[tokio::test]
    async fn held_bytes_leave_at_the_flush() {
        let mut w = CoalescedWrites::new(Recorder::default());
        let head = bytes(700, 3);
        write_all(&mut w, &head).await;
        flush(&mut w).await;
        assert_eq!(w.inner.calls, vec![head.clone()]);
        // Nothing held twice.
        flush(&mut w).await;
        assert_eq!(w.inner.calls, vec![head]);
    }

    #[tokio::test]
    async fn a_buffer_above_the_hold_limit_is_written_at_once() {
        let mut w = CoalescedWrites::new(Recorder::default());
        let big = bytes(HOLD_BYTES + 1, 4);
        write_all(&mut w, &big).await;
        assert_eq!(w.inner.calls, vec![big]);
    }

    #[tokio::test]
    async fn partial_and_stalled_writes_keep_every_byte_in_order() {
        for cap in [1, 7, 299, 300, 301, 4096] {
            for stall in [false, true] {
                let mut w = CoalescedWrites::new(Recorder {
                    cap: Some(cap),
                    stall,
                    ..Recorder::default()
                });
                let parts = [bytes(300, 5), bytes(2000, 6), bytes(40, 7), bytes(9, 8)];
                for p in &parts {
                    write_all(&mut w, p).await;
                }
                flush(&mut w).await;
                assert_eq!(w.inner.sent(), parts.concat(), "cap {cap} stall {stall}");
                assert!(w.held.is_empty());
            }
        }
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held_first() {
        let mut w = CoalescedWrites::new(Recorder::default());
        let head = bytes(10, 9);
        write_all(&mut w, &head).await;
        poll_fn(|cx| Pin::new(&mut w).poll_shutdown(cx))
            .await
            .unwrap();
        assert_eq!(w.inner.sent(), head);
    }
}
