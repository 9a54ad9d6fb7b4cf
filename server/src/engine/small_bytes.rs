//! `SmallBytes`: the keys and values of a [`super::WriteBatch`] and the
//! keys of the MVCC key index, held inline when they are short.
//!
//! Every write the shard applies carries a few short pairs besides its
//! version record: the 17-byte key of that record, and the MVCC current
//! revision and the applied raft index, each an 8-byte key with an 8-byte
//! value. As `Vec`s they cost five allocations per put, and as many frees
//! once the held writes reach the engine; inline they cost none. In the
//! key index, a short key sits in the map's node itself, where a lookup
//! compares it without following a pointer. Version records are encoded
//! into buffers they share ([`SmallBytes::Shared`], a slice of one), so
//! they cost no allocation of their own either.
//!
//! Invariant: a `SmallBytes` is its byte string. Equality, order and hash
//! are those of the bytes (`[u8]`), whichever way they are held, so it can
//! key a map looked up by `&[u8]` ([`Borrow`]).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use prost::bytes::Bytes;

/// The longest byte string held inline: as long as fits beside the tag in
/// the space the `Bytes` variant takes anyway.
pub const INLINE: usize = 38;

/// A byte string, inline up to [`INLINE`] bytes, else on the heap: in a
/// `Vec` of its own, or a slice of a shared buffer.
#[derive(Clone)]
pub enum SmallBytes {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Vec<u8>),
    Shared(Bytes),
}

impl SmallBytes {
    /// The bytes as a `Vec` (no copy if they are in a `Vec` already).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            SmallBytes::Heap(v) => v,
            other => other.to_vec(),
        }
    }

    fn inline(s: &[u8]) -> Option<SmallBytes> {
        let mut bytes = [0; INLINE];
        bytes.get_mut(..s.len())?.copy_from_slice(s);
        Some(SmallBytes::Inline {
            len: s.len() as u8,
            bytes,
        })
    }
}

impl Deref for SmallBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            SmallBytes::Inline { len, bytes } => &bytes[..*len as usize],
            SmallBytes::Heap(v) => v,
            SmallBytes::Shared(b) => b,
        }
    }
}

impl AsRef<[u8]> for SmallBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Borrow<[u8]> for SmallBytes {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl Default for SmallBytes {
    fn default() -> SmallBytes {
        SmallBytes::Inline {
            len: 0,
            bytes: [0; INLINE],
        }
    }
}

/// A `Vec` stays where it is: it is allocated already.
impl From<Vec<u8>> for SmallBytes {
    fn from(v: Vec<u8>) -> SmallBytes {
        SmallBytes::Heap(v)
    }
}

/// A short slice is copied inline (no reference to count); a longer one
/// keeps sharing its buffer.
impl From<Bytes> for SmallBytes {
    fn from(b: Bytes) -> SmallBytes {
        SmallBytes::inline(&b).unwrap_or(SmallBytes::Shared(b))
    }
}

impl From<&[u8]> for SmallBytes {
    fn from(s: &[u8]) -> SmallBytes {
        SmallBytes::inline(s).unwrap_or_else(|| SmallBytes::Heap(s.to_vec()))
    }
}

impl<const N: usize> From<&[u8; N]> for SmallBytes {
    fn from(s: &[u8; N]) -> SmallBytes {
        SmallBytes::from(&s[..])
    }
}

impl<const N: usize> From<[u8; N]> for SmallBytes {
    fn from(s: [u8; N]) -> SmallBytes {
        SmallBytes::from(&s[..])
    }
}

impl PartialEq for SmallBytes {
    fn eq(&self, other: &SmallBytes) -> bool {
        **self == **other
    }
}

impl Eq for SmallBytes {}

impl PartialEq<[u8]> for SmallBytes {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialEq<&[u8]> for SmallBytes {
    fn eq(&self, other: &&[u8]) -> bool {
        **self == **other
    }
}

impl PartialOrd for SmallBytes {
    fn partial_cmp(&self, other: &SmallBytes) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SmallBytes {
    fn cmp(&self, other: &SmallBytes) -> Ordering {
        (**self).cmp(&**other)
    }
}

impl Hash for SmallBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl std::fmt::Debug for SmallBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn short_strings_are_inline_and_equal_whichever_way_held() {
        let short: SmallBytes = b"Sapplied".into();
        assert!(matches!(short, SmallBytes::Inline { len: 8, .. }));
        assert_eq!(&*short, b"Sapplied");
        let at_limit = SmallBytes::from(&[7u8; INLINE][..]);
        assert!(matches!(at_limit, SmallBytes::Inline { .. }));
        let long = SmallBytes::from(&[7u8; INLINE + 1][..]);
        assert!(matches!(long, SmallBytes::Heap(_)));
        assert_eq!(long.len(), INLINE + 1);
        assert_eq!(SmallBytes::default().len(), 0);
        // The same bytes, inline or in a Vec: equal, same order, same key.
        let from_vec = SmallBytes::from(b"Sapplied".to_vec());
        assert!(matches!(from_vec, SmallBytes::Heap(_)));
        assert_eq!(short, from_vec);
        assert_eq!(short.cmp(&from_vec), Ordering::Equal);
        assert_eq!(from_vec.clone().into_vec(), b"Sapplied".to_vec());
        assert_eq!(short.clone().into_vec(), b"Sapplied".to_vec());
        let mut map = BTreeMap::new();
        map.insert(from_vec, 1);
        map.insert(SmallBytes::from(b"A"), 2);
        map.insert(long, 3);
        assert_eq!(map.get(&b"Sapplied"[..]), Some(&1));
        map.insert(short, 4);
        assert_eq!(map.len(), 3);
        let order: Vec<i32> = map.values().copied().collect();
        // A `Bytes` and its tag: a map of these is no wider than of
        // `Bytes` plus one word.
        assert_eq!(std::mem::size_of::<SmallBytes>(), 40);
        assert_eq!(order, vec![3, 2, 4]); // 0x07.. < "A" < "S"
                                          // A shared slice is its bytes too; a short one is copied inline.
        let buffer = Bytes::from(vec![7u8; 2 * INLINE]);
        let shared = SmallBytes::from(buffer.slice(..INLINE + 1));
        assert!(matches!(shared, SmallBytes::Shared(_)));
        assert_eq!(shared, SmallBytes::from(&[7u8; INLINE + 1][..]));
        assert_eq!(shared.clone().into_vec(), vec![7u8; INLINE + 1]);
        assert!(matches!(
            SmallBytes::from(buffer.slice(..INLINE)),
            SmallBytes::Inline { .. }
        ));
    }
}
