//! `Chunks`: byte strings written into, and cut from, shared chunks.
//!
//! The shard server makes byte strings by the hundred thousand a second
//! that live a little while and are then dropped: request frames (whose
//! keys and values the watch ring keeps), raft entries' data, version
//! records on their way to the engine. Each in an allocation of its own
//! costs a `malloc`, and a `Bytes` made from a `Vec` allocates its
//! reference count too, on its first slice. [`Chunks`] writes consecutive
//! strings into one reference-counted chunk instead and cuts each off as a
//! `Bytes`: one allocation per chunk, and cloning or slicing a string only
//! counts references.
//!
//! Invariants:
//! * **A chunk lives as long as any string cut from it.** Whoever holds
//!   the strings bounds the memory: the owner picks a chunk size small
//!   enough that keeping one string pins little (see each use).
//! * **A string is never split across chunks.** One that does not fit in
//!   what is left of the current chunk starts a new one, of the chunk size
//!   or, if it is larger, of its own size (so a large string never pins
//!   small ones, and never is pinned by them beyond its own chunk).

use prost::bytes::{Bytes, BytesMut};

/// Writes byte strings into shared chunks of `chunk_bytes` (see the
/// module docs).
pub struct Chunks {
    current: BytesMut,
    chunk_bytes: usize,
}

impl Chunks {
    pub fn new(chunk_bytes: usize) -> Chunks {
        Chunks {
            current: BytesMut::new(),
            chunk_bytes,
        }
    }

    /// Writes a string of exactly `len` bytes with `write` and returns it.
    pub fn cut(&mut self, len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
        if self.current.capacity() < len {
            self.current = BytesMut::with_capacity(len.max(self.chunk_bytes));
        }
        write(&mut self.current);
        debug_assert_eq!(self.current.len(), len, "the string's announced length");
        self.current.split().freeze()
    }

    /// `cut` of a copy of `bytes`.
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        self.cut(bytes.len(), |chunk| chunk.extend_from_slice(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consecutive strings are cut from one chunk, back to back, until the
    /// next no longer fits; then a new chunk starts. A string larger than
    /// a chunk gets one of its own, and the next string a new one again.
    #[test]
    fn strings_share_chunks_until_one_does_not_fit() {
        let mut chunks = Chunks::new(100);
        let a = chunks.copy(&[1; 40]);
        let b = chunks.copy(&[2; 40]);
        let c = chunks.copy(&[3; 40]);
        let big = chunks.copy(&[4; 250]);
        let d = chunks.copy(&[5; 10]);
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&[1; 40][..], &[2; 40][..], &[3; 40][..])
        );
        assert_eq!((&big[..], &d[..]), (&[4; 250][..], &[5; 10][..]));
        let gap = |x: &Bytes, y: &Bytes| y.as_ptr() as isize - x.as_ptr() as isize;
        // a and b share a chunk; c did not fit after them.
        assert_eq!(gap(&a, &b), 40);
        assert_ne!(gap(&b, &c), 40);
        // The large string filled a chunk of its own: d starts another.
        assert_ne!(gap(&big, &d), 250);
        // What `cut` writes is what it returns.
        let e = chunks.cut(3, |chunk| chunk.extend_from_slice(b"xyz"));
        assert_eq!(&e[..], b"xyz");
    }
}
