//! What a Watch stream sends: etcd's `WatchResponse`, with its events
//! encoded once per release instead of once per watcher.
//!
//! A feed's release goes to every watcher of the range, often hundreds,
//! and each watcher's response repeats the same events under its own
//! `watch_id` and header. Encoding them per watcher (a copy of every key
//! and value into the message, then prost's varint and length work) was
//! most of the gateway's cost per delivered event. Instead a release is
//! encoded once, lazily, as the run of `events` fields (field 11) it
//! contributes to any response ([`EncodedEvents`]), and each watcher's
//! response refers to that run, or to a suffix of it, by refcount.
//!
//! [`OutgoingWatchResponse`] is the type the gRPC service sends (the
//! gateway's build maps `etcdserverpb.WatchResponse` to it): an event
//! response is its header and watch id followed by runs of
//! already-encoded events; any other response is the plain
//! [`WatchResponse`]. Decoding one (only tests do) yields the plain
//! message.
//!
//! Invariant: a run holds whole `Event` fields, as `prost` encodes them
//! (tag 11, length, the event), so the bytes on the wire are the ones a
//! plain `WatchResponse` with the same events encodes to.

use std::sync::OnceLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use metastore_proto::etcdserverpb::{ResponseHeader, WatchResponse};
use metastore_proto::mvccpb::Event;
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

/// The field number of `WatchResponse.events`.
const EVENTS_FIELD: u32 = 11;

/// A `WatchResponse` as sent. Event responses, by far the most frequent,
/// hold only what they carry (header, watch id, runs of encoded events)
/// inline; every other response is the plain message, boxed. Streams
/// queue these by the dozen (a burst), so the size matters.
#[derive(Clone, Debug, PartialEq)]
pub enum OutgoingWatchResponse {
    /// Events of one watch: its header and id, then `runs` of encoded
    /// `events` fields, in order.
    Events {
        header: ResponseHeader,
        watch_id: i64,
        runs: Vec<Bytes>,
    },
    /// Any other response (created, canceled, progress, events split
    /// event by event).
    Message(Box<WatchResponse>),
}

impl Default for OutgoingWatchResponse {
    fn default() -> Self {
        OutgoingWatchResponse::Message(Box::default())
    }
}

impl From<WatchResponse> for OutgoingWatchResponse {
    fn from(message: WatchResponse) -> Self {
        OutgoingWatchResponse::Message(Box::new(message))
    }
}

impl OutgoingWatchResponse {
    /// The plain message a client decodes from this one.
    pub fn into_message(self) -> WatchResponse {
        match self {
            OutgoingWatchResponse::Message(m) => *m,
            OutgoingWatchResponse::Events {
                header,
                watch_id,
                runs,
            } => {
                let mut m = WatchResponse {
                    header: Some(header),
                    watch_id,
                    ..Default::default()
                };
                for run in runs {
                    m.merge(run)
                        .expect("encoded events are whole `events` fields");
                }
                m
            }
        }
    }
}

/// Field numbers of `WatchResponse.header` and `.watch_id`.
const HEADER_FIELD: u32 = 1;
const WATCH_ID_FIELD: u32 = 2;

impl Message for OutgoingWatchResponse {
    /// What prost encodes for the plain message: fields in number order,
    /// defaults (a zero `watch_id`) omitted.
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            OutgoingWatchResponse::Message(m) => m.encode_raw(buf),
            OutgoingWatchResponse::Events {
                header,
                watch_id,
                runs,
            } => {
                prost::encoding::message::encode(HEADER_FIELD, header, buf);
                if *watch_id != 0 {
                    prost::encoding::int64::encode(WATCH_ID_FIELD, watch_id, buf);
                }
                for run in runs {
                    buf.put_slice(run);
                }
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if let OutgoingWatchResponse::Events { .. } = self {
            *self = std::mem::take(self).into_message().into();
        }
        match self {
            OutgoingWatchResponse::Message(m) => m.merge_field(tag, wire_type, buf, ctx),
            OutgoingWatchResponse::Events { .. } => unreachable!("made a message above"),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            OutgoingWatchResponse::Message(m) => m.encoded_len(),
            OutgoingWatchResponse::Events {
                header,
                watch_id,
                runs,
            } => {
                prost::encoding::message::encoded_len(HEADER_FIELD, header)
                    + if *watch_id != 0 {
                        prost::encoding::int64::encoded_len(WATCH_ID_FIELD, watch_id)
                    } else {
                        0
                    }
                    + runs.iter().map(Bytes::len).sum::<usize>()
            }
        }
    }

    fn clear(&mut self) {
        *self = OutgoingWatchResponse::default();
    }
}

/// A release's events encoded as consecutive `events` fields, with where
/// each one ends, so a watcher that starts inside the release takes a
/// suffix.
#[derive(Debug)]
pub struct EncodedEvents {
    bytes: Bytes,
    /// `ends[i]`: offset just past event `i`.
    ends: Vec<usize>,
}

impl EncodedEvents {
    /// Encodes `events`, without their `prev_kv` unless `prev_kv`.
    pub fn new(events: &[Event], prev_kv: bool) -> EncodedEvents {
        let mut buf = BytesMut::new();
        let mut ends = Vec::with_capacity(events.len());
        for e in events {
            if prev_kv || e.prev_kv.is_none() {
                prost::encoding::message::encode(EVENTS_FIELD, e, &mut buf);
            } else {
                let stripped = Event {
                    r#type: e.r#type,
                    kv: e.kv.clone(),
                    prev_kv: None,
                };
                prost::encoding::message::encode(EVENTS_FIELD, &stripped, &mut buf);
            }
            ends.push(buf.len());
        }
        EncodedEvents {
            bytes: buf.freeze(),
            ends,
        }
    }

    /// The events from index `first` on (empty past the end).
    pub fn from_index(&self, first: usize) -> Bytes {
        let start = match first {
            0 => 0,
            i => self.ends.get(i - 1).copied().unwrap_or(self.bytes.len()),
        };
        self.bytes.slice(start..)
    }
}

/// A release's encodings, each made on first use and then shared by every
/// watcher: the events as released, and without their `prev_kv`.
#[derive(Debug, Default)]
pub struct EncodingCache {
    as_released: OnceLock<EncodedEvents>,
    without_prev_kv: OnceLock<EncodedEvents>,
}

/// A cache of its batch's events, not part of the batch's value.
impl PartialEq for EncodingCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl EncodingCache {
    /// `events` (the batch's, always the same ones) encoded for a watcher
    /// that asked for `prev_kv` or not. (A feed carries `prev_kv` only
    /// when one of its watchers asked, so a batch is seldom encoded both
    /// ways.)
    pub fn get(&self, events: &[Event], prev_kv: bool) -> &EncodedEvents {
        if prev_kv {
            self.as_released
                .get_or_init(|| EncodedEvents::new(events, true))
        } else {
            self.without_prev_kv
                .get_or_init(|| EncodedEvents::new(events, false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::ResponseHeader;
    use metastore_proto::mvccpb::{event::EventType, KeyValue};

    fn ev(rev: i64, key: &str, with_prev: bool) -> Event {
        let kv = |r: i64| KeyValue {
            key: key.as_bytes().to_vec().into(),
            value: format!("value at {r}").into_bytes().into(),
            create_revision: 1,
            mod_revision: r,
            version: r,
            lease: 0,
        };
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv(rev)),
            prev_kv: with_prev.then(|| kv(rev - 1)),
        }
    }

    fn header() -> ResponseHeader {
        ResponseHeader {
            cluster_id: 7,
            member_id: 8,
            revision: 12,
            raft_term: 2,
        }
    }

    fn head() -> WatchResponse {
        WatchResponse {
            header: Some(header()),
            watch_id: 3,
            ..Default::default()
        }
    }

    #[test]
    fn encodes_to_the_bytes_of_the_plain_message() {
        let events = vec![ev(10, "a", true), ev(11, "b", false), ev(12, "c", true)];
        for prev_kv in [false, true] {
            let enc = EncodedEvents::new(&events, prev_kv);
            let expected: Vec<Event> = events
                .iter()
                .map(|e| Event {
                    prev_kv: if prev_kv { e.prev_kv.clone() } else { None },
                    ..e.clone()
                })
                .collect();
            for first in 0..=events.len() {
                let plain = WatchResponse {
                    events: expected[first..].to_vec(),
                    ..head()
                };
                let out = OutgoingWatchResponse::Events {
                    header: header(),
                    watch_id: 3,
                    runs: vec![enc.from_index(first)],
                };
                assert_eq!(out.encoded_len(), plain.encoded_len());
                assert_eq!(out.encode_to_vec(), plain.encode_to_vec());
                assert_eq!(
                    WatchResponse::decode(&out.encode_to_vec()[..]).unwrap(),
                    plain
                );
                assert_eq!(out.clone().into_message(), plain);
            }
        }
    }

    #[test]
    fn runs_follow_in_order_and_a_zero_watch_id_is_omitted() {
        let a = EncodedEvents::new(&[ev(5, "x", false), ev(6, "y", false)], false);
        let b = EncodedEvents::new(&[ev(8, "z", false)], false);
        for watch_id in [0, 3] {
            let out = OutgoingWatchResponse::Events {
                header: header(),
                watch_id,
                runs: vec![a.from_index(1), b.from_index(0)],
            };
            let plain = WatchResponse {
                header: Some(header()),
                watch_id,
                events: vec![ev(6, "y", false), ev(8, "z", false)],
                ..Default::default()
            };
            assert_eq!(out.encoded_len(), plain.encoded_len());
            assert_eq!(out.encode_to_vec(), plain.encode_to_vec());
            // A decoded response is a plain one.
            let back = OutgoingWatchResponse::decode(&out.encode_to_vec()[..]).unwrap();
            assert_eq!(back, OutgoingWatchResponse::from(plain.clone()));
            assert_eq!(out.into_message(), plain);
        }
    }

    #[test]
    fn other_responses_are_the_plain_message() {
        let created = WatchResponse {
            created: true,
            cancel_reason: "x".into(),
            ..head()
        };
        let out = OutgoingWatchResponse::from(created.clone());
        assert_eq!(out.encode_to_vec(), created.encode_to_vec());
        assert_eq!(out.into_message(), created);
    }

    #[test]
    fn event_responses_are_small() {
        // A stream's burst queues up to 32 of them.
        assert!(std::mem::size_of::<OutgoingWatchResponse>() <= 72);
    }
}
