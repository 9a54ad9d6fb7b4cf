//! The on-engine layout of the MVCC store.
//!
//! * Version records: `v` + main (8 bytes) + sub (8 bytes), both big-endian,
//!   so the engine's byte order is revision order. The value is one flag
//!   byte (`p` = a put, `t` = a tombstone) followed by the protobuf-encoded
//!   `mvccpb::KeyValue` of that version (for a tombstone: just the key and
//!   its mod revision). This is etcd's bolt layout (revision → KeyValue, with
//!   a tombstone mark), flattened into one namespace of the shared engine.
//! * Meta: `m` + name → an 8-byte big-endian i64 (`compact`, `current`).
//!
//! Revisions are positive, so encoding them as unsigned big-endian keeps the
//! order. Every decoder checks lengths and flags and reports anything
//! unexpected as `MvccError::Corrupt` rather than guessing.

use metastore_proto::mvccpb::KeyValue;
use prost::bytes::{BufMut, Bytes};
use prost::Message;

use super::key_index::Revision;
use super::{MvccError, Rev};
use crate::engine::keyspace;

const PUT: u8 = b'p';
const TOMBSTONE: u8 = b't';

/// Meta key: the compacted revision.
pub fn meta_compact_key() -> [u8; 8] {
    meta_key(*b"compact")
}

/// Meta key: the current (highest applied) revision.
pub fn meta_current_key() -> [u8; 8] {
    meta_key(*b"current")
}

fn meta_key(name: [u8; 7]) -> [u8; 8] {
    let mut k = [keyspace::MVCC_META; 8];
    k[1..].copy_from_slice(&name);
    k
}

pub fn encode_rev_value(rev: Rev) -> [u8; 8] {
    rev.to_be_bytes()
}

pub fn decode_rev_value(bytes: &[u8]) -> Result<Rev, MvccError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| MvccError::Corrupt(format!("meta revision of {} bytes", bytes.len())))?;
    Ok(Rev::from_be_bytes(arr))
}

/// The engine key of the version record at `rev`.
pub fn version_key(rev: Revision) -> [u8; 17] {
    let mut k = [keyspace::MVCC_VERSION; 17];
    k[1..9].copy_from_slice(&(rev.main as u64).to_be_bytes());
    k[9..].copy_from_slice(&(rev.sub as u64).to_be_bytes());
    k
}

pub fn decode_version_key(key: &[u8]) -> Result<Revision, MvccError> {
    if key.len() != 17 || key[0] != keyspace::MVCC_VERSION {
        return Err(MvccError::Corrupt(format!("bad version key {key:?}")));
    }
    let main = u64::from_be_bytes(key[1..9].try_into().expect("8 bytes")) as Rev;
    let sub = u64::from_be_bytes(key[9..17].try_into().expect("8 bytes")) as i64;
    Ok(Revision { main, sub })
}

/// The length of `kv`'s version record.
pub fn record_len(kv: &KeyValue) -> usize {
    1 + kv.encoded_len()
}

/// Writes `kv`'s version record into `buf` ([`record_len`] bytes): a
/// flag byte (put or tombstone), then `kv` as prost encodes it.
pub fn encode_record_into(kv: &KeyValue, tombstone: bool, buf: &mut impl BufMut) {
    buf.put_u8(if tombstone { TOMBSTONE } else { PUT });
    metastore_proto::encode::key_value_raw(kv, buf);
}

/// Returns (tombstone, kv).
pub fn decode_record(bytes: &[u8]) -> Result<(bool, KeyValue), MvccError> {
    decode_record_owned(Bytes::copy_from_slice(bytes))
}

/// [`decode_record`] of a record the caller owns: the decoded key and
/// value share its buffer instead of being copied out of it.
pub fn decode_record_owned(bytes: Bytes) -> Result<(bool, KeyValue), MvccError> {
    let mut buf = bytes;
    if buf.is_empty() {
        return Err(MvccError::Corrupt("empty version record".into()));
    }
    let flag = buf.split_to(1)[0];
    let tombstone = match flag {
        PUT => false,
        TOMBSTONE => true,
        other => return Err(MvccError::Corrupt(format!("bad record flag {other:#x}"))),
    };
    let kv = KeyValue::decode(buf)
        .map_err(|e| MvccError::Corrupt(format!("undecodable version record: {e}")))?;
    Ok((tombstone, kv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_record(kv: &KeyValue, tombstone: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record_into(kv, tombstone, &mut out);
        assert_eq!(out.len(), record_len(kv));
        out
    }

    #[test]
    fn version_keys_sort_by_revision() {
        let revs = [
            Revision { main: 1, sub: 0 },
            Revision { main: 1, sub: 1 },
            Revision { main: 2, sub: 0 },
            Revision { main: 256, sub: 0 },
            Revision {
                main: i64::MAX,
                sub: 3,
            },
        ];
        let keys: Vec<[u8; 17]> = revs.iter().map(|r| version_key(*r)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for (r, k) in revs.iter().zip(&keys) {
            assert_eq!(decode_version_key(k).unwrap(), *r);
        }
        assert!(decode_version_key(b"vshort").is_err());
    }

    #[test]
    fn records_round_trip() {
        let kv = KeyValue {
            key: b"\x00k\xff".to_vec().into(),
            value: b"v".to_vec().into(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: 99,
        };
        assert_eq!(
            decode_record(&encode_record(&kv, false)).unwrap(),
            (false, kv.clone())
        );
        assert_eq!(
            decode_record(&encode_record(&kv, true)).unwrap(),
            (true, kv.clone())
        );
        for tombstone in [false, true] {
            assert_eq!(
                decode_record_owned(encode_record(&kv, tombstone).into()).unwrap(),
                (tombstone, kv.clone())
            );
        }
        assert!(decode_record(b"").is_err());
        assert!(decode_record(b"x").is_err());
        assert!(decode_record_owned(Bytes::new()).is_err());
        assert!(decode_record_owned(Bytes::from_static(b"x")).is_err());
        assert_eq!(decode_rev_value(&encode_rev_value(42)).unwrap(), 42);
        assert!(decode_rev_value(b"123").is_err());
    }
}
