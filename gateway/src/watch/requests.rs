//! A Watch stream's requests, in arrival order, waiting for the current
//! revision they need. No I/O: the session starts the reads this asks for
//! and reports their results.
//!
//! etcd processes a stream's requests strictly in order. Each needs the
//! current revision, read *after* the request arrived: a create (start
//! "now") and a progress request so that everything the client saw before
//! is covered, a cancel for its answer's header (etcd's is the store's
//! revision when it cancels). A cancel must not overtake a create queued
//! before it either. Progress-notify ticks queue here too, so they stay
//! ordered with the requests around them.
//!
//! One read serves every request queued when it started: a client that
//! sends a thousand creates in a burst costs a few reads, not a thousand,
//! and what waits is the requests themselves (a hundred bytes or so each),
//! not a pending read per request.
//!
//! Invariants:
//! - [`RequestQueue::pop_ready`] yields requests in arrival order.
//! - A request needing a revision is yielded with the result of a read
//!   started after it was pushed ([`RequestQueue::start_read`] covers
//!   exactly the requests pushed before it).
//! - At most one read is in flight; one is wanted only while some queued
//!   request is not covered by a read.

use std::collections::VecDeque;

use metastore_proto::etcdserverpb::WatchCreateRequest;

use crate::error::GatewayError;

/// Capacity an emptied queue keeps (more is freed).
const KEEP_CAPACITY: usize = 8;

/// The current revision and raft term, or why it could not be read.
pub type Revision = Result<(i64, u64), GatewayError>;

/// Something the stream must do, in order.
#[derive(Debug, PartialEq)]
pub enum Request {
    Create(WatchCreateRequest),
    Cancel(i64),
    Progress,
    /// A progress-notify tick.
    Tick,
}

/// A request ready to apply, with its revision.
#[derive(Debug, PartialEq)]
pub enum Ready {
    Create(WatchCreateRequest, Revision),
    Cancel(i64, Revision),
    Progress(Revision),
    Tick(Revision),
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct RequestQueue {
    /// (arrival number, request), oldest first.
    queue: VecDeque<(u64, Request)>,
    next_seq: u64,
    /// The read in flight covers requests numbered below this.
    reading: Option<u64>,
    /// The newest finished read: covers requests numbered below `.0`.
    done: Option<(u64, Revision)>,
}

impl RequestQueue {
    pub fn push(&mut self, r: Request) {
        self.queue.push_back((self.next_seq, r));
        self.next_seq += 1;
    }

    /// Requests waiting (ready or not).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn covered(&self, seq: u64) -> Option<&Revision> {
        self.done
            .as_ref()
            .and_then(|(below, r)| (seq < *below).then_some(r))
    }

    /// The next request, if it can be applied now.
    pub fn pop_ready(&mut self) -> Option<Ready> {
        let (seq, _) = self.queue.front()?;
        let rev = self.covered(*seq)?.clone();
        let (_, r) = self.queue.pop_front().unwrap();
        if self.queue.is_empty() && self.queue.capacity() > KEEP_CAPACITY {
            // A burst is over: do not hold its memory for the stream's life.
            self.queue = VecDeque::new();
        }
        Some(match r {
            Request::Create(c) => Ready::Create(c, rev),
            Request::Progress => Ready::Progress(rev),
            Request::Tick => Ready::Tick(rev),
            Request::Cancel(id) => Ready::Cancel(id, rev),
        })
    }

    /// Whether a read should start now: none is in flight and a queued
    /// request is not covered by a finished read.
    pub fn wants_read(&self) -> bool {
        self.reading.is_none()
            && self
                .queue
                .back()
                .is_some_and(|(seq, _)| self.covered(*seq).is_none())
    }

    /// A read starts now: it covers everything queued so far.
    pub fn start_read(&mut self) {
        debug_assert!(self.reading.is_none(), "one read at a time");
        self.reading = Some(self.next_seq);
    }

    /// The read in flight finished.
    pub fn read_done(&mut self, rev: Revision) {
        let covers = self.reading.take().expect("a read was in flight");
        self.done = Some((covers, rev));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(key: &str) -> Request {
        Request::Create(WatchCreateRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    fn ready_create(key: &str, rev: i64) -> Ready {
        Ready::Create(
            WatchCreateRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            },
            Ok((rev, 1)),
        )
    }

    #[test]
    fn one_read_serves_every_request_queued_before_it() {
        let mut q = RequestQueue::default();
        for k in ["a", "b", "c"] {
            q.push(create(k));
        }
        assert_eq!(q.pop_ready(), None, "no revision yet");
        assert!(q.wants_read());
        q.start_read();
        assert!(!q.wants_read(), "one read at a time");
        q.read_done(Ok((7, 1)));
        assert_eq!(q.pop_ready(), Some(ready_create("a", 7)));
        assert_eq!(q.pop_ready(), Some(ready_create("b", 7)));
        assert_eq!(q.pop_ready(), Some(ready_create("c", 7)));
        assert_eq!(q.pop_ready(), None);
        assert!(q.is_empty() && !q.wants_read());
    }

    #[test]
    fn a_request_arriving_during_a_read_waits_for_the_next() {
        let mut q = RequestQueue::default();
        q.push(create("a"));
        q.start_read();
        q.push(create("b"));
        q.push(Request::Progress);
        assert!(!q.wants_read(), "one read at a time");
        q.read_done(Ok((5, 1)));
        assert_eq!(q.pop_ready(), Some(ready_create("a", 5)));
        // "b" arrived after that read started: its answer may be stale.
        assert_eq!(q.pop_ready(), None);
        assert!(q.wants_read());
        q.start_read();
        q.read_done(Ok((6, 1)));
        assert_eq!(q.pop_ready(), Some(ready_create("b", 6)));
        assert_eq!(q.pop_ready(), Some(Ready::Progress(Ok((6, 1)))));
    }

    #[test]
    fn a_cancel_never_overtakes_an_earlier_create() {
        let mut q = RequestQueue::default();
        q.push(Request::Cancel(9));
        q.start_read();
        q.push(create("a"));
        q.push(Request::Cancel(0));
        q.read_done(Ok((2, 1)));
        // The first cancel is answered at the revision read after it.
        assert_eq!(q.pop_ready(), Some(Ready::Cancel(9, Ok((2, 1)))));
        assert_eq!(
            q.pop_ready(),
            None,
            "the create waits, and the cancel behind it"
        );
        assert!(q.wants_read());
        q.start_read();
        q.read_done(Ok((3, 1)));
        assert_eq!(q.pop_ready(), Some(ready_create("a", 3)));
        assert_eq!(q.pop_ready(), Some(Ready::Cancel(0, Ok((3, 1)))));
        assert!(!q.wants_read());
    }

    #[test]
    fn a_failed_read_answers_the_requests_it_covers() {
        let mut q = RequestQueue::default();
        q.push(Request::Tick);
        q.push(create("a"));
        q.start_read();
        let err = GatewayError::Internal("down".into());
        q.read_done(Err(err.clone()));
        assert_eq!(q.pop_ready(), Some(Ready::Tick(Err(err.clone()))));
        assert_eq!(
            q.pop_ready(),
            Some(Ready::Create(
                WatchCreateRequest {
                    key: b"a".to_vec(),
                    ..Default::default()
                },
                Err(err)
            ))
        );
    }
}
